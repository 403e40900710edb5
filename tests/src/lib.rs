//! Helpers for the real-kernel tests: compile fixture programs, run the real `alloctrace`
//! binary on them, and read its JSON report. No mocks: every test traces a real process.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::Mutex,
};

use serde_json::Value;

/// The alloctrace binary under test (`cargo xtask test` sets `ALLOCTRACE_BIN`).
pub fn alloctrace() -> PathBuf {
    if let Some(bin) = std::env::var_os("ALLOCTRACE_BIN") {
        return bin.into();
    }
    let release = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/alloctrace");
    assert!(
        release.exists(),
        "no alloctrace binary: run the tests through `cargo xtask test`"
    );
    release
}

/// Tracing needs root. Where it is missing the test fails, loudly: it never skips.
pub fn require_root() {
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "real-kernel tests need root (CAP_BPF, CAP_PERFMON): run `sudo cargo xtask test`"
    );
}

/// Fixtures compiled by this test process: each is built once, so a running fixture's binary
/// is never rewritten under it by another test.
static COMPILED: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());

/// Where fixtures and reports go: under the workspace's target directory.
pub fn scratch_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/alloctrace-tests");
    std::fs::create_dir_all(&dir).expect("create the test scratch directory");
    dir.canonicalize().expect("canonical scratch directory")
}

/// Compiles `tests/fixtures/NAME.c` with frame pointers and debug info (plus `extra` flags)
/// and returns the binary's path.
pub fn fixture(name: &str, extra: &[&str]) -> PathBuf {
    let tag: String = extra
        .concat()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(format!("{name}.c"));
    compile_once(&source, &format!("{name}{tag}"), |binary| {
        let mut cc = Command::new("cc");
        cc.args(["-O0", "-g", "-fno-omit-frame-pointer", "-pthread", "-o"])
            .arg(binary)
            .arg(&source)
            .args(extra);
        cc
    })
}

/// Compiles `tests/fixtures/NAME.cpp` with g++ and exactly `flags` (`tag` names the variant)
/// and returns the binary's path.
pub fn cxx_fixture(name: &str, tag: &str, flags: &[&str]) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(format!("{name}.cpp"));
    compile_once(&source, &format!("cxx-{name}{tag}"), |binary| {
        let mut cxx = Command::new("g++");
        cxx.args(flags).arg("-o").arg(binary).arg(&source);
        cxx
    })
}

/// Compiles `tests/fixtures/rust/NAME.rs` with rustc (debug info, frame pointers, no
/// optimisation) and returns the binary's path.
pub fn rust_fixture(name: &str) -> PathBuf {
    rust_fixture_with(
        name,
        "",
        &["-g", "-C", "force-frame-pointers=yes", "-C", "opt-level=0"],
    )
}

/// Compiles `tests/fixtures/rust/NAME.rs` with rustc and exactly `flags` (`tag` names the
/// variant) and returns the binary's path.
pub fn rust_fixture_with(name: &str, tag: &str, flags: &[&str]) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/rust")
        .join(format!("{name}.rs"));
    compile_once(&source, &format!("rust-{name}{tag}"), |binary| {
        let mut rustc = Command::new("rustc");
        rustc
            .args(flags)
            .arg("-o")
            .arg(binary)
            .arg(&source)
            .env_remove("RUSTUP_TOOLCHAIN");
        rustc
    })
}

/// Builds the Cargo project `tests/fixtures/rust-allocators` (Rust programs whose global
/// allocator is jemalloc or mimalloc, from crates.io) once, and returns binary `name`:
/// as built (release, with debug info), or a copy stripped of its debug info (its symbol
/// table kept, as Cargo's release profile leaves it).
pub fn cargo_fixture(name: &str, debug_info: bool) -> PathBuf {
    let binary = cargo_project_fixture("rust-allocators", name);
    if debug_info {
        return binary;
    }
    let stripped = binary.with_file_name(format!("{name}-nodebug"));
    let building = stripped.with_extension(format!("building-{}", std::process::id()));
    let out = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(&binary)
        .arg(&building)
        .output()
        .expect("run objcopy");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&building, &stripped).expect("put the stripped binary in place");
    stripped
}

/// Builds the Cargo project `tests/fixtures/PROJECT` (release profile, its own `Cargo.lock`,
/// crates from the local registry) once per test process, and returns its binary `name`.
pub fn cargo_project_fixture(project: &str, name: &str) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(project)
        .join("Cargo.toml");
    let target = scratch_dir().join("cargo");
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|p| p == project) {
        let out = Command::new(env!("CARGO"))
            .args(["build", "--release", "--locked", "--manifest-path"])
            .arg(&manifest)
            .arg("--target-dir")
            .arg(&target)
            .env_remove("RUSTFLAGS")
            .output()
            .expect("run cargo");
        assert!(
            out.status.success(),
            "building {} failed:\n{}",
            manifest.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        built.push(project.to_owned());
    }
    target.join("release").join(name)
}

/// Compiles `tests/fixtures/NAME.c` statically against musl (`musl-gcc -static`), stripped
/// of every symbol when `stripped`.
pub fn musl_fixture(name: &str, stripped: bool) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(format!("{name}.c"));
    let tag = if stripped { "-musl-stripped" } else { "-musl" };
    compile_once(&source, &format!("{name}{tag}"), |binary| {
        let mut cc = Command::new("musl-gcc");
        cc.args(["-static", "-O0", "-g", "-fno-omit-frame-pointer", "-o"])
            .arg(binary)
            .arg(&source);
        if stripped {
            cc.arg("-s");
        }
        cc
    })
}

/// Compiles `tests/fixtures/NAME.c` as a shared library for `LD_PRELOAD` (optimised, as such
/// shims ship, with debug info) and returns its path.
pub fn preload_fixture(name: &str) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(format!("{name}.c"));
    compile_once(&source, &format!("lib{name}.so"), |library| {
        let mut cc = Command::new("cc");
        cc.args(["-O2", "-g", "-shared", "-fPIC", "-pthread", "-o"])
            .arg(library)
            .arg(&source)
            .arg("-ldl");
        cc
    })
}

/// Builds `tests/fixtures/go/NAME.go` with Go's own toolchain, without cgo (a static binary
/// whose allocator is Go's).
pub fn go_fixture(name: &str) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/go")
        .join(format!("{name}.go"));
    compile_once(&source, &format!("go-{name}"), |binary| {
        let mut go = Command::new("go");
        go.args(["build", "-o"])
            .arg(binary)
            .arg(&source)
            .env("CGO_ENABLED", "0")
            .env("GOCACHE", scratch_dir().join("go-cache"))
            .env("GOPATH", scratch_dir().join("go-path"))
            .env("GO111MODULE", "off");
        go
    })
}

/// Splits `binary`'s debug info into `NAME-stripped.debug` next to a stripped copy
/// `NAME-stripped` that points at it through `.gnu_debuglink`, as distributions ship
/// binaries; returns the stripped copy.
pub fn split_debug_info(binary: &Path) -> PathBuf {
    // One split at a time: two tests of one file splitting the same binary wrote the same
    // files, and the second rename found its copy already moved.
    static SPLITTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = SPLITTING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let stripped = binary.with_file_name(format!(
        "{}-stripped",
        binary.file_name().expect("a file").to_string_lossy()
    ));
    let debug = stripped.with_extension("debug");
    // Built aside and renamed into place: a traced copy from an earlier run may still be
    // executing, and writing into a running binary fails (ETXTBSY).
    let building = stripped.with_extension(format!("building-{}", std::process::id()));
    let steps: [(&str, Vec<&std::ffi::OsStr>); 3] = [
        (
            "objcopy",
            vec![
                "--only-keep-debug".as_ref(),
                binary.as_os_str(),
                debug.as_os_str(),
            ],
        ),
        (
            "strip",
            vec![
                "--strip-all".as_ref(),
                "-o".as_ref(),
                building.as_os_str(),
                binary.as_os_str(),
            ],
        ),
        (
            "objcopy",
            vec![
                "--add-gnu-debuglink".as_ref(),
                debug.as_os_str(),
                building.as_os_str(),
            ],
        ),
    ];
    for (tool, args) in steps {
        let out = Command::new(tool)
            .args(&args)
            .current_dir(stripped.parent().expect("a directory"))
            .output()
            .unwrap_or_else(|e| panic!("run {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::rename(&building, &stripped).expect("put the stripped binary in place");
    stripped
}

/// gdb's backtrace when `binary ARGS` first reaches `function`: `(function, line)` per frame,
/// innermost first, up to `main`.
pub fn gdb_backtrace(binary: &Path, args: &[&str], function: &str) -> Vec<(String, Option<u32>)> {
    let out = Command::new("gdb")
        .args([
            "-batch",
            "-nx",
            "-ex",
            &format!("break {function}"),
            "-ex",
            "run",
            "-ex",
            "bt",
        ])
        .arg("--args")
        .arg(binary)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run gdb (apt install gdb)");
    let text = String::from_utf8_lossy(&out.stdout);
    // "#1  0x0000555555555189 in level5 (n=48) at deep_leak.c:19" or "#0  level6 (n=48) at …"
    let frames: Vec<(String, Option<u32>)> = text
        .lines()
        .filter(|l| l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.split_once(' ')?.1.trim_start();
            let rest = rest.split_once(" in ").map_or(rest, |(_, r)| r);
            let name = rest.split_whitespace().next()?.to_owned();
            let line = rest
                .rsplit_once(':')
                .and_then(|(_, n)| n.trim().parse().ok());
            Some((name, line))
        })
        .collect();
    assert!(
        !frames.is_empty(),
        "gdb printed no backtrace:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    frames
}

/// Runs the compiler `command(binary)` builds, once per test process for each output name,
/// and returns the binary's canonical path.
fn compile_once(source: &Path, output: &str, command: impl FnOnce(&Path) -> Command) -> PathBuf {
    let mut compiled = COMPILED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, path)) = compiled.iter().find(|(k, _)| k == output) {
        return path.clone();
    }
    let dir = scratch_dir().join("fixtures");
    std::fs::create_dir_all(&dir).expect("create the fixture directory");
    let binary = dir.join(output);
    let out = command(&binary).output().expect("run the compiler");
    assert!(
        out.status.success(),
        "compiling {} failed:\n{}",
        source.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let binary = binary.canonicalize().expect("canonical fixture path");
    compiled.push((output.to_owned(), binary.clone()));
    binary
}

/// A running `attach_target` fixture, past its "ready" line (its allocations before any
/// attach are made).
pub struct AttachTarget {
    pub child: Child,
    pub stdout: BufReader<std::process::ChildStdout>,
}

impl AttachTarget {
    /// Starts `command` (an attach_target invocation) and waits for "ready".
    pub fn start(mut command: Command) -> Self {
        command.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = spawn_fresh(&mut command);
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        assert_eq!(read_line(&mut stdout), "ready\n");
        Self { child, stdout }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends "go": it frees its early blocks, leaks 30 × 32 B from after_attach(), says
    /// "done".
    pub fn go(&mut self) {
        use std::io::Write as _;
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(b"go\n").expect("signal the fixture");
        assert_eq!(read_line(&mut self.stdout), "done\n");
    }

    /// Closes its stdin and waits for it to exit.
    pub fn finish(mut self) -> ExitStatus {
        drop(self.child.stdin.take());
        self.child.wait().expect("wait for the fixture")
    }
}

/// Spawns `command`, whose program may have just been written by this test process: while
/// another test thread forks, the child holds a copy of the write descriptor until it execs,
/// and exec of the file fails with ETXTBSY meanwhile; that passes in milliseconds.
pub fn spawn_fresh(command: &mut Command) -> Child {
    for _ in 0..100 {
        match command.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other.expect("start the fixture"),
        }
    }
    panic!("the fixture stayed busy (ETXTBSY) for 2 s")
}

/// A finished alloctrace run.
#[derive(Debug)]
pub struct Traced {
    pub status: ExitStatus,
    pub stderr: String,
    pub report: Value,
}

impl Traced {
    /// The report's entry for `pid`.
    pub fn process(&self, pid: u32) -> &Value {
        self.report["processes"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["pid"] == pid))
            .unwrap_or_else(|| panic!("pid {pid} missing from the report:\n{}", self.pretty()))
    }

    /// The only process in the report.
    pub fn only_process(&self) -> &Value {
        let ps = self.report["processes"]
            .as_array()
            .expect("processes array");
        assert_eq!(ps.len(), 1, "expected one process:\n{}", self.pretty());
        &ps[0]
    }

    /// The program images of the one traced process, in order (an `exec` starts the next):
    /// each is reported on its own.
    pub fn images(&self) -> Vec<&Value> {
        let mut ps: Vec<&Value> = self.report["processes"]
            .as_array()
            .expect("processes array")
            .iter()
            .collect();
        assert!(
            ps.windows(2).all(|w| w[0]["pid"] == w[1]["pid"]),
            "expected one process:\n{}",
            self.pretty()
        );
        ps.sort_by_key(|p| p["image"].as_u64());
        ps
    }

    pub fn pretty(&self) -> String {
        format!(
            "{}\n--- stderr ---\n{}",
            serde_json::to_string_pretty(&self.report).unwrap_or_default(),
            self.stderr
        )
    }
}

/// Runs `alloctrace run --format json ARGS -- CMD...` and parses the report.
pub fn run_traced(args: &[&str], command: &[&Path]) -> Traced {
    run_traced_output(args, command).0
}

/// Like [`run_traced`], also returning what the traced command wrote to its stdout.
pub fn run_traced_output(args: &[&str], command: &[&Path]) -> (Traced, String) {
    run_traced_env(args, command, &[])
}

/// Like [`run_traced_output`], with `env` added to the traced command's environment.
pub fn run_traced_env(args: &[&str], command: &[&Path], env: &[(&str, &str)]) -> (Traced, String) {
    let report_file = tempfile("run");
    let out = Command::new(alloctrace())
        .envs(env.iter().copied())
        .arg("run")
        .args(["--format", "json", "-o"])
        .arg(&report_file)
        .args(args)
        .arg("--")
        .args(command)
        .stdin(Stdio::null())
        .output()
        .expect("start alloctrace");
    let traced = finish(
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
        &report_file,
    );
    (traced, String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The run that wrote `report_file` (read, then removed), with its status and stderr.
pub fn finish(status: ExitStatus, stderr: String, report_file: &Path) -> Traced {
    let text = std::fs::read_to_string(report_file).unwrap_or_default();
    let _ = std::fs::remove_file(report_file);
    let report = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!("alloctrace ({status}) wrote no valid JSON ({e}):\n{text}\n--- stderr ---\n{stderr}")
    });
    Traced {
        status,
        stderr,
        report,
    }
}

/// A unique path for a report file.
pub fn tempfile(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    scratch_dir().join(format!("report-{tag}-{}-{n}.json", std::process::id()))
}

/// `alloctrace attach` running in the background, started only once it reports it is tracing.
pub struct Attached {
    child: Child,
    report_file: PathBuf,
    stderr: BufReader<std::process::ChildStderr>,
    seen: String,
}

impl Attached {
    pub fn start(pids: &[u32], args: &[&str]) -> Self {
        let pid_list = pids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        Self::launch(&["attach", "-p", &pid_list], args)
    }

    /// `alloctrace system ARGS`, once it reports it is tracing.
    pub fn system(args: &[&str]) -> Self {
        Self::launch(&["system"], args)
    }

    /// The pid of alloctrace itself.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn launch(command: &[&str], args: &[&str]) -> Self {
        let report_file = tempfile(command[0]);
        let mut child = Command::new(alloctrace())
            .args(command)
            .args(["--format", "json", "-o"])
            .arg(&report_file)
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start alloctrace");
        let mut stderr = BufReader::new(child.stderr.take().expect("piped stderr"));
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            let n = stderr.read_line(&mut line).expect("read alloctrace stderr");
            seen.push_str(&line);
            if n == 0 {
                let status = child.wait().expect("wait");
                panic!("alloctrace {command:?} exited ({status}) before tracing:\n{seen}");
            }
            if line.starts_with("alloctrace: tracing") {
                break;
            }
        }
        Self {
            child,
            report_file,
            stderr,
            seen,
        }
    }

    /// SIGKILLs alloctrace: no report, no clean-up of its own.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.report_file);
    }

    /// Sends Ctrl-C (SIGINT) and collects the final report.
    pub fn interrupt(self) -> Traced {
        self.signal(libc::SIGINT)
    }

    /// Sends `signal` (SIGINT, SIGTERM, SIGHUP all ask for the final report) and collects it.
    pub fn signal(self, signal: i32) -> Traced {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        self.wait()
    }

    /// Waits for alloctrace to stop on its own (duration, or every traced process exited).
    pub fn wait(mut self) -> Traced {
        let mut rest = String::new();
        let _ = self.stderr.read_to_string(&mut rest);
        let status = self.child.wait().expect("wait for alloctrace");
        finish(status, self.seen + &rest, &self.report_file)
    }
}

/// Sites whose innermost caller frame is `function`.
pub fn sites_from<'a>(process: &'a Value, function: &str) -> Vec<&'a Value> {
    process["sites"]
        .as_array()
        .map(|sites| {
            sites
                .iter()
                .filter(|s| s["frames"][0]["function"] == function)
                .collect()
        })
        .unwrap_or_default()
}

/// The single site whose innermost caller is `function`.
pub fn site_from<'a>(process: &'a Value, function: &str) -> &'a Value {
    let found = sites_from(process, function);
    assert_eq!(
        found.len(),
        1,
        "expected exactly one site from {function}, found {}:\n{}",
        found.len(),
        serde_json::to_string_pretty(process).unwrap_or_default()
    );
    found[0]
}

/// `(function, live_bytes, live_allocations)` of every site holding memory whose innermost
/// frame lies in `module`, sorted by function.
pub fn live_sites_in(process: &Value, module: &Path) -> Vec<(String, u64, u64)> {
    let module = module.to_string_lossy();
    let mut out: Vec<(String, u64, u64)> = process["sites"]
        .as_array()
        .map(|sites| {
            sites
                .iter()
                .filter(|s| s["live_bytes"].as_u64().unwrap_or(0) > 0)
                .filter(|s| s["frames"][0]["module"].as_str() == Some(&module))
                .map(|s| {
                    (
                        s["frames"][0]["function"]
                            .as_str()
                            .unwrap_or("?")
                            .to_owned(),
                        s["live_bytes"].as_u64().unwrap_or(0),
                        s["live_allocations"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Reads `key=value` lines a fixture wrote to its output.
pub fn fixture_value(output: &str, key: &str) -> u64 {
    output
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("fixture output has no {key}=…:\n{output}"))
}

/// Reads one line from a child's stdout.
pub fn read_line(reader: &mut impl std::io::BufRead) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).expect("read fixture output");
    line
}

/// Verdicts of every site, as `(frames[0] function, kind, verdict)`, for failure messages
/// and whole-report checks.
pub fn site_verdicts(process: &Value) -> Vec<(String, String, String)> {
    process["sites"]
        .as_array()
        .map(|sites| {
            sites
                .iter()
                .map(|s| {
                    (
                        s["frames"][0]["function"]
                            .as_str()
                            .unwrap_or("?")
                            .to_owned(),
                        s["kind"].as_str().unwrap_or("?").to_owned(),
                        s["verdict"].as_str().unwrap_or("?").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `command` with its standard output on a new pseudo-terminal, as from an interactive
/// shell, and returns what it wrote there and its exit status. Standard error stays piped.
pub fn run_on_pty(mut command: Command) -> (String, String, ExitStatus) {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty fills in two new descriptors; no name, termios or size requested.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are new and ours.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::from(slave))
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the command");
    drop(command); // the only other copy of the slave side
    let reader = std::thread::spawn(move || {
        let mut file = std::fs::File::from(master);
        let mut bytes = Vec::new();
        let mut buf = [0u8; 4096];
        // Reading the master fails with EIO once every copy of the slave side is closed.
        while let Ok(n @ 1..) = file.read(&mut buf) {
            bytes.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    });
    let mut stderr = String::new();
    let _ = child
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut stderr);
    let status = child.wait().expect("wait for the command");
    (reader.join().expect("pty reader"), stderr, status)
}

/// `go tool pprof ARGS FILE`: its standard output, after checking it succeeded.
pub fn go_pprof(args: &[&str], profile: &Path) -> String {
    let mut cmd = Command::new("go");
    cmd.args(["tool", "pprof"]).args(args).arg(profile);
    // go wants a home for its settings; CI may run with none.
    if std::env::var_os("HOME").is_none() {
        cmd.env("HOME", scratch_dir());
    }
    let out = cmd
        .env("PPROF_TMPDIR", scratch_dir())
        .stdin(Stdio::null())
        .output()
        .expect("run go tool pprof (apt install golang-go; cargo xtask setup does)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "go tool pprof {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A tmux server of this test process alone (its own socket), killed on drop.
pub struct Tmux {
    socket: String,
}

impl Tmux {
    /// Starts a server with one detached `cols`×`rows` session running `sh`.
    pub fn start(cols: u16, rows: u16) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmux = Self {
            socket: format!("alloctrace-test-{}-{n}", std::process::id()),
        };
        tmux.run(&[
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            &cols.to_string(),
            "-y",
            &rows.to_string(),
            "sh",
        ]);
        tmux
    }

    /// Runs a tmux command against this server; returns its standard output.
    pub fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run tmux (apt install tmux; cargo xtask setup does)");
        assert!(
            out.status.success(),
            "tmux {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Types `keys` into the pane (tmux key names, e.g. "Enter", or literal text).
    pub fn send(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "t"];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    /// What the pane shows now.
    pub fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "t"])
    }

    /// Whether the pane is on the alternate screen (a full-screen program is drawing).
    pub fn alternate_screen(&self) -> bool {
        self.run(&["display-message", "-p", "-t", "t", "#{alternate_on}"])
            .trim()
            == "1"
    }

    /// Waits up to `limit` for the screen to satisfy `ready`; returns the last screen seen.
    pub fn wait_for(&self, limit: std::time::Duration, ready: impl Fn(&str) -> bool) -> String {
        let start = std::time::Instant::now();
        loop {
            let screen = self.screen();
            if ready(&screen) || start.elapsed() > limit {
                return screen;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .stdin(Stdio::null())
            .output();
    }
}

/// A running `grow` fixture (leaks 512 B every 10 ms until its stdin closes), past "ready".
pub struct Growing {
    pub child: Child,
}

impl Growing {
    pub fn start() -> Self {
        let mut child = Command::new(fixture("grow", &[]))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the grow fixture");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        assert_eq!(read_line(&mut stdout), "ready\n");
        Self { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Growing {
    fn drop(&mut self) {
        drop(self.child.stdin.take()); // it stops at the next poll
        let _ = self.child.wait();
    }
}

/// A JSON count.
pub fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// (total allocations, live allocations, live bytes, frees) of every site whose frame 0 is
/// `function`, summed.
pub fn totals(process: &Value, function: &str) -> (u64, u64, u64, u64) {
    sites_from(process, function)
        .iter()
        .fold((0, 0, 0, 0), |(t, l, b, f), s| {
            (
                t + u(&s["total_allocations"]),
                l + u(&s["live_allocations"]),
                b + u(&s["live_bytes"]),
                f + u(&s["frees"]),
            )
        })
}

/// A root directory (`NAME-PID` in the scratch directory) holding `binary` at `/PROGRAM` and
/// its own copies of the loader and the C library, for `unshare --mount --root`: a process
/// there maps files the host's processes do not.
pub fn private_root(name: &str, binary: &Path, program: &str) -> PathBuf {
    let root = scratch_dir().join(format!("{name}-{}", std::process::id()));
    let lib = root.join("lib/x86_64-linux-gnu");
    std::fs::create_dir_all(&lib).expect("create the root");
    std::fs::create_dir_all(root.join("lib64")).expect("create lib64");
    let copy = |from: &Path, to: &Path| {
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    };
    copy(
        Path::new("/lib/x86_64-linux-gnu/libc.so.6"),
        &lib.join("libc.so.6"),
    );
    copy(
        Path::new("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
        &root.join("lib64/ld-linux-x86-64.so.2"),
    );
    copy(binary, &root.join(program));
    root
}

/// The build id `readelf -n` reads from `binary`.
pub fn build_id(binary: &Path) -> String {
    let out = Command::new("readelf")
        .arg("-n")
        .arg(binary)
        .output()
        .expect("run readelf");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("{} has no build id", binary.display()))
}
