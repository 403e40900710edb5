//! Mallocs served from glibc's thread cache are recorded at their entry, from the block the
//! cache is about to hand out, with no return trap: the counts, bytes and sites must be
//! exactly those of the return path, in every thread and across an exec; and a prediction
//! that goes wrong must be caught before it is recorded, and reported.

use alloctrace_tests::*;
use serde_json::Value;

/// Each of the fixture's sites, per thread and per image (see `thread_cache.c`).
const ROUNDS: u64 = 20_000;

/// (allocations, frees, live allocations, live bytes) of each site of `function`, and its
/// stacks (one: one image).
fn sites_of(process: &Value, function: &str) -> Vec<(u64, u64, u64, u64, bool)> {
    let mut sites: Vec<_> = sites_from(process, function)
        .into_iter()
        .map(|s| {
            let n = |key: &str| s[key].as_u64().unwrap_or(u64::MAX);
            (
                n("total_allocations"),
                n("frees"),
                n("live_allocations"),
                n("live_bytes"),
                s["stacks"].as_array().is_some_and(|st| st.len() == 1),
            )
        })
        .collect();
    sites.sort_unstable();
    sites
}

/// Traces the fixture with `args` and checks its bookkeeping, site by site. Each function is
/// called from two threads (two sites: `main` and the thread's start are different callers),
/// in two images, each reported on its own: the first, replaced by the `exec`, freed its kept
/// blocks; the second keeps them. A predicted call whose stack differed from a returned one
/// would add stacks or sites.
fn traced_exactly(args: &[&str]) -> Traced {
    require_root();
    let bin = fixture("thread_cache", &[]);
    let traced = run_traced(args, &[&bin]);
    assert!(traced.status.success(), "{}", traced.pretty());
    let images = traced.images();
    assert_eq!(images.len(), 2, "{}", traced.pretty());
    assert_eq!(images[0]["replaced_by_exec"], true, "{}", traced.pretty());
    assert_eq!(images[1]["replaced_by_exec"], false, "{}", traced.pretty());
    let freed = (ROUNDS, ROUNDS, 0, 0, true);
    let kept = (ROUNDS, 0, ROUNDS, ROUNDS * 200, true);
    for (image, kept_block) in [(images[0], freed), (images[1], kept)] {
        for (function, expected) in [
            ("churn_block", freed),
            ("scratch_block", freed),
            ("kept_block", kept_block),
        ] {
            assert_eq!(
                sites_of(image, function),
                vec![expected; 2],
                "{function} in image {}:\n{}",
                image["image"],
                traced.pretty()
            );
        }
    }
    assert_eq!(traced.report["events"]["dropped"], 0, "{}", traced.pretty());
    traced
}

fn predictions(traced: &Traced) -> (u64, u64, u64) {
    let p = &traced.report["events"]["tcache_predictions"];
    let n = |key: &str| p[key].as_u64().expect("prediction counter");
    (n("recorded"), n("checked"), n("wrong"))
}

/// 8 × 20 000 mallocs are cache hits (all but a handful); each CPU checks its first 1 024
/// and one in 256 after that, and all the others are recorded at entry. After the exec,
/// the threads' caches are new ones: without finding them again, the second image would
/// predict nothing (or predict from the old image's cache).
fn assert_predicted(traced: &Traced) {
    let (recorded, checked, wrong) = predictions(traced);
    assert_eq!(wrong, 0, "{}", traced.pretty());
    assert!(checked >= 1024, "{checked} checked:\n{}", traced.pretty());
    assert!(
        recorded + checked > 8 * ROUNDS - 100 && recorded > 6 * ROUNDS,
        "{recorded} recorded, {checked} checked:\n{}",
        traced.pretty()
    );
    assert_eq!(traced.report["partial"], false);
}

#[test]
fn cache_hits_recorded_at_entry_are_exact_with_frame_pointer_stacks() {
    let traced = traced_exactly(&["--stack-mode", "fp", "-v"]);
    assert!(
        traced
            .stderr
            .contains("thread-cache hits predicted at entry"),
        "{}",
        traced.stderr
    );
    assert_predicted(&traced);
}

#[test]
fn cache_hits_recorded_at_entry_are_exact_with_copied_stacks() {
    let traced = traced_exactly(&["--stack-mode", "dwarf"]);
    assert_predicted(&traced);
}

/// `--no-tcache-prediction` traps every return: the same numbers, nothing predicted.
#[test]
fn without_prediction_every_return_is_trapped() {
    let traced = traced_exactly(&["--no-tcache-prediction"]);
    assert_eq!(predictions(&traced), (0, 0, 0), "{}", traced.pretty());
}

/// Every prediction skewed by 16 bytes: the first check catches it, prediction is off from
/// then on, and nothing wrong was recorded, so the numbers are still exact and not partial;
/// the report says what happened.
#[test]
fn a_wrong_prediction_is_caught_before_anything_is_recorded_from_it() {
    let traced = traced_exactly(&["--test-mispredict"]);
    let (recorded, checked, wrong) = predictions(&traced);
    assert_eq!(recorded, 0, "{}", traced.pretty());
    assert!(wrong >= 1 && checked == wrong, "{}", traced.pretty());
    assert_eq!(traced.report["partial"], false);
    let warnings = traced.report["warnings"].to_string();
    assert!(
        warnings.contains("prediction was turned off"),
        "{}",
        traced.pretty()
    );
}
