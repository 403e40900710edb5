//! Bounded time series: however long a trace runs, a series keeps at most `capacity` points.
//! When full it drops every other point and from then on keeps every other sample, so the
//! whole run stays covered at an evenly coarser resolution. A series that seldom changes is
//! kept as its changes ([`Steps`]).

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
            halve(&mut self.points);
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

/// A series kept as the samples where its value changed: most of a program's sites hold the
/// same state sample after sample (python's JSON workload: 13 000 sites, 423 000 samples of
/// them, 17 500 changes), so its points are read back at given instants ([`Steps::at`]), the
/// process's samples. Bounded as [`Series`] is: when full, every other change goes and from
/// then on one sample in `stride` is looked at.
#[derive(Clone, Debug)]
pub struct Steps<T> {
    changes: Vec<(u64, T)>,
    capacity: usize,
    stride: u32,
    seen: u32,
    /// The latest instant it was sampled at.
    last_ns: u64,
}

impl<T: Copy + PartialEq> Steps<T> {
    pub fn new(capacity: usize) -> Self {
        assert!(capacity >= 2, "a series needs room for two points");
        Self {
            changes: Vec::new(),
            capacity,
            stride: 1,
            seen: 0,
            last_ns: 0,
        }
    }

    /// Records `value` sampled at `ts_ns`.
    pub fn push(&mut self, ts_ns: u64, value: T) {
        self.last_ns = ts_ns;
        let look = self.seen.is_multiple_of(self.stride);
        self.seen = self.seen.wrapping_add(1);
        if !look || self.changes.last().is_some_and(|&(_, v)| v == value) {
            return;
        }
        if self.changes.len() == self.capacity {
            halve(&mut self.changes);
            self.stride *= 2;
            self.seen = 1;
        }
        self.changes.push((ts_ns, value));
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The samples where it changed, oldest first.
    pub fn changes(&self) -> &[(u64, T)] {
        &self.changes
    }

    /// Its value at `ts_ns`: the latest change at or before it (None before the first).
    pub fn value_at(&self, ts_ns: u64) -> Option<T> {
        let after = self.changes.partition_point(|&(t, _)| t <= ts_ns);
        after.checked_sub(1).map(|i| self.changes[i].1)
    }

    /// Its points at those of `instants` (sorted) from its first change to its latest sample,
    /// at most `max` of them, evenly spread, the latest always among them.
    pub fn at(&self, instants: &[u64], max: usize) -> Vec<(u64, T)> {
        let Some(&(first, _)) = self.changes.first() else {
            return Vec::new();
        };
        let from = instants.partition_point(|&t| t < first);
        let to = instants.partition_point(|&t| t <= self.last_ns);
        let span = instants.get(from..to).unwrap_or_default();
        let step = span.len().div_ceil(max.max(1)).max(1);
        let last = span.len().saturating_sub(1);
        span.iter()
            .enumerate()
            .filter(|&(i, _)| (last - i).is_multiple_of(step))
            .filter_map(|(_, &t)| Some((t, self.value_at(t)?)))
            .collect()
    }
}

impl<T: Copy + PartialEq + Default + std::ops::Add<Output = T>> Steps<T> {
    /// The sum of several series sampled at the same instants: at every instant any of them
    /// changed, each contributes its latest value at or before it (nothing before its first
    /// change). Sampled until the latest of them was.
    pub fn sum<'a>(parts: impl IntoIterator<Item = &'a Self>, capacity: usize) -> Self
    where
        T: 'a,
    {
        let parts: Vec<&Self> = parts.into_iter().collect();
        let mut instants: Vec<u64> = parts
            .iter()
            .flat_map(|s| s.changes.iter().map(|&(t, _)| t))
            .collect();
        instants.sort_unstable();
        instants.dedup();
        let mut sum = Self::new(capacity);
        for t in instants {
            let total = parts
                .iter()
                .filter_map(|p| p.value_at(t))
                .fold(T::default(), |a, b| a + b);
            sum.push(t, total);
        }
        sum.last_ns = parts.iter().map(|p| p.last_ns).max().unwrap_or(sum.last_ns);
        sum
    }
}

/// Keeps every other point, the first among them: a full series' resolution halves.
fn halve<T>(points: &mut Vec<(u64, T)>) {
    let mut i = 0;
    points.retain(|_| {
        i += 1;
        i % 2 == 1
    });
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
        let mut a = Steps::new(8);
        let mut b = Steps::new(8);
        for t in 0..4u64 {
            a.push(t * 10, t);
        }
        b.push(20, 100);
        b.push(30, 200);
        let sum = Steps::sum([&a, &b], 8);
        let at = sum.at(&[0, 10, 20, 30], 8);
        assert_eq!(at, [(0, 0), (10, 1), (20, 102), (30, 203)]);
    }

    #[test]
    fn steps_keep_changes_and_are_read_back_at_every_sample() {
        let mut s = Steps::new(8);
        let instants: Vec<u64> = (0..10).map(|i| 100 + i * 10).collect();
        // Nothing held before 120; 5 until 150; 7 from then on.
        for &t in &instants[2..] {
            s.push(t, if t < 150 { 5 } else { 7 });
        }
        assert_eq!(s.changes.len(), 2);
        let at = s.at(&instants, 100);
        assert_eq!(at.len(), 8, "{at:?}");
        assert_eq!(at[0], (120, 5));
        assert_eq!(at[2], (140, 5));
        assert_eq!(at[3], (150, 7));
        assert_eq!(*at.last().expect("points"), (190, 7));
        // At most `max` points, evenly spread, the latest kept.
        let few = s.at(&instants, 3);
        assert_eq!(few, [(130, 5), (160, 7), (190, 7)]);
    }

    #[test]
    fn steps_stay_bounded_and_span_the_whole_run() {
        let mut s = Steps::new(8);
        for t in 0..1000u64 {
            s.push(t, t);
        }
        assert!(s.changes.len() <= 8);
        assert_eq!(s.changes[0], (0, 0));
        let instants: Vec<u64> = (0..1000).collect();
        let at = s.at(&instants, 1000);
        assert_eq!(at.len(), 1000);
        assert_eq!(
            at.last(),
            Some(&(999, s.changes.last().expect("a change").1))
        );
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
