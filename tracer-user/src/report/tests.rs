use std::path::Path;

use super::*;
use crate::model::{Event, Op, Recording};

fn sample_model() -> (Model, StackTable) {
    let mut stacks = StackTable::default();
    let leak = stacks.intern(&[0x1000, 0x2000]);
    let temp = stacks.intern(&[0x3000]);
    let mut m = Model::default();
    let mut t = 0;
    let mut apply = |op| {
        t += 100;
        m.apply(&Event {
            tgid: 42,
            ts_ns: t,
            start_ns: t,
            op,
            allocator: 0,
        });
    };
    for i in 0..10u64 {
        apply(Op::Alloc {
            addr: 0x10_0000 + i * 64,
            size: 64,
            stack: leak,
            recording: Recording::Every,
        });
        apply(Op::Alloc {
            addr: 0x20_0000,
            size: 1000,
            stack: temp,
            recording: Recording::Every,
        });
        apply(Op::Free { addr: 0x20_0000 });
    }
    (m, stacks)
}

fn build_report(m: &Model, stacks: &StackTable, top: usize) -> Report {
    let facts = ProcessFacts {
        comm: Some("fixture".into()),
        footprint_bytes: Some(4096),
        allocators: vec!["glibc".into()],
        ..ProcessFacts::default()
    };
    let facts: FxHashMap<ImageKey, ProcessFacts> = [((42, 0), facts)].into_iter().collect();
    build(
        Inputs {
            model: m,
            stacks,
            facts: &facts,
            capture: CaptureStats {
                received: 30,
                ..CaptureStats::default()
            },
            kernel: KernelCounters::default(),
            duration: Duration::from_millis(1500),
            end_ns: 3000,
            top,
            sample_bytes: 0,
            ring_mib: 64,
            max_sampled: 1 << 20,
            warnings: vec![],
            system: None,
        },
        &Symbolizer::new(),
    )
}

#[test]
fn json_report_follows_the_v1_contract() {
    let (m, stacks) = sample_model();
    let report = build_report(&m, &stacks, 20);
    let mut out = Vec::new();
    write_json(&report, &mut out).expect("writes");
    let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
    assert_eq!(v["schema"], "alloctrace.report/v1");
    assert_eq!(v["duration_s"], 1.5);
    assert_eq!(v["events"]["received"], 30);
    assert_eq!(v["events"]["dropped"], 0);
    let p = &v["processes"][0];
    assert_eq!(p["pid"], 42);
    assert_eq!(p["comm"], "fixture");
    assert_eq!(p["live_bytes"], 640);
    assert_eq!(p["live_allocations"], 10);
    assert_eq!(p["total_allocations"], 20);
    assert_eq!(p["total_bytes"], 10 * 64 + 10 * 1000);
    assert_eq!(p["footprint_bytes"], 4096);
    assert_eq!(p["retained_bytes"], 4096 - 640);
    assert_eq!(p["verdict"], "leak");
    let sites = p["sites"].as_array().expect("sites");
    assert_eq!(sites.len(), 2);
    assert_eq!(sites[0]["live_bytes"], 640);
    assert_eq!(sites[0]["verdict"], "leak");
    assert_eq!(sites[1]["verdict"], "temporary");
    // Unresolvable addresses are kept as raw addresses, never dropped.
    assert_eq!(sites[0]["frames"].as_array().map(Vec::len), Some(2));
    assert_eq!(sites[0]["frames"][0]["function"], "0x1000");
}

#[test]
fn top_limits_sites_and_says_so() {
    let (m, stacks) = sample_model();
    let report = build_report(&m, &stacks, 1);
    assert_eq!(report.processes[0].sites.len(), 1);
    assert_eq!(report.processes[0].sites_omitted, 1);
    let mut out = Vec::new();
    text::write(&report, false, &mut out).expect("writes");
    let text = String::from_utf8(out).expect("utf-8");
    assert!(text.contains("… 1 more site (raise --top"), "{text}");
    assert!(text.starts_with("LEAK: fixture (pid 42)\n"), "{text}");
}

#[test]
fn drops_make_the_report_partial_in_text() {
    let (m, stacks) = sample_model();
    let mut report = build_report(&m, &stacks, 5);
    report.partial = true;
    report.events.dropped = 7;
    let mut out = Vec::new();
    text::write(&report, false, &mut out).expect("writes");
    let text = String::from_utf8(out).expect("utf-8");
    assert!(text.contains("7 dropped"), "{text}");
    assert!(text.contains("PARTIAL RESULT"), "{text}");
}

#[test]
fn byte_units() {
    assert_eq!(text::bytes(64), "64 B");
    assert_eq!(text::bytes(1536), "1.50 KiB");
    assert_eq!(text::bytes(10 << 20), "10.0 MiB");
    assert_eq!(text::bytes(200 << 20), "200 MiB");
}

#[test]
fn allocator_wrappers_are_library_frames() {
    let f = |name: &str| Frame {
        function: Some(name.into()),
        ..Frame::default()
    };
    let types = crate::types::TypeFinder::default();
    let split = split_site(
        &[
            f("operator new(unsigned long)"),
            f("__rust_alloc"),
            f("make_node"),
            f("main"),
        ],
        &types,
    );
    let names: Vec<_> = split.frames.iter().map(|f| f.function.as_str()).collect();
    assert_eq!(names, ["make_node", "main"]);
    let library: Vec<_> = split
        .library_frames
        .iter()
        .map(|f| f.function.as_str())
        .collect();
    assert_eq!(library, ["operator new(unsigned long)", "__rust_alloc"]);
    // Through Rust's allocator, with no module to read DWARF from: the type is unknown.
    assert_eq!(split.allocated_type.as_deref(), Some(super::UNKNOWN_TYPE));
    let plain = split_site(&[f("malloc"), f("main")], &types);
    assert_eq!(plain.allocated_type, None);
}

#[test]
fn stacks_that_symbolize_the_same_are_one_site() {
    let mut stacks = StackTable::default();
    let a = stacks.intern(&[0x10, 0x20]);
    let b = stacks.intern(&[0x11, 0x20]);
    let c = stacks.intern(&[0x12, 0x20]);
    let mut m = Model::default();
    for (i, stack) in [a, b, b, c].into_iter().enumerate() {
        m.apply(&Event {
            tgid: 7,
            ts_ns: 100 + i as u64,
            start_ns: 100 + i as u64,
            op: Op::Alloc {
                addr: 0x1000 * (i as u64 + 1),
                size: 64,
                stack,
                recording: Recording::Every,
            },
            allocator: 0,
        });
    }
    let p = m.process(7).expect("the process");
    let frame = |function: &str, line: u32, address: u64| Frame {
        function: Some(function.into()),
        file: Some("unrolled.c".into()),
        line: Some(line),
        address,
        ..Frame::default()
    };
    // a and b symbolize the same (an unrolled call), c is another line.
    let symbolized: Stacks = vec![
        vec![frame("load_three", 14, 0x10), frame("main", 20, 0x20)],
        vec![frame("load_three", 14, 0x11), frame("main", 20, 0x20)],
        vec![frame("load_three", 15, 0x12), frame("main", 20, 0x20)],
    ]
    .into();
    let groups = sites::group(&p.sites, &symbolized);
    assert_eq!(groups, vec![vec![1, 0], vec![2]], "b (2 allocations) first");
    let merged = Site::merged(groups[0].iter().map(|&i| &p.sites[i as usize])).expect("a site");
    assert_eq!(merged.total_allocations, 3);
    assert_eq!(merged.live_bytes, 192);
}

/// A frame as the symbolizer would have shown it.
fn frame(function: &str, file: Option<&str>, line: u32, module: &str, address: u64) -> FrameReport {
    FrameReport {
        function: function.to_owned(),
        file: file.map(str::to_owned),
        line: file.map(|_| line),
        module: Some(module.to_owned()),
        address: format!("{address:#x}"),
        inlined: false,
    }
}

const EXE: &str = "/usr/bin/server";
const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";

/// The runtime frames a glibc program's stacks end in.
fn runtime_frames() -> Vec<FrameReport> {
    vec![
        frame(
            "__libc_start_call_main",
            Some("./csu/../sysdeps/nptl/libc_start_call_main.h"),
            58,
            LIBC,
            0x27249,
        ),
        frame(
            "__libc_start_main_impl",
            Some("./csu/../csu/libc-start.c"),
            360,
            LIBC,
            0x27304,
        ),
        frame("_start", None, 0, EXE, 0x1050),
    ]
}

/// A report as a real trace of a small server would give, with every kind of stack the
/// text and profile formats treat specially: an inlined frame, runtime frames, a stack too
/// long to show whole, one the capture truncated, and two sites told apart only by size.
pub(crate) fn example_report() -> Report {
    let (m, stacks) = sample_model();
    let mut report = build_report(&m, &stacks, 20);
    report.duration_s = 12.5;
    let p = &mut report.processes[0];
    p.comm = "server".into();
    p.exe = EXE.into();
    p.exited = true;
    p.stack_mode = Some("fp");
    p.stack_mode_reason = Some("--stack-mode".into());
    p.modules = vec![
        ModuleReport {
            path: EXE.into(),
            build_id: Some("5957cab8269a66b6".into()),
        },
        ModuleReport {
            path: LIBC.into(),
            build_id: Some("93ac61ec5a8eb139".into()),
        },
    ];
    let mut leak = p.sites[0].clone();
    let mut inlined = frame(
        "node_alloc",
        Some("/src/app/include/node.h"),
        7,
        EXE,
        0x1139,
    );
    inlined.inlined = true;
    leak.frames = vec![
        inlined,
        frame("make_node", Some("/src/app/list.c"), 42, EXE, 0x1139),
        frame("main", Some("/src/app/main.c"), 10, EXE, 0x1200),
    ];
    leak.frames.extend(runtime_frames());
    leak.assessment.growth = Some(analysis::Growth {
        bytes_per_s: 2560.0,
        fit: 0.99,
        last_third_bytes_per_s: 2500.0,
        span_s: 12.5,
        points: 50,
    });
    // The same function, another size: only bytes per allocation tell the two apart.
    let mut small = leak.clone();
    small.live_bytes = 80;
    small.total_bytes = 80;
    small.frames[1].line = None;
    small.frames[1].file = None;
    leak.frames[1].file = None;
    leak.frames[1].line = None;
    small.frames[0].address = "0x1160".into();
    small.frames[1].address = "0x1160".into();
    let mut temp = p.sites[1].clone();
    temp.frames = (0..15)
        .map(|i| {
            frame(
                &format!("handler_{i}"),
                Some("/src/app/net/http.c"),
                100 + i,
                EXE,
                0x1300 + u64::from(i) * 16,
            )
        })
        .collect();
    temp.stack_truncated = true;
    p.sites = vec![leak, small, temp];
    p.sites_total = 3;
    p.live_bytes = 720;
    p.live_allocations = 20;
    report
}

fn text_of(report: &Report, color: bool) -> String {
    let mut out = Vec::new();
    text::write(report, color, &mut out).expect("writes");
    String::from_utf8(out).expect("utf-8")
}

/// Compares `text` with the golden file `name` (ESC shown as `<ESC>`); with
/// `UPDATE_GOLDEN=1` set, rewrites the file instead.
fn golden(name: &str, text: &str) {
    let shown = text.replace('\u{1b}', "<ESC>");
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/report/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &shown).expect("write the golden file");
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(shown, expected, "text differs from {}", path.display());
}

#[test]
fn text_matches_its_golden_files_without_and_with_colour() {
    let report = example_report();
    let plain = text_of(&report, false);
    assert!(!plain.contains('\u{1b}'), "{plain}");
    golden("text.txt", &plain);
    let colored = text_of(&report, true);
    golden("text-color.txt", &colored);
    // Colour changes nothing but the escapes.
    let stripped = strip_ansi(&colored);
    assert_eq!(stripped, plain);
}

/// The text without its ANSI SGR sequences.
fn strip_ansi(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn text_reads_itself() {
    let text = text_of(&example_report(), false);
    let lines: Vec<&str> = text.lines().collect();
    // The verdict first, with plurals right.
    assert_eq!(lines[0], "LEAK: server (pid 42)");
    assert!(
        lines[1].starts_with("traced 1 process for 12.5 s"),
        "{text}"
    );
    // Paths under the common prefix, which is said once.
    assert!(
        text.contains("source paths are relative to /src/app/\n"),
        "{text}"
    );
    assert!(
        text.contains("node_alloc (include/node.h:7) [inlined]"),
        "{text}"
    );
    assert!(text.contains("main (main.c:10)"), "{text}");
    // Sizes tell same-function sites apart; growth per second, hour and day.
    assert!(
        text.contains("640 B live in 10 allocations, 64 B each"),
        "{text}"
    );
    assert!(
        text.contains("80 B live in 10 allocations, 8 B each"),
        "{text}"
    );
    assert!(
        text.contains("growth +2.50 KiB/s · +8.79 MiB/h · +211 MiB/day"),
        "{text}"
    );
    // Runtime frames cut with a count; long stacks cut with "N more frames"; truncated only
    // where the capture lost frames.
    assert!(
        text.contains(
            "… 3 runtime frames: __libc_start_call_main ← __libc_start_main_impl ← _start"
        ),
        "{text}"
    );
    assert!(!text.contains("_start ("), "{text}");
    assert!(text.contains("… 3 more frames\n"), "{text}");
    assert_eq!(text.matches("stack truncated").count(), 1, "{text}");
    assert!(
        text.contains("1 site keeps growing (640 B live from it)"),
        "{text}"
    );
}

#[test]
fn plurals_and_sizes() {
    assert_eq!(text::count(1, "process", "processes"), "1 process");
    assert_eq!(text::count(0, "process", "processes"), "0 processes");
    assert_eq!(
        text::per_allocation(768, 3, false).as_deref(),
        Some("256 B each")
    );
    assert_eq!(
        text::per_allocation(1000, 3, false).as_deref(),
        Some("≈333 B each")
    );
    assert_eq!(
        text::per_allocation(768, 3, true).as_deref(),
        Some("≈256 B each")
    );
    assert_eq!(text::per_allocation(0, 0, false), None);
    assert_eq!(
        text::growth(-1024.0),
        "-1.00 KiB/s · -3.52 MiB/h · -84.4 MiB/day"
    );
}

#[test]
fn folded_totals_and_leak_marks() {
    let report = example_report();
    let stacks = folded::stacks(&report, Weight::Live);
    let total: u64 = stacks.values().sum();
    assert_eq!(total, report.processes[0].live_bytes);
    let lines: Vec<String> = stacks.iter().map(|(s, v)| format!("{s} {v}")).collect();
    assert_eq!(
        lines,
        [
            "server (pid 42);_start;__libc_start_main_impl;__libc_start_call_main;main;\
             make_node;node_alloc [leak] 720"
        ],
        "identical stacks are summed; the leak is marked at its allocating frame"
    );
    let counts = folded::stacks(&report, Weight::Count);
    assert_eq!(counts.values().sum::<u64>(), 20);
    let allocated = folded::stacks(&report, Weight::Allocated);
    assert_eq!(allocated.len(), 2);
    let temp = allocated
        .keys()
        .find(|k| k.contains("handler_0"))
        .expect("temp site");
    assert!(
        temp.starts_with("server (pid 42);[stack truncated];handler_14;"),
        "{temp}"
    );
    assert!(temp.ends_with(";handler_0"), "{temp}");
}

#[test]
fn folded_frames_cannot_break_the_format() {
    let mut report = example_report();
    report.processes[0].sites[0].frames[0].function = "drop<[u8; 8]>".into();
    let mut out = Vec::new();
    folded::write(&report, Weight::Live, &mut out).expect("writes");
    let text = String::from_utf8(out).expect("utf-8");
    assert!(text.contains(";drop<[u8, 8]> [leak] "), "{text}");
    for line in text.lines() {
        let (_, value) = line.rsplit_once(' ').expect("a value");
        value.parse::<u64>().expect("a number");
    }
}

#[test]
fn svg_draws_leaks_in_red_and_an_empty_report_is_still_svg() {
    let report = example_report();
    let mut out = Vec::new();
    svg::write(&report, Weight::Live, &mut out).expect("writes");
    let svg = String::from_utf8(out).expect("utf-8");
    assert!(svg.contains("<title>node_alloc [leak] (720 bytes"), "{svg}");
    assert!(svg.contains("rgb(224,48,48)"), "the leak is red");
    assert!(
        svg.contains("pid 42 (server): LEAK"),
        "the subtitle has the verdict"
    );
    let mut empty = example_report();
    for s in &mut empty.processes[0].sites {
        s.live_bytes = 0;
    }
    let mut out = Vec::new();
    svg::write(&empty, Weight::Live, &mut out).expect("writes");
    let svg = String::from_utf8(out).expect("utf-8");
    assert!(
        svg.contains("no live bytes to draw") && svg.ends_with("</svg>\n"),
        "{svg}"
    );
}

#[test]
fn a_partial_report_says_so_in_every_format() {
    let mut report = example_report();
    report.partial = true;
    report.warnings = vec!["3 events were lost; raise --ring-buffer".into()];
    let render = |format| {
        let mut out = Vec::new();
        let render = Render {
            format,
            weight: Weight::Live,
            color: false,
        };
        write(&report, render, &mut out).expect("writes");
        out
    };
    let text = String::from_utf8(render(Format::Text)).expect("utf-8");
    assert!(text.contains("PARTIAL RESULT"), "{text}");
    let json: serde_json::Value = serde_json::from_slice(&render(Format::Json)).expect("JSON");
    assert_eq!(json["partial"], true);
    let folded = String::from_utf8(render(Format::Folded)).expect("utf-8");
    assert!(
        folded.starts_with(&format!("# {}\n", folded::PARTIAL)),
        "{folded}"
    );
    assert!(
        folded.contains("# warning: 3 events were lost; raise --ring-buffer\n"),
        "{folded}"
    );
    let svg = String::from_utf8(render(Format::Svg)).expect("utf-8");
    assert!(svg.contains(folded::PARTIAL), "the subtitle says so");
    let pprof = pprof::profile(&report, std::time::SystemTime::now());
    let comments: Vec<&str> = pprof
        .comment
        .iter()
        .map(|&i| pprof.string_table[i as usize].as_str())
        .collect();
    assert!(comments.contains(&folded::PARTIAL), "{comments:?}");
    assert!(
        comments.iter().any(|c| c.contains("raise --ring-buffer")),
        "{comments:?}"
    );
}
