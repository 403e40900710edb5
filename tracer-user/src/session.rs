//! One trace from start to report: the only place that knows about tokio tasks, timers,
//! Ctrl-C and process lifecycles. Everything it does is delegated to the stages.

use std::{
    ffi::OsString,
    fs::File,
    io::{self, Write as _},
    os::fd::{AsRawFd, OwnedFd, RawFd},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use rustc_hash::FxHashMap;
use tokio::{io::unix::AsyncFd, sync::mpsc as tmpsc};
use tracer_common::maps;

use crate::{
    capture::{self, Capture, Flush, KernelCounters, ring::Ring},
    cli::{Format, Weight},
    error::{Error, Result},
    heapstate,
    launch::{self, ProcEvent},
    model::{Model, StackTable, Tgid},
    privileges, probe, procfs, progress,
    report::{self, ProcessFacts, Report},
    symbolize::Symbolizer,
};

/// What to trace.
#[derive(Debug)]
pub enum Target {
    /// Start this command and trace it from its first allocation.
    Run(Vec<OsString>),
    /// Trace these running processes.
    Attach(Vec<u32>),
}

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
    /// A live view (`alloctrace top`): fed a report every interval, it replaces the final
    /// report and can end the trace.
    pub watch: Option<Watch>,
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

/// How often the ring buffer is drained when the kernel has not woken us.
const DRAIN_EVERY: Duration = Duration::from_millis(20);
/// How long a `run` child gets to exit after Ctrl-C (it received the SIGINT too).
const RUN_GRACE: Duration = Duration::from_secs(2);

/// Traces, then writes the report. Errors before tracing starts leave nothing behind.
pub fn run(mut config: Config) -> Result<()> {
    privileges::check()?;
    let mut output = open_output(config.output.as_ref())?;
    let mut watch = config.watch.take();

    let self_pid = std::process::id();
    let mut modes: FxHashMap<u32, probe::stack_mode::Decision> = FxHashMap::default();
    // Processes traced without an allocator alloctrace can probe, and why.
    let mut unprobed: FxHashMap<u32, String> = FxHashMap::default();
    let (pids, held, libraries) = match &config.target {
        Target::Run(argv) => {
            let library = probe::libc::of_self()?;
            let held = launch::spawn_held(argv)?;
            probe::libc::check_program(&held.program).map_err(|reason| Error::NoAllocator {
                pid: held.pid,
                reason,
            })?;
            let pid = held.pid;
            let decision = probe::stack_mode::decide(config.stack_mode, Some(&held.program));
            let mode = decision.mode;
            modes.insert(pid, decision);
            (vec![pid], Some(held), vec![(library, mode, vec![pid])])
        }
        Target::Attach(pids) => {
            let mut libraries: Vec<(PathBuf, probe::StackMode, Vec<u32>)> = Vec::new();
            let progress = progress::bar("attaching", pids.len() as u64);
            for &pid in pids {
                progress.inc(1);
                if pid == self_pid {
                    return Err(Error::Io {
                        what: format!("pid {pid} is alloctrace itself"),
                        source: io::ErrorKind::InvalidInput.into(),
                    });
                }
                if !procfs::is_alive(pid) {
                    return Err(Error::NoSuchProcess { pid });
                }
                let library = match probe::libc::of_process(pid) {
                    Ok(library) => library,
                    Err(Error::NoAllocator { reason, .. }) if pids.len() > 1 => {
                        unprobed.insert(pid, reason);
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let exe = PathBuf::from(format!("/proc/{pid}/exe"));
                let decision = probe::stack_mode::decide(config.stack_mode, Some(&exe));
                let mode = decision.mode;
                modes.insert(pid, decision);
                match libraries
                    .iter_mut()
                    .find(|(l, m, _)| *l == library && *m == mode)
                {
                    Some((_, _, group)) => group.push(pid),
                    None => libraries.push((library, mode, vec![pid])),
                }
            }
            progress.finish_and_clear();
            if libraries.is_empty() {
                let (&pid, reason) = unprobed.iter().next().expect("some pid");
                return Err(Error::NoAllocator {
                    pid,
                    reason: reason.clone(),
                });
            }
            (pids.clone(), None, libraries)
        }
    };

    privileges::raise_memlock();
    let mut loaded = probe::load(&probe::LoadConfig {
        self_tgid: self_pid,
        filter_tgids: true,
        uprobes_scoped: true,
        sample_bytes: config.sample_bytes,
        sample_seed: config.sample_seed.unwrap_or_else(random_seed),
        max_sampled: config.max_sampled,
        ring_bytes: config.ring_mib << 20,
        stack_copy_bytes: config.stack_bytes,
        stack_depth: config.stack_depth,
        uprobes: config.uprobes,
        tcache_prediction: config.tcache_prediction,
        prediction_skew: if config.test_mispredict { 16 } else { 0 },
        programs: config.programs,
    })?;
    if config.verbose {
        let why = loaded
            .uprobes_note
            .as_ref()
            .map(|why| format!(" ({why})"))
            .unwrap_or_default();
        eprintln!("alloctrace: {}{why}", loaded.uprobes.describe());
    }
    {
        let mut targets: BpfHashMap<_, u32, u8> = take_map(&mut loaded.ebpf, maps::TARGETS)?;
        for &pid in &pids {
            targets
                .insert(&pid, &1u8, 0)
                .map_err(|e| map_error(maps::TARGETS, e))?;
        }
    }
    for (library, mode, group) in &libraries {
        let summary =
            probe::attach_allocator(&mut loaded, library, Some(group), config.programs, *mode)?;
        if config.verbose {
            for pid in group {
                if let Some(d) = modes.get(pid) {
                    eprintln!(
                        "alloctrace: pid {pid}: {} stacks ({})",
                        d.mode.name(),
                        d.reason
                    );
                }
            }
            for a in &summary.attached {
                eprintln!(
                    "alloctrace: probed {} at {:#x}+{} in {}{}",
                    a.symbol,
                    a.offset,
                    a.entry_offset,
                    library.display(),
                    match (a.session, a.predicted) {
                        (true, true) => " (uprobe session; thread-cache hits predicted at entry)",
                        (true, false) => " (uprobe session)",
                        _ => "",
                    }
                );
            }
            for (symbol, why) in &summary.missing {
                eprintln!("alloctrace: {symbol} not probed: {why}");
            }
        }
    }

    if config.programs == probe::Programs::Tracing {
        probe::attach_tracepoints(&mut loaded.ebpf)?;
    }

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
    let counters: PerCpuArray<MapData, u64> = take_map(&mut loaded.ebpf, maps::COUNTERS)?;
    let capture =
        Capture::new(rings, counters, config.stack_depth).map_err(|source| Error::Io {
            what: "cannot watch the ring buffers".into(),
            source,
        })?;

    let mut state = State {
        model: Model::with_sampling(config.sample_bytes),
        ..State::default()
    };
    let mut warnings = Vec::new();
    let attached = held.is_none();
    let now = procfs::monotonic_ns();
    for &pid in &pids {
        state.model.track(pid, now);
        let no_allocator = unprobed.remove(&pid);
        let mut facts = ProcessFacts {
            stack_mode: modes.remove(&pid),
            attached,
            allocator: no_allocator.is_none().then(|| "glibc".into()),
            no_allocator,
            ..ProcessFacts::default()
        };
        if held.is_none() {
            observe(pid, &mut facts, &mut state.pins);
        }
        state.facts.insert(pid, facts);
    }
    state.live = pids.clone();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Io {
            what: "cannot start the event loop".into(),
            source,
        })?;
    // Ctrl-C is caught from here on: before the command runs and before "tracing" is printed,
    // so an early Ctrl-C still gets the report instead of killing the tracer.
    let interrupts = {
        let _context = runtime.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).map_err(
            |source| Error::Io {
                what: "cannot catch Ctrl-C".into(),
                source,
            },
        )?
    };

    let (proc_tx, proc_rx) = tmpsc::unbounded_channel();
    if let Some(held) = held {
        let exit_stop = held.release(proc_tx.clone())?;
        if !exit_stop {
            warnings.push(
                "ptrace is not permitted here: stacks of allocations made just before the command \
                 exits may stay unsymbolized"
                    .to_owned(),
            );
        }
    }

    eprintln!(
        "alloctrace: tracing {} ({}); Ctrl-C for the report",
        report::text::count(pids.len(), "process", "processes"),
        pids.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    let started = Instant::now();
    let is_run = matches!(config.target, Target::Run(_));
    let live = watch.as_mut().map(|watch| Live {
        watch,
        symbolizer: Symbolizer::new(),
        started,
        warnings: warnings.clone(),
    });
    let capture = runtime.block_on(collect(
        &mut state, capture, proc_tx, proc_rx, interrupts, &config, is_run, live,
    ))?;
    state.read_allocators();

    let kernel = capture.kernel_counters();
    if config.verbose {
        eprintln!("alloctrace: kernel counters {:?}", kernel.0);
    }
    for (pid, facts) in &state.facts {
        if let Some(code) = facts.exit_code.filter(|&c| c != 0) {
            warnings.push(format!("pid {pid} exited with status {code}"));
        }
        if let Some(signal) = facts.exit_signal {
            warnings.push(format!("pid {pid} was killed by signal {signal}"));
        }
    }
    let bar = progress::bar("symbolizing modules", 0);
    let symbolizer = Symbolizer::new().with_progress(bar.clone());
    let report = report_now(
        &state,
        &capture,
        kernel,
        &config,
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
    report::write(&report, render, &mut output)
        .and_then(|()| output.flush())
        .map_err(|source| output_error(config.output.as_ref(), source))?;
    // A command whose allocations could not be seen at all: the report says so, and so
    // does the exit status.
    if is_run && let Some((&pid, facts)) = state.facts.iter().find(|(_, f)| f.allocator.is_none()) {
        return Err(Error::NoAllocator {
            pid,
            reason: facts.no_allocator.clone().unwrap_or_default(),
        });
    }
    Ok(())
}

/// The report of the model as it stands: at the end of the trace, or mid-way for a view.
fn report_now(
    state: &State,
    capture: &Capture,
    kernel: KernelCounters,
    config: &Config,
    started: Instant,
    warnings: Vec<String>,
    symbolizer: &Symbolizer,
) -> Report {
    report::build(
        report::Inputs {
            model: &state.model,
            stacks: &state.stacks,
            facts: &state.facts,
            capture: capture.stats,
            kernel,
            duration: started.elapsed(),
            end_ns: procfs::monotonic_ns(),
            top: config.top,
            sample_bytes: config.sample_bytes,
            ring_mib: config.ring_mib,
            max_sampled: config.max_sampled,
            warnings,
        },
        symbolizer,
    )
}

/// A live view's hook, with what building its reports needs; one symbolizer for the whole
/// trace, so modules are parsed once.
struct Live<'a> {
    watch: &'a mut Watch,
    symbolizer: Symbolizer,
    started: Instant,
    warnings: Vec<String>,
}

impl Live<'_> {
    fn report(&mut self, state: &State, capture: &Capture, config: &Config) {
        let kernel = capture.kernel_counters();
        let warnings = self.warnings.clone();
        let report = report_now(
            state,
            capture,
            kernel,
            config,
            self.started,
            warnings,
            &self.symbolizer,
        );
        (self.watch.on_report)(report);
    }
}

/// Completes when the view asks to stop; never without a view.
async fn stopped(stop: Option<&tokio::sync::Notify>) {
    match stop {
        Some(stop) => stop.notified().await,
        None => std::future::pending().await,
    }
}

/// Per-trace mutable state, owned by the event loop.
#[derive(Default)]
struct State {
    model: Model,
    stacks: StackTable,
    facts: FxHashMap<Tgid, ProcessFacts>,
    /// Traced processes not yet known to have exited.
    live: Vec<u32>,
    /// Stacks interned when mappings were last read.
    stacks_at_refresh: usize,
    /// Every module seen mapped, held open for symbolization.
    pins: procfs::FilePins,
    /// What is known of each module's allocator, by file.
    allocators: AllocatorFiles,
}

/// Per module file: whether it defines its own `malloc`, and where glibc's arenas are in it.
#[derive(Default)]
struct AllocatorFiles {
    defines_malloc: FxHashMap<std::sync::Arc<std::path::Path>, bool>,
    arenas: FxHashMap<std::sync::Arc<std::path::Path>, Option<heapstate::GlibcArenas>>,
}

impl AllocatorFiles {
    fn defines_malloc(&mut self, file: &std::sync::Arc<std::path::Path>) -> bool {
        *self.defines_malloc.entry(file.clone()).or_insert_with(|| {
            probe::elf::ElfFunctions::read(file).is_ok_and(|f| f.find("malloc").is_some())
        })
    }

    fn arenas(&mut self, file: &std::sync::Arc<std::path::Path>) -> Option<heapstate::GlibcArenas> {
        *self
            .arenas
            .entry(file.clone())
            .or_insert_with(|| heapstate::GlibcArenas::find(file))
    }
}

impl State {
    fn drain(&mut self, capture: &mut Capture, flush: Flush) {
        let Self {
            model,
            stacks,
            facts,
            pins,
            ..
        } = self;
        capture.drain(model, stacks, &mut Processes { facts, pins }, flush);
    }

    /// Measures footprints, samples the model's series, and rereads mappings when new
    /// stacks may point into new code.
    fn sample(&mut self) {
        let refresh = self.stacks.len() != self.stacks_at_refresh;
        self.stacks_at_refresh = self.stacks.len();
        let Self {
            facts: all_facts,
            live,
            model,
            pins,
            ..
        } = self;
        for &pid in live.iter() {
            let facts = all_facts.entry(pid).or_default();
            if facts.at_exit {
                continue; // measured at its exit stop; now a zombie with nothing mapped
            }
            measure(pid, facts, model);
            if refresh || facts.maps.is_empty() {
                observe(pid, facts, pins);
            }
        }
        let sampled: Vec<(Tgid, Option<u64>)> = self
            .live
            .iter()
            .filter_map(|pid| {
                let facts = self.facts.get(pid).filter(|f| !f.at_exit)?;
                Some((*pid, facts.footprint_bytes))
            })
            .collect();
        self.model.sample(procfs::monotonic_ns(), &sampled);
    }

    fn exiting(&mut self, pid: u32) {
        let facts = self.facts.entry(pid).or_default();
        observe(pid, facts, &mut self.pins);
        measure(pid, facts, &self.model);
        read_allocator(pid, facts, &mut self.allocators);
        facts.at_exit = true;
    }

    /// Reads the allocator state of every traced process still there, at the end.
    fn read_allocators(&mut self) {
        for &pid in &self.live {
            if let Some(facts) = self.facts.get_mut(&pid).filter(|f| !f.at_exit) {
                read_allocator(pid, facts, &mut self.allocators);
            }
        }
    }

    fn exited(&mut self, pid: u32, code: Option<i32>, signal: Option<i32>) {
        self.live.retain(|&p| p != pid);
        let facts = self.facts.entry(pid).or_default();
        facts.exited = true;
        facts.end_ns = Some(procfs::monotonic_ns());
        facts.exit_code = code;
        facts.exit_signal = signal;
    }
}

/// The traced processes as capture sees them.
struct Processes<'a> {
    facts: &'a mut FxHashMap<Tgid, ProcessFacts>,
    pins: &'a mut procfs::FilePins,
}

impl capture::ProcessView for Processes<'_> {
    /// Copied stacks are unwound against the same pinned snapshots the symbolizer uses.
    fn maps(&mut self, pid: u32) -> Option<procfs::MapsSnapshot> {
        let facts = self.facts.entry(pid).or_default();
        if !facts.at_exit && !facts.exited {
            observe(pid, facts, self.pins);
        }
        facts.maps.latest().cloned()
    }

    fn in_allocator(&self, pid: u32, addr: u64) -> bool {
        self.facts
            .get(&pid)
            .and_then(|f| f.maps.latest())
            .and_then(|m| m.find(addr))
            .is_some_and(|m| probe::libc::is_libc(&m.path))
    }
}

/// What the process's allocator says of itself: whether a module other than glibc's libc
/// serves `malloc` (then glibc's probes see nothing, and there is no verdict), and how much
/// memory glibc's arenas hold free.
fn read_allocator(pid: u32, facts: &mut ProcessFacts, files: &mut AllocatorFiles) {
    let Some(snapshot) = facts.maps.latest().cloned() else {
        return;
    };
    if facts.allocator.is_none() {
        return;
    }
    let loader = |p: &std::path::Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("ld-"))
    };
    let other = snapshot.mappings().iter().find(|m| {
        !probe::libc::is_libc(&m.path) && !loader(&m.path) && files.defines_malloc(&m.file)
    });
    if let Some(other) = other {
        facts.allocator = None;
        facts.no_allocator = Some(format!(
            "it allocates through {}, which defines its own malloc: alloctrace cannot probe it \
             yet",
            other.path.display()
        ));
        return;
    }
    let Some(libc) = snapshot
        .mappings()
        .iter()
        .find(|m| probe::libc::is_libc(&m.path))
    else {
        return;
    };
    let bias = probe::elf::load_bias(&libc.file, libc.start, libc.offset);
    if let (Some(arenas), Some(bias)) = (files.arenas(&libc.file), bias) {
        facts.allocator_free = arenas.free_bytes(pid, bias);
    }
}

/// Measures a live process's footprint from its smaps and the model's view of its mappings.
fn measure(pid: u32, facts: &mut ProcessFacts, model: &Model) {
    // A process that has exited (a zombie) still has an smaps file, with nothing in it.
    if let Some(vmas) = procfs::smaps(pid).filter(|v| !v.is_empty()) {
        let resident = |start, end| procfs::resident_bytes(pid, start, end);
        facts.footprint_bytes = Some(model.footprint(pid, &vmas, resident));
    }
}

/// Reads what `/proc` has on a live process: names, and a mapping snapshot whose files are
/// pinned open so they stay readable whatever happens to the process or the files.
fn observe(pid: u32, facts: &mut ProcessFacts, pins: &mut procfs::FilePins) {
    if let Ok(mut snapshot) = procfs::MapsSnapshot::read(pid) {
        snapshot.pin_files(pid, pins);
        facts.maps.push(snapshot);
    }
    if let Some(comm) = procfs::comm(pid) {
        facts.comm = Some(comm);
    }
    if let Some(exe) = procfs::exe(pid) {
        facts.exe = Some(exe);
    }
}

/// The event loop: drain on wake-ups and on a short timer, sample every interval (and
/// report to a live view), follow process exits, stop on Ctrl-C, `--duration`, when the view
/// asks, or when every traced process is gone.
#[expect(
    clippy::too_many_arguments,
    reason = "the loop's inputs, each used once"
)]
async fn collect(
    state: &mut State,
    capture: Capture,
    proc_tx: tmpsc::UnboundedSender<ProcEvent>,
    mut proc_rx: tmpsc::UnboundedReceiver<ProcEvent>,
    mut interrupts: tokio::signal::unix::Signal,
    config: &Config,
    is_run: bool,
    mut live: Option<Live<'_>>,
) -> Result<Capture> {
    // SAFETY: the ring-buffer fd stays open and unchanged for as long as `Capture` lives,
    // which is as long as this AsyncFd.
    let mut ring =
        unsafe { AsyncFd::register_with_interest(capture, tokio::io::Interest::READABLE) }
            .map_err(|e| Error::Io {
                what: "cannot watch the ring buffer".into(),
                source: e.into(),
            })?;
    if !is_run {
        for &pid in &state.live.clone() {
            watch_pidfd(pid, proc_tx.clone());
        }
    }
    drop(proc_tx);

    let mut drain_tick = tokio::time::interval(DRAIN_EVERY);
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sample_tick = tokio::time::interval(config.interval);
    sample_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let far = tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 86_400);
    let stop_at = config
        .duration
        .map_or(far, |d| tokio::time::Instant::now() + d);
    let deadline = tokio::time::sleep_until(stop_at);
    tokio::pin!(deadline);
    let mut interrupted = false;
    let stop = live.as_ref().map(|l| l.watch.stop.clone());

    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.map_err(|source| Error::Io { what: "ring buffer".into(), source })?;
                state.drain(guard.get_inner_mut(), Flush::Settled);
                guard.clear_ready();
            }
            _ = drain_tick.tick() => state.drain(ring.get_mut(), Flush::Settled),
            _ = sample_tick.tick() => {
                state.sample();
                if let Some(live) = live.as_mut() {
                    live.report(state, ring.get_ref(), config);
                }
            }
            _ = stopped(stop.as_deref()) => break,
            event = proc_rx.recv() => match event {
                Some(ProcEvent::Exiting { pid, resume }) => {
                    // The process is stopped at exit: everything it did is in the ring.
                    state.drain(ring.get_mut(), Flush::Now);
                    state.exiting(pid);
                    let _ = resume.send(());
                }
                Some(ProcEvent::Exited { pid, code, signal }) => {
                    state.exited(pid, code, signal);
                    if state.live.is_empty() {
                        break;
                    }
                }
                None => {
                    if state.live.is_empty() { break; }
                    // No watcher left (cannot happen with live processes); keep tracing.
                    proc_rx = tmpsc::unbounded_channel().1;
                }
            },
            _ = interrupts.recv() => {
                if is_run && !interrupted && !state.live.is_empty() {
                    interrupted = true;
                    deadline.as_mut().reset(tokio::time::Instant::now() + RUN_GRACE);
                } else {
                    break;
                }
            }
            _ = &mut deadline => break,
        }
    }
    let mut capture = ring.into_inner();
    state.drain(&mut capture, Flush::All);
    state.sample();
    Ok(capture)
}

/// Reports the exit of a process we did not start, through a pidfd.
fn watch_pidfd(pid: u32, tx: tmpsc::UnboundedSender<ProcEvent>) {
    let fd = match procfs::pidfd(pid) {
        Ok(fd) => fd,
        Err(_) => {
            let _ = tx.send(ProcEvent::Exited {
                pid,
                code: None,
                signal: None,
            });
            return;
        }
    };
    struct PidFd(OwnedFd);
    impl AsRawFd for PidFd {
        fn as_raw_fd(&self) -> RawFd {
            self.0.as_raw_fd()
        }
    }
    tokio::spawn(async move {
        // SAFETY: the pidfd is owned by the AsyncFd for its whole life.
        if let Ok(async_fd) =
            unsafe { AsyncFd::register_with_interest(PidFd(fd), tokio::io::Interest::READABLE) }
        {
            let _ = async_fd.readable().await;
        }
        let _ = tx.send(ProcEvent::Exited {
            pid,
            code: None,
            signal: None,
        });
    });
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

fn take_map<T>(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| Error::Map {
        map: name,
        source: "missing from the eBPF object".into(),
    })?;
    T::try_from(map).map_err(|e| map_error(name, e))
}

fn map_error(map: &'static str, e: aya::maps::MapError) -> Error {
    Error::Map {
        map,
        source: Box::new(e),
    }
}

/// The report's destination, opened before tracing so an unwritable path fails first.
fn open_output(path: Option<&PathBuf>) -> Result<Box<dyn io::Write>> {
    match path {
        None => Ok(Box::new(io::BufWriter::new(io::stdout()))),
        Some(path) => File::create(path)
            .map(|f| Box::new(io::BufWriter::new(f)) as Box<dyn io::Write>)
            .map_err(|source| output_error(Some(path), source)),
    }
}

fn output_error(path: Option<&PathBuf>, source: io::Error) -> Error {
    Error::Output {
        path: path.cloned().unwrap_or_else(|| PathBuf::from("<stdout>")),
        source,
    }
}
