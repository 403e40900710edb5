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
            "PARTIAL RESULT: events were lost; the numbers below are lower bounds"
        )?;
    }
    for warning in &report.warnings {
        writeln!(out, "warning: {warning}")?;
    }
    if report.processes.is_empty() {
        writeln!(
            out,
            "\nno allocator calls were seen from the traced processes"
        )?;
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
    writeln!(out, "  VERDICT: {}", verdict(p.verdict))?;
    writeln!(out, "  evidence: {}", p.evidence)?;
    writeln!(
        out,
        "  live {} in {} allocations{} · peak {} at {:.2}s · {} allocations, {} in total · {} frees",
        bytes(p.live_bytes),
        p.live_allocations,
        if p.mmap_live_bytes > 0 {
            format!(
                " ({} in the program's own mappings)",
                bytes(p.mmap_live_bytes)
            )
        } else {
            String::new()
        },
        bytes(p.peak.live_bytes),
        p.peak.at_s,
        p.total_allocations,
        bytes(p.total_bytes),
        p.frees
    )?;
    match (p.footprint_bytes, p.retained_bytes) {
        (Some(f), Some(r)) => writeln!(
            out,
            "  footprint {} (resident heap and allocator mappings), {} retained beyond live",
            bytes(f),
            bytes(r)
        )?,
        _ => writeln!(
            out,
            "  footprint unknown (the process was gone before it could be measured)"
        )?,
    }
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

fn verdict(v: ProcessVerdict) -> &'static str {
    match v {
        ProcessVerdict::Leak => "LEAK",
        ProcessVerdict::Fragmentation => "FRAGMENTATION (memory freed but kept by the allocator)",
        ProcessVerdict::Stable => "STABLE",
    }
}

fn site(rank: usize, s: &SiteReport, out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "  #{rank:<2} {:?}{}: {} live in {} · {} allocated in {}",
        s.assessment.verdict,
        if s.kind == SiteKind::Mmap {
            " (mmap)"
        } else {
            ""
        },
        bytes(s.live_bytes),
        s.live_allocations,
        bytes(s.total_bytes),
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
