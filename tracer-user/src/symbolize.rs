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

use std::{cell::RefCell, path::Path, sync::Arc};

use blazesym::symbolize::{
    Input, Symbolized, Symbolizer as Blaze,
    source::{Elf, Source},
};
use rustc_hash::FxHashMap;

use crate::procfs::{self, MapsSnapshot};

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

/// A symbolized stack: for each return address its frames (inlined callees first, then the
/// real function), shared with every other stack through the same address. A deep program
/// (python's 40-frame stacks, tens of thousands of them) would otherwise hold a copy of every
/// frame's strings per stack: hundreds of MiB at report time.
#[derive(Clone, Debug, Default)]
pub struct Stack(Vec<Arc<[Frame]>>);

impl Stack {
    pub fn frames(&self) -> impl Iterator<Item = &Frame> {
        self.0.iter().flat_map(|chunk| chunk.iter())
    }

    /// The frames on their own, for a stack that is shown.
    pub fn to_vec(&self) -> Vec<Frame> {
        self.frames().cloned().collect()
    }
}

impl From<Vec<Frame>> for Stack {
    fn from(frames: Vec<Frame>) -> Self {
        Self(vec![frames.into()])
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
        }
    }

    /// Lets go of every file blazesym parsed (decompressed debug info, line tables) once a
    /// batch of stacks is resolved, rather than keeping them for the next batch: a one-off
    /// report resolves each process's stacks in one batch, and python3.11's debug file alone
    /// is 25 MB decompressed, held through the rest of the report otherwise. A later process
    /// mapping the same files parses them again.
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
    pub fn stacks(&self, maps: &ProcessMaps, stacks: &[&[u64]]) -> Vec<Stack> {
        // Every frame is a return address; the call is the instruction before it. Located
        // twice (to collect what is new, then to assemble) rather than kept: 20 000 deep
        // stacks' locations were 13 MB at the report's peak.
        let locate = |ip: u64| maps.normalize(ip.saturating_sub(1));
        let mut per_module: FxHashMap<Arc<Path>, Vec<u64>> = FxHashMap::default();
        {
            let known = self.resolved.borrow();
            for &ip in stacks.iter().flat_map(|s| s.iter()) {
                if let Some(key) = locate(ip).filter(|k| !known.contains_key(k)) {
                    per_module.entry(key.0).or_default().push(key.1);
                }
            }
        }
        if let Some(bar) = &self.progress {
            bar.inc_length(per_module.len() as u64);
        }
        for (module, mut offsets) in per_module {
            if let Some(bar) = &self.progress {
                bar.inc(1);
            }
            offsets.sort_unstable();
            offsets.dedup();
            self.resolve(maps, &module, &offsets);
        }
        if self.release_files {
            *self.blaze.borrow_mut() = blaze();
        }
        let resolved = self.resolved.borrow();
        stacks
            .iter()
            .map(|ips| {
                Stack(
                    ips.iter()
                        .map(|&ip| match locate(ip) {
                            Some(k) => resolved.get(&k).cloned().unwrap_or_else(|| Arc::from([])),
                            None => Arc::from([unknown(None, ip)]),
                        })
                        .collect(),
                )
            })
            .collect()
    }
}

impl Symbolizer {
    /// Resolves `offsets` (sorted, distinct) of one module in one batch and remembers them.
    fn resolve(&self, maps: &ProcessMaps, module: &Arc<Path>, offsets: &[u64]) {
        let shown = maps.display_path(module);
        let blaze = self.blaze.borrow();
        let results = blaze
            .symbolize(
                &Source::Elf(Elf::new(module.to_path_buf())),
                Input::FileOffset(offsets),
            )
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
