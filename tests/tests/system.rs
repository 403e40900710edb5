//! `alloctrace system`: every process on the host, including those started after the trace
//! began and those in another mount namespace with their own copy of the C library; filters
//! applied in the kernel; state released as processes exit.

use std::{
    io::Write as _,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use alloctrace_tests::*;
use serde_json::Value;

/// Host-wide traces see every process the other tests start, and the memory test measures
/// the collector: this file's tests run one at a time.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The table row of `pid`.
fn row(traced: &Traced, pid: u32) -> &Value {
    traced.report["system"]["rows"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["pid"] == pid))
        .unwrap_or_else(|| panic!("no row for pid {pid}:\n{}", traced.pretty()))
}

/// `host_leak` leaks 64 KiB every 10 ms (plus the loop's own time), after waiting 500 ms,
/// until its standard input closes.
const LEAK_RATE: f64 = (64 << 10) as f64 / 0.010;

fn start_leaker(command: &mut Command) -> Child {
    command
        .arg("500")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start host_leak")
}

fn stop(mut child: Child) {
    drop(child.stdin.take());
    let _ = child.wait();
}

/// Processes started after the trace began — glibc, jemalloc, and one in another mount
/// namespace with its own libc — are each found leaking at `host_leak_step`, with their
/// allocator, and the true leak is inside each one's reported interval.
#[test]
fn processes_started_during_a_host_trace_are_found_with_their_leaks() {
    require_root();
    let _serial = one_at_a_time();
    let glibc_bin = fixture("host_leak", &[]);
    let jemalloc_bin = fixture("host_leak", &["-ljemalloc"]);
    let root = private_root("root", &glibc_bin, "host_leak");
    let tracing = Attached::system(&["--duration", "12s", "--detail", "100"]);
    let glibc = start_leaker(&mut Command::new(&glibc_bin));
    let jemalloc = start_leaker(&mut Command::new(&jemalloc_bin));
    let mut unshared = Command::new("unshare");
    unshared
        .args(["--mount", "--root"])
        .arg(&root)
        .arg("/host_leak");
    let contained = start_leaker(&mut unshared);
    let traced = tracing.wait();
    let pids = [
        (glibc.id(), "glibc"),
        (jemalloc.id(), "jemalloc"),
        (contained.id(), "glibc"),
    ];
    for child in [glibc, jemalloc, contained] {
        stop(child);
    }
    let _ = std::fs::remove_dir_all(&root);
    assert!(traced.status.success(), "{}", traced.pretty());
    for (pid, allocator) in pids {
        let r = row(&traced, pid);
        assert_eq!(r["allocator"], allocator, "pid {pid}:\n{}", traced.pretty());
        assert_eq!(r["verdict"], "leak", "pid {pid}:\n{}", traced.pretty());
        assert_eq!(
            r["worst_site"],
            "host_leak_step",
            "pid {pid}:\n{}",
            traced.pretty()
        );
        assert!(u(&r["traps"]) > 0, "{}", traced.pretty());
        // Sampled: an estimate. Its rate, within a factor of two of the truth (the loop
        // sleeps at least 10 ms a step).
        let rate = r["growth_bytes_per_s"].as_f64().expect("growth");
        assert!(
            rate > LEAK_RATE / 3.0 && rate < LEAK_RATE * 1.5,
            "pid {pid}: {rate} B/s against at most {LEAK_RATE}:\n{}",
            traced.pretty()
        );
    }
    assert_eq!(traced.report["sample_bytes"], 512 << 10);
}

/// `--comm`: only processes of that name are traced; another copy of the same program under
/// another name is not in the report at all.
#[test]
fn a_comm_filter_traces_only_its_target() {
    require_root();
    let _serial = one_at_a_time();
    let bin = fixture("host_leak", &[]);
    let dir = scratch_dir().join(format!("comm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create dir");
    let named = dir.join("leak_target");
    let other = dir.join("leak_other");
    std::fs::copy(&bin, &named).expect("copy");
    std::fs::copy(&bin, &other).expect("copy");
    let tracing = Attached::system(&["--comm", "leak_target", "--duration", "8s", "--exact"]);
    let target = start_leaker(&mut Command::new(&named));
    let bystander = start_leaker(&mut Command::new(&other));
    let traced = tracing.wait();
    let (target_pid, bystander_pid) = (target.id(), bystander.id());
    stop(target);
    stop(bystander);
    let _ = std::fs::remove_dir_all(&dir);
    let rows = traced.report["system"]["rows"].as_array().expect("rows");
    let comms: Vec<&str> = rows.iter().filter_map(|r| r["comm"].as_str()).collect();
    assert!(
        comms.iter().all(|&c| c == "leak_target"),
        "{comms:?}:\n{}",
        traced.pretty()
    );
    let r = row(&traced, target_pid);
    assert_eq!(r["verdict"], "leak", "{}", traced.pretty());
    assert!(rows.iter().all(|r| r["pid"] != bystander_pid));
    // Exact: every block it leaked so far, none of the bystander's.
    let p = traced.process(target_pid);
    let leaked: u64 = sites_from(p, "host_leak_step")
        .iter()
        .map(|s| u(&s["live_bytes"]))
        .sum();
    assert!(leaked > 0 && leaked.is_multiple_of(64 << 10), "{leaked}");
}

/// The collector's resident anonymous memory (its heap, not the module files it maps to
/// symbolize, which are page cache), from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("RssAnon")
        * 1024
}

/// 1 000 short-lived processes during a host trace, after 500 to warm up: each is traced,
/// reported as a row, and its state released when it exits. What stays is its row (kept by
/// design, up to 10 000): the collector grows by at most 3 KiB per process (measured ≈ 0.7 KiB;
/// keeping a process's blocks, sites or mappings would cost tens of KiB each). A bound per
/// process, after a warm-up, rather than a share of a small baseline: one-time growth (the
/// rows' vector doubling, the allocator's own pools) made a 10 % bound over 500 processes
/// flaky (+1.9 to +4.5 MiB on a 17 MiB baseline).
#[test]
fn short_lived_processes_leave_no_state_behind() {
    require_root();
    let _serial = one_at_a_time();
    let bin = fixture("leaks", &[]);
    // Only its own processes: the other tests of this file start processes meanwhile, which
    // a whole-host trace would rightly take on (and their modules to symbolize).
    let tracing = Attached::system(&["--duration", "60s", "--comm", "leaks"]);
    // 500 first, so that what is built once (the symbolizer's parse of the program and
    // of libc, the allocator's pools) is in the baseline: what is measured is what each
    // process leaves behind.
    let start = |bin: &Path| {
        Command::new(bin)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start leaks")
    };
    for _ in 0..500 {
        start(&bin).wait().expect("wait leaks");
    }
    std::thread::sleep(Duration::from_secs(2));
    let baseline = rss_bytes(tracing.pid());
    let mut pids = Vec::new();
    for _ in 0..1000 {
        let out = start(&bin);
        pids.push(out.id());
        let mut out = out;
        out.wait().expect("wait leaks");
    }
    std::thread::sleep(Duration::from_secs(3));
    let after = rss_bytes(tracing.pid());
    let traced = tracing.wait();
    assert!(traced.status.success(), "{}", traced.pretty());
    let rows = traced.report["system"]["rows"].as_array().expect("rows");
    let exited: Vec<&Value> = rows
        .iter()
        .filter(|r| pids.contains(&(u(&r["pid"]) as u32)))
        .collect();
    assert_eq!(exited.len(), 1000, "{}", traced.pretty());
    assert!(exited.iter().all(|r| r["exited"] == true));
    // Of the processes that ended, only the full reports of the worst are kept
    // (`--detail`, 5), each with its leak.
    let detail: Vec<&Value> = traced.report["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .filter(|p| p["exited"] == true)
        .collect();
    assert_eq!(detail.len(), 5, "{}", traced.pretty());
    assert!(
        detail
            .iter()
            .all(|p| p["verdict"] == "leak" && p["exited"] == true)
    );
    assert!(
        after <= baseline + 1000 * 3 * 1024,
        "collector RSS {baseline} B before, {after} B after 1000 processes"
    );
    let mut report = std::io::stderr();
    let _ = writeln!(
        report,
        "collector RSS: {baseline} B before, {after} B after 1000 short-lived processes"
    );
}
