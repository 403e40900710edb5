//! Installs what building and testing need, idempotently: each step checks first, so a
//! second run does nothing. The recipe is the one verified in shared/TOOLCHAIN.md.

use std::process::Command;

use crate::exec::{self, Result, EBPF_TOOLCHAIN, HOST_TOOLCHAIN};

/// Debian packages: LLVM 22 for bpf-linker; gcc, g++ (C++ fixtures; alloctrace links
/// libstdc++ for its C++ demangler), binutils (objcopy, strip, addr2line, nm), llvm-22
/// (llvm-addr2line), gdb (the backtrace stacks are compared with) and libcap2-bin (capsh)
/// for the tests; libjemalloc-dev, libgoogle-perftools-dev (tcmalloc), libmimalloc-dev and
/// musl-tools (the allocators besides glibc's the fixtures link); libc6-dbg for libc
/// line numbers in reports and for glibc's `main_arena`, which tells what its arenas hold
/// free; the real Debian programs of the symbol corpus: python3.11 with the debug info
/// python3.11-dbg ships, sqlite3, git; python3 (`/usr/bin/python3`, the JSON-heavy
/// no-frame-pointer workload of a test and the bench); golang-go (`go tool pprof` reads the pprof output, and
/// a Go program is one whose allocator cannot be probed),
/// tmux (drives `alloctrace top` in a terminal), man-db (`man -l` renders the man pages),
/// bpftool (the kernel's list of BPF links, checked after alloctrace is killed) and
/// prometheus (a real server scrapes `alloctrace agent` in its tests).
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "llvm-22",
    "libzstd-dev",
    "zlib1g-dev",
    "gcc",
    "g++",
    "binutils",
    "gdb",
    "libc6-dbg",
    "libcap2-bin",
    "libjemalloc-dev",
    "libgoogle-perftools-dev",
    "libmimalloc-dev",
    "musl-tools",
    "util-linux",
    "python3",
    "python3.11-dbg",
    "sqlite3",
    "git",
    "golang-go",
    "tmux",
    "man-db",
    "bpftool",
    "prometheus",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn run() -> Result {
    apt_packages()?;
    toolchain(HOST_TOOLCHAIN, &["clippy", "rustfmt"])?;
    toolchain(EBPF_TOOLCHAIN, &["rust-src"])?;
    bpf_linker()?;
    tracefs()
}

fn apt_packages() -> Result {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let status = exec::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]));
            !status.is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    exec::run(Command::new("apt-get").args(["update", "-qq"]))?;
    exec::apt_install(&missing)
}

fn toolchain(name: &str, components: &[&str]) -> Result {
    let rustup = exec::cargo_bin("rustup");
    let installed = exec::output(Command::new(&rustup).args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        name,
    ]))
    .unwrap_or_default();
    let has_all = !installed.is_empty()
        && components
            .iter()
            .all(|c| installed.lines().any(|l| l.starts_with(c)));
    if has_all {
        return Ok(());
    }
    let mut cmd = Command::new(&rustup);
    cmd.args(["toolchain", "install", name, "--profile", "minimal"]);
    for c in components {
        cmd.args(["--component", c]);
    }
    exec::run(&mut cmd)
}

fn bpf_linker() -> Result {
    let linker = exec::cargo_bin("bpf-linker");
    let version = exec::output(Command::new(&linker).arg("--version")).unwrap_or_default();
    if version.contains(BPF_LINKER_VERSION) {
        return Ok(());
    }
    exec::run(
        Command::new(exec::cargo_bin("cargo"))
            .arg(format!("+{HOST_TOOLCHAIN}"))
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env_remove("RUSTUP_TOOLCHAIN"),
    )
}

fn tracefs() -> Result {
    if exec::succeeds(Command::new("mountpoint").args(["-q", "/sys/kernel/tracing"])) {
        return Ok(());
    }
    exec::run(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))
}
