//! An exit's teardown: the frees a process makes in its last moments (an interpreter freeing
//! its objects, destructors of globals), after which nothing else runs. Growth released only
//! there still grew without bound for as long as the program ran, which is what the user
//! asks about; so a process that exited is judged on its trace up to the teardown.

use super::Window;

/// The final decline of a process's live bytes before it exited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Teardown {
    /// The sample just before the decline began, ns.
    pub start_ns: u64,
    /// Live bytes at that sample, and at exit.
    pub live_before: u64,
    pub live_at_exit: u64,
    pub exit_ns: u64,
}

/// A teardown lasts at most this long…
const MAX_SECONDS: f64 = 2.0;
/// …or this share of the window, if that is longer.
const MAX_SHARE: f64 = 0.2;
/// It releases at least this share of what was live before it.
const MIN_RELEASED: f64 = 0.5;
/// Rises smaller than this share of the level during the decline are noise.
const NOISE: f64 = 0.02;
/// Once down, the process exits within this long (a sample interval or so).
const EXIT_AFTER_S: f64 = 0.3;
/// Samples needed before the decline for the trace up to it to say anything.
const MIN_BEFORE: usize = 4;

/// The teardown in `points` (a process's `(ns, live bytes)` samples) ending with `exit`
/// (`(ns, live bytes)` when the process was seen gone), if its live bytes fell steeply at
/// the very end.
pub fn detect(points: &[(u64, u64)], exit: (u64, u64), window: Window) -> Option<Teardown> {
    let mut all: Vec<(u64, u64)> = points
        .iter()
        .copied()
        .filter(|&(t, _)| t < exit.0)
        .collect();
    all.push(exit);
    // Walk back from the exit while the series was higher (or level) earlier: that is the
    // decline; its first point is where it began.
    let mut start = all.len() - 1;
    while start > 0 {
        let (earlier, later) = (all[start - 1].1, all[start].1);
        let noise = (later as f64 * NOISE) as u64;
        if earlier + noise < later {
            break;
        }
        start -= 1;
    }
    // The decline may have begun with a flat stretch: it starts at its highest point.
    let (start_ns, live_before) = all[start..]
        .iter()
        .copied()
        .max_by_key(|&(t, b)| (b, std::cmp::Reverse(t)))?;
    let before = all.iter().filter(|&&(t, _)| t <= start_ns).count();
    let released = live_before.saturating_sub(exit.1);
    // Where the decline reached (nearly) its final level: the exit must follow at once,
    // or the program went on running after its frees and they were its own doing.
    let low_at = all[start..]
        .iter()
        .find(|&&(_, b)| b <= exit.1 + released / 10)
        .map_or(exit.0, |&(t, _)| t);
    let lasted_s = low_at.saturating_sub(start_ns) as f64 / 1e9;
    let quick = lasted_s <= MAX_SECONDS.max(MAX_SHARE * window.span_s());
    let then_exited = exit.0.saturating_sub(low_at) as f64 / 1e9 <= EXIT_AFTER_S;
    (before >= MIN_BEFORE
        && live_before > 0
        && released as f64 >= MIN_RELEASED * live_before as f64
        && quick
        && then_exited)
        .then_some(Teardown {
            start_ns,
            live_before,
            live_at_exit: exit.1,
            exit_ns: exit.0,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn window(end: u64) -> Window {
        Window {
            start_ns: 0,
            end_ns: end,
        }
    }

    #[test]
    fn growth_freed_in_the_last_moments_is_a_teardown() {
        let pts: Vec<(u64, u64)> = (0..10).map(|i| (i * S, i * 1000)).collect();
        let t = detect(&pts, (9 * S + S / 10, 50), window(10 * S)).expect("a teardown");
        assert_eq!(
            (t.start_ns, t.live_before, t.live_at_exit),
            (9 * S, 9000, 50)
        );
    }

    #[test]
    fn a_slow_decline_or_a_plain_exit_is_not() {
        let rising: Vec<(u64, u64)> = (0..10).map(|i| (i * S, i * 1000)).collect();
        assert_eq!(detect(&rising, (10 * S, 9000), window(10 * S)), None);
        // Freed over the second half of a 20 s run: the program's own doing, not an exit.
        let slow: Vec<(u64, u64)> = (0..20)
            .map(|i| (i * S, if i < 10 { i * 1000 } else { (20 - i) * 900 }))
            .collect();
        assert_eq!(detect(&slow, (20 * S, 0), window(20 * S)), None);
        // Freed, then ran on for a second before exiting.
        let mut idle: Vec<(u64, u64)> = (0..10).map(|i| (i * S, i * 1000)).collect();
        idle.extend([(10 * S, 10), (11 * S, 10)]);
        assert_eq!(detect(&idle, (11 * S + S / 10, 10), window(12 * S)), None);
    }
}
