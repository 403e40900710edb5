//! The one way xtask runs commands: echoed, with the pinned toolchain's environment clean,
//! and a failure that says which command failed and how.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

pub type Result<T = ()> = std::result::Result<T, String>;

/// The host toolchain alloctrace is built with (aya 0.16 needs Rust 1.98).
pub const HOST_TOOLCHAIN: &str = "1.98.0";
/// The nightly that builds the eBPF object; its LLVM (22) matches bpf-linker's.
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-07-01";

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_owned()
}

/// `cargo +HOST_TOOLCHAIN`, with variables from the outer cargo removed so the inner one
/// picks its own rustc.
pub fn cargo() -> Command {
    let mut cmd = Command::new(cargo_bin("cargo"));
    cmd.arg(format!("+{HOST_TOOLCHAIN}"));
    for var in [
        "RUSTC",
        "RUSTDOC",
        "CARGO",
        "RUSTUP_TOOLCHAIN",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
    ] {
        cmd.env_remove(var);
    }
    cmd.current_dir(root());
    cmd
}

/// A binary from `~/.cargo/bin` when present there (rustup's proxies, bpf-linker).
pub fn cargo_bin(name: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    match home.map(|h| h.join("bin").join(name)) {
        Some(path) if path.exists() => path,
        _ => PathBuf::from(name),
    }
}

/// Runs a command to completion, echoing it first.
pub fn run(cmd: &mut Command) -> Result {
    eprintln!("xtask: $ {}", show(cmd));
    let status = cmd
        .status()
        .map_err(|e| format!("cannot start `{}`: {e}", show(cmd)))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{}` failed with {status}", show(cmd)))
    }
}

/// Installs Debian packages, non-interactively and without recommends.
pub fn apt_install(packages: &[&str]) -> Result {
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Runs a command quietly; true when it succeeds.
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A measured command's standard output; an error naming `what` when it cannot start or
/// fails (with its standard error).
pub fn measured(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command's standard output, if it ran and succeeded.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// `tests/fixtures/NAME.c` compiled at optimization level `opt` (`-O0` keeps a fixture's
/// leaks: at `-O2` GCC drops a malloc whose block is only stored, never read).
pub fn compile_fixture(dir: &Path, name: &str, opt: &str) -> Result<PathBuf> {
    let out = dir.join(name);
    let source = root()
        .join("tests")
        .join("fixtures")
        .join(format!("{name}.c"));
    run(Command::new("cc")
        .args([opt, "-g", "-fno-omit-frame-pointer", "-pthread", "-o"])
        .arg(&out)
        .arg(&source))?;
    Ok(out)
}

/// Sends `signal` (as `kill` spells it: `-INT`) to `child` and waits for it to end with
/// success; `what` names it in errors.
pub fn signal_and_wait(mut child: std::process::Child, signal: &str, what: &str) -> Result {
    let pid = child.id().to_string();
    run(Command::new("kill").args([signal, &pid]))?;
    let status = child
        .wait()
        .map_err(|e| format!("waiting for {what}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} ended with {status}"))
    }
}
