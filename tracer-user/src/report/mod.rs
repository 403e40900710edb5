//! The report: built once from the model, the analysis and the symbols, then rendered.
//! Presentation only: it decides what is shown and how, never what is true.

mod library;
mod sites;
pub mod text;

use std::{io::Write, path::PathBuf, time::Duration};

use rustc_hash::FxHashMap;
use serde::Serialize;
use tracer_common::Counter;

use crate::{
    analysis::{self, ProcessVerdict, SiteAssessment, SiteVerdict},
    capture::{CaptureStats, KernelCounters},
    model::{Model, Site, SiteIdx, SiteKind, StackTable, Tgid},
    symbolize::{Frame, ProcessMaps, Symbolizer},
};

pub const SCHEMA: &str = "alloctrace.report/v1";

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub duration_s: f64,
    pub sample_bytes: u64,
    pub events: Events,
    /// True when anything was lost: the numbers are lower bounds, see `warnings`.
    pub partial: bool,
    pub warnings: Vec<String>,
    /// What tracing cost the collector itself.
    pub collector: Collector,
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

#[derive(Clone, Debug, Default, Serialize)]
pub struct Events {
    pub received: u64,
    /// Every event lost anywhere (ring buffer full, in-flight map full, unreadable results).
    pub dropped: u64,
    pub lost: Losses,
    /// Allocations whose stack could not be captured (counted, site unknown).
    pub stacks_lost: u64,
    /// Events read after later ones had been applied (see `capture::SETTLE_NS`): their order
    /// relative to those may be wrong. Expected to be zero.
    pub late: u64,
    /// Mallocs recorded at their entry from glibc's thread cache, and how that was checked.
    pub tcache_predictions: Predictions,
}

/// See `--no-tcache-prediction`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Predictions {
    /// Mallocs recorded at entry, their return not trapped.
    pub recorded: u64,
    /// Predictions compared with the call's real return (those calls were recorded from it).
    pub checked: u64,
    /// Of those, the wrong ones: the first one turns prediction off.
    pub wrong: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Losses {
    pub ring_buffer_full: u64,
    pub return_without_entry: u64,
    /// Calls whose return never reached the tracer (their results are lost).
    pub return_missed: u64,
    pub inflight_map_full: u64,
    pub unreadable_result: u64,
    pub undecodable: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProcessReport {
    pub pid: Tgid,
    pub comm: String,
    pub exe: String,
    /// `fp` or `dwarf`: how this process's stacks were captured.
    pub stack_mode: Option<&'static str>,
    /// Why that mode (`--stack-mode`, or what was found in the executable).
    pub stack_mode_reason: Option<String>,
    pub allocator: &'static str,
    pub exited: bool,
    pub verdict: ProcessVerdict,
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
    /// Resident anon memory of the heap, the allocator's and the program's own mappings at
    /// the last sample; null when it could not be measured.
    pub footprint_bytes: Option<u64>,
    pub retained_bytes: Option<u64>,
    /// Samples over time: seconds since the first event, live bytes, footprint.
    pub series: Vec<ProcessPoint>,
    pub sites_total: usize,
    pub sites_omitted: usize,
    pub sites: Vec<SiteReport>,
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

/// What the session observed about a process besides its allocations.
#[derive(Clone, Debug, Default)]
pub struct ProcessFacts {
    pub comm: Option<String>,
    pub exe: Option<PathBuf>,
    pub maps: ProcessMaps,
    pub footprint_bytes: Option<u64>,
    pub exited: bool,
    /// When the process was seen gone, `CLOCK_MONOTONIC` ns: the end of its window.
    pub end_ns: Option<u64>,
    pub exit_code: Option<i32>,
    pub exit_signal: Option<i32>,
    /// Measured at its exit stop: later reads would see a zombie with nothing mapped.
    pub at_exit: bool,
    /// How its stacks were captured, and why.
    pub stack_mode: Option<crate::probe::stack_mode::Decision>,
}

/// Everything a report is built from.
pub struct Inputs<'a> {
    pub model: &'a Model,
    pub stacks: &'a StackTable,
    pub facts: &'a FxHashMap<Tgid, ProcessFacts>,
    pub capture: CaptureStats,
    pub kernel: KernelCounters,
    pub duration: Duration,
    pub end_ns: u64,
    pub top: usize,
    /// Mean bytes between samples (0: exact); counts are then estimates.
    pub sample_bytes: u64,
    pub warnings: Vec<String>,
}

pub fn build(inputs: Inputs<'_>, symbolizer: &Symbolizer) -> Report {
    let k = inputs.kernel;
    let lost = Losses {
        ring_buffer_full: k.get(Counter::RingFull),
        return_without_entry: k.get(Counter::ReturnWithoutEntry),
        return_missed: k.get(Counter::ReturnMissed),
        inflight_map_full: k.get(Counter::InflightFull),
        unreadable_result: k.get(Counter::OutPtrUnreadable),
        undecodable: inputs.capture.undecodable,
    };
    let events = Events {
        received: inputs.capture.received,
        dropped: k.dropped() + inputs.capture.undecodable,
        lost,
        stacks_lost: k.get(Counter::StackLost) + inputs.capture.stack_reads_failed,
        late: inputs.capture.late,
        tcache_predictions: Predictions {
            recorded: k.get(Counter::Predicted),
            checked: k.get(Counter::PredictionChecked),
            wrong: k.get(Counter::PredictionWrong),
        },
    };
    let predictions = &events.tcache_predictions;
    // A wrong prediction was never recorded (it was being checked), but the unchecked ones
    // before it may have been wrong the same way.
    let mispredicted = predictions.wrong > 0 && predictions.recorded > 0;
    let mut warnings = inputs.warnings.clone();
    if events.dropped > 0 {
        warnings.push(format!(
            "{} events were lost (ring buffer full: {}, allocator returns without their entry: {}); \
             counts are lower bounds — raise --ring-buffer",
            events.dropped, events.lost.ring_buffer_full, events.lost.return_without_entry
        ));
    }
    if events.late > 0 {
        warnings.push(format!(
            "{} events reached the collector late (written long after their timestamp, e.g. \
             a preempted probe); a free and a reuse of the same address among them may be \
             counted in the wrong order",
            events.late
        ));
    }
    if predictions.wrong > 0 {
        let before = if mispredicted {
            format!(
                "{} mallocs were recorded from predictions before that, and may be wrong the \
                 same way: retrace with --no-tcache-prediction",
                predictions.recorded
            )
        } else {
            "none had been recorded from a prediction, so the counts are exact".to_owned()
        };
        warnings.push(format!(
            "a malloc predicted from glibc's thread cache returned another block ({} of {} \
             checked); prediction was turned off: {before}",
            predictions.wrong, predictions.checked
        ));
    }
    if events.stacks_lost > 0 {
        warnings.push(format!(
            "{} allocations have no stack (counted under an unknown site)",
            events.stacks_lost
        ));
    }

    let mut processes: Vec<&crate::model::Process> = inputs.model.processes().collect();
    processes.sort_by_key(|p| p.tgid);
    let processes = processes
        .into_iter()
        .map(|p| process_report(p, &inputs, symbolizer))
        .collect();
    let collector = Collector {
        outstanding_allocations: inputs.model.outstanding() as u64,
        ..crate::procfs::self_usage()
    };
    Report {
        collector,
        schema: SCHEMA,
        duration_s: inputs.duration.as_secs_f64(),
        sample_bytes: inputs.sample_bytes,
        partial: events.dropped > 0 || mispredicted,
        events,
        warnings,
        processes,
    }
}

fn process_report(
    p: &crate::model::Process,
    inputs: &Inputs<'_>,
    symbolizer: &Symbolizer,
) -> ProcessReport {
    let default_facts = ProcessFacts::default();
    let facts = inputs.facts.get(&p.tgid).unwrap_or(&default_facts);
    let window = analysis::window_of(p, facts.end_ns.unwrap_or(inputs.end_ns));
    let since = |ts: u64| ts.saturating_sub(p.first_ns) as f64 / 1e9;
    let sites = UserSites::of(p, inputs, &facts.maps, symbolizer, window);
    let live: Vec<u64> = sites.merged.iter().map(|s| s.live_bytes).collect();
    let (verdict, evidence) =
        analysis::assess_process(p, &live, &sites.assessed, facts.footprint_bytes, window);
    let peak = Peak {
        live_bytes: p.peak_live_bytes,
        at_s: since(p.peak_ns),
        sites: peak_sites(p, &sites.groups)
            .into_iter()
            .map(|(g, bytes)| PeakSite {
                function: sites
                    .split(g, symbolizer)
                    .frames
                    .first()
                    .map_or_else(|| "<unknown>".to_owned(), |f| f.function.clone()),
                live_bytes: bytes,
            })
            .collect(),
    };
    ProcessReport {
        pid: p.tgid,
        comm: facts.comm.clone().unwrap_or_default(),
        exe: facts
            .exe
            .as_ref()
            .map(|e| e.display().to_string())
            .unwrap_or_default(),
        allocator: "glibc",
        stack_mode: facts.stack_mode.as_ref().map(|d| d.mode.name()),
        stack_mode_reason: facts.stack_mode.as_ref().map(|d| d.reason.clone()),
        exited: facts.exited,
        verdict,
        evidence,
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
        footprint_bytes: facts.footprint_bytes,
        retained_bytes: facts
            .footprint_bytes
            .map(|f| f.saturating_sub(p.live_bytes)),
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
        sites_total: sites.merged.len(),
        sites_omitted: sites.merged.len().saturating_sub(inputs.top),
        sites: sites
            .top(inputs.top)
            .into_iter()
            .map(|g| sites.report(g, p, inputs, symbolizer))
            .collect(),
    }
}

/// A process's sites as the user sees them: its model sites grouped by symbolized stack
/// ([`sites::group`]), each group merged into one site and judged as one.
struct UserSites {
    /// The symbolized stack of each model site, indexed like `process.sites`.
    symbolized: Vec<Vec<Frame>>,
    groups: Vec<Vec<SiteIdx>>,
    merged: Vec<Site>,
    assessed: Vec<SiteAssessment>,
}

impl UserSites {
    fn of(
        p: &crate::model::Process,
        inputs: &Inputs<'_>,
        maps: &ProcessMaps,
        symbolizer: &Symbolizer,
        window: analysis::Window,
    ) -> Self {
        // Every stack is symbolized (each distinct address once) to know which are one site.
        let stacks: Vec<&[u64]> = p
            .sites
            .iter()
            .map(|s| inputs.stacks.frames(s.stack))
            .collect();
        let symbolized = symbolizer.stacks(maps, &stacks);
        let groups = sites::group(&p.sites, &symbolized);
        let (merged, assessed) = analysis::assess_groups(inputs.model, p, &groups, window)
            .into_iter()
            .unzip();
        Self {
            symbolized,
            groups,
            merged,
            assessed,
        }
    }

    /// The `top` sites to show: leaks first, then by live bytes, then by churn.
    fn top(&self, top: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.merged.len()).collect();
        let key = |i: usize| {
            let s = &self.merged[i];
            (
                self.assessed[i].verdict == SiteVerdict::Leak,
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
        split_site(&self.symbolized[first], &symbolizer.types)
    }

    fn report(
        &self,
        g: usize,
        p: &crate::model::Process,
        inputs: &Inputs<'_>,
        symbolizer: &Symbolizer,
    ) -> SiteReport {
        let s = &self.merged[g];
        let split = self.split(g, symbolizer);
        let members = &self.groups[g];
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
            assessment: self.assessed[g].clone(),
            series: s
                .series
                .points()
                .iter()
                .map(|&(t, b)| (t.saturating_sub(p.first_ns) as f64 / 1e9, b))
                .collect(),
            stacks: members
                .iter()
                .map(|&i| stack_report(&p.sites[i as usize], &self.symbolized[i as usize]))
                .collect(),
        }
    }
}

/// The biggest sites at the peak sample, as groups: `(group, live bytes)`, largest first.
fn peak_sites(p: &crate::model::Process, groups: &[Vec<SiteIdx>]) -> Vec<(usize, u64)> {
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

#[cfg(test)]
mod tests;
