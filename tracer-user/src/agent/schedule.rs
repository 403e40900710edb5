//! Which growing process is traced next: at most `--max-concurrent` at once, none again
//! before its back-off ends, none started while the estimated CPU is over the budget, and a
//! window that alone costs more than the budget ended. Pure decisions: no probes, no I/O.

use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

/// When each process may be traced again.
#[derive(Default)]
pub struct Backoff {
    until: FxHashMap<u32, Instant>,
}

impl Backoff {
    pub fn after_window(&mut self, pid: u32, now: Instant, wait: Duration) {
        self.until.insert(pid, now + wait);
    }

    pub fn waiting(&self, pid: u32, now: Instant) -> bool {
        self.until.get(&pid).is_some_and(|&t| now < t)
    }

    /// Forgets what has expired or is no longer watched: bounded by the watched processes.
    pub fn prune(&mut self, now: Instant, watched: impl Fn(u32) -> bool) {
        self.until.retain(|&pid, &mut t| now < t && watched(pid));
    }

    /// A process gone is another process if its pid comes back.
    pub fn forget(&mut self, pid: u32) {
        self.until.remove(&pid);
    }
}

/// CPU, in cores, that `traps` probe hits over `elapsed` cost at `trap_ns` each.
pub fn trap_cores(traps: u64, elapsed: Duration, trap_ns: f64) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    traps as f64 / secs * trap_ns / 1e9
}

/// What the scheduler weighs.
pub struct Load {
    pub active: usize,
    pub max_concurrent: usize,
    /// Estimated cores tracing costs now (windows' traps and the agent's own CPU).
    pub estimated_cores: f64,
    pub budget_cores: f64,
}

/// The growing processes (fastest first) to start windows on now, and how many had to wait
/// for a slot or for the budget.
pub fn choose(growing: &[u32], eligible: impl Fn(u32) -> bool, load: &Load) -> (Vec<u32>, u64) {
    let mut start = Vec::new();
    let mut deferred = 0;
    for &pid in growing {
        if !eligible(pid) {
            continue;
        }
        let slots = load
            .max_concurrent
            .saturating_sub(load.active + start.len());
        // A new window's cost is unknown until it runs: one at a time while under budget.
        let over = load.estimated_cores >= load.budget_cores;
        if slots == 0 || over || (!start.is_empty() && load.estimated_cores > 0.0) {
            deferred += 1;
            continue;
        }
        start.push(pid);
    }
    (start, deferred)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(active: usize, estimated_cores: f64) -> Load {
        Load {
            active,
            max_concurrent: 2,
            estimated_cores,
            budget_cores: 0.05,
        }
    }

    #[test]
    fn slots_budget_and_eligibility() {
        let all = |_| true;
        assert_eq!(choose(&[1, 2, 3], all, &load(0, 0.0)), (vec![1, 2], 1));
        assert_eq!(choose(&[1, 2, 3], all, &load(1, 0.0)), (vec![1], 2));
        assert_eq!(
            choose(&[1, 2], all, &load(0, 0.06)),
            (vec![], 2),
            "over budget"
        );
        assert_eq!(choose(&[1, 2], |p| p != 1, &load(0, 0.0)), (vec![2], 0));
    }

    #[test]
    fn backoff_expires_and_is_bounded() {
        let now = Instant::now();
        let mut b = Backoff::default();
        b.after_window(9, now, Duration::from_secs(10));
        assert!(b.waiting(9, now + Duration::from_secs(9)));
        assert!(!b.waiting(9, now + Duration::from_secs(10)));
        b.prune(now, |_| false);
        assert!(!b.waiting(9, now), "not watched any more: forgotten");
        assert!((trap_cores(1_000_000, Duration::from_secs(1), 1000.0) - 1.0).abs() < 1e-9);
    }
}
