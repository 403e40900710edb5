//! The report as folded stacks (`root;caller;…;allocating function VALUE` per line), the
//! input of flame-graph tools (inferno, FlameGraph, speedscope).
//!
//! Each line starts at its process (`comm (pid N)`) and ends at the site's allocating
//! function; the value is what `--weight` chooses: live bytes (the default), allocated
//! bytes, or live allocations. The allocating frame of a leaking site carries
//! [`LEAK_MARK`], so leaks stand out in any viewer and can be searched for. A stack the
//! capture cut short gets a `[stack truncated]` frame where its callers would be. A partial
//! report (events lost) starts with `# ` comment lines saying so, which flame-graph tools skip.

use std::{
    collections::BTreeMap,
    io::{self, Write},
};

use super::{ProcessReport, Report, SiteReport};
use crate::{analysis::SiteVerdict, cli::Weight};

/// What a report with lost events says about its numbers, in every format.
pub const PARTIAL: &str = "PARTIAL RESULT: events were lost; the numbers are lower bounds";

/// Appended to the allocating frame of a leaking site.
pub const LEAK_MARK: &str = " [leak]";

/// Writes one folded line per distinct stack, after the partial-result comments if any.
pub fn write(report: &Report, weight: Weight, out: &mut dyn Write) -> io::Result<()> {
    if report.partial {
        writeln!(out, "# {PARTIAL}")?;
        for warning in &report.warnings {
            writeln!(out, "# warning: {}", warning.replace(['\n', '\r'], " "))?;
        }
    }
    for (stack, value) in stacks(report, weight) {
        writeln!(out, "{stack} {value}")?;
    }
    Ok(())
}

/// Every non-zero stack with its value, identical stacks summed, sorted by stack.
pub fn stacks(report: &Report, weight: Weight) -> BTreeMap<String, u64> {
    let mut out: BTreeMap<String, u64> = BTreeMap::new();
    for p in &report.processes {
        for site in &p.sites {
            let value = value(site, weight);
            if value > 0 {
                *out.entry(stack(p, site)).or_default() += value;
            }
        }
    }
    out
}

/// What a site weighs under `weight`.
pub fn value(site: &SiteReport, weight: Weight) -> u64 {
    match weight {
        Weight::Live => site.live_bytes,
        Weight::Allocated => site.total_bytes,
        Weight::Count => site.live_allocations,
    }
}

/// The unit of a value under `weight`, for titles.
pub fn unit(weight: Weight) -> &'static str {
    match weight {
        Weight::Live | Weight::Allocated => "bytes",
        Weight::Count => "allocations",
    }
}

/// `comm (pid N);outermost;…;innermost[ [leak]]`.
fn stack(p: &ProcessReport, site: &SiteReport) -> String {
    let mut frames = vec![clean(&format!("{} (pid {})", p.comm, p.pid))];
    if site.stack_truncated {
        frames.push("[stack truncated]".to_owned());
    }
    if site.frames.is_empty() {
        frames.push("[unknown stack]".to_owned());
    }
    frames.extend(site.frames.iter().rev().map(|f| clean(&f.function)));
    if site.assessment.verdict == SiteVerdict::Leak
        && let Some(leaf) = frames.last_mut()
    {
        leaf.push_str(LEAK_MARK);
    }
    frames.join(";")
}

/// A frame name that cannot break the format: `;` separates frames, a line is one stack.
fn clean(name: &str) -> String {
    name.replace(';', ",").replace(['\n', '\r'], " ")
}
