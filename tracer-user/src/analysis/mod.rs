//! Verdicts over the model: is a site leaking, holding steady, or only making temporaries;
//! is a process leaking, fragmented, or stable. Pure: it reads the model and never mutates it.
//!
//! Every verdict carries the evidence it rests on, and a young allocation is never a leak on
//! its own: a leak needs live blocks that are old *and* new from the same site, i.e. a site
//! whose allocations keep piling up across the whole observed window.

use serde::Serialize;

use crate::model::{Model, Process, Site};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SiteVerdict {
    /// Live blocks born across the whole window, never freed: piling up.
    Leak,
    /// Live blocks, but the site stopped adding to them (warm-up, caches, statics).
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
    /// Age of the oldest live block at the end of the window, seconds.
    pub oldest_live_age_s: Option<f64>,
    /// Age of the newest live block at the end of the window, seconds.
    pub newest_live_age_s: Option<f64>,
    pub evidence: String,
}

/// The observation window of one process, `CLOCK_MONOTONIC` ns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start_ns: u64,
    pub end_ns: u64,
}

impl Window {
    fn span(&self) -> u64 {
        self.end_ns.saturating_sub(self.start_ns)
    }

    fn fraction(&self, ts: u64) -> f64 {
        let span = self.span();
        if span == 0 {
            1.0
        } else {
            ts.saturating_sub(self.start_ns) as f64 / span as f64
        }
    }
}

/// Birth times of each site's live blocks, indexed like `process.sites`.
pub fn live_births(model: &Model, process: &Process) -> Vec<Vec<u64>> {
    let mut births = vec![Vec::new(); process.sites.len()];
    for (_, block) in model.live_blocks(process.tgid) {
        births[block.site as usize].push(block.born_ns);
    }
    births
}

/// Oldest live block born in the first half of the window, newest in its last quarter.
const OLD_BEFORE: f64 = 0.5;
const NEW_AFTER: f64 = 0.75;

pub fn assess_site(site: &Site, births: &[u64], window: Window) -> SiteAssessment {
    let (Some(&oldest), Some(&newest)) = (births.iter().min(), births.iter().max()) else {
        return SiteAssessment {
            verdict: SiteVerdict::Temporary,
            oldest_live_age_s: None,
            newest_live_age_s: None,
            evidence: format!("all {} allocations freed", site.total_allocations),
        };
    };
    let age = |ts: u64| window.end_ns.saturating_sub(ts) as f64 / 1e9;
    let spread = window.fraction(oldest) <= OLD_BEFORE && window.fraction(newest) >= NEW_AFTER;
    let verdict = if births.len() >= 2 && spread {
        SiteVerdict::Leak
    } else {
        SiteVerdict::Stable
    };
    let evidence = match verdict {
        SiteVerdict::Leak => format!(
            "{} live allocations never freed, born across the whole trace (oldest {:.1}s old, newest {:.1}s)",
            births.len(),
            age(oldest),
            age(newest)
        ),
        _ => format!(
            "{} live allocations, none added after the first {:.0}% of the trace (newest {:.1}s old)",
            births.len(),
            (window.fraction(newest) * 100.0).ceil(),
            age(newest)
        ),
    };
    SiteAssessment {
        verdict,
        oldest_live_age_s: Some(age(oldest)),
        newest_live_age_s: Some(age(newest)),
        evidence,
    }
}

/// The process verdict from its sites and its footprint (anon RSS), when known.
pub fn assess_process(
    process: &Process,
    sites: &[SiteAssessment],
    footprint_bytes: Option<u64>,
) -> (ProcessVerdict, String) {
    let leaking: Vec<usize> = sites
        .iter()
        .enumerate()
        .filter(|(_, s)| s.verdict == SiteVerdict::Leak)
        .map(|(i, _)| i)
        .collect();
    if !leaking.is_empty() {
        let bytes: u64 = leaking.iter().map(|&i| process.sites[i].live_bytes).sum();
        return (
            ProcessVerdict::Leak,
            format!(
                "{} site(s) keep adding live allocations: {} bytes live from them",
                leaking.len(),
                bytes
            ),
        );
    }
    if let Some(footprint) = footprint_bytes {
        let retained = footprint.saturating_sub(process.live_bytes);
        if retained >= 64 << 20 && footprint >= 4 * process.live_bytes {
            return (
                ProcessVerdict::Fragmentation,
                format!(
                    "footprint {footprint} bytes but only {} live: {retained} bytes retained by the allocator \
                     (hint: try MALLOC_TRIM_THRESHOLD_ / MALLOC_ARENA_MAX, or malloc_trim(0))",
                    process.live_bytes
                ),
            );
        }
    }
    (
        ProcessVerdict::Stable,
        format!("no site keeps growing; {} bytes live", process.live_bytes),
    )
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

/// Convenience for tests and reports: the window of a process ending at `end_ns`.
pub fn window_of(process: &Process, end_ns: u64) -> Window {
    Window {
        start_ns: process.first_ns,
        end_ns: end_ns.max(process.last_ns),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Event, Op, StackId};

    fn model_with(births_and_frees: &[(u64, Option<u64>)]) -> Model {
        let mut m = Model::default();
        for (i, (born, _)) in births_and_frees.iter().enumerate() {
            m.apply(&Event {
                tgid: 1,
                ts_ns: *born,
                start_ns: *born,
                op: Op::Alloc {
                    addr: 0x1000 + i as u64 * 16,
                    size: 16,
                    stack: StackId(0),
                },
            });
        }
        let mut frees: Vec<(u64, u64)> = births_and_frees
            .iter()
            .enumerate()
            .filter_map(|(i, (_, f))| f.map(|t| (t, 0x1000 + i as u64 * 16)))
            .collect();
        frees.sort_unstable();
        for (t, addr) in frees {
            m.apply(&Event {
                tgid: 1,
                ts_ns: t,
                start_ns: t,
                op: Op::Free { addr },
            });
        }
        m
    }

    fn verdict(m: &Model, end: u64) -> SiteVerdict {
        let p = m.process(1).expect("seen");
        assess_sites(m, p, window_of(p, end))[0].verdict
    }

    #[test]
    fn steady_pile_up_is_a_leak() {
        let m = model_with(&[(0, None), (300, None), (600, None), (900, None)]);
        assert_eq!(verdict(&m, 1000), SiteVerdict::Leak);
    }

    #[test]
    fn early_only_growth_is_stable() {
        let m = model_with(&[(0, None), (100, None), (200, None), (900, Some(950))]);
        assert_eq!(verdict(&m, 1000), SiteVerdict::Stable);
    }

    #[test]
    fn everything_freed_is_temporary() {
        let m = model_with(&[(0, Some(10)), (500, Some(510))]);
        assert_eq!(verdict(&m, 1000), SiteVerdict::Temporary);
    }

    #[test]
    fn one_young_allocation_is_never_a_leak() {
        let m = model_with(&[(990, None)]);
        assert_eq!(verdict(&m, 1000), SiteVerdict::Stable);
    }
}
