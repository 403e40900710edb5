//! A real program without frame pointers at a high allocation rate (issue 19): Debian's
//! `python3` on a JSON-heavy script, traced by `run` at default settings, must lose nothing
//! and agree exactly with an `LD_PRELOAD` counter loaded into the same process.
//!
//! The counter (`fixtures/alloc_counter.c`) defines `malloc` and `free`, so alloctrace's
//! discovery finds it as a C library allocator (`libc`) besides glibc, and probes both. That
//! is right: an interposed `malloc` is the program's allocator, whether it forwards to glibc
//! (as this one does) or not (a preloaded jemalloc). Its allocation calls nest the glibc call
//! they make, which is folded into them; a call recorded at glibc's probe instead is still
//! one call. So the process's allocations are the sum over both allocators. Its `free` calls
//! glibc's `free`, and a free has no in-flight call to nest in: each block's end is reported
//! twice, the second time as a free of an unknown block. The totals stay exact, but
//! `unknown_frees` is not compared, and the ring buffers carry ≈ 1.5× the events the same
//! script makes without the counter.

use std::path::{Path, PathBuf};

use alloctrace_tests::*;
use serde_json::Value;

const PYTHON: &str = "/usr/bin/python3";

/// The script: `fixtures/python/json_heavy.py`.
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/python/json_heavy.py")
}

/// What the counter wrote at the traced process's exit.
struct Counted {
    allocations: u64,
    bytes: u64,
    frees: u64,
    live_allocations: u64,
    live_bytes: u64,
}

impl Counted {
    fn read(path: &Path) -> Self {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("the counter wrote no {}: {e}", path.display()));
        let value = |key| fixture_value(&text, key);
        assert_eq!(
            value("unknown_frees"),
            0,
            "the counter missed blocks:\n{text}"
        );
        Self {
            allocations: value("allocations"),
            bytes: value("bytes"),
            frees: value("frees"),
            live_allocations: value("live_allocations"),
            live_bytes: value("live_bytes"),
        }
    }
}

/// The heap totals of one reported process image: its allocators' sums (the process's own
/// totals also count the mappings it made itself), and its heap frees, which are its frees
/// less the mappings it unmapped (every block and mapping was made under the trace).
fn heap_totals(process: &Value) -> (u64, u64, u64, u64, u64) {
    let allocators = process["allocators"].as_array().expect("allocators");
    let sum = |field: &str| allocators.iter().map(|a| u(&a[field])).sum::<u64>();
    let (allocations, bytes) = (sum("total_allocations"), sum("total_bytes"));
    let (live_allocations, live_bytes) = (sum("live_allocations"), sum("live_bytes"));
    let mappings = u(&process["total_allocations"]) - allocations;
    let live_mappings = u(&process["live_allocations"]) - live_allocations;
    let frees = u(&process["frees"]) - (mappings - live_mappings);
    (allocations, bytes, frees, live_allocations, live_bytes)
}

/// Whether any site's stack names a function of CPython's interpreter or its json
/// accelerator: the stacks of a program without frame pointers were unwound and symbolized.
fn names_cpython(process: &Value) -> bool {
    const CPYTHON: &[&str] = &[
        "PyObject_Malloc",
        "_PyEval_EvalFrameDefault",
        "scanstring_unicode",
        "py_encode_basestring_ascii",
        "encoder_listencode_obj",
    ];
    process["sites"].as_array().is_some_and(|sites| {
        sites.iter().any(|s| {
            s["frames"].as_array().is_some_and(|frames| {
                frames
                    .iter()
                    .any(|f| CPYTHON.iter().any(|name| f["function"] == *name))
            })
        })
    })
}

#[test]
fn python_json_at_defaults_loses_nothing_and_equals_an_ld_preload_counter() {
    require_root();
    assert!(
        Path::new(PYTHON).exists(),
        "{PYTHON} is missing: apt install python3 (cargo xtask setup does)"
    );
    let counter = preload_fixture("alloc_counter");
    let counts = tempfile("alloc-counter");
    let preload = format!("LD_PRELOAD={}", counter.display());
    let out = format!("ALLOC_COUNTER_OUT={}", counts.display());
    // `env` sets the counter's variables for python alone: preloaded into alloctrace it would
    // count the collector too. `env` is its own image in the report, before python's.
    // PYTHONMALLOC=malloc sends every object to malloc: with pymalloc, python's own arenas
    // serve objects up to 512 B and the script makes ≈ 10 000 allocator calls, not ≈ 2.5 M.
    // PYTHONHASHSEED=0 makes the run repeatable.
    let env = Path::new("/usr/bin/env");
    let script = script();
    let command: Vec<&Path> = vec![
        env,
        Path::new("PYTHONMALLOC=malloc"),
        Path::new("PYTHONHASHSEED=0"),
        Path::new(&preload),
        Path::new(&out),
        Path::new(PYTHON),
        &script,
    ];
    let traced = run_traced(&[], &command);
    assert!(traced.status.success(), "{}", traced.pretty());
    let counted = Counted::read(&counts);
    let _ = std::fs::remove_file(&counts);

    let report = &traced.report;
    assert_eq!(u(&report["events"]["dropped"]), 0, "{}", traced.pretty());
    assert_eq!(report["partial"], false, "{}", traced.pretty());
    let python = *traced.images().last().expect("python's image");
    assert_eq!(python["comm"], "python3", "{}", traced.pretty());
    assert_eq!(
        python["stack_mode"], "dwarf",
        "{}",
        python["stack_mode_reason"]
    );
    assert!(
        counted.allocations >= 2_000_000,
        "only {} allocations: the workload is meant to make ≥ 2 M",
        counted.allocations
    );
    let (allocations, bytes, frees, live_allocations, live_bytes) = heap_totals(python);
    assert_eq!(
        (allocations, bytes, frees, live_allocations, live_bytes),
        (
            counted.allocations,
            counted.bytes,
            counted.frees,
            counted.live_allocations,
            counted.live_bytes
        ),
        "(allocations, bytes, frees, live allocations, live bytes): alloctrace, then the \
         counter"
    );
    assert!(
        names_cpython(python),
        "no stack names a CPython function:\n{}",
        traced.pretty()
    );
}
