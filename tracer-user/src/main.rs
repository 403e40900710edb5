//! The `alloctrace` binary: parse the command line, run one command, map errors to exit codes.

use std::{
    io::{self, IsTerminal as _, Write as _},
    process::ExitCode,
};

use alloctrace::{
    Error, agent,
    cli::{Cli, Command, Format, ManArgs, StackModeArg, TraceArgs, UprobesArg},
    diff, probe,
    session::{self, Config, Target},
    top,
};
use clap::{CommandFactory as _, Parser as _};

fn main() -> ExitCode {
    let cli = Cli::parse(); // usage errors exit with code 2
    let verbose = cli.verbose;
    let result = match cli.command {
        Command::Run(run) => {
            binary_needs_a_file(&run.trace);
            session::run(config(Target::Run(run.command), run.trace, verbose))
        }
        Command::Attach(attach) => {
            binary_needs_a_file(&attach.trace);
            session::run(config(Target::Attach(attach.pids), attach.trace, verbose))
        }
        Command::System(args) => {
            binary_needs_a_file(&args.trace);
            let sample_bytes = if args.exact {
                0
            } else {
                args.trace
                    .sample_bytes
                    .unwrap_or(session::SYSTEM_SAMPLE_BYTES)
            };
            let target = Target::System(session::SystemTarget {
                pids: args.pids,
                comms: args.filters.comms,
                exclude_comms: args.filters.exclude_comms,
                cgroups: args.filters.cgroups,
            });
            let mut config = config(target, args.trace, verbose);
            config.sample_bytes = sample_bytes;
            config.max_tracked = Some(args.max_tracked);
            config.detail = args.detail;
            session::run(config)
        }
        Command::Top(args) => {
            let target = if args.command.is_empty() {
                Target::Attach(args.pids)
            } else {
                Target::Run(args.command)
            };
            top::run(config(target, args.trace, verbose))
        }
        Command::Agent(args) => agent::run(args),
        Command::Diff(args) => diff::run(&args),
        Command::Completions(args) => {
            let mut script = Vec::new();
            clap_complete::generate(args.shell, &mut Cli::command(), "alloctrace", &mut script);
            to_stdout(&script)
        }
        Command::Man(args) => man(&args),
    };
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
            if matches!(err, Error::Usage { .. }) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// A gzip-compressed profile is no use on a terminal: a usage error (exit 2) before tracing.
fn binary_needs_a_file(trace: &TraceArgs) {
    if trace.format == Format::Pprof && trace.output.is_none() && io::stdout().is_terminal() {
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--format pprof writes a gzip-compressed file: add -o FILE (or redirect stdout)",
            )
            .exit();
    }
}

/// The session's configuration from the command line.
fn config(target: Target, trace: TraceArgs, verbose: bool) -> Config {
    Config {
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
        ring_mib: trace.ring_buffer.unwrap_or(8),
        verbose,
        sample_bytes: trace.sample_bytes.unwrap_or(0),
        max_tracked: None,
        detail: usize::MAX,
        sample_seed: trace.sample_seed,
        max_sampled: trace.max_sampled,
        stack_mode: match trace.stack_mode {
            StackModeArg::Auto => None,
            StackModeArg::Fp => Some(probe::StackMode::FramePointers),
            StackModeArg::Dwarf => Some(probe::StackMode::Dwarf),
            StackModeArg::DwarfCopy => Some(probe::StackMode::DwarfCopy),
        },
        stack_depth: usize::from(trace.stack_depth),
        stack_bytes: trace.stack_bytes,
        tcache_prediction: !trace.no_tcache_prediction,
        test_mispredict: trace.test_mispredict,
        test_maps_from_events: trace.test_maps_from_events,
        uprobes: match trace.uprobes {
            UprobesArg::Auto => None,
            UprobesArg::Session => Some(probe::UprobeApi::Session),
            UprobesArg::Multi => Some(probe::UprobeApi::Multi),
            UprobesArg::Perf => Some(probe::UprobeApi::Perf),
        },
        programs: match (trace.probe_floor, trace.probe_floor_sessions) {
            (true, _) => probe::Programs::Floor,
            (_, true) => probe::Programs::FloorSessions,
            _ => probe::Programs::Tracing,
        },
        watch: None,
        catch_signals: true,
        count_traps: false,
    }
}

/// `alloctrace man [COMMAND]`: the page of alloctrace, or of `alloctrace-COMMAND`.
fn man(args: &ManArgs) -> Result<(), Error> {
    let cli = Cli::command();
    let page = match &args.command {
        None => cli,
        Some(name) => {
            let Some(sub) = cli.find_subcommand(name) else {
                let names: Vec<&str> = cli.get_subcommands().map(|c| c.get_name()).collect();
                Cli::command()
                    .error(
                        clap::error::ErrorKind::InvalidValue,
                        format!("no command `{name}`; use one of: {}", names.join(", ")),
                    )
                    .exit(); // a usage error: exit code 2
            };
            let name = sub.get_name();
            sub.clone()
                .display_name(format!("alloctrace-{name}"))
                .bin_name(format!("alloctrace {name}"))
                .version(env!("CARGO_PKG_VERSION"))
        }
    };
    let mut text = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut text)
        .map_err(|source| Error::Io {
            what: "cannot render the man page".into(),
            source,
        })?;
    to_stdout(&text)
}

/// Writes generated text to stdout; a closed pipe (`| head`) is not an error.
fn to_stdout(bytes: &[u8]) -> Result<(), Error> {
    match io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(Error::Output {
            path: "<stdout>".into(),
            source: e,
        }),
        _ => Ok(()),
    }
}
