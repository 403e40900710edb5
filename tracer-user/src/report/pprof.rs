//! The report as a gzip-compressed pprof profile (profile.proto), the format `go tool pprof`,
//! Pyroscope, Parca and speedscope read.
//!
//! It is shaped like Go's own heap profile, so tools treat it as one: the sample types
//! `alloc_objects`/count, `alloc_space`/bytes, `inuse_objects`/count, `inuse_space`/bytes in
//! that order (tools then default to `inuse_space`, the last), period type `space`/bytes.
//! Values are the report's numbers, which are already unbiased estimates under sampling
//! (`period` is then the mean bytes between samples; 1 when every call was recorded).
//!
//! One file holds every traced process: each sample carries a `pid` (and `comm`) label, so
//! `-tagfocus='pid=^1234$'` selects a process and `-tagroot=pid` splits them (string labels:
//! Pyroscope and Parca group series by them). That works because addresses are normalized:
//! a location is (module, file offset), the same in every process mapping that module, so
//! each module is one mapping starting at 0 whose `file_offset` is 0. Each site's
//! `verdict` is a label too; process verdicts, their evidence and the evidence of each
//! leaking site are the profile's comments (`go tool pprof -comments`).

use std::{
    io::{self, Write},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use flate2::{Compression, write::GzEncoder};
use prost::Message as _;
use rustc_hash::FxHashMap;

use super::{FrameReport, ProcessReport, Report, SiteReport};
use crate::analysis::SiteVerdict;

/// The messages of profile.proto alloctrace writes, with its field numbers. Derived by hand
/// so that building needs no `protoc`; fields alloctrace never sets are left out.
pub mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
        #[prost(int64, repeated, tag = "13")]
        pub comment: Vec<i64>,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }

    #[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        /// Leaf first.
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    #[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
        #[prost(int64, tag = "3")]
        pub num: i64,
        #[prost(int64, tag = "4")]
        pub num_unit: i64,
    }

    #[derive(Clone, PartialEq, Eq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub memory_start: u64,
        #[prost(uint64, tag = "3")]
        pub memory_limit: u64,
        #[prost(uint64, tag = "4")]
        pub file_offset: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
        #[prost(int64, tag = "6")]
        pub build_id: i64,
        #[prost(bool, tag = "7")]
        pub has_functions: bool,
        #[prost(bool, tag = "8")]
        pub has_filenames: bool,
        #[prost(bool, tag = "9")]
        pub has_line_numbers: bool,
        #[prost(bool, tag = "10")]
        pub has_inline_frames: bool,
    }

    #[derive(Clone, PartialEq, Eq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        /// Inlined callees first, the function they were inlined into last.
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
    }

    #[derive(Clone, Copy, PartialEq, Eq, Hash, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
    }

    #[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
    }
}

use proto::{Function, Label, Line, Location, Mapping, Profile, Sample, ValueType};

/// Go's heap-profile sample types, in Go's order: tools default to the last one.
pub const SAMPLE_TYPES: [(&str, &str); 4] = [
    ("alloc_objects", "count"),
    ("alloc_space", "bytes"),
    ("inuse_objects", "count"),
    ("inuse_space", "bytes"),
];

/// Frame names of what is not a real frame, so every sample has a stack to show.
const UNKNOWN_STACK: &str = "[unknown stack]";
const TRUNCATED: &str = "[stack truncated]";

/// Writes the gzip-compressed profile of `report`.
pub fn write(report: &Report, out: &mut dyn Write) -> io::Result<()> {
    let bytes = profile(report, SystemTime::now()).encode_to_vec();
    let mut gz = GzEncoder::new(out, Compression::default());
    gz.write_all(&bytes)?;
    gz.finish()?.flush()
}

/// The profile of `report`, whose trace ended at `end`.
pub fn profile(report: &Report, end: SystemTime) -> Profile {
    let mut b = Builder::default();
    b.string(""); // string_table[0] must be ""
    b.profile.sample_type = SAMPLE_TYPES
        .iter()
        .map(|&(t, unit)| b.value_type(t, unit))
        .collect();
    // A string index, as profile.proto says; it is also past the last sample type, so the
    // viewers that read it as an index into `sample_type` (speedscope) fall back to the last.
    b.profile.default_sample_type = b.string("inuse_space");
    b.profile.period_type = Some(b.value_type("space", "bytes"));
    b.profile.period = i64::try_from(report.sample_bytes.max(1)).unwrap_or(i64::MAX);
    let duration = Duration::from_secs_f64(report.duration_s.max(0.0));
    let start = end.checked_sub(duration).unwrap_or(end);
    b.profile.time_nanos = nanos(start.duration_since(UNIX_EPOCH).unwrap_or_default());
    b.profile.duration_nanos = nanos(duration);
    b.mappings(report);
    for text in comments(report) {
        let index = b.string(&text);
        b.profile.comment.push(index);
    }
    for p in &report.processes {
        for site in &p.sites {
            b.sample(p, site);
        }
    }
    b.profile
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// What `go tool pprof -comments` shows: how the trace was made, each process's verdict
/// with its evidence, each leaking site's evidence, and every warning.
fn comments(report: &Report) -> Vec<String> {
    let mode = match report.sample_bytes {
        0 => "every allocation recorded".to_owned(),
        n => format!("sampled every {n} bytes on average; values are unbiased estimates"),
    };
    let mut out = vec![format!(
        "alloctrace: {} traced for {:.1} s, {mode}",
        super::text::count(report.processes.len(), "process", "processes"),
        report.duration_s
    )];
    if report.partial {
        out.push(super::folded::PARTIAL.to_owned());
    }
    out.extend(report.warnings.iter().map(|w| format!("warning: {w}")));
    for p in &report.processes {
        out.push(format!(
            "pid {} ({}): {} — {}",
            p.pid,
            p.comm,
            super::text::verdict_word(p.verdict),
            p.evidence
        ));
        for s in p
            .sites
            .iter()
            .filter(|s| s.assessment.verdict == SiteVerdict::Leak)
        {
            let at = s.frames.first().map_or(UNKNOWN_STACK, |f| &f.function);
            out.push(format!(
                "pid {} leak at {at}: {}",
                p.pid, s.assessment.evidence
            ));
        }
    }
    out
}

/// Interning tables: each string, function, location and mapping is written once.
#[derive(Default)]
struct Builder {
    profile: Profile,
    strings: FxHashMap<String, i64>,
    functions: FxHashMap<(i64, i64), u64>,
    locations: FxHashMap<(u64, u64, Vec<Line>), u64>,
    /// Mapping id by module path.
    mappings: FxHashMap<String, u64>,
}

impl Builder {
    fn string(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.profile.string_table.len() as i64;
        self.profile.string_table.push(s.to_owned());
        self.strings.insert(s.to_owned(), i);
        i
    }

    fn value_type(&mut self, kind: &str, unit: &str) -> ValueType {
        ValueType {
            r#type: self.string(kind),
            unit: self.string(unit),
        }
    }

    /// One mapping per module, traced executables first (pprof takes the first mapping
    /// for the main binary). Addresses are file offsets, so each mapping spans
    /// `[0, highest offset seen]` with file offset 0.
    fn mappings(&mut self, report: &Report) {
        let build_ids: FxHashMap<&str, &str> = report
            .processes
            .iter()
            .flat_map(|p| &p.modules)
            .filter_map(|m| Some((m.path.as_str(), m.build_id.as_deref()?)))
            .collect();
        let mut modules: Vec<ModuleSpan<'_>> = Vec::new();
        for p in &report.processes {
            for f in p.sites.iter().flat_map(|s| &s.frames) {
                let (Some(path), Some(offset)) = (f.module.as_deref(), parse_hex(&f.address))
                else {
                    continue;
                };
                let i = match modules.iter().position(|m| m.path == path) {
                    Some(i) => i,
                    None => {
                        modules.push(ModuleSpan {
                            path,
                            limit: 0,
                            executable: report.processes.iter().any(|p| p.exe == path),
                            has_files: false,
                        });
                        modules.len() - 1
                    }
                };
                modules[i].limit = modules[i].limit.max(offset + 1);
                modules[i].has_files |= f.file.is_some();
            }
        }
        modules.sort_by_key(|m| !m.executable);
        for m in modules {
            let mapping = Mapping {
                id: self.profile.mapping.len() as u64 + 1,
                memory_start: 0,
                memory_limit: m.limit,
                file_offset: 0,
                filename: self.string(m.path),
                build_id: self.string(build_ids.get(m.path).copied().unwrap_or("")),
                // Symbolized already: tools must not symbolize these again.
                has_functions: true,
                has_filenames: m.has_files,
                has_line_numbers: m.has_files,
                has_inline_frames: true,
            };
            self.mappings.insert(m.path.to_owned(), mapping.id);
            self.profile.mapping.push(mapping);
        }
    }

    fn sample(&mut self, p: &ProcessReport, site: &SiteReport) {
        let mut location_id = self.locations_of(&site.frames);
        if site.frames.is_empty() {
            location_id.push(self.pseudo_location(UNKNOWN_STACK));
        }
        if site.stack_truncated {
            location_id.push(self.pseudo_location(TRUNCATED));
        }
        let value = [
            site.total_allocations,
            site.total_bytes,
            site.live_allocations,
            site.live_bytes,
        ]
        .map(|v| i64::try_from(v).unwrap_or(i64::MAX))
        .to_vec();
        let verdict = match site.assessment.verdict {
            SiteVerdict::Leak => "leak",
            SiteVerdict::Stable => "stable",
            SiteVerdict::Temporary => "temporary",
        };
        let label = vec![
            self.label("pid", &p.pid.to_string()),
            self.label("comm", &p.comm),
            self.label("verdict", verdict),
        ];
        self.profile.sample.push(Sample {
            location_id,
            value,
            label,
        });
    }

    fn label(&mut self, key: &str, value: &str) -> Label {
        Label {
            key: self.string(key),
            str: self.string(value),
            ..Label::default()
        }
    }

    /// Location ids of a stack, leaf first: the frames of one address (inlined callees,
    /// then the function they are inlined into) become one location with a line each.
    fn locations_of(&mut self, frames: &[FrameReport]) -> Vec<u64> {
        let mut ids = Vec::new();
        let mut lines = Vec::new();
        for f in frames {
            let function = self.function(&f.function, f.file.as_deref());
            lines.push(Line {
                function_id: function,
                line: f.line.map_or(0, i64::from),
            });
            if f.inlined {
                continue; // the function it was inlined into comes next, at the same address
            }
            let mapping = f
                .module
                .as_ref()
                .and_then(|m| self.mappings.get(m.as_str()).copied())
                .unwrap_or(0);
            let address = parse_hex(&f.address).unwrap_or(0);
            ids.push(self.location(mapping, address, std::mem::take(&mut lines)));
        }
        if !lines.is_empty() {
            // A stack cut inside an inlined chain: keep what was seen.
            ids.push(self.location(0, 0, lines));
        }
        ids
    }

    fn location(&mut self, mapping_id: u64, address: u64, line: Vec<Line>) -> u64 {
        let key = (mapping_id, address, line);
        if let Some(&id) = self.locations.get(&key) {
            return id;
        }
        let id = self.profile.location.len() as u64 + 1;
        self.profile.location.push(Location {
            id,
            mapping_id,
            address,
            line: key.2.clone(),
        });
        self.locations.insert(key, id);
        id
    }

    /// A location standing for something that is not a frame (`[unknown stack]`).
    fn pseudo_location(&mut self, name: &str) -> u64 {
        let function_id = self.function(name, None);
        self.location(
            0,
            0,
            vec![Line {
                function_id,
                line: 0,
            }],
        )
    }

    fn function(&mut self, name: &str, file: Option<&str>) -> u64 {
        let key = (self.string(name), self.string(file.unwrap_or("")));
        if let Some(&id) = self.functions.get(&key) {
            return id;
        }
        let id = self.profile.function.len() as u64 + 1;
        self.profile.function.push(Function {
            id,
            name: key.0,
            system_name: key.0,
            filename: key.1,
        });
        self.functions.insert(key, id);
        id
    }
}

/// A module the profile's locations point into.
struct ModuleSpan<'a> {
    path: &'a str,
    /// One past the highest file offset seen.
    limit: u64,
    executable: bool,
    has_files: bool,
}

/// `0x1139` → 0x1139.
fn parse_hex(text: &str) -> Option<u64> {
    u64::from_str_radix(text.strip_prefix("0x")?, 16).ok()
}

#[cfg(test)]
mod tests;
