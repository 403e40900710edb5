//! Builds the alloctrace binary (and, through aya-build, its eBPF object) in release mode.

use std::path::PathBuf;

use crate::{exec, setup};

pub fn run() -> exec::Result<PathBuf> {
    setup::run()?;
    exec::run(exec::cargo().args(["build", "--release", "-p", "tracer-user"]))?;
    Ok(binary())
}

/// Where the release build puts the binary.
pub fn binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| exec::root().join("target"));
    target.join("release").join("alloctrace")
}
