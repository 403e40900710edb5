//! Verdicts over the model: is a site leaking, holding steady, or only making temporaries; is
//! a process leaking, fragmented, or stable. Pure: it reads the model and never mutates it.
//!
//! Every verdict carries the numbers it rests on. A leak needs growth over the whole run — a
//! good linear fit of the site's live bytes, still rising in the last third — *and* old
//! allocations that were never freed; a young allocation alone is never a leak.
//! Fragmentation needs a footprint well above live bytes while live bytes are not growing.

pub mod growth;

use serde::Serialize;

pub use growth::Growth;

use crate::model::{Model, Process, Site, SiteKind};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SiteVerdict {
    /// Live memory growing across the whole window from allocations never freed.
    Leak,
    /// Live memory, but not growing (warm-up, caches, pools, one-time statics).
    Stable,
    /// Everything it allocated was freed.
    Temporary,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessVerdict {
    Leak,
    Fragmentation,
    Stable,
}

/// A site's verdict and the facts behind it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SiteAssessment {
    pub verdict: SiteVerdict,
    /// Linear fit of the site's live bytes over the window, when there are enough samples.
    pub growth: Option<Growth>,
    /// A site that allocated only at start-up and never freed (e.g. `Box::leak`).
    pub one_time: bool,
    /// Age of the oldest and newest live allocation at the end of the window, seconds.
    pub oldest_live_age_s: Option<f64>,
    pub newest_live_age_s: Option<f64>,
    /// Median and 99th-percentile lifetime of freed allocations, seconds.
    pub lifetime_p50_s: Option<f64>,
    pub lifetime_p99_s: Option<f64>,
    pub evidence: String,
}

/// The observation window of one process, `CLOCK_MONOTONIC` ns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start_ns: u64,
    pub end_ns: u64,
}

impl Window {
    fn span_s(&self) -> f64 {
        self.end_ns.saturating_sub(self.start_ns) as f64 / 1e9
    }

    /// Where `ts` falls in the window, 0 (start) to 1 (end).
    fn fraction(&self, ts: u64) -> f64 {
        let span = self.end_ns.saturating_sub(self.start_ns);
        if span == 0 {
            1.0
        } else {
            ts.saturating_sub(self.start_ns) as f64 / span as f64
        }
    }

    fn age_s(&self, ts: u64) -> f64 {
        self.end_ns.saturating_sub(ts) as f64 / 1e9
    }
}

/// The window of a process ending at `end_ns`.
pub fn window_of(process: &Process, end_ns: u64) -> Window {
    Window {
        start_ns: process.first_ns,
        end_ns: end_ns.max(process.last_ns),
    }
}

/// A leak's oldest live allocation is from the first half of the window.
const OLD_BEFORE: f64 = 0.5;
/// A leak's newest live allocation is from the last quarter.
const NEW_AFTER: f64 = 0.75;
/// Fit quality a steady leak reaches.
const MIN_FIT: f64 = 0.8;
/// In the last third, a leak still grows at least this fraction of its overall rate.
const STILL_GROWING: f64 = 0.25;
/// One-time allocations all happen in this first fraction of the window.
const START_UP: f64 = 0.1;

/// Birth times of each site's live allocations, indexed like `process.sites`.
pub fn live_births(model: &Model, process: &Process) -> Vec<Vec<u64>> {
    let mut births = vec![Vec::new(); process.sites.len()];
    for (_, block) in model.live_blocks(process.tgid) {
        births[block.site() as usize].push(block.born_ns);
    }
    for (_, region) in process.regions.iter() {
        if let crate::model::Owner::Program(site) = region.owner {
            births[site as usize].push(region.born_ns);
        }
    }
    births
}

pub fn assess_site(site: &Site, births: &[u64], window: Window) -> SiteAssessment {
    let (p50, p99) = site.lifetimes.as_ref().map_or((None, None), |h| {
        (
            Some(h.value_at_quantile(0.5) as f64 / 1e6),
            Some(h.value_at_quantile(0.99) as f64 / 1e6),
        )
    });
    // `300 live allocations`, `1 mapping`: the count, an adjective, the noun in its number.
    let what = |n: usize, adjective: &str| {
        let noun = match site.kind {
            SiteKind::Heap => "allocation",
            SiteKind::Mmap => "mapping",
        };
        count(
            n,
            &format!("{adjective}{noun}"),
            &format!("{adjective}{noun}s"),
        )
    };
    let (Some(&oldest), Some(&newest)) = (births.iter().min(), births.iter().max()) else {
        return SiteAssessment {
            verdict: SiteVerdict::Temporary,
            growth: None,
            one_time: false,
            oldest_live_age_s: None,
            newest_live_age_s: None,
            lifetime_p50_s: p50,
            lifetime_p99_s: p99,
            evidence: format!(
                "all {} freed{}",
                what(site.total_allocations as usize, ""),
                p50.map(|s| format!(", median lifetime {}", seconds(s)))
                    .unwrap_or_default()
            ),
        };
    };
    let mut points: Vec<(u64, u64)> = site.series.points().to_vec();
    if points.last().is_none_or(|&(t, _)| t < window.end_ns) {
        points.push((window.end_ns, site.live_bytes));
    }
    let growth = growth::fit(&points);
    // Old memory never freed: the oldest live allocation is from the first half.
    let old_kept = window.fraction(oldest) <= OLD_BEFORE;
    let one_time = site.frees == 0
        && site.total_allocations == site.live_allocations
        && window.fraction(newest) <= START_UP;
    let leak = !one_time
        && old_kept
        && match &growth {
            Some(g) => {
                g.bytes_per_s > 0.0
                    && g.fit >= MIN_FIT
                    && g.last_third_bytes_per_s >= STILL_GROWING * g.bytes_per_s
            }
            // Too few samples to fit (a very short trace): the births alone must show
            // allocations piling up from the start to the end.
            None => births.len() >= 2 && window.fraction(newest) >= NEW_AFTER,
        };
    let verdict = if leak {
        SiteVerdict::Leak
    } else {
        SiteVerdict::Stable
    };
    let evidence = match verdict {
        SiteVerdict::Leak => {
            let rate = growth.as_ref().map_or_else(String::new, |g| {
                format!(
                    "{} over {}, {:.2} fit, ",
                    rate(g.bytes_per_s),
                    seconds(g.span_s),
                    g.fit
                )
            });
            format!(
                "{rate}{} never freed, oldest from the first {}",
                what(births.len(), "live "),
                seconds((window.fraction(oldest) * window.span_s()).max(0.001))
            )
        }
        _ if one_time => format!(
            "one-time: {} made at start-up ({} in), never freed, never repeated",
            what(births.len(), ""),
            seconds(window.fraction(newest) * window.span_s())
        ),
        _ => {
            let flat = growth.as_ref().map_or_else(String::new, |g| {
                format!(", {} in the last third", rate(g.last_third_bytes_per_s))
            });
            format!(
                "{}, not growing{flat}; newest {} old, {} freed",
                what(births.len(), "live "),
                seconds(window.age_s(newest)),
                site.frees
            )
        }
    };
    SiteAssessment {
        verdict,
        growth,
        one_time,
        oldest_live_age_s: Some(window.age_s(oldest)),
        newest_live_age_s: Some(window.age_s(newest)),
        lifetime_p50_s: p50,
        lifetime_p99_s: p99,
        evidence,
    }
}

/// Verdicts of every site of one process, indexed like `process.sites`.
pub fn assess_sites(model: &Model, process: &Process, window: Window) -> Vec<SiteAssessment> {
    let births = live_births(model, process);
    process
        .sites
        .iter()
        .zip(&births)
        .map(|(site, b)| assess_site(site, b, window))
        .collect()
}

/// Retained memory that makes a process fragmented: at least this much…
const FRAGMENTED_BYTES: u64 = 16 << 20;
/// …and at least this share of its footprint.
const FRAGMENTED_SHARE: f64 = 0.5;

/// The process verdict and its evidence. `footprint_bytes` is the last measured footprint.
pub fn assess_process(
    process: &Process,
    sites: &[SiteAssessment],
    footprint_bytes: Option<u64>,
    window: Window,
) -> (ProcessVerdict, String) {
    let mut leaking: Vec<usize> = (0..sites.len())
        .filter(|&i| sites[i].verdict == SiteVerdict::Leak)
        .collect();
    if !leaking.is_empty() {
        leaking.sort_by(|&a, &b| {
            let rate = |i: usize| sites[i].growth.as_ref().map_or(0.0, |g| g.bytes_per_s);
            rate(b).total_cmp(&rate(a))
        });
        let bytes: u64 = leaking.iter().map(|&i| process.sites[i].live_bytes).sum();
        let total_rate: f64 = leaking
            .iter()
            .filter_map(|&i| sites[i].growth.as_ref())
            .map(|g| g.bytes_per_s)
            .sum();
        return (
            ProcessVerdict::Leak,
            format!(
                "{} ({} live from {}{}); first: {}",
                count(leaking.len(), "site keeps growing", "sites keep growing"),
                bytes_text(bytes),
                if leaking.len() == 1 { "it" } else { "them" },
                if total_rate > 0.0 {
                    format!(", {}", rate(total_rate))
                } else {
                    String::new()
                },
                sites[leaking[0]].evidence
            ),
        );
    }
    let live = process.live_bytes;
    let series: Vec<(u64, u64)> = process
        .series
        .points()
        .iter()
        .map(|&(t, s)| (t, s.live_bytes))
        .collect();
    let live_growth = growth::fit(&series);
    if let Some(footprint) = footprint_bytes {
        let retained = footprint.saturating_sub(live);
        let not_growing = live_growth.as_ref().is_none_or(|g| {
            g.last_third_bytes_per_s * window.span_s() / 3.0 <= (retained / 10) as f64
        });
        if retained >= FRAGMENTED_BYTES
            && retained as f64 >= FRAGMENTED_SHARE * footprint as f64
            && not_growing
        {
            return (
                ProcessVerdict::Fragmentation,
                format!(
                    "live {} but footprint {}: {} ({:.0}%) freed by the program and retained by \
                     the allocator (glibc heap and arenas). Hint: try MALLOC_TRIM_THRESHOLD_ / \
                     MALLOC_TOP_PAD_ (or malloc_trim(0) after big frees), MALLOC_ARENA_MAX=2 for \
                     many threads, or an allocator that returns memory (jemalloc, mimalloc)",
                    bytes_text(live),
                    bytes_text(footprint),
                    bytes_text(retained),
                    retained as f64 * 100.0 / footprint.max(1) as f64
                ),
            );
        }
    }
    let plateau = live_growth.as_ref().map_or_else(String::new, |g| {
        format!(", {} in the last third", rate(g.last_third_bytes_per_s))
    });
    let retained = footprint_bytes.map_or_else(String::new, |f| {
        format!(
            "; footprint {} ({} retained by the allocator)",
            bytes_text(f),
            bytes_text(f.saturating_sub(live))
        )
    });
    (
        ProcessVerdict::Stable,
        format!(
            "no site keeps growing: live {} (peak {}){plateau}{retained}",
            bytes_text(live),
            bytes_text(process.peak_live_bytes)
        ),
    )
}

/// `1 allocation`, `2 allocations`: a count with the noun in the right number.
pub fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `12.3 KiB/s`-style rate, per minute when slow.
pub fn rate(bytes_per_s: f64) -> String {
    if bytes_per_s.abs() < 1024.0 {
        format!("{}/min", bytes_text_signed(bytes_per_s * 60.0))
    } else {
        format!("{}/s", bytes_text_signed(bytes_per_s))
    }
}

fn bytes_text_signed(v: f64) -> String {
    let sign = if v < 0.0 { "-" } else { "+" };
    format!("{sign}{}", bytes_text(v.abs() as u64))
}

/// Bytes in binary units with three significant digits (`64 B`, `1.50 KiB`, `10.0 MiB`).
pub fn bytes_text(n: u64) -> String {
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

/// `40 µs`, `850 ms`, `12.0 s`, `3.5 min`.
pub fn seconds(s: f64) -> String {
    if s < 0.001 {
        format!("{:.0} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else if s < 120.0 {
        format!("{s:.1} s")
    } else {
        format!("{:.1} min", s / 60.0)
    }
}

#[cfg(test)]
mod tests;
