//! The human-readable report: the verdict and totals first, then the top sites with stacks.

use std::io::{self, Write};

use super::{ProcessReport, Report, SiteReport};

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
    writeln!(out, "  verdict: {:?} — {}", p.verdict, p.evidence)?;
    writeln!(
        out,
        "  live {} in {} allocations (peak {} at {:.2}s) · {} allocations, {} in total · {} frees",
        bytes(p.live_bytes),
        p.live_allocations,
        bytes(p.peak_live_bytes),
        p.peak_at_s,
        p.total_allocations,
        bytes(p.total_bytes),
        p.frees
    )?;
    match (p.footprint_bytes, p.retained_bytes) {
        (Some(f), Some(r)) => writeln!(
            out,
            "  footprint {} (anon RSS), {} retained beyond live",
            bytes(f),
            bytes(r)
        )?,
        _ => writeln!(
            out,
            "  footprint unknown (the process was gone before it could be sampled)"
        )?,
    }
    if p.unknown_frees > 0 {
        writeln!(
            out,
            "  {} frees of blocks allocated before tracing began were ignored",
            p.unknown_frees
        )?;
    }
    writeln!(out, "  top sites by live bytes:")?;
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

fn site(rank: usize, s: &SiteReport, out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "  #{rank:<2} {} live in {} allocations · {} allocations, {} total · {:?}: {}",
        bytes(s.live_bytes),
        s.live_allocations,
        s.total_allocations,
        bytes(s.total_bytes),
        s.verdict,
        s.evidence
    )?;
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
    Ok(())
}

/// Bytes in binary units with three significant digits (`64 B`, `1.50 KiB`, `10.0 MiB`).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let digits = if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else {
        2
    };
    format!("{value:.digits$} {}", UNITS[unit])
}
