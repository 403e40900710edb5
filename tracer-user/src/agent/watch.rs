//! Watching without probes: every process's resident memory read from `/proc/PID/status`
//! (kernel counters, no page-table walk), a bounded history per process, and the growth fit
//! the verdicts use to flag the ones that keep climbing. Owns no tracing and no output.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use crate::{
    analysis::growth::{self, Growth},
    procfs,
};

/// A straight line must explain this much of a process's climb (as for a leaking site).
const MIN_FIT: f64 = 0.8;

/// One reading of a process's memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    /// `VmRSS`: every resident page.
    pub resident_bytes: u64,
    /// `RssAnon`: resident anonymous pages, what heaps and leaks are made of.
    pub anon_bytes: u64,
}

/// Parses the memory lines of `/proc/PID/status`; `None` for a kernel thread (no `RssAnon`).
pub fn parse_status(text: &str) -> Option<(String, Reading)> {
    let mut name = None;
    let (mut rss, mut anon) = (None, None);
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let kib = || {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
                .map(|k| k * 1024)
        };
        match key {
            "Name" => name = Some(value.trim().to_owned()),
            "VmRSS" => rss = kib(),
            "RssAnon" => anon = kib(),
            _ => {}
        }
    }
    Some((
        name?,
        Reading {
            resident_bytes: rss?,
            anon_bytes: anon?,
        },
    ))
}

/// What is known of one watched process.
#[derive(Debug)]
pub struct Watched {
    pub comm: String,
    /// Its cgroup (v2 path), for the metrics' labels.
    pub cgroup: String,
    /// When it started (clock ticks after boot): a reused pid is another process.
    pub start_ticks: Option<u64>,
    pub last: Reading,
    /// `(ns, anon bytes)`, the oldest first, at most `history` long.
    pub history: VecDeque<(u64, u64)>,
    /// The fit over the history, once it has enough readings.
    pub growth: Option<Growth>,
    /// Whether the fit says it keeps growing.
    pub growing: bool,
}

/// Whether a fitted history is growth worth tracing: a good straight line, still rising at
/// the end, by at least `min_growth` bytes over its span.
pub fn is_growing(g: &Growth, min_growth: u64) -> bool {
    g.bytes_per_s > 0.0
        && g.fit >= MIN_FIT
        && g.last_third_bytes_per_s > 0.0
        && g.bytes_per_s * g.span_s >= min_growth as f64
}

/// What a scan must know: which processes, how many kept, how far back.
pub struct WatchSettings<'a> {
    pub admits: &'a dyn Fn(u32) -> bool,
    pub history: usize,
    pub min_growth: u64,
    pub max_watched: usize,
}

/// Every watched process by pid.
#[derive(Default)]
pub struct Watcher {
    pub procs: FxHashMap<u32, Watched>,
    /// Processes seen but not watched at the last scan (past `--max-watched`).
    pub over_limit: u64,
}

impl Watcher {
    /// Reads every process once; forgets those gone (or replaced under a reused pid).
    pub fn scan(&mut self, s: &WatchSettings<'_>, now_ns: u64) {
        let me = std::process::id();
        let pids = procfs::pids();
        let alive: rustc_hash::FxHashSet<u32> = pids.iter().copied().collect();
        self.procs.retain(|pid, _| alive.contains(pid));
        self.over_limit = 0;
        for pid in pids {
            if pid == me {
                continue;
            }
            self.read_one(pid, s, now_ns);
        }
    }

    fn read_one(&mut self, pid: u32, s: &WatchSettings<'_>, now_ns: u64) {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            self.procs.remove(&pid); // gone meanwhile
            return;
        };
        let Some((comm, reading)) = parse_status(&text) else {
            return; // a kernel thread
        };
        let start_ticks = procfs::start_ticks(pid);
        if self
            .procs
            .get(&pid)
            .is_some_and(|w| w.start_ticks != start_ticks || w.comm != comm)
        {
            self.procs.remove(&pid); // another process (or another program) under this pid
        }
        if !self.procs.contains_key(&pid) {
            if self.procs.len() >= s.max_watched {
                self.over_limit += 1;
                return;
            }
            if !(s.admits)(pid) {
                return;
            }
            self.procs.insert(
                pid,
                Watched {
                    comm,
                    cgroup: procfs::cgroup(pid).unwrap_or_default(),
                    start_ticks,
                    last: reading,
                    history: VecDeque::with_capacity(s.history),
                    growth: None,
                    growing: false,
                },
            );
        }
        let Some(w) = self.procs.get_mut(&pid) else {
            return;
        };
        w.record(now_ns, reading, s);
    }

    /// The growing processes, the fastest first.
    pub fn growing(&self) -> Vec<u32> {
        let mut out: Vec<(u32, f64)> = self
            .procs
            .iter()
            .filter(|(_, w)| w.growing)
            .map(|(&pid, w)| (pid, w.growth.as_ref().map_or(0.0, |g| g.bytes_per_s)))
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1));
        out.into_iter().map(|(pid, _)| pid).collect()
    }
}

impl Watched {
    fn record(&mut self, now_ns: u64, reading: Reading, s: &WatchSettings<'_>) {
        self.last = reading;
        while self.history.len() >= s.history.max(1) {
            self.history.pop_front();
        }
        self.history.push_back((now_ns, reading.anon_bytes));
        let points: Vec<(u64, u64)> = self.history.iter().copied().collect();
        self.growth = growth::fit(&points);
        self.growing = self
            .growth
            .as_ref()
            .is_some_and(|g| is_growing(g, s.min_growth));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn reads_status() {
        let text = "Name:\tserver\nUmask:\t0022\nVmRSS:\t  2048 kB\nRssAnon:\t  1024 kB\n";
        let (name, r) = parse_status(text).expect("a user process");
        assert_eq!(name, "server");
        assert_eq!((r.resident_bytes, r.anon_bytes), (2 << 20, 1 << 20));
        assert!(parse_status("Name:\tkthreadd\nUmask:\t0000\n").is_none());
    }

    #[test]
    fn a_steady_climb_is_flagged_a_plateau_and_noise_are_not() {
        let climb: Vec<(u64, u64)> = (0..10).map(|i| (i * S, (100 + i) << 20)).collect();
        let g = growth::fit(&climb).expect("enough points");
        assert!(is_growing(&g, 4 << 20));
        assert!(!is_growing(&g, 64 << 20), "9 MiB of growth is under 64 MiB");
        let plateau: Vec<(u64, u64)> = (0..12).map(|i| (i * S, i.min(6) << 20)).collect();
        let g = growth::fit(&plateau).expect("enough points");
        assert!(!is_growing(&g, 1 << 20), "{g:?}");
        let noise: Vec<(u64, u64)> = (0..12)
            .map(|i| (i * S, (50 << 20) + (i % 2) * (3 << 20)))
            .collect();
        let g = growth::fit(&noise).expect("enough points");
        assert!(!is_growing(&g, 1 << 20), "{g:?}");
    }
}
