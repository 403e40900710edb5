//! Turnover: a site whose growth is other sites' decline — a cache filled from one call site
//! and refilled, entry by entry, from another — is taking over, not leaking; the memory the
//! process holds is not growing. Told apart by matching samples: the growing site's rise at
//! each sample is cancelled by the shrinking sites' fall at the same samples.

use super::site::{SiteAssessment, SiteVerdict, SiteView};
use super::units::{bytes_text, rate};

/// What is left unexplained of a site's sample-to-sample changes once others' are added:
/// at most this share of them, for the others to be what it takes over from.
const MATCHED: f64 = 0.25;
/// The sites taken over from lost at least this share of what it gained.
const COVERED: f64 = 0.5;
/// Leaks may rise this share more than the process before any is called turnover.
const SLACK: f64 = 0.05;
/// Adding a shrinking site must explain at least this much more to count.
const GAIN: f64 = 0.1;

/// Each site's live bytes at every tick (step-interpolated: its last sample at or before).
pub fn resample(views: &[SiteView<'_>], ticks: &[u64]) -> Vec<Vec<f64>> {
    views
        .iter()
        .map(|v| {
            let mut i = 0;
            let mut value = 0.0;
            ticks
                .iter()
                .map(|&t| {
                    while i < v.points.len() && v.points[i].0 <= t {
                        value = v.points[i].1.live_bytes as f64;
                        i += 1;
                    }
                    value
                })
                .collect()
        })
        .collect()
}

/// Turns leak candidates whose growth other sites' decline cancels into turnover (`stable`,
/// taking over from those sites), most clearly matched first, for as long as the leaks left
/// grow clearly more than the process itself does (`process_rise`, bytes over the window).
/// `levels` are [`resample`]'s, per site.
pub fn resolve(assessments: &mut [SiteAssessment], levels: &[Vec<f64>], process_rise: f64) {
    let rise = |s: usize| -> f64 {
        let l = &levels[s];
        l.last().copied().unwrap_or(0.0) - l.first().copied().unwrap_or(0.0)
    };
    let mut candidates: Vec<usize> = (0..assessments.len())
        .filter(|&s| assessments[s].verdict == SiteVerdict::Leak && rise(s) > 0.0)
        .collect();
    candidates.sort_by(|&a, &b| rise(b).total_cmp(&rise(a)));
    let mut used: Vec<usize> = candidates.clone();
    let mut matches: Vec<(f64, usize, Vec<usize>)> = Vec::new();
    for &c in &candidates {
        let Some(born) = levels[c].iter().position(|&v| v != 0.0) else {
            continue;
        };
        // Compared from the candidate's first sample on: what others did before it existed
        // (a cache's initial fill) is not what it takes over.
        let since = born;
        let fell = |d: usize| levels[d][since] - levels[d].last().copied().unwrap_or(0.0);
        let decliners: Vec<usize> = (0..levels.len())
            .filter(|d| !used.contains(d) && fell(*d) > 0.0)
            .collect();
        if let Some((residual, from)) = best_match(levels, c, since, &decliners) {
            let lost: f64 = from.iter().map(|&d| fell(d)).sum();
            if residual <= MATCHED && lost >= COVERED * rise(c) {
                used.extend(&from);
                matches.push((residual, c, from));
            }
        }
    }
    matches.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut leaking: f64 = candidates.iter().map(|&c| rise(c)).sum();
    for (_, c, from) in matches {
        if leaking * (1.0 - SLACK) <= process_rise.max(0.0) * 1.5 {
            break;
        }
        leaking -= rise(c);
        let a = &mut assessments[c];
        a.verdict = SiteVerdict::Stable;
        let g = a.growth.as_ref().map_or(0.0, |g| g.bytes_per_s);
        a.evidence = format!(
            "turnover, not a leak: grows {} ({} over the trace) while the sites it takes over \
             from shrink as much at the same moments",
            rate(g),
            bytes_text(rise(c) as u64)
        );
        a.taking_over_from = from;
    }
}

/// The shrinking sites whose changes from tick `since` on best cancel site `c`'s, greedily,
/// with the share of `c`'s changes left unexplained.
fn best_match(
    levels: &[Vec<f64>],
    c: usize,
    since: usize,
    decliners: &[usize],
) -> Option<(f64, Vec<usize>)> {
    let deltas =
        |s: usize| -> Vec<f64> { levels[s][since..].windows(2).map(|w| w[1] - w[0]).collect() };
    let dc = deltas(c);
    let energy: f64 = dc.iter().map(|d| d * d).sum();
    if energy == 0.0 {
        return None;
    }
    let mut sum = dc;
    let mut residual = 1.0;
    let mut from = Vec::new();
    loop {
        let best = decliners
            .iter()
            .filter(|d| !from.contains(*d))
            .map(|&d| {
                let dd = deltas(d);
                let r: f64 = sum
                    .iter()
                    .zip(&dd)
                    .map(|(a, b)| (a + b).powi(2))
                    .sum::<f64>()
                    / energy;
                (r, d, dd)
            })
            .min_by(|a, b| a.0.total_cmp(&b.0));
        match best {
            Some((r, d, dd)) if r <= residual - GAIN => {
                residual = r;
                from.push(d);
                for (s, x) in sum.iter_mut().zip(dd) {
                    *s += x;
                }
            }
            _ => break,
        }
    }
    (!from.is_empty()).then_some((residual, from))
}
