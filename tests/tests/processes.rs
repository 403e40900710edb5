//! Processes as they come and go: forked workers traced from their first instruction with
//! their parent's blocks inherited (never counted twice), an `exec` ending one image and
//! discovering the next afresh, and a process gone before its mappings were read still
//! symbolized from what the kernel reported.

use std::path::Path;

use alloctrace_tests::*;
use serde_json::Value;

/// `fork_family`: a parent keeps 100 blocks and forks three workers; two free 40 of the
/// blocks they inherited, keep 30 of their own and churn 1000; the third execs `leaks`.
/// Every process has its own numbers, and nothing inherited is counted twice.
#[test]
fn forked_workers_and_an_exec_each_get_their_own_numbers() {
    require_root();
    let bin = fixture("fork_family", &[]);
    let second = fixture("leaks", &[]);
    let (traced, out) = run_traced_output(&[], &[&bin, &second]);
    assert!(traced.status.success(), "{}", traced.pretty());
    assert_eq!(traced.report["events"]["dropped"], 0);
    assert_eq!(traced.report["partial"], false, "{}", traced.pretty());
    let n = |key: &str| fixture_value(&out, key);
    let processes = traced.report["processes"].as_array().expect("processes");
    let parent = processes
        .iter()
        .find(|p| !sites_from(p, "parent_keep").is_empty())
        .unwrap_or_else(|| panic!("no parent:\n{}", traced.pretty()));
    let parent_bytes = n("parent_blocks") * n("parent_block_bytes");
    assert_eq!(
        totals(parent, "parent_keep"),
        (n("parent_blocks"), n("parent_blocks"), parent_bytes, 0),
        "the workers' frees of their copies are not the parent's:\n{}",
        traced.pretty()
    );
    assert_eq!(u(&parent["children_forked"]), 3, "{}", traced.pretty());
    assert_eq!(u(&parent["children_untraced"]), 0, "{}", traced.pretty());

    let workers: Vec<&Value> = processes
        .iter()
        .filter(|p| !sites_from(p, "worker_keep").is_empty())
        .collect();
    assert_eq!(workers.len(), 2, "{}", traced.pretty());
    for w in workers {
        let inherited = &w["inherited"];
        assert_eq!(inherited["from_pid"], parent["pid"], "{}", traced.pretty());
        assert_eq!(u(&inherited["freed_allocations"]), n("freed_by_worker"));
        assert_eq!(
            u(&inherited["freed_bytes"]),
            n("freed_by_worker") * n("parent_block_bytes")
        );
        let kept = n("worker_blocks") * n("worker_block_bytes");
        assert_eq!(
            totals(w, "worker_keep"),
            (n("worker_blocks"), n("worker_blocks"), kept, 0)
        );
        assert_eq!(totals(w, "worker_churn"), (n("churn"), 0, 0, n("churn")));
        // Its own blocks only: the inherited ones it freed are not in its frees or live.
        assert_eq!(u(&w["live_bytes"]), kept, "{}", traced.pretty());
        assert_eq!(u(&w["unknown_frees"]), 0, "{}", traced.pretty());
        let after = w["probes_after_fork_s"]
            .as_f64()
            .expect("probes_after_fork_s");
        assert!(after < 0.2, "{after} s: the fixture waits 0.3 s");
    }

    let exec = processes
        .iter()
        .find(|p| !sites_from(p, "leak_small").is_empty())
        .unwrap_or_else(|| panic!("no exec'd worker:\n{}", traced.pretty()));
    assert_eq!(exec["comm"], "leaks", "{}", traced.pretty());
    assert!(exec["inherited"].is_null(), "an exec ends what a fork gave");
    // Its probes were on long before its `exec` (the worker waits first): the new program
    // was seen from its start.
    assert!(exec["probes_after_fork_s"].is_null(), "{}", traced.pretty());
    assert_eq!(totals(exec, "leak_small"), (1000, 1000, 64_000, 0));
    assert_eq!(totals(exec, "leak_big"), (10, 10, 10 << 20, 0));
    assert_eq!(exec["verdict"], "leak", "{}", traced.pretty());
}

/// `run -- SCRIPT`: a `#!/bin/sh` script that execs `leaks`. The script's interpreter is
/// what the kernel runs and what the probes go on first (the script itself is no program:
/// it was reported as one with no allocator); the program it execs is found afresh, and
/// every one of its allocations is counted, at its own sites.
#[test]
fn a_script_runs_as_its_interpreter_and_what_it_execs_is_traced() {
    require_root();
    let leaks = fixture("leaks", &[]);
    let script = std::env::temp_dir().join(format!("start-leaks-{}", std::process::id()));
    std::fs::write(&script, format!("#!/bin/sh\nexec {}\n", leaks.display())).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (traced, _) = run_traced_output(&[], &[&script]);
    std::fs::remove_file(&script).ok();
    assert!(traced.status.success(), "{}", traced.pretty());
    assert_eq!(traced.report["events"]["dropped"], 0);
    let images = traced.images();
    let exec = images
        .iter()
        .find(|p| p["comm"] == "leaks")
        .unwrap_or_else(|| panic!("no exec'd program:\n{}", traced.pretty()));
    assert_eq!(u(&exec["total_allocations"]), 1000 + 10 + 2 * 1000);
    assert_eq!(
        u(&exec["live_bytes"]),
        64_000 + (10 << 20),
        "{}",
        traced.pretty()
    );
    assert_eq!(exec["verdict"], "leak", "{}", traced.pretty());
    // Its first stacks, walked before its frame pointers were known to be usable, reach
    // `_start`; the later ones stop at `__libc_start_call_main`. Still one site each.
    for (function, blocks, bytes) in [("leak_small", 1000, 64_000), ("leak_big", 10, 10 << 20)] {
        let sites = sites_from(exec, function);
        assert_eq!(sites.len(), 1, "{function}:\n{}", traced.pretty());
        assert_eq!(totals(exec, function), (blocks, blocks, bytes, 0));
        assert_eq!(sites[0]["verdict"], "leak", "{}", traced.pretty());
    }
}

/// `run -- wrapper SERVER`: the wrapper (frame pointers) keeps 25 blocks and execs a Rust
/// release build (no frame pointers). The wrapper's image ends with the exec (its blocks not
/// leaks), and the server is discovered afresh: its own stack mode, whole stacks. (The
/// server waits 300 ms first: its probes change stack mode within milliseconds of the
/// `exec`, and what it allocates before then has frame-pointer stacks.)
#[test]
fn an_exec_discovers_the_new_program_and_ends_the_old_image() {
    require_root();
    let wrapper = fixture("wrapper", &[]);
    let server = rust_fixture_with(
        "typed_leaks",
        "-release-debug",
        &["-C", "opt-level=3", "-C", "debuginfo=2"],
    );
    let (traced, out) = run_traced_output(
        &[],
        &[&wrapper, &server, Path::new("100"), Path::new("300")],
    );
    assert!(traced.status.success(), "{}", traced.pretty());
    let images = traced.images();
    assert_eq!(images.len(), 2, "{}", traced.pretty());
    let (before, after) = (images[0], images[1]);
    assert_eq!(before["replaced_by_exec"], true, "{}", traced.pretty());
    assert_eq!(totals(before, "wrapper_setup"), (25, 25, 25 * 256, 0));
    assert_ne!(before["verdict"], "leak", "{}", traced.pretty());
    assert_eq!(before["stack_mode"], "fp", "{}", traced.pretty());
    assert_eq!(after["stack_mode"], "dwarf", "{}", traced.pretty());
    assert!(
        sites_from(after, "wrapper_setup").is_empty(),
        "{}",
        traced.pretty()
    );
    let orders = sites_from(after, "typed_leaks::record_orders");
    let live: u64 = orders.iter().map(|s| u(&s["live_bytes"])).sum();
    assert_eq!(
        live,
        100 * fixture_value(&out, "order_bytes"),
        "{}",
        traced.pretty()
    );
    for site in orders.iter().filter(|s| u(&s["live_bytes"]) > 0) {
        let names: Vec<&str> = site["frames"]
            .as_array()
            .expect("frames")
            .iter()
            .filter_map(|f| f["function"].as_str())
            .take(4)
            .collect();
        assert_eq!(
            names,
            [
                "typed_leaks::record_orders",
                "typed_leaks::handle_request",
                "typed_leaks::serve",
                "typed_leaks::main"
            ],
            "{}",
            traced.pretty()
        );
    }
}

/// A process gone before alloctrace reads its mappings (here: `/proc/PID/maps` never read) is
/// symbolized from the kernel's own account of where its program, its loader and its
/// libraries were mapped: every site names the same functions, in the same modules.
#[test]
fn a_process_gone_before_its_mappings_were_read_is_still_symbolized() {
    require_root();
    let bin = cxx_fixture("containers", "-O2", &["-O2", "-g"]);
    let frames = |traced: &Traced| -> Vec<Vec<(String, String)>> {
        let mut sites: Vec<Vec<(String, String)>> = traced.only_process()["sites"]
            .as_array()
            .expect("sites")
            .iter()
            .map(|s| {
                let library = s["library_frames"].as_array().expect("library_frames");
                library
                    .iter()
                    .chain(s["frames"].as_array().expect("frames"))
                    .map(|f| {
                        let module = f["module"].as_str().unwrap_or("?");
                        let file = Path::new(module).file_name().map_or_else(
                            || module.to_owned(),
                            |n| n.to_string_lossy().into_owned(),
                        );
                        (f["function"].as_str().unwrap_or("?").to_owned(), file)
                    })
                    .collect::<Vec<(String, String)>>()
            })
            // The program's own sites: what the loader allocates before `main` is made
            // while the first mappings are still being noted, and may be one site or two.
            .filter(|frames| frames.iter().any(|(f, _)| f == "main"))
            .collect();
        sites.sort();
        sites
    };
    let read = run_traced(&[], &[&bin]);
    let from_events = run_traced(&["--test-maps-from-events"], &[&bin]);
    assert!(from_events.status.success(), "{}", from_events.pretty());
    let expected = frames(&read);
    assert!(
        expected
            .iter()
            .flatten()
            .any(|(f, m)| f == "operator new(unsigned long)" && m.starts_with("libstdc++")),
        "{}",
        read.pretty()
    );
    assert_eq!(
        frames(&from_events),
        expected,
        "from events:\n{}\nfrom /proc:\n{}",
        from_events.pretty(),
        read.pretty()
    );
}
