//! Owns the loaded eBPF object: globals and map sizes set before load, and the allocator
//! probes — each allocator's functions, described as data in `tables` and found by the
//! discovery stage (`targets`) — attached to the traced processes.

pub mod elf;
pub mod kernel_btf;
pub mod multi;
pub mod offsets;
pub mod stack_mode;
pub mod tables;
pub mod tcache;
pub mod tracefs;

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    os::fd::OwnedFd,
    path::Path,
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{ProbeKind, Program, TracePoint, UProbe, uprobe::UProbeScope},
    sys::UProbeMultiFeature,
};
use multi::{Hook, LoadError, MultiProgram};
use tracer_common::{EventKind, attach_cookie, globals, maps};

use crate::error::{Error, Result, chain_has_errno};
pub use stack_mode::StackMode;
use tables::{Found, Role};

/// The empty entry and return programs of the floor measurement.
const FLOOR_PROGRAMS: [&str; 2] = ["floor_enter", "floor_return"];

/// The session program of the allocation functions (stacks are captured as each process's
/// entry in `PROCESS_MODULES` says, so one program serves every stack mode).
const SESSION_PROGRAM: &str = "alloc_session";
/// The two-trap floor's session program (see [`Programs::FloorSessions`]).
const FLOOR_SESSION: &str = "floor_session";

/// Load-time configuration of the eBPF object.
#[derive(Clone, Copy, Debug)]
pub struct LoadConfig {
    pub self_tgid: u32,
    /// Trace only tgids added to the `TARGETS` map.
    pub filter_tgids: bool,
    /// Uprobes will be attached per traced process (not for all processes).
    pub uprobes_scoped: bool,
    /// Mean bytes between samples; 0 for exact tracing.
    pub sample_bytes: u64,
    pub sample_seed: u64,
    /// Entries of the kernel's table of live sampled blocks.
    pub max_sampled: u32,
    pub ring_bytes: u32,
    /// Bytes of user stack copied per event (`dwarf-copy`, and `dwarf` where no table
    /// covers the code).
    pub stack_copy_bytes: u32,
    /// How the stacks of processes not (yet) listed in `PROCESS_MODULES` are captured.
    pub default_mode: StackMode,
    /// Rows of the unwind-table map.
    pub unwind_rows: u32,
    /// Frames kept per stack (`--stack-depth`).
    pub stack_depth: usize,
    /// How to put the uprobes on; `None`: the cheapest way this kernel has.
    pub uprobes: Option<UprobeApi>,
    /// Which programs will be attached (the floor has no sessions).
    pub programs: Programs,
    /// Predict glibc thread-cache hits at malloc's entry, where the library allows.
    pub tcache_prediction: bool,
    /// Added to every prediction: non-zero only to test that wrong ones are caught.
    pub prediction_skew: u64,
    /// Processes forked by traced ones are traced too (from their first instruction).
    pub follow_forks: bool,
    /// `system`: which processes are traced when they `exec` (none otherwise).
    pub admission: tracer_common::Admission,
    /// Count every probe hit per process (`system`: what tracing costs each).
    pub count_traps: bool,
}

/// How uprobes are put on the allocator, from the dearest per call to the cheapest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UprobeApi {
    /// One perf event per probe and process: any kernel with uprobes.
    Perf,
    /// One `uprobe_multi` link per program and process (Linux ≥ 6.6).
    Multi,
    /// As `Multi`, with the allocation functions as uprobe sessions (Linux ≥ 6.13).
    Session,
}

impl UprobeApi {
    /// As `--uprobes` spells it.
    pub fn name(self) -> &'static str {
        match self {
            UprobeApi::Perf => "perf",
            UprobeApi::Multi => "multi",
            UprobeApi::Session => "session",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            UprobeApi::Perf => "uprobes as perf events, one per probe and process",
            UprobeApi::Multi => "uprobes as uprobe_multi links",
            UprobeApi::Session => {
                "uprobes as uprobe_multi links, the allocation functions as uprobe sessions"
            }
        }
    }
}

/// The loaded eBPF object, with what aya cannot hold: the programs loaded for multi links
/// and the links themselves.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub uprobes: UprobeApi,
    /// Why a cheaper way is not used, for `--verbose`.
    pub uprobes_note: Option<String>,
    /// Whether mallocs served from glibc's thread cache are predicted at entry.
    pub tcache_prediction: bool,
    /// Predicted libraries attached so far: each gets its own check budget (its index).
    predicted_libraries: u32,
    /// Rows the unwind-table map was created with.
    pub unwind_rows: u32,
    /// The programs for multi links, by name (none with perf events).
    multi_programs: HashMap<String, MultiProgram>,
    /// Each detaches when dropped, or when this process dies, however it dies.
    links: Vec<OwnedFd>,
    /// Optional probes that could not be attached, in words, for the report.
    pub skipped: Vec<String>,
}

impl Loaded {
    /// Keeps links open for as long as the object lives (probes for everyone).
    pub fn keep(&mut self, links: Vec<OwnedFd>) {
        self.links.extend(links);
    }

    /// A kernel counter, summed over CPUs, while the counters are still in the object (before
    /// capture takes them); 0 if unreadable.
    pub fn counter(&self, counter: tracer_common::Counter) -> u64 {
        let Some(map) = self.ebpf.map(maps::COUNTERS) else {
            return 0;
        };
        let Ok(array) = aya::maps::PerCpuArray::<_, u64>::try_from(map) else {
            return 0;
        };
        array
            .get(&(counter as u32), 0)
            .map_or(0, |per_cpu| per_cpu.iter().sum())
    }

    /// Switches thread-cache prediction off from now on (a predicted block was contradicted).
    /// Returns whether it was on.
    pub fn stop_prediction(&mut self) -> bool {
        if !std::mem::take(&mut self.tcache_prediction) {
            return false;
        }
        let Some(map) = self.ebpf.map_mut(maps::PREDICTION_WRONG) else {
            return true;
        };
        if let Ok(mut array) = aya::maps::Array::<_, u64>::try_from(map) {
            let _ = array.set(0, &1, 0);
        }
        true
    }

    fn multi_program(&self, name: &str) -> Result<&MultiProgram> {
        self.multi_programs.get(name).ok_or_else(|| Error::Load {
            source: format!("program {name} was not loaded").into(),
        })
    }
}

/// Frames for the kernel's frame-pointer walk: one beyond the depth kept, so userspace can
/// tell a stack that was cut from one that ended there.
fn stack_frames(depth: usize) -> u32 {
    (depth + 1).min(tracer_common::MAX_STACK_DEPTH) as u32
}

/// Bytes of each event ring: `full` where some CPU writes to it, else the least the kernel
/// takes (one page), for the rings a machine with fewer CPUs never uses.
fn ring_sizes(full: u32) -> [u32; tracer_common::EVENT_RINGS] {
    let highest = crate::procfs::max_possible_cpu().unwrap_or(usize::MAX);
    std::array::from_fn(|ring| if ring <= highest { full } else { page_size() })
}

pub fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    unsafe { ::libc::sysconf(::libc::_SC_PAGESIZE) as u32 }
}

/// Loads the eBPF object built into this binary and verifies every program.
pub fn load(config: &LoadConfig) -> Result<Loaded> {
    let object = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer-ebpf"));
    let filter = u8::from(config.filter_tgids);
    // Wake the reader each time 1/16 of the ring fills: early enough never to overflow
    // between wake-ups, rare enough to cost nothing per event.
    let wakeup_bytes = u64::from(config.ring_bytes / 16).next_power_of_two();
    let kernel = kernel_btf::offsets();
    let uprobes_scoped = u8::from(config.uprobes_scoped);
    let frames = stack_frames(config.stack_depth);
    let follow = u8::from(config.follow_forks);
    let count_traps = u8::from(config.count_traps);
    let tracepoint_fields = tracefs::fields();
    let default_walk = config.default_mode.walk();
    let mut loader = EbpfLoader::new();
    loader
        .override_global(globals::SELF_TGID, &config.self_tgid, true)
        .override_global(globals::FILTER_TGIDS, &filter, true)
        .override_global(globals::WAKEUP_BYTES, &wakeup_bytes, true)
        .override_global(globals::UPROBES_SCOPED, &uprobes_scoped, true)
        .override_global(globals::SAMPLE_BYTES, &config.sample_bytes, true)
        .override_global(globals::SAMPLE_SEED, &config.sample_seed, true)
        .override_global(globals::STACK_COPY_BYTES, &config.stack_copy_bytes, true)
        .override_global(globals::STACK_FRAMES, &frames, true)
        .override_global(globals::RETURN_WALK, &kernel.return_walk, true)
        .override_global(globals::TASK_FSBASE, &kernel.task_fsbase, true)
        .override_global(globals::FILE_WALK, &kernel.file_walk, true)
        .override_global(globals::PREDICTION_SKEW, &config.prediction_skew, true)
        .override_global(globals::FOLLOW_FORKS, &follow, true)
        .override_global(globals::TRACEPOINT_FIELDS, &tracepoint_fields, true)
        .override_global(globals::ADMISSION, &config.admission, true)
        .override_global(globals::COUNT_TRAPS, &count_traps, true)
        .override_global(globals::DEFAULT_WALK, &default_walk, true)
        // The per-thread call slots are task storage, which only the kernel side touches.
        .allow_unsupported_maps();
    // Only sampling uses the table of sampled blocks; preallocating its million entries
    // takes the kernel ≈40 ms, which an exact trace would wait for at every attach.
    let sampled = if config.sample_bytes == 0 {
        1
    } else {
        config.max_sampled.max(1)
    };
    loader.map_max_entries(maps::SAMPLED, sampled);
    loader.map_max_entries(maps::UNWIND_ROWS, config.unwind_rows.max(1));
    for (ring, bytes) in maps::EVENT_RINGS
        .into_iter()
        .zip(ring_sizes(config.ring_bytes))
    {
        loader.map_max_entries(ring, bytes);
    }
    let mut ebpf = loader.load(object).map_err(Error::load)?;
    let (uprobes, uprobes_note) = choose_uprobes(config)?;
    let uprobe_programs = plain_uprobes(&ebpf, config.programs);
    if uprobes == UprobeApi::Perf {
        load_tracepoints(&mut ebpf)?;
        for (name, _) in &uprobe_programs {
            program(&mut ebpf, name)?.load().map_err(Error::load)?;
        }
    }
    let mut loaded = Loaded {
        ebpf,
        uprobes,
        uprobes_note,
        tcache_prediction: config.tcache_prediction,
        predicted_libraries: 0,
        unwind_rows: config.unwind_rows.max(1),
        multi_programs: HashMap::new(),
        links: Vec::new(),
        skipped: Vec::new(),
    };
    if uprobes != UprobeApi::Perf {
        load_multi(
            &mut loaded,
            object,
            uprobe_programs,
            (config, kernel.session_cookie),
        )?;
    }
    Ok(loaded)
}

/// Every plain uprobe program `programs` may attach, with its hook (the session programs
/// are loaded apart).
fn plain_uprobes(ebpf: &Ebpf, programs: Programs) -> Vec<(String, Hook)> {
    ebpf.programs()
        .filter_map(|(name, prog)| match prog {
            Program::UProbe(p) if name != SESSION_PROGRAM && name != FLOOR_SESSION => {
                let floor = FLOOR_PROGRAMS.contains(&name);
                let hook = match p.kind() {
                    ProbeKind::Entry => Hook::Entry,
                    ProbeKind::Return => Hook::Return,
                };
                (floor == programs.is_floor()).then(|| (name.to_owned(), hook))
            }
            _ => None,
        })
        .collect()
}

fn load_tracepoints(ebpf: &mut Ebpf) -> Result<()> {
    for (_, prog) in ebpf.programs_mut() {
        if let Program::TracePoint(p) = prog {
            p.load().map_err(Error::load)?;
        }
    }
    Ok(())
}

/// Loads the uprobe programs for multi links (aya loads programs only for perf events;
/// these come from the object relocated against its maps), and the tracepoints meanwhile.
///
/// Each uprobe program is verified in a thread of its own, the session program (the walk,
/// ≈0.2 s of verifying, most of attaching) first, while this thread loads the tracepoints.
/// With sessions, the only plain program attached is the one on `free`: the others (the
/// two stack-capturing return programs among them) wait until the session program fails
/// to load, which only a kernel without sessions makes it do.
fn load_multi(
    loaded: &mut Loaded,
    object: &[u8],
    uprobe_programs: Vec<(String, Hook)>,
    (config, session_cookie): (&LoadConfig, Option<u32>),
) -> Result<()> {
    // Relocated now, while every map descriptor the relocation writes into them is open.
    let mut object =
        multi::relocated(object, &loaded.ebpf).map_err(|why| Error::Load { source: why.into() })?;
    let sessions: &[&str] = match (loaded.uprobes, config.programs) {
        (UprobeApi::Session, Programs::FloorSessions) => &[FLOOR_SESSION],
        (UprobeApi::Session, _) => &[SESSION_PROGRAM],
        _ => &[],
    };
    let (now, later): (Vec<_>, Vec<_>) = uprobe_programs
        .into_iter()
        .partition(|(name, _)| sessions.is_empty() || SESSION_COMPANIONS.contains(&&**name));
    let linked = if sessions.is_empty() {
        Ok(())
    } else {
        multi::link_session_cookie(&mut object.obj, session_cookie)
    };
    let (tracepoints, plain, sessions) = std::thread::scope(|scope| {
        let object = &object;
        let sessions = linked.map(|()| {
            let named = sessions
                .iter()
                .map(|&name| (name.to_owned(), Hook::Session));
            spawn_loads(scope, object, named)
        });
        let plain = spawn_loads(scope, object, now);
        let tracepoints = load_tracepoints(&mut loaded.ebpf);
        let plain = plain.into_iter().map(joined).collect::<Vec<_>>();
        let sessions = sessions.and_then(|handles| {
            handles
                .into_iter()
                .map(joined)
                .collect::<std::result::Result<Vec<_>, LoadError>>()
        });
        (tracepoints, plain, sessions)
    });
    tracepoints?;
    keep(loaded, plain)?;
    if loaded.uprobes != UprobeApi::Session {
        return Ok(());
    }
    // Loading the session programs is the test for sessions: a kernel without them rejects
    // the attach type before verifying anything.
    match sessions {
        Ok(programs) => {
            loaded.multi_programs.extend(programs);
            Ok(())
        }
        // The two-trap floor is sessions or nothing: without them it would probe `free`
        // alone and understate the floor.
        Err(LoadError::Unsupported(e))
            if config.uprobes.is_none() && config.programs != Programs::FloorSessions =>
        {
            loaded.uprobes = UprobeApi::Multi;
            loaded.uprobes_note = Some(format!("this kernel has no uprobe sessions ({e})"));
            let rest = std::thread::scope(|scope| {
                let handles = spawn_loads(scope, &object, later);
                handles.into_iter().map(joined).collect::<Vec<_>>()
            });
            keep(loaded, rest)
        }
        Err(LoadError::Unsupported(e)) => Err(Error::Load {
            source: format!(
                "--uprobes session: this kernel has no uprobe sessions \
                 (Linux 6.13 added them): {e}"
            )
            .into(),
        }),
        Err(e) => Err(load_failed(e)),
    }
}

/// Keeps the programs loaded, or fails with the first that was not.
fn keep(
    loaded: &mut Loaded,
    programs: Vec<std::result::Result<(String, MultiProgram), LoadError>>,
) -> Result<()> {
    for program in programs {
        let (name, program) = program.map_err(load_failed)?;
        loaded.multi_programs.insert(name, program);
    }
    Ok(())
}

fn load_failed(e: LoadError) -> Error {
    match e {
        LoadError::Unsupported(e) => Error::Load {
            source: e.to_string().into(),
        },
        LoadError::Failed(why) => Error::Load { source: why.into() },
    }
}

/// The plain programs attached beside the session program: the probe on `free` (the
/// tracer's, or the two-trap floor's).
const SESSION_COMPANIONS: [&str; 2] = ["free_enter", FLOOR_PROGRAMS[0]];

type LoadHandle<'scope> =
    std::thread::ScopedJoinHandle<'scope, std::result::Result<(String, MultiProgram), LoadError>>;

/// Starts verifying each of `programs` in a thread of its own.
fn spawn_loads<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    object: &'scope multi::Relocated,
    programs: impl IntoIterator<Item = (String, Hook)>,
) -> Vec<LoadHandle<'scope>> {
    programs
        .into_iter()
        .map(|(name, hook)| {
            scope.spawn(move || MultiProgram::load(object, &name, hook).map(|p| (name, p)))
        })
        .collect()
}

/// A loading thread's program (a thread that panicked loaded nothing).
fn joined<T>(
    handle: std::thread::ScopedJoinHandle<'_, std::result::Result<T, LoadError>>,
) -> std::result::Result<T, LoadError> {
    handle.join().unwrap_or_else(|_| {
        Err(LoadError::Failed(
            "a program's loading thread panicked".into(),
        ))
    })
}

/// The way to put uprobes on that `config` asks for, if this kernel has it; without a
/// request, the cheapest it has (sessions are tried, and may still fall back, at load).
fn choose_uprobes(config: &LoadConfig) -> Result<(UprobeApi, Option<String>)> {
    let wanted = match (config.uprobes, config.programs) {
        (Some(api), _) => api,
        (None, Programs::Floor) => UprobeApi::Multi, // the floor has no sessions
        (None, Programs::Tracing | Programs::FloorSessions) => UprobeApi::Session,
    };
    let requested = config
        .uprobes
        .map(|api| format!("--uprobes {}", api.name()));
    if wanted == UprobeApi::Perf {
        return Ok((wanted, requested));
    }
    let why = match aya::sys::is_uprobe_multi_supported(UProbeMultiFeature::ProcessScopedPidFilter)
    {
        Ok(true) => return Ok((wanted, requested)),
        Ok(false) => "this kernel has no uprobe_multi links that filter by process \
                      (Linux 6.6 added them)"
            .to_owned(),
        Err(e) => format!("cannot tell whether this kernel has uprobe_multi links: {e}"),
    };
    match requested {
        None => Ok((UprobeApi::Perf, Some(why))),
        Some(flag) => Err(Error::Load {
            source: format!("{flag}: {why}").into(),
        }),
    }
}

/// Attaches the mmap-family syscall tracepoints. They fire for every process; the in-kernel
/// filter keeps all but the traced ones to a map lookup.
pub fn attach_tracepoints(ebpf: &mut Ebpf) -> Result<()> {
    for &(category, event, program) in tracer_common::TRACEPOINTS {
        let prog: &mut TracePoint = ebpf
            .program_mut(program)
            .ok_or_else(|| Error::Load {
                source: format!("program {program} missing from the eBPF object").into(),
            })?
            .try_into()
            .map_err(Error::load)?;
        prog.attach(category, event).map_err(|e| Error::Attach {
            symbol: "tracepoint".to_owned(),
            path: format!("{category}/{event}").into(),
            hint: " (is tracefs mounted? `mount -t tracefs nodev /sys/kernel/tracing`)",
            source: Box::new(e),
        })?;
    }
    Ok(())
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut UProbe> {
    let prog = ebpf.program_mut(name).ok_or_else(|| Error::Load {
        source: format!("program {name} missing from the eBPF object").into(),
    })?;
    prog.try_into().map_err(Error::load)
}

/// A probe as attached, for `--verbose` and the report.
#[derive(Clone, Debug)]
pub struct Attached {
    pub symbol: String,
    pub offset: u64,
    pub entry_offset: u64,
    /// Probed as a uprobe session (entry and return in one program).
    pub session: bool,
    /// Its thread-cache hits are recorded at entry, without a return trap.
    pub predicted: bool,
}

/// Which programs go on the allocator's functions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Programs {
    /// The tracer.
    #[default]
    Tracing,
    /// Empty programs at the same places: measures the bare uprobe cost (benchmarks only).
    Floor,
    /// The two-trap floor: an empty session on each allocation function, skipping its
    /// return, and an empty probe on `free` (benchmarks only).
    FloorSessions,
}

impl Programs {
    fn is_floor(self) -> bool {
        self != Programs::Tracing
    }
}

/// One program at one place.
struct Point {
    program: &'static str,
    hook: Hook,
    symbol: String,
    file_offset: u64,
    cookie: u64,
    /// It ends blocks (a free).
    frees: bool,
    /// Only names call sites (libc's `mmap` return): the trace is whole without it.
    optional: bool,
}

/// Where probes apply: one process (nobody else traps), or every process mapping the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Process(u32),
    Everyone,
}

impl Scope {
    fn uprobe(self) -> UProbeScope {
        match self {
            Scope::Process(pid) => {
                NonZeroU32::new(pid).map_or(UProbeScope::AllProcesses, UProbeScope::OneProcess)
            }
            Scope::Everyone => UProbeScope::AllProcesses,
        }
    }

    fn pid(self) -> u32 {
        match self {
            Scope::Process(pid) => pid,
            Scope::Everyone => 0,
        }
    }
}

/// Attaches the probes of allocator `found` in the file at `path`, for `scopes` (stacks are
/// captured as each process's entry in `PROCESS_MODULES` says). Returns the probes as
/// attached, and the links that hold them (closing one detaches its probes; perf-event
/// probes stay with the object instead).
pub fn attach(
    loaded: &mut Loaded,
    path: &Path,
    found: &Found,
    scopes: &[Scope],
    programs: Programs,
) -> Result<(Vec<Attached>, Vec<OwnedFd>)> {
    let sessions = programs != Programs::Floor && loaded.uprobes == UprobeApi::Session;
    let tcache_got = found
        .tcache_got
        .filter(|_| sessions && loaded.tcache_prediction && programs == Programs::Tracing)
        .filter(|_| loaded.predicted_libraries < tracer_common::PREDICTION_LIBRARIES);
    let library = u64::from(loaded.predicted_libraries);
    if tcache_got.is_some() {
        loaded.predicted_libraries += 1;
    }
    let mut points = Vec::new();
    let mut attached = Vec::new();
    for p in &found.points {
        let entry_at = p.offset + p.entry_offset;
        let (entry, ret) = match programs {
            Programs::Tracing => (p.role.entry_program(), p.role.return_program()),
            Programs::Floor if p.role.in_floor() => (
                p.role.entry_program().map(|_| FLOOR_PROGRAMS[0]),
                p.role.return_program().map(|_| FLOOR_PROGRAMS[1]),
            ),
            Programs::Floor => continue,
            // Allocation functions as sessions (below), `free` as an entry probe.
            Programs::FloorSessions if p.role == Role::MmapReturn => continue,
            Programs::FloorSessions if p.role.session_kind().is_some() && sessions => (None, None),
            Programs::FloorSessions if p.role == Role::Free => (Some(FLOOR_PROGRAMS[0]), None),
            Programs::FloorSessions => continue,
        };
        let session = p.role.session_kind().filter(|_| sessions);
        // The slot's distance is from malloc's first instruction; the program measures it
        // from the probed one.
        let got = tcache_got
            .filter(|_| session == Some(EventKind::Malloc))
            .map(|g| g - p.entry_offset as i32);
        attached.push(Attached {
            symbol: p.symbol.clone(),
            offset: p.offset,
            entry_offset: p.entry_offset,
            session: session.is_some(),
            predicted: got.is_some(),
        });
        let mut cookie = u64::from(found.family.id()) << attach_cookie::ALLOCATOR_SHIFT;
        if found.family.may_nest() {
            cookie |= attach_cookie::MAY_NEST;
        }
        let point = |program, hook, file_offset, cookie| Point {
            program,
            hook,
            symbol: p.symbol.clone(),
            file_offset,
            cookie,
            frees: p.role == Role::Free,
            optional: p.role == Role::MmapReturn,
        };
        if let Some(kind) = session {
            let got = u64::from(got.unwrap_or(0) as u32);
            let cookie = cookie
                | kind as u64
                | got << attach_cookie::TCACHE_GOT_SHIFT
                | library << attach_cookie::LIBRARY_SHIFT;
            points.push(point(
                if programs == Programs::FloorSessions {
                    FLOOR_SESSION
                } else {
                    SESSION_PROGRAM
                },
                Hook::Session,
                entry_at,
                cookie,
            ));
            continue;
        }
        // At the entry offset too: nothing before it moved `%rsp`, so the return address
        // is where the kernel takes it from, and the hit is emulated, not single-stepped.
        if let Some(ret) = ret {
            points.push(point(ret, Hook::Return, entry_at, cookie));
        }
        if let Some(entry) = entry {
            points.push(point(entry, Hook::Entry, entry_at, cookie));
        }
    }
    // Return probes first: an entry recorded before its return probe exists would wait for
    // a return that never fires. Then frees: while a process's probes go in (a forked
    // child's, milliseconds after its fork), a free seen without its block's allocation is
    // only an unknown free, but an allocation seen without its free would be a false leak.
    // Optional probes last, so one that fails leaves the others in place.
    points.sort_by_key(|p| (p.optional, p.hook != Hook::Return, !p.frees));
    if loaded.uprobes == UprobeApi::Perf {
        for &scope in scopes {
            for p in &points {
                attach_one(&mut loaded.ebpf, p, path, scope)?;
            }
        }
        return Ok((attached, Vec::new()));
    }
    let links = attach_multi(loaded, &points, path, scopes)?;
    Ok((attached, links))
}

/// One link per program and scope, carrying the program to all its points.
fn attach_multi(
    loaded: &mut Loaded,
    points: &[Point],
    path: &Path,
    scopes: &[Scope],
) -> Result<Vec<OwnedFd>> {
    let mut done = HashSet::new();
    let mut links = Vec::new();
    for first in points {
        if !done.insert((first.program, first.hook)) {
            continue;
        }
        let (offsets, cookies): (Vec<u64>, Vec<u64>) = points
            .iter()
            .filter(|p| (p.program, p.hook) == (first.program, first.hook))
            .map(|p| (p.file_offset, p.cookie))
            .unzip();
        for &scope in scopes {
            let program = loaded.multi_program(first.program)?;
            let link = retry_while_exec(scope, || {
                program.attach(path, &offsets, &cookies, scope.pid())
            })
            .map_err(|e| attach_error(e, &first.symbol, path, scope))?;
            links.push(link);
        }
    }
    Ok(links)
}

/// Attaches, retrying a few times when the kernel says the process does not exist while it
/// does: seen for a process in the middle of an `exec`.
fn retry_while_exec<T>(
    scope: Scope,
    mut attach: impl FnMut() -> std::io::Result<T>,
) -> std::io::Result<T> {
    const TRIES: u32 = 6; // waits up to ≈ 130 ms in all
    let mut tries = 0;
    loop {
        match attach() {
            Err(e)
                if e.raw_os_error() == Some(::libc::ESRCH)
                    && tries < TRIES
                    && std::path::Path::new(&format!("/proc/{}", scope.pid())).exists() =>
            {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(1 << tries));
            }
            other => return other,
        }
    }
}

fn attach_one(ebpf: &mut Ebpf, point: &Point, library: &Path, scope: Scope) -> Result<()> {
    let prog = program(ebpf, point.program)?;
    prog.attach(
        [aya::programs::uprobe::UProbeAttachLocation::AbsoluteOffset(
            point.file_offset,
        )],
        library,
        scope.uprobe(),
    )
    .map(drop)
    .map_err(|e| attach_error(e, &point.symbol, library, scope))
}

fn attach_error<E>(e: E, symbol: &str, library: &Path, scope: Scope) -> Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    if let Scope::Process(pid) = scope
        && chain_has_errno(&e, ::libc::ESRCH)
    {
        return Error::NoSuchProcess { pid };
    }
    let hint = if chain_has_errno(&e, ::libc::EINVAL) {
        " (another tracer, e.g. bcc's memleak, probing the same function can cause this; \
         stop it and retry)"
    } else {
        ""
    };
    Error::Attach {
        symbol: symbol.to_owned(),
        path: library.to_owned(),
        hint,
        source: Box::new(e),
    }
}
