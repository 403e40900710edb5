//! Owns the loaded eBPF object: globals and map sizes set before load, and the allocator
//! probes, described as data and attached to the traced processes.

pub mod elf;
pub mod libc;
pub mod offsets;
pub mod stack_mode;
pub mod uprobe_session;

use std::{collections::HashSet, num::NonZeroU32, os::fd::OwnedFd, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    programs::{Program, TracePoint, UProbe, uprobe::UProbeScope},
};
use tracer_common::{EventKind, globals, maps};

use crate::error::{Error, Result, chain_has_errno};
pub use stack_mode::StackMode;
use uprobe_session::{LoadError, SessionProgram};

/// Where in a function the entry probe goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryAt {
    /// The first instruction.
    Start,
    /// The first emulated instruction that still sees the pointer argument in `%rdi`.
    AfterNullCheck,
}

/// One libc function to probe.
#[derive(Clone, Copy, Debug)]
pub struct ProbeSpec {
    pub symbol: &'static str,
    /// Program run at entry, if any.
    pub entry: Option<&'static str>,
    pub entry_at: EntryAt,
    /// Program run at the function's return, if any.
    pub ret: Option<&'static str>,
    /// `None`: required. `Some(why)`: may be missing, and why.
    pub optional: Option<&'static str>,
    /// Part of the allocator fast path the floor measurement mirrors.
    pub allocator: bool,
    /// Probed as a uprobe session when the kernel has them: `entry` and `ret` then become
    /// one session program, told which function by this cookie. Only for functions that never
    /// call another probed one, so a call they skip recording cannot hide an inner call.
    pub session_cookie: Option<EventKind>,
}

const fn spec(symbol: &'static str, entry: &'static str) -> ProbeSpec {
    ProbeSpec {
        symbol,
        entry: Some(entry),
        entry_at: EntryAt::Start,
        ret: Some(RETURN_PROGRAM),
        optional: None,
        allocator: true,
        session_cookie: None,
    }
}

/// glibc's allocation API, and the `mmap` wrapper whose return names the call site of the
/// program's own mappings. Symbols sharing an address (glibc's `memalign` is
/// `aligned_alloc`) are probed once, under the first name listed.
pub const GLIBC_PROBES: &[ProbeSpec] = &[
    ProbeSpec {
        session_cookie: Some(EventKind::Malloc),
        ..spec("malloc", "malloc_enter")
    },
    ProbeSpec {
        session_cookie: Some(EventKind::Calloc),
        ..spec("calloc", "calloc_enter")
    },
    spec("realloc", "realloc_enter"),
    ProbeSpec {
        optional: Some("added in glibc 2.26"),
        ..spec("reallocarray", "reallocarray_enter")
    },
    ProbeSpec {
        entry_at: EntryAt::AfterNullCheck,
        ret: None,
        ..spec("free", "free_enter")
    },
    spec("posix_memalign", "posix_memalign_enter"),
    ProbeSpec {
        optional: Some("added in glibc 2.16"),
        ..spec("aligned_alloc", "aligned_alloc_enter")
    },
    spec("memalign", "aligned_alloc_enter"),
    spec("valloc", "valloc_enter"),
    ProbeSpec {
        optional: Some("obsolete; absent from some builds"),
        ..spec("pvalloc", "pvalloc_enter")
    },
    ProbeSpec {
        symbol: "mmap",
        entry: None,
        entry_at: EntryAt::Start,
        ret: Some("mmap_return"),
        optional: None,
        allocator: false,
        session_cookie: None,
    },
];

const RETURN_PROGRAM: &str = "alloc_return";

/// The session programs, indexed by [`session_index`].
const SESSION_PROGRAMS: [&str; 2] = ["alloc_session", "alloc_session_dwarf"];

const fn session_index(mode: StackMode) -> usize {
    match mode {
        StackMode::FramePointers => 0,
        StackMode::Dwarf => 1,
    }
}

/// The return program that captures stacks the way `mode` says.
fn return_program(name: &'static str, mode: StackMode) -> &'static str {
    match (name, mode) {
        ("alloc_return", StackMode::Dwarf) => "alloc_return_dwarf",
        ("mmap_return", StackMode::Dwarf) => "mmap_return_dwarf",
        (name, _) => name,
    }
}

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
    pub ring_bytes: u32,
    /// Bytes of user stack the `dwarf` programs copy per event.
    pub stack_copy_bytes: u32,
    /// Frames kept per stack (`--stack-depth`).
    pub stack_depth: usize,
    /// Probe `malloc` and `calloc` with uprobe sessions where the kernel has them.
    pub uprobe_sessions: bool,
}

/// The loaded eBPF object, with what aya cannot hold: the session programs and their links.
pub struct Loaded {
    pub ebpf: Ebpf,
    /// By stack mode; `None` when sessions are off or the kernel lacks them.
    sessions: Option<[SessionProgram; 2]>,
    /// Why sessions are not used, for `--verbose`.
    pub sessions_off: Option<String>,
    /// Session links: each detaches when dropped (or when this process dies).
    links: Vec<OwnedFd>,
}

/// Frames for the kernel's frame-pointer walk: one beyond the depth kept, so userspace can
/// tell a stack that was cut from one that ended there.
fn stack_frames(depth: usize) -> u32 {
    (depth + 1).min(tracer_common::MAX_STACK_DEPTH) as u32
}

/// Loads the eBPF object built into this binary and verifies every program.
pub fn load(config: &LoadConfig) -> Result<Loaded> {
    let object = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer-ebpf"));
    let filter = u8::from(config.filter_tgids);
    // Wake the reader each time 1/16 of the ring fills: early enough never to overflow
    // between wake-ups, rare enough to cost nothing per event.
    let wakeup_bytes = u64::from(config.ring_bytes / 16).next_power_of_two();
    let mut ebpf = EbpfLoader::new()
        .override_global(globals::SELF_TGID, &config.self_tgid, true)
        .override_global(globals::FILTER_TGIDS, &filter, true)
        .override_global(globals::WAKEUP_BYTES, &wakeup_bytes, true)
        .override_global(
            globals::UPROBES_SCOPED,
            &u8::from(config.uprobes_scoped),
            true,
        )
        .override_global(globals::SAMPLE_BYTES, &config.sample_bytes, true)
        .override_global(globals::SAMPLE_SEED, &config.sample_seed, true)
        .override_global(globals::STACK_COPY_BYTES, &config.stack_copy_bytes, true)
        .override_global(
            globals::STACK_FRAMES,
            &stack_frames(config.stack_depth),
            true,
        )
        .map_max_entries(maps::EVENTS, config.ring_bytes)
        // The per-thread call slots are task storage, which only the kernel side touches.
        .allow_unsupported_maps()
        .load(object)
        .map_err(Error::load)?;
    for (name, prog) in ebpf.programs_mut() {
        match prog {
            Program::UProbe(_) if SESSION_PROGRAMS.contains(&name) => Ok(()),
            Program::UProbe(p) => p.load(),
            Program::TracePoint(p) => p.load(),
            _ => Ok(()),
        }
        .map_err(Error::load)?;
    }
    let (sessions, sessions_off) = if config.uprobe_sessions {
        match SessionProgram::load_pair(object, &ebpf, SESSION_PROGRAMS) {
            Ok(sessions) => (Some(sessions), None),
            Err(LoadError::Unsupported(e)) => (
                None,
                Some(format!("this kernel has no uprobe sessions ({e})")),
            ),
            Err(LoadError::Failed(why)) => return Err(Error::Load { source: why.into() }),
        }
    } else {
        (None, Some("--no-uprobe-sessions".to_owned()))
    };
    Ok(Loaded {
        ebpf,
        sessions,
        sessions_off,
        links: Vec::new(),
    })
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
            symbol: "tracepoint",
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
    pub symbol: &'static str,
    pub offset: u64,
    pub entry_offset: u64,
    /// Probed as a uprobe session (entry and return in one program).
    pub session: bool,
}

/// What [`attach_allocator`] did.
#[derive(Clone, Debug, Default)]
pub struct AttachSummary {
    pub attached: Vec<Attached>,
    /// Optional symbols the library does not export, with why that is fine.
    pub missing: Vec<(&'static str, &'static str)>,
}

/// Which programs go on the allocator's functions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Programs {
    /// The tracer.
    #[default]
    Tracing,
    /// Empty programs at the same places: measures the bare uprobe cost (benchmarks only).
    Floor,
}

/// Attaches the glibc probes in `library` for each pid (or for every process when `pids` is
/// `None`), capturing stacks the way `mode` says. Uprobes with a pid only trap in that
/// process: nobody else pays anything.
pub fn attach_allocator(
    loaded: &mut Loaded,
    library: &Path,
    pids: Option<&[u32]>,
    programs: Programs,
    mode: StackMode,
) -> Result<AttachSummary> {
    let functions = elf::ElfFunctions::read(library)?;
    let scopes: Vec<UProbeScope> = match pids {
        Some(pids) => pids
            .iter()
            .filter_map(|&p| NonZeroU32::new(p))
            .map(UProbeScope::OneProcess)
            .collect(),
        None => vec![UProbeScope::AllProcesses],
    };
    let ebpf = &mut loaded.ebpf;
    let session = match (programs, &loaded.sessions) {
        (Programs::Tracing, Some(sessions)) => Some(&sessions[session_index(mode)]),
        _ => None,
    };
    // (file offset, cookie) of every function the session probes.
    let mut session_points: Vec<(u64, u64)> = Vec::new();
    let mut summary = AttachSummary::default();
    let mut probed = HashSet::new();
    for spec in GLIBC_PROBES {
        let Some(function) = functions.find(spec.symbol) else {
            match spec.optional {
                Some(why) => {
                    summary.missing.push((spec.symbol, why));
                    continue;
                }
                None => {
                    return Err(Error::NoAllocator {
                        pid: pids.and_then(|p| p.first().copied()).unwrap_or(0),
                        reason: format!("{} does not export `{}`", library.display(), spec.symbol),
                    });
                }
            }
        };
        if !probed.insert(function.offset) {
            continue; // an alias of a function already probed
        }
        let entry_offset = match spec.entry_at {
            EntryAt::Start => 0,
            EntryAt::AfterNullCheck => offsets::entry_offset_keeping_rdi(function.code()),
        };
        let (entry, ret) = match programs {
            Programs::Tracing => (spec.entry, spec.ret.map(|r| return_program(r, mode))),
            Programs::Floor if spec.allocator => (
                spec.entry.map(|_| "floor_enter"),
                spec.ret.map(|_| "floor_return"),
            ),
            Programs::Floor => continue,
        };
        let entry_at = function.offset + entry_offset;
        summary.attached.push(Attached {
            symbol: spec.symbol,
            offset: function.offset,
            entry_offset,
            session: session.is_some() && spec.session_cookie.is_some(),
        });
        if let (Some(_), Some(kind)) = (session, spec.session_cookie) {
            session_points.push((entry_at, kind as u64));
            continue;
        }
        // Return probe first: an entry recorded before its return probe exists would wait
        // for a return that never fires.
        for &scope in &scopes {
            if let Some(ret) = ret {
                attach_one(ebpf, ret, spec.symbol, function.offset, library, scope)?;
            }
            if let Some(entry) = entry {
                attach_one(ebpf, entry, spec.symbol, entry_at, library, scope)?;
            }
        }
    }
    if let Some(session) = session.filter(|_| !session_points.is_empty()) {
        let (offsets, cookies): (Vec<u64>, Vec<u64>) = session_points.into_iter().unzip();
        for &scope in &scopes {
            let pid = match scope {
                UProbeScope::OneProcess(pid) => pid.get(),
                _ => 0,
            };
            let link = session
                .attach(library, &offsets, &cookies, pid)
                .map_err(|e| attach_error(e, "malloc", library, scope))?;
            loaded.links.push(link);
        }
    }
    Ok(summary)
}

fn attach_one(
    ebpf: &mut Ebpf,
    program_name: &str,
    symbol: &'static str,
    file_offset: u64,
    library: &Path,
    scope: UProbeScope,
) -> Result<()> {
    let prog = program(ebpf, program_name)?;
    prog.attach(
        [aya::programs::uprobe::UProbeAttachLocation::AbsoluteOffset(
            file_offset,
        )],
        library,
        scope,
    )
    .map(drop)
    .map_err(|e| attach_error(e, symbol, library, scope))
}

fn attach_error<E>(e: E, symbol: &'static str, library: &Path, scope: UProbeScope) -> Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    if let UProbeScope::OneProcess(pid) = scope
        && chain_has_errno(&e, ::libc::ESRCH)
    {
        return Error::NoSuchProcess { pid: pid.get() };
    }
    let hint = if chain_has_errno(&e, ::libc::EINVAL) {
        " (another tracer, e.g. bcc's memleak, probing the same function can cause this; \
         stop it and retry)"
    } else {
        ""
    };
    Error::Attach {
        symbol,
        path: library.to_owned(),
        hint,
        source: Box::new(e),
    }
}
