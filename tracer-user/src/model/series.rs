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
    fn short_runs_keep_every_point() {
        let mut s = Series::new(8);
        for t in 0..5u64 {
            s.push(t, t);
        }
        assert_eq!(s.points().len(), 5);
    }
}
