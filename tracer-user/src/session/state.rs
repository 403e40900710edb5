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
        let image = *self.images.entry(pid).or_default();
        self.facts.insert((pid, image), facts);
        if !self.live.contains(&pid) {
            self.live.push(pid);
        }
    }

    /// The facts of `pid`'s current image.
    pub fn facts_mut(&mut self, pid: Tgid) -> &mut ProcessFacts {
        let image = *self.images.entry(pid).or_default();
        self.facts.entry((pid, image)).or_default()
    }

    pub fn facts(&self, pid: Tgid) -> Option<&ProcessFacts> {
        let image = self.images.get(&pid).copied().unwrap_or(0);
        self.facts.get(&(pid, image))
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
                images: &mut self.images,
                execs: &mut self.execs,
                exec_planned: &mut self.exec_planned,
                pins: &mut self.pins,
                notices: &mut self.notices,
            };
            let before = view.notices.len();
            capture.drain(&mut self.stacks, &mut view, flush, &mut ready);
            // Rings are read one after another: an `exec` read from a later ring than the
            // process's next mapping is known only now, so mappings are placed by time.
            for event in &self.notices[before..] {
                if let Op::MapFile {
                    addr,
                    len,
                    offset,
                    file,
                } = event.op
                {
                    let image = image_at(&self.execs, &self.images, event.tgid, event.ts_ns);
                    let facts = self.facts.entry((event.tgid, image)).or_default();
                    if let Some(m) =
                        crate::layout::mapped((addr, len, offset), file, &self.pins.pins)
                    {
                        facts.maps.note(m);
                    }
                }
            }
        }
        for event in &ready {
            self.model.apply(event);
            if event.op == Op::Exit {
                self.ended(event.tgid, event.ts_ns);
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
        for &pid in &self.live {
            let image = self.images.get(&pid).copied().unwrap_or(0);
            let facts = self.facts.entry((pid, image)).or_default();
            measure(pid, facts, &self.model);
            if refresh || facts.maps.is_empty() {
                observe(pid, facts, &mut self.pins);
            }
            sampled.push((pid, facts.footprint_bytes));
        }
        self.model.sample(procfs::monotonic_ns(), &sampled);
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

    /// `pid` ended at `ts_ns` (its exit event settled).
    fn ended(&mut self, pid: Tgid, ts_ns: u64) {
        self.live.retain(|&p| p != pid);
        let facts = self.facts_mut(pid);
        facts.exited = true;
        facts.end_ns = Some(ts_ns);
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
            self.ended(pid, procfs::monotonic_ns());
        }
    }
}

/// The traced processes as capture sees them while decoding.
struct View<'a> {
    facts: &'a mut FxHashMap<ImageKey, ProcessFacts>,
    execs: &'a mut FxHashMap<Tgid, Vec<u64>>,
    images: &'a mut FxHashMap<Tgid, u32>,
    exec_planned: &'a mut rustc_hash::FxHashSet<Tgid>,
    pins: &'a mut Files,
    notices: &'a mut Vec<Event>,
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

    fn noticed(&mut self, event: &Event) {
        match event.op {
            // A new code mapping: read the mappings while the module is surely there.
            Op::Map { .. } => {
                let image = self.images.get(&event.tgid).copied().unwrap_or(0);
                let facts = self.facts.entry((event.tgid, image)).or_default();
                observe(event.tgid, facts, self.pins);
            }
            Op::Exec { layout } => {
                self.execs.entry(event.tgid).or_default().push(event.ts_ns);
                begin_image(
                    self.facts,
                    self.images,
                    self.exec_planned,
                    self.pins,
                    event.tgid,
                );
                if let Some(layout) = layout {
                    let facts = current(self.facts, self.images, event.tgid);
                    for m in crate::layout::after_exec(&layout, &mut self.pins.pins) {
                        facts.maps.note(m);
                    }
                }
            }
            // Noted once every ring was read (see `State::drain`).
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
    exec_planned: &mut rustc_hash::FxHashSet<Tgid>,
    pins: &mut Files,
    pid: Tgid,
) {
    let image = images.entry(pid).or_default();
    let old = facts.get(&(pid, *image)).cloned().unwrap_or_default();
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
            comm: old.comm,
            exe: old.exe,
            attached: old.attached,
            no_allocator: Some(
                "it replaced its program and was gone before alloctrace could read the new \
                 program's mappings"
                    .into(),
            ),
            ..ProcessFacts::default()
        }
    };
    let new = facts.entry((pid, *image)).insert_entry(new).into_mut();
    observe(pid, new, pins);
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

/// Reads what `/proc` has on a live process: names, and a mapping snapshot whose files are
/// pinned open so they stay readable whatever happens to the process or the files.
fn observe(pid: u32, facts: &mut ProcessFacts, files: &mut Files) {
    if !files.events_only
        && let Ok(mut snapshot) = procfs::MapsSnapshot::read(pid)
    {
        snapshot.pin_files(pid, &mut files.pins);
        facts.maps.push(snapshot);
    }
    if let Some(comm) = procfs::comm(pid) {
        facts.comm = Some(comm);
    }
    if let Some(exe) = procfs::exe(pid) {
        facts.exe = Some(exe);
    }
}
