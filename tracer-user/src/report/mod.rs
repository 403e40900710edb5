//! The report: built once from the model, the analysis and the symbols, then rendered.
//! Presentation only: it decides what is shown and how, never what is true.
//!
//! Every format is rendered from the same [`Report`]: `text` for people, `json` (the v1
//! contract) for programs, `pprof`, `folded` and `svg` for the profile and flame-graph tools
//! people already use. None of them looks at the model again.

pub mod folded;
mod host_table;
mod library;
pub mod losses;
pub mod pprof;
mod sites;
pub mod svg;
pub mod system;
pub mod text;

use std::{
    collections::BTreeMap,
    io::{self, Write},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rustc_hash::FxHashMap;
use serde::Serialize;

pub use losses::{Events, Losses, Predictions};

use crate::{
    analysis::{self, AllocatorFree, ProcessVerdict, SiteAssessment, SiteVerdict, units},
    capture::{CaptureStats, KernelCounters},
    cli::{Format, Weight},
    model::{Model, Process, Site, SiteIdx, SiteKind, Spread, StackTable, Tgid},
    symbolize::{Frame, ProcessMaps, Stack, Stacks, Symbolizer},
};

pub const SCHEMA: &str = "alloctrace.report/v1";

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub duration_s: f64,
    pub sample_bytes: u64,
    pub events: Events,
    /// True when anything was lost or doubted that could change a number: see `warnings`.
    pub partial: bool,
    pub warnings: Vec<String>,
    /// What tracing cost the collector itself.
    pub collector: Collector,
    /// `system`: a row per process on the host, the worst first, and what tracing cost;
    /// `processes` then holds the worst few in full.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<system::SystemReport>,
    pub processes: Vec<ProcessReport>,
}

/// The collector's own resource use over the whole run.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Collector {
    /// User + system CPU seconds of the alloctrace process (all its threads).
    pub cpu_s: f64,
    /// Peak resident memory of the alloctrace process.
    pub max_rss_bytes: u64,
    /// Heap blocks outstanding in the model at the end.
    pub outstanding_allocations: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProcessReport {
    pub pid: Tgid,
    pub ppid: Option<u32>,
    pub comm: String,
    pub exe: String,
    /// `fp` or `dwarf`: how this process's stacks were captured.
    pub stack_mode: Option<&'static str>,
    /// Why that mode (`--stack-mode`, or what was found in the executable).
    pub stack_mode_reason: Option<String>,
    /// The allocator holding the most live bytes; `none` when alloctrace found nothing it can
    /// probe (then there is no verdict).
    pub allocator: String,
    /// Every allocator seen in the process, with what it holds and made.
    pub allocators: Vec<AllocatorReport>,
    /// Which program image of the process this is (0, then one more after each `exec`).
    pub image: u32,
    /// This image ended when the process replaced its program: its blocks ended with it.
    pub replaced_by_exec: bool,
    /// When forked by a traced process: the parent's blocks it started with
    /// (copy-on-write, not counted in its own live bytes), and those it freed.
    pub inherited: Option<InheritedReport>,
    /// Processes it forked, and of those the ones not traced (never silently).
    pub children_forked: u64,
    pub children_untraced: u64,
    /// Forked by a traced process: how long after the fork its probes were in place.
    pub probes_after_fork_s: Option<f64>,
    pub exited: bool,
    /// When it ended (it exited, or this image was replaced by an `exec`), in seconds since
    /// the trace began; null while it runs. A later process given the same pid during the
    /// trace is a row of its own.
    pub ended_at_s: Option<f64>,
    /// Tracing began after the process had started (`attach`): what it allocated before is
    /// unseen.
    pub attached: bool,
    /// `null` when the evidence cannot support a verdict (`evidence` says why).
    pub verdict: Option<ProcessVerdict>,
    /// The numbers behind the verdict, in words.
    pub evidence: String,
    pub live_bytes: u64,
    pub live_allocations: u64,
    /// Part of `live_bytes` in anonymous mappings the program made itself.
    pub mmap_live_bytes: u64,
    pub peak_live_bytes: u64,
    pub peak: Peak,
    pub total_allocations: u64,
    /// Allocations actually recorded: all of them when exact, the samples otherwise.
    pub recorded_allocations: u64,
    pub total_bytes: u64,
    pub frees: u64,
    /// Frees of blocks allocated before tracing began (ignored).
    pub unknown_frees: u64,
    /// Reallocs of blocks allocated before tracing began: their new block is counted, the old
    /// one could not be.
    pub unknown_reallocs: u64,
    /// Probe hits (traps into the kernel) the process took, when the trace counts them
    /// (`system`, the agent); 0 otherwise.
    pub traps: u64,
    /// Resident anon memory of the heap, the allocator's and the program's own mappings at
    /// the last sample; null when it could not be measured.
    pub footprint_bytes: Option<u64>,
    /// Footprint known to be memory the program freed and the allocator kept: all of
    /// footprint − live when every allocation was seen; after an attach only what the
    /// allocator's own accounting or the trace shows.
    pub retained_bytes: Option<u64>,
    /// After an attach: footprint no traced event accounts for (allocated before the
    /// attach, live or free: unknown).
    pub pre_attach_bytes: Option<u64>,
    /// Free memory inside the allocator by its own accounting, read from the process.
    pub allocator_free: Option<AllocatorFree>,
    /// When the process exited after freeing its memory in a final teardown: the live
    /// bytes just before it (the verdict is the one of the trace up to then).
    pub pre_teardown: Option<PreTeardown>,
    /// With byte sampling: 95 % intervals of the estimates above.
    pub intervals: Option<Intervals>,
    /// Samples over time: seconds since the first event, live bytes, footprint.
    pub series: Vec<ProcessPoint>,
    pub sites_total: usize,
    pub sites_omitted: usize,
    pub sites: Vec<SiteReport>,
    /// The modules (executable, libraries) the shown stacks point into, with build ids, so
    /// that profile tools can find the right binary and its debug info.
    pub modules: Vec<ModuleReport>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModuleReport {
    /// The path the process knew the module by (as in `frames[].module`).
    pub path: String,
    /// The GNU build id in hex; null when the module has none or could not be read.
    pub build_id: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AllocatorReport {
    pub name: String,
    pub live_bytes: u64,
    pub total_bytes: u64,
    pub live_allocations: u64,
    pub total_allocations: u64,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct InheritedReport {
    pub from_pid: Tgid,
    pub bytes: u64,
    pub allocations: u64,
    pub freed_bytes: u64,
    pub freed_allocations: u64,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct PreTeardown {
    pub at_s: f64,
    pub live_bytes: u64,
    /// How long the teardown took, up to the exit.
    pub lasted_s: f64,
}

/// 95 % intervals `[low, high]` of sampled estimates, computed from the samples.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Intervals {
    pub live_bytes: [u64; 2],
    pub live_allocations: [u64; 2],
    pub total_bytes: [u64; 2],
    pub total_allocations: [u64; 2],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_live_bytes: Option<[u64; 2]>,
}

impl Intervals {
    fn of(live: (u64, f64), total: (u64, f64), spread: &Spread) -> Self {
        Self {
            live_bytes: interval(live.0 as f64, spread.live_bytes),
            live_allocations: interval(live.1, spread.live_count),
            total_bytes: interval(total.0 as f64, spread.total_bytes),
            total_allocations: interval(total.1, spread.total_count),
            peak_live_bytes: None,
        }
    }
}

fn interval(estimate: f64, var: f64) -> [u64; 2] {
    let h = units::half_width(var).unwrap_or(0.0);
    [
        (estimate - h).max(0.0).round() as u64,
        (estimate + h).round() as u64,
    ]
}

#[derive(Clone, Debug, Serialize)]
pub struct ProcessPoint {
    pub t_s: f64,
    pub live_bytes: u64,
    pub footprint_bytes: Option<u64>,
}

/// The highest live bytes, when, and the biggest sites at the sample nearest to it.
#[derive(Clone, Debug, Serialize)]
pub struct Peak {
    pub live_bytes: u64,
    pub at_s: f64,
    pub sites: Vec<PeakSite>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PeakSite {
    pub function: String,
    pub live_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SiteReport {
    /// The stack from the program's own innermost frame outwards: `frames[0]` is the code
    /// that asked for memory, not the library machinery that got it.
    pub frames: Vec<FrameReport>,
    /// The frames between the allocator and `frames[0]`, innermost first: `operator new`,
    /// `std::vector<…>::_M_realloc_insert`, `hashbrown`'s table, `core::fmt`… (library
    /// code, see `report::library`). This list followed by `frames` is the whole stack.
    pub library_frames: Vec<FrameReport>,
    /// Callers are missing: the stack was deeper than `--stack-depth`, or than the stack
    /// copy (`--stack-bytes`) reached in `dwarf` mode.
    pub stack_truncated: bool,
    /// What was allocated, from DWARF: the container the library code belongs to or returns
    /// (`Vec<shop::Order>`, `HashMap<u64, String>`, `Rc<svc::Node>`, `std::vector<Rec>`,
    /// `std::map<int, std::string>`); `"unknown"` for Rust code whose binary has no debug
    /// info to say; null when nothing names it (C, C++ `new T`).
    pub allocated_type: Option<String>,
    /// `heap` (malloc family) or `mmap` (the program's own anonymous mappings).
    pub kind: SiteKind,
    pub live_bytes: u64,
    pub live_allocations: u64,
    pub total_allocations: u64,
    /// Allocations actually recorded: all of them when exact, the samples otherwise.
    pub recorded_allocations: u64,
    pub total_bytes: u64,
    pub frees: u64,
    /// With byte sampling: 95 % intervals of the estimates above.
    pub intervals: Option<Intervals>,
    /// Verdict, evidence, growth, ages and lifetimes, as the analysis found them.
    #[serde(flatten)]
    pub assessment: SiteAssessment,
    /// `[seconds since the first event, live bytes]` samples.
    pub series: Vec<(f64, u64)>,
    /// The stacks this site is made of (they differ only in return addresses), largest
    /// first: for pprof-style consumers that keep addresses.
    pub stacks: Vec<StackReport>,
}

/// One stack of a site: each frame's address and this stack's share of the site's numbers.
#[derive(Clone, Debug, Serialize)]
pub struct StackReport {
    /// File offset (hex) in the frame's module of each frame of `library_frames` then
    /// `frames`, in that order.
    pub addresses: Vec<String>,
    pub live_bytes: u64,
    pub live_allocations: u64,
    pub total_allocations: u64,
    pub total_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct FrameReport {
    /// Demangled name, or `module+0xoffset` when no symbol covers the address.
    pub function: String,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub module: Option<String>,
    /// File offset in `module` (hex), or the raw address when the module is unknown.
    pub address: String,
    pub inlined: bool,
}

/// A process and one of its program images (an `exec` starts the next).
pub type ImageKey = (Tgid, u32);

/// What the session observed about a process image besides its allocations.
#[derive(Clone, Debug, Default)]
pub struct ProcessFacts {
    pub comm: Option<String>,
    pub exe: Option<PathBuf>,
    /// The program file this image runs, (device, inode), as its `exec` reported it: what
    /// `/proc` is checked against, so that another program's names and mappings, read after
    /// an `exec` not applied yet, are never taken for this image's.
    pub exe_file: Option<(u64, u64)>,
    pub maps: ProcessMaps,
    pub footprint_bytes: Option<u64>,
    pub exited: bool,
    /// When the process was seen gone, `CLOCK_MONOTONIC` ns: the end of its window.
    pub end_ns: Option<u64>,
    pub exit_code: Option<i32>,
    pub exit_signal: Option<i32>,
    /// How its stacks were captured, and why.
    pub stack_mode: Option<crate::probe::stack_mode::Decision>,
    /// Traced from after it started (`attach`), not from its first allocation.
    pub attached: bool,
    /// The allocators probed in it (`glibc`, `jemalloc (je_)` …); empty when none could be
    /// (see `no_allocator`).
    pub allocators: Vec<String>,
    /// The modules carrying them, by the path the process knows each by.
    pub allocator_modules: Vec<std::sync::Arc<Path>>,
    /// Why no allocator could be probed.
    pub no_allocator: Option<String>,
    /// Forked by a traced process, it ended before its own probes were attached: nothing it
    /// allocated was seen (said once for all such processes, not per process).
    pub ended_before_probes: bool,
    /// It replaced its program with `exec` and was gone before the new program's mappings
    /// could be read: which allocator it used is unknown (not "none"), so `run` does not
    /// fail for it.
    pub gone_before_discovery: bool,
    /// Free memory inside its allocator, by the allocator's own accounting.
    pub allocator_free: Option<AllocatorFree>,
    /// Forked by a traced process: its probes were attached this long after the fork
    /// (the kernel traced it from its first instruction; what it allocated before its own
    /// probes were in place was not seen).
    pub probes_after_ns: Option<u64>,
    /// When those probes were in place (`CLOCK_MONOTONIC` ns): an image its `exec` began
    /// before then missed its start too.
    pub probes_placed_ns: Option<u64>,
    /// Its parent process.
    pub ppid: Option<u32>,
    /// Its cgroup (v2 path).
    pub cgroup: Option<String>,
    /// Probe hits it took (counted in `system`).
    pub traps: u64,
    /// When it started (clock ticks after boot): tells it from a later process given the
    /// same pid.
    pub start_ticks: Option<u64>,
}

/// What `system` adds to the inputs: the rows of processes already gone, and what a probe
/// hit costs.
pub struct SystemInputs<'a> {
    pub exited_rows: &'a [system::ProcessRow],
    /// The full reports kept of the worst processes that ended (their state is released).
    pub exited_detail: &'a [(system::ProcessRow, ProcessReport)],
    pub rows_dropped: u64,
    pub trap_ns: f64,
    pub untraced_traps: u64,
    /// Processes shown in full.
    pub detail: usize,
}

/// Everything a report is built from.
pub struct Inputs<'a> {
    pub model: &'a Model,
    pub stacks: &'a StackTable,
    pub facts: &'a FxHashMap<ImageKey, ProcessFacts>,
    pub capture: CaptureStats,
    pub kernel: KernelCounters,
    pub duration: Duration,
    pub end_ns: u64,
    pub top: usize,
    /// Mean bytes between samples (0: exact); counts are then estimates.
    pub sample_bytes: u64,
    /// Size of each ring buffer, MiB (to name it when events were lost).
    pub ring_mib: u32,
    /// `--max-sampled` (to name it when sampled blocks were lost).
    pub max_sampled: u32,
    pub warnings: Vec<String>,
    pub system: Option<SystemInputs<'a>>,
}

impl Inputs<'_> {
    /// When the trace began, `CLOCK_MONOTONIC` ns.
    pub fn start_ns(&self) -> u64 {
        self.end_ns
            .saturating_sub(u64::try_from(self.duration.as_nanos()).unwrap_or(u64::MAX))
    }
}

/// When image `p` ended (its exit, or the `exec` that replaced it), in seconds since the trace
/// began at `start_ns`: the report says when a process whose pid may since be another's ended.
pub fn ended_at_s(p: &Process, facts: &ProcessFacts, start_ns: u64) -> Option<f64> {
    let exec = p.ended_ns.filter(|_| p.replaced_by_exec);
    let end = facts.end_ns.filter(|_| facts.exited).or(exec)?;
    Some(end.saturating_sub(start_ns) as f64 / 1e9)
}

pub fn build(inputs: Inputs<'_>, symbolizer: &Symbolizer) -> Report {
    let replaced_live = inputs.model.processes().map(Process::replaced_live).sum();
    let assessed = losses::assess(
        &inputs.kernel,
        &inputs.capture,
        replaced_live,
        &losses::Settings {
            ring_mib: inputs.ring_mib,
            sample_bytes: inputs.sample_bytes,
            max_sampled: inputs.max_sampled,
        },
    );
    let mut warnings = inputs.warnings.clone();
    warnings.extend(assessed.warnings);
    let mut processes: Vec<&Process> = inputs.model.processes().collect();
    processes.sort_by_key(|p| p.tgid);
    let system = inputs
        .system
        .as_ref()
        .map(|sys| system_report(&processes, sys, &inputs, symbolizer));
    let mut shown: Option<Vec<(Tgid, u32)>> = None;
    if let (Some(report), Some(sys)) = (&system, &inputs.system) {
        // In full: the worst processes, still there or ended (of those, the reports kept).
        let worst: Vec<(Tgid, u32)> = report
            .rows
            .iter()
            .take(sys.detail)
            .map(|r| (r.pid, r.image))
            .collect();
        processes.retain(|p| worst.contains(&(p.tgid, p.image)));
        shown = Some(worst);
    }
    let mut processes: Vec<ProcessReport> = processes
        .into_iter()
        .map(|p| process_report(p, &inputs, symbolizer, &mut warnings))
        .collect();
    if let (Some(worst), Some(sys)) = (&shown, &inputs.system) {
        processes.extend(
            sys.exited_detail
                .iter()
                .map(|(_, d)| d)
                .filter(|d| worst.contains(&(d.pid, d.image)))
                .cloned(),
        );
        processes.sort_by_key(|p| worst.iter().position(|&w| w == (p.pid, p.image)));
    }
    let (cpu_s, max_rss_bytes) = crate::procfs::self_usage();
    let collector = Collector {
        outstanding_allocations: inputs.model.outstanding() as u64,
        cpu_s,
        max_rss_bytes,
    };
    Report {
        collector,
        schema: SCHEMA,
        duration_s: inputs.duration.as_secs_f64(),
        sample_bytes: inputs.sample_bytes,
        partial: assessed.partial,
        events: assessed.events,
        warnings,
        system,
        processes,
    }
}

/// `system`'s rows: those of the processes still in the model, and of those gone.
fn system_report(
    processes: &[&Process],
    sys: &SystemInputs<'_>,
    inputs: &Inputs<'_>,
    symbolizer: &Symbolizer,
) -> system::SystemReport {
    let default_facts = ProcessFacts::default();
    let mut rows: Vec<system::ProcessRow> = processes
        .iter()
        .map(|p| {
            let facts = inputs
                .facts
                .get(&(p.tgid, p.image))
                .unwrap_or(&default_facts);
            system::row(
                p,
                facts,
                inputs.stacks,
                symbolizer,
                (inputs.start_ns(), inputs.end_ns, sys.trap_ns),
            )
        })
        .collect();
    rows.extend(sys.exited_rows.iter().cloned());
    system::order(&mut rows);
    system::SystemReport {
        exited: rows.iter().filter(|r| r.exited).count() as u64 + sys.rows_dropped,
        rows,
        rows_dropped: sys.rows_dropped,
        trap_ns: sys.trap_ns,
        untraced_traps: sys.untraced_traps,
        untraced_trap_cpu_s: sys.untraced_traps as f64 * sys.trap_ns / 1e9,
    }
}

/// The analysis's view of what the session knows about a process.
fn context(p: &Process, facts: &ProcessFacts, end_ns: u64) -> analysis::Context {
    analysis::Context {
        end_ns: facts.end_ns.unwrap_or(end_ns),
        exited: facts.exited,
        attached: facts.attached,
        footprint_bytes: facts.footprint_bytes,
        allocator_free: facts.allocator_free.clone(),
        withheld: withheld(p, facts),
    }
}

/// Why a process gets no verdict, if it gets none: nothing in it could be probed, or it
/// ended while its probes were being placed (what was seen of it, if anything, is only what
/// it did after some of them were in: a verdict on that would claim more than was seen).
fn withheld(p: &Process, facts: &ProcessFacts) -> Option<String> {
    let seen: u64 = p.allocators.iter().map(|a| a.total_allocations).sum();
    if facts.ended_before_probes && seen > 0 {
        return Some(format!(
            "no verdict: pid {} ended before its probes were all in place, within milliseconds \
             of its fork: {seen} of its allocations were seen, the ones before were not",
            p.tgid
        ));
    }
    unprobed(p, facts).then(|| {
        format!(
            "no verdict: no allocator alloctrace can probe was found in pid {} ({})",
            p.tgid,
            facts.no_allocator.as_deref().unwrap_or("reason unknown")
        )
    })
}

/// Nothing in the process could be probed (and nothing was seen allocating: probes still in
/// place across an `exec` the collector had no time to look at keep reporting).
fn unprobed(p: &Process, facts: &ProcessFacts) -> bool {
    facts.allocators.is_empty() && p.allocators.iter().all(|a| a.total_allocations == 0)
}

/// The full report of one process, built on its own: `system` keeps those of the worst
/// processes that ended, whose state is then released.
pub fn one_process(p: &Process, inputs: &Inputs<'_>, symbolizer: &Symbolizer) -> ProcessReport {
    process_report(p, inputs, symbolizer, &mut Vec::new())
}

fn process_report(
    p: &Process,
    inputs: &Inputs<'_>,
    symbolizer: &Symbolizer,
    warnings: &mut Vec<String>,
) -> ProcessReport {
    let default_facts = ProcessFacts {
        allocators: vec!["glibc".into()],
        ..ProcessFacts::default()
    };
    let facts = inputs
        .facts
        .get(&(p.tgid, p.image))
        .unwrap_or(&default_facts);
    let since = |ts: u64| ts.saturating_sub(p.first_ns) as f64 / 1e9;
    let sites = UserSites::of(p, inputs, facts, symbolizer);
    let assessment = &sites.assessment;
    warnings.extend(assessment.notes.iter().cloned());
    if let Some(d) = facts.stack_mode.as_ref().filter(|d| d.doubtful) {
        warnings.push(format!("pid {}: {}", p.tgid, d.reason));
    }
    if unprobed(p, facts) && !facts.ended_before_probes {
        warnings.push(format!(
            "pid {}: no allocator alloctrace can probe ({}): its allocations were not seen, so \
             it has no verdict",
            p.tgid,
            facts.no_allocator.as_deref().unwrap_or("reason unknown")
        ));
    }
    let sampled = inputs.sample_bytes > 0;
    let top = sites.top(inputs.top);
    let peak = Peak {
        live_bytes: p.peak_live_bytes,
        at_s: since(p.peak_ns),
        sites: peak_sites(p, &sites.groups)
            .into_iter()
            .map(|(g, bytes)| PeakSite {
                function: sites.first_function(g, symbolizer),
                live_bytes: bytes,
            })
            .collect(),
    };
    ProcessReport {
        pid: p.tgid,
        ppid: facts.ppid,
        comm: facts.comm.clone().unwrap_or_default(),
        exe: facts
            .exe
            .as_ref()
            .map(|e| e.display().to_string())
            .unwrap_or_default(),
        allocator: main_allocator(p, facts),
        allocators: allocator_reports(p),
        image: p.image,
        replaced_by_exec: p.replaced_by_exec,
        inherited: p.inherited.as_ref().map(|i| InheritedReport {
            from_pid: i.parent,
            bytes: i.bytes,
            allocations: i.allocations,
            freed_bytes: i.freed_bytes,
            freed_allocations: i.freed_allocations,
        }),
        children_forked: p.children.forked,
        children_untraced: p.children.forked - p.children.traced,
        probes_after_fork_s: facts.probes_after_ns.map(|ns| ns as f64 / 1e9),
        stack_mode: facts.stack_mode.as_ref().map(|d| d.mode.name()),
        stack_mode_reason: facts.stack_mode.as_ref().map(|d| d.reason.clone()),
        exited: facts.exited,
        ended_at_s: ended_at_s(p, facts, inputs.start_ns()),
        attached: facts.attached,
        verdict: assessment.verdict,
        evidence: assessment.evidence.clone(),
        live_bytes: p.live_bytes,
        live_allocations: estimate(p.est.live),
        mmap_live_bytes: p.mmap_live_bytes,
        peak_live_bytes: p.peak_live_bytes,
        peak,
        total_allocations: estimate(p.est.total),
        recorded_allocations: p.total_allocations,
        total_bytes: p.total_bytes,
        frees: estimate(p.est.frees),
        unknown_frees: p.unknown_frees,
        unknown_reallocs: p.unknown_reallocs,
        traps: facts.traps,
        footprint_bytes: facts.footprint_bytes,
        retained_bytes: assessment.retained_bytes,
        pre_attach_bytes: assessment.pre_attach_bytes,
        allocator_free: facts.allocator_free.clone(),
        pre_teardown: assessment.teardown.map(|t| PreTeardown {
            at_s: since(t.start_ns),
            live_bytes: t.live_before,
            lasted_s: t.exit_ns.saturating_sub(t.start_ns) as f64 / 1e9,
        }),
        intervals: sampled.then(|| Intervals {
            peak_live_bytes: Some(interval(p.peak_live_bytes as f64, p.peak_var_bytes)),
            ..Intervals::of(
                (p.live_bytes, p.est.live),
                (p.total_bytes, p.est.total),
                &p.spread,
            )
        }),
        series: p
            .series
            .points()
            .iter()
            .map(|&(t, s)| ProcessPoint {
                t_s: since(t),
                live_bytes: s.live_bytes,
                footprint_bytes: s.footprint_bytes,
            })
            .collect(),
        sites_total: sites.groups.len(),
        sites_omitted: sites.groups.len().saturating_sub(inputs.top),
        sites: top
            .iter()
            .enumerate()
            .map(|(rank, &g)| sites.report(g, rank, &top, p, inputs, symbolizer))
            .collect(),
        modules: modules_of(
            top.iter()
                .flat_map(|&g| sites.groups[g].iter())
                .map(|&i| sites.symbolized.get(i as usize)),
            symbolizer,
        ),
    }
}

/// Every module the stacks point into, by path, with its build id.
fn modules_of<'a>(
    stacks: impl Iterator<Item = Stack<'a>>,
    symbolizer: &Symbolizer,
) -> Vec<ModuleReport> {
    let mut modules: BTreeMap<String, Option<&Arc<Path>>> = BTreeMap::new();
    for frame in stacks.flat_map(Stack::frames) {
        if let Some(module) = &frame.module {
            let object = modules.entry(module.display().to_string()).or_default();
            if object.is_none() {
                *object = frame.object.as_ref();
            }
        }
    }
    modules
        .into_iter()
        .map(|(path, object)| ModuleReport {
            path,
            build_id: object.and_then(|o| symbolizer.build_id(o)),
        })
        .collect()
}

/// The allocator holding the most live bytes (the one most used when nothing is live); the
/// first one probed when none was seen at work (or the probes could not say which: uprobes
/// without cookies); `none` when none could be probed, `unknown` when the program was gone
/// before it could be looked at.
fn main_allocator(p: &Process, facts: &ProcessFacts) -> String {
    let busiest = p
        .allocators
        .iter()
        .filter(|a| a.family != tracer_common::allocator::UNKNOWN)
        .max_by_key(|a| (a.live_bytes, a.total_bytes))
        .filter(|a| a.total_allocations > 0)
        .map(|a| allocator_name(a.family));
    let nothing_found = if facts.gone_before_discovery {
        "unknown" // gone before its new program could be looked at
    } else {
        "none"
    };
    busiest
        .or_else(|| facts.allocators.first().cloned())
        .unwrap_or_else(|| nothing_found.to_owned())
}

fn allocator_name(family: u8) -> String {
    crate::probe::tables::Family::of_id(family)
        .map_or_else(|| "unknown".to_owned(), |f| f.name().to_owned())
}

fn allocator_reports(p: &Process) -> Vec<AllocatorReport> {
    p.allocators
        .iter()
        .map(|a| AllocatorReport {
            name: allocator_name(a.family),
            live_bytes: a.live_bytes,
            total_bytes: a.total_bytes,
            live_allocations: a.live_allocations,
            total_allocations: a.total_allocations,
        })
        .collect()
}

fn site_intervals(s: &Site) -> Intervals {
    Intervals::of(
        (s.live_bytes, s.est.live),
        (s.total_bytes, s.est.total),
        &s.spread,
    )
}

/// A process's sites as the user sees them: its model sites grouped by symbolized stack
/// ([`sites::group`]), each group merged into one site and judged as one.
struct UserSites<'p> {
    /// The symbolized stack of each model site, indexed like `process.sites`.
    symbolized: Stacks,
    /// The process's sample instants, where its sites' series are read.
    instants: Vec<u64>,
    groups: Vec<Vec<SiteIdx>>,
    /// The verdicts, one site per group (`assessment.merged`, `assessment.sites`).
    assessment: analysis::ProcessAssessment<'p>,
}

impl<'p> UserSites<'p> {
    fn of(
        p: &'p Process,
        inputs: &Inputs<'_>,
        facts: &ProcessFacts,
        symbolizer: &Symbolizer,
    ) -> Self {
        // Every stack is symbolized (each distinct address once) to know which are one site.
        let stacks: Vec<&[u64]> = p
            .sites
            .iter()
            .map(|s| inputs.stacks.frames(s.stack))
            .collect();
        let symbolized = symbolizer.stacks(&facts.maps, &stacks);
        let groups = sites::group(&p.sites, &symbolized);
        let assessment = analysis::assess(p, &groups, &context(p, facts, inputs.end_ns));
        Self {
            symbolized,
            instants: p.sample_instants(),
            groups,
            assessment,
        }
    }

    /// The `top` sites to show: leaks first, then by live bytes, then by churn.
    fn top(&self, top: usize) -> Vec<usize> {
        let merged = &self.assessment.merged;
        let mut order: Vec<usize> = (0..merged.len()).collect();
        let key = |i: usize| {
            let s = &merged[i];
            (
                self.assessment.sites[i].verdict == SiteVerdict::Leak,
                s.live_bytes,
                s.total_bytes,
                s.total_allocations,
            )
        };
        order.sort_by_key(|&i| std::cmp::Reverse(key(i)));
        order.truncate(top);
        order
    }

    /// Group `g`'s frames (its largest stack's), split where the program's code starts.
    fn split(&self, g: usize, symbolizer: &Symbolizer) -> SplitSite {
        let first = self.groups[g][0] as usize;
        split_site(&self.symbolized.get(first).to_vec(), &symbolizer.types)
    }

    /// The program's innermost function in group `g`'s stack.
    fn first_function(&self, g: usize, symbolizer: &Symbolizer) -> String {
        self.split(g, symbolizer)
            .frames
            .first()
            .map_or_else(|| "<unknown>".to_owned(), |f| f.function.clone())
    }

    /// How the text refers to group `g`: its rank among the shown sites, and its function.
    fn name(&self, g: usize, shown: &[usize], symbolizer: &Symbolizer) -> String {
        let rank = shown
            .iter()
            .position(|&i| i == g)
            .map(|r| format!("#{} ", r + 1))
            .unwrap_or_default();
        format!("site {rank}({})", self.first_function(g, symbolizer))
    }

    fn report(
        &self,
        g: usize,
        _rank: usize,
        shown: &[usize],
        p: &Process,
        inputs: &Inputs<'_>,
        symbolizer: &Symbolizer,
    ) -> SiteReport {
        let s = &self.assessment.merged[g];
        let split = self.split(g, symbolizer);
        let members = &self.groups[g];
        let mut assessment = self.assessment.sites[g].clone();
        if !assessment.taking_over_from.is_empty() {
            let from: Vec<String> = assessment
                .taking_over_from
                .iter()
                .map(|&d| self.name(d, shown, symbolizer))
                .collect();
            assessment
                .evidence
                .push_str(&format!("; taking over from {}", from.join(", ")));
        }
        SiteReport {
            frames: split.frames,
            library_frames: split.library_frames,
            stack_truncated: members
                .iter()
                .any(|&i| inputs.stacks.is_truncated(p.sites[i as usize].stack)),
            allocated_type: split.allocated_type,
            kind: s.kind,
            live_bytes: s.live_bytes,
            live_allocations: estimate(s.est.live),
            total_allocations: estimate(s.est.total),
            recorded_allocations: s.total_allocations,
            total_bytes: s.total_bytes,
            frees: estimate(s.est.frees),
            intervals: (inputs.sample_bytes > 0).then(|| site_intervals(s)),
            assessment,
            series: s
                .points(&self.instants)
                .iter()
                .map(|&(t, b)| (t.saturating_sub(p.first_ns) as f64 / 1e9, b.live_bytes))
                .collect(),
            stacks: members
                .iter()
                .map(|&i| {
                    let frames = self.symbolized.get(i as usize).to_vec();
                    stack_report(&p.sites[i as usize], &frames)
                })
                .collect(),
        }
    }
}

/// The biggest sites at the peak sample, as groups: `(group, live bytes)`, largest first.
fn peak_sites(p: &Process, groups: &[Vec<SiteIdx>]) -> Vec<(usize, u64)> {
    let mut group_of: FxHashMap<SiteIdx, usize> = FxHashMap::default();
    for (g, members) in groups.iter().enumerate() {
        group_of.extend(members.iter().map(|&i| (i, g)));
    }
    let mut bytes: Vec<(usize, u64)> = Vec::new();
    for &(site, b) in &p.peak_sites {
        let Some(&g) = group_of.get(&site) else {
            continue;
        };
        match bytes.iter_mut().find(|(x, _)| *x == g) {
            Some((_, total)) => *total += b,
            None => bytes.push((g, b)),
        }
    }
    bytes.sort_by_key(|&(_, b)| std::cmp::Reverse(b));
    bytes
}

/// One of the stacks a site is made of: its addresses and its share of the site's numbers.
fn stack_report(site: &Site, frames: &[Frame]) -> StackReport {
    StackReport {
        addresses: frames.iter().map(|f| format!("{:#x}", f.address)).collect(),
        live_bytes: site.live_bytes,
        live_allocations: estimate(site.est.live),
        total_allocations: estimate(site.est.total),
        total_bytes: site.total_bytes,
    }
}

/// A count as reported: exact when every call was recorded (sums of 1.0), the rounded
/// unbiased estimate under sampling.
fn estimate(count: f64) -> u64 {
    count.max(0.0).round() as u64
}

/// A site's frames from the program's own innermost frame outwards, the library frames
/// before it, and what it allocated.
struct SplitSite {
    frames: Vec<FrameReport>,
    library_frames: Vec<FrameReport>,
    allocated_type: Option<String>,
}

/// Splits a symbolized stack where the program's own code starts ([`library`]) and names
/// what was allocated: the type the outermost library frame that names one belongs to or
/// returns — the library API the program called (`Vec<T>::push`, `alloc::fmt::format`,
/// `std::make_shared<T>`). Rust allocations whose binary cannot say are `"unknown"`; C and
/// C++ ones `null`.
fn split_site(frames: &[Frame], types: &crate::types::TypeFinder) -> SplitSite {
    let skip = library::program_start(frames);
    let named = (0..skip)
        .rev()
        .find_map(|j| type_of_frame(frames, j, types));
    // Rust's allocator shims often tail-call malloc, leaving no frame of their own.
    let rust = frames[..skip].iter().any(is_rust_allocation_frame)
        || frames
            .get(skip)
            .and_then(|f| f.object.as_ref())
            .is_some_and(|m| types.is_rust(m));
    let allocated_type = named.or_else(|| rust.then(|| UNKNOWN_TYPE.to_owned()));
    SplitSite {
        frames: frames[skip..].iter().cloned().map(frame_report).collect(),
        library_frames: frames[..skip].iter().cloned().map(frame_report).collect(),
        allocated_type,
    }
}

/// The container the function of `frames[j]` belongs to or returns, from its module's DWARF:
/// of the functions DWARF finds covering the frame's address, the one of the same name
/// nearest to the frame's depth in its inline chain (frames sharing an address are one chain,
/// innermost first, ending at the real function, the outermost DWARF finds).
fn type_of_frame(frames: &[Frame], j: usize, types: &crate::types::TypeFinder) -> Option<String> {
    let f = &frames[j];
    let (object, function) = (f.object.as_ref()?, f.function.as_deref()?);
    let real = (j..frames.len())
        .find(|&k| !frames[k].inlined || frames[k].address != f.address)
        .unwrap_or(j);
    let depth = real - j;
    let chain = types.chain_at(object, f.address);
    (0..chain.len())
        .filter(|&i| chain[i].0 == function)
        .min_by_key(|&i| i.abs_diff(depth))
        .and_then(|i| chain[i].1.clone())
}

/// `allocated_type` of a Rust allocation whose binary has no DWARF to name it.
pub const UNKNOWN_TYPE: &str = "unknown";

fn is_rust_allocation_frame(frame: &Frame) -> bool {
    frame.function.as_deref().is_some_and(|f| {
        let path = f.trim_start_matches('<');
        ["__rust_", "__rdl_", "__rg_", "alloc::", "std::alloc::"]
            .iter()
            .any(|p| path.starts_with(p))
    })
}

fn frame_report(f: Frame) -> FrameReport {
    let module = f.module.as_ref().map(|m| m.display().to_string());
    let function = f.function.unwrap_or_else(|| match &f.module {
        Some(m) => format!(
            "{}+{:#x}",
            m.file_name().map_or_else(
                || m.display().to_string(),
                |n| n.to_string_lossy().into_owned()
            ),
            f.address
        ),
        None => format!("{:#x}", f.address),
    });
    FrameReport {
        function,
        file: f.file,
        line: f.line,
        module,
        address: format!("{:#x}", f.address),
        inlined: f.inlined,
    }
}

/// Writes the report as pretty JSON followed by a newline.
pub fn write_json(report: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, report)?;
    writeln!(out)
}

/// How a report is written: its format, what profile stacks weigh, and whether text may
/// use colour (the caller knows where the output goes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Render {
    pub format: Format,
    pub weight: Weight,
    pub color: bool,
}

/// Writes `report` as `render` says.
pub fn write(report: &Report, render: Render, out: &mut dyn Write) -> io::Result<()> {
    match render.format {
        Format::Text => text::write(report, render.color, out),
        Format::Json => write_json(report, out),
        Format::Pprof => pprof::write(report, out),
        Format::Folded => folded::write(report, render.weight, out),
        Format::Svg => svg::write(report, render.weight, out),
    }
}

#[cfg(test)]
pub(crate) mod tests;
