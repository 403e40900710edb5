//! Every outstanding allocation, keyed by (tgid, address), per-site aggregates, the mappings
//! each process made, and bounded time series of all of it.
//!
//! Pure and synchronous: no aya, no I/O, no symbols. It applies decoded events in ring-buffer
//! order and owns the allocator semantics: `realloc(NULL, n)` allocates, `realloc(p, 0)`
//! frees, a moved block frees its old address, a failed call changes nothing, and frees of
//! blocks it never saw allocated (made before tracing began) are counted apart, never
//! subtracted. Mappings are tracked apart from heap blocks (see [`regions`]); only anonymous
//! mappings the program made itself count as its allocations.

pub mod lifetimes;
pub mod process;
pub mod regions;
pub mod series;
pub mod stacks;

use rustc_hash::FxHashMap;

pub use process::{
    AllocatorUse, Block, Children, Counts, Inheritance, Process, ProcessSample, Site, SiteIdx,
    SiteKind, SitePoint, Spread, Weight,
};
pub use regions::{Owner, Regions};
pub use series::Series;
pub use stacks::{StackId, StackTable};

/// Process id as the kernel's thread-group id.
pub type Tgid = u32;

/// A decoded event, as the model needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub tgid: Tgid,
    /// When the allocator returned (allocations) or was entered (frees), `CLOCK_MONOTONIC` ns.
    pub ts_ns: u64,
    /// When the allocator call was entered.
    pub start_ns: u64,
    /// The allocator family that made or freed the block (`tracer_common::allocator`); 0 for
    /// events of no allocator.
    pub allocator: u8,
    pub op: Op,
}

/// How an allocation came to be recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recording {
    /// Every call is recorded (exact tracing): the block stands for itself.
    Every,
    /// As `Every`, the block predicted from glibc's thread cache at the malloc's entry: a
    /// predicted block found on an address still live contradicts its prediction.
    Predicted,
    /// Chosen by byte sampling: it stands for 1/p blocks of its size, and its free will be
    /// reported.
    Sampled,
    /// Chosen by byte sampling, but the kernel could not remember it (its sampled-block map
    /// was full), so its free would never be reported: it counts in the totals, never as live
    /// (a phantom leak otherwise).
    SampledUntracked,
    /// Past `--max-tracked`: the collector keeps no more outstanding blocks, so it counts in
    /// the totals, never as live (live bytes are then lower bounds).
    Capped,
}

impl Recording {
    fn sampled(self) -> bool {
        matches!(self, Recording::Sampled | Recording::SampledUntracked)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// A new block from malloc, calloc or the memalign family.
    Alloc {
        addr: u64,
        size: u64,
        stack: StackId,
        recording: Recording,
    },
    /// `free(addr)`, `addr != 0`.
    Free { addr: u64 },
    /// realloc/reallocarray(old, size) returned `new`. `new == 0` only for `realloc(old, 0)`.
    Realloc {
        old: u64,
        new: u64,
        size: u64,
        stack: StackId,
        recording: Recording,
    },
    /// `mmap` returned `addr`.
    Map {
        addr: u64,
        len: u64,
        prot: u32,
        flags: u32,
        fd: i64,
        inside_allocator: bool,
    },
    /// `munmap(addr, len)`.
    Unmap { addr: u64, len: u64 },
    /// `mremap` moved or resized `[old, old + old_len)` to `[new, new + new_len)`.
    Remap {
        old: u64,
        old_len: u64,
        new: u64,
        new_len: u64,
        inside_allocator: bool,
    },
    /// The program break moved to `addr`.
    Brk { addr: u64 },
    /// libc's `mmap` returned the mapping at `addr` to code at `stack`; `caller_in_allocator`
    /// when that code is the allocator's own (its mapping is then the allocator's).
    MapCaller {
        addr: u64,
        stack: StackId,
        caller_in_allocator: bool,
    },
    /// The process forked `child`; `traced` when the child is traced from its first
    /// instruction (it then starts with this process's outstanding blocks, copy-on-write).
    Fork { child: Tgid, traced: bool },
    /// The process replaced its program: its blocks end with the old image (not leaks), and
    /// the new image starts empty. The layout, where the kernel could tell it, is for
    /// symbolization.
    Exec { layout: Option<ExecLayout> },
    /// The process ended, having taken `traps` probe hits (when they were counted).
    Exit { traps: u64 },
    /// The process mapped `len` bytes of a file executable at `addr`, from file offset
    /// `offset` (for symbolization; the model ignores it).
    MapFile {
        addr: u64,
        len: u64,
        offset: u64,
        /// The file: device (as `stat` reports it) and inode.
        file: (u64, u64),
    },
}

/// Where a new program was loaded: its executable (device as `stat` reports it, inode), the
/// address of its program headers (`AT_PHDR`), and its interpreter's load address
/// (`AT_BASE`, 0 when it has none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecLayout {
    pub exe: (u64, u64),
    pub phdr: u64,
    pub interp_base: u64,
}

/// One mapping of a process as `/proc/PID/smaps` shows it: the facts the footprint is
/// measured from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// Anonymous memory: not file-backed (`[heap]` and private anonymous mappings).
    pub anonymous_mapping: bool,
    /// `[heap]`, `[stack]`, `[vdso]`…, or empty.
    pub special: String,
    /// Resident anonymous bytes (`Anonymous:`).
    pub anon_resident: u64,
}

impl Op {
    /// The same operation attributed to `id`, for those that carry a stack.
    pub fn with_stack(mut self, id: StackId) -> Self {
        if let Op::Alloc { stack, .. } | Op::Realloc { stack, .. } | Op::MapCaller { stack, .. } =
            &mut self
        {
            *stack = id;
        }
        self
    }
}

const MAP_ANONYMOUS: u32 = 0x20;
const MAP_STACK: u32 = 0x20000;

/// The state of every traced process.
#[derive(Debug, Default)]
pub struct Model {
    processes: FxHashMap<Tgid, Process>,
    /// Program images a process replaced with `exec`, and processes whose pid another
    /// process got since, kept for the report.
    retired: Vec<Process>,
    /// The image number the next process under a pid starts at, when the ended one before
    /// it was forgotten before that process began here (its start was already read).
    next_image: FxHashMap<Tgid, u32>,
    /// Mean bytes between samples; 0 when every call is recorded.
    sample_bytes: u64,
    /// Outstanding blocks kept at most (`--max-tracked`), and how many are kept now.
    max_tracked: Option<u64>,
    tracked: u64,
    /// Allocations that took an address still live where a thread-cache prediction made
    /// either block (see [`Recording::Predicted`]).
    predictions_contradicted: u64,
}

impl Model {
    /// A model for events recorded with Poisson byte sampling of mean `sample_bytes` (0:
    /// every call recorded).
    pub fn with_sampling(sample_bytes: u64) -> Self {
        Self {
            sample_bytes,
            ..Self::default()
        }
    }

    /// Allocations that took a live address where a thread-cache prediction made either
    /// block: each one either a lost free or a wrong prediction, so prediction is stopped.
    pub fn predictions_contradicted(&self) -> u64 {
        self.predictions_contradicted
    }

    /// Keeps at most `max` outstanding blocks (all processes together): past it, new ones
    /// count in the totals but not as live (the report then says live bytes are lower
    /// bounds).
    pub fn cap(&mut self, max: u64) {
        self.max_tracked = Some(max);
    }

    /// Starts following a traced process at `now_ns`, before any event of its: a process
    /// that allocates nothing while traced is still reported, with its footprint.
    pub fn track(&mut self, tgid: Tgid, now_ns: u64) {
        let sample_bytes = self.sample_bytes;
        self.processes
            .entry(tgid)
            .or_insert_with(|| Process::new(tgid, now_ns, sample_bytes));
    }

    pub fn apply(&mut self, ev: &Event) {
        let sample_bytes = self.sample_bytes;
        let now = ev.ts_ns;
        match ev.op {
            Op::Fork { child, traced } => return self.fork(ev.tgid, child, traced, now),
            Op::Exec { .. } => return self.exec(ev.tgid, now),
            Op::MapFile { .. } => return,
            Op::Free { addr } if self.inherited_free(ev.tgid, addr, now) => return,
            // A process already forgotten (its end was seen another way) stays forgotten.
            Op::Exit { .. } if !self.processes.contains_key(&ev.tgid) => return,
            _ => {}
        }
        let full = self.max_tracked.is_some_and(|max| self.tracked >= max);
        let proc = self
            .processes
            .entry(ev.tgid)
            .or_insert_with(|| Process::new(ev.tgid, ev.ts_ns, sample_bytes));
        proc.last_ns = proc.last_ns.max(ev.ts_ns);
        let before = proc.outstanding() as u64;
        let recording_of = |recording: Recording| match recording {
            Recording::Every | Recording::Predicted if full => Recording::Capped,
            Recording::Sampled if full => Recording::SampledUntracked,
            r => r,
        };
        match ev.op {
            Op::Alloc {
                addr,
                size,
                stack,
                recording,
            } => {
                let recording = (recording_of(recording), ev.allocator);
                if proc.allocate(addr, size, stack, recording, (now, now)) {
                    self.predictions_contradicted += 1;
                }
            }
            Op::Free { addr } => proc.free(addr, ev.allocator, now),
            Op::Realloc {
                old,
                new,
                size,
                stack,
                recording,
            } => proc.realloc(
                (old, new, size),
                stack,
                (recording, ev.allocator),
                (ev.start_ns, now),
            ),
            Op::Map {
                addr,
                len,
                prot: _,
                flags,
                fd,
                inside_allocator,
            } => {
                let owner = if flags & MAP_ANONYMOUS == 0 && fd >= 0 {
                    Owner::File
                } else if flags & MAP_STACK != 0 {
                    Owner::Stack
                } else if inside_allocator {
                    Owner::Allocator
                } else {
                    Owner::Other
                };
                let replaced = proc.regions.insert(addr, len, owner, now);
                proc.release_pieces(&replaced, now);
            }
            Op::MapCaller {
                addr,
                stack,
                caller_in_allocator,
            } => map_caller(proc, addr, stack, caller_in_allocator, now),
            Op::Unmap { addr, len } => {
                let removed = proc.regions.remove(addr, len);
                proc.release_pieces(&removed, now);
            }
            Op::Remap {
                old,
                old_len,
                new,
                new_len,
                inside_allocator,
            } => remap(proc, (old, old_len), (new, new_len), inside_allocator, now),
            Op::Brk { addr } => proc.brk = Some(addr),
            Op::Exit { .. } => proc.ended_ns = Some(now),
            Op::Fork { .. } | Op::Exec { .. } | Op::MapFile { .. } => {}
        }
        let after = proc.outstanding() as u64;
        self.tracked = (self.tracked + after).saturating_sub(before);
    }

    /// `parent` forked `child`: a traced child starts with its parent's outstanding blocks
    /// (copy-on-write), which stay in the parent's table: the child looks them up there when
    /// it frees one, so nothing is copied per fork.
    fn fork(&mut self, parent: Tgid, child: Tgid, traced: bool, now: u64) {
        let sample_bytes = self.sample_bytes;
        let p = self
            .processes
            .entry(parent)
            .or_insert_with(|| Process::new(parent, now, sample_bytes));
        p.children.forked += 1;
        if !traced {
            return;
        }
        p.children.traced += 1;
        let inherited = Inheritance::new(p, now);
        let image = self
            .retire_ended(child)
            .or_else(|| self.next_image.remove(&child));
        let child = self
            .processes
            .entry(child)
            .or_insert_with(|| Process::new(child, now, sample_bytes));
        child.image = image.unwrap_or(child.image);
        child.inherited = Some(inherited);
    }

    /// A new process begins under `tgid` (a fork, or an `exec` admitted by `system`): if the
    /// process that had this pid before has ended, it is kept as it ended, for the report,
    /// and the new one, another process, starts empty as the next image number (so the two
    /// never share a row). Returns that number then.
    fn retire_ended(&mut self, tgid: Tgid) -> Option<u32> {
        self.processes.get(&tgid)?.ended_ns?;
        let old = self.processes.remove(&tgid)?;
        let next = old.image + 1;
        self.retired.push(old);
        Some(next)
    }

    /// `tgid` replaced its program: the old image is kept for the report, ended, and a new,
    /// empty one starts.
    fn exec(&mut self, tgid: Tgid, now: u64) {
        let sample_bytes = self.sample_bytes;
        let mut new = Process::new(tgid, now, sample_bytes);
        let reused = self
            .retire_ended(tgid)
            .or_else(|| self.next_image.remove(&tgid));
        if let Some(image) = reused {
            // Its pid was an ended process's: this is another process, admitted at its exec.
            new.image = image;
        } else if let Some(mut old) = self.processes.remove(&tgid) {
            new.image = old.image + 1;
            new.children = old.children;
            // An image that did nothing (a fork that went straight to `exec`) is not kept.
            if old.active() {
                old.ended_ns = Some(now);
                old.replaced_by_exec = true;
                self.retired.push(old);
            }
        } else {
            new.image = 1;
        }
        self.processes.insert(tgid, new);
    }

    /// A free in a forked child of a block it inherited: counted as the child's, while the
    /// parent's block stays (the parent's copy is its own). False if `addr` is no inherited
    /// block of `tgid`'s.
    fn inherited_free(&mut self, tgid: Tgid, addr: u64, now: u64) -> bool {
        let Some(Inheritance { parent, at_ns, .. }) = self
            .processes
            .get(&tgid)
            .and_then(|p| p.inherited.as_ref())
            .filter(|i| !i.freed_addrs.contains(&addr))
            .cloned()
        else {
            return false;
        };
        if self.processes.get(&tgid).is_some_and(|p| p.has_block(addr)) {
            return false;
        }
        let Some(block) = self
            .processes
            .get(&parent)
            .and_then(|p| p.block(addr))
            .filter(|b| b.born_ns < at_ns)
        else {
            return false;
        };
        let weight = self.processes.get(&parent).map(|p| p.weight_of(&block));
        if let Some(child) = self.processes.get_mut(&tgid)
            && let Some(inherited) = child.inherited.as_mut()
        {
            inherited.freed(addr, weight.map_or(block.size(), |w| w.bytes));
            child.last_ns = child.last_ns.max(now);
        }
        true
    }

    /// Records a sample of the listed processes' live bytes and their sites' live bytes at
    /// `now_ns`, with each one's footprint when it could be measured. Processes not listed
    /// (gone) get no more points: a flat tail after an exit would hide a leak's growth.
    pub fn sample(&mut self, now_ns: u64, processes: &[(Tgid, Option<u64>)]) {
        for &(tgid, footprint_bytes) in processes {
            if let Some(proc) = self.processes.get_mut(&tgid) {
                proc.sample(now_ns, footprint_bytes);
            }
        }
    }

    /// The heap's cost to the machine: resident anonymous memory of the `[heap]`, of mappings
    /// the allocator or the program made, and of anonymous mappings that predate the trace
    /// (their owner cannot be known). Stacks, file mappings and the loader's own anonymous
    /// mappings are not counted. When a VMA mixes owners (the kernel merges adjacent
    /// anonymous mappings), `resident(start, end)` measures the counted ranges page by page;
    /// without it they are attributed in proportion to their size.
    pub fn footprint(
        &self,
        tgid: Tgid,
        vmas: &[Vma],
        resident: impl Fn(u64, u64) -> Option<u64>,
    ) -> u64 {
        let regions = self.processes.get(&tgid).map(|p| &p.regions);
        let mut total = 0u64;
        for vma in vmas {
            if vma.anon_resident == 0 {
                continue;
            }
            if vma.special == "[heap]" {
                total += vma.anon_resident;
                continue;
            }
            if !vma.anonymous_mapping || !vma.special.is_empty() {
                continue; // file-backed, [stack], [vdso]…
            }
            let size = vma.end - vma.start;
            let mut counted: Vec<(u64, u64)> = Vec::new();
            let mut cursor = vma.start;
            if let Some(regions) = regions {
                for (start, region) in regions.iter_overlapping(vma.start, vma.end) {
                    let (s, e) = (start.max(vma.start), region.end.min(vma.end));
                    if cursor < s {
                        counted.push((cursor, s)); // not known to us: predates the trace
                    }
                    if region.owner.in_footprint() {
                        counted.push((s, e));
                    }
                    cursor = cursor.max(e);
                }
            }
            if cursor < vma.end {
                counted.push((cursor, vma.end));
            }
            let counted_len: u64 = counted.iter().map(|(s, e)| e - s).sum();
            if counted_len == size {
                total += vma.anon_resident;
            } else if counted_len > 0 {
                let measured: Option<u64> = counted.iter().map(|&(s, e)| resident(s, e)).sum();
                total += measured.unwrap_or(
                    (vma.anon_resident as u128 * counted_len as u128 / size as u128) as u64,
                );
            }
        }
        total
    }

    /// The current image of process `tgid`.
    pub fn process(&self, tgid: Tgid) -> Option<&Process> {
        self.processes.get(&tgid)
    }

    /// Every process image: current ones and those replaced by `exec`.
    pub fn processes(&self) -> impl Iterator<Item = &Process> {
        self.processes.values().chain(&self.retired)
    }

    /// Forgets process `tgid`'s images up to `image`: their state is released, for a
    /// host-wide trace that keeps only a summary of processes that ended. A later image is
    /// another process given the same pid and stays (`later`: its start was read already,
    /// and it will be numbered after them).
    pub fn forget(&mut self, tgid: Tgid, image: u32, later: bool) -> Option<Process> {
        self.retired.retain(|p| p.tgid != tgid || p.image > image);
        if self.processes.get(&tgid)?.image > image {
            return None;
        }
        let gone = self.processes.remove(&tgid)?;
        if later {
            self.next_image.insert(tgid, gone.image + 1);
        }
        Some(gone)
    }

    /// Outstanding heap blocks of one process's current image; order unspecified.
    pub fn live_blocks(&self, tgid: Tgid) -> impl Iterator<Item = (u64, &Block)> {
        self.processes
            .get(&tgid)
            .into_iter()
            .flat_map(|p| p.blocks())
    }

    /// Allocations counted but not kept past `--max-tracked`, in all processes.
    pub fn capped(&self) -> u64 {
        self.processes().map(|p| p.capped_allocations).sum()
    }

    /// Number of outstanding heap blocks across all processes.
    pub fn outstanding(&self) -> usize {
        self.processes.values().map(Process::outstanding).sum()
    }
}

/// libc's `mmap` returned the anonymous mapping at `addr` to code at `stack`: the program's
/// own allocation, unless that code is the allocator's (a thread's first `free` can make
/// glibc map its arena) or the mapping is not one the program owns (stack, file).
fn map_caller(proc: &mut Process, addr: u64, stack: StackId, in_allocator: bool, now: u64) {
    let Some(region) = proc
        .regions
        .starting_at(addr)
        .filter(|r| r.owner == Owner::Other)
    else {
        return;
    };
    if in_allocator {
        region.owner = Owner::Allocator;
        return;
    }
    let len = region.end - addr;
    let site = proc.site(stack, SiteKind::Mmap, now);
    if let Some(region) = proc.regions.starting_at(addr) {
        region.owner = Owner::Program(site);
        region.born_ns = now;
    }
    proc.allocated(site, Weight::exact(len), true, now);
}

/// `mremap` moved or resized `old` to `new` (start, length): the same mapping, with the same
/// owner and age. A program mapping's remap counts like a realloc: one free and one
/// allocation at the same site.
fn remap(
    proc: &mut Process,
    (old, old_len): (u64, u64),
    (new, new_len): (u64, u64),
    inside_allocator: bool,
    now: u64,
) {
    let removed = proc.regions.remove(old, old_len);
    let default_owner = if inside_allocator {
        Owner::Allocator
    } else {
        Owner::Other
    };
    let owner = removed.first().map_or(default_owner, |p| p.owner);
    let born_ns = removed.first().map_or(now, |p| p.born_ns);
    for piece in &removed {
        if let Owner::Program(site) = piece.owner {
            proc.released(site, Weight::exact(piece.len()), true, piece.born_ns, now);
        }
    }
    let replaced = proc.regions.insert(new, new_len, owner, born_ns);
    proc.release_pieces(&replaced, now);
    if let Owner::Program(site) = owner {
        proc.allocated(site, Weight::exact(new_len), true, now);
    }
}

#[cfg(test)]
mod tests;
