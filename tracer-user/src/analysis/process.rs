//! A process's verdict — leak, fragmentation or stable — from its sites' verdicts, its own
//! live bytes and its footprint, or no verdict at all when the evidence cannot support one.
//!
//! A process leaks only when its own live bytes grow with its leaking sites (sites that only
//! take over from others are turnover). Memory is "retained by the allocator" only where
//! that is known: after an attach, the footprint also holds memory allocated before the
//! attach, which may be live or free, and saying which needs the allocator's own accounting
//! or retention that grew while the trace watched.

use std::borrow::Cow;

use serde::Serialize;

use super::{
    Window, growth,
    site::{self, Shape, SiteAssessment, SiteVerdict, SiteView},
    teardown::{self, Teardown},
    turnover,
    units::{bytes_estimate, bytes_text, rate, seconds},
};
use crate::model::{Process, Site, SiteIdx, SiteKind};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessVerdict {
    Leak,
    Fragmentation,
    Stable,
}

/// What the session knows of a process beyond its events.
#[derive(Clone, Debug, Default)]
pub struct Context {
    /// When the process's window ends: its exit, or the end of tracing.
    pub end_ns: u64,
    /// It exited during the trace (its last moments may be a teardown).
    pub exited: bool,
    /// Tracing began after the process did: memory it held then is unseen.
    pub attached: bool,
    /// Its footprint at the last measurement.
    pub footprint_bytes: Option<u64>,
    /// Free memory the allocator holds by its own accounting, read from the process.
    pub allocator_free: Option<AllocatorFree>,
    /// Why no verdict can be given (e.g. no allocator alloctrace can probe).
    pub withheld: Option<String>,
}

/// Free memory inside the allocator, as the allocator itself accounts for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AllocatorFree {
    pub bytes: u64,
    /// Where it was read (e.g. "glibc's arenas").
    pub source: String,
}

/// The process verdict, every site's, and the facts behind them.
#[derive(Clone, Debug)]
pub struct ProcessAssessment<'p> {
    /// `None` when withheld (see `evidence`).
    pub verdict: Option<ProcessVerdict>,
    pub evidence: String,
    /// One per site as the user sees it (a group of model sites), in group order.
    pub sites: Vec<SiteAssessment>,
    /// Each group's members merged into one site, in the same order (a group of one is its
    /// model site itself: copying every site doubled a big report's peak memory).
    pub merged: Vec<Cow<'p, Site>>,
    pub teardown: Option<Teardown>,
    /// Footprint no traced event accounts for (after an attach): live or free, unknown.
    pub pre_attach_bytes: Option<u64>,
    /// Footprint known to be memory the program freed and the allocator kept.
    pub retained_bytes: Option<u64>,
    /// Things that look wrong in the numbers themselves.
    pub notes: Vec<String>,
}

/// Retained memory that makes a process fragmented: at least this much…
const FRAGMENTED_BYTES: u64 = 16 << 20;
/// …and at least this share of its footprint.
const FRAGMENTED_SHARE: f64 = 0.5;
/// A process leaks when its live bytes rose at least this share of what its leaking sites
/// rose.
const CONSISTENT: f64 = 0.25;

/// Every site of `process` on its own: the groups [`assess`] takes when no two stacks are
/// one site.
pub fn singletons(process: &Process) -> Vec<Vec<SiteIdx>> {
    (0..process.sites.len() as SiteIdx)
        .map(|i| vec![i])
        .collect()
}

/// Judges `process`, whose sites as the user sees them are `groups` of its model sites
/// (stacks that symbolize the same are one site): each group is one site, its members'
/// counts, series and live allocations together.
pub fn assess<'p>(
    process: &'p Process,
    groups: &[Vec<SiteIdx>],
    ctx: &Context,
) -> ProcessAssessment<'p> {
    let window = Window {
        start_ns: process.first_ns,
        end_ns: ctx.end_ns.max(process.last_ns),
    };
    let series = live_series(process);
    let teardown = ctx
        .exited
        .then(|| teardown::detect(&series, (window.end_ns, process.live_bytes), window))
        .flatten();
    let view = Window {
        start_ns: window.start_ns,
        end_ns: teardown.map_or(window.end_ns, |t| t.start_ns),
    };
    let merged: Vec<Cow<'p, Site>> = groups
        .iter()
        .filter_map(|members| match members.as_slice() {
            &[only] => Some(Cow::Borrowed(&process.sites[only as usize])),
            _ => Site::merged(members.iter().map(|&i| &process.sites[i as usize])).map(Cow::Owned),
        })
        .collect();
    let instants = process.sample_instants();
    let views = site_views(
        process,
        (groups, &merged),
        &instants,
        teardown.map(|t| t.start_ns),
        window.end_ns,
    );
    let (mut sites, shapes): (Vec<SiteAssessment>, Vec<Shape>) =
        views.iter().map(|v| site::assess_site(v, view)).unzip();
    // The model counts only what it saw: live bytes start at zero with the window.
    let mut points: Vec<(u64, u64)> = std::iter::once((window.start_ns, 0))
        .chain(series.iter().copied().filter(|&(t, _)| t <= view.end_ns))
        .collect();
    if teardown.is_none() {
        points.push((view.end_ns, process.live_bytes));
    }
    let ticks: Vec<u64> = points.iter().map(|&(t, _)| t).collect();
    let process_rise = rise(&points);
    companions(&views, &mut sites, &shapes, view);
    // Every site's level at every tick (python: 10 000 sites × 170 ticks, 13 MB) is read
    // only for leaks: how much they rose, and whether others' decline explains it.
    let levels = if sites.iter().any(|s| s.verdict == SiteVerdict::Leak) {
        turnover::resample(&views, &ticks)
    } else {
        Vec::new()
    };
    turnover::resolve(&mut sites, &levels, process_rise);
    if let Some(t) = teardown {
        mark_released(&mut sites, &views, t);
    }
    drop(views);
    let mut a = ProcessAssessment {
        verdict: None,
        evidence: String::new(),
        sites,
        merged,
        teardown,
        pre_attach_bytes: None,
        retained_bytes: None,
        notes: notes(process, ctx),
    };
    if let Some(why) = &ctx.withheld {
        a.evidence = why.clone();
        return a;
    }
    let parts = ctx.footprint_bytes.map(|f| Parts::of(process, ctx, f));
    if let Some(parts) = &parts {
        a.retained_bytes = Some(parts.retained);
        a.pre_attach_bytes = ctx.attached.then_some(parts.unattributed);
    }
    let site_rise: f64 = (0..a.sites.len())
        .filter(|&s| a.sites[s].verdict == SiteVerdict::Leak)
        .map(|s| {
            levels[s].last().copied().unwrap_or(0.0) - levels[s].first().copied().unwrap_or(0.0)
        })
        .sum();
    if site_rise > 0.0 && process_rise >= CONSISTENT * site_rise {
        a.verdict = Some(ProcessVerdict::Leak);
        a.evidence = leak_evidence(&a.merged, &a.sites, teardown);
        return a;
    }
    offset_leaks(&mut a.sites, process_rise);
    footprint_verdict(&mut a, process, parts.as_ref(), &points, view);
    a
}

/// `(ns, live bytes)` samples of the process.
fn live_series(process: &Process) -> Vec<(u64, u64)> {
    process
        .series
        .points()
        .iter()
        .map(|&(t, s)| (t, s.live_bytes))
        .collect()
}

/// What the live bytes rose over `points`: the fitted line's rise, or end minus start when
/// there are too few points to fit.
fn rise(points: &[(u64, u64)]) -> f64 {
    match growth::fit(points) {
        Some(g) => g.bytes_per_s * g.span_s,
        None => match (points.first(), points.last()) {
            (Some(a), Some(b)) => b.1 as f64 - a.1 as f64,
            _ => 0.0,
        },
    }
}

/// Each site (a group of model sites, merged) as seen up to `cut_ns` (before a teardown:
/// its samples until then), or as it stands at `end_ns` with the births of its live
/// allocations.
fn site_views<'m>(
    process: &Process,
    (groups, merged): (&[Vec<SiteIdx>], &'m [Cow<'_, Site>]),
    instants: &'m [u64],
    cut_ns: Option<u64>,
    end_ns: u64,
) -> Vec<SiteView<'m>> {
    let births = live_births(process);
    groups
        .iter()
        .zip(merged)
        .map(|(members, site)| {
            let site: &'m Site = site;
            // A site born after the cut (in the teardown itself) is seen as it stands.
            let cut_ns = cut_ns.filter(|&cut| site.first_ns <= cut);
            let births = cut_ns.is_none().then(|| {
                members
                    .iter()
                    .flat_map(|&i| births[i as usize].iter().copied())
                    .collect()
            });
            SiteView::new(site, instants, (cut_ns, end_ns), births)
        })
        .collect()
}

/// Birth times of each site's live allocations, indexed like `process.sites`.
pub fn live_births(process: &Process) -> Vec<Vec<u64>> {
    let mut births = vec![Vec::new(); process.sites.len()];
    for (_, block) in process.blocks() {
        births[block.site() as usize].push(block.born_ns);
    }
    for (_, region) in process.regions.iter() {
        if let crate::model::Owner::Program(site) = region.owner {
            births[site as usize].push(region.born_ns);
        }
    }
    births
}

/// A block grown by realloc in a step or two (a buffer doubled) is growth beside a site that
/// leaks steadily: the buffer holding the leaked records grows with them. (A site that
/// gained blocks in a step or two is not: that is as likely a late warm-up.)
fn companions(views: &[SiteView<'_>], sites: &mut [SiteAssessment], shapes: &[Shape], w: Window) {
    let steady_leak = sites.iter().zip(shapes).any(|(a, s)| {
        a.verdict == SiteVerdict::Leak
            && matches!(s, Shape::Linear | Shape::Stepped { linear: true, .. })
    });
    if !steady_leak {
        return;
    }
    for ((a, shape), view) in sites.iter_mut().zip(shapes).zip(views) {
        let by_realloc = matches!(
            shape,
            Shape::Stepped {
                by_realloc: true,
                ..
            }
        );
        if a.verdict != SiteVerdict::Leak && by_realloc {
            site::call_leak(a, view, w);
        }
    }
}

/// Leaking sites whose growth the process's own live bytes do not show (other sites shrank
/// as much) are not a leak of the process.
fn offset_leaks(sites: &mut [SiteAssessment], process_rise: f64) {
    for a in sites.iter_mut().filter(|a| a.verdict == SiteVerdict::Leak) {
        a.verdict = SiteVerdict::Stable;
        let g = a.growth.as_ref().map_or(0.0, |g| g.bytes_per_s);
        a.evidence = format!(
            "grows {} but the process's live bytes do not ({} over the trace): other sites \
             shrink as much; {}",
            rate(g),
            super::units::bytes_text_signed(process_rise),
            a.evidence
        );
    }
}

/// Marks leaking sites whose memory the teardown released.
fn mark_released(sites: &mut [SiteAssessment], views: &[SiteView<'_>], t: Teardown) {
    let ms = (t.exit_ns.saturating_sub(t.start_ns) as f64 / 1e6).max(1.0);
    for (a, view) in sites.iter_mut().zip(views) {
        let site = view.site;
        let before = view.points.last().map_or(0, |&(_, pt)| pt.live_bytes);
        a.pre_teardown_live_bytes = Some(before);
        if a.verdict == SiteVerdict::Leak && site.live_bytes < before {
            a.released_at_exit = true;
            a.evidence.push_str(&format!(
                "; released only at exit ({} freed in the last {ms:.0} ms before the process \
                 exited)",
                bytes_text(before - site.live_bytes)
            ));
        }
    }
}

fn leak_evidence(
    merged: &[Cow<'_, Site>],
    sites: &[SiteAssessment],
    teardown: Option<Teardown>,
) -> String {
    let mut leaking: Vec<usize> = (0..sites.len())
        .filter(|&i| sites[i].verdict == SiteVerdict::Leak)
        .collect();
    let rate_of = |i: usize| sites[i].growth.as_ref().map_or(0.0, |g| g.bytes_per_s);
    leaking.sort_by(|&a, &b| rate_of(b).total_cmp(&rate_of(a)));
    let bytes: u64 = leaking
        .iter()
        .map(|&i| {
            sites[i]
                .pre_teardown_live_bytes
                .unwrap_or(merged[i].live_bytes)
        })
        .sum();
    let total_rate: f64 = leaking.iter().map(|&i| rate_of(i).max(0.0)).sum();
    let released = teardown.map_or_else(String::new, |t| {
        format!(
            "; live bytes grew to {} and were released only at exit",
            bytes_text(t.live_before)
        )
    });
    format!(
        "{} ({} live from {}{}){released}; first: {}",
        if leaking.len() == 1 {
            "1 site keeps growing".to_owned()
        } else {
            format!("{} sites keep growing", leaking.len())
        },
        bytes_text(bytes),
        if leaking.len() == 1 { "it" } else { "them" },
        if total_rate > 0.0 {
            format!(", {}", rate(total_rate))
        } else {
            String::new()
        },
        sites[leaking[0]].evidence
    )
}

/// Fragmentation or stable, from the footprint and what is known of its parts.
fn footprint_verdict(
    a: &mut ProcessAssessment,
    p: &Process,
    parts: Option<&Parts>,
    points: &[(u64, u64)],
    view: Window,
) {
    let live = p.live_bytes;
    let live_text = bytes_estimate(live, p.spread.live_bytes);
    let quiet = if p.total_allocations == 0 && p.frees == 0 && p.unknown_frees == 0 {
        format!("no allocation activity seen in {}", seconds(view.span_s()))
    } else {
        String::new()
    };
    a.verdict = Some(ProcessVerdict::Stable);
    let Some(parts) = parts else {
        a.evidence = if quiet.is_empty() {
            format!(
                "no site keeps growing: live {live_text} (peak {}); footprint unknown",
                bytes_estimate(p.peak_live_bytes, p.peak_var_bytes)
            )
        } else {
            format!("{quiet}; footprint unknown")
        };
        return;
    };
    let footprint = parts.footprint;
    let live_growth = growth::fit(points);
    let not_growing = live_growth.as_ref().is_none_or(|g| {
        g.last_third_bytes_per_s * view.span_s() / 3.0 <= (parts.retained / 10) as f64
    });
    if parts.retained >= FRAGMENTED_BYTES
        && parts.retained as f64 >= FRAGMENTED_SHARE * footprint as f64
        && not_growing
    {
        a.verdict = Some(ProcessVerdict::Fragmentation);
        let quiet = if quiet.is_empty() {
            quiet
        } else {
            quiet + ", yet "
        };
        a.evidence = format!(
            "{quiet}live {live_text} but footprint {}: {} ({:.0}%) {}. Hint: try \
             MALLOC_TRIM_THRESHOLD_ / MALLOC_TOP_PAD_ (or malloc_trim(0) after big frees), \
             MALLOC_ARENA_MAX=2 for many threads, or an allocator that returns memory \
             (jemalloc, mimalloc)",
            bytes_text(footprint),
            bytes_text(parts.retained),
            parts.retained as f64 * 100.0 / footprint.max(1) as f64,
            parts.how
        );
        return;
    }
    if !quiet.is_empty() {
        a.evidence = format!(
            "{quiet}; footprint {}{}",
            bytes_text(footprint),
            parts.describe()
        );
        return;
    }
    let plateau = live_growth.as_ref().map_or_else(String::new, |g| {
        format!(", {} in the last third", rate(g.last_third_bytes_per_s))
    });
    a.evidence = format!(
        "{quiet}no site keeps growing: live {live_text} (peak {}){plateau}; footprint {}{}",
        bytes_estimate(p.peak_live_bytes, p.peak_var_bytes),
        bytes_text(footprint),
        parts.describe()
    );
}

/// The footprint's parts beyond live bytes, as far as they are known.
struct Parts {
    footprint: u64,
    /// Known to be freed by the program and kept by the allocator.
    retained: u64,
    /// Present since before the attach, live or free: unknown.
    unattributed: u64,
    /// How `retained` is known.
    how: String,
    allocator_free: Option<AllocatorFree>,
}

impl Parts {
    fn of(p: &Process, ctx: &Context, footprint: u64) -> Self {
        let beyond_live = footprint.saturating_sub(p.live_bytes);
        if !ctx.attached {
            return Self {
                footprint,
                retained: beyond_live,
                unattributed: 0,
                how: "freed by the program and retained by the allocator".into(),
                allocator_free: ctx.allocator_free.clone(),
            };
        }
        if let Some(free) = &ctx.allocator_free {
            return Self {
                footprint,
                retained: free.bytes.min(beyond_live),
                unattributed: beyond_live.saturating_sub(free.bytes),
                how: format!(
                    "free inside the allocator by its own accounting ({}, read from the \
                     process)",
                    free.source
                ),
                allocator_free: Some(free.clone()),
            };
        }
        let grown = retention_grown(p).min(beyond_live);
        Self {
            footprint,
            retained: grown,
            unattributed: beyond_live - grown,
            how: "retention that grew during the trace while live bytes did not: freed by \
                  the program and kept by the allocator"
                .into(),
            allocator_free: None,
        }
    }

    fn describe(&self) -> String {
        let mut out = String::new();
        if let Some(free) = &self.allocator_free {
            out.push_str(&format!(
                ", {} free in {}",
                bytes_text(free.bytes),
                free.source
            ));
        }
        if self.unattributed > 0 && self.allocator_free.is_some() {
            out.push_str(&format!(
                ", {} allocated before the attach and still in use (unseen: it predates the \
                 trace)",
                bytes_text(self.unattributed)
            ));
        } else if self.unattributed > 0 {
            out.push_str(&format!(
                ", {} of heap predates the attach: live or free, unknown",
                bytes_text(self.unattributed)
            ));
        } else if self.allocator_free.is_none() && self.retained > 0 {
            out.push_str(&format!(
                " ({} retained by the allocator)",
                bytes_text(self.retained)
            ));
        }
        out
    }
}

/// How much more the footprint grew than live bytes did while the trace watched: memory
/// the allocator took for blocks since freed and kept.
fn retention_grown(p: &Process) -> u64 {
    let measured: Vec<(u64, u64)> = p
        .series
        .points()
        .iter()
        .filter_map(|&(_, s)| Some((s.live_bytes, s.footprint_bytes?)))
        .collect();
    match (measured.first(), measured.last()) {
        (Some(&(l0, f0)), Some(&(l1, f1))) => {
            let footprint = f1 as i128 - f0 as i128;
            let live = l1 as i128 - l0 as i128;
            u64::try_from((footprint - live).max(0)).unwrap_or(0)
        }
        _ => 0,
    }
}

/// Numbers that cannot both be right: live bytes well above the footprint mean blocks
/// allocated and never touched, or mappings counted as allocations that are not. Compared
/// at the last sample that measured the footprint, not with the final live bytes: a short
/// process may grow for a whole second after its only measurement.
fn notes(p: &Process, ctx: &Context) -> Vec<String> {
    if ctx.footprint_bytes.is_none() {
        return Vec::new();
    }
    let Some((live, footprint)) = p
        .series
        .points()
        .iter()
        .rev()
        .find_map(|&(_, s)| Some((s.live_bytes, s.footprint_bytes?)))
    else {
        return Vec::new();
    };
    let heap_live = p.live_bytes - p.mmap_live_bytes.min(p.live_bytes);
    let slack = (footprint / 10).max(1 << 20);
    let mmap_share = p
        .sites
        .iter()
        .filter(|s| s.kind == SiteKind::Mmap)
        .map(|s| s.live_bytes)
        .sum::<u64>();
    if live <= footprint + slack {
        return Vec::new();
    }
    vec![format!(
        "pid {}: live bytes ({}) exceed the footprint ({}): {} of it in heap blocks, {} in \
         the program's own mappings; memory allocated but never touched is not resident, \
         but if that is not the case here, some of these numbers are wrong",
        p.tgid,
        bytes_text(live),
        bytes_text(footprint),
        bytes_text(heap_live),
        bytes_text(mmap_share)
    )]
}
