use std::time::{Duration, UNIX_EPOCH};

use super::*;
use crate::report::tests::example_report;

fn decoded(report: &Report) -> Profile {
    let mut gz = Vec::new();
    write(report, &mut gz).expect("writes");
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut raw).expect("gzip");
    Profile::decode(&raw[..]).expect("a profile.proto message")
}

fn s(profile: &Profile, index: i64) -> &str {
    &profile.string_table[index as usize]
}

#[test]
fn sample_types_are_gos_heap_profile() {
    let profile = decoded(&example_report());
    assert_eq!(s(&profile, 0), "");
    let types: Vec<(&str, &str)> = profile
        .sample_type
        .iter()
        .map(|t| (s(&profile, t.r#type), s(&profile, t.unit)))
        .collect();
    assert_eq!(
        types,
        [
            ("alloc_objects", "count"),
            ("alloc_space", "bytes"),
            ("inuse_objects", "count"),
            ("inuse_space", "bytes"),
        ]
    );
    assert_eq!(s(&profile, profile.default_sample_type), "inuse_space");
    // speedscope reads the field as an index into sample_type and falls back to the last
    // (inuse_space) when it is out of range: it must be.
    assert!(profile.default_sample_type as usize >= profile.sample_type.len());
    let period = profile.period_type.expect("period type");
    assert_eq!(
        (s(&profile, period.r#type), s(&profile, period.unit)),
        ("space", "bytes")
    );
    assert_eq!(profile.period, 1, "exact: every byte");
    let mut sampled = example_report();
    sampled.sample_bytes = 524_288;
    assert_eq!(decoded(&sampled).period, 524_288);
}

#[test]
fn samples_carry_the_reports_numbers_and_labels() {
    let report = example_report();
    let profile = decoded(&report);
    assert_eq!(profile.sample.len(), 3);
    for (sample, site) in profile.sample.iter().zip(&report.processes[0].sites) {
        let expected = [
            site.total_allocations,
            site.total_bytes,
            site.live_allocations,
            site.live_bytes,
        ]
        .map(|v| v as i64);
        assert_eq!(sample.value, expected);
        let labels: Vec<(&str, &str)> = sample
            .label
            .iter()
            .map(|l| (s(&profile, l.key), s(&profile, l.str)))
            .collect();
        assert_eq!(labels[0], ("pid", "42"));
        assert_eq!(labels[1], ("comm", "server"));
    }
    let verdict = |i: usize| s(&profile, profile.sample[i].label[2].str);
    assert_eq!((verdict(0), verdict(2)), ("leak", "temporary"));
    assert_eq!(profile.duration_nanos, 12_500_000_000);
}

#[test]
fn inlined_frames_share_a_location_callee_first() {
    let report = example_report();
    let profile = decoded(&report);
    let leak = &profile.sample[0];
    // node_alloc inlined into make_node (one location), main, then the three runtime frames.
    assert_eq!(leak.location_id.len(), 5);
    let location = |id: u64| &profile.location[id as usize - 1];
    let first = location(leak.location_id[0]);
    assert_eq!(first.address, 0x1139);
    let names: Vec<&str> = first
        .line
        .iter()
        .map(|l| s(&profile, profile.function[l.function_id as usize - 1].name))
        .collect();
    assert_eq!(names, ["node_alloc", "make_node"]);
    assert_eq!(first.line[0].line, 7);
    let function = &profile.function[first.line[0].function_id as usize - 1];
    assert_eq!(s(&profile, function.filename), "/src/app/include/node.h");
    // The truncated stack ends in a marker location.
    let truncated = profile.sample[2]
        .location_id
        .last()
        .copied()
        .expect("locations");
    let marker = location(truncated);
    assert_eq!(
        s(
            &profile,
            profile.function[marker.line[0].function_id as usize - 1].name
        ),
        TRUNCATED
    );
}

#[test]
fn mappings_name_files_and_build_ids_executable_first() {
    let profile = decoded(&example_report());
    let mappings: Vec<(&str, &str, u64)> = profile
        .mapping
        .iter()
        .map(|m| {
            (
                s(&profile, m.filename),
                s(&profile, m.build_id),
                m.memory_limit,
            )
        })
        .collect();
    assert_eq!(
        mappings,
        [
            ("/usr/bin/server", "5957cab8269a66b6", 0x13e1),
            (
                "/usr/lib/x86_64-linux-gnu/libc.so.6",
                "93ac61ec5a8eb139",
                0x27305
            ),
        ]
    );
    assert!(
        profile
            .mapping
            .iter()
            .all(|m| m.has_functions && m.memory_start == 0)
    );
    let libc_location = profile
        .location
        .iter()
        .find(|l| l.address == 0x27249)
        .expect("libc's frame");
    assert_eq!(libc_location.mapping_id, 2);
}

#[test]
fn verdicts_and_evidence_are_comments() {
    let report = example_report();
    let profile = decoded(&report);
    let comments: Vec<&str> = profile.comment.iter().map(|&c| s(&profile, c)).collect();
    let process = format!("pid 42 (server): LEAK — {}", report.processes[0].evidence);
    assert!(comments.contains(&process.as_str()), "{comments:?}");
    assert!(
        comments
            .iter()
            .any(|c| c.starts_with("pid 42 leak at node_alloc: ")),
        "{comments:?}"
    );
}

#[test]
fn time_is_the_start_of_the_trace() {
    let end = UNIX_EPOCH + Duration::from_secs(1_000);
    let profile = profile(&example_report(), end);
    assert_eq!(profile.time_nanos, 987_500_000_000);
}
