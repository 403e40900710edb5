//! Every check CI runs: formatting, clippy, unit tests, and the real-kernel tests that trace
//! fixture programs with the real binary (they need root, as CI has).

use crate::{build, exec};

pub fn run(extra: &[String]) -> exec::Result {
    let alloctrace = build::run()?;
    exec::run(exec::cargo().args(["fmt", "--all", "--check"]))?;
    exec::run(exec::cargo().args([
        "clippy",
        "--release",
        "--workspace",
        "--exclude",
        "tracer-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    exec::run(
        exec::cargo()
            .args([
                "test",
                "--release",
                "--workspace",
                "--exclude",
                "tracer-ebpf",
            ])
            .args(extra)
            .env("ALLOCTRACE_BIN", &alloctrace),
    )
}
