//! Traces the bundled demo workload and prints its report: the quickest look at alloctrace.

use std::process::Command;

use crate::{build, exec};

pub fn run(extra: &[String]) -> exec::Result {
    let alloctrace = build::run()?;
    let demo_dir = exec::root().join("target").join("demo");
    std::fs::create_dir_all(&demo_dir)
        .map_err(|e| format!("cannot create {}: {e}", demo_dir.display()))?;
    let demo = demo_dir.join("demo");
    let source = exec::root().join("tests").join("fixtures").join("demo.c");
    exec::run(
        Command::new("cc")
            .args(["-O1", "-g", "-fno-omit-frame-pointer", "-o"])
            .arg(&demo)
            .arg(&source),
    )?;
    exec::run(
        Command::new(&alloctrace)
            .arg("run")
            .args(extra)
            .arg("--")
            .arg(&demo),
    )
}
