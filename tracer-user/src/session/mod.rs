//! One trace from start to report: the only place that knows about tokio tasks, timers,
//! signals and process lifecycles. Everything it does is delegated to the stages: choosing
//! processes and what to probe in them (`targets`), the probes (`probe`, through `tracer`),
//! reading events (`capture`), the model, the analysis and the report.

mod event_loop;
mod lifecycle;
mod live;
mod output;
pub use output::create_private;
mod state;
pub(crate) mod system;
mod tracer;

use std::{ffi::OsString, path::PathBuf, sync::Arc, time::Duration, time::Instant};

use aya::maps::{MapData, PerCpuArray};
use tokio::sync::mpsc as tmpsc;
use tracer_common::{Counter, maps};

use crate::{
    capture::{Capture, ring::Ring},
    cli::{Format, Weight},
    error::{Error, Result},
    launch::{self, HeldChild},
    model::Model,
    privileges, probe, procfs, progress,
    report::{self, ProcessFacts, Report},
    symbolize::Symbolizer,
    targets::Discovery,
};

use self::{
    event_loop::{Loop, Stops},
    live::Live,
    state::State,
    tracer::Tracer,
};

/// What to trace.
#[derive(Debug)]
pub enum Target {
    /// Start this command and trace it, and every process it forks, from its first
    /// allocation.
    Run(Vec<OsString>),
    /// Trace these running processes, and every process they fork from now on.
    Attach(Vec<u32>),
    /// Trace every process on the host the filters admit, now and as they start.
    System(SystemTarget),
}

/// `system`'s filters (empty: every process).
#[derive(Debug, Default)]
pub struct SystemTarget {
    pub pids: Vec<u32>,
    pub comms: Vec<String>,
    pub exclude_comms: Vec<String>,
    /// Cgroup paths (under /sys/fs/cgroup) or container ids.
    pub cgroups: Vec<String>,
}

/// `system`'s default mean bytes between samples (jemalloc's, Go's and the continuous
/// profilers' choice): host-wide cost stays small, leaks of any size still show.
pub const SYSTEM_SAMPLE_BYTES: u64 = 512 << 10;

#[derive(Debug)]
pub struct Config {
    pub target: Target,
    pub duration: Option<Duration>,
    pub interval: Duration,
    pub format: Format,
    /// What folded stacks and flame graphs weigh.
    pub weight: Weight,
    pub output: Option<PathBuf>,
    pub top: usize,
    pub ring_mib: u32,
    pub verbose: bool,
    pub programs: probe::Programs,
    /// Mean bytes between samples; 0 for exact tracing.
    pub sample_bytes: u64,
    /// `--sample-seed`; `None`: drawn from the kernel's randomness.
    pub sample_seed: Option<u64>,
    /// Sampled blocks the kernel can remember live at once.
    pub max_sampled: u32,
    /// Outstanding allocations the model keeps at most (`system --max-tracked`).
    pub max_tracked: Option<u64>,
    /// Processes reported in full detail (`system --detail`; all otherwise).
    pub detail: usize,
    /// `--stack-mode`; `None` chooses per executable.
    pub stack_mode: Option<probe::StackMode>,
    /// Frames kept per stack.
    pub stack_depth: usize,
    /// Bytes of stack copied per event in `dwarf` mode.
    pub stack_bytes: u32,
    /// `--uprobes`; `None`: the cheapest way the kernel has.
    pub uprobes: Option<probe::UprobeApi>,
    /// Record glibc thread-cache hits at malloc's entry (`--no-tcache-prediction` clears it).
    pub tcache_prediction: bool,
    /// Skew every prediction (tests only).
    pub test_mispredict: bool,
    /// Read no `/proc/PID/maps` (tests only).
    pub test_maps_from_events: bool,
    /// A live view (`alloctrace top`, the agent's windows): fed a report every interval, it
    /// replaces the final report and can end the trace.
    pub watch: Option<Watch>,
    /// SIGINT, SIGTERM and SIGHUP end the trace with its report; false when the caller ends
    /// it through `watch.stop` (the agent, whose SIGHUP reloads its configuration).
    pub catch_signals: bool,
    /// Count each traced process's probe hits in the kernel (always in `system`; the agent
    /// keeps its CPU budget with them).
    pub count_traps: bool,
}

/// The hook a live view hangs on the session: the model as it stands, reported after every
/// interval's sample, and a way to stop.
pub struct Watch {
    /// Receives the report of the model as it stands, after each interval's sample.
    pub on_report: Box<dyn FnMut(Report)>,
    /// Ends the trace when notified (`notify_one`), e.g. when the view is closed.
    pub stop: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watch")
    }
}

/// Traces, then writes the report. Errors before tracing starts leave nothing behind.
pub fn run(mut config: Config) -> Result<()> {
    privileges::check()?;
    let mut output = output::open(config.output.as_ref())?;
    let mut watch = config.watch.take();
    privileges::raise_memlock();
    let filters = match &config.target {
        Target::System(target) => Some(system::Filters::resolve(target)?),
        _ => None,
    };
    let loaded = probe::load(&load_config(&config, filters.as_ref()))?;
    if config.verbose {
        let why = loaded
            .uprobes_note
            .as_ref()
            .map(|why| format!(" ({why})"))
            .unwrap_or_default();
        eprintln!("alloctrace: {}{why}", loaded.uprobes.describe());
    }
    let discovery = Discovery::new(config.stack_mode);
    let mut tracer = Tracer::new(loaded, discovery, config.programs, config.verbose)?;
    let mut state = State::new(Model::with_sampling(config.sample_bytes));
    if let Some(max) = config.max_tracked {
        state.model.cap(max);
    }
    if config.test_maps_from_events {
        state.maps_from_events_only();
    }
    let mut warnings = Vec::new();
    let (held, mut host) = match &filters {
        Some(filters) => (
            None,
            Some(start_system(filters, &config, &mut tracer, &mut state)),
        ),
        None => (start(&config.target, &mut tracer, &mut state)?, None),
    };
    if config.programs == probe::Programs::Tracing {
        probe::attach_tracepoints(&mut tracer.loaded.ebpf)?;
    }
    let capture = open_capture(&mut tracer.loaded, config.stack_depth)?;

    let runtime = current_thread_runtime()?;
    // Signals are caught from here on: before the command runs and before "tracing" is
    // printed, so an early Ctrl-C or SIGTERM still gets the report instead of killing the
    // tracer.
    let stops = if config.catch_signals {
        let _context = runtime.enter();
        Stops::catch().map_err(|source| Error::Io {
            what: "cannot catch Ctrl-C and SIGTERM".into(),
            source,
        })?
    } else {
        Stops::none()
    };
    let (proc_tx, proc_rx) = tmpsc::unbounded_channel();
    if let Some(held) = held {
        held.release(proc_tx.clone())?;
    }
    // The trace's clock starts before "tracing" is said: whoever waits for that line and
    // then acts finds what it did inside the trace's window (`ended_at_s` > 0).
    let started = Instant::now();
    if config.catch_signals {
        announce(&state, host.is_some());
    }
    let is_run = matches!(config.target, Target::Run(_));
    let live = watch.as_mut().map(|watch| Live {
        watch,
        symbolizer: Symbolizer::new(),
        started,
        warnings: warnings.clone(),
    });
    let lp = Loop {
        state: &mut state,
        tracer: &mut tracer,
        config: &config,
        is_run,
        live,
        host: host.as_mut(),
        warnings: &mut warnings,
    };
    let mut capture =
        runtime.block_on(event_loop::collect(lp, capture, proc_tx, proc_rx, stops))?;
    capture.release_rings();
    state.release_buffers();
    give_back_free_heap();
    state.read_allocators();
    warnings.append(&mut tracer.loaded.skipped);
    finish(
        &config,
        (&state, host.as_ref()),
        &capture,
        (started, warnings),
        watch,
        &mut output,
    )
}

/// `system`: probes for every process mapping an allocator, every running process the
/// filters admit traced, and the cost of one probe hit measured on the way.
fn start_system(
    filters: &system::Filters,
    config: &Config,
    tracer: &mut Tracer,
    state: &mut State,
) -> system::Host {
    let calibration = system::Calibration::before(0);
    tracer.probe_everyone();
    system::start(filters, tracer, state, procfs::monotonic_ns());
    let trap_ns = calibration.after(|| tracer.loaded.counter(Counter::SelfTraps));
    if config.verbose {
        eprintln!(
            "alloctrace: one probe hit costs {trap_ns:.0} ns here (measured on the collector's own calls)"
        );
    }
    system::Host::new(
        trap_ns,
        system::ReportSettings {
            top: config.top,
            sample_bytes: config.sample_bytes,
            ring_mib: config.ring_mib,
            max_sampled: config.max_sampled,
            detail: config.detail,
        },
    )
}

/// Says what is traced, on stderr.
fn announce(state: &State, host_wide: bool) {
    if host_wide {
        eprintln!(
            "alloctrace: tracing {} on this host, and those that start; Ctrl-C for the report",
            report::text::count(state.live.len(), "process", "processes"),
        );
        return;
    }
    eprintln!(
        "alloctrace: tracing {} ({}); Ctrl-C for the report",
        report::text::count(state.live.len(), "process", "processes"),
        state
            .live
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
}

/// Writes the final report (to a live view when there is one), and says, in the exit
/// status too, when the command's allocations could not be seen at all.
fn finish(
    config: &Config,
    (state, host): (&State, Option<&system::Host>),
    capture: &Capture,
    (started, mut warnings): (Instant, Vec<String>),
    mut watch: Option<Watch>,
    output: &mut Box<dyn std::io::Write>,
) -> Result<()> {
    let kernel = capture.kernel_counters();
    if config.verbose {
        eprintln!("alloctrace: kernel counters {}", kernel.describe());
    }
    if state.ended_before_probes > 0 {
        warnings.push(format!(
            "{} forked by traced processes ended before their probes were in place (they \
             take a few milliseconds to attach after a fork): what they allocated was not \
             seen, or only its last part, and they have no verdict",
            report::text::count(state.ended_before_probes as usize, "process", "processes")
        ));
    }
    for ((pid, _), facts) in &state.facts {
        if let Some(code) = facts.exit_code.filter(|&c| c != 0) {
            warnings.push(format!("pid {pid} exited with status {code}"));
        }
        if let Some(signal) = facts.exit_signal {
            warnings.push(format!("pid {pid} was killed by signal {signal}"));
        }
    }
    let bar = progress::bar("symbolizing modules", 0);
    let symbolizer = Symbolizer::new()
        .with_progress(bar.clone())
        .releasing_files();
    let report = live::report_now(
        (state, host),
        capture,
        kernel,
        config,
        started,
        warnings,
        &symbolizer,
    );
    bar.finish_and_clear();
    if let Some(watch) = watch.as_mut() {
        (watch.on_report)(report); // a view shows the final numbers until it is closed
        return Ok(());
    }
    let render = report::Render {
        format: config.format,
        weight: config.weight,
        color: config.format == Format::Text && report::text::color_wanted(config.output.is_none()),
    };
    report::write(&report, render, output)
        .map_err(|source| output::error(config.output.as_ref(), source))?;
    output::flush(output, config.output.as_ref())?;
    let is_run = matches!(config.target, Target::Run(_));
    // Only the command itself (its own program, or one it execs) fails the run when nothing
    // in it can be probed: a child it forks is listed with the reason (a child gone within
    // milliseconds of its fork or exec, whose program could not even be read, often is).
    let command = Some(std::process::id()); // the command's parent is alloctrace
    let unseen = |p: &&report::ProcessReport| {
        p.allocator == "none"
            && p.ppid == command
            && state
                .facts
                .get(&(p.pid, p.image))
                .is_some_and(|f| !f.ended_before_probes && !f.gone_before_discovery)
    };
    if is_run && let Some(p) = report.processes.iter().find(unseen) {
        return Err(Error::NoAllocator {
            pid: p.pid,
            reason: p.evidence.clone(),
        });
    }
    Ok(())
}

/// The single-threaded tokio runtime a session (or the agent) runs its event loop on.
pub(crate) fn current_thread_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Io {
            what: "cannot start the event loop".into(),
            source,
        })
}

fn load_config(config: &Config, system: Option<&system::Filters>) -> probe::LoadConfig {
    probe::LoadConfig {
        self_tgid: std::process::id(),
        filter_tgids: true,
        // Host-wide probes fire in every process mapping the allocator: the kernel filters.
        // Counting a process's hits takes the filter's lookup too (≈ 30 ns a hit).
        uprobes_scoped: system.is_none() && !config.count_traps,
        sample_bytes: config.sample_bytes,
        sample_seed: config.sample_seed.unwrap_or_else(random_seed),
        max_sampled: config.max_sampled,
        ring_bytes: config.ring_mib << 20,
        stack_copy_bytes: config.stack_bytes,
        // A process is listed with its own mode once discovered; until then (an exec not read
        // yet) tables found through its mappings are right whatever its code.
        default_mode: config.stack_mode.unwrap_or(probe::StackMode::Dwarf),
        unwind_rows: tracer_common::unwind::DEFAULT_UNWIND_ROWS,
        stack_depth: config.stack_depth,
        uprobes: config.uprobes,
        // Sampling records too few calls for a saved return trap to matter.
        tcache_prediction: config.tcache_prediction && config.sample_bytes == 0,
        prediction_skew: if config.test_mispredict { 16 } else { 0 },
        programs: config.programs,
        follow_forks: true,
        admission: system.map(system::Filters::admission).unwrap_or_default(),
        count_traps: system.is_some() || config.count_traps,
    }
}

/// Chooses the processes to trace and starts tracing them; for `run`, the command, held
/// before its `exec` until its probes are in place.
fn start(target: &Target, tracer: &mut Tracer, state: &mut State) -> Result<Option<HeldChild>> {
    let now = procfs::monotonic_ns();
    match target {
        Target::Run(argv) => {
            let held = launch::spawn_held(argv)?;
            let plan = tracer.discovery.program(held.pid, &held.program);
            if let Some(reason) = plan.none_reason() {
                return Err(Error::NoAllocator {
                    pid: held.pid,
                    reason,
                });
            }
            tracer.start(&plan)?;
            let mut facts = ProcessFacts {
                exe: Some(held.program.clone()),
                ..ProcessFacts::default()
            };
            lifecycle::record_plan(&mut facts, &plan, true);
            state.track(held.pid, facts, now);
            state.plan_exec(held.pid);
            state.pin_files(plan.modules.iter().map(PathBuf::as_path));
            Ok(Some(held))
        }
        Target::Attach(pids) => {
            attach(pids, tracer, state, now)?;
            Ok(None)
        }
        Target::System(_) => Ok(None), // see `start_system`
    }
}

/// Starts tracing running processes. One whose allocator cannot be probed is reported with
/// none (no verdict) when others can be traced; alone, it is an error.
fn attach(pids: &[u32], tracer: &mut Tracer, state: &mut State, now: u64) -> Result<()> {
    let progress = progress::bar("attaching", pids.len() as u64);
    let mut unprobed = None;
    for &pid in pids {
        progress.inc(1);
        procfs::traceable(pid).map_err(|reason| reason.into_error(pid))?;
        let plan = tracer.discovery.process(pid).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                Error::NoSuchProcess { pid }
            } else {
                Error::Io {
                    what: format!("cannot read /proc/{pid}/maps"),
                    source,
                }
            }
        })?;
        if let Some(reason) = plan.none_reason() {
            unprobed.get_or_insert((pid, reason.clone()));
        } else {
            tracer.start(&plan)?;
        }
        lifecycle::track_attached(state, &plan, now);
    }
    progress.finish_and_clear();
    match unprobed {
        Some((pid, reason)) if pids.len() == 1 => Err(Error::NoAllocator { pid, reason }),
        _ => Ok(()),
    }
}

/// Takes the rings and the loss counters out of the loaded object.
fn open_capture(loaded: &mut probe::Loaded, depth: usize) -> Result<Capture> {
    let mut rings = Vec::with_capacity(maps::EVENT_RINGS.len());
    for name in maps::EVENT_RINGS {
        let ring = match loaded.ebpf.take_map(name) {
            Some(aya::maps::Map::RingBuf(data)) => Ring::new(data).map_err(|source| Error::Io {
                what: "cannot map the ring buffer".into(),
                source,
            })?,
            _ => {
                return Err(Error::Load {
                    source: format!("ring buffer {name} missing from the eBPF object").into(),
                });
            }
        };
        rings.push(ring);
    }
    let counters = loaded
        .ebpf
        .take_map(maps::COUNTERS)
        .ok_or_else(|| Error::Map {
            map: maps::COUNTERS,
            source: "missing from the eBPF object".into(),
        })?;
    let counters: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(counters).map_err(|e| Error::Map {
            map: maps::COUNTERS,
            source: Box::new(e),
        })?;
    Capture::new(rings, counters, depth).map_err(|source| Error::Io {
        what: "cannot watch the ring buffers".into(),
        source,
    })
}

/// A seed from the kernel's randomness (`getrandom`), so sampled runs differ.
fn random_seed() -> u64 {
    let mut seed = 0u64;
    // SAFETY: writes at most 8 bytes into `seed`.
    let n = unsafe { libc::getrandom((&raw mut seed).cast(), 8, 0) };
    if n == 8 {
        seed
    } else {
        procfs::monotonic_ns().wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
}

/// What one probe hit costs here, in ns: the collector's own `malloc`/`free` pairs timed
/// without and with probes on its allocator for it alone (no other process pays). The agent
/// turns a traced process's probe hits into the CPU they cost with it, as `system` does.
pub fn measure_trap_ns() -> Result<f64> {
    privileges::check()?;
    privileges::raise_memlock();
    let me = std::process::id();
    let loaded = probe::load(&probe::LoadConfig {
        self_tgid: me,
        filter_tgids: true,
        uprobes_scoped: false, // the hits are counted, as the agent's windows count them
        sample_bytes: SYSTEM_SAMPLE_BYTES,
        sample_seed: random_seed(),
        max_sampled: 1024,
        ring_bytes: 1 << 20,
        stack_copy_bytes: 1024,
        default_mode: probe::StackMode::FramePointers,
        unwind_rows: 1,
        stack_depth: 1,
        uprobes: None,
        tcache_prediction: true,
        prediction_skew: 0,
        programs: probe::Programs::Tracing,
        follow_forks: false,
        admission: Default::default(),
        count_traps: true,
    })?;
    let discovery = Discovery::new(Some(probe::StackMode::FramePointers));
    let mut tracer = Tracer::new(loaded, discovery, probe::Programs::Tracing, false)?;
    let plan = tracer.discovery.process(me).map_err(|source| Error::Io {
        what: "cannot read the collector's own /proc/self/maps".into(),
        source,
    })?;
    let calibration = system::Calibration::before(0);
    tracer.start(&plan)?;
    Ok(calibration.after(|| tracer.loaded.counter(Counter::SelfTraps)))
}

/// Hands the heap's free pages back to the kernel before the report is built: tracing
/// grows and drops tables (stacks, lifetimes, the live set's resizes), and the report's own
/// peak (symbolizing thousands of stacks) would otherwise come on top of what they left.
fn give_back_free_heap() {
    // SAFETY: glibc's malloc_trim takes no pointers; 0 keeps no padding at the top.
    unsafe { libc::malloc_trim(0) };
}
