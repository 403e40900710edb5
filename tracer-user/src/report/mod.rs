//! The report: built once from the model, the analysis and the symbols, then rendered.
//! Presentation only: it decides what is shown and how, never what is true.
//!
//! Every format is rendered from the same [`Report`]: `text` for people, `json` (the v1
//! contract) for programs, `pprof`, `folded` and `svg` for the profile and flame-graph tools
//! people already use. None of them looks at the model again.

pub mod folded;
pub mod pprof;
pub mod svg;
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
use tracer_common::Counter;

use crate::{
    analysis::{self, ProcessVerdict, SiteAssessment, SiteVerdict},
    capture::{CaptureStats, KernelCounters},
    cli::{Format, Weight},
    model::{Model, SiteKind, StackTable, Tgid},
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
    pub frames: Vec<FrameReport>,
    /// Callers are missing: the stack was deeper than `--stack-depth`, or than the stack
    /// copy (`--stack-bytes`) reached in `dwarf` mode.
    pub stack_truncated: bool,
    /// For Rust allocations: the container and element type from DWARF (`Vec<shop::Order>`),
    /// or `"unknown"` when the binary has no debug info to say; null for other code.
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
    let assessed = analysis::assess_sites(inputs.model, p, window);
    let (verdict, evidence) = analysis::assess_process(p, &assessed, facts.footprint_bytes, window);
    let since = |ts: u64| ts.saturating_sub(p.first_ns) as f64 / 1e9;

    // Leaks first, then by live bytes, then by churn.
    let mut order: Vec<usize> = (0..p.sites.len()).collect();
    let key = |i: usize| {
        let s = &p.sites[i];
        (
            assessed[i].verdict == SiteVerdict::Leak,
            s.live_bytes,
            s.total_bytes,
            s.total_allocations,
        )
    };
    order.sort_by_key(|&i| std::cmp::Reverse(key(i)));
    order.truncate(inputs.top);
    // The peak's sites are symbolized with the shown ones, in one batch.
    let peak_sites: Vec<usize> = p.peak_sites.iter().map(|&(i, _)| i as usize).collect();
    let wanted: Vec<usize> = order.iter().chain(&peak_sites).copied().collect();
    let stacks: Vec<&[u64]> = wanted
        .iter()
        .map(|&i| inputs.stacks.frames(p.sites[i].stack))
        .collect();
    let raw = symbolizer.stacks(&facts.maps, &stacks);
    let modules = modules_of(&raw, symbolizer);
    let mut symbolized: Vec<CallerFrames> = raw
        .into_iter()
        .map(|frames| caller_frames(frames, &symbolizer.types))
        .collect();
    let peak_frames: Vec<Vec<FrameReport>> = symbolized
        .split_off(order.len())
        .into_iter()
        .map(|c| c.frames)
        .collect();
    let sites = order
        .iter()
        .zip(symbolized)
        .map(|(&i, caller)| {
            let s = &p.sites[i];
            let a = &assessed[i];
            SiteReport {
                frames: caller.frames,
                stack_truncated: inputs.stacks.is_truncated(s.stack),
                allocated_type: caller.allocated_type,
                kind: s.kind,
                live_bytes: s.live_bytes,
                live_allocations: estimate(s.est.live),
                total_allocations: estimate(s.est.total),
                recorded_allocations: s.total_allocations,
                total_bytes: s.total_bytes,
                frees: estimate(s.est.frees),
                assessment: a.clone(),
                series: s
                    .series
                    .points()
                    .iter()
                    .map(|&(t, b)| (since(t), b))
                    .collect(),
            }
        })
        .collect();
    let peak = Peak {
        live_bytes: p.peak_live_bytes,
        at_s: since(p.peak_ns),
        sites: p
            .peak_sites
            .iter()
            .zip(peak_frames)
            .map(|(&(_, bytes), frames)| PeakSite {
                function: frames
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
        sites_total: p.sites.len(),
        sites_omitted: p.sites.len().saturating_sub(inputs.top),
        sites,
        modules,
    }
}

/// Every module the stacks point into, by path, with its build id.
fn modules_of(stacks: &[Vec<Frame>], symbolizer: &Symbolizer) -> Vec<ModuleReport> {
    let mut modules: BTreeMap<String, Option<&Arc<Path>>> = BTreeMap::new();
    for frame in stacks.iter().flatten() {
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

/// A count as reported: exact when every call was recorded (sums of 1.0), the rounded
/// unbiased estimate under sampling.
fn estimate(count: f64) -> u64 {
    count.max(0.0).round() as u64
}

/// Functions that allocate on behalf of their caller: a site starts at the first frame that
/// is none of these, so `frames[0]` is the code that asked for memory.
const ALLOCATOR_FUNCTIONS: &[&str] = &[
    "malloc",
    "calloc",
    "realloc",
    "reallocarray",
    "free",
    "posix_memalign",
    "aligned_alloc",
    "memalign",
    "valloc",
    "pvalloc",
    "operator new",
    "operator new[]",
    "__rust_alloc",
    "__rust_alloc_zeroed",
    "__rust_realloc",
    "__rdl_alloc",
    "__rdl_alloc_zeroed",
    "__rdl_realloc",
];

fn is_allocator_frame(frame: &Frame) -> bool {
    frame.function.as_deref().is_some_and(|f| {
        let base = f.split('(').next().unwrap_or(f).trim();
        let path = base.trim_start_matches('<');
        ALLOCATOR_FUNCTIONS.contains(&base)
            || base.starts_with("__libc_")
            || base.starts_with("__rust_")
            || base.starts_with("__rdl_")
            || base.starts_with("__rg_")
            // Rust's allocation machinery (Vec/RawVec growth, Box/Rc/Arc::new, from_elem …):
            // the caller of interest is the first frame outside these crates' modules.
            || ["alloc::", "core::alloc::", "std::alloc::"]
                .iter()
                .any(|m| path.starts_with(m) || base.contains(&format!(" as {m}")))
    })
}

/// A site's frames from its caller outwards, and what Rust type it allocated.
struct CallerFrames {
    frames: Vec<FrameReport>,
    allocated_type: Option<String>,
}

/// Drops the allocator's own frames; for Rust allocations, names the element type from the
/// DWARF of the dropped frames and the caller's (where `Vec::push` and `Box::new` inline).
fn caller_frames(frames: Vec<Frame>, types: &crate::types::TypeFinder) -> CallerFrames {
    let skip = frames.iter().take_while(|f| is_allocator_frame(f)).count();
    let skip = if skip == frames.len() { 0 } else { skip };
    // Rust's allocator shims often tail-call malloc, leaving no frame of their own.
    let rust = frames[..skip].iter().any(is_rust_allocation_frame)
        || frames
            .get(skip)
            .and_then(|f| f.object.as_ref())
            .is_some_and(|m| types.is_rust(m));
    let allocated_type = rust.then(|| {
        frames
            .iter()
            .take(skip + 1)
            .find_map(|f| types.at(f.object.as_ref()?, f.address))
            .unwrap_or_else(|| UNKNOWN_TYPE.to_owned())
    });
    CallerFrames {
        frames: frames.into_iter().skip(skip).map(frame_report).collect(),
        allocated_type,
    }
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
