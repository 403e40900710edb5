//! Least-squares growth of a byte series: the rate, how well a straight line explains it, and
//! whether it is still rising at the end.

use serde::Serialize;

/// Fewer samples than this say nothing about a trend.
pub const MIN_POINTS: usize = 4;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Growth {
    /// Slope of the fitted line over the whole series.
    pub bytes_per_s: f64,
    /// Coefficient of determination (R²) of that line, 0 to 1; 0 for a flat series.
    pub fit: f64,
    /// Slope over the last third of the series' time span.
    pub last_third_bytes_per_s: f64,
    pub span_s: f64,
    pub points: usize,
}

/// Fits `(ns, bytes)` points; `None` with fewer than [`MIN_POINTS`] or no time span.
pub fn fit(points: &[(u64, u64)]) -> Option<Growth> {
    if points.len() < MIN_POINTS {
        return None;
    }
    let t0 = points[0].0;
    let span_s = points[points.len() - 1].0.saturating_sub(t0) as f64 / 1e9;
    if span_s <= 0.0 {
        return None;
    }
    let xy: Vec<(f64, f64)> = points
        .iter()
        .map(|&(t, b)| (t.saturating_sub(t0) as f64 / 1e9, b as f64))
        .collect();
    let (slope, r2) = line(&xy);
    let tail_start = span_s * 2.0 / 3.0;
    let tail: Vec<(f64, f64)> = xy
        .iter()
        .copied()
        .filter(|&(x, _)| x >= tail_start)
        .collect();
    let last_third = if tail.len() >= 2 {
        line(&tail).0
    } else {
        let (a, b) = (xy[xy.len() - 2], xy[xy.len() - 1]);
        if b.0 > a.0 {
            (b.1 - a.1) / (b.0 - a.0)
        } else {
            0.0
        }
    };
    Some(Growth {
        bytes_per_s: slope,
        fit: r2,
        last_third_bytes_per_s: last_third,
        span_s,
        points: points.len(),
    })
}

/// How a series rose and fell from point to point: what a block grown by realloc in steps
/// (a doubling vector, an array grown in chunks) shows instead of a straight line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Steps {
    /// Points where the series rose.
    pub rises: usize,
    pub risen: u64,
    pub fallen: u64,
    /// When it last rose, ns.
    pub last_rise_ns: Option<u64>,
}

impl Steps {
    /// Whether the series only rose, to within `slack` (a share of what it rose).
    pub fn only_rises(&self, slack: f64) -> bool {
        self.rises > 0 && self.fallen as f64 <= slack * self.risen as f64
    }
}

/// The rises and falls of `(ns, bytes)` points.
pub fn steps(points: &[(u64, u64)]) -> Steps {
    let mut out = Steps::default();
    for w in points.windows(2) {
        let (a, b) = (w[0].1, w[1].1);
        if b > a {
            out.rises += 1;
            out.risen += b - a;
            out.last_rise_ns = Some(w[1].0);
        } else {
            out.fallen += a - b;
        }
    }
    out
}

/// Slope and R² of the least-squares line through `xy`.
fn line(xy: &[(f64, f64)]) -> (f64, f64) {
    let n = xy.len() as f64;
    let mx = xy.iter().map(|p| p.0).sum::<f64>() / n;
    let my = xy.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = xy.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let syy: f64 = xy.iter().map(|p| (p.1 - my).powi(2)).sum();
    let sxy: f64 = xy.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 {
        return (0.0, 0.0);
    }
    let slope = sxy / sxx;
    let r2 = if syy == 0.0 {
        0.0
    } else {
        (sxy * sxy) / (sxx * syy)
    };
    (slope, r2)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_steady_climb_fits_well() {
        let pts: Vec<(u64, u64)> = (0..20).map(|i| (i * S, 1000 + i * 256)).collect();
        let g = fit(&pts).expect("enough points");
        assert!((g.bytes_per_s - 256.0).abs() < 1e-6, "{g:?}");
        assert!(g.fit > 0.999);
        assert!((g.last_third_bytes_per_s - 256.0).abs() < 1e-6);
    }

    #[test]
    fn a_plateau_stops_growing_in_the_last_third() {
        let pts: Vec<(u64, u64)> = (0..30).map(|i| (i * S, (i.min(10) * 1000))).collect();
        let g = fit(&pts).expect("enough points");
        assert!(g.bytes_per_s > 0.0);
        assert_eq!(g.last_third_bytes_per_s, 0.0);
    }

    #[test]
    fn a_doubling_buffer_rises_in_steps() {
        let pts: Vec<(u64, u64)> = (0..16u64).map(|i| (i * S, 1 << (i / 4))).collect();
        let st = steps(&pts);
        assert_eq!((st.rises, st.risen, st.fallen), (3, 7, 0));
        assert!(st.only_rises(0.1));
        assert_eq!(st.last_rise_ns, Some(12 * S));
    }

    #[test]
    fn flat_series_has_no_fit() {
        let pts: Vec<(u64, u64)> = (0..10).map(|i| (i * S, 500)).collect();
        let g = fit(&pts).expect("enough points");
        assert_eq!((g.bytes_per_s, g.fit), (0.0, 0.0));
        assert!(fit(&pts[..3]).is_none());
    }
}
