//! Builds the eBPF object with the pinned nightly and embeds it (`OUT_DIR/tracer-ebpf`), so a
//! plain `cargo build` of the collector always carries programs matching this source tree.
//!
//! Done by hand rather than through aya-build, which echoes every line of the inner cargo as
//! a warning on every build; here the inner output is shown only when it fails.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// The nightly whose LLVM matches the bpf-linker `cargo xtask setup` installs.
const EBPF_TOOLCHAIN: &str = "nightly-2026-07-01";
const TARGET: &str = "bpfel-unknown-none";

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest.parent().expect("workspace root").to_owned();
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    for dir in ["tracer-ebpf", "tracer-common"] {
        println!("cargo::rerun-if-changed={}", root.join(dir).display());
    }

    let target_dir = out.join("ebpf-target");
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        EBPF_TOOLCHAIN,
        "cargo",
        "build",
        "--package",
        "tracer-ebpf",
        "--bins",
    ])
    .args(["--release", "--target", TARGET, "-Z", "build-std=core"])
    .arg("--target-dir")
    .arg(&target_dir)
    .current_dir(&root)
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        // Warnings fail the build: the inner build's output is only shown when it fails.
        [
            "--cfg=bpf_target_arch=\"x86_64\"",
            "-Cdebuginfo=2",
            "-Clink-arg=--btf",
            "-Dwarnings",
        ]
        .join("\x1f"),
    );
    for var in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "CARGO_ENCODED_RUSTFLAGS_HOST",
    ] {
        cmd.env_remove(var);
    }
    let output = cmd.output().unwrap_or_else(|e| {
        fail(&format!(
            "cannot run `rustup run {EBPF_TOOLCHAIN} cargo`: {e}; run `cargo xtask setup` first"
        ))
    });
    if !output.status.success() {
        for line in String::from_utf8_lossy(&output.stderr).lines() {
            println!("cargo::warning={line}");
        }
        fail(
            "building the eBPF programs failed (see the warnings above; `cargo xtask setup` installs the toolchain)",
        );
    }
    let built = target_dir.join(TARGET).join("release").join("tracer-ebpf");
    copy(&built, &out.join("tracer-ebpf"));
}

fn copy(from: &Path, to: &Path) {
    if let Err(e) = std::fs::copy(from, to) {
        fail(&format!(
            "cannot copy {} to {}: {e}",
            from.display(),
            to.display()
        ));
    }
}

fn fail(message: &str) -> ! {
    println!("cargo::error={message}");
    std::process::exit(1);
}
