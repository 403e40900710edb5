//! The discovery stage: which processes are traced, which modules they map, which
//! allocators those modules carry, and which probes that means. `run`, `attach` and `system`
//! differ only in how they choose processes; from there on every process goes through here,
//! at start (from `/proc`) and whenever it forks or replaces its program.
//!
//! A module is known by its file's identity (device, inode), so a file mapped by many
//! processes, or by many containers, is read once and probed once per scope.

pub mod allocators;
pub mod loader;

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustc_hash::FxHashMap;

pub use allocators::{Found, Point};

use crate::{
    probe::{elf::ElfFunctions, stack_mode},
    procfs::MapsSnapshot,
};

/// A module file as the kernel knows it: the same in every process and mount namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    pub fn of(path: &Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// An allocator in a module of a process, ready to be probed.
#[derive(Clone, Debug)]
pub struct Placed {
    pub file: FileId,
    /// Where this collector opens the file (and tells the kernel to probe it).
    pub open: PathBuf,
    /// The path the process knows it by.
    pub path: Arc<Path>,
    pub found: Arc<Found>,
}

/// What a process needs: its allocators and how its stacks are captured.
#[derive(Clone, Debug)]
pub struct ProcessPlan {
    pub pid: u32,
    pub exe: Option<PathBuf>,
    pub allocators: Vec<Placed>,
    pub stack_mode: stack_mode::Decision,
    /// Every module file read for the plan (for a program not started yet, those its loader
    /// will map): kept open, they symbolize a process gone before its mappings are read.
    pub modules: Vec<PathBuf>,
    /// The process has not `exec`ed the program yet (it still maps what forked it).
    pub before_exec: bool,
}

impl ProcessPlan {
    /// Why nothing in the process can be probed, when nothing can.
    pub fn none_reason(&self) -> Option<String> {
        if !self.allocators.is_empty() {
            return None;
        }
        let Some(exe) = self.exe.as_ref() else {
            return Some("its executable could not be read".into());
        };
        Some(format!("{}: {}", exe.display(), why_none(exe)))
    }

    /// Paths (as the process knows them) of the modules carrying its allocators: a mapping
    /// made from code there is the allocator's own.
    pub fn allocator_modules(&self) -> Vec<Arc<Path>> {
        let mut paths: Vec<Arc<Path>> = self.allocators.iter().map(|a| a.path.clone()).collect();
        paths.sort();
        paths.dedup();
        paths
    }
}

/// Why an executable in which no allocator was found has none alloctrace can probe, from
/// what kind of program it is.
fn why_none(exe: &Path) -> &'static str {
    use object::Object as _;
    let Ok(data) = std::fs::read(exe) else {
        return "it could not be read";
    };
    let Ok(file) = object::File::parse(&*data) else {
        return "it is not an ELF file alloctrace can read";
    };
    let has = |name: &str| file.section_by_name(name).is_some();
    if has(".go.buildinfo") || has(".gopclntab") {
        return "a Go program: Go's own allocator has no entry point alloctrace can probe \
                (only a cgo program's C allocations could be traced)";
    }
    let dynamic = crate::probe::elf::has_interp(&data);
    let symbols = has(".symtab") || file.dynamic_symbols().next().is_some();
    match (dynamic, symbols) {
        (false, false) => {
            "it is statically linked and stripped: its malloc has no symbol left to probe \
             (a build that keeps its symbol table, or its detached debug symbols, would do)"
        }
        (false, true) => {
            "it is statically linked, and its symbols name no allocator alloctrace knows \
             (glibc, musl, jemalloc, tcmalloc, mimalloc)"
        }
        _ => {
            "neither it nor any library it maps defines an allocator alloctrace knows \
             (glibc, musl, jemalloc, tcmalloc, mimalloc)"
        }
    }
}

/// Reads modules and remembers what each file carries.
#[derive(Default)]
pub struct Discovery {
    files: FxHashMap<FileId, Arc<[Arc<Found>]>>,
    /// `--stack-mode`, when given.
    forced: Option<stack_mode::StackMode>,
}

impl Discovery {
    pub fn new(forced: Option<stack_mode::StackMode>) -> Self {
        Self {
            files: FxHashMap::default(),
            forced,
        }
    }

    /// What a live process needs, from its mappings.
    pub fn process(&mut self, pid: u32) -> std::io::Result<ProcessPlan> {
        let maps = MapsSnapshot::read(pid)?;
        let exe = crate::procfs::exe(pid);
        let mut allocators = Vec::new();
        let mut seen = Vec::new();
        for m in maps.mappings() {
            let open = openable(pid, &m.path, m.start, m.end);
            let Some(file) = FileId::of(&open) else {
                continue;
            };
            if seen.contains(&file) {
                continue;
            }
            seen.push(file);
            allocators.extend(self.placed(file, &open, &m.path));
        }
        let decision =
            stack_mode::decide(self.forced, Some(Path::new(&format!("/proc/{pid}/exe"))));
        Ok(ProcessPlan {
            pid,
            exe,
            allocators,
            stack_mode: decision,
            // Its mappings are read (and their files kept) as it is observed.
            modules: Vec::new(),
            before_exec: false,
        })
    }

    /// What a program about to be started needs: its own allocators and those of the
    /// libraries its loader will map (`loader::libraries`), known before it runs, so its first
    /// allocation is traced.
    pub fn program(&mut self, pid: u32, program: &Path) -> ProcessPlan {
        let mut allocators = Vec::new();
        let mut modules = vec![program.to_owned()];
        modules.extend(loader::libraries(program));
        let mut seen = Vec::new();
        for module in &modules {
            let Some(file) = FileId::of(module) else {
                continue;
            };
            if seen.contains(&file) {
                continue;
            }
            seen.push(file);
            let path: Arc<Path> = Arc::from(module.as_path());
            allocators.extend(self.placed(file, module, &path));
        }
        ProcessPlan {
            pid,
            exe: Some(program.to_owned()),
            allocators,
            stack_mode: stack_mode::decide(self.forced, Some(program)),
            modules,
            before_exec: true,
        }
    }

    /// The allocators of one module file, read once per file.
    fn placed(&mut self, file: FileId, open: &Path, path: &Arc<Path>) -> Vec<Placed> {
        let found = self
            .files
            .entry(file)
            .or_insert_with(|| match ElfFunctions::read(open) {
                Ok(functions) => allocators::detect(&functions, path)
                    .into_iter()
                    .map(Arc::new)
                    .collect(),
                Err(_) => Arc::from([]),
            })
            .clone();
        found
            .iter()
            .map(|f| Placed {
                file,
                open: open.to_owned(),
                path: path.clone(),
                found: f.clone(),
            })
            .collect()
    }
}

/// A path this collector can open that names the very file process `pid` maps at
/// `start..end` from `path`: the path itself when it is the same file here, else the same
/// path under `/proc/PID/root` (another mount namespace, a container), else the mapping
/// itself through `/proc/PID/map_files`.
pub fn openable(pid: u32, path: &Path, start: u64, end: u64) -> PathBuf {
    let mapped = PathBuf::from(format!("/proc/{pid}/map_files/{start:x}-{end:x}"));
    let via_root =
        PathBuf::from(format!("/proc/{pid}/root")).join(path.strip_prefix("/").unwrap_or(path));
    match FileId::of(&mapped) {
        Some(target) => [path.to_owned(), via_root]
            .into_iter()
            .find(|candidate| FileId::of(candidate) == Some(target))
            .unwrap_or(mapped),
        // The mapping moved since the mappings were read (a loader remapping it): the path
        // the process knows, where it names a file.
        None => [path.to_owned(), via_root]
            .into_iter()
            .find(|candidate| FileId::of(candidate).is_some())
            .unwrap_or(mapped),
    }
}
