//! `cargo xtask check-deploy`: validates `deploy/daemonset.yaml` and `deploy/Dockerfile`
//! offline (no registry, no cluster, no root): the checks live in `tests/tests/deploy.rs`,
//! built by the pinned toolchain with a YAML parser, so xtask itself keeps no dependencies.
//! `cargo xtask test` runs them too, with every other test.

use crate::exec;

pub fn run() -> exec::Result {
    exec::run(exec::cargo().args([
        "test",
        "--release",
        "--offline",
        "-p",
        "alloctrace-tests",
        "--test",
        "deploy",
    ]))
}
