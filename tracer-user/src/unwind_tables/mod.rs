//! Unwind tables for the kernel's stack walk, and which way each traced process's stacks are
//! captured (`PROCESS_MODULES`).
//!
//! A table is built once per module file (by device and inode, so every process and every
//! mount namespace mapping it shares it), when the first listed process maps it, and its
//! rows are released when the last one stops. A process's list is written before its probes
//! go on and rewritten when it maps new code; until then the kernel copies the stacks that
//! reach code it has no table for, so no stack is ever walked with a wrong table.

pub mod compile;
mod rows;

use std::{
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, Map},
};
use rustc_hash::FxHashMap;
use tracer_common::{
    maps,
    unwind::{MAX_PROCESS_MODULES, ModuleRange, ProcessModules},
};

use crate::{
    error::{Error, Result},
    probe::StackMode,
    procfs::{FileKey, MapsSnapshot},
};

/// One module file's table in the row store.
#[derive(Debug)]
struct FileTable {
    /// None: the map had no room (its code's stacks are copied instead).
    first: Option<u32>,
    rows: u32,
    compiled: compile::Compiled,
    /// Listed processes mapping it.
    users: u32,
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

/// The kernel's stack-walk state for every traced process.
pub struct StackWalks {
    rows: rows::RowStore,
    files: FxHashMap<FileKey, FileTable>,
    /// The module files each listed process holds a table of.
    processes: FxHashMap<u32, Vec<FileKey>>,
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
            processes: FxHashMap::default(),
            built: Vec::new(),
            verbose,
        })
    }

    /// Says how `pid`'s stacks are captured from now on; for in-kernel `dwarf`, lists its
    /// code with a table for each module (built now for files not seen before).
    pub fn list(&mut self, ebpf: &mut Ebpf, pid: u32, mode: StackMode) -> Result<()> {
        let mut entry = ProcessModules {
            walk: mode.walk(),
            ..ProcessModules::default()
        };
        let mut keys = Vec::new();
        if mode == StackMode::Dwarf {
            // A process gone meanwhile keeps an empty list: its stacks are copied.
            let snapshot = MapsSnapshot::read(pid).unwrap_or_default();
            for m in snapshot.mappings().iter().take(MAX_PROCESS_MODULES) {
                let Some((key, range)) = self.module(pid, m) else {
                    continue;
                };
                keys.push(key);
                entry.modules[entry.count as usize] = range;
                entry.count += 1;
            }
        }
        let written = write_entry(ebpf, pid, &entry);
        // Holds taken before the old ones are let go, so a table both lists share stays.
        let old = std::mem::replace(self.processes.entry(pid).or_default(), keys);
        self.release(old);
        written
    }

    /// `pid` ended: its entry goes, and the tables only it used.
    pub fn forget(&mut self, ebpf: &mut Ebpf, pid: u32) {
        if let Some(keys) = self.processes.remove(&pid) {
            self.release(keys);
        }
        if let Some(map) = ebpf.map_mut(maps::PROCESS_MODULES)
            && let Ok(mut list) = BpfHashMap::<_, u32, ProcessModules>::try_from(map)
        {
            let _ = list.remove(&pid);
        }
    }

    /// Rows in use in the row map.
    pub fn rows_used(&self) -> u32 {
        self.rows.used()
    }

    /// The module mapped by `m` in `pid`, with its table (taken for this process).
    fn module(&mut self, pid: u32, m: &crate::procfs::Mapping) -> Option<(FileKey, ModuleRange)> {
        let via = PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end));
        let meta = std::fs::metadata(&via).ok()?;
        let key = FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
        };
        if !self.files.contains_key(&key) {
            let table = self.build(&via, &m.path)?;
            self.files.insert(key, table);
        }
        let table = self.files.get_mut(&key)?;
        let bias = table.compiled.bias(m.start, m.end, m.offset)?;
        table.users += 1;
        let range = ModuleRange {
            start: m.start,
            end: m.end,
            bias,
            first_row: table.first.unwrap_or(0),
            rows: if table.first.is_some() { table.rows } else { 0 },
        };
        Some((key, range))
    }

    /// Builds and stores the table of the file at `via` (known to the process as `path`).
    fn build(&mut self, via: &Path, path: &Path) -> Option<FileTable> {
        let started = Instant::now();
        let data = std::fs::read(via).ok()?;
        let mut compiled = compile::compile(&data)?;
        let rows = std::mem::take(&mut compiled.rows);
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
                "alloctrace: unwind table for {}: {} rows, {} KiB, built in {:.1} ms{}",
                built.path.display(),
                built.rows,
                built.bytes / 1024,
                built.took.as_secs_f64() * 1e3,
                if built.no_room { " (no room left in the row map: its stacks are copied)" } else { "" }
            );
        }
        self.built.push(built);
        Some(FileTable {
            first,
            rows: rows.len() as u32,
            compiled,
            users: 0,
        })
    }

    fn release(&mut self, keys: Vec<FileKey>) {
        for key in keys {
            let Some(table) = self.files.get_mut(&key) else {
                continue;
            };
            table.users = table.users.saturating_sub(1);
            if table.users == 0 {
                if let Some(first) = table.first {
                    self.rows.release(first, table.rows);
                }
                self.files.remove(&key);
            }
        }
    }
}

fn write_entry(ebpf: &mut Ebpf, pid: u32, entry: &ProcessModules) -> Result<()> {
    let map_error = |source: Box<dyn std::error::Error + Send + Sync>| Error::Map {
        map: maps::PROCESS_MODULES,
        source,
    };
    let map = ebpf
        .map_mut(maps::PROCESS_MODULES)
        .ok_or_else(|| map_error("missing from the eBPF object".into()))?;
    let mut list = BpfHashMap::<_, u32, ProcessModules>::try_from(map)
        .map_err(|e| map_error(Box::new(e)))?;
    list.insert(&pid, entry, 0)
        .map_err(|e| map_error(Box::new(e)))
}
