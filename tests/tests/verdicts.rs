//! Leak, fragmentation or stable: each fixture has a known truth, is traced by the real
//! binary, and its verdicts and key numbers are checked against that truth.

use alloctrace_tests::*;
use serde_json::Value;

/// Sample often: the fixtures run for a few seconds.
const FAST: &[&str] = &["--interval", "100ms", "--top", "50"];

fn no_leak_site(traced: &Traced, p: &Value) {
    let leaks: Vec<_> = site_verdicts(p)
        .into_iter()
        .filter(|(_, _, v)| v == "leak")
        .collect();
    assert!(
        leaks.is_empty(),
        "unexpected leak sites {leaks:?}:\n{}",
        traced.pretty()
    );
}

/// Proof 1: a request loop leaking 256 B per iteration from one site among several that
/// allocate and free: that site is a leak at the true rate (±10 %), the others are not.
#[test]
fn a_request_loop_leak_is_found_at_its_rate() {
    require_root();
    let bin = fixture("leak_loop", &[]);
    let (traced, stdout) = run_traced_output(FAST, &[&bin]);
    let p = traced.only_process();
    assert_eq!(p["verdict"], "leak", "{}", traced.pretty());
    let site = site_from(p, "leak_request");
    assert_eq!(site["verdict"], "leak");
    assert_eq!(
        (u(&site["live_bytes"]), u(&site["live_allocations"])),
        (300 * 256, 300)
    );
    let truth = fixture_value(&stdout, "leak_bytes_per_s") as f64;
    let rate = site["growth"]["bytes_per_s"].as_f64().expect("growth rate");
    assert!(
        (rate - truth).abs() <= 0.1 * truth,
        "rate {rate:.0} B/s vs truth {truth:.0} B/s:\n{}",
        traced.pretty()
    );
    assert!(site["growth"]["fit"].as_f64().unwrap_or(0.0) > 0.9);
    for other in ["parse_headers", "build_response"] {
        for s in sites_from(p, other) {
            assert_eq!(s["verdict"], "temporary", "{other}: {}", traced.pretty());
        }
    }
    assert!(
        p["evidence"]
            .as_str()
            .is_some_and(|e| e.contains("never freed"))
    );
}

/// Proof 2: ~200 MiB freed around a few long-lived blocks: fragmentation, live bytes exact,
/// retained within 10 % of (anon RSS − live), no leak.
#[test]
fn memory_kept_by_the_allocator_is_fragmentation() {
    require_root();
    let bin = fixture("fragmentation", &[]);
    let (traced, stdout) = run_traced_output(FAST, &[&bin]);
    let p = traced.only_process();
    assert_eq!(p["verdict"], "fragmentation", "{}", traced.pretty());
    let live = fixture_value(&stdout, "live_bytes");
    assert_eq!(u(&p["live_bytes"]), live);
    let truth = (fixture_value(&stdout, "rss_anon") - live) as f64;
    let retained = u(&p["retained_bytes"]) as f64;
    assert!(
        (retained - truth).abs() <= 0.1 * truth,
        "retained {retained} vs anon RSS - live {truth}:\n{}",
        traced.pretty()
    );
    assert!(p["evidence"].as_str().is_some_and(|e| e.contains("Hint")));
    no_leak_site(&traced, p);
}

/// Proof 3: a cache that fills to its cap and then only replaces entries is stable.
#[test]
fn a_warm_cache_is_stable() {
    require_root();
    let bin = fixture("warmup_cache", &[]);
    let traced = run_traced(FAST, &[&bin]);
    let p = traced.only_process();
    assert_eq!(p["verdict"], "stable", "{}", traced.pretty());
    no_leak_site(&traced, p);
    let live: u64 = sites_from(p, "cache_insert")
        .iter()
        .map(|s| u(&s["live_allocations"]))
        .sum();
    assert_eq!(live, 500, "the cache holds its cap:\n{}", traced.pretty());
}

/// Proof 4 (Rust): an `Rc` cycle per request leaks; a `Box::leak` at start-up is a one-time
/// static, stable.
#[test]
fn rust_rc_cycles_leak_and_box_leak_is_a_one_time_static() {
    require_root();
    let bin = rust_fixture("rc_cycle");
    let traced = run_traced(FAST, &[&bin]);
    let p = traced.only_process();
    assert_eq!(p["verdict"], "leak", "{}", traced.pretty());
    let requests = sites_from(p, "rc_cycle::handle_request");
    let leaking: Vec<_> = requests.iter().filter(|s| s["verdict"] == "leak").collect();
    // Two Rc nodes and their two payload Vecs per request.
    assert_eq!(leaking.len(), 4, "{}", traced.pretty());
    let nodes: u64 = leaking.iter().map(|s| u(&s["live_allocations"])).sum();
    assert!(nodes >= 4 * 298, "{}", traced.pretty());
    let config = site_from(p, "rc_cycle::load_config");
    assert_eq!(config["verdict"], "stable");
    assert_eq!(config["one_time"], true);
    assert_eq!(u(&config["live_bytes"]), 4096);
    assert!(
        config["evidence"]
            .as_str()
            .is_some_and(|e| e.starts_with("one-time"))
    );
}

/// Proof 5: 8 threads allocating and freeing in bursts: footprint above live is retention,
/// not a leak.
#[test]
fn thread_arena_bursts_are_retention_not_leaks() {
    require_root();
    let bin = fixture("arenas", &[]);
    let traced = run_traced(FAST, &[&bin]);
    let p = traced.only_process();
    assert_ne!(p["verdict"], "leak", "{}", traced.pretty());
    no_leak_site(&traced, p);
    let burst = site_from(p, "burst");
    assert_eq!(
        (u(&burst["total_allocations"]), u(&burst["live_bytes"])),
        (8 * 10 * 4000, 0)
    );
    assert!(
        u(&p["footprint_bytes"]) > u(&p["live_bytes"]),
        "{}",
        traced.pretty()
    );
    assert!(u(&p["retained_bytes"]) > 0);
    // Bursts overlap but are not synchronised: at least one whole burst was live at once,
    // and it is what the peak shows.
    assert!(
        u(&p["peak"]["live_bytes"]) >= 4000 * 1024,
        "{}",
        traced.pretty()
    );
    assert_eq!(
        p["peak"]["sites"][0]["function"],
        "burst",
        "{}",
        traced.pretty()
    );
}

/// Proof 6: raw mmap regions never unmapped, and a region grown by mremap: counted in the
/// footprint, and reported as mmap leaks at their call sites.
#[test]
fn growing_raw_mappings_are_mmap_leaks() {
    require_root();
    let bin = fixture("raw_mmap", &[]);
    let traced = run_traced(FAST, &[&bin]);
    let p = traced.only_process();
    assert_eq!(p["verdict"], "leak", "{}", traced.pretty());
    let chunks = site_from(p, "map_chunk");
    assert_eq!(
        (chunks["kind"].as_str(), chunks["verdict"].as_str()),
        (Some("mmap"), Some("leak"))
    );
    assert_eq!(
        (u(&chunks["live_bytes"]), u(&chunks["live_allocations"])),
        (40 * 65536, 40)
    );
    let region = site_from(p, "grow_region");
    assert_eq!(
        (region["kind"].as_str(), region["verdict"].as_str()),
        (Some("mmap"), Some("leak"))
    );
    assert_eq!(
        (u(&region["live_bytes"]), u(&region["live_allocations"])),
        (40 * 65536, 1)
    );
    assert_eq!(u(&p["mmap_live_bytes"]), 80 * 65536);
    // Both are touched in full, so all of it is resident and in the footprint.
    assert!(
        u(&p["footprint_bytes"]) >= 80 * 65536,
        "{}",
        traced.pretty()
    );
}

/// Proof 7: no false positives on a long steady-state loop without a leak.
#[test]
fn a_steady_state_loop_has_no_leak() {
    require_root();
    let bin = fixture("steady_state", &[]);
    let traced = run_traced(FAST, &[&bin, std::path::Path::new("600")]);
    let p = traced.only_process();
    assert_ne!(p["verdict"], "leak", "{}", traced.pretty());
    no_leak_site(&traced, p);
    assert!(u(&p["total_allocations"]) >= 600 * 20 * 2);
}

/// Proof 8: arenas and thread stacks left by exited threads are footprint, never outstanding
/// allocations; a 1 MiB malloc served by mmap is one 1 MiB allocation at its caller.
#[test]
fn mappings_are_not_allocations() {
    require_root();
    let bin = fixture("thread_mappings", &[]);
    let traced = run_traced(FAST, &[&bin]);
    let p = traced.only_process();
    assert_eq!(live_sites_in(p, &bin), vec![], "{}", traced.pretty());
    assert_eq!(
        u(&p["mmap_live_bytes"]),
        0,
        "thread stacks are not the program's mappings"
    );
    let big = site_from(p, "big_block");
    assert_eq!(big["kind"], "heap");
    assert_eq!(
        (u(&big["total_allocations"]), u(&big["total_bytes"])),
        (8, 8 << 20)
    );
    assert_eq!(u(&big["live_bytes"]), 0);
    assert!(
        site_verdicts(p)
            .iter()
            .all(|(f, kind, _)| kind == "heap" || !f.contains("sysmalloc")),
        "{}",
        traced.pretty()
    );
    assert!(
        u(&p["live_bytes"]) < 4096,
        "only libc's own TLS bookkeeping may stay live"
    );
    assert!(u(&p["footprint_bytes"]) > 0);
    assert_ne!(p["verdict"], "leak");
}
