//! Full, correct stacks on production-style binaries: optimized C without frame pointers
//! whose debug info is split off and stripped, and Rust release builds with and without
//! debug info (including the element type of Rust allocations). Each fixture has exited
//! before its report is written, so every symbol comes from files pinned while it ran.

use std::path::Path;

use alloctrace_tests::*;
use serde_json::Value;

/// 1-based line of the first line of `source` containing `text`.
fn line_of(source: &str, text: &str) -> u32 {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(source);
    let body = std::fs::read_to_string(&path).expect("read the fixture source");
    body.lines()
        .position(|l| l.contains(text))
        .map(|i| i as u32 + 1)
        .unwrap_or_else(|| panic!("{text:?} not in {source}"))
}

fn names(site: &Value, n: usize) -> Vec<String> {
    site["frames"]
        .as_array()
        .expect("frames")
        .iter()
        .take(n)
        .map(|f| f["function"].as_str().unwrap_or_default().to_owned())
        .collect()
}

const LEVELS: [&str; 7] = [
    "level6", "level5", "level4", "level3", "level2", "level1", "main",
];

fn deep_leak_stripped() -> std::path::PathBuf {
    let bin = fixture("deep_leak", &["-O2", "-fomit-frame-pointer"]);
    split_debug_info(&bin)
}

#[test]
fn an_optimized_stripped_c_binary_is_unwound_through_its_split_debug_info() {
    require_root();
    let stripped = deep_leak_stripped();
    let (traced, out) = run_traced_output(&[], &[&stripped, Path::new("100")]);
    assert!(traced.status.success(), "{}", traced.pretty());
    assert_eq!(fixture_value(&out, "leaked"), 100);
    assert_eq!(traced.report["events"]["dropped"], 0);
    let p = traced.only_process();
    assert_eq!(p["exited"], true);
    assert_eq!(p["stack_mode"], "dwarf", "{}", traced.pretty());

    let site = site_from(p, "level6");
    assert_eq!(site["live_bytes"], 4800);
    assert_eq!(site["live_allocations"], 100);
    assert_eq!(site["stack_truncated"], false);
    assert_eq!(
        site["allocated_type"],
        Value::Null,
        "C code has no Rust type"
    );
    assert_eq!(names(site, 7), LEVELS, "{}", traced.pretty());
    let frames = site["frames"].as_array().expect("frames");
    let calls = [
        "malloc(n)",
        "level6(n); sink += 5",
        "level5(n); sink += 4",
        "level4(n); sink += 3",
        "level3(n); sink += 2",
        "level2(n); sink += 1",
        "level1(48)",
    ];
    for (frame, call) in frames.iter().zip(calls) {
        assert!(
            frame["file"]
                .as_str()
                .is_some_and(|f| f.ends_with("deep_leak.c")),
            "{frame}"
        );
        assert_eq!(frame["line"], line_of("deep_leak.c", call), "{frame}");
        assert_eq!(frame["inlined"], false);
    }
}

#[test]
fn the_stack_matches_gdbs_backtrace_at_the_same_call() {
    require_root();
    let stripped = deep_leak_stripped();
    let gdb = gdb_backtrace(&stripped, &["1"], "level6");
    let traced = run_traced(&[], &[&stripped, Path::new("1")]);
    assert!(traced.status.success(), "{}", traced.pretty());
    let site = site_from(traced.only_process(), "level6");
    let ours: Vec<(String, Option<u32>)> = site["frames"]
        .as_array()
        .expect("frames")
        .iter()
        .take(LEVELS.len())
        .map(|f| {
            (
                f["function"].as_str().unwrap_or_default().to_owned(),
                f["line"].as_u64().map(|l| l as u32),
            )
        })
        .collect();
    let gdb_names: Vec<&str> = gdb.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(gdb_names, LEVELS, "gdb: {gdb:?}");
    // Frame 0 differs by design: gdb stops at level6's breakpoint, we at its malloc call.
    // Every caller is the same function at the same line.
    assert_eq!(
        ours[1..],
        gdb[1..LEVELS.len()],
        "ours {ours:?}\ngdb {gdb:?}"
    );
}

#[test]
fn stacks_deeper_than_the_limit_are_marked_truncated() {
    require_root();
    let stripped = deep_leak_stripped();
    let traced = run_traced(&["--stack-depth", "3"], &[&stripped, Path::new("10")]);
    assert!(traced.status.success(), "{}", traced.pretty());
    let site = site_from(traced.only_process(), "level6");
    assert_eq!(names(site, 10), ["level6", "level5", "level4"]);
    assert_eq!(site["stack_truncated"], true);
    assert_eq!(site["live_bytes"], 480);
}

/// The one site from `function` still holding memory (a growing vector's earlier buffers
/// were allocated at other call sites inside its growth path and are all freed).
fn live_site_from<'a>(process: &'a Value, function: &str) -> &'a Value {
    let live: Vec<&Value> = sites_from(process, function)
        .into_iter()
        .filter(|s| s["live_bytes"] != 0)
        .collect();
    assert_eq!(
        live.len(),
        1,
        "{}",
        serde_json::to_string_pretty(process).unwrap_or_default()
    );
    live[0]
}

/// Runs typed_leaks (100 requests); checks bytes, counts and the callers of both leaks.
fn trace_typed_leaks(bin: &Path) -> Traced {
    let (traced, out) = run_traced_output(&[], &[bin, Path::new("100")]);
    assert!(traced.status.success(), "{}", traced.pretty());
    assert_eq!(fixture_value(&out, "requests"), 100);
    assert_eq!(traced.report["events"]["dropped"], 0);
    let p = traced.only_process();
    assert_eq!(p["exited"], true);
    assert_eq!(p["stack_mode"], "dwarf", "{}", traced.pretty());
    let order_bytes = fixture_value(&out, "order_bytes");
    let session_bytes = fixture_value(&out, "session_bytes");
    let orders = live_site_from(p, "typed_leaks::record_orders");
    assert_eq!(orders["live_bytes"], 100 * order_bytes);
    assert_eq!(orders["live_allocations"], 100);
    let sessions = live_site_from(p, "typed_leaks::open_session");
    assert_eq!(sessions["live_bytes"], 100 * session_bytes);
    assert_eq!(sessions["live_allocations"], 100);
    for site in [orders, sessions] {
        assert_eq!(
            names(site, 4)[1..],
            [
                "typed_leaks::handle_request",
                "typed_leaks::serve",
                "typed_leaks::main"
            ],
            "{}",
            traced.pretty()
        );
        assert_eq!(site["stack_truncated"], false);
    }
    traced
}

#[test]
fn a_rust_release_build_with_debug_info_gets_lines_and_element_types() {
    require_root();
    // Cargo's release profile with `debug = true`: optimized, no frame pointers.
    let bin = rust_fixture_with(
        "typed_leaks",
        "-release-debug",
        &["-C", "opt-level=3", "-C", "debuginfo=2"],
    );
    let traced = trace_typed_leaks(&bin);
    let p = traced.only_process();
    let orders = live_site_from(p, "typed_leaks::record_orders");
    let sessions = live_site_from(p, "typed_leaks::open_session");
    assert_eq!(orders["allocated_type"], "Vec<typed_leaks::Order>");
    assert_eq!(sessions["allocated_type"], "Box<typed_leaks::Session>");
    let source = "rust/typed_leaks.rs";
    for (site, lines) in [
        (
            orders,
            [
                line_of(source, "orders.push("),
                line_of(source, "forget(record_orders"),
            ],
        ),
        (
            sessions,
            [
                line_of(source, "black_box(Box::new(Session"),
                line_of(source, "Box::leak(open_session"),
            ],
        ),
    ] {
        let frames = site["frames"].as_array().expect("frames");
        let serve_line = line_of(source, "handle_request(i);");
        for (frame, line) in frames.iter().zip(lines.into_iter().chain([serve_line])) {
            assert!(
                frame["file"]
                    .as_str()
                    .is_some_and(|f| f.ends_with("typed_leaks.rs")),
                "{frame}"
            );
            assert_eq!(frame["line"], line, "{}", traced.pretty());
        }
    }
}

#[test]
fn a_rust_release_build_without_debug_info_gets_names_and_an_unknown_type() {
    require_root();
    // Cargo's default release profile: optimized, no frame pointers, debug info stripped.
    let bin = rust_fixture_with(
        "typed_leaks",
        "-release",
        &["-C", "opt-level=3", "-C", "strip=debuginfo"],
    );
    let traced = trace_typed_leaks(&bin);
    let p = traced.only_process();
    for function in ["typed_leaks::record_orders", "typed_leaks::open_session"] {
        let site = live_site_from(p, function);
        assert_eq!(site["allocated_type"], "unknown", "{}", traced.pretty());
        assert_eq!(site["frames"][0]["file"], Value::Null);
    }
}

/// Whether any section of `file` is compressed (`C` among `readelf -S`'s flags).
fn has_compressed_sections(file: &Path) -> bool {
    let out = std::process::Command::new("readelf")
        .arg("-SW")
        .arg(file)
        .output()
        .expect("run readelf");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(".debug_"))
        .any(|l| {
            l.split_whitespace()
                .rev()
                .nth(3)
                .is_some_and(|flags| flags.contains('C'))
        })
}

/// Removes a file installed for one test, however the test ends.
struct Installed(std::path::PathBuf);

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Debug info installed by build id with compressed sections, as Debian's debug packages
/// ship it: read from an uncompressed copy written to the cache directory (blazesym would
/// otherwise inflate every section onto the collector's heap), with the same functions and
/// lines as the uncompressed split debug info gives.
#[test]
fn compressed_debug_info_is_read_from_an_uncompressed_copy() {
    require_root();
    let bin = fixture("deep_leak", &["-O2", "-fomit-frame-pointer", "-gz=zlib"]);
    let stripped = split_debug_info(&bin);
    let debug = stripped.with_extension("debug");
    assert!(
        has_compressed_sections(&debug),
        "the fixture's debug info is compressed"
    );
    let id = build_id(&stripped);
    let installed = Path::new("/usr/lib/debug/.build-id")
        .join(&id[..2])
        .join(format!("{}.debug", &id[2..]));
    std::fs::create_dir_all(installed.parent().expect("a directory")).expect("debug dir");
    std::fs::copy(&debug, &installed).expect("install the debug file");
    let _installed = Installed(installed);
    // The debug link next to the binary is gone: only the build-id path finds it.
    std::fs::remove_file(&debug).expect("remove the linked debug file");
    let cache = scratch_dir().join(format!("debug-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let cache_dir = cache.to_string_lossy().into_owned();
    let (traced, out) = run_traced_env(
        &[],
        &[&stripped, Path::new("100")],
        &[("ALLOCTRACE_CACHE_DIR", &cache_dir)],
    );
    assert!(traced.status.success(), "{}", traced.pretty());
    assert_eq!(fixture_value(&out, "leaked"), 100);
    let site = site_from(traced.only_process(), "level6");
    assert_eq!(site["live_bytes"], 4800);
    assert_eq!(names(site, 7), LEVELS, "{}", traced.pretty());
    let frames = site["frames"].as_array().expect("frames");
    for (frame, call) in frames.iter().zip(["malloc(n)", "level6(n); sink += 5"]) {
        assert_eq!(frame["line"], line_of("deep_leak.c", call), "{frame}");
    }
    let copy = cache.join(format!("{id}.debug"));
    assert!(copy.is_file(), "no copy at {}", copy.display());
    assert!(!has_compressed_sections(&copy));
    let _ = std::fs::remove_dir_all(&cache);
}
