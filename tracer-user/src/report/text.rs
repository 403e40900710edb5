//! The human-readable report: the verdict and totals first, then the top sites with stacks.

use std::io::{self, Write};

use super::{ProcessReport, Report, SiteReport};
use crate::{analysis::ProcessVerdict, model::SiteKind};

/// Frames shown per site in text (JSON carries them all).
const FRAMES_SHOWN: usize = 12;

pub fn write(report: &Report, out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "alloctrace: {} process(es) traced for {:.1}s — {} events received, {} dropped",
        report.processes.len(),
        report.duration_s,
        report.events.received,
        report.events.dropped
    )?;
    if report.partial {
        writeln!(
            out,
            "PARTIAL RESULT: events were lost or doubted (see the warnings); the numbers below \
             may be off"
        )?;
    }
    if report.sample_bytes > 0 {
        writeln!(
            out,
            "sampled: one sample per {} allocated on average; sizes and counts are estimates \
             (≈, ± their 95 % interval), 'recorded' counts are the samples themselves",
            bytes(report.sample_bytes)
        )?;
    }
    for warning in &report.warnings {
        writeln!(out, "warning: {warning}")?;
    }
    if report.processes.is_empty() {
        writeln!(out, "\nno process was traced")?;
    }
    for p in &report.processes {
        process(p, out)?;
    }
    Ok(())
}

fn process(p: &ProcessReport, out: &mut dyn Write) -> io::Result<()> {
    writeln!(out)?;
    writeln!(
        out,
        "pid {} ({}) {}{}",
        p.pid,
        p.comm,
        p.exe,
        if p.exited { "  [exited]" } else { "" }
    )?;
    if let (Some(mode), Some(why)) = (p.stack_mode, &p.stack_mode_reason) {
        writeln!(out, "  stacks: {mode} ({why})")?;
    }
    writeln!(out, "  allocator: {}", p.allocator)?;
    writeln!(out, "  VERDICT: {}", verdict(p.verdict))?;
    writeln!(out, "  evidence: {}", p.evidence)?;
    totals(p, out)?;
    if let Some(t) = &p.pre_teardown {
        writeln!(
            out,
            "  before its exit teardown (at {:.2}s): live {}; freed in the last {:.0} ms",
            t.at_s,
            bytes(t.live_bytes),
            t.lasted_s * 1000.0
        )?;
    }
    footprint(p, out)?;
    if !p.peak.sites.is_empty() {
        let at_peak: Vec<String> = p
            .peak
            .sites
            .iter()
            .map(|s| format!("{} {}", s.function, bytes(s.live_bytes)))
            .collect();
        writeln!(out, "  at the peak: {}", at_peak.join(", "))?;
    }
    if p.unknown_frees > 0 {
        writeln!(
            out,
            "  {} frees of blocks allocated before tracing began were ignored",
            p.unknown_frees
        )?;
    }
    if p.unknown_reallocs > 0 {
        writeln!(
            out,
            "  {} reallocs of blocks allocated before tracing began: only their new blocks count",
            p.unknown_reallocs
        )?;
    }
    writeln!(out, "  sites (leaks first, then by live bytes):")?;
    for (rank, s) in p.sites.iter().enumerate() {
        site(rank + 1, s, out)?;
    }
    if p.sites_omitted > 0 {
        writeln!(
            out,
            "  … {} more sites (raise --top to see them)",
            p.sites_omitted
        )?;
    }
    Ok(())
}

fn verdict(v: Option<ProcessVerdict>) -> &'static str {
    match v {
        Some(ProcessVerdict::Leak) => "LEAK",
        Some(ProcessVerdict::Fragmentation) => {
            "FRAGMENTATION (memory freed but kept by the allocator)"
        }
        Some(ProcessVerdict::Stable) => "STABLE",
        None => "NONE (withheld: the evidence cannot support one)",
    }
}

/// Live, peak and totals, as estimates with their intervals when sampled.
fn totals(p: &ProcessReport, out: &mut dyn Write) -> io::Result<()> {
    let iv = p.intervals.as_ref();
    let live = sized(p.live_bytes, iv.map(|i| i.live_bytes));
    let peak = sized(p.peak.live_bytes, iv.and_then(|i| i.peak_live_bytes));
    let total = sized(p.total_bytes, iv.map(|i| i.total_bytes));
    let mmap = if p.mmap_live_bytes > 0 {
        format!(
            " ({} in the program's own mappings)",
            bytes(p.mmap_live_bytes)
        )
    } else {
        String::new()
    };
    let n = |count: u64| {
        if iv.is_some() {
            format!("≈ {count}")
        } else {
            count.to_string()
        }
    };
    writeln!(
        out,
        "  live {live} in {} allocations{mmap} · peak {peak} at {:.2}s · {} allocations, {total} \
         in total · {} frees",
        n(p.live_allocations),
        p.peak.at_s,
        n(p.total_allocations),
        n(p.frees)
    )?;
    if iv.is_some() {
        writeln!(
            out,
            "  recorded (the samples themselves): {} allocations",
            p.recorded_allocations
        )?;
    }
    Ok(())
}

/// `12.0 MiB`, or `≈ 12.0 MiB ± 1.10 MiB` for an estimate with its interval.
fn sized(value: u64, interval: Option<[u64; 2]>) -> String {
    match interval {
        Some([lo, hi]) => format!("≈ {} ± {}", bytes(value), bytes((hi - lo) / 2)),
        None => bytes(value),
    }
}

fn footprint(p: &ProcessReport, out: &mut dyn Write) -> io::Result<()> {
    let Some(f) = p.footprint_bytes else {
        return writeln!(
            out,
            "  footprint unknown (the process was gone before it could be measured)"
        );
    };
    let mut parts = Vec::new();
    match (&p.allocator_free, p.retained_bytes) {
        (Some(free), _) => parts.push(format!(
            "{} free in {} (retained by the allocator)",
            bytes(free.bytes),
            free.source
        )),
        (None, Some(r)) => parts.push(format!("{} freed and retained by the allocator", bytes(r))),
        (None, None) => {}
    }
    if let Some(a) = p.pre_attach_bytes.filter(|&a| a > 0) {
        parts.push(if p.allocator_free.is_some() {
            format!("{} allocated before the attach and still in use", bytes(a))
        } else {
            format!(
                "{} allocated before the attach (live or free: unknown)",
                bytes(a)
            )
        });
    }
    writeln!(
        out,
        "  footprint {} (resident heap and allocator mappings){}",
        bytes(f),
        if parts.is_empty() {
            String::new()
        } else {
            format!(": {}", parts.join("; "))
        }
    )
}

fn site(rank: usize, s: &SiteReport, out: &mut dyn Write) -> io::Result<()> {
    let iv = s.intervals.as_ref();
    writeln!(
        out,
        "  #{rank:<2} {:?}{}: {} live in {}{} · {} allocated in {}",
        s.assessment.verdict,
        if s.kind == SiteKind::Mmap {
            " (mmap)"
        } else {
            ""
        },
        sized(s.live_bytes, iv.map(|i| i.live_bytes)),
        if iv.is_some() { "≈ " } else { "" },
        s.live_allocations,
        sized(s.total_bytes, iv.map(|i| i.total_bytes)),
        s.total_allocations
    )?;
    writeln!(out, "      {}", s.assessment.evidence)?;
    if let Some(ty) = &s.allocated_type {
        writeln!(out, "      allocates: {ty}")?;
    }
    // The stack is shown from the program's own frame; the library code it called is named
    // by its outermost frame (all of it is in the JSON's `library_frames`).
    if let Some(called) = s.library_frames.last() {
        let more = s.library_frames.len() - 1;
        let more = if more > 0 {
            format!(" (+{more} library frames inside)")
        } else {
            String::new()
        };
        writeln!(out, "      through: {}{more}", called.function)?;
    }
    if s.frames.is_empty() {
        writeln!(out, "        <stack unknown>")?;
    }
    for f in s.frames.iter().take(FRAMES_SHOWN) {
        let location = match (&f.file, f.line) {
            (Some(file), Some(line)) => format!(" ({file}:{line})"),
            (Some(file), None) => format!(" ({file})"),
            _ => f
                .module
                .as_deref()
                .map(|m| format!(" [{}]", m.rsplit('/').next().unwrap_or(m)))
                .unwrap_or_default(),
        };
        let inlined = if f.inlined { " [inlined]" } else { "" };
        writeln!(out, "        {}{location}{inlined}", f.function)?;
    }
    if s.frames.len() > FRAMES_SHOWN {
        writeln!(
            out,
            "        … {} more frames",
            s.frames.len() - FRAMES_SHOWN
        )?;
    }
    if s.stack_truncated {
        writeln!(
            out,
            "        … stack truncated (raise --stack-depth, or --stack-bytes in dwarf mode)"
        )?;
    }
    Ok(())
}

pub use crate::analysis::bytes_text as bytes;
