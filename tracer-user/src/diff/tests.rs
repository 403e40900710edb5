use serde_json::json;

use super::*;

fn site(function: &str, line: u32, address: &str, live: u64, allocations: u64) -> Value {
    json!({
        "kind": "heap",
        "verdict": "leak",
        "live_bytes": live,
        "live_allocations": allocations,
        "frames": [
            {"function": function, "file": "/src/grow.c", "line": line, "inlined": false,
             "module": "/usr/bin/grow", "address": address},
            {"function": "main", "file": "/src/grow.c", "line": 40, "inlined": false,
             "module": "/usr/bin/grow", "address": "0x1300"},
        ],
    })
}

fn report(pid: u32, sites: Vec<Value>) -> Value {
    let live: u64 = sites.iter().filter_map(|s| s["live_bytes"].as_u64()).sum();
    json!({
        "schema": "alloctrace.report/v1",
        "processes": [{"pid": pid, "live_bytes": live, "sites_omitted": 0, "sites": sites}],
    })
}

#[test]
fn growing_sites_first_matched_by_frames_not_addresses() {
    // Another run: another pid, other addresses, the same code.
    let a = report(
        10,
        vec![
            site("grow", 21, "0x1139", 2560, 10),
            site("cache", 30, "0x1180", 4096, 16),
            site("shrink", 35, "0x11a0", 1000, 1),
        ],
    );
    let b = report(
        11,
        vec![
            site("grow", 21, "0x2139", 7680, 30),
            site("cache", 30, "0x2180", 4096, 16),
            site("fresh", 50, "0x21c0", 64, 1),
            site("cache", 31, "0x2190", 128, 2),
        ],
    );
    let d = compare(&a, &b, Path::new("a.json"), Path::new("b.json"));
    let grown: Vec<(String, i64, i64, bool)> = d
        .grown
        .iter()
        .map(|s| {
            (
                s.frames[0]["function"].as_str().unwrap_or("?").to_owned(),
                s.growth_bytes,
                s.growth_allocations,
                s.in_before,
            )
        })
        .collect();
    assert_eq!(
        grown,
        [
            ("grow".to_owned(), 5120, 20, true),
            ("cache".to_owned(), 128, 2, false),
            ("fresh".to_owned(), 64, 1, false),
        ]
    );
    assert_eq!((d.shrunk, d.unchanged), (1, 1));
    let mut out = Vec::new();
    write_text(&d, 20, &mut out).expect("writes");
    let text = String::from_utf8(out).expect("utf-8");
    let first = text.lines().nth(2).unwrap_or_default();
    assert!(
        first.starts_with("#1  +5.00 KiB (5120 B, +20 live allocations): 2.50 KiB → 7.50 KiB"),
        "{text}"
    );
    assert!(
        text.contains("grow (grow.c:21) ← main (grow.c:40)"),
        "{text}"
    );
    assert!(
        text.contains("3 sites grew, 1 shrank, 1 unchanged"),
        "{text}"
    );
}

#[test]
fn files_that_are_not_reports_are_refused_clearly() {
    let dir = std::env::temp_dir().join(format!("alloctrace-diff-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let not_json = dir.join("notes.txt");
    std::fs::write(&not_json, "hello").expect("write");
    assert!(matches!(load(&not_json), Err(Error::NotAReport { .. })));
    let other_json = dir.join("other.json");
    std::fs::write(&other_json, r#"{"schema": "something/v1"}"#).expect("write");
    assert!(matches!(load(&other_json), Err(Error::NotAReport { .. })));
    assert!(matches!(
        load(&dir.join("missing.json")),
        Err(Error::Io { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}
