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
        allocator: Some("glibc".into()),
        ..ProcessFacts::default()
    };
    let facts: FxHashMap<Tgid, ProcessFacts> = [(42, facts)].into_iter().collect();
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
    text::write(&report, &mut out).expect("writes");
    let text = String::from_utf8(out).expect("utf-8");
    assert!(text.contains("1 more sites"), "{text}");
    assert!(text.contains("VERDICT: LEAK"), "{text}");
}

#[test]
fn drops_make_the_report_partial_in_text() {
    let (m, stacks) = sample_model();
    let mut report = build_report(&m, &stacks, 5);
    report.partial = true;
    report.events.dropped = 7;
    let mut out = Vec::new();
    text::write(&report, &mut out).expect("writes");
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
    let symbolized = vec![
        vec![frame("load_three", 14, 0x10), frame("main", 20, 0x20)],
        vec![frame("load_three", 14, 0x11), frame("main", 20, 0x20)],
        vec![frame("load_three", 15, 0x12), frame("main", 20, 0x20)],
    ];
    let groups = sites::group(&p.sites, &symbolized);
    assert_eq!(groups, vec![vec![1, 0], vec![2]], "b (2 allocations) first");
    let merged = Site::merged(groups[0].iter().map(|&i| &p.sites[i as usize])).expect("a site");
    assert_eq!(merged.total_allocations, 3);
    assert_eq!(merged.live_bytes, 192);
}
