//! Bounded time series: however long a trace runs, a series keeps at most `capacity` points.
//! When full it drops every other point and from then on keeps every other sample, so the
//! whole run stays covered at an evenly coarser resolution.

#[derive(Clone, Debug)]
pub struct Series<T> {
    points: Vec<(u64, T)>,
    capacity: usize,
    /// Keep one sample in `stride`.
    stride: u32,
    seen: u32,
}

impl<T: Copy> Series<T> {
    pub fn new(capacity: usize) -> Self {
        assert!(capacity >= 2, "a series needs room for two points");
        Self {
            points: Vec::new(),
            capacity,
            stride: 1,
            seen: 0,
        }
    }

    /// Records `value` at `ts_ns`.
    pub fn push(&mut self, ts_ns: u64, value: T) {
        let keep = self.seen.is_multiple_of(self.stride);
        self.seen = self.seen.wrapping_add(1);
        if !keep {
            return;
        }
        if self.points.len() == self.capacity {
            let mut i = 0;
            self.points.retain(|_| {
                i += 1;
                i % 2 == 1
            });
            self.stride *= 2;
            self.seen = 1;
        }
        self.points.push((ts_ns, value));
    }

    pub fn points(&self) -> &[(u64, T)] {
        &self.points
    }

    pub fn last(&self) -> Option<&(u64, T)> {
        self.points.last()
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

impl<T: Copy + Default + std::ops::Add<Output = T>> Series<T> {
    /// The sum of several series sampled at the same instants (each from its own first
    /// point, each thinned on its own): at every instant any of them has a point, each
    /// contributes its latest value at or before it (nothing before its first point).
    /// Bounded like any series of `capacity`.
    pub fn sum<'a>(parts: impl IntoIterator<Item = &'a Self>, capacity: usize) -> Self
    where
        T: 'a,
    {
        let parts: Vec<&Self> = parts.into_iter().collect();
        let mut instants: Vec<u64> = parts
            .iter()
            .flat_map(|s| s.points.iter().map(|&(t, _)| t))
            .collect();
        instants.sort_unstable();
        instants.dedup();
        let mut cursors = vec![0usize; parts.len()];
        let mut sum = Self::new(capacity);
        for t in instants {
            let mut total = T::default();
            for (part, cursor) in parts.iter().zip(&mut cursors) {
                while *cursor < part.points.len() && part.points[*cursor].0 <= t {
                    *cursor += 1;
                }
                if *cursor > 0 {
                    total = total + part.points[*cursor - 1].1;
                }
            }
            sum.push(t, total);
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_bounded_and_spans_the_whole_run() {
        let mut s = Series::new(8);
        for t in 0..1000u64 {
            s.push(t, t * 10);
        }
        assert!(s.len() <= 8);
        assert_eq!(s.points()[0], (0, 0));
        let last = s.last().expect("points").0;
        assert!(
            last >= 1000 - 1000 / 8,
            "covers the end of the run, last at {last}"
        );
        let gaps: Vec<u64> = s.points().windows(2).map(|w| w[1].0 - w[0].0).collect();
        assert!(
            gaps.iter().all(|&g| g == gaps[0]),
            "evenly spaced: {gaps:?}"
        );
    }

    #[test]
    fn sums_hold_each_part_at_its_latest_value() {
        let mut a = Series::new(8);
        let mut b = Series::new(8);
        for t in 0..4u64 {
            a.push(t * 10, t);
        }
        b.push(20, 100);
        b.push(30, 200);
        let sum = Series::sum([&a, &b], 8);
        assert_eq!(sum.points(), &[(0, 0), (10, 1), (20, 102), (30, 203)]);
    }

    #[test]
    fn short_runs_keep_every_point() {
        let mut s = Series::new(8);
        for t in 0..5u64 {
            s.push(t, t);
        }
        assert_eq!(s.points().len(), 5);
    }
}
