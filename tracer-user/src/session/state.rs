//! The trace's mutable state: the model, the interned stacks, and what `/proc` tells about
//! each traced process image (names, mappings pinned for symbolization, footprint, the
//! allocator's own accounting). Events are drained from capture and handed to the model
//! here; lifecycle events are set aside for the session to act on while the process is
//! still as it was.

use std::{path::Path, sync::Arc};

use rustc_hash::FxHashMap;

use crate::{
    capture::{self, Capture, Flush},
    heapstate,
    model::{Event, Model, Op, StackTable, Tgid},
    procfs,
    report::{ImageKey, ProcessFacts},
};

/// Module files kept open for symbolization; and, for tests, whether mappings are known only
/// from the kernel's events (as for a process gone before `/proc/PID/maps` could be read).
#[derive(Default)]
struct Files {
    pins: procfs::FilePins,
    events_only: bool,
}

/// How long a process may be missing from `/proc` before it is ended without its exit event
/// (lost to a full ring): well past the time an event takes to settle.
const MISSING_FOR_NS: u64 = 1_000_000_000;

/// Per-trace mutable state, owned by the event loop.
#[derive(Default)]
pub struct State {
    pub model: Model,
    pub stacks: StackTable,
    /// By process and program image (an `exec` starts a new image).
    pub facts: FxHashMap<ImageKey, ProcessFacts>,
    /// Each traced process's current image, counted from the `exec`s seen.
    images: FxHashMap<Tgid, u32>,
    /// When each traced process's `exec`s happened (image n began with the n-th).
    execs: FxHashMap<Tgid, Vec<u64>>,
    /// Traced processes not yet known to have exited.
    pub live: Vec<Tgid>,
    /// Forked children that ended before their probes were attached.
    pub ended_before_probes: u64,
    /// Processes whose exit settled since the session last asked, with the image that ended.
    ended: Vec<ImageKey>,
    /// When the process now holding each pid began (tracked, forked, or admitted at an
    /// `exec`): a later fork naming the same pid is another process, given a pid freed by
    /// one that ended.
    begun: FxHashMap<Tgid, u64>,
    /// Followed processes `/proc` no longer shows, since when.
    missing: FxHashMap<Tgid, u64>,
    /// See `View::exec_names`.
    exec_names: FxHashMap<Tgid, std::path::PathBuf>,
    /// Stacks interned when mappings were last read.
    stacks_at_refresh: usize,
    /// Every module seen mapped, held open for symbolization.
    pins: Files,
    /// Where glibc's arenas are, by libc file.
    arenas: FxHashMap<Arc<Path>, Option<heapstate::GlibcArenas>>,
    /// Processes whose coming `exec` is the program they were planned for (`run`'s command,
    /// held before its `exec`): their new image keeps the plan.
    exec_planned: rustc_hash::FxHashSet<Tgid>,
    /// Lifecycle events and new code mappings, as read, for the session to act on.
    notices: Vec<Event>,
    /// Events settled in the last drain, handed to the model.
    ready: Vec<Event>,
}

impl State {
    pub fn new(model: Model) -> Self {
        Self {
            model,
            ..Self::default()
        }
    }

    /// Starts following process `pid` (`facts` for its current image) from `now_ns`.
    pub fn track(&mut self, pid: Tgid, facts: ProcessFacts, now_ns: u64) {
        self.model.track(pid, now_ns);
        self.begun.entry(pid).or_insert(now_ns);
        let image = *self.images.entry(pid).or_default();
        self.facts.entry((pid, image)).or_insert(facts);
        if !self.live.contains(&pid) {
            self.live.push(pid);
        }
    }

    /// The facts of `pid`'s current image.
    pub fn facts_mut(&mut self, pid: Tgid) -> &mut ProcessFacts {
        let image = *self.images.entry(pid).or_default();
        self.facts.entry((pid, image)).or_default()
    }

    /// Holds `paths` open by identity, so the code a process maps from them can be
    /// symbolized even if it is gone before its mappings are read.
    pub fn pin_files<'p>(&mut self, paths: impl IntoIterator<Item = &'p std::path::Path>) {
        for path in paths {
            self.pins.pins.by_path(path);
        }
    }

    /// Reads no `/proc/PID/maps` (`--test-maps-from-events`): stacks are symbolized from the
    /// mappings the kernel reported alone.
    pub fn maps_from_events_only(&mut self) {
        self.pins.events_only = true;
    }

    /// `pid`'s coming `exec` is of the program its facts were planned for.
    pub fn plan_exec(&mut self, pid: Tgid) {
        self.exec_planned.insert(pid);
    }

    /// Lets go of the buffers events passed through (2.4 MB after a python run), once the
    /// rings are read for the last time: the report needs the room.
    pub fn release_buffers(&mut self) {
        self.ready = Vec::new();
        self.notices = Vec::new();
    }

    /// Lifecycle events and code mappings read since the last call.
    pub fn take_notices(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.notices)
    }

    /// Reads the rings and hands the settled events to the model, in order.
    pub fn drain(&mut self, capture: &mut Capture, flush: Flush) {
        let mut ready = std::mem::take(&mut self.ready);
        ready.clear();
        {
            let mut view = View {
                facts: &mut self.facts,
                exec_names: &mut self.exec_names,
                live: &mut self.live,
                images: &mut self.images,
                execs: &mut self.execs,
                exec_planned: &mut self.exec_planned,
                pins: &mut self.pins,
                notices: &mut self.notices,
                begun: &mut self.begun,
            };
            let before = view.notices.len();
            capture.drain(&mut self.stacks, &mut view, flush, &mut ready);
            // Rings are read one after another: an `exec` read from a later ring than the
            // process's next mapping was known only now, so mappings are placed again by time
            // (they were noted as read, for unwinding stacks read in the same pass).
            // A new code mapping: the mappings are read while the module is surely there, once
            // every ring was read (an `exec` before it, read from another ring, is known by
            // then, so they are the new program's).
            for event in &self.notices[before..] {
                note_mapping(
                    event,
                    &mut self.facts,
                    (&self.execs, &self.images),
                    &self.pins.pins,
                );
                if matches!(event.op, Op::Map { .. }) {
                    let facts = current(&mut self.facts, &self.images, event.tgid);
                    observe(event.tgid, facts, &mut self.pins);
                }
            }
        }
        for event in &ready {
            self.model.apply(event);
            if let Op::Exit { traps } = event.op
                && self.live.contains(&event.tgid)
            {
                // The image that ended is the model's current one: events apply in time
                // order, so a later process given the same pid has not begun there yet.
                let image = self.model.process(event.tgid).map(|p| p.image);
                let image = image.unwrap_or_else(|| self.image_of(event.tgid));
                self.ended((event.tgid, image), event.ts_ns);
                let facts = self.facts.entry((event.tgid, image)).or_default();
                facts.traps = facts.traps.max(traps);
            }
        }
        self.ready = ready;
    }

    /// Measures footprints, samples the model's series, and rereads mappings when new
    /// stacks may point into new code.
    pub fn sample(&mut self) {
        let refresh = self.stacks.len() != self.stacks_at_refresh;
        self.stacks_at_refresh = self.stacks.len();
        let mut sampled = Vec::with_capacity(self.live.len());
        let mut gone = Vec::new();
        let now = procfs::monotonic_ns();
        for &pid in &self.live {
            let image = self.images.get(&pid).copied().unwrap_or(0);
            let facts = self.facts.entry((pid, image)).or_default();
            // Its exit event lost (a full ring), or the pid now another process's: ended once
            // it has been missing longer than an exit event takes to settle.
            if !procfs::same_process(pid, facts.start_ticks) {
                let since = *self.missing.entry(pid).or_insert(now);
                if now.saturating_sub(since) > MISSING_FOR_NS {
                    gone.push(pid);
                }
                continue;
            }
            measure(pid, facts, &self.model);
            if refresh || facts.maps.is_empty() {
                observe(pid, facts, &mut self.pins);
            }
            sampled.push((pid, facts.footprint_bytes));
        }
        self.model.sample(procfs::monotonic_ns(), &sampled);
        for pid in gone {
            self.gone(pid);
            self.missing.remove(&pid);
        }
    }

    /// Reads what `/proc` has on `pid` now (names, mappings).
    pub fn observe(&mut self, pid: Tgid) {
        let image = self.images.get(&pid).copied().unwrap_or(0);
        let facts = self.facts.entry((pid, image)).or_default();
        observe(pid, facts, &mut self.pins);
    }

    /// Reads the allocator state of every traced process still there, at the end.
    pub fn read_allocators(&mut self) {
        for &pid in &self.live {
            let image = self.images.get(&pid).copied().unwrap_or(0);
            if let Some(facts) = self.facts.get_mut(&(pid, image)) {
                read_allocator(pid, facts, &mut self.arenas);
            }
        }
    }

    /// The image `pid` is at, as far as the events read so far tell.
    fn image_of(&self, pid: Tgid) -> u32 {
        self.images.get(&pid).copied().unwrap_or(0)
    }

    /// Image `image` of `pid` ended at `ts_ns` (its exit event settled). The pid stays
    /// followed when a later image is another process that got the pid since.
    fn ended(&mut self, (pid, image): ImageKey, ts_ns: u64) {
        if image >= self.image_of(pid) {
            self.live.retain(|&p| p != pid);
            self.missing.remove(&pid);
        }
        self.ended.push((pid, image));
        let facts = self.facts.entry((pid, image)).or_default();
        facts.exited = true;
        facts.end_ns = Some(ts_ns);
    }

    /// Processes that ended since the last call, with the image that ended.
    pub fn take_ended(&mut self) -> Vec<ImageKey> {
        std::mem::take(&mut self.ended)
    }

    /// Drops everything kept of `pid` up to `image`: it ended and its summary was taken. A
    /// later image, another process given the pid since, stays.
    pub fn forget(&mut self, (pid, image): ImageKey) {
        let later = self.image_of(pid) > image;
        self.model.forget(pid, image, later);
        self.facts.retain(|&(p, i), _| p != pid || i > image);
        if !later {
            self.images.remove(&pid);
            self.execs.remove(&pid);
            self.exec_planned.remove(&pid);
            self.begun.remove(&pid);
            self.live.retain(|&p| p != pid);
        }
    }

    /// Whether `pid` is followed.
    pub fn follows(&self, pid: Tgid) -> bool {
        self.live.contains(&pid)
    }

    /// The command `run` started ended with this status (it is also ended by its exit
    /// event, which comes through the rings).
    pub fn exit_status(&mut self, pid: Tgid, code: Option<i32>, signal: Option<i32>) {
        let facts = self.facts_mut(pid);
        facts.exit_code = code;
        facts.exit_signal = signal;
    }

    /// A traced process whose exit was not reported by the kernel (gone before tracing
    /// began, or its exit event lost) is ended now.
    pub fn gone(&mut self, pid: Tgid) {
        if self.live.contains(&pid) {
            self.ended((pid, self.image_of(pid)), procfs::monotonic_ns());
        }
    }
}

/// The traced processes as capture sees them while decoding.
struct View<'a> {
    facts: &'a mut FxHashMap<ImageKey, ProcessFacts>,
    /// The file name each process just exec'd, until its `Exec` is noticed.
    exec_names: &'a mut FxHashMap<Tgid, std::path::PathBuf>,
    live: &'a mut Vec<Tgid>,
    execs: &'a mut FxHashMap<Tgid, Vec<u64>>,
    images: &'a mut FxHashMap<Tgid, u32>,
    exec_planned: &'a mut rustc_hash::FxHashSet<Tgid>,
    pins: &'a mut Files,
    notices: &'a mut Vec<Event>,
    begun: &'a mut FxHashMap<Tgid, u64>,
}

impl View<'_> {
    /// Whether `pid` is now another process than the one its current facts were read from:
    /// it started at another time (when either is unknown, it is taken to be the same).
    fn another_process(&self, pid: Tgid) -> bool {
        let image = self.images.get(&pid).copied().unwrap_or(0);
        let ticks = self.facts.get(&(pid, image)).and_then(|f| f.start_ticks);
        matches!((ticks, procfs::start_ticks(pid)), (Some(a), Some(b)) if a != b)
    }
}

impl capture::ProcessView for View<'_> {
    /// Copied stacks are unwound against the same pinned snapshots the symbolizer uses.
    fn maps(&mut self, pid: u32) -> Option<procfs::MapsSnapshot> {
        let pins = &mut *self.pins;
        let image = self.images.get(&pid).copied().unwrap_or(0);
        let facts = self.facts.entry((pid, image)).or_default();
        if !facts.exited {
            observe(pid, facts, pins);
        }
        facts.maps.latest().cloned()
    }

    fn in_allocator(&self, pid: u32, addr: u64) -> bool {
        let image = self.images.get(&pid).copied().unwrap_or(0);
        self.facts.get(&(pid, image)).is_some_and(|f| {
            f.maps
                .latest()
                .and_then(|m| m.find(addr))
                .is_some_and(|m| f.allocator_modules.contains(&m.path))
        })
    }

    fn exec_name(&mut self, tgid: u32, name: &[u8]) {
        use std::os::unix::ffi::OsStrExt as _;
        let name = Path::new(std::ffi::OsStr::from_bytes(name));
        // Looked up as the process did, inside its root, while it is there.
        self.pins.pins.as_process(tgid, name);
        self.exec_names.insert(tgid, name.to_path_buf());
    }

    fn noticed(&mut self, event: &Event) {
        match event.op {
            // Followed from now on, before any event of its is read: its exec, its exit.
            Op::Fork {
                child,
                traced: true,
            } => {
                let parent = current(self.facts, self.images, event.tgid).clone();
                let facts = ProcessFacts {
                    comm: parent.comm,
                    exe: parent.exe,
                    stack_mode: parent.stack_mode,
                    allocators: parent.allocators,
                    allocator_modules: parent.allocator_modules,
                    maps: parent.maps,
                    cgroup: parent.cgroup,
                    ppid: Some(event.tgid),
                    ..ProcessFacts::default()
                };
                let before = self.begun.insert(child, event.ts_ns);
                if before.is_some_and(|b| b < event.ts_ns) {
                    // A fork always makes a new process: the one that had this pid before
                    // ended, and keeps its own facts; this one is the pid's next image.
                    let image = self.images.entry(child).or_default();
                    *image += 1;
                    self.facts.insert((child, *image), facts);
                } else {
                    self.facts.entry((child, 0)).or_insert(facts);
                }
                if !self.live.contains(&child) {
                    self.live.push(child);
                }
            }
            Op::Exec { layout } => {
                // `system`: the kernel began tracing a process that passed the filters at its
                // exec; it is followed from now on. If its pid was a traced process's whose
                // exit is not applied yet, it is another process (it started later).
                let followed = self.live.contains(&event.tgid);
                let another = followed && self.another_process(event.tgid);
                if !followed || another {
                    self.begun.insert(event.tgid, event.ts_ns);
                }
                if !followed {
                    self.live.push(event.tgid);
                }
                self.execs.entry(event.tgid).or_default().push(event.ts_ns);
                begin_image(
                    self.facts,
                    self.images,
                    (self.exec_planned, another),
                    self.pins,
                    (event.tgid, event.ts_ns, layout.map(|l| l.exe)),
                );
                if let Some(name) = self.exec_names.remove(&event.tgid) {
                    named(current(self.facts, self.images, event.tgid), &name);
                }
                if let Some(layout) = layout {
                    let facts = current(self.facts, self.images, event.tgid);
                    let pins = &mut self.pins.pins;
                    for m in crate::layout::after_exec(event.tgid, &layout, pins) {
                        facts.maps.note(m);
                    }
                }
            }
            // Held open while the process surely maps it; noted once every ring was read (see
            // `State::drain`).
            Op::MapFile { addr, len, .. } => {
                self.pins
                    .pins
                    .by_range(event.tgid, addr, addr.saturating_add(len));
                note_mapping(
                    event,
                    self.facts,
                    (self.execs, self.images),
                    &self.pins.pins,
                );
            }
            _ => {}
        }
        self.notices.push(*event);
    }
}

/// `pid` replaced its program (its `exec` was just read): its facts start again for the new
/// image, so what is read of it from now on (mappings, names) is the new program's.
fn begin_image(
    facts: &mut FxHashMap<ImageKey, ProcessFacts>,
    images: &mut FxHashMap<Tgid, u32>,
    (exec_planned, another): (&mut rustc_hash::FxHashSet<Tgid>, bool),
    pins: &mut Files,
    (pid, exec_ns, exe_file): (Tgid, u64, Option<(u64, u64)>),
) {
    let image = images.entry(pid).or_default();
    let old = if another {
        ProcessFacts::default() // nothing of the old process carries over
    } else {
        facts.get(&(pid, *image)).cloned().unwrap_or_default()
    };
    *image += 1;
    let new = if exec_planned.remove(&pid) {
        ProcessFacts {
            maps: crate::symbolize::ProcessMaps::default(),
            ..old
        }
    } else {
        // A new program: its allocators and stack mode are discovered again; until they
        // are, nothing is claimed.
        ProcessFacts {
            attached: old.attached,
            cgroup: old.cgroup,
            ppid: old.ppid,
            // Probes placed after this `exec` (a fork's, in place only milliseconds after
            // it): the new program's first allocations were not seen either.
            probes_after_ns: old
                .probes_after_ns
                .filter(|_| old.probes_placed_ns.is_some_and(|at| at > exec_ns)),
            probes_placed_ns: old.probes_placed_ns,
            no_allocator: Some(
                "it replaced its program and was gone before alloctrace could read the new \
                 program's mappings"
                    .into(),
            ),
            gone_before_discovery: true,
            ..ProcessFacts::default()
        }
    };
    let new = facts.entry((pid, *image)).insert_entry(new).into_mut();
    new.exe_file = exe_file;
    observe(pid, new, pins);
}

/// A file mapping the kernel reported, in the mappings of the image that made it.
fn note_mapping(
    event: &Event,
    facts: &mut FxHashMap<ImageKey, ProcessFacts>,
    (execs, images): (&FxHashMap<Tgid, Vec<u64>>, &FxHashMap<Tgid, u32>),
    pins: &procfs::FilePins,
) {
    if let Op::MapFile {
        addr,
        len,
        offset,
        file,
    } = event.op
        && let Some(m) = crate::layout::mapped((addr, len, offset), file, pins)
    {
        let image = image_at(execs, images, event.tgid, event.ts_ns);
        facts.entry((event.tgid, image)).or_default().maps.note(m);
    }
}

/// The image `pid` ran at `ts_ns`.
fn image_at(
    execs: &FxHashMap<Tgid, Vec<u64>>,
    images: &FxHashMap<Tgid, u32>,
    pid: Tgid,
    ts_ns: u64,
) -> u32 {
    let current = images.get(&pid).copied().unwrap_or(0);
    let later = execs
        .get(&pid)
        .map_or(0, |times| times.iter().filter(|&&t| t > ts_ns).count());
    current.saturating_sub(later as u32)
}

/// A new program's names from the file it exec'd, until `/proc` tells better: its `comm` is
/// the file's name as the kernel keeps it (15 bytes).
fn named(facts: &mut ProcessFacts, exec_name: &Path) {
    if facts.comm.is_none()
        && let Some(file) = exec_name.file_name()
    {
        let bytes = file.as_encoded_bytes();
        facts.comm = Some(String::from_utf8_lossy(&bytes[..bytes.len().min(15)]).into_owned());
    }
    if facts.exe.is_none() && exec_name.is_absolute() {
        facts.exe = Some(exec_name.to_path_buf());
    }
}

/// The facts of `pid`'s current image.
fn current<'f>(
    facts: &'f mut FxHashMap<ImageKey, ProcessFacts>,
    images: &FxHashMap<Tgid, u32>,
    pid: Tgid,
) -> &'f mut ProcessFacts {
    let image = images.get(&pid).copied().unwrap_or(0);
    facts.entry((pid, image)).or_default()
}

/// How much memory glibc's arenas hold free, read from the process.
fn read_allocator(
    pid: u32,
    facts: &mut ProcessFacts,
    arenas: &mut FxHashMap<Arc<Path>, Option<heapstate::GlibcArenas>>,
) {
    let Some(snapshot) = facts.maps.latest() else {
        return;
    };
    let glibc = snapshot.mappings().iter().find(|m| {
        facts.allocators.iter().any(|a| a == "glibc")
            && facts.allocator_modules.contains(&m.path)
            && m.path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libc"))
    });
    let Some(libc) = glibc else {
        return;
    };
    let found = *arenas
        .entry(libc.file.clone())
        .or_insert_with(|| heapstate::GlibcArenas::find(&libc.file));
    let bias = crate::probe::elf::load_bias(&libc.file, libc.start, libc.offset);
    if let (Some(found), Some(bias)) = (found, bias) {
        facts.allocator_free = found.free_bytes(pid, bias);
    }
}

/// Measures a live process's footprint from its smaps and the model's view of its mappings.
fn measure(pid: u32, facts: &mut ProcessFacts, model: &Model) {
    // A process that has exited (a zombie) still has an smaps file, with nothing in it.
    if let Some(vmas) = procfs::smaps(pid).filter(|v| !v.is_empty()) {
        let vmas: Vec<crate::model::Vma> = vmas
            .into_iter()
            .map(|v| crate::model::Vma {
                start: v.start,
                end: v.end,
                anonymous_mapping: v.anonymous_mapping,
                special: v.special,
                anon_resident: v.anon_resident,
            })
            .collect();
        let resident = |start, end| procfs::resident_bytes(pid, start, end);
        facts.footprint_bytes = Some(model.footprint(pid, &vmas, resident));
    }
}

/// Whether `pid` runs another program than the image `facts` describes: it `exec`ed, and
/// the event saying so is not applied yet (events wait a few milliseconds to be merged in
/// time order). What `/proc` shows then is the new program's: its name and mappings were
/// taken for the old image's (a script run by `sh` named after the program it execs).
fn runs_another_program(pid: u32, facts: &ProcessFacts) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let file = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let image = facts
        .exe_file
        .or_else(|| facts.exe.as_deref().and_then(file));
    let running = file(Path::new(&format!("/proc/{pid}/exe")));
    matches!((image, running), (Some(image), Some(now)) if image != now)
}

/// Reads what `/proc` has on a live process: names, and a mapping snapshot whose files are
/// pinned open so they stay readable whatever happens to the process or the files.
fn observe(pid: u32, facts: &mut ProcessFacts, files: &mut Files) {
    if runs_another_program(pid, facts) {
        return;
    }
    if !files.events_only
        && let Ok(mut snapshot) = procfs::MapsSnapshot::read(pid)
    {
        snapshot.pin_files(pid, &mut files.pins);
        facts.maps.push(snapshot);
    }
    if let Some(comm) = procfs::comm(pid) {
        facts.comm = Some(comm);
    }
    if facts.ppid.is_none() {
        facts.ppid = procfs::ppid(pid);
    }
    if facts.start_ticks.is_none() {
        facts.start_ticks = procfs::start_ticks(pid);
    }
    if facts.cgroup.is_none() {
        facts.cgroup = procfs::cgroup(pid);
    }
    if let Some(exe) = procfs::exe(pid) {
        facts.exe = Some(exe);
    }
}
