//! `cargo xtask`: set up, build, run, test (and later bench) alloctrace.
//!
//! Built by whatever stable toolchain the machine has (no dependencies, edition 2021), so it can
//! install the pinned toolchains the project itself needs before invoking them.

mod agent_tax;
mod bench;
mod bench_attach;
mod bench_python;
mod build;
mod deploy;
mod exec;
mod host_tax;
mod json;
mod numbers;
mod run;
mod setup;
mod soak;
mod test;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  setup   install what the build needs (apt packages, toolchains, bpf-linker), mount tracefs
  build   setup, then build the alloctrace binary (release)
  run     setup, build, trace the bundled demo workload and print its report
  test    setup, build, then fmt/clippy checks, unit tests and real-kernel tests (needs root)
  check-deploy  validate deploy/daemonset.yaml (privileges, mounts, limits, scrape
          annotations) and deploy/Dockerfile (instruction syntax, entrypoint) offline
  bench   setup, build, then measure tracing cost side by side (untraced, empty-probe floor,
          alloctrace, heaptrack), collector memory per outstanding allocation, and the
          host-wide tax `alloctrace system` and `alloctrace agent` put on a bystander process
          (`bench host`: only the host-wide tax; `bench python`: only python3 on a JSON-heavy
          script)
  soak    setup, build, then trace a churning, forking workload for `--minutes N` (default 10;
          half exact, half sampled) and check the churn rate, losses, the numbers against the
          workload's own bookkeeping and the collector's peak RSS (not part of `test`)
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup::run(),
        Some("build") => build::run().map(drop),
        Some("run") => run::run(&args[1..]),
        Some("test") => test::run(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        Some("check-deploy") => deploy::run(),
        Some("soak") => soak::run(&args[1..]),
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err}");
            ExitCode::FAILURE
        }
    }
}
