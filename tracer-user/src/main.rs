//! The `alloctrace` binary: parse the command line, run one session, map errors to exit codes.

use std::process::ExitCode;

use alloctrace::{
    cli::{Cli, Command, StackModeArg, UprobesArg},
    diff, probe,
    session::{self, Config, Target},
};
use clap::Parser as _;

fn main() -> ExitCode {
    let cli = Cli::parse(); // usage errors exit with code 2
    let (target, trace) = match cli.command {
        Command::Run(run) => (Target::Run(run.command), run.trace),
        Command::Attach(attach) => (Target::Attach(attach.pids), attach.trace),
        Command::Diff(args) => return exit(diff::run(&args)),
    };
    let config = Config {
        target,
        duration: trace.duration,
        interval: trace.interval,
        format: trace.format,
        weight: trace.weight,
        output: trace.output,
        // Profile tools filter for themselves: give them every site.
        top: trace.top.unwrap_or(if trace.format.is_profile() {
            usize::MAX
        } else {
            20
        }),
        ring_mib: trace.ring_buffer,
        verbose: cli.verbose,
        sample_bytes: trace.sample_bytes,
        sample_seed: trace.sample_seed,
        stack_mode: match trace.stack_mode {
            StackModeArg::Auto => None,
            StackModeArg::Fp => Some(probe::StackMode::FramePointers),
            StackModeArg::Dwarf => Some(probe::StackMode::Dwarf),
        },
        stack_depth: usize::from(trace.stack_depth),
        stack_bytes: trace.stack_bytes,
        tcache_prediction: !trace.no_tcache_prediction,
        test_mispredict: trace.test_mispredict,
        uprobes: match trace.uprobes {
            UprobesArg::Auto => None,
            UprobesArg::Session => Some(probe::UprobeApi::Session),
            UprobesArg::Multi => Some(probe::UprobeApi::Multi),
            UprobesArg::Perf => Some(probe::UprobeApi::Perf),
        },
        programs: if trace.probe_floor {
            probe::Programs::Floor
        } else {
            probe::Programs::Tracing
        },
    };
    exit(session::run(config))
}

/// Success, or the error and its causes on one line of stderr and exit code 1.
fn exit(result: Result<(), alloctrace::Error>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let mut line = format!("alloctrace: error: {err}");
            let mut source = std::error::Error::source(&err);
            while let Some(cause) = source {
                let text = cause.to_string();
                if !line.contains(&text) {
                    line.push_str(": ");
                    line.push_str(&text);
                }
                source = cause.source();
            }
            eprintln!("{line}");
            ExitCode::FAILURE
        }
    }
}
