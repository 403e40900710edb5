//! Sites a user recognises: one call site is one site however the compiler copied it, a site
//! starts at the program's own code rather than inside the standard library's containers,
//! and says what it allocated (`std::vector<Rec>`, `HashMap<u64, String>`, `Rc<svc::Node>`).

use std::{path::Path, process::Command};

use alloctrace_tests::*;
use serde_json::Value;

/// Sites from `function` that still hold memory.
fn live_sites<'a>(process: &'a Value, function: &str) -> Vec<&'a Value> {
    sites_from(process, function)
        .into_iter()
        .filter(|s| u(&s["live_bytes"]) > 0)
        .collect()
}

/// The one live site from `function`: its allocated type, live bytes and live allocations.
fn live_site(traced: &Traced, function: &str) -> (String, u64, u64) {
    let p = traced.only_process();
    let live = live_sites(p, function);
    assert_eq!(live.len(), 1, "{function}:\n{}", traced.pretty());
    let s = live[0];
    (
        s["allocated_type"].as_str().unwrap_or("null").to_owned(),
        u(&s["live_bytes"]),
        u(&s["live_allocations"]),
    )
}

/// Every library frame a site starts after is standard-library or allocator code, and the
/// frame after `frames[0]` is `caller`.
fn assert_starts_in_program(traced: &Traced, site: &Value, caller: &str) {
    let library: Vec<&str> = site["library_frames"]
        .as_array()
        .expect("library_frames")
        .iter()
        .map(|f| f["function"].as_str().unwrap_or_default())
        .collect();
    assert!(!library.is_empty(), "{}", traced.pretty());
    assert!(
        library.iter().all(|f| {
            [
                "std::",
                "__gnu_cxx::",
                "operator new",
                "<alloc::",
                "alloc::",
                "<core::",
                "core::",
            ]
            .iter()
            .any(|p| f.starts_with(p))
                || f.contains(" std::")
                || f.starts_with("<std::")
                || f.starts_with("<hashbrown::")
                || f.starts_with("hashbrown::")
                || f.starts_with("<str>")
                || f.starts_with("__rust")
                || f.starts_with("__rdl")
        }),
        "{library:?}\n{}",
        traced.pretty()
    );
    assert_eq!(site["frames"][1]["function"], caller, "{}", traced.pretty());
}

#[test]
fn an_unrolled_call_is_one_site_with_its_stacks_kept() {
    require_root();
    let bin = fixture("unrolled", &["-O2", "-fno-optimize-sibling-calls"]);
    // The compiler did copy the call: three calls to load_blob in load_three.
    let asm = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(&bin)
        .output()
        .expect("run objdump");
    let asm = String::from_utf8_lossy(&asm.stdout);
    let body = asm
        .split("<load_three>:")
        .nth(1)
        .and_then(|b| b.split("\n\n").next())
        .expect("load_three in the disassembly");
    assert_eq!(body.matches("<load_blob>").count(), 3, "{body}");

    let (traced, out) = run_traced_output(&[], &[&bin]);
    assert!(traced.status.success(), "{}", traced.pretty());
    let p = traced.only_process();
    let site = site_from(p, "load_blob");
    assert_eq!(
        u(&site["total_allocations"]),
        fixture_value(&out, "allocations")
    );
    assert_eq!(u(&site["total_bytes"]), fixture_value(&out, "bytes"));
    assert_eq!(u(&site["live_bytes"]), fixture_value(&out, "bytes"));
    assert_eq!(u(&site["live_allocations"]), 300);
    assert_eq!(site["frames"][1]["function"], "load_three");
    assert_eq!(site["frames"][2]["function"], "main");
    // The three stacks, with their own addresses for load_three and their own counts.
    let stacks = site["stacks"].as_array().expect("stacks");
    assert_eq!(stacks.len(), 3, "{}", traced.pretty());
    let mut callers: Vec<&str> = stacks
        .iter()
        .map(|s| s["addresses"][1].as_str().expect("an address"))
        .collect();
    callers.sort_unstable();
    callers.dedup();
    assert_eq!(callers.len(), 3, "{}", traced.pretty());
    for s in stacks {
        assert_eq!(u(&s["total_allocations"]), 100, "{}", traced.pretty());
        assert_eq!(u(&s["live_bytes"]), 100 * 64);
    }
}

#[test]
fn cxx_container_sites_start_at_the_program_and_name_their_type() {
    require_root();
    let bin = cxx_fixture("containers", "-O2", &["-O2", "-g"]);
    let (traced, out) = run_traced_output(&[], &[&bin]);
    assert!(traced.status.success(), "{}", traced.pretty());
    let rounds = fixture_value(&out, "rounds");
    let expected = [
        (
            "store(int)",
            "std::vector<Rec>",
            fixture_value(&out, "vector_bytes"),
        ),
        (
            "name(int)",
            "std::map<int, std::string>",
            fixture_value(&out, "node_bytes"),
        ),
        (
            "text(int)",
            "std::string",
            fixture_value(&out, "string_bytes"),
        ),
        (
            "share(int)",
            "std::shared_ptr<Rec>",
            fixture_value(&out, "shared_bytes"),
        ),
    ];
    for (function, ty, bytes) in expected {
        assert_eq!(
            live_site(&traced, function),
            (ty.to_owned(), rounds * bytes, rounds),
            "{function}"
        );
        let p = traced.only_process();
        assert_starts_in_program(&traced, live_sites(p, function)[0], "main");
    }
    // The vectors grew five times each (1, 2, 4, 8, 16 elements) from one push_back.
    let store = live_sites(traced.only_process(), "store(int)")[0];
    assert_eq!(u(&store["total_allocations"]), 5 * rounds);
}

fn check_rust_collections(bin: &Path) {
    let (traced, out) = run_traced_output(&[], &[bin]);
    assert!(traced.status.success(), "{}", traced.pretty());
    let n = fixture_value(&out, "rounds");
    let p = traced.only_process();
    let one = |function: &str, ty: &str, bytes: u64, count: u64| {
        assert_eq!(
            live_site(&traced, function),
            (ty.to_owned(), bytes, count),
            "{function}"
        );
        assert_starts_in_program(&traced, live_sites(p, function)[0], "collections::main");
    };
    one(
        "collections::index_users",
        "HashMap<u64, String>",
        fixture_value(&out, "hash_bytes"),
        1,
    );
    one(
        "collections::greet",
        "String",
        n * fixture_value(&out, "greeting_bytes"),
        n,
    );
    one(
        "collections::banner",
        "String",
        n * fixture_value(&out, "banner_bytes"),
        n,
    );
    let node = fixture_value(&out, "node_bytes");
    one(
        "collections::share",
        "Rc<collections::svc::Node>",
        n * node,
        n,
    );
    one(
        "collections::share_sync",
        "Arc<collections::svc::Node>",
        n * node,
        n,
    );

    // batch: the inner vectors (one each) and the outer vector's last buffer.
    let mut batch: Vec<(String, u64, u64)> = live_sites(p, "collections::batch")
        .iter()
        .map(|s| {
            assert_starts_in_program(&traced, s, "collections::main");
            (
                s["allocated_type"].as_str().unwrap_or("null").to_owned(),
                u(&s["live_bytes"]),
                u(&s["live_allocations"]),
            )
        })
        .collect();
    batch.sort();
    assert_eq!(
        batch,
        [
            (
                "Vec<Vec<collections::shop::Order>>".to_owned(),
                fixture_value(&out, "batch_bytes"),
                1
            ),
            (
                "Vec<collections::shop::Order>".to_owned(),
                n * fixture_value(&out, "order_bytes"),
                n
            ),
        ],
        "{}",
        traced.pretty()
    );
    // B-tree nodes (their layout is std's own): leaves and internal nodes, all the map's.
    let ranks = live_sites(p, "collections::rank");
    assert!(!ranks.is_empty(), "{}", traced.pretty());
    for s in ranks {
        assert_eq!(
            s["allocated_type"],
            "BTreeMap<u64, u32>",
            "{}",
            traced.pretty()
        );
        assert_starts_in_program(&traced, s, "collections::main");
    }
}

#[test]
fn rust_collection_sites_start_at_the_program_and_name_their_type() {
    require_root();
    check_rust_collections(&rust_fixture("collections"));
}

#[test]
fn rust_release_collection_sites_start_at_the_program_and_name_their_type() {
    require_root();
    check_rust_collections(&rust_fixture_with(
        "collections",
        "-release-debug",
        &["-C", "opt-level=3", "-C", "debuginfo=2"],
    ));
}
