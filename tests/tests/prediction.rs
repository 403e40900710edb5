//! Mallocs served from glibc's thread cache are recorded at their entry, from the block the
//! cache is about to hand out, with no return trap: the counts, bytes and sites must be
//! exactly those of the return path, in every thread and across an exec; and a prediction
//! that goes wrong must be caught before it is recorded, and reported.

use std::{path::Path, process::Command};

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

/// Runs `signal_same_class MODE N` under `run` with `args`; returns the report and the
/// fixture's own bookkeeping. The handler's calls are undefined natively (glibc's malloc is
/// not reentrant), and a native run crashes about one time in 30: a run whose fixture died
/// of a signal is retried (its report says so, and is not the proof).
fn signal_run(mode: &str, n: &str, args: &[&str]) -> (Traced, String) {
    let bin = fixture("signal_same_class", &[]);
    for _ in 0..3 {
        let counts = tempfile("signal-class-counts");
        let traced = run_traced(args, &[&bin, Path::new(mode), Path::new(n), &counts]);
        if traced.status.success() {
            let written = std::fs::read_to_string(&counts).expect("the fixture's counts");
            return (traced, written);
        }
        assert!(
            traced.pretty().contains("killed by signal"),
            "{}",
            traced.pretty()
        );
    }
    panic!("the fixture crashed three times in a row");
}

/// A handler mallocs the main loop's size class, even inside the main loop's malloc: the
/// handler takes the block the interrupted malloc's prediction named. The numbers are exact
/// (the first check catches the contradiction before anything predicted is recorded, and
/// prediction is off from then on), or the report is partial and says why: never silently
/// wrong. Without prediction, exact.
#[test]
fn a_handler_allocating_the_interrupted_mallocs_size_class_is_exact_or_warned() {
    require_root();
    for args in [&[][..], &["--no-tcache-prediction"][..]] {
        let (traced, written) = signal_run("same", "30000", args);
        let warnings = traced.report["warnings"].to_string();
        if traced.report["partial"] == true {
            assert!(
                !args.is_empty() || warnings.contains("predict"),
                "{}",
                traced.pretty()
            );
            continue;
        }
        let p = traced.only_process();
        let kept = fixture_value(&written, "kept");
        let handler = fixture_value(&written, "handler_allocs");
        let refills = fixture_value(&written, "refills");
        assert_eq!(handler, 100, "{written}");
        assert_eq!(
            totals(p, "main_alloc"),
            (30_000, 0, 0, 30_000),
            "{}",
            traced.pretty()
        );
        assert_eq!(totals(p, "keep_block"), (kept, kept, kept * 500, 0));
        assert_eq!(
            totals(p, "handler_block"),
            (handler, handler, handler * 64, 0)
        );
        assert_eq!(totals(p, "refill_block"), (refills * 7, 0, 0, refills * 7));
        let (recorded, _, wrong) = predictions(&traced);
        if wrong > 0 {
            assert_eq!(recorded, 0, "{}", traced.pretty());
            assert!(warnings.contains("prediction was turned off"), "{warnings}");
        }
    }
}

/// A handler's malloc and free while the realloc it interrupted is in flight are calls of
/// their own, recorded exactly, not folded into the realloc as nested calls.
#[test]
fn a_handlers_calls_inside_a_recorded_realloc_are_recorded() {
    require_root();
    for args in [
        &[][..],
        &["--no-tcache-prediction"][..],
        &["--uprobes", "multi"][..],
    ] {
        let (traced, written) = signal_run("realloc", "100000", args);
        let handler = fixture_value(&written, "handler_in_realloc");
        assert!(handler > 100, "{written}");
        assert_eq!(fixture_value(&written, "handler_allocs"), handler);
        if args.contains(&"multi") {
            // Without sessions only the thread's slot could hold them: counted as lost.
            assert_eq!(traced.report["partial"], true, "{}", traced.pretty());
            let warnings = traced.report["warnings"].to_string();
            assert!(warnings.contains("signal handlers were lost"), "{warnings}");
            continue;
        }
        assert_eq!(traced.report["partial"], false, "{}", traced.pretty());
        let p = traced.only_process();
        assert_eq!(
            totals(p, "main_realloc"),
            (100_001, 0, 0, 100_001),
            "{}",
            traced.pretty()
        );
        assert_eq!(
            totals(p, "handler_block"),
            (handler, 0, 0, handler),
            "{}",
            traced.pretty()
        );
    }
}

/// A second glibc in the process (`dlmopen` into a new namespace) has its own malloc and
/// thread cache; a probe hit in either copy finds its own cache, so both are exact, with
/// prediction on and never wrong.
#[test]
fn a_second_libc_in_the_process_is_exact() {
    require_root();
    let bin = fixture("second_libc", &["-ldl"]);
    let traced = run_traced(&[], &[&bin]);
    assert!(traced.status.success(), "{}", traced.pretty());
    assert_eq!(traced.report["partial"], false, "{}", traced.pretty());
    let p = traced.only_process();
    for lib in ["first", "second"] {
        let churn = totals(p, &format!("{lib}_churn"));
        assert_eq!(churn, (20_000, 0, 0, 20_000), "{lib}: {}", traced.pretty());
        let keep = totals(p, &format!("{lib}_keep"));
        assert_eq!(keep, (500, 500, 500 * 300, 0), "{lib}: {}", traced.pretty());
    }
    let (recorded, _, wrong) = predictions(&traced);
    assert_eq!(wrong, 0, "{}", traced.pretty());
    assert!(recorded > 30_000, "{}", traced.pretty());
}

/// `attach -p A,B` where A and B map different C library files (B in a private root): each
/// library has its own check budget, so both are checked from their first prediction on
/// (both pinned to one CPU: at least twice the first checks of one), and both are exact.
#[test]
fn two_libraries_are_each_checked_from_their_first_prediction() {
    require_root();
    let bin = fixture("cache_hits_on_go", &[]);
    let root = private_root("budget-root", &bin, "hits");
    let pinned = |args: &[&std::ffi::OsStr]| {
        let mut c = Command::new("taskset");
        c.arg("-c").arg("0").args(args);
        AttachTarget::start(c)
    };
    let mut host = pinned(&[bin.as_os_str()]);
    let mut private = pinned(&[
        "unshare".as_ref(),
        "--mount".as_ref(),
        "--root".as_ref(),
        root.as_os_str(),
        "/hits".as_ref(),
    ]);
    let tracing = Attached::start(&[host.pid(), private.pid()], &[]);
    host.go();
    private.go();
    let traced = tracing.interrupt();
    let _ = std::fs::remove_dir_all(&root);
    assert_eq!(traced.report["partial"], false, "{}", traced.pretty());
    for pid in [host.pid(), private.pid()] {
        let churn = totals(traced.process(pid), "churn");
        assert_eq!(churn, (20_000, 0, 0, 20_000), "{}", traced.pretty());
    }
    let (recorded, checked, wrong) = predictions(&traced);
    assert_eq!(wrong, 0, "{}", traced.pretty());
    assert!(
        checked >= 2 * 1024,
        "{checked} checked: {}",
        traced.pretty()
    );
    assert!(recorded > 30_000, "{}", traced.pretty());
    host.finish();
    private.finish();
}
