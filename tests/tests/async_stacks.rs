//! Deep async stacks at default settings. A tokio service built with Cargo's default release
//! profile (no frame pointers, no debug info) keeps one block per request at the bottom of 64
//! nested async functions, resumed by tokio's multi-thread scheduler: about 80 frames and
//! 12 KiB of stack, deeper than the 8 KiB the stack copy takes by default. `auto` must choose
//! CFI unwinding for it, and every such stack must be whole: no truncation mark, every level
//! in order, down through tokio's worker to the thread's start.

use std::path::Path;

use alloctrace_tests::*;
use serde_json::Value;

/// Requests the service handles; it keeps one block for each.
const REQUESTS: u64 = 200;

/// The fixture's own names for its frames, innermost first: the block is kept in
/// `keep_block`, called from `bottom`, under `level_63` … `level_00` and `handle`.
fn program_frames() -> Vec<String> {
    let mut names = vec![
        "deep_async::keep_block".to_owned(),
        "deep_async::bottom::{closure#0}".to_owned(),
    ];
    names.extend(
        (0..64)
            .rev()
            .map(|n| format!("deep_async::level_{n:02}::{{closure#0}}")),
    );
    names.push("deep_async::handle::{closure#0}".to_owned());
    names
}

/// The function names of a site's whole stack, innermost first.
fn stack_names(site: &Value) -> Vec<&str> {
    site["library_frames"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(site["frames"].as_array().into_iter().flatten())
        .map(|f| f["function"].as_str().unwrap_or("?"))
        .collect()
}

#[test]
fn a_tokio_services_deep_async_stacks_are_whole_at_defaults() {
    require_root();
    let bin = cargo_project_fixture("rust-tokio", "deep_async");
    let (traced, out) = run_traced_output(&[], &[&bin, Path::new(&REQUESTS.to_string())]);
    assert!(traced.status.success(), "{}", traced.pretty());
    assert_eq!(fixture_value(&out, "kept"), REQUESTS);
    let block = fixture_value(&out, "block_bytes");
    assert_eq!(traced.report["events"]["dropped"], 0, "{}", traced.pretty());
    assert_eq!(traced.report["partial"], false, "{}", traced.pretty());
    let p = traced.only_process();
    assert_eq!(p["stack_mode"], "dwarf", "{}", traced.pretty());

    let sites = sites_from(p, "deep_async::keep_block");
    assert!(
        !sites.is_empty(),
        "no keep_block site:\n{}",
        traced.pretty()
    );
    let expected = program_frames();
    for site in &sites {
        let names = stack_names(site);
        let shown = || format!("{names:#?}");
        assert_eq!(site["stack_truncated"], false, "{}", shown());
        assert!(
            site["library_frames"]
                .as_array()
                .is_some_and(|l| l.is_empty())
        );
        // The program's 67 frames, in order, with nothing between them …
        assert_eq!(names[..expected.len()], expected, "{}", shown());
        // … then tokio's task harness and worker loop …
        let rest = &names[expected.len()..];
        for tokio in [
            "<tokio::runtime::scheduler::multi_thread::worker::Context>::run_task",
            "<tokio::runtime::scheduler::multi_thread::worker::Context>::run",
            "tokio::runtime::scheduler::multi_thread::worker::run",
        ] {
            assert!(rest.contains(&tokio), "no {tokio}: {}", shown());
        }
        // … down to the thread's start in the C library.
        assert_eq!(
            rest[rest.len() - 2..],
            ["start_thread", "clone3"],
            "{}",
            shown()
        );
        assert!(names.len() >= 75, "{} frames: {}", names.len(), shown());
    }
    let sum = |key: &str| sites.iter().map(|s| u(&s[key])).sum::<u64>();
    assert_eq!(sum("total_allocations"), REQUESTS);
    assert_eq!(sum("live_allocations"), REQUESTS);
    assert_eq!(sum("total_bytes"), REQUESTS * block);
    assert_eq!(sum("live_bytes"), REQUESTS * block);
    assert_eq!(sum("frees"), 0);
}
