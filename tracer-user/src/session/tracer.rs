//! What is probed, for whom: the loaded eBPF object, the discovery stage, and every traced
//! process's links — so a fork is traced like its parent, an `exec` gets the probes (and the
//! stack mode) of its new program, and an exit closes what was opened for it.

use std::os::fd::OwnedFd;

use aya::maps::HashMap as BpfHashMap;
use rustc_hash::{FxHashMap, FxHashSet};
use tracer_common::maps;

use crate::{
    error::{Error, Result},
    model::Tgid,
    probe::{self, Programs, Scope, StackMode, tables::Family},
    targets::{Discovery, FileId, Placed, ProcessPlan},
    unwind_tables::StackWalks,
};

/// An allocator in a file: probed once per scope.
type Key = (FileId, Family, String);

fn key(p: &Placed) -> Key {
    (p.file, p.found.family, p.found.prefix.clone())
}

/// Closes `links` and returns once all are closed. Each close waits for the kernel's RCU
/// grace periods (≈ 15 ms here), so one after another a process's links took ≈ 230 ms, while
/// its new program ran without probes in its stack mode; closed side by side they take about
/// one grace period.
fn close(links: Vec<OwnedFd>) {
    std::thread::scope(|scope| {
        for link in links {
            scope.spawn(move || drop(link));
        }
    });
}

/// The probes of one traced process.
struct Linked {
    mode: StackMode,
    placed: Vec<Placed>,
    /// Closing them detaches the probes (perf-event probes live in the object instead).
    links: Vec<OwnedFd>,
}

pub struct Tracer {
    pub loaded: probe::Loaded,
    pub discovery: Discovery,
    /// How each process's stacks are captured, with the unwind tables of `dwarf` ones.
    pub walks: StackWalks,
    programs: Programs,
    verbose: bool,
    procs: FxHashMap<Tgid, Linked>,
    /// When each followed child was forked (ns): an exit read after the fork of a later
    /// process given the same pid is not that process's end.
    forked: FxHashMap<Tgid, u64>,
    /// Host-wide: every allocator file probed for every process.
    everyone: Option<FxHashSet<Key>>,
}

impl Tracer {
    pub fn new(
        loaded: probe::Loaded,
        discovery: Discovery,
        programs: Programs,
        verbose: bool,
    ) -> Result<Self> {
        let walks = StackWalks::new(&loaded.ebpf, loaded.unwind_rows, verbose)?;
        Ok(Self {
            walks,
            loaded,
            discovery,
            programs,
            verbose,
            procs: FxHashMap::default(),
            forked: FxHashMap::default(),
            everyone: None,
        })
    }

    /// Probes every process mapping an allocator file from now on (`system`).
    pub fn probe_everyone(&mut self) {
        self.everyone = Some(FxHashSet::default());
    }

    /// Starts tracing the process `plan` describes: into the kernel's filter, and its
    /// allocators probed (for it alone, or for everyone mapping them host-wide).
    pub fn start(&mut self, plan: &ProcessPlan) -> Result<()> {
        self.target(plan.pid)?;
        let mode = plan.stack_mode.mode;
        // Listed before any probe goes on: its first event is captured the right way. A
        // command held before its `exec` still maps this collector's code: it is listed in
        // its mode with no code (its `exec` empties the list anyway), and the tables of the
        // files it will map are built, so the kernel walks them from its first instruction.
        if plan.before_exec {
            self.walks.prepare(&mut self.loaded.ebpf, &plan.modules);
        }
        self.walks
            .list(&mut self.loaded.ebpf, plan.pid, mode, !plan.before_exec)?;
        if self.everyone.is_some() {
            return self.probe_for_everyone(&plan.allocators);
        }
        let links = self.probe(&plan.allocators, Scope::Process(plan.pid))?;
        self.procs.insert(
            plan.pid,
            Linked {
                mode,
                placed: plan.allocators.clone(),
                links,
            },
        );
        if self.verbose {
            eprintln!(
                "alloctrace: pid {}: {} stacks ({})",
                plan.pid,
                mode.name(),
                plan.stack_mode.reason
            );
        }
        Ok(())
    }

    /// A traced process forked `child` at `forked_ns`, which the kernel already traces: its
    /// probes are the parent's, in the parent's stack mode (same program, same mappings).
    /// Returns when its own probes were in place (`CLOCK_MONOTONIC` ns), or None when it
    /// needed none (`system`'s probes are everyone's: it was seen from its first
    /// instruction).
    pub fn follow(&mut self, parent: Tgid, child: Tgid, forked_ns: u64) -> Result<Option<u64>> {
        self.walks.inherit(parent, child);
        if self.everyone.is_some() {
            return Ok(None);
        }
        self.forked.insert(child, forked_ns);
        let (mode, placed) = match self.procs.get(&parent) {
            Some(p) => (p.mode, p.placed.clone()),
            // The parent's exit was read first (its ring was emptied before the child's
            // fork was read): the child's probes come from its own mappings.
            None => {
                let plan = self
                    .discovery
                    .process(child)
                    .map_err(|e| Error::NotTraceable {
                        pid: child,
                        reason: format!("its mappings could not be read: {e}"),
                    })?;
                (plan.stack_mode.mode, plan.allocators)
            }
        };
        // Probes first: until they are on, nothing the child allocates is seen, while until
        // it is listed its stacks are walked with its parent's list (or through its
        // mappings, after an `exec`), and listing a new program can mean building tables.
        let links = self.probe(&placed, Scope::Process(child))?;
        let placed_ns = crate::procfs::monotonic_ns();
        self.procs.insert(
            child,
            Linked {
                mode,
                placed,
                links,
            },
        );
        self.walks.list(&mut self.loaded.ebpf, child, mode, true)?;
        Ok(Some(placed_ns))
    }

    /// Tables built off the event path are in: the processes that waited for them are
    /// listed again (a process gone meanwhile is left alone: its entry went with its exit).
    /// Tables no list has used for a while are let go.
    pub fn tables_ready(&mut self) {
        self.walks.retire(&mut self.loaded.ebpf);
        for (pid, mode) in self.walks.finish_builds(&mut self.loaded.ebpf) {
            if !crate::procfs::is_gone(pid) {
                let _ = self.walks.list(&mut self.loaded.ebpf, pid, mode, true);
            }
        }
    }

    /// A traced process changed: it replaced its program (`exec`), or mapped new code. Its
    /// stacks are captured as its plan says from now on, with tables for the code it maps
    /// now, and what its plan adds is probed (the probes it had stay: every stack mode uses
    /// the same programs). If attaching fails, the probes it had stay.
    pub fn refresh(&mut self, plan: &ProcessPlan) -> Result<()> {
        let pid = plan.pid;
        let mode = plan.stack_mode.mode;
        let listed = self.walks.list(&mut self.loaded.ebpf, pid, mode, true);
        if self.everyone.is_some() {
            return listed.and(self.probe_for_everyone(&plan.allocators));
        }
        let mut linked = self.procs.remove(&pid).unwrap_or(Linked {
            mode,
            placed: Vec::new(),
            links: Vec::new(),
        });
        linked.mode = mode;
        let new: Vec<Placed> = plan
            .allocators
            .iter()
            .filter(|p| !linked.placed.iter().any(|q| key(q) == key(p)))
            .cloned()
            .collect();
        if self.verbose && !new.is_empty() {
            eprintln!(
                "alloctrace: pid {pid}: {} probed ({} stacks)",
                new.iter()
                    .map(|p| format!("{} in {}", p.found.label(), p.path.display()))
                    .collect::<Vec<_>>()
                    .join(", "),
                mode.name()
            );
        }
        let added = self.probe(&new, Scope::Process(pid));
        let result = added.map(|links| {
            linked.links.extend(links);
            linked.placed.extend(new);
        });
        self.procs.insert(pid, linked);
        result.and(listed)
    }

    /// A traced process ended at `exit_ns`: its links are closed, off the event loop (nothing
    /// of the process is left for them to see). Those of a process forked later under the
    /// same pid (its exit was read after that fork) stay.
    pub fn end(&mut self, pid: Tgid, exit_ns: u64) {
        if self.forked.get(&pid).is_some_and(|&f| f > exit_ns) {
            return;
        }
        self.forked.remove(&pid);
        self.walks.forget(&mut self.loaded.ebpf, pid);
        if let Some(l) = self.procs.remove(&pid) {
            std::thread::spawn(move || close(l.links));
        }
    }

    /// Adds `pid` to the kernel's filter of traced processes.
    fn target(&mut self, pid: Tgid) -> Result<()> {
        let map = self
            .loaded
            .ebpf
            .map_mut(maps::TARGETS)
            .ok_or_else(|| Error::Map {
                map: maps::TARGETS,
                source: "missing from the eBPF object".into(),
            })?;
        let mut targets: BpfHashMap<_, u32, u64> =
            BpfHashMap::try_from(map).map_err(|e| Error::Map {
                map: maps::TARGETS,
                source: Box::new(e),
            })?;
        targets.insert(&pid, &0u64, 0).map_err(|e| Error::Map {
            map: maps::TARGETS,
            source: Box::new(e),
        })
    }

    fn probe_for_everyone(&mut self, placed: &[Placed]) -> Result<()> {
        let Some(done) = self.everyone.as_mut() else {
            return Ok(());
        };
        let new: Vec<Placed> = placed
            .iter()
            .filter(|p| done.insert(key(p)))
            .cloned()
            .collect();
        let links = self.probe(&new, Scope::Everyone)?;
        self.loaded.keep(links);
        Ok(())
    }

    /// Attaches `placed` for `scope`; returns the links.
    fn probe(&mut self, placed: &[Placed], scope: Scope) -> Result<Vec<OwnedFd>> {
        let mut links = Vec::new();
        for p in placed {
            let (attached, new) =
                probe::attach(&mut self.loaded, &p.open, &p.found, &[scope], self.programs)?;
            links.extend(new);
            if self.verbose {
                for a in attached {
                    eprintln!(
                        "alloctrace: probed {} ({}) at {:#x}+{} in {}{}",
                        a.symbol,
                        p.found.label(),
                        a.offset,
                        a.entry_offset,
                        p.path.display(),
                        match (a.session, a.predicted) {
                            (true, true) => {
                                " (uprobe session; thread-cache hits predicted at entry)"
                            }
                            (true, false) => " (uprobe session)",
                            _ => "",
                        }
                    );
                }
            }
        }
        Ok(links)
    }
}
