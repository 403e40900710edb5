//! Byte sampling on the real kernel: with a fixed seed, estimates of live bytes land within
//! 5 % of the truth, and no free of a sampled block is ever missed (no phantom leaks).

use alloctrace_tests::*;
use serde_json::Value;

const TRUTH_SMALL: u64 = 400_000 * 256;
const TRUTH_MEDIUM: u64 = 20_000 * 8192;
const TRUTH_BIG: u64 = 50 << 20;
/// Each of `leak_array`, `leak_regrown`, `leak_aligned`, `leak_grown`, `leak_posix` and
/// `leak_paged`.
const TRUTH_4K: u64 = 20_000 * 4096;

fn live(site: &Value) -> u64 {
    site["live_bytes"].as_u64().expect("live bytes")
}

fn within(estimate: u64, truth: u64, tolerance: f64) -> bool {
    (estimate as f64 - truth as f64).abs() <= tolerance * truth as f64
}

/// With uprobe sessions (the default here), an unsampled malloc never reaches its return.
#[test]
fn sampled_estimates_are_unbiased_and_frees_are_never_missed() {
    check_sampling(&[]);
}

/// The same with a uretprobe on every allocation function (kernels before 6.13), and with
/// perf-event uprobes (before 6.6).
#[test]
fn sampled_estimates_hold_with_plain_uprobes() {
    check_sampling(&["--uprobes", "multi"]);
    check_sampling(&["--uprobes", "perf"]);
}

fn check_sampling(extra: &[&str]) {
    require_root();
    let bin = fixture("sampling", &[]);
    let mut args = vec![
        "--sample-bytes",
        "65536",
        "--sample-seed",
        "7",
        "--top",
        "50",
    ];
    args.extend_from_slice(extra);
    let traced = run_traced(&args, &[&bin]);
    assert!(traced.status.success(), "{}", traced.stderr);
    assert_eq!(traced.report["sample_bytes"], 65536);
    assert_eq!(traced.report["events"]["dropped"], 0);
    let p = traced.only_process();
    let truth = TRUTH_SMALL + TRUTH_MEDIUM + TRUTH_BIG;
    let total: u64 = ["leak_small", "leak_medium", "leak_big"]
        .iter()
        .map(|f| live(site_from(p, f)))
        .sum();
    assert!(
        within(total, truth, 0.05),
        "estimated {total} vs {truth}:\n{}",
        traced.pretty()
    );
    for (f, truth, tolerance) in [
        ("leak_small", TRUTH_SMALL, 0.10),
        ("leak_medium", TRUTH_MEDIUM, 0.10),
        // Blocks far above the mean are (nearly) always sampled: close to exact.
        ("leak_big", TRUTH_BIG, 0.05),
        // Allocations glibc serves by calling malloc inside reallocarray, realloc or
        // aligned_alloc: sampled once (a second, nested draw would double the estimate).
        ("leak_array", TRUTH_4K, 0.12),
        ("leak_regrown", TRUTH_4K, 0.12),
        ("leak_aligned", TRUTH_4K, 0.12),
        // Calls that skip their return when unsampled (as sessions): still counted once.
        ("leak_grown", TRUTH_4K, 0.12),
        ("leak_posix", TRUTH_4K, 0.12),
        ("leak_paged", TRUTH_4K, 0.12),
    ] {
        // leak_grown's malloc is a site of its own, with nothing live.
        let estimate: u64 = sites_from(p, f).into_iter().map(live).sum();
        assert!(
            within(estimate, truth, tolerance),
            "{f}: {estimate} vs {truth}: {}",
            traced.pretty()
        );
    }
    // Far fewer events than calls: unsampled calls cost no event.
    let recorded = p["recorded_allocations"].as_u64().expect("recorded");
    let estimated = p["total_allocations"].as_u64().expect("estimated");
    assert!(
        recorded * 10 < estimated,
        "{recorded} recorded for {estimated} estimated"
    );
    // 1.2 M churn allocations, every one freed: not a byte may stay live.
    for s in sites_from(p, "churn") {
        assert_eq!(
            (live(s), s["live_allocations"].as_u64()),
            (0, Some(0)),
            "{}",
            traced.pretty()
        );
        assert_eq!(s["verdict"], "temporary");
    }
}
