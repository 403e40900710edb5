//! `alloctrace system`: every process on the host the filters admit. Probes go on each
//! distinct allocator file once, for every process mapping it (`Tracer::probe_everyone`);
//! the kernel decides per process whether a hit is traced (its `TARGETS` filter, filled here
//! from `/proc` at start, then by the kernel itself at each fork and exec through the
//! `Admission` filters). A process's state is released when it exits, keeping only its row
//! of the report.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use tracer_common::{Admission, admission, maps};

use super::{SystemTarget, lifecycle, state::State, tracer::Tracer};
use crate::{
    analysis::ProcessVerdict,
    error::{Error, Result},
    model::Tgid,
    procfs,
    report::{
        ProcessFacts, ProcessReport,
        system::{ProcessRow, worse_first},
    },
    symbolize::Symbolizer,
};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Rows of exited processes kept at most; past it, the least interesting are dropped.
const MAX_EXITED_ROWS: usize = 10_000;

/// A `--cgroup` filter, resolved.
#[derive(Clone, Debug)]
pub struct CgroupFilter {
    /// Its path under the cgroup root (`/system.slice/nginx.service`).
    pub path: String,
    pub id: u64,
    /// Its depth below the root (the root is 0).
    pub level: u64,
}

/// The filters, as the kernel and `/proc` see them.
#[derive(Clone, Debug, Default)]
pub struct Filters {
    pub pids: Vec<u32>,
    pub comms: Vec<String>,
    pub exclude: Vec<String>,
    pub cgroups: Vec<CgroupFilter>,
}

impl Filters {
    pub fn resolve(target: &SystemTarget) -> Result<Self> {
        let too_many = |what: &str, n: usize| {
            (n > admission::MAX).then(|| Error::Usage {
                message: format!("at most {} {what} filters", admission::MAX),
            })
        };
        for (what, n) in [
            ("--comm", target.comms.len()),
            ("--exclude-comm", target.exclude_comms.len()),
            ("--cgroup", target.cgroups.len()),
        ] {
            if let Some(e) = too_many(what, n) {
                return Err(e);
            }
        }
        Ok(Self {
            pids: target.pids.clone(),
            comms: target.comms.clone(),
            exclude: target.exclude_comms.clone(),
            cgroups: target
                .cgroups
                .iter()
                .map(|c| resolve_cgroup(c))
                .collect::<Result<_>>()?,
        })
    }

    /// The kernel's half: who is admitted at exec (nobody new when `--pid` chose the
    /// processes: only they and what they start are traced).
    pub fn admission(&self) -> Admission {
        let mut a = Admission {
            on_exec: u8::from(self.pids.is_empty()),
            comms: self.comms.len() as u8,
            excluded: self.exclude.len() as u8,
            cgroups: self.cgroups.len() as u8,
            ..Admission::default()
        };
        for (slot, name) in a.comm.iter_mut().zip(&self.comms) {
            copy_comm(slot, name);
        }
        for (slot, name) in a.exclude.iter_mut().zip(&self.exclude) {
            copy_comm(slot, name);
        }
        for (slot, c) in a.cgroup.iter_mut().zip(&self.cgroups) {
            *slot = [c.id, c.level];
        }
        a
    }

    /// The same filters for a process already running, from `/proc`.
    pub(crate) fn admits(&self, pid: u32) -> bool {
        if !self.pids.is_empty() {
            return self.pids.contains(&pid);
        }
        let comm = procfs::comm(pid).unwrap_or_default();
        if self.exclude.contains(&comm) {
            return false;
        }
        if !self.comms.is_empty() && !self.comms.contains(&comm) {
            return false;
        }
        if self.cgroups.is_empty() {
            return true;
        }
        let cgroup = procfs::cgroup(pid).unwrap_or_default();
        self.cgroups.iter().any(|c| within(&cgroup, &c.path))
    }
}

/// A `comm` as the kernel keeps it: NUL-padded 16 bytes.
fn copy_comm(slot: &mut [u8; 16], name: &str) {
    let bytes = name.as_bytes();
    let n = bytes.len().min(15);
    slot[..n].copy_from_slice(&bytes[..n]);
}

/// Whether cgroup path `path` is `dir` or below it.
fn within(path: &str, dir: &str) -> bool {
    let dir = dir.trim_end_matches('/');
    dir.is_empty() || path == dir || path.starts_with(&format!("{dir}/"))
}

/// A `--cgroup` argument: a path under the cgroup root, or a container id (or its first
/// 12+ characters) found in a cgroup's name.
fn resolve_cgroup(arg: &str) -> Result<CgroupFilter> {
    let dir = if arg.starts_with('/') {
        PathBuf::from(CGROUP_ROOT).join(arg.trim_start_matches('/'))
    } else {
        find_container(arg)?
    };
    let meta = std::fs::metadata(&dir).map_err(|source| Error::Io {
        what: format!("cannot read cgroup {}", dir.display()),
        source,
    })?;
    let rel = dir
        .strip_prefix(CGROUP_ROOT)
        .unwrap_or(&dir)
        .to_string_lossy()
        .into_owned();
    let level = Path::new(&rel).components().count() as u64;
    Ok(CgroupFilter {
        path: format!("/{}", rel.trim_start_matches('/')),
        id: meta.ino(),
        level,
    })
}

/// The one cgroup whose name holds container id `id`.
fn find_container(id: &str) -> Result<PathBuf> {
    if id.len() < 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Usage {
            message: format!(
                "--cgroup {id}: give a cgroup path (starting with /) or a container id of at \
                 least 12 hex digits"
            ),
        });
    }
    let mut found = Vec::new();
    let mut stack = vec![(PathBuf::from(CGROUP_ROOT), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            if entry.file_name().to_string_lossy().contains(id) {
                found.push(path);
            } else if depth < 8 {
                stack.push((path, depth + 1));
            }
        }
    }
    // The outermost match (a container's scope, not a cgroup nested inside it).
    found.sort_by_key(|p| p.components().count());
    found.into_iter().next().ok_or_else(|| Error::Usage {
        message: format!("--cgroup {id}: no cgroup under {CGROUP_ROOT} names this container"),
    })
}

/// Starts tracing every running process the filters admit; returns how many.
pub fn start(filters: &Filters, tracer: &mut Tracer, state: &mut State, now: u64) -> usize {
    let me = std::process::id();
    let pids: Vec<u32> = procfs::pids()
        .into_iter()
        .filter(|&pid| pid != me && procfs::traceable(pid).is_ok() && filters.admits(pid))
        .collect();
    let progress = crate::progress::bar("discovering processes", pids.len() as u64);
    let mut traced = 0;
    for pid in pids {
        progress.inc(1);
        // Gone meanwhile, or unreadable: nothing to trace.
        let Ok(plan) = tracer.discovery.process(pid) else {
            continue;
        };
        if tracer.start(&plan).is_err() {
            continue;
        }
        lifecycle::track_attached(state, &plan, now);
        traced += 1;
    }
    progress.finish_and_clear();
    traced
}

/// What `system` keeps beyond the state: the rows of processes gone, and the trap cost.
pub struct Host {
    pub exited_rows: Vec<ProcessRow>,
    pub rows_dropped: u64,
    /// The full reports of the worst processes that ended (at most `--detail`): a leak in a
    /// process that is gone by the end of the trace is still shown in full.
    pub exited_detail: Vec<(ProcessRow, ProcessReport)>,
    /// Nanoseconds one probe hit costs (measured at start-up).
    pub trap_ns: f64,
    /// When the host trace began, `CLOCK_MONOTONIC` ns (rows say when processes ended).
    started_ns: u64,
    symbolizer: Symbolizer,
    /// What a process's full report is built with.
    report: ReportSettings,
}

/// The report options a retired process's full report is built with.
pub struct ReportSettings {
    pub top: usize,
    pub sample_bytes: u64,
    pub ring_mib: u32,
    pub max_sampled: u32,
    pub detail: usize,
}

impl Host {
    pub fn new(trap_ns: f64, report: ReportSettings) -> Self {
        Self {
            exited_rows: Vec::new(),
            rows_dropped: 0,
            exited_detail: Vec::new(),
            trap_ns,
            started_ns: procfs::monotonic_ns(),
            symbolizer: Symbolizer::new(),
            report,
        }
    }

    /// Keeps the full report of `p` when its row is among the worst `--detail` ended ones.
    fn keep_detail(&mut self, row: &ProcessRow, p: &crate::model::Process, state: &State) {
        let worth = matches!(
            row.verdict,
            Some(ProcessVerdict::Leak | ProcessVerdict::Fragmentation)
        );
        if !worth || self.report.detail == 0 {
            return;
        }
        // Built only when it would be kept: it is among the worst so far (the kept ones are
        // in order, the least bad last).
        if self.exited_detail.len() >= self.report.detail
            && self
                .exited_detail
                .last()
                .is_some_and(|(least, _)| worse_first(row, least).is_ge())
        {
            return;
        }
        let inputs = crate::report::Inputs {
            model: &state.model,
            stacks: &state.stacks,
            facts: &state.facts,
            capture: Default::default(),
            kernel: Default::default(),
            duration: Duration::from_nanos(procfs::monotonic_ns().saturating_sub(self.started_ns)),
            end_ns: procfs::monotonic_ns(),
            top: self.report.top,
            sample_bytes: self.report.sample_bytes,
            ring_mib: self.report.ring_mib,
            max_sampled: self.report.max_sampled,
            warnings: Vec::new(),
            system: None,
        };
        let report = crate::report::one_process(p, &inputs, &self.symbolizer);
        self.exited_detail.push((row.clone(), report));
        self.exited_detail.sort_by(|a, b| worse_first(&a.0, &b.0));
        self.exited_detail.truncate(self.report.detail);
    }

    /// Takes the row of every process that ended, then forgets it: a host's processes come
    /// and go for days, the collector keeps only their rows (bounded).
    pub fn retire(&mut self, state: &mut State) {
        let end_ns = procfs::monotonic_ns();
        for (pid, image) in state.take_ended() {
            let default_facts = ProcessFacts::default();
            // Its images up to the one that ended; a later one is another process that got
            // the pid since, still running.
            let images: Vec<&crate::model::Process> = state
                .model
                .processes()
                .filter(|p| p.tgid == pid && p.image <= image)
                .collect();
            for p in images {
                let facts = state.facts.get(&(pid, p.image)).unwrap_or(&default_facts);
                let row = crate::report::system::row(
                    p,
                    facts,
                    &state.stacks,
                    &self.symbolizer,
                    (self.started_ns, end_ns, self.trap_ns),
                );
                self.keep_detail(&row, p, state);
                self.exited_rows.push(row);
            }
            state.forget((pid, image));
        }
        if self.exited_rows.len() > MAX_EXITED_ROWS {
            crate::report::system::order(&mut self.exited_rows);
            let dropped = self.exited_rows.len() - MAX_EXITED_ROWS;
            self.exited_rows.truncate(MAX_EXITED_ROWS);
            self.rows_dropped += dropped as u64;
        }
    }
}

/// Reads each traced process's probe hits from the kernel's filter into its facts.
pub fn read_traps(tracer: &mut Tracer, state: &mut State) {
    let Some(map) = tracer.loaded.ebpf.map(maps::TARGETS) else {
        return;
    };
    let Ok(targets) = BpfHashMap::<&MapData, u32, u64>::try_from(map) else {
        return;
    };
    let counts: Vec<(Tgid, u64)> = targets.iter().filter_map(|r| r.ok()).collect();
    for (pid, traps) in counts {
        if state.follows(pid) {
            let facts = state.facts_mut(pid);
            facts.traps = facts.traps.max(traps);
        }
    }
}

/// What one probe hit costs here, in ns: `malloc`/`free` pairs of the collector's own, timed
/// before its probes exist and again after (its own hits are filtered out in the kernel, as
/// any process the filters leave out), divided by the hits the kernel counted.
pub struct Calibration {
    before: Duration,
    hits_before: u64,
}

const CALIBRATION_PAIRS: u32 = 100_000;

fn time_pairs() -> Duration {
    let start = Instant::now();
    for i in 0..CALIBRATION_PAIRS {
        // SAFETY: plain C allocation, freed at once.
        unsafe {
            let p = libc::malloc(64 + (i & 63) as usize);
            std::hint::black_box(p);
            libc::free(p);
        }
    }
    start.elapsed()
}

impl Calibration {
    /// Times the pairs before the probes go on.
    pub fn before(untraced_hits: u64) -> Self {
        let _ = time_pairs(); // warm the cache
        Self {
            before: time_pairs(),
            hits_before: untraced_hits,
        }
    }

    /// Times them again with the probes on; `untraced_hits` is the kernel's count now.
    pub fn after(self, untraced_hits: impl Fn() -> u64) -> f64 {
        let elapsed = time_pairs();
        let hits = untraced_hits().saturating_sub(self.hits_before).max(1);
        let extra = elapsed.saturating_sub(self.before);
        extra.as_nanos() as f64 / hits as f64
    }
}
