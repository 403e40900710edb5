//! Unwind tables for the kernel's stack walk, and which way each traced process's stacks are
//! captured (`PROCESS_MODULES`).
//!
//! A table is built once per module file (by device and inode, so every process and every
//! mount namespace mapping it shares it): for a command about to start, from the files its
//! loader will map, and otherwise when a listed process first maps it. Each table is also
//! filed by the file's identity (`FILE_TABLES`), so the kernel can walk code no list covers
//! yet (a program just `exec`ed, a library just loaded) from the mapping that holds it, and
//! copies the stack only for code with no table at all. A table no traced process's list
//! uses any more is let go (`usage`): unfiled after a while, its rows reused once no walk can
//! be reading them.
//!
//! A big file met while tracing (a compiler's 30 MB `cc1plus` exec'd mid-run: 517 k rows,
//! 79 ms) is compiled on a thread of its own, so the collector keeps emptying the rings
//! meanwhile; until the table is in, the kernel ends stacks at its code, marked truncated
//! (copies would make the collector parse the same file on its event path), then the
//! processes that map it are listed again.

pub mod compile;
mod rows;
mod usage;

use std::{
    io::Read as _,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, Map},
};
use rustc_hash::FxHashMap;
use tracer_common::{
    maps,
    unwind::{MAX_PROCESS_MODULES, ModuleRange, ProcessModules, TableKey},
};

use crate::{
    error::{Error, Result},
    probe::StackMode,
    procfs::{FileKey, MapsSnapshot},
};

/// One module file's table in the row store.
#[derive(Debug)]
struct FileTable {
    /// The file as the process that first mapped it named it (for `-v`).
    path: PathBuf,
    /// None: the map had no room (its code's stacks are copied instead).
    first: Option<u32>,
    rows: u32,
    /// The file's executable segments: how a mapping of it translates to the table's
    /// addresses.
    segments: Vec<(u64, u64, u64)>,
}

/// What building one module's table took, for `-v` and the bench.
#[derive(Clone, Debug)]
pub struct Built {
    pub path: PathBuf,
    pub rows: u32,
    pub bytes: u64,
    pub took: Duration,
    /// It did not fit in the row map: its frames are unwound from copies.
    pub no_room: bool,
}

/// Files at least this big met while tracing have their tables built off the event path.
const BUILT_APART_BYTES: u64 = 16 << 20;

/// A big file's table being compiled on a thread of its own.
struct Pending {
    path: PathBuf,
    started: Instant,
    build: JoinHandle<Option<compile::Compiled>>,
}

/// The kernel's stack-walk state for every traced process.
pub struct StackWalks {
    rows: rows::RowStore,
    files: FxHashMap<FileKey, FileTable>,
    pending: FxHashMap<FileKey, Pending>,
    /// Processes listed while a table of theirs was being built, with their mode: listed
    /// again once it is in.
    waiting: FxHashMap<u32, StackMode>,
    /// Which lists use which tables.
    usage: usage::Usage,
    /// Every table built, in order.
    pub built: Vec<Built>,
    verbose: bool,
}

impl StackWalks {
    /// Takes the row map of the loaded object (created with `capacity` rows).
    pub fn new(ebpf: &Ebpf, capacity: u32, verbose: bool) -> Result<Self> {
        let map_error = |source: Box<dyn std::error::Error + Send + Sync>| Error::Map {
            map: maps::UNWIND_ROWS,
            source,
        };
        let Some(Map::Array(data)) = ebpf.map(maps::UNWIND_ROWS) else {
            return Err(map_error("missing from the eBPF object".into()));
        };
        let fd = data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| map_error(Box::new(e)))?;
        Ok(Self {
            rows: rows::RowStore::new(fd, capacity),
            files: FxHashMap::default(),
            pending: FxHashMap::default(),
            waiting: FxHashMap::default(),
            usage: usage::Usage::default(),
            built: Vec::new(),
            verbose,
        })
    }

    /// Says how `pid`'s stacks are captured from now on; for in-kernel `dwarf`, lists its
    /// code with a table for each module (built now for files not seen before).
    /// (`with_code` false: its mode alone, for a command about to `exec`, whose mappings are
    /// not its program's yet.)
    pub fn list(
        &mut self,
        ebpf: &mut Ebpf,
        pid: u32,
        mode: StackMode,
        with_code: bool,
    ) -> Result<()> {
        let mut entry = ProcessModules {
            walk: mode.walk(),
            ..ProcessModules::default()
        };
        self.waiting.remove(&pid);
        let mut files = Vec::new();
        if mode == StackMode::Dwarf && with_code {
            // A process gone meanwhile keeps an empty list: its stacks are copied.
            let snapshot = MapsSnapshot::read(pid).unwrap_or_default();
            for m in snapshot.mappings().iter().take(MAX_PROCESS_MODULES) {
                let Some((key, range)) = self.module(ebpf, (pid, mode), m) else {
                    continue;
                };
                entry.modules[entry.count as usize] = range;
                entry.count += 1;
                files.push(key);
            }
        }
        for key in self.usage.listed(pid, files, Instant::now()) {
            if let Some(table) = self.files.get(&key) {
                file_table(ebpf, key, table);
            }
        }
        let written = write_entry(ebpf, pid, &entry);
        if self.verbose && mode == StackMode::Dwarf && with_code {
            let with_rows = entry.modules[..entry.count as usize]
                .iter()
                .filter(|m| m.rows > 0)
                .count();
            eprintln!(
                "alloctrace: pid {pid}: {} code mappings listed for the kernel's walk, {with_rows} \
                 with unwind tables ({} rows in use)",
                entry.count,
                self.rows.used()
            );
        }
        written
    }

    /// `pid` ended: its entry goes.
    pub fn forget(&mut self, ebpf: &mut Ebpf, pid: u32) {
        if let Some(map) = ebpf.map_mut(maps::PROCESS_MODULES)
            && let Ok(mut list) = BpfHashMap::<_, u32, ProcessModules>::try_from(map)
        {
            let _ = list.remove(&pid);
        }
        self.usage.forget(pid, Instant::now());
    }

    /// `parent` forked `child`: the kernel copied the parent's list for it.
    pub fn inherit(&mut self, parent: u32, child: u32) {
        self.usage.inherit(parent, child, Instant::now());
    }

    /// Lets go of the tables no list has used for a while: unfiled first, their rows freed
    /// a little later (see `usage`).
    pub fn retire(&mut self, ebpf: &mut Ebpf) {
        for due in self.usage.due(Instant::now()) {
            match due {
                usage::Due::Unfile(key) => file_as(ebpf, key, None),
                usage::Due::Release(key) => self.release(key),
            }
        }
    }

    fn release(&mut self, key: FileKey) {
        let Some(table) = self.files.remove(&key) else {
            return;
        };
        if let Some(first) = table.first {
            self.rows.release(first, table.rows);
        }
        if self.verbose {
            eprintln!(
                "alloctrace: unwind table for {} released ({} rows, {} in use now): no traced \
                 process maps it any more",
                table.path.display(),
                table.rows,
                self.rows.used()
            );
        }
    }

    /// Rows in use in the row map.
    pub fn rows_used(&self) -> u32 {
        self.rows.used()
    }

    /// Builds the tables of files a command about to start will map (its program and the
    /// libraries its loader will load), so its first stacks are walked in the kernel.
    pub fn prepare(&mut self, ebpf: &mut Ebpf, files: &[PathBuf]) {
        for path in files {
            let _ = self.table(ebpf, path, path, None);
        }
    }

    /// Files the tables built apart for: each goes in, and the processes that waited for
    /// one are returned with their modes, to be listed again.
    pub fn finish_builds(&mut self, ebpf: &mut Ebpf) -> Vec<(u32, StackMode)> {
        let done: Vec<FileKey> = self
            .pending
            .iter()
            .filter(|(_, p)| p.build.is_finished())
            .map(|(&key, _)| key)
            .collect();
        if done.is_empty() {
            return Vec::new();
        }
        for key in done {
            let Some(p) = self.pending.remove(&key) else {
                continue;
            };
            // A file that cannot be read or has no CFI is filed without a table (its code's
            // stacks are copied), so that it is not built again at every listing.
            let table = match p.build.join().ok().flatten() {
                Some(compiled) => self.store(compiled, &p.path, (p.started, true)),
                None => FileTable {
                    path: p.path,
                    first: None,
                    rows: 0,
                    segments: Vec::new(),
                },
            };
            file_table(ebpf, key, &table); // without rows: unfiled, its stacks are copied
            self.usage.stored(key, Instant::now());
            self.files.insert(key, table);
        }
        if !self.pending.is_empty() {
            return Vec::new(); // listed again when the last one is in
        }
        self.waiting.drain().collect()
    }

    /// The module mapped by `m` in `pid`, with its table, and the file's key.
    fn module(
        &mut self,
        ebpf: &mut Ebpf,
        (pid, mode): (u32, StackMode),
        m: &crate::procfs::Mapping,
    ) -> Option<(FileKey, ModuleRange)> {
        let via = PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end));
        let (key, table) = self.table(ebpf, &via, &m.path, Some((pid, mode)))?;
        let bias = compile::bias(&table.segments, m.start, m.end, m.offset)?;
        let range = ModuleRange {
            start: m.start,
            end: m.end,
            bias,
            first_row: table.first.unwrap_or(0),
            rows: if table.first.is_some() { table.rows } else { 0 },
        };
        Some((key, range))
    }

    /// The table of the file at `via` (known as `path`), built and filed on first sight;
    /// for a process `listing` it, a big file's is built apart (None until it is in).
    fn table(
        &mut self,
        ebpf: &mut Ebpf,
        via: &Path,
        path: &Path,
        listing: Option<(u32, StackMode)>,
    ) -> Option<(FileKey, &FileTable)> {
        let meta = std::fs::metadata(via).ok()?;
        let key = FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
        };
        if let Some((pid, mode)) = listing
            && !self.files.contains_key(&key)
            && (self.pending.contains_key(&key) || meta.len() >= BUILT_APART_BYTES)
        {
            self.waiting.insert(pid, mode);
            if let std::collections::hash_map::Entry::Vacant(slot) = self.pending.entry(key) {
                let file = std::fs::File::open(via).ok()?;
                let build = std::thread::Builder::new()
                    .name("unwind-table".into())
                    .spawn(move || compile_file(file))
                    .ok()?;
                slot.insert(Pending {
                    path: path.to_path_buf(),
                    started: Instant::now(),
                    build,
                });
                file_pending(ebpf, key);
            }
            return None;
        }
        if !self.files.contains_key(&key) {
            let table = self.build(via, path)?;
            if table.first.is_some() {
                file_table(ebpf, key, &table);
            }
            self.usage.stored(key, Instant::now());
            self.files.insert(key, table);
        }
        self.files.get(&key).map(|t| (key, t))
    }

    /// Builds and stores the table of the file at `via` (known to the process as `path`).
    fn build(&mut self, via: &Path, path: &Path) -> Option<FileTable> {
        let started = Instant::now();
        let compiled = compile_file(std::fs::File::open(via).ok()?)?;
        Some(self.store(compiled, path, (started, false)))
    }

    /// Stores a compiled table in the row map, says what it took (since `started`, and
    /// whether it was built `apart`, off the event path).
    fn store(
        &mut self,
        compiled: compile::Compiled,
        path: &Path,
        (started, apart): (Instant, bool),
    ) -> FileTable {
        let compile::Compiled { rows, segments, .. } = compiled;
        let first = self.rows.store(&rows).ok().flatten();
        let built = Built {
            path: path.to_path_buf(),
            rows: rows.len() as u32,
            bytes: (rows.len() * std::mem::size_of::<tracer_common::unwind::UnwindRow>()) as u64,
            took: started.elapsed(),
            no_room: first.is_none(),
        };
        if self.verbose {
            eprintln!(
                "alloctrace: unwind table for {}: {} rows{}, {} KiB, built in {:.1} ms{}",
                built.path.display(),
                built.rows,
                first.map(|f| format!(" from row {f}")).unwrap_or_default(),
                built.bytes / 1024,
                built.took.as_secs_f64() * 1e3,
                match (built.no_room, apart) {
                    (true, _) => " (no room left in the row map: its stacks are copied)",
                    (false, true) => {
                        " (built apart, off the event path: stacks through it were cut short \
                         until now)"
                    }
                    _ => "",
                }
            );
        }
        self.built.push(built);
        FileTable {
            path: path.to_path_buf(),
            first,
            rows: rows.len() as u32,
            segments,
        }
    }
}

/// Reads and compiles one module file's CFI.
fn compile_file(mut file: std::fs::File) -> Option<compile::Compiled> {
    let mut data = Vec::new();
    file.read_to_end(&mut data).ok()?;
    compile::compile(&data)
}

/// Files `table` under the file's identity as the kernel encodes it, for walks through a
/// mapping (best effort: without it, such code is copied — and a file filed as pending is
/// taken out, not left ending its stacks).
fn file_table(ebpf: &mut Ebpf, key: FileKey, table: &FileTable) {
    let value = table.first.and_then(|first| {
        compile::delta(&table.segments).map(|delta| tracer_common::unwind::FileTable {
            first_row: first,
            rows: table.rows,
            delta,
        })
    });
    file_as(ebpf, key, value);
}

/// Files `key` as a table being built (no rows): until it is in, the kernel ends stacks at
/// its code, marked truncated.
fn file_pending(ebpf: &mut Ebpf, key: FileKey) {
    let pending = tracer_common::unwind::FileTable {
        first_row: 0,
        rows: 0,
        delta: 0,
    };
    file_as(ebpf, key, Some(pending));
}

/// Files `key` in `FILE_TABLES` as `value`, or takes it out (`None`: its code is copied).
fn file_as(ebpf: &mut Ebpf, key: FileKey, value: Option<tracer_common::unwind::FileTable>) {
    let kernel_key = TableKey {
        ino: key.ino,
        dev: key.kernel_dev(),
    };
    let Some(map) = ebpf.map_mut(maps::FILE_TABLES) else {
        return;
    };
    let Ok(mut tables) = BpfHashMap::<_, TableKey, tracer_common::unwind::FileTable>::try_from(map)
    else {
        return;
    };
    let _ = match value {
        Some(value) => tables.insert(&kernel_key, &value, 0),
        None => tables.remove(&kernel_key),
    };
}

fn write_entry(ebpf: &mut Ebpf, pid: u32, entry: &ProcessModules) -> Result<()> {
    let map_error = |source: Box<dyn std::error::Error + Send + Sync>| Error::Map {
        map: maps::PROCESS_MODULES,
        source,
    };
    let map = ebpf
        .map_mut(maps::PROCESS_MODULES)
        .ok_or_else(|| map_error("missing from the eBPF object".into()))?;
    let mut list =
        BpfHashMap::<_, u32, ProcessModules>::try_from(map).map_err(|e| map_error(Box::new(e)))?;
    list.insert(&pid, entry, 0)
        .map_err(|e| map_error(Box::new(e)))
}
