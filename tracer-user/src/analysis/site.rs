//! One site's verdict: leaking, holding steady, or only making temporaries, with the numbers
//! it rests on. Judged on a *view* of the site: its whole trace, or the trace up to the
//! moment a process began its exit teardown.

use serde::Serialize;

use super::{
    Window,
    growth::{self, Growth, Steps},
    units::{plural, rate, seconds},
};
use crate::model::{Site, SiteKind, SitePoint};

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

/// A site's verdict and the facts behind it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SiteAssessment {
    pub verdict: SiteVerdict,
    /// Linear fit of the site's live bytes over the window, when there are enough samples.
    pub growth: Option<Growth>,
    /// Steps by which its live bytes rose (a block grown by realloc, a doubling table), when
    /// that is how it grew.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub growth_steps: Option<usize>,
    /// A site that allocated only at start-up and never freed (e.g. `Box::leak`).
    pub one_time: bool,
    /// Age of the oldest and newest live allocation at the end of the window, seconds.
    pub oldest_live_age_s: Option<f64>,
    pub newest_live_age_s: Option<f64>,
    /// Median and 99th-percentile lifetime of freed allocations, seconds.
    pub lifetime_p50_s: Option<f64>,
    pub lifetime_p99_s: Option<f64>,
    /// Its growth was released only in the process's exit teardown; the verdict is the one
    /// of the trace up to then.
    pub released_at_exit: bool,
    /// Live bytes just before that teardown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pre_teardown_live_bytes: Option<u64>,
    /// Sites (indices in the process) whose decline this site's growth replaced: turnover.
    #[serde(skip)]
    pub taking_over_from: Vec<usize>,
    pub evidence: String,
}

/// What a site looks like up to the end of a view.
pub struct SiteView<'a> {
    pub site: &'a Site,
    /// `(ns, state)` where it changed, the last one at the end of the view: read as steps
    /// (its state at an instant is that of the latest point at or before it). The points at
    /// every sample ([`SiteView::dense`]) are made only for the sites judged on them: kept
    /// for all, python's 4 000 sites holding memory were 11 MB of points.
    pub points: Vec<(u64, SitePoint)>,
    /// The process's sample instants.
    instants: &'a [u64],
    /// The view's end: a cut (before a teardown) or the end of the window.
    cut_ns: Option<u64>,
    end_ns: u64,
    /// Births of the allocations live at the end of the view, when it ends now; `None` for a
    /// view cut before the process's teardown (which allocations were live then is gone).
    pub births: Option<Vec<u64>>,
}

impl<'a> SiteView<'a> {
    pub fn new(
        site: &'a Site,
        instants: &'a [u64],
        (cut_ns, end_ns): (Option<u64>, u64),
        births: Option<Vec<u64>>,
    ) -> Self {
        let mut view = Self {
            site,
            points: Vec::new(),
            instants,
            cut_ns,
            end_ns,
            births,
        };
        view.points = view.ended(site.series.changes().to_vec());
        view
    }

    /// Its state at every sample of the view (at most `SITE_POINTS`), the last at its end.
    pub fn dense(&self) -> Vec<(u64, SitePoint)> {
        self.ended(self.site.points(self.instants))
    }

    /// `points` up to the view's end, with its end.
    fn ended(&self, points: Vec<(u64, SitePoint)>) -> Vec<(u64, SitePoint)> {
        let cut = self.cut_ns;
        let mut points: Vec<_> = points
            .into_iter()
            .filter(|&(t, _)| cut.is_none_or(|cut| t <= cut))
            .collect();
        let now = self.site.point();
        if cut.is_none() && points.last().is_none_or(|&(t, _)| t < self.end_ns) {
            points.push((self.end_ns, now));
        }
        if points.is_empty() {
            // Never held memory at a sample: its counts now, with nothing live.
            points.push((
                self.end_ns,
                SitePoint {
                    live_bytes: 0,
                    ..now
                },
            ));
        }
        points
    }

    fn end(&self) -> SitePoint {
        self.points.last().map(|&(_, p)| p).unwrap_or_default()
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
/// A site whose newest block is no older than this many of its mean gaps between births is
/// still adding blocks (at random arrivals, a longer silence has a 5 % chance).
const USUAL_GAPS: f64 = 3.0;
/// Series points the last third needs for its slope to say anything.
const MIN_LATE_POINTS: usize = 4;
/// One-time allocations all happen in this first fraction of the window.
const START_UP: f64 = 0.1;
/// A stepped site may have fallen back by this share of what it rose.
const STEP_SLACK: f64 = 0.1;
/// Steps that make a leak by themselves; fewer are growth only beside a leaking site.
pub const STEPS_ALONE: usize = 3;

/// How a site with live memory grew, before any comparison with other sites.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Along a line, still rising at the end.
    Linear,
    /// In this many steps up (flat in between), the last one late in the window, hardly
    /// ever down; `linear` when a line fits it well too; `by_realloc` when it grew without
    /// holding more blocks (its blocks were grown by realloc).
    Stepped {
        rises: usize,
        linear: bool,
        by_realloc: bool,
        /// The last rise came in the last third (else only in the second half).
        rose_last_third: bool,
    },
    /// Not growing.
    Flat,
}

pub fn assess_site(view: &SiteView<'_>, window: Window) -> (SiteAssessment, Shape) {
    let site = view.site;
    let quantile_s = |q| site.lifetimes.quantile_us(q).map(|us| us as f64 / 1e6);
    let (p50, p99) = (quantile_s(0.5), quantile_s(0.99));
    let end = view.end();
    let mut a = SiteAssessment {
        verdict: SiteVerdict::Stable,
        growth: None,
        growth_steps: None,
        one_time: false,
        oldest_live_age_s: None,
        newest_live_age_s: None,
        lifetime_p50_s: p50,
        lifetime_p99_s: p99,
        released_at_exit: false,
        pre_teardown_live_bytes: None,
        taking_over_from: Vec::new(),
        evidence: String::new(),
    };
    if end.live_bytes == 0 {
        a.verdict = SiteVerdict::Temporary;
        a.evidence = format!(
            "all {} freed{}",
            what(site, u64::from(end.allocations), ""),
            p50.map(|s| format!(", median lifetime {}", seconds(s)))
                .unwrap_or_default()
        );
        return (a, Shape::Flat);
    }
    let held = Held::of(view, window);
    a.oldest_live_age_s = held.oldest.map(|t| window.age_s(t));
    a.newest_live_age_s = held.newest.map(|t| window.age_s(t));
    let points = view.dense();
    let bytes: Vec<(u64, u64)> = points.iter().map(|&(t, p)| (t, p.live_bytes)).collect();
    a.growth = growth::fit(&bytes);
    let steps = growth::steps(&bytes);
    a.one_time = one_time(view, &points, &held, window);
    let shape = shape(a.growth.as_ref(), &steps, &points, window, &held);
    let growing = match shape {
        Shape::Linear => true,
        Shape::Stepped {
            rises,
            linear,
            rose_last_third,
            ..
        } => {
            a.growth_steps = Some(rises);
            linear || (rises >= STEPS_ALONE && rose_last_third)
        }
        Shape::Flat => false,
    };
    let leak = growing && !a.one_time && held.old_kept;
    a.verdict = if leak {
        SiteVerdict::Leak
    } else {
        SiteVerdict::Stable
    };
    a.evidence = evidence(&a, &held, site, window);
    (a, shape)
}

/// Calls a stepped site a leak on evidence from elsewhere (it grows beside a leaking site),
/// if its own memory is old and kept; returns whether it did.
pub fn call_leak(a: &mut SiteAssessment, view: &SiteView<'_>, window: Window) -> bool {
    let held = Held::of(view, window);
    if a.one_time || !held.old_kept {
        return false;
    }
    a.verdict = SiteVerdict::Leak;
    a.evidence = evidence(a, &held, view.site, window);
    true
}

/// What is known of the allocations a site still holds at the end of its view.
struct Held {
    count: u64,
    oldest: Option<u64>,
    newest: Option<u64>,
    /// Old memory was never freed: the site holds allocations from the first half.
    old_kept: bool,
}

impl Held {
    fn of(view: &SiteView<'_>, window: Window) -> Self {
        let end = view.end();
        match &view.births {
            Some(births) => {
                let oldest = births.iter().min().copied();
                Self {
                    count: births.len() as u64,
                    oldest,
                    newest: births.iter().max().copied(),
                    old_kept: oldest.is_some_and(|t| window.fraction(t) <= OLD_BEFORE),
                }
            }
            // Cut before a teardown: its first allocations were made early and most were
            // never freed before that moment.
            None => Self {
                count: u64::from(end.allocations.saturating_sub(end.frees)),
                oldest: None,
                newest: None,
                old_kept: window.fraction(view.site.first_ns) <= OLD_BEFORE
                    && u64::from(end.frees) * 2 <= u64::from(end.allocations),
            },
        }
    }

    /// Whether the site was still adding blocks at the end of the window, by the births of
    /// those it holds: its newest is from the last quarter, or no older than a few of its
    /// usual gaps between births (sampled blocks come at random: a fast leak sampled every
    /// ≈ 80 ms can go 200 ms without one, and a short window makes that a third of it).
    fn still_adding(&self, window: Window) -> bool {
        let (Some(oldest), Some(newest)) = (self.oldest, self.newest) else {
            return false;
        };
        if window.fraction(newest) >= NEW_AFTER {
            return true;
        }
        self.count >= 3
            && window.age_s(newest)
                <= USUAL_GAPS * (newest - oldest) as f64 / 1e9 / (self.count - 1) as f64
    }
}

/// Allocated only at start-up and never freed.
fn one_time(view: &SiteView<'_>, points: &[(u64, SitePoint)], held: &Held, window: Window) -> bool {
    let end = view.end();
    if end.frees != 0 {
        return false;
    }
    match (&view.births, held.newest) {
        (Some(_), Some(newest)) => {
            view.site.total_allocations == view.site.live_allocations
                && window.fraction(newest) <= START_UP
        }
        _ => {
            let at_start_up = points
                .iter()
                .find(|&&(t, _)| window.fraction(t) >= START_UP)
                .map(|&(_, p)| p.allocations);
            at_start_up == Some(end.allocations)
        }
    }
}

/// How a site's live bytes grew over the window.
/// Blocks a site held at a sample (a realloc counts as one allocation and one free).
fn held_blocks(point: Option<&(u64, SitePoint)>) -> u32 {
    point.map_or(0, |(_, p)| p.allocations.saturating_sub(p.frees))
}

fn shape(
    growth: Option<&Growth>,
    steps: &Steps,
    points: &[(u64, SitePoint)],
    window: Window,
    held: &Held,
) -> Shape {
    let bytes: Vec<(u64, u64)> = points.iter().map(|&(t, p)| (t, p.live_bytes)).collect();
    // Whether it still grew at the end: from the slope of the last third when the series
    // has the points to measure one there; a window cut short after a second or two has
    // one or two, whose slope is noise (no sample fell in them, or the same one twice), and
    // then from the births of what the site holds, as for a series too short to fit.
    let late_points = points
        .iter()
        .filter(|&&(t, _)| window.fraction(t) >= 2.0 / 3.0)
        .count();
    let still_growing = |g: &Growth| match (late_points, held.newest) {
        (0..MIN_LATE_POINTS, Some(_)) => held.still_adding(window),
        _ => g.last_third_bytes_per_s >= STILL_GROWING * g.bytes_per_s,
    };
    let linear = match growth {
        Some(g) => g.bytes_per_s > 0.0 && g.fit >= MIN_FIT && still_growing(g),
        // Too few samples to fit (a very short trace): the births alone must show
        // allocations piling up from the start to the end.
        None => held.count >= 2 && held.still_adding(window),
    };
    let first = bytes.first().map_or(0, |&(_, b)| b);
    // A buffer doubled at a steady rate of pushes last doubled in the second half of any
    // window that saw it double at all.
    let last_rise = steps.last_rise_ns.map_or(0.0, |t| window.fraction(t));
    // Steps, not a ramp: flat between rises (a ramp rises at nearly every sample).
    let stepped = steps.only_rises(STEP_SLACK)
        && last_rise >= 0.5
        && steps.risen >= first / 2
        && steps.rises * 2 <= bytes.len();
    match (stepped, linear) {
        (true, linear) => Shape::Stepped {
            rises: steps.rises,
            linear,
            by_realloc: held_blocks(points.first()) >= held_blocks(points.last()),
            rose_last_third: last_rise >= 2.0 / 3.0,
        },
        (false, true) => Shape::Linear,
        (false, false) => Shape::Flat,
    }
}

/// `300 live allocations`, `1 mapping`: the count, an adjective, the noun in its number.
fn what(site: &Site, n: u64, adjective: &str) -> String {
    let noun = match site.kind {
        SiteKind::Heap => "allocation",
        SiteKind::Mmap => "mapping",
    };
    plural(
        n,
        &format!("{adjective}{noun}"),
        &format!("{adjective}{noun}s"),
    )
}

fn evidence(a: &SiteAssessment, held: &Held, site: &Site, window: Window) -> String {
    if a.verdict == SiteVerdict::Leak {
        let line = a.growth.as_ref().map_or_else(String::new, |g| {
            let how = a.growth_steps.map_or_else(
                || format!("{:.2} fit", g.fit),
                |n| format!("in {}", plural(n as u64, "step", "steps")),
            );
            format!(
                "{} over {}, {how}, ",
                rate(g.bytes_per_s),
                seconds(g.span_s)
            )
        });
        let since = held.oldest.unwrap_or(site.first_ns);
        return format!(
            "{line}{} never freed, oldest from the first {}",
            what(site, held.count, "live "),
            seconds((window.fraction(since) * window.span_s()).max(0.001))
        );
    }
    if a.one_time {
        return format!(
            "one-time: {} made at start-up, never freed, never repeated",
            what(site, held.count, "")
        );
    }
    let flat = a.growth.as_ref().map_or_else(String::new, |g| {
        format!(", {} in the last third", rate(g.last_third_bytes_per_s))
    });
    let newest = held.newest.map_or_else(String::new, |t| {
        format!("; newest {} old", seconds(window.age_s(t)))
    });
    format!(
        "{}, not growing{flat}{newest}, {} freed",
        what(site, held.count, "live "),
        site.frees
    )
}
