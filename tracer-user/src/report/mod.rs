//! The report: built once from the model, the analysis and the symbols, then rendered.
//! Presentation only: it decides what is shown and how, never what is true.

pub mod losses;
pub mod text;

use std::{io::Write, path::PathBuf, time::Duration};

use rustc_hash::FxHashMap;
use serde::Serialize;

pub use losses::{Events, Losses, Predictions};

use crate::{
    analysis::{self, AllocatorFree, ProcessVerdict, SiteAssessment, SiteVerdict, units},
    capture::{CaptureStats, KernelCounters},
    model::{Model, Process, Site, SiteKind, Spread, StackTable, Tgid},
    symbolize::{Frame, ProcessMaps, Symbolizer},
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
    pub comm: String,
    pub exe: String,
    /// `fp` or `dwarf`: how this process's stacks were captured.
    pub stack_mode: Option<&'static str>,
    /// Why that mode (`--stack-mode`, or what was found in the executable).
    pub stack_mode_reason: Option<String>,
    /// The allocator holding the most live bytes; `none` when alloctrace found nothing it can
    /// probe (then there is no verdict).
    pub allocator: String,
    pub exited: bool,
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
    /// With byte sampling: 95 % intervals of the estimates above.
    pub intervals: Option<Intervals>,
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
    /// Traced from after it started (`attach`), not from its first allocation.
    pub attached: bool,
    /// The allocator alloctrace probes in it; `None` when there is none (see
    /// `no_allocator`).
    pub allocator: Option<String>,
    /// Why no allocator could be probed.
    pub no_allocator: Option<String>,
    /// Free memory inside its allocator, by the allocator's own accounting.
    pub allocator_free: Option<AllocatorFree>,
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
    /// Size of each ring buffer, MiB (to name it when events were lost).
    pub ring_mib: u32,
    /// `--max-sampled` (to name it when sampled blocks were lost).
    pub max_sampled: u32,
    pub warnings: Vec<String>,
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
    let processes: Vec<ProcessReport> = processes
        .into_iter()
        .map(|p| process_report(p, &inputs, symbolizer, &mut warnings))
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
        partial: assessed.partial,
        events: assessed.events,
        warnings,
        processes,
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
        withheld: facts.allocator.is_none().then(|| {
            format!(
                "no verdict: no allocator alloctrace can probe was found in pid {} ({})",
                p.tgid,
                facts.no_allocator.as_deref().unwrap_or("reason unknown")
            )
        }),
    }
}

fn process_report(
    p: &Process,
    inputs: &Inputs<'_>,
    symbolizer: &Symbolizer,
    warnings: &mut Vec<String>,
) -> ProcessReport {
    let default_facts = ProcessFacts {
        allocator: Some("glibc".into()),
        ..ProcessFacts::default()
    };
    let facts = inputs.facts.get(&p.tgid).unwrap_or(&default_facts);
    let assessment = analysis::assess(inputs.model, p, &context(p, facts, inputs.end_ns));
    warnings.extend(assessment.notes.iter().cloned());
    if facts.allocator.is_none() {
        warnings.push(format!(
            "pid {}: no allocator alloctrace can probe ({}): its allocations were not seen, so \
             it has no verdict",
            p.tgid,
            facts.no_allocator.as_deref().unwrap_or("reason unknown")
        ));
    }
    let assessed = &assessment.sites;
    let since = |ts: u64| ts.saturating_sub(p.first_ns) as f64 / 1e9;
    let sampled = inputs.sample_bytes > 0;

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
    // The peak's sites and the sites turnover refers to are symbolized with the shown ones,
    // in one batch.
    let peak_sites: Vec<usize> = p.peak_sites.iter().map(|&(i, _)| i as usize).collect();
    let referred: Vec<usize> = order
        .iter()
        .flat_map(|&i| assessed[i].taking_over_from.iter().copied())
        .collect();
    let wanted: Vec<usize> = order
        .iter()
        .chain(&peak_sites)
        .chain(&referred)
        .copied()
        .collect();
    let stacks: Vec<&[u64]> = wanted
        .iter()
        .map(|&i| inputs.stacks.frames(p.sites[i].stack))
        .collect();
    let mut symbolized: Vec<CallerFrames> = symbolizer
        .stacks(&facts.maps, &stacks)
        .into_iter()
        .map(|frames| caller_frames(frames, &symbolizer.types))
        .collect();
    let mut extra: Vec<Vec<FrameReport>> = symbolized
        .split_off(order.len())
        .into_iter()
        .map(|c| c.frames)
        .collect();
    let referred_frames = extra.split_off(peak_sites.len());
    let peak_frames = extra;
    let name_of = |site: usize| -> String {
        let rank = order
            .iter()
            .position(|&i| i == site)
            .map(|r| format!("#{} ", r + 1));
        let function = referred
            .iter()
            .position(|&i| i == site)
            .and_then(|k| referred_frames.get(k)?.first())
            .map_or_else(|| "<unknown>".to_owned(), |f| f.function.clone());
        format!("site {}({function})", rank.unwrap_or_default())
    };
    let sites = order
        .iter()
        .zip(symbolized)
        .map(|(&i, caller)| {
            let s = &p.sites[i];
            let mut a = assessed[i].clone();
            if !a.taking_over_from.is_empty() {
                let from: Vec<String> = a.taking_over_from.iter().map(|&d| name_of(d)).collect();
                a.evidence
                    .push_str(&format!("; taking over from {}", from.join(", ")));
            }
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
                intervals: sampled.then(|| site_intervals(s)),
                assessment: a,
                series: s
                    .series
                    .points()
                    .iter()
                    .map(|&(t, b)| (since(t), b.live_bytes))
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
        allocator: facts.allocator.clone().unwrap_or_else(|| "none".to_owned()),
        stack_mode: facts.stack_mode.as_ref().map(|d| d.mode.name()),
        stack_mode_reason: facts.stack_mode.as_ref().map(|d| d.reason.clone()),
        exited: facts.exited,
        attached: facts.attached,
        verdict: assessment.verdict,
        evidence: assessment.evidence,
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
        sites_total: p.sites.len(),
        sites_omitted: p.sites.len().saturating_sub(inputs.top),
        sites,
    }
}

fn site_intervals(s: &Site) -> Intervals {
    Intervals::of(
        (s.live_bytes, s.est.live),
        (s.total_bytes, s.est.total),
        &s.spread,
    )
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

#[cfg(test)]
mod tests;
