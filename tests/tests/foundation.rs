//! The foundation's proofs on the real kernel: fixtures with known allocations, traced by the
//! real binary, checked for exact bytes, counts, caller names and error behaviour.

use std::{
    io::BufReader,
    process::{Command, Stdio},
};

use alloctrace_tests::*;

/// Proof 1: exactly the two leaking sites, exact bytes and counts, nothing else live from
/// the fixture's own code — including the 1 MiB blocks glibc serves with mmap.
#[test]
fn leaks_are_attributed_to_their_callers_exactly() {
    require_root();
    let bin = fixture("leaks", &[]);
    let traced = run_traced(&[], &[&bin]);
    assert!(traced.status.success(), "{}", traced.pretty());
    let p = traced.only_process();
    assert_eq!(
        live_sites_in(p, &bin),
        vec![
            ("leak_big".to_owned(), 10 << 20, 10),
            ("leak_small".to_owned(), 64_000, 1000),
        ],
        "{}",
        traced.pretty()
    );
    let small = site_from(p, "leak_small");
    assert_eq!(small["total_allocations"], 1000);
    assert_eq!(
        small["frames"][1]["function"],
        "main",
        "{}",
        traced.pretty()
    );
    assert_eq!(small["frames"][0]["line"], 11);
    let big = site_from(p, "leak_big");
    assert_eq!(big["total_bytes"], 10u64 << 20);
    // churn(): malloc + calloc per iteration, all freed.
    let churn: u64 = sites_from(p, "churn")
        .iter()
        .map(|s| s["total_allocations"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(churn, 2000, "{}", traced.pretty());
    assert_eq!(traced.report["events"]["dropped"], 0);
    assert_eq!(p["exited"], true);
}

/// Proof 2: calloc, realloc chains (grow, shrink, NULL, size 0, failure), reallocarray (and
/// its overflow), posix_memalign, aligned_alloc, memalign, valloc, pvalloc: live bytes and
/// counts at exit equal the fixture's own bookkeeping.
///
/// The allocation functions are probed as uprobe sessions on this kernel (6.13+); the
/// verbose attach lines prove it, so a silent fallback to plain uprobes would fail here.
#[test]
fn every_allocation_function_matches_the_fixtures_bookkeeping() {
    let stderr = check_allocation_family(&["--verbose"]);
    assert!(
        stderr.contains(
            "alloctrace: uprobes as uprobe_multi links, the allocation functions as uprobe \
             sessions\n"
        ),
        "{stderr}"
    );
    let probed = |symbol: &str| {
        stderr
            .lines()
            .find(|l| l.contains(&format!("probed {symbol} (glibc) at")))
            .unwrap_or_else(|| panic!("{symbol} not probed:\n{stderr}"))
    };
    for symbol in [
        "malloc",
        "calloc",
        "realloc",
        "posix_memalign",
        "aligned_alloc",
        "valloc",
        "pvalloc",
    ] {
        assert!(
            probed(symbol).contains("(uprobe session"),
            "{symbol} not probed as a session:\n{stderr}"
        );
        // Only malloc is served from glibc's thread cache (2.36 here and in CI).
        assert_eq!(
            probed(symbol).contains("thread-cache hits predicted at entry"),
            symbol == "malloc",
            "{stderr}"
        );
    }
    // A tail call into realloc, and libc's mmap (its return is the call site of a mapping):
    // sessions too, so that one program captures every stack. free (no return): plain.
    for symbol in ["reallocarray", "mmap"] {
        assert!(probed(symbol).contains("(uprobe session)"), "{stderr}");
    }
    assert!(!probed("free").contains("session"), "{stderr}");
}

/// Proof 2 again with a plain uprobe and uretprobe on every allocation function, as
/// uprobe_multi links (kernels 6.6 to 6.12) and as perf events (older ones): the same exact
/// answer.
#[test]
fn plain_uprobes_give_the_same_bookkeeping() {
    for (api, line) in [
        ("multi", "uprobes as uprobe_multi links (--uprobes multi)"),
        (
            "perf",
            "uprobes as perf events, one per probe and process (--uprobes perf)",
        ),
    ] {
        let stderr = check_allocation_family(&["--verbose", "--uprobes", api]);
        assert!(!stderr.contains("(uprobe session)"), "{stderr}");
        assert!(stderr.contains(line), "{stderr}");
    }
}

/// Traces the `realloc_family` fixture with `args`, checks it, returns alloctrace's stderr.
fn check_allocation_family(args: &[&str]) -> String {
    require_root();
    let bin = fixture("realloc_family", &[]);
    let report_file = tempfile("family");
    let out = Command::new(alloctrace())
        .args(["run", "--format", "json", "-o"])
        .arg(&report_file)
        .args(args)
        .arg("--")
        .arg(&bin)
        .output()
        .expect("run alloctrace");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_file).expect("report written"))
            .expect("valid JSON");
    let shown = serde_json::to_string_pretty(&report).unwrap_or_default();
    let p = &report["processes"][0];
    assert_eq!(
        p["live_bytes"],
        fixture_value(&stdout, "live_bytes"),
        "{shown}"
    );
    assert_eq!(
        p["live_allocations"],
        fixture_value(&stdout, "live_allocations"),
        "{shown}"
    );
    assert_eq!(
        p["total_allocations"],
        fixture_value(&stdout, "total_allocations"),
        "{shown}"
    );
    assert_eq!(p["unknown_frees"], 0, "{shown}");
    // realloc(p, 0) frees p inside realloc: reported once, by the realloc.
    assert_eq!(p["unknown_reallocs"], 0, "{shown}");
    assert_eq!(
        live_sites_in(p, &bin),
        vec![
            ("realloc_chain".to_owned(), 4000, 1),
            ("use_calloc".to_owned(), 240, 1),
            ("use_memalign_family".to_owned(), 96, 1),
            ("use_memalign_family".to_owned(), 100, 1),
            ("use_memalign_family".to_owned(), 256, 1),
            ("use_memalign_family".to_owned(), 1000, 1),
            ("use_memalign_family".to_owned(), 3000, 1),
            ("use_reallocarray".to_owned(), 200, 1),
        ],
        "{shown}"
    );
    let freed = site_from(p, "freed_everything");
    assert_eq!(
        (
            freed["total_allocations"].as_u64(),
            freed["live_bytes"].as_u64()
        ),
        (Some(10), Some(0))
    );
    assert_eq!(report["events"]["dropped"], 0, "{shown}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Proof 3: 4 threads × 200 000 malloc/free pairs: exact totals, and no drops — or exactly
/// as many drops as events missing.
#[test]
fn concurrent_threads_are_counted_exactly() {
    require_root();
    let bin = fixture("threads", &[]);
    let traced = run_traced(&[], &[&bin]);
    assert!(traced.status.success(), "{}", traced.stderr);
    let p = traced.only_process();
    let worker = site_from(p, "worker");
    let dropped = traced.report["events"]["dropped"]
        .as_u64()
        .expect("dropped");
    let allocs = worker["total_allocations"].as_u64().expect("total");
    let frees = worker["frees"].as_u64().expect("frees");
    assert_eq!(allocs + frees + dropped, 2 * 800_000, "{}", traced.pretty());
    assert_eq!(
        dropped,
        0,
        "the default rings should not overflow here: {}",
        traced.pretty()
    );
    assert_eq!(
        (allocs, frees, worker["live_bytes"].as_u64()),
        (800_000, 800_000, Some(0))
    );
}

/// An address freed on one CPU and handed out again on the other: the two CPUs' events travel
/// in different ring buffers, and every block is still counted once, freed once.
#[test]
fn an_address_reused_across_cpus_is_counted_in_order() {
    require_root();
    let bin = fixture("handoff", &[]);
    let (traced, stdout) = run_traced_output(&[], &[&bin]);
    assert!(traced.status.success(), "{}", traced.stderr);
    assert!(
        fixture_value(&stdout, "reused") > 19_000,
        "the fixture should reuse addresses across its threads: {stdout}"
    );
    let p = traced.only_process();
    for function in ["giver", "taker"] {
        let site = site_from(p, function);
        assert_eq!(
            (
                site["total_allocations"].as_u64(),
                site["frees"].as_u64(),
                site["live_allocations"].as_u64()
            ),
            (Some(20_000), Some(20_000), Some(0)),
            "{function}: {}",
            traced.pretty()
        );
    }
    assert_eq!(traced.report["events"]["late"], 0, "{}", traced.pretty());
}

/// Proof 4: allocations made before the attach are not counted, and frees of them never
/// make anything negative.
#[test]
fn attach_ignores_allocations_made_before_it() {
    require_root();
    let bin = fixture("attach_target", &[]);
    let mut target = AttachTarget::start(Command::new(&bin));
    std::thread::sleep(std::time::Duration::from_secs(1)); // running for a second
    let tracer = Attached::start(&[target.pid()], &[]);
    target.go();
    let traced = tracer.interrupt();
    let pid = target.pid();
    target.finish();

    assert!(traced.status.success(), "{}", traced.pretty());
    let p = traced.process(pid);
    assert_eq!(p["unknown_frees"], 100, "{}", traced.pretty());
    assert_eq!(p["total_allocations"], 50, "{}", traced.pretty());
    assert_eq!(p["frees"], 20);
    assert_eq!(
        (p["live_bytes"].as_u64(), p["live_allocations"].as_u64()),
        (Some(30 * 32), Some(30))
    );
    assert_eq!(
        live_sites_in(p, &bin),
        vec![("after_attach".to_owned(), 30 * 32, 30)]
    );
    assert!(
        sites_from(p, "before_attach").is_empty(),
        "{}",
        traced.pretty()
    );
    assert_eq!(p["exited"], false);
}

/// Proof 5: the traced process exits mid-trace; alloctrace ends with it and the report still
/// names its sites.
#[test]
fn a_process_exiting_mid_trace_keeps_its_sites() {
    require_root();
    let bin = fixture("attach_target", &[]);
    let mut cmd = Command::new(&bin);
    cmd.arg("exit");
    let mut target = AttachTarget::start(cmd);
    let tracer = Attached::start(&[target.pid()], &[]);
    target.go();
    let pid = target.pid();
    target.finish();
    let traced = tracer.wait(); // stops by itself: every traced process is gone
    assert!(traced.status.success(), "{}", traced.pretty());
    let p = traced.process(pid);
    assert_eq!(p["exited"], true);
    let site = site_from(p, "after_attach");
    assert_eq!(
        (
            site["live_bytes"].as_u64(),
            site["live_allocations"].as_u64()
        ),
        (Some(960), Some(30))
    );
    assert_eq!(site["frames"][1]["function"], "main");
    assert!(
        site["frames"][0]["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("attach_target.c"))
    );
}

fn alloctrace_fails(args: &[&str], mut cmd: Command) -> String {
    let out = cmd
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("start alloctrace");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "expected exit code 1: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line: {stderr}");
    lines[0].to_owned()
}

/// Proof 6: bad input gets one clear line and a non-zero exit, never a panic.
#[test]
fn bad_input_gets_one_clear_line() {
    require_root();
    let line = alloctrace_fails(
        &["run", "--", "/no/such/binary"],
        Command::new(alloctrace()),
    );
    assert!(
        line.contains("cannot run `/no/such/binary`") && line.contains("No such file"),
        "{line}"
    );

    let line = alloctrace_fails(&["attach", "-p", "999999"], Command::new(alloctrace()));
    assert!(line.contains("no such process: pid 999999"), "{line}");

    let line = alloctrace_fails(
        &["run", "-o", "/proc/no-such-dir/report.json", "--", "true"],
        Command::new(alloctrace()),
    );
    assert!(
        line.contains("cannot write the report to /proc/no-such-dir/report.json"),
        "{line}"
    );

    let mut unprivileged = Command::new("capsh");
    unprivileged
        .arg("--drop=cap_bpf,cap_perfmon,cap_sys_admin")
        .arg("--")
        .arg("-c")
        .arg(format!("exec {} \"$@\"", alloctrace().display()))
        .arg("alloctrace");
    let line = alloctrace_fails(&["run", "--", "true"], unprivileged);
    assert!(
        line.contains("missing privileges") && line.contains("CAP_BPF"),
        "{line}"
    );

    let usage = Command::new(alloctrace())
        .arg("attach")
        .output()
        .expect("run");
    assert_eq!(usage.status.code(), Some(2), "usage errors exit with 2");
}

fn proc_state(pid: u32) -> char {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.trim_start().chars().next())
        })
        .unwrap_or('?')
}

fn wait_for_state(pid: u32, wanted: &[char]) -> char {
    for _ in 0..100 {
        let state = proc_state(pid);
        if wanted.contains(&state) {
            return state;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    proc_state(pid)
}

/// `run` must not change how the command sees signals: stop, continue and terminate reach
/// it unchanged, and the report says how it ended.
#[test]
fn signals_reach_a_run_command_unchanged() {
    require_root();
    let report = tempfile("signals");
    let (mut tracer, line) = start_run(&report, &[], &["sleep".as_ref(), "30".as_ref()]);
    let pid: u32 = line
        .rsplit_once('(')
        .and_then(|(_, rest)| rest.split_once(')'))
        .and_then(|(p, _)| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"));
    // SAFETY: signalling the traced child.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    assert!(matches!(wait_for_state(pid, &['T', 't']), 'T' | 't'));
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    assert_eq!(
        wait_for_state(pid, &['S']),
        'S',
        "SIGCONT resumes the command"
    );
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = tracer.wait().expect("alloctrace ends with its command");
    assert!(status.success());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("JSON");
    let warnings = report["warnings"].to_string();
    assert!(
        warnings.contains(&format!("pid {pid} was killed by signal 15")),
        "{warnings}"
    );
}

/// Killing alloctrace outright (SIGKILL, no clean-up) never harms the traced process, and
/// leaves none of its probes in the kernel.
#[test]
fn sigkill_of_the_tracer_leaves_the_target_running_correctly() {
    require_root();
    let bin = fixture("attach_target", &[]);
    let mut target = AttachTarget::start(Command::new(&bin));
    let tracer = Attached::start(&[target.pid()], &[]);
    let links = bpf_links_of(tracer.pid());
    assert!(
        !links.is_empty(),
        "alloctrace holds its probes as BPF links"
    );
    tracer.kill();
    // No probe is left behind: every link it held is gone from the kernel's list (the
    // kernel frees a closed link after an RCU grace period: allowed 2 s).
    let left = || -> Vec<u64> {
        kernel_bpf_links()
            .into_iter()
            .filter(|id| links.contains(id))
            .collect()
    };
    let start = std::time::Instant::now();
    while !left().is_empty() && start.elapsed() < std::time::Duration::from_secs(2) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(left().is_empty(), "links left after SIGKILL: {:?}", left());
    target.go(); // it keeps working
    let status = target.finish();
    assert!(status.success(), "target exited cleanly: {status}");
}

/// The ids of the BPF links process `pid` holds open (from its fds' `link_id`).
fn bpf_links_of(pid: u32) -> Vec<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    fds.filter_map(|fd| std::fs::read_to_string(fd.ok()?.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("link_id:"))
                .and_then(|id| id.trim().parse().ok())
        })
        .collect()
}

/// Every BPF link the kernel has, by `bpftool link list`.
fn kernel_bpf_links() -> Vec<u64> {
    let out = Command::new("bpftool")
        .args(["-j", "link", "list"])
        .output()
        .expect("bpftool (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    links
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|l| l["id"].as_u64())
        .collect()
}

/// A collector that falls behind (here: stopped for a second with a 1 MiB ring) loses events,
/// and says so: every lost event is counted, the report is marked partial, and no allocation
/// is invented.
#[test]
fn a_full_ring_buffer_gives_a_marked_partial_result() {
    require_root();
    let bin = fixture("threads", &[]);
    let report = tempfile("full-ring");
    let (mut tracer, _) = start_run(&report, &["--ring-buffer", "1"], &[bin.as_os_str()]);
    // SAFETY: pausing our own child, the collector.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGSTOP) };
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // SAFETY: as above.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGCONT) };
    let status = tracer.wait().expect("alloctrace ends with its command");
    assert!(status.success());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("JSON");
    let shown = serde_json::to_string_pretty(&report).unwrap_or_default();
    let dropped = report["events"]["dropped"].as_u64().expect("dropped");
    assert!(dropped > 0, "the ring must have overflowed: {shown}");
    assert_eq!(
        report["events"]["lost"]["ring_buffer_full"].as_u64(),
        Some(dropped),
        "{shown}"
    );
    assert_eq!(report["partial"], true, "{shown}");
    let worker = site_from(&report["processes"][0], "worker");
    let allocs = worker["total_allocations"].as_u64().expect("total");
    assert!(
        allocs < 800_000 && allocs + dropped >= 800_000,
        "{allocs} allocations seen, {dropped} events lost: {shown}"
    );
}

/// Starts `alloctrace run --format json -o REPORT ARGS -- COMMAND` and waits for its
/// "tracing" line (the first it prints), which it returns with the running tracer.
fn start_run(
    report: &std::path::Path,
    args: &[&str],
    command: &[&std::ffi::OsStr],
) -> (std::process::Child, String) {
    use std::io::BufRead as _;
    let mut tracer = Command::new(alloctrace())
        .args(["run", "--format", "json", "-o"])
        .arg(report)
        .args(args)
        .arg("--")
        .args(command)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start alloctrace");
    let mut stderr = BufReader::new(tracer.stderr.take().expect("stderr"));
    let mut line = String::new();
    stderr.read_line(&mut line).expect("tracing line");
    assert!(line.starts_with("alloctrace: tracing"), "{line}");
    (tracer, line)
}

/// `TracerPid` of a running process, from /proc.
fn tracer_pid(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// A signal-heavy program (SIGALRM every 50 µs, its handler allocating) under `run`: nothing
/// stands between it and its signals (it is never ptraced: `TracerPid` 0 while it runs), it
/// finishes, and both its main loop's and its handler's allocations are exact, with and
/// without thread-cache prediction.
#[test]
fn a_signal_heavy_program_runs_unhindered_and_exact() {
    require_root();
    let bin = fixture("signal_alloc", &[]);
    for args in [&[][..], &["--no-tcache-prediction"][..]] {
        let report = tempfile("signals-heavy");
        let counts = tempfile("signals-heavy-counts");
        let command: [&std::ffi::OsStr; 3] =
            [bin.as_os_str(), "1000000".as_ref(), counts.as_os_str()];
        let (mut tracer, line) = start_run(&report, args, &command);
        let pid: u32 = line
            .rsplit_once('(')
            .and_then(|(_, rest)| rest.split_once(')'))
            .and_then(|(p, _)| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {line:?}"));
        let seen = tracer_pid(pid);
        let started = std::time::Instant::now();
        let status = tracer.wait().expect("alloctrace ends with its command");
        assert!(status.success());
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "took {:?}",
            started.elapsed()
        );
        assert!(matches!(seen, Some(0) | None), "TracerPid {seen:?}");
        let traced: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("JSON");
        assert_eq!(traced["partial"], false, "{traced:#}");
        let p = &traced["processes"][0];
        let main = site_from(p, "main_alloc");
        assert_eq!(u(&main["total_allocations"]), 1_000_000, "{traced:#}");
        assert_eq!(u(&main["live_allocations"]), 10_000, "{traced:#}");
        assert_eq!(u(&main["live_bytes"]), 10_000 * 64, "{traced:#}");
        // The handler's sites (one per place it interrupted): exactly the fixture's count,
        // every block freed.
        let written = std::fs::read_to_string(&counts).expect("the fixture's counts");
        let handler_allocs = fixture_value(&written, "handler_allocs");
        assert!(handler_allocs > 0, "{written}");
        let handler = sites_from(p, "on_alarm");
        let total: u64 = handler.iter().map(|s| u(&s["total_allocations"])).sum();
        let live: u64 = handler.iter().map(|s| u(&s["live_allocations"])).sum();
        assert_eq!(total, handler_allocs, "{traced:#}");
        assert_eq!(live, 0, "{traced:#}");
    }
}

/// Processes that cannot be traced are named for what they are, not "no such process".
#[test]
fn a_zombie_and_a_kernel_thread_are_named_for_what_they_are() {
    require_root();
    let line = alloctrace_fails(&["attach", "-p", "2"], Command::new(alloctrace()));
    assert!(line.contains("kernel thread"), "{line}");
    // A child that exited and is not reaped yet: a zombie.
    let zombie = Command::new("true").spawn().expect("start true");
    let pid = zombie.id();
    assert_eq!(wait_for_state(pid, &['Z']), 'Z');
    let line = alloctrace_fails(
        &["attach", "-p", &pid.to_string()],
        Command::new(alloctrace()),
    );
    assert!(line.contains("zombie"), "{line}");
    drop(zombie);
}

/// Reports are readable by their owner only: they name a program's functions and files.
#[test]
fn report_files_are_private() {
    require_root();
    use std::os::unix::fs::PermissionsExt as _;
    let report = tempfile("private");
    let _ = std::fs::remove_file(&report);
    let out = Command::new(alloctrace())
        .args(["run", "--format", "json", "-o"])
        .arg(&report)
        .args(["--", "true"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::fs::metadata(&report)
        .expect("report")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
}
