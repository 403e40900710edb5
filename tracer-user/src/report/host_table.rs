//! `system`'s table in the text report: one line per process, the worst first, with what
//! tracing cost it; the processes shown in full follow it.

use std::io::{self, Write};

use super::system::{ProcessRow, SystemReport};
use crate::analysis::{ProcessVerdict, bytes_text as bytes, units::count};

/// Rows printed at most (JSON carries them all).
const ROWS_SHOWN: usize = 40;

pub fn write(system: &SystemReport, detail: usize, out: &mut dyn Write) -> io::Result<()> {
    let traced_cpu: f64 = system.rows.iter().map(|r| r.trap_cpu_s).sum();
    writeln!(
        out,
        "\n{} traced ({} exited) · probe hits cost ≈ {:.0} ns each: ≈ {:.2} CPU-s in traced \
         processes, ≈ {:.2} CPU-s in {} hits of processes the filters left out",
        count(
            system.rows.len() + system.rows_dropped as usize,
            "process",
            "processes"
        ),
        system.exited,
        system.trap_ns,
        traced_cpu,
        system.untraced_trap_cpu_s,
        system.untraced_traps
    )?;
    writeln!(
        out,
        "  {:>7}  {:<15} {:<12} {:<9} {:>10} {:>10} {:>12}  {:<13} {:>9} {:>8}  WORST SITE",
        "PID",
        "COMM",
        "CONTAINER",
        "ALLOCATOR",
        "LIVE",
        "FOOTPRINT",
        "GROWTH",
        "VERDICT",
        "TRAPS/S",
        "CPU",
    )?;
    for r in system.rows.iter().take(ROWS_SHOWN) {
        line(r, out)?;
    }
    if system.rows.len() > ROWS_SHOWN {
        writeln!(
            out,
            "  … {} (all in --format json)",
            count(
                system.rows.len() - ROWS_SHOWN,
                "more process",
                "more processes"
            )
        )?;
    }
    if system.rows_dropped > 0 {
        writeln!(
            out,
            "  {} exited without anything notable: not listed",
            count(
                system.rows_dropped as usize,
                "more process",
                "more processes"
            )
        )?;
    }
    writeln!(
        out,
        "\nin full: {} of the worst (of those that ended, the ones that leaked or fragmented)",
        count(detail, "process", "processes")
    )
}

fn line(r: &ProcessRow, out: &mut dyn Write) -> io::Result<()> {
    let verdict = match r.verdict {
        Some(ProcessVerdict::Leak) => "LEAK",
        Some(ProcessVerdict::Fragmentation) => "FRAGMENTATION",
        Some(ProcessVerdict::Stable) => "stable",
        None => "no verdict",
    };
    let gone = if r.exited { " (exited)" } else { "" };
    writeln!(
        out,
        "  {:>7}  {:<15} {:<12} {:<9} {:>10} {:>10} {:>12}  {:<13} {:>9.0} {:>7.2}s  {}{gone}",
        r.pid,
        truncate(&r.comm, 15),
        r.container.as_deref().unwrap_or("-"),
        truncate(&r.allocator, 9),
        bytes(r.live_bytes),
        r.footprint_bytes.map_or_else(|| "?".to_owned(), bytes),
        r.growth_bytes_per_s
            .map_or_else(|| "-".to_owned(), |g| format!("+{}/s", bytes(g as u64))),
        verdict,
        r.traps_per_s,
        r.trap_cpu_s,
        r.worst_site.as_deref().unwrap_or("-"),
    )
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}
