//! Every allocator, found in the process's own modules: jemalloc, tcmalloc and mimalloc as
//! shared libraries (C and C++), a prefixed jemalloc beside glibc in one process, Rust global
//! allocators linked into the executable, musl's malloc in a static binary; and a program
//! whose allocator cannot be probed is listed as such, never judged.

use std::{path::Path, process::Command};

use alloctrace_tests::*;
use serde_json::Value;

/// The `allocators` entry named `name`: (live bytes, live allocations).
fn allocator(process: &Value, name: &str) -> (u64, u64) {
    let a = process["allocators"]
        .as_array()
        .and_then(|all| all.iter().find(|a| a["name"] == name))
        .unwrap_or_else(|| panic!("no allocator {name}: {}", process["allocators"]));
    (u(&a["live_bytes"]), u(&a["live_allocations"]))
}

/// Traced exactly, nothing lost or guessed.
fn assert_clean(traced: &Traced) {
    assert!(traced.status.success(), "{}", traced.pretty());
    assert_eq!(traced.report["events"]["dropped"], 0, "{}", traced.pretty());
    assert_eq!(
        traced.report["events"]["address_reused_while_live"],
        0,
        "{}",
        traced.pretty()
    );
    assert_eq!(traced.report["partial"], false, "{}", traced.pretty());
}

/// `leaks.c` (1000 × 64 B and 10 × 1 MiB kept, 2000 blocks of churn freed) linked against
/// each allocator Debian ships: the allocator is named, every site exact.
#[test]
fn c_programs_are_exact_under_jemalloc_tcmalloc_and_mimalloc() {
    require_root();
    for lib in ["jemalloc", "tcmalloc", "mimalloc"] {
        let bin = fixture("leaks", &[&format!("-l{lib}")]);
        let traced = run_traced(&[], &[&bin]);
        assert_clean(&traced);
        let p = traced.only_process();
        assert_eq!(p["allocator"], lib, "{}", traced.pretty());
        assert_eq!(totals(p, "leak_small"), (1000, 1000, 64_000, 0), "{lib}");
        assert_eq!(totals(p, "leak_big"), (10, 10, 10 << 20, 0), "{lib}");
        assert_eq!(totals(p, "churn"), (2000, 0, 0, 2000), "{lib}");
        // A verdict, on what was seen: which one, for a program that lives 5 ms, depends on
        // how the scheduler spread those milliseconds (verdicts are proven in judgments.rs).
        assert!(p["verdict"].is_string(), "{}", traced.pretty());
    }
}

/// `new_delete.cpp`: `operator new` in every form (plain, array, aligned, nothrow) and sized
/// `delete`, which these allocators define themselves. jemalloc's `new[]` is a jump to its
/// `new`, its aligned `new` calls its exported `aligned_alloc`, its `delete` jumps to `free`:
/// each call is still counted once.
#[test]
fn cxx_new_is_exact_at_its_call_sites_under_each_allocator() {
    require_root();
    for lib in ["jemalloc", "tcmalloc", "mimalloc"] {
        let bin = cxx_fixture(
            "new_delete",
            &format!("-{lib}"),
            // The library comes before the source: linked even though "not needed" yet.
            &["-O2", "-g", "-Wl,--no-as-needed", &format!("-l{lib}")],
        );
        let (traced, out) = run_traced_output(&[], &[&bin]);
        assert_clean(&traced);
        let p = traced.only_process();
        assert_eq!(p["allocator"], lib, "{}", traced.pretty());
        let node = fixture_value(&out, "node_bytes");
        let aligned = fixture_value(&out, "aligned_bytes");
        assert_eq!(
            totals(p, "keep_nodes()"),
            (500, 500, 500 * node, 0),
            "{lib}"
        );
        assert_eq!(
            totals(p, "keep_aligned()"),
            (100, 100, 100 * aligned, 0),
            "{lib}"
        );
        assert_eq!(totals(p, "keep_arrays()"), (20, 20, 20_000, 0), "{lib}");
        assert_eq!(totals(p, "churn()"), (2000, 0, 0, 2000), "{lib}");
        assert_eq!(totals(p, "churn_nothrow()"), (1000, 0, 0, 1000), "{lib}");
    }
}

/// Checks the workload of `rust-allocators/src/work.rs` (100 requests): the leaked order
/// vectors and sessions, exact, at the program's functions; their types from DWARF when
/// there is debug info.
fn assert_rust_workload(traced: &Traced, out: &str, crate_name: &str, debug_info: bool) {
    let p = traced.only_process();
    let order_bytes = fixture_value(out, "order_bytes");
    let session_bytes = fixture_value(out, "session_bytes");
    let work = format!("{crate_name}::work");
    let orders = totals(p, &format!("{work}::record_orders"));
    assert_eq!(
        (orders.1, orders.2),
        (100, 100 * order_bytes),
        "{}",
        traced.pretty()
    );
    let sessions = totals(p, &format!("{work}::open_session"));
    assert_eq!(
        (sessions.0, sessions.1, sessions.2),
        (100, 100, 100 * session_bytes),
        "{}",
        traced.pretty()
    );
    let scratch = totals(p, &format!("{work}::scratch"));
    assert_eq!((scratch.0, scratch.1), (100, 0), "{}", traced.pretty());
    let types = |function: &str| -> Vec<String> {
        sites_from(p, &format!("{work}::{function}"))
            .iter()
            .filter(|s| u(&s["live_bytes"]) > 0)
            .map(|s| s["allocated_type"].as_str().unwrap_or("null").to_owned())
            .collect()
    };
    let (order_type, session_type) = if debug_info {
        (
            format!("Vec<{work}::Order>"),
            format!("Box<{work}::Session>"),
        )
    } else {
        ("unknown".to_owned(), "unknown".to_owned())
    };
    assert_eq!(types("record_orders"), [order_type], "{}", traced.pretty());
    assert_eq!(types("open_session"), [session_type], "{}", traced.pretty());
}

/// tikv-jemallocator links jemalloc into the executable with its symbols prefixed
/// (`_rjem_mallocx`…), and the program also calls glibc's malloc: both allocators are
/// probed, each block counted by its own, each free matched to it.
#[test]
fn prefixed_jemalloc_and_glibc_in_one_rust_process() {
    require_root();
    for debug_info in [true, false] {
        let bin = cargo_fixture("jemalloc_leaks", debug_info);
        let (traced, out) = run_traced_output(&[], &[&bin, Path::new("100")]);
        assert_clean(&traced);
        let p = traced.only_process();
        assert_eq!(p["allocator"], "jemalloc", "{}", traced.pretty());
        assert_rust_workload(&traced, &out, "jemalloc_leaks", debug_info);
        assert_eq!(fixture_value(&out, "c_buffers"), 50);
        // glibc's blocks are the C buffers alone, 50 kept of 100.
        assert_eq!(allocator(p, "glibc"), (50 * 256, 50), "{}", traced.pretty());
        let c_buffers: Vec<&Value> = sites_from(p, "jemalloc_leaks::c_buffers");
        let kept: u64 = c_buffers.iter().map(|s| u(&s["live_bytes"])).sum();
        // With debug info, the vector holding the pointers (jemalloc's) is a site of its own
        // type; without, its frames are the same as the buffers' and it joins their site.
        let vector = 50 * 8;
        assert!(
            kept == 50 * 256 + vector || kept == 50 * 256 + vector.next_power_of_two(),
            "{kept}:\n{}",
            traced.pretty()
        );
    }
}

/// The `mimalloc` crate calls mimalloc's aligned API (`mi_malloc_aligned`,
/// `mi_realloc_aligned`, `mi_free`), linked into the executable without `mi_malloc` itself.
#[test]
fn rust_with_mimalloc_linked_in_is_exact() {
    require_root();
    for debug_info in [true, false] {
        let bin = cargo_fixture("mimalloc_leaks", debug_info);
        let (traced, out) = run_traced_output(&[], &[&bin, Path::new("100")]);
        assert_clean(&traced);
        let p = traced.only_process();
        assert_eq!(p["allocator"], "mimalloc", "{}", traced.pretty());
        assert_rust_workload(&traced, &out, "mimalloc_leaks", debug_info);
    }
}

/// musl's malloc compiled into a static binary is found by its symbols and traced exactly;
/// the same binary stripped has nothing to probe, and `run` says why and gives no verdict.
#[test]
fn a_static_musl_binary_is_exact_and_stripped_says_why() {
    require_root();
    let traced = run_traced(&[], &[&musl_fixture("leaks", false)]);
    assert_clean(&traced);
    let p = traced.only_process();
    assert_eq!(p["allocator"], "libc", "{}", traced.pretty());
    assert_eq!(totals(p, "leak_small"), (1000, 1000, 64_000, 0));
    assert_eq!(totals(p, "leak_big"), (10, 10, 10 << 20, 0));
    assert_eq!(totals(p, "churn"), (2000, 0, 0, 2000));

    let stripped = musl_fixture("leaks", true);
    let out = Command::new(alloctrace())
        .args(["run", "--format", "json", "--"])
        .arg(&stripped)
        .output()
        .expect("run alloctrace");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no allocator alloctrace can probe")
            && stderr.contains("statically linked and stripped"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "no report, no verdict");
}

/// Attached to a Go program (no cgo) and a C program at once: the Go one is listed with
/// `allocator: none`, the reason, and no verdict; the C one is judged as usual.
#[test]
fn a_go_program_is_listed_with_no_allocator_and_no_verdict() {
    require_root();
    let mut go = AttachTarget::start(Command::new(go_fixture("service")));
    let mut c = AttachTarget::start(Command::new(fixture("attach_target", &[])));
    let c_pid = c.pid();
    let tracing = Attached::start(&[go.pid(), c_pid], &["--duration", "2s"]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    c.go();
    let traced = tracing.wait();
    let _ = go.child.kill();
    let _ = go.child.wait();
    let _ = c.finish();
    let p = traced.process(go.pid());
    assert_eq!(p["allocator"], "none", "{}", traced.pretty());
    assert!(p["verdict"].is_null(), "{}", traced.pretty());
    assert!(
        p["evidence"]
            .as_str()
            .is_some_and(|e| e.contains("a Go program")),
        "{}",
        traced.pretty()
    );
    let c_process = traced.process(c_pid);
    assert_eq!(c_process["allocator"], "glibc", "{}", traced.pretty());
    assert!(c_process["verdict"].is_string(), "{}", traced.pretty());
}
