//! Every check CI runs: formatting, clippy, unit tests, and the real-kernel tests that trace
//! fixture programs with the real binary (they need root, as CI has). Ends with one line
//! counting every test of every test binary, so the whole run reads as one result.

use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
};

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
    let mut cmd = exec::cargo();
    cmd.args([
        "test",
        "--release",
        "--workspace",
        "--exclude",
        "tracer-ebpf",
        "--no-fail-fast",
    ])
    .args(extra)
    .env("ALLOCTRACE_BIN", &alloctrace)
    .stdout(Stdio::piped());
    eprintln!("xtask: $ cargo test --release --workspace --exclude tracer-ebpf --no-fail-fast");
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run cargo test: {e}"))?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.map_err(|e| format!("reading cargo test's output: {e}"))?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            passed += count(result, "passed");
            failed += count(result, "failed");
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for cargo test: {e}"))?;
    println!("summary: {passed} passed, {failed} failed");
    if status.success() {
        Ok(())
    } else {
        Err(format!("cargo test failed with {status}"))
    }
}

/// The number before `word` in `ok. 8 passed; 0 failed; …`.
fn count(result: &str, word: &str) -> u64 {
    result
        .split(';')
        .find_map(|part| part.trim().strip_suffix(word))
        .and_then(|n| {
            n.trim()
                .trim_start_matches("ok. ")
                .trim_start_matches("FAILED. ")
                .parse()
                .ok()
        })
        .unwrap_or(0)
}
