//! Judgments a user can act on (issue 15): verdicts, footprint and losses right in the
//! situations where they were seen wrong — turnover, teardown at exit, heaps that predate an
//! attach, the allocator's own mappings, growth by realloc, lost events, processes whose
//! allocator cannot be probed, and sampled estimates with their intervals.

use std::{
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
};

use alloctrace_tests::*;
use serde_json::Value;

const FAST: &[&str] = &["--interval", "100ms", "--top", "50"];

fn leak_sites(p: &Value) -> Vec<(String, String, String)> {
    site_verdicts(p)
        .into_iter()
        .filter(|(_, _, v)| v == "leak")
        .collect()
}

/// A cache refilled from a second call site: the process's live bytes are flat, the taking
/// site is turnover (stable, taking over from the first), nothing leaks.
#[test]
fn cache_turnover_is_stable_not_a_leak() {
    require_root();
    let bin = fixture("turnover", &[]);
    let traced = run_traced(FAST, &[&bin]);
    let p = traced.only_process();
    assert_eq!(p["verdict"], "stable", "{}", traced.pretty());
    assert_eq!(leak_sites(p), vec![], "{}", traced.pretty());
    let puts = sites_from(p, "cache_put");
    let taker = puts
        .iter()
        .find(|s| {
            s["evidence"]
                .as_str()
                .is_some_and(|e| e.contains("turnover"))
        })
        .unwrap_or_else(|| panic!("no turnover site:\n{}", traced.pretty()));
    assert!(
        taker["evidence"]
            .as_str()
            .is_some_and(|e| e.contains("taking over from site #")),
        "{}",
        traced.pretty()
    );
    let live: u64 = puts.iter().map(|s| u(&s["live_bytes"])).sum();
    assert_eq!(live, 2000 * 256, "the cache holds its slots");
}

/// The same turnover beside a true leak: the process leaks, from the true site only.
#[test]
fn a_true_leak_beside_turnover_is_the_only_leak() {
    require_root();
    let bin = fixture("turnover", &[]);
    let (traced, stdout) = run_traced_output(FAST, &[&bin, Path::new("leak")]);
    let p = traced.only_process();
    assert_eq!(p["verdict"], "leak", "{}", traced.pretty());
    let leaks = leak_sites(p);
    assert_eq!(
        leaks.iter().map(|(f, _, _)| f.as_str()).collect::<Vec<_>>(),
        vec!["leak_one"],
        "{}",
        traced.pretty()
    );
    let leak = site_from(p, "leak_one");
    assert_eq!(
        u(&leak["live_bytes"]),
        fixture_value(&stdout, "leaked_bytes")
    );
}

fn assert_released_at_exit(traced: &Traced, stored: u64) {
    let p = traced.only_process();
    assert_eq!(p["verdict"], "leak", "{}", traced.pretty());
    assert_eq!(p["exited"], true);
    assert!(
        p["evidence"]
            .as_str()
            .is_some_and(|e| e.contains("released only at exit")),
        "{}",
        traced.pretty()
    );
    let site = site_from(p, "store_result");
    assert_eq!(site["verdict"], "leak", "{}", traced.pretty());
    assert_eq!(site["released_at_exit"], true);
    assert_eq!(u(&site["live_bytes"]), 0, "freed by the teardown");
    // The last sample before the teardown holds (nearly) everything stored.
    let before = u(&site["pre_teardown_live_bytes"]);
    assert!(
        before >= stored * 9 / 10 && before <= stored,
        "{before} of {stored}:\n{}",
        traced.pretty()
    );
    assert!(u(&p["pre_teardown"]["live_bytes"]) >= before);
    assert!(p["pre_teardown"]["lasted_s"].as_f64().unwrap_or(9.0) < 0.5);
}

/// A global table that grows all run and is freed by the exit's teardown leaks ("released
/// only at exit"), with the pre-teardown live bytes kept beside the final ones.
#[test]
fn growth_released_only_at_exit_is_a_leak() {
    require_root();
    let bin = fixture("exit_release", &[]);
    let (traced, stdout) = run_traced_output(FAST, &[&bin]);
    assert_released_at_exit(&traced, fixture_value(&stdout, "stored_bytes"));
}

/// The same under `attach`, when the process exits during the trace.
#[test]
fn growth_released_at_exit_during_an_attach_is_a_leak() {
    require_root();
    let bin = fixture("exit_release", &[]);
    let mut target = AttachTarget::start({
        let mut c = Command::new(&bin);
        c.arg("wait");
        c
    });
    let tracer = Attached::start(&[target.pid()], FAST);
    let stdin = target.child.stdin.as_mut().expect("stdin");
    stdin.write_all(b"go\n").expect("start the fixture");
    let traced = tracer.wait();
    let stored = fixture_value(&read_line(&mut target.stdout), "stored_bytes");
    assert!(target.finish().success());
    assert_released_at_exit(&traced, stored);
    assert_eq!(traced.only_process()["attached"], true);
}

/// Attaches to a `pre_attach` fixture built in `mode`, lets it churn, and returns the
/// report.
fn attach_to_pre_attach(mode: &str) -> Traced {
    let bin = fixture("pre_attach", &[]);
    let mut target = AttachTarget::start({
        let mut c = Command::new(&bin);
        c.arg(mode);
        c
    });
    let tracer = Attached::start(&[target.pid()], FAST);
    target.go();
    let traced = tracer.interrupt();
    assert!(target.finish().success());
    traced
}

/// 200 MiB kept before the attach, then churn: not fragmentation — the heap predates the
/// attach, and glibc's own accounting says little of it is free.
#[test]
fn a_heap_kept_before_the_attach_is_not_fragmentation() {
    require_root();
    let traced = attach_to_pre_attach("keep");
    let p = traced.only_process();
    assert_eq!(p["verdict"], "stable", "{}", traced.pretty());
    assert!(
        u(&p["pre_attach_bytes"]) >= 190 << 20,
        "{}",
        traced.pretty()
    );
    assert!(
        u(&p["allocator_free"]["bytes"]) < 8 << 20,
        "{}",
        traced.pretty()
    );
    assert!(u(&p["retained_bytes"]) < 8 << 20);
    assert!(
        p["evidence"]
            .as_str()
            .is_some_and(|e| e.contains("allocated before the attach")),
        "{}",
        traced.pretty()
    );
}

/// The same heap with all but one block in 64 freed before the attach: glibc's arenas hold
/// it free, so it is fragmentation even though the trace saw none of it.
#[test]
fn a_heap_fragmented_before_the_attach_is_fragmentation() {
    require_root();
    let traced = attach_to_pre_attach("fragment");
    let p = traced.only_process();
    assert_eq!(p["verdict"], "fragmentation", "{}", traced.pretty());
    let free = u(&p["allocator_free"]["bytes"]);
    assert!(free >= 150 << 20, "{}", traced.pretty());
    assert_eq!(u(&p["retained_bytes"]), free.min(u(&p["footprint_bytes"])));
    assert!(
        p["evidence"]
            .as_str()
            .is_some_and(|e| e.contains("by its own accounting")),
        "{}",
        traced.pretty()
    );
}

/// Worker threads whose first allocator call is `free`: glibc maps their arenas inside that
/// free. No mapping of the allocator's is a program allocation, and live ≤ footprint.
#[test]
fn arenas_made_inside_free_are_the_allocator_s() {
    require_root();
    let bin = fixture("first_free_threads", &[]);
    let traced = run_traced(FAST, &[&bin]);
    let p = traced.only_process();
    assert_eq!(u(&p["mmap_live_bytes"]), 0, "{}", traced.pretty());
    assert!(
        site_verdicts(p).iter().all(|(_, kind, _)| kind == "heap"),
        "{}",
        traced.pretty()
    );
    assert!(
        u(&p["live_bytes"]) <= u(&p["footprint_bytes"]),
        "{}",
        traced.pretty()
    );
    assert_ne!(p["verdict"], "leak", "{}", traced.pretty());
    let kept: u64 = sites_from(p, "work_block")
        .iter()
        .map(|s| u(&s["live_bytes"]))
        .sum();
    assert_eq!(kept, 12 * 100, "{}", traced.pretty());
}

/// A fork-based pool: the parent's verdict comes from its own blocks, with no mapping of the
/// allocator's among them.
#[test]
fn a_fork_pool_parent_is_judged_on_its_own_blocks() {
    require_root();
    let bin = fixture("fork_pool", &[]);
    let traced = run_traced(FAST, &[&bin]);
    let p = traced.report["processes"]
        .as_array()
        .and_then(|ps| {
            ps.iter()
                .find(|p| !sites_from(p, "parent_block").is_empty())
        })
        .unwrap_or_else(|| panic!("no parent:\n{}", traced.pretty()));
    assert_eq!(u(&p["mmap_live_bytes"]), 0, "{}", traced.pretty());
    assert!(
        u(&p["live_bytes"]) <= u(&p["footprint_bytes"]),
        "{}",
        traced.pretty()
    );
    assert_eq!(u(&site_from(p, "parent_block")["live_bytes"]), 10 * 512);
    assert_eq!(p["verdict"], "stable", "{}", traced.pretty());
}

/// Sixteen threads ran and exited, then the program mapped 64 MiB itself: an exact mmap site.
#[test]
fn a_mapping_made_after_threads_exit_is_the_program_s() {
    require_root();
    let bin = fixture("threads_then_mmap", &[]);
    let (traced, stdout) = run_traced_output(FAST, &[&bin]);
    let p = traced.only_process();
    let mapped = fixture_value(&stdout, "mapped_bytes");
    let site = site_from(p, "map_big");
    assert_eq!(site["kind"], "mmap", "{}", traced.pretty());
    assert_eq!(
        (u(&site["live_bytes"]), u(&site["live_allocations"])),
        (mapped, 1)
    );
    assert_eq!(u(&p["mmap_live_bytes"]), mapped);
    assert_ne!(p["verdict"], "fragmentation", "{}", traced.pretty());
}

/// A table grown by realloc (one block, in steps) beside its records' payloads: both leak,
/// and the process's evidence counts both.
#[test]
fn a_table_grown_by_realloc_leaks_with_its_records() {
    require_root();
    let bin = fixture("grown_array", &[]);
    let (traced, stdout) = run_traced_output(FAST, &[&bin]);
    let p = traced.only_process();
    assert_eq!(p["verdict"], "leak", "{}", traced.pretty());
    let table = site_from(p, "grow_table");
    assert_eq!(table["verdict"], "leak", "{}", traced.pretty());
    assert!(u(&table["growth_steps"]) >= 3, "{}", traced.pretty());
    assert_eq!(
        (u(&table["live_bytes"]), u(&table["live_allocations"])),
        (fixture_value(&stdout, "capacity") * 16, 1)
    );
    let payloads = site_from(p, "make_payload");
    assert_eq!(payloads["verdict"], "leak");
    assert_eq!(u(&payloads["live_bytes"]), 300 * 200);
    assert!(
        p["evidence"]
            .as_str()
            .is_some_and(|e| e.starts_with("2 sites keep growing")),
        "{}",
        traced.pretty()
    );
}

/// A Rust `Mutex<Vec<Record>>` that keeps every request's record: the vector's buffer
/// (doubled by realloc) leaks as its records' payloads do.
#[test]
fn a_doubling_vec_of_leaked_records_leaks() {
    require_root();
    let bin = rust_fixture("record_store");
    let traced = run_traced(FAST, &[&bin]);
    let p = traced.only_process();
    assert_eq!(p["verdict"], "leak", "{}", traced.pretty());
    let sites = sites_from(p, "record_store::handle");
    let buffer = sites
        .iter()
        .find(|s| s["live_allocations"] == 1)
        .unwrap_or_else(|| panic!("no vector buffer site:\n{}", traced.pretty()));
    assert_eq!(buffer["verdict"], "leak", "{}", traced.pretty());
    assert_eq!(
        u(&buffer["live_bytes"]),
        512 * 32,
        "capacity 512 of 32-byte records"
    );
    let payloads = sites
        .iter()
        .find(|s| s["live_allocations"] == 300)
        .unwrap_or_else(|| panic!("no payload site:\n{}", traced.pretty()));
    assert_eq!(payloads["verdict"], "leak");
    assert_eq!(u(&payloads["live_bytes"]), 300 * 64);
}

/// A quiet process (no allocator call while traced) is still reported, with its footprint.
#[test]
fn a_quiet_process_is_reported() {
    require_root();
    let mut sleeper = Command::new("sleep")
        .arg("30")
        .stdin(Stdio::null())
        .spawn()
        .expect("start sleep");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let traced = Attached::start(&[sleeper.id()], &["--duration", "1s"]).wait();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let p = traced.process(sleeper.id());
    assert_eq!(p["verdict"], "stable", "{}", traced.pretty());
    assert!(
        p["evidence"]
            .as_str()
            .is_some_and(|e| e.starts_with("no allocation activity seen")),
        "{}",
        traced.pretty()
    );
    assert!(p["footprint_bytes"].is_u64());
}

/// `run` on a statically linked, stripped binary: a clear error, exit 1, never a verdict.
#[test]
fn a_static_binary_has_no_probeable_allocator() {
    require_root();
    let bin = fixture("leaks", &["-static", "-s"]);
    let out = Command::new(alloctrace())
        .args(["run", "--format", "json", "--"])
        .arg(&bin)
        .stdin(Stdio::null())
        .output()
        .expect("run alloctrace");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no allocator alloctrace can probe")
            && stderr.contains("statically linked"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "no report, no verdict");
}

/// Allocations and frees `bench_loop tight 4 N` makes (N per thread, one free each).
const LOOP_PER_THREAD: &str = "300000";

/// `(allocation and free events seen, allocation and free events the rings had no room
/// for)` of a traced `bench_loop`. A block whose free was lost and whose address came back is
/// retired as freed: in `frees`, though its event was not seen.
fn loop_events(traced: &Traced) -> (u64, u64) {
    let p = traced.only_process();
    let retired = u(&traced.report["events"]["address_reused_while_live"]);
    let seen = u(&p["total_allocations"]) + u(&p["frees"]) + u(&p["unknown_frees"]) - retired;
    let lost = &traced.report["events"]["lost"];
    let lost = u(&lost["ring_buffer_full_allocations"]) + u(&lost["ring_buffer_full_frees"]);
    (seen, lost)
}

/// Runs `bench_loop tight 4` with `args`; with `stall`, the collector is stopped (SIGSTOP)
/// for that long once it says it is tracing, so that its rings fill whatever the machine's
/// speed, while the workload goes on unharmed.
fn loop_traced(args: &[&str], stall: Option<std::time::Duration>) -> Traced {
    use std::io::BufRead as _;
    let bin = fixture("bench_loop", &["-O2"]);
    let report_file = tempfile("ring");
    let mut child = Command::new(alloctrace())
        .args(["run", "--format", "json", "-o"])
        .arg(&report_file)
        .args(args)
        .arg("--")
        .arg(&bin)
        .args(["tight", "4", LOOP_PER_THREAD])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start alloctrace");
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut said = String::new();
    while stderr.read_line(&mut said).is_ok_and(|n| n > 0) && !said.contains("tracing") {}
    if let Some(stall) = stall {
        std::thread::sleep(std::time::Duration::from_millis(100));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGSTOP) };
        std::thread::sleep(stall);
        // SAFETY: as above.
        unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
    }
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut stderr, &mut rest);
    let status = child.wait().expect("wait for alloctrace");
    finish(status, said + &rest, &report_file)
}

/// A ring buffer too small for the event rate: losses counted under their cause, the report
/// partial with a warning naming the option, and seen + lost equal to the workload's events.
#[test]
fn a_full_ring_buffer_is_counted_and_named() {
    require_root();
    // A ring far larger than the run's events, so a busy machine cannot fill it.
    let calibration = loop_traced(&["--ring-buffer", "512"], None);
    let (truth, none) = loop_events(&calibration);
    assert_eq!(none, 0, "{}", calibration.pretty());
    assert_eq!(calibration.report["partial"], false);
    // A 1 MiB ring holds ≈ 13 000 events: ≈ 10 ms of this loop, far less than the stall.
    let traced = loop_traced(
        &["--ring-buffer", "1"],
        Some(std::time::Duration::from_millis(300)),
    );
    let (seen, lost) = loop_events(&traced);
    assert!(traced.status.success(), "{}", traced.stderr);
    assert!(
        lost > 0,
        "the 1 MiB ring never filled:\n{}",
        traced.pretty()
    );
    assert_eq!(traced.report["partial"], true);
    assert!(u(&traced.report["events"]["dropped"]) >= lost);
    assert!(
        traced.report["warnings"].as_array().is_some_and(|w| w
            .iter()
            .any(|w| w.as_str().is_some_and(|w| w.contains("--ring-buffer")))),
        "{}",
        traced.pretty()
    );
    assert_eq!(seen + lost, truth, "{}", traced.pretty());
}

/// More live sampled blocks than the kernel can remember: the rest count in totals, not as
/// live (no phantom leak), under their own counter, and the warning names the options.
#[test]
fn a_full_sampled_block_table_is_counted_and_named() {
    require_root();
    let bin = fixture("keep_blocks", &[]);
    let args = ["--sample-bytes", "1", "--max-sampled", "1000"];
    let traced = run_traced(&args, &[&bin, Path::new("5000"), Path::new("64")]);
    let p = traced.only_process();
    let keep = site_from(p, "keep");
    let untracked = u(&traced.report["events"]["lost"]["sampled_map_full"]);
    assert!(untracked > 0, "{}", traced.pretty());
    assert_eq!(traced.report["partial"], true);
    assert_eq!(u(&keep["total_allocations"]), 5000, "{}", traced.pretty());
    assert_eq!(
        u(&keep["live_allocations"]) + untracked,
        5000,
        "{}",
        traced.pretty()
    );
    let warned = traced.report["warnings"].as_array().is_some_and(|w| {
        w.iter()
            .any(|w| w.as_str().is_some_and(|w| w.contains("--max-sampled")))
    });
    assert!(warned, "{}", traced.pretty());
}

/// Sampled estimates carry 95 % intervals computed from the samples; over 20 seeds the
/// interval covers the truth at least 18 times, for the total and for each site.
#[test]
fn sampled_intervals_cover_the_truth() {
    require_root();
    let bin = fixture("sample_truth", &[]);
    let truths = [("leak_a", 50_000 * 512u64), ("leak_b", 5_000 * 8192)];
    let mut covered = [0; 3];
    for seed in 1..=20 {
        let seed = seed.to_string();
        let args = ["--sample-bytes", "65536", "--sample-seed", seed.as_str()];
        let traced = run_traced(&args, &[&bin]);
        let p = traced.only_process();
        for (k, (function, truth)) in truths.iter().enumerate() {
            let site = site_from(p, function);
            let [lo, hi] = [
                u(&site["intervals"]["live_bytes"][0]),
                u(&site["intervals"]["live_bytes"][1]),
            ];
            assert!(lo <= u(&site["live_bytes"]) && u(&site["live_bytes"]) <= hi);
            covered[k] += usize::from(lo <= *truth && *truth <= hi);
        }
        let total: u64 = truths.iter().map(|(_, t)| t).sum();
        let live: Vec<u64> = truths
            .iter()
            .map(|(f, _)| u(&site_from(p, f)["live_bytes"]))
            .collect();
        let var: f64 = truths
            .iter()
            .map(|(f, _)| {
                let iv = &site_from(p, f)["intervals"]["live_bytes"];
                ((u(&iv[1]) - u(&iv[0])) as f64 / 2.0 / 1.959_964).powi(2)
            })
            .sum();
        let estimate: u64 = live.iter().sum();
        let half = 1.959_964 * var.sqrt();
        covered[2] += usize::from((estimate as f64 - total as f64).abs() <= half);
    }
    assert!(
        covered.iter().all(|&c| c >= 18),
        "covered {covered:?} of 20"
    );
}
