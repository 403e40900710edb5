//! Stack addresses → functions, files and lines, with blazesym.
//!
//! Only the stacks that will be shown are symbolized, in one batch per module. Addresses are
//! first normalized to (module, file offset) against the process's mapping snapshots, taken
//! while it was alive, so stacks of processes that have exited resolve from the files on disk.
//! A frame that cannot be resolved keeps its module and offset: it is never dropped.
//!
//! blazesym finds the debug info (in the module, through `.gnu_debuglink`, build-id or
//! `.gnu_debugaltlink`) and resolves functions, inline chains, files and lines; names are
//! demangled here ([`crate::demangle`]) because blazesym demangles by guessing from the
//! unit's language, which turns C's `f` into `float`. Resolved addresses are remembered for
//! the session, so a later report resolves only what is new.

use std::{
    cell::RefCell,
    path::{Path, PathBuf},
    sync::Arc,
};

use blazesym::symbolize::{
    Input, Symbolized, Symbolizer as Blaze,
    source::{Elf, Source},
};
use rustc_hash::FxHashMap;

use crate::procfs::{self, MapsSnapshot};

mod debug_cache;

/// Addresses of one module resolved together when files are let go between batches.
const RUN: usize = 1024;

/// One frame as shown to the user, innermost first. Inlined calls are frames of their own.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frame {
    /// Demangled function name; `None` when no symbol covers the address.
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// The module (executable or library) path; `None` when the address is in no known
    /// file mapping.
    pub module: Option<Arc<Path>>,
    /// File offset inside `module`, or the raw address when the module is unknown.
    pub address: u64,
    pub inlined: bool,
    /// Where this collector can open `module` (a pinned path), for reading its DWARF.
    pub object: Option<Arc<Path>>,
}

/// Symbolized stacks: for each return address its frames (inlined callees first, then the
/// real function). Each distinct address's frames are held once, and a stack is a run of
/// indices into them: a deep program (python's 13 000 stacks of 42 addresses) would
/// otherwise hold a copy of every frame's strings per stack (hundreds of MiB), and as
/// pointers the stacks alone were 9 MB at the report's peak.
#[derive(Clone, Debug, Default)]
pub struct Stacks {
    chunks: Vec<Arc<[Frame]>>,
    /// Stack `i` is `ids[starts[i]..starts[i + 1]]`.
    starts: Vec<u32>,
    ids: Vec<u32>,
}

impl Stacks {
    pub fn len(&self) -> usize {
        self.starts.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stack `i` (panics past the end, as indexing does).
    pub fn get(&self, i: usize) -> Stack<'_> {
        let (from, to) = (self.starts[i] as usize, self.starts[i + 1] as usize);
        Stack {
            chunks: &self.chunks,
            ids: &self.ids[from..to],
        }
    }

    pub fn first(&self) -> Option<Stack<'_>> {
        (!self.is_empty()).then(|| self.get(0))
    }

    /// Appends a stack made of `chunks`, each an address's frames.
    fn push(&mut self, chunks: impl Iterator<Item = u32>) {
        if self.starts.is_empty() {
            self.starts.push(0);
        }
        self.ids.extend(chunks);
        self.starts.push(self.ids.len() as u32);
    }

    /// Holds `frames` as a new chunk; its index.
    fn hold(&mut self, frames: Arc<[Frame]>) -> u32 {
        self.chunks.push(frames);
        (self.chunks.len() - 1) as u32
    }
}

impl From<Vec<Vec<Frame>>> for Stacks {
    fn from(stacks: Vec<Vec<Frame>>) -> Self {
        let mut out = Self::default();
        for frames in stacks {
            let id = out.hold(frames.into());
            out.push(std::iter::once(id));
        }
        out
    }
}

/// One symbolized stack, borrowed from its [`Stacks`].
#[derive(Clone, Copy, Debug)]
pub struct Stack<'a> {
    chunks: &'a [Arc<[Frame]>],
    ids: &'a [u32],
}

impl<'a> Stack<'a> {
    pub fn frames(self) -> impl Iterator<Item = &'a Frame> {
        let chunks = self.chunks;
        self.ids
            .iter()
            .flat_map(move |&id| chunks[id as usize].iter())
    }

    /// The frames on their own, for a stack that is shown.
    pub fn to_vec(self) -> Vec<Frame> {
        self.frames().cloned().collect()
    }
}

/// An address normalized to the file that holds its code: (path to open, file offset).
type ModuleOffset = (Arc<Path>, u64);

/// Mapping snapshots of one process, oldest first, and the mappings rebuilt from the
/// kernel's events (see `layout`), used where no snapshot maps an address: a process gone
/// before its mappings were read.
#[derive(Clone, Debug, Default)]
pub struct ProcessMaps {
    snapshots: Vec<MapsSnapshot>,
    from_events: MapsSnapshot,
}

impl ProcessMaps {
    /// Keeps `snapshot` if it maps anything the newest one does not: a process's mappings
    /// are reread often, and change rarely.
    pub fn push(&mut self, snapshot: MapsSnapshot) {
        let same = self
            .snapshots
            .last()
            .is_some_and(|last| last.mappings() == snapshot.mappings());
        if !snapshot.is_empty() && !same {
            self.snapshots.push(snapshot);
        }
    }

    /// A mapping the kernel reported (it replaces any it overlaps).
    pub fn note(&mut self, mapping: procfs::Mapping) {
        self.from_events.insert(mapping);
    }

    pub fn is_empty(&self) -> bool {
        self.snapshots.is_empty() && self.from_events.is_empty()
    }

    /// The newest snapshot, or the mappings rebuilt from events when none could be read.
    pub fn latest(&self) -> Option<&MapsSnapshot> {
        self.snapshots
            .last()
            .or((!self.from_events.is_empty()).then_some(&self.from_events))
    }

    /// (module, file offset) of an address, from the newest snapshot that maps it.
    fn normalize(&self, addr: u64) -> Option<ModuleOffset> {
        self.snapshots
            .iter()
            .rev()
            .chain(std::iter::once(&self.from_events))
            .find_map(|s| s.find(addr))
            .map(|m| (m.file.clone(), m.file_offset(addr)))
    }

    /// The path the process knew a module by, for display.
    fn display_path(&self, file: &Arc<Path>) -> Arc<Path> {
        self.snapshots
            .iter()
            .rev()
            .chain(std::iter::once(&self.from_events))
            .flat_map(|s| s.mappings())
            .find(|m| &m.file == file)
            .map_or_else(|| file.clone(), |m| m.path.clone())
    }
}

pub struct Symbolizer {
    blaze: RefCell<Blaze>,
    /// Let go of the files blazesym parsed after each batch of stacks (see
    /// [`Symbolizer::releasing_files`]).
    release_files: bool,
    /// Frames of every (module, file offset) resolved so far.
    resolved: RefCell<FxHashMap<ModuleOffset, Arc<[Frame]>>>,
    /// Rust element types, from the same modules' DWARF.
    pub types: crate::types::TypeFinder,
    /// Build ids read so far, by the path the module was opened from.
    build_ids: RefCell<FxHashMap<Arc<Path>, Option<String>>>,
    /// Counts modules symbolized, for a progress bar on large reports.
    progress: Option<indicatif::ProgressBar>,
    /// Uncompressed copies of compressed debug files, mapped rather than inflated.
    debug_cache: debug_cache::DebugCache,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    pub fn new() -> Self {
        Self {
            blaze: RefCell::new(blaze()),
            release_files: false,
            resolved: RefCell::default(),
            types: crate::types::TypeFinder::default(),
            build_ids: RefCell::default(),
            progress: None,
            debug_cache: debug_cache::DebugCache::from_env(),
        }
    }

    /// Lets go of every file blazesym parsed (debug info, line tables) after each run of
    /// [`RUN`] addresses of a module, rather than keeping them for the next: a one-off report
    /// resolves each process's stacks once, and python3.11's debug info parsed whole was
    /// held through the rest of the report otherwise. A later run or process that needs the
    /// same files parses them again.
    pub fn releasing_files(mut self) -> Self {
        self.release_files = true;
        self
    }

    /// Ticks `bar` once per module symbolized (its length grows as batches come in).
    pub fn with_progress(mut self, bar: indicatif::ProgressBar) -> Self {
        self.progress = Some(bar);
        self
    }

    /// The hex build id of the module opened from `object`, read once: profiles name
    /// modules by it so that tools can find the right binary and debug info.
    pub fn build_id(&self, object: &Arc<Path>) -> Option<String> {
        self.build_ids
            .borrow_mut()
            .entry(object.clone())
            .or_insert_with(|| {
                let id = blazesym::helper::read_elf_build_id(object.as_ref()).ok()??;
                Some(id.iter().map(|b| format!("{b:02x}")).collect())
            })
            .clone()
    }

    /// Symbolizes stacks of one process (return addresses, innermost first).
    pub fn stacks(&self, maps: &ProcessMaps, stacks: &[&[u64]]) -> Stacks {
        // Every frame is a return address; the call is the instruction before it. Located
        // twice (to collect what is new, then to assemble) rather than kept: 20 000 deep
        // stacks' locations were 13 MB at the report's peak.
        let locate = |ip: u64| maps.normalize(ip.saturating_sub(1));
        // Distinct as they are found: python's 13 000 stacks of 42 frames are 550 000
        // addresses but 30 000 distinct ones, and the list of all of them (8 MiB) was alive
        // at the report's peak, beside the debug info being parsed.
        let mut per_module: FxHashMap<Arc<Path>, rustc_hash::FxHashSet<u64>> = FxHashMap::default();
        {
            let known = self.resolved.borrow();
            for &ip in stacks.iter().flat_map(|s| s.iter()) {
                if let Some(key) = locate(ip).filter(|k| !known.contains_key(k)) {
                    per_module.entry(key.0).or_default().insert(key.1);
                }
            }
        }
        if let Some(bar) = &self.progress {
            bar.inc_length(per_module.len() as u64);
        }
        for (module, offsets) in per_module {
            if let Some(bar) = &self.progress {
                bar.inc(1);
            }
            let mut offsets: Vec<u64> = offsets.into_iter().collect();
            offsets.sort_unstable();
            let inflated = self.inflated(&module, &offsets);
            if !self.release_files {
                let lookup = inflated.as_ref().map(|f| f.lookup(0..offsets.len()));
                self.resolve(maps, (&module, &offsets), lookup);
                continue;
            }
            // In runs of nearby addresses, letting go of the files after each: what blazesym
            // parses (line tables, inlined functions, the pages of the debug file) is then
            // that of the units one run touches, not of the whole module at once.
            for (i, run) in offsets.chunks(RUN).enumerate() {
                let at = i * RUN..i * RUN + run.len();
                let lookup = inflated.as_ref().map(|f| f.lookup(at));
                self.resolve(maps, (&module, run), lookup);
                *self.blaze.borrow_mut() = blaze();
            }
        }
        let resolved = self.resolved.borrow();
        let mut out = Stacks::default();
        // Each address's frames once, found by where the symbolizer keeps them.
        let mut held: FxHashMap<*const Frame, u32> = FxHashMap::default();
        for ips in stacks {
            let ids: Vec<u32> = ips
                .iter()
                .map(|&ip| {
                    let key = locate(ip);
                    match key.as_ref().and_then(|k| resolved.get(k)) {
                        Some(frames) => *held
                            .entry(frames.as_ptr())
                            .or_insert_with(|| out.hold(frames.clone())),
                        None if key.is_some() => out.hold(Arc::from([])),
                        None => out.hold(Arc::from([unknown(None, ip)])),
                    }
                })
                .collect();
            out.push(ids.into_iter());
        }
        out
    }
}

/// The uncompressed copy of a module's compressed debug file, and where its offsets are
/// there: link-time addresses (a debug file's segments hold no bytes to place file offsets
/// with), in the offsets' order.
struct Inflated {
    debug: PathBuf,
    addresses: Vec<u64>,
}

impl Inflated {
    /// The copy, with the addresses of the offsets `at` (a range of the module's offsets).
    fn lookup(&self, at: std::ops::Range<usize>) -> (&Path, &[u64]) {
        (&self.debug, &self.addresses[at])
    }
}

impl Symbolizer {
    /// The uncompressed copy of `module`'s debug info and its `offsets`' addresses there,
    /// when its debug file is compressed (the copy made if it is not there yet).
    fn inflated(&self, module: &Arc<Path>, offsets: &[u64]) -> Option<Inflated> {
        let debug = self.debug_cache.uncompressed_for(&self.build_id(module)?)?;
        let addresses = debug_cache::link_addresses(module, offsets)?;
        Some(Inflated { debug, addresses })
    }

    /// Resolves `offsets` (sorted, distinct) of one module in one batch and remembers them.
    /// `inflated`: the debug copy to read them from instead of the module, with their
    /// addresses there.
    fn resolve(
        &self,
        maps: &ProcessMaps,
        (module, offsets): (&Arc<Path>, &[u64]),
        inflated: Option<(&Path, &[u64])>,
    ) {
        let shown = maps.display_path(module);
        let blaze = self.blaze.borrow();
        let results = match inflated {
            Some((debug, addresses)) => blaze.symbolize(
                &Source::Elf(Elf::new(debug.to_path_buf())),
                Input::VirtOffset(addresses),
            ),
            None => blaze.symbolize(
                &Source::Elf(Elf::new(module.to_path_buf())),
                Input::FileOffset(offsets),
            ),
        }
        .unwrap_or_default();
        let mut resolved = self.resolved.borrow_mut();
        for (i, &offset) in offsets.iter().enumerate() {
            let frames = match results.get(i) {
                Some(Symbolized::Sym(sym)) => frames_of(sym, &shown, module, offset),
                _ => vec![Frame {
                    object: Some(module.clone()),
                    ..unknown(Some(shown.clone()), offset)
                }],
            };
            resolved.insert((module.clone(), offset), frames.into());
        }
    }
}

fn blaze() -> Blaze {
    Blaze::builder()
        .enable_code_info(true)
        .enable_inlined_fns(true)
        .enable_demangling(false)
        .build()
}

fn unknown(module: Option<Arc<Path>>, address: u64) -> Frame {
    Frame {
        module,
        address,
        ..Frame::default()
    }
}

/// The frames of one address: inlined callees innermost first, then the real function.
fn frames_of(
    sym: &blazesym::symbolize::Sym<'_>,
    module: &Arc<Path>,
    object: &Arc<Path>,
    offset: u64,
) -> Vec<Frame> {
    let code = |info: Option<&blazesym::symbolize::CodeInfo<'_>>| {
        info.map_or((None, None), |c| {
            (Some(c.to_path().display().to_string()), c.line)
        })
    };
    let mut frames = Vec::with_capacity(sym.inlined.len() + 1);
    for inl in sym.inlined.iter().rev() {
        let (file, line) = code(inl.code_info.as_ref());
        frames.push(Frame {
            function: Some(crate::demangle::demangle(&inl.name).into_owned()),
            file,
            line,
            module: Some(module.clone()),
            address: offset,
            inlined: true,
            object: Some(object.clone()),
        });
    }
    let (file, line) = code(sym.code_info.as_deref());
    frames.push(Frame {
        function: Some(crate::demangle::demangle(&sym.name).into_owned()),
        file,
        line,
        module: Some(module.clone()),
        address: offset,
        inlined: false,
        object: Some(object.clone()),
    });
    frames
}
