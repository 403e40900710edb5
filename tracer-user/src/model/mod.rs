//! Every outstanding allocation, keyed by (tgid, address), per-site aggregates, the mappings
//! each process made, and bounded time series of all of it.
//!
//! Pure and synchronous: no aya, no I/O, no symbols. It applies decoded events in ring-buffer
//! order and owns the allocator semantics: `realloc(NULL, n)` allocates, `realloc(p, 0)`
//! frees, a moved block frees its old address, a failed call changes nothing, and frees of
//! blocks it never saw allocated (made before tracing began) are counted apart, never
//! subtracted. Mappings are tracked apart from heap blocks (see [`regions`]); only anonymous
//! mappings the program made itself count as its allocations.

pub mod regions;
pub mod series;
pub mod stacks;

use hdrhistogram::Histogram;
use rustc_hash::FxHashMap;

pub use regions::{Owner, Regions};
pub use series::Series;
pub use stacks::{StackId, StackTable};

use crate::procfs::Vma;

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
    pub op: Op,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// A new block from malloc, calloc or the memalign family; `sampled` when byte sampling
    /// chose it (it then stands for 1/p blocks).
    Alloc {
        addr: u64,
        size: u64,
        stack: StackId,
        sampled: bool,
    },
    /// `free(addr)`, `addr != 0`.
    Free { addr: u64 },
    /// realloc/reallocarray(old, size) returned `new`. `new == 0` only for `realloc(old, 0)`.
    Realloc {
        old: u64,
        new: u64,
        size: u64,
        stack: StackId,
        sampled: bool,
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
    /// libc's `mmap` returned the mapping at `addr` to the program, from this stack.
    MapCaller { addr: u64, stack: StackId },
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

/// Index of a site in its process's site table.
pub type SiteIdx = u32;

/// One outstanding heap block, packed into 16 bytes: with its 8-byte address key, the model
/// holds an outstanding allocation in 24 bytes plus the hash table's slack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub born_ns: u64,
    /// Size (low 40 bits, saturating at 1 TiB), sampled flag (bit 40), site index (high 23).
    packed: u64,
}

const SIZE_BITS: u32 = 40;
const SIZE_MASK: u64 = (1 << SIZE_BITS) - 1;
const SAMPLED_BIT: u64 = 1 << SIZE_BITS;
const SITE_SHIFT: u32 = SIZE_BITS + 1;
/// Sites beyond this index (never reached: the kernel's stack map is far smaller) share it.
const MAX_SITE: SiteIdx = (1 << (64 - SITE_SHIFT)) - 1;

impl Block {
    pub fn new(size: u64, born_ns: u64, site: SiteIdx, sampled: bool) -> Self {
        let sampled = if sampled { SAMPLED_BIT } else { 0 };
        Self {
            born_ns,
            packed: size.min(SIZE_MASK) | sampled | (u64::from(site.min(MAX_SITE)) << SITE_SHIFT),
        }
    }

    pub fn size(&self) -> u64 {
        self.packed & SIZE_MASK
    }

    pub fn sampled(&self) -> bool {
        self.packed & SAMPLED_BIT != 0
    }

    pub fn site(&self) -> SiteIdx {
        (self.packed >> SITE_SHIFT) as SiteIdx
    }
}

/// What one recorded allocation stands for: its bytes and its count, both 1:1 when exact.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Weight {
    pub bytes: u64,
    pub count: f64,
}

impl Weight {
    pub const fn exact(size: u64) -> Self {
        Self {
            bytes: size,
            count: 1.0,
        }
    }

    /// The unbiased weight of a block of `size` bytes chosen by Poisson byte sampling with
    /// mean `sample_bytes`: it was recorded with probability p = 1 - exp(-size / mean), so
    /// it stands for 1/p blocks.
    pub fn sampled(size: u64, sample_bytes: u64) -> Self {
        if sample_bytes == 0 {
            return Self::exact(size);
        }
        let p = -(-(size.max(1) as f64) / sample_bytes as f64).exp_m1();
        let count = 1.0 / p;
        Self {
            bytes: (size as f64 * count).round() as u64,
            count,
        }
    }
}

const _: () = assert!(size_of::<Block>() == 16);

/// What a site allocates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SiteKind {
    /// Heap blocks from the malloc family.
    Heap,
    /// Anonymous mappings the program made itself.
    Mmap,
}

/// Points kept per site series, and per process series.
const SITE_POINTS: usize = 128;
const PROCESS_POINTS: usize = 1024;
/// Sites remembered at the sample of highest live bytes.
const PEAK_SITES: usize = 5;

/// Aggregates of one call site (one distinct stack and kind) in one process.
#[derive(Clone, Debug)]
pub struct Site {
    pub stack: StackId,
    pub kind: SiteKind,
    /// Bytes are estimates under sampling (exact otherwise).
    pub live_bytes: u64,
    /// Counts of recorded allocations (all of them when exact, the samples otherwise).
    pub live_allocations: u64,
    pub total_allocations: u64,
    pub total_bytes: u64,
    pub frees: u64,
    /// Estimated counts: equal to the recorded ones when exact.
    pub est: Counts,
    pub first_ns: u64,
    pub last_alloc_ns: u64,
    /// Lifetimes of freed allocations, µs; created at the first free.
    pub lifetimes: Option<Box<Histogram<u32>>>,
    /// Live bytes at each sample since the site first held memory.
    pub series: Series<u64>,
}

impl Site {
    /// One site made of several (stacks that symbolize the same): counts and bytes summed,
    /// first and last allocation the earliest and latest, lifetimes and series merged. Its
    /// stack is the first member's. `None` for no members.
    pub fn merged<'a>(members: impl IntoIterator<Item = &'a Site>) -> Option<Site> {
        let members: Vec<&Site> = members.into_iter().collect();
        let mut site = (*members.first()?).clone();
        for m in &members[1..] {
            site.live_bytes += m.live_bytes;
            site.live_allocations += m.live_allocations;
            site.total_allocations += m.total_allocations;
            site.total_bytes += m.total_bytes;
            site.frees += m.frees;
            site.est.live += m.est.live;
            site.est.total += m.est.total;
            site.est.frees += m.est.frees;
            site.first_ns = site.first_ns.min(m.first_ns);
            site.last_alloc_ns = site.last_alloc_ns.max(m.last_alloc_ns);
            match (&mut site.lifetimes, &m.lifetimes) {
                (Some(mine), Some(theirs)) => {
                    // Same bounds on both sides: adding cannot fail.
                    let _ = mine.add(theirs.as_ref());
                }
                (mine @ None, Some(theirs)) => *mine = Some(theirs.clone()),
                _ => {}
            }
        }
        if members.len() > 1 {
            site.series = Series::sum(members.iter().map(|m| &m.series), SITE_POINTS);
        }
        Some(site)
    }
}

/// Estimated allocation counts (sums of weights).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counts {
    pub live: f64,
    pub total: f64,
    pub frees: f64,
}

/// One sample of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessSample {
    pub live_bytes: u64,
    pub footprint_bytes: Option<u64>,
}

/// Aggregates of one process.
#[derive(Clone, Debug)]
pub struct Process {
    pub tgid: Tgid,
    pub sites: Vec<Site>,
    site_of: FxHashMap<(StackId, SiteKind), SiteIdx>,
    pub live_bytes: u64,
    pub live_allocations: u64,
    /// Estimated counts: equal to the recorded ones when exact.
    pub est: Counts,
    /// Part of `live_bytes` in the program's own mappings.
    pub mmap_live_bytes: u64,
    pub peak_live_bytes: u64,
    pub peak_ns: u64,
    /// The biggest sites at the sample with the most live bytes.
    pub peak_sites: Vec<(SiteIdx, u64)>,
    peak_sampled: u64,
    pub total_allocations: u64,
    pub total_bytes: u64,
    pub frees: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    /// Frees of blocks never seen allocated (made before tracing began): ignored.
    pub unknown_frees: u64,
    /// realloc of a block never seen allocated: the new block is counted, nothing freed.
    pub unknown_reallocs: u64,
    /// Allocations returned at an address the model still held live: the earlier block's free
    /// was never seen (a lost event), so it is retired as freed.
    pub replaced_live: u64,
    pub regions: Regions,
    pub brk: Option<u64>,
    pub series: Series<ProcessSample>,
    /// Outstanding heap blocks by address.
    blocks: FxHashMap<u64, Block>,
    /// Mean bytes between samples (0: exact), to weigh sampled blocks.
    sample_bytes: u64,
}

impl Process {
    fn new(tgid: Tgid, now: u64) -> Self {
        Self {
            tgid,
            sites: Vec::new(),
            site_of: FxHashMap::default(),
            live_bytes: 0,
            live_allocations: 0,
            est: Counts::default(),
            mmap_live_bytes: 0,
            peak_live_bytes: 0,
            peak_ns: now,
            peak_sites: Vec::new(),
            peak_sampled: 0,
            total_allocations: 0,
            total_bytes: 0,
            frees: 0,
            first_ns: now,
            last_ns: now,
            unknown_frees: 0,
            unknown_reallocs: 0,
            replaced_live: 0,
            regions: Regions::default(),
            brk: None,
            series: Series::new(PROCESS_POINTS),
            blocks: FxHashMap::default(),
            sample_bytes: 0,
        }
    }

    fn site(&mut self, stack: StackId, kind: SiteKind, now: u64) -> SiteIdx {
        if let Some(&idx) = self.site_of.get(&(stack, kind)) {
            return idx;
        }
        if self.sites.len() as SiteIdx >= MAX_SITE {
            return MAX_SITE - 1;
        }
        let idx = self.sites.len() as SiteIdx;
        self.sites.push(Site {
            stack,
            kind,
            live_bytes: 0,
            live_allocations: 0,
            total_allocations: 0,
            total_bytes: 0,
            frees: 0,
            est: Counts::default(),
            first_ns: now,
            last_alloc_ns: now,
            lifetimes: None,
            series: Series::new(SITE_POINTS),
        });
        self.site_of.insert((stack, kind), idx);
        idx
    }

    fn allocated(&mut self, site: SiteIdx, w: Weight, now: u64) {
        let size = w.bytes;
        let s = &mut self.sites[site as usize];
        s.live_bytes += size;
        s.live_allocations += 1;
        s.total_allocations += 1;
        s.total_bytes += size;
        s.est.live += w.count;
        s.est.total += w.count;
        s.last_alloc_ns = now;
        if s.kind == SiteKind::Mmap {
            self.mmap_live_bytes += size;
        }
        self.live_bytes += size;
        self.live_allocations += 1;
        self.total_allocations += 1;
        self.total_bytes += size;
        self.est.live += w.count;
        self.est.total += w.count;
        if self.live_bytes > self.peak_live_bytes {
            self.peak_live_bytes = self.live_bytes;
            self.peak_ns = now;
        }
    }

    /// Releases a site's memory (`w` as it was allocated); `whole` when an allocation ended
    /// (not just a part of a mapping), `born_ns` to record its lifetime.
    fn released(&mut self, site: SiteIdx, w: Weight, whole: bool, born_ns: u64, now: u64) {
        let size = w.bytes;
        let s = &mut self.sites[site as usize];
        s.live_bytes -= size;
        if s.kind == SiteKind::Mmap {
            self.mmap_live_bytes -= size;
        }
        self.live_bytes -= size;
        if whole {
            s.live_allocations -= 1;
            s.frees += 1;
            s.est.live -= w.count;
            s.est.frees += w.count;
            self.live_allocations -= 1;
            self.frees += 1;
            self.est.live -= w.count;
            self.est.frees += w.count;
            let lifetime_us = now.saturating_sub(born_ns) / 1000;
            s.lifetimes
                .get_or_insert_with(|| {
                    Box::new(
                        Histogram::new_with_bounds(1, 3_600_000_000, 1)
                            .expect("valid histogram bounds"),
                    )
                })
                .saturating_record(lifetime_us.max(1));
        }
    }

    fn allocate(&mut self, addr: u64, size: u64, stack: StackId, sampled: bool, now: u64) {
        let site = self.site(stack, SiteKind::Heap, now);
        let block = Block::new(size, now, site, sampled);
        if let Some(stale) = self.blocks.insert(addr, block) {
            self.replaced_live += 1;
            self.release_block(&stale, now);
        }
        self.allocated(site, self.weight(&block), now);
    }

    fn weight(&self, block: &Block) -> Weight {
        if block.sampled() {
            Weight::sampled(block.size(), self.sample_bytes)
        } else {
            Weight::exact(block.size())
        }
    }

    fn release_block(&mut self, block: &Block, now: u64) {
        let w = self.weight(block);
        self.released(block.site(), w, true, block.born_ns, now);
    }

    /// Accounts for mapping pieces taken away (unmap, remap, `MAP_FIXED`).
    fn release_pieces(&mut self, pieces: &[regions::Piece], now: u64) {
        for piece in pieces {
            if let Owner::Program(site) = piece.owner {
                let whole = piece.remaining == 0;
                self.released(site, Weight::exact(piece.len()), whole, piece.born_ns, now);
                if piece.remaining == 2 {
                    // A hole in the middle: one mapping became two.
                    self.sites[site as usize].live_allocations += 1;
                    self.live_allocations += 1;
                }
            }
        }
    }
}

/// The state of every traced process.
#[derive(Debug, Default)]
pub struct Model {
    processes: FxHashMap<Tgid, Process>,
    /// Mean bytes between samples; 0 when every call is recorded.
    sample_bytes: u64,
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

    pub fn apply(&mut self, ev: &Event) {
        let sample_bytes = self.sample_bytes;
        let proc = self.processes.entry(ev.tgid).or_insert_with(|| Process {
            sample_bytes,
            ..Process::new(ev.tgid, ev.ts_ns)
        });
        proc.last_ns = proc.last_ns.max(ev.ts_ns);
        let now = ev.ts_ns;
        match ev.op {
            Op::Alloc {
                addr,
                size,
                stack,
                sampled,
            } => proc.allocate(addr, size, stack, sampled, now),
            Op::Free { addr } => match proc.blocks.remove(&addr) {
                Some(block) => proc.release_block(&block, now),
                None => proc.unknown_frees += 1,
            },
            Op::Realloc {
                old,
                new,
                size,
                stack,
                sampled,
            } => {
                if old != 0 {
                    match proc.blocks.get(&old) {
                        // Born after this realloc began: realloc had already released `old`
                        // and another thread got the address back before this event was
                        // written; that newer block stays.
                        Some(block) if block.born_ns > ev.start_ns => {}
                        Some(_) => {
                            let block = proc.blocks.remove(&old).expect("present");
                            proc.release_block(&block, now);
                        }
                        None => proc.unknown_reallocs += 1,
                    }
                }
                if new != 0 {
                    proc.allocate(new, size, stack, sampled, now);
                }
            }
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
            Op::MapCaller { addr, stack } => {
                let len = match proc.regions.starting_at(addr) {
                    Some(region) if region.owner == Owner::Other => region.end - addr,
                    _ => return, // not a mapping the program owns (stack, file, allocator)
                };
                let site = proc.site(stack, SiteKind::Mmap, now);
                if let Some(region) = proc.regions.starting_at(addr) {
                    region.owner = Owner::Program(site);
                    region.born_ns = now;
                }
                proc.allocated(site, Weight::exact(len), now);
            }
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
            } => {
                let removed = proc.regions.remove(old, old_len);
                let owner = removed.first().map_or(
                    if inside_allocator {
                        Owner::Allocator
                    } else {
                        Owner::Other
                    },
                    |p| p.owner,
                );
                // The same mapping, moved or resized: it keeps its age.
                let born_ns = removed.first().map_or(now, |p| p.born_ns);
                // Releasing the old pieces fully and allocating the new length counts a
                // remap like a realloc: one free and one allocation at the same site.
                for piece in &removed {
                    if let Owner::Program(site) = piece.owner {
                        proc.released(site, Weight::exact(piece.len()), true, piece.born_ns, now);
                    }
                }
                let replaced = proc.regions.insert(new, new_len, owner, born_ns);
                proc.release_pieces(&replaced, now);
                if let Owner::Program(site) = owner {
                    proc.allocated(site, Weight::exact(new_len), now);
                }
            }
            Op::Brk { addr } => proc.brk = Some(addr),
        }
    }

    /// Records a sample of the listed processes' live bytes and their sites' live bytes at
    /// `now_ns`, with each one's footprint when it could be measured. Processes not listed
    /// (gone) get no more points: a flat tail after an exit would hide a leak's growth.
    pub fn sample(&mut self, now_ns: u64, processes: &[(Tgid, Option<u64>)]) {
        for &(tgid, footprint_bytes) in processes {
            let Some(proc) = self.processes.get_mut(&tgid) else {
                continue;
            };
            proc.series.push(
                now_ns,
                ProcessSample {
                    live_bytes: proc.live_bytes,
                    footprint_bytes,
                },
            );
            for site in &mut proc.sites {
                if site.live_bytes > 0 || !site.series.is_empty() {
                    site.series.push(now_ns, site.live_bytes);
                }
            }
            if proc.live_bytes >= proc.peak_sampled {
                proc.peak_sampled = proc.live_bytes;
                let mut top: Vec<(SiteIdx, u64)> = proc
                    .sites
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.live_bytes > 0)
                    .map(|(i, s)| (i as SiteIdx, s.live_bytes))
                    .collect();
                top.sort_unstable_by_key(|&(_, bytes)| std::cmp::Reverse(bytes));
                top.truncate(PEAK_SITES);
                proc.peak_sites = top;
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

    pub fn process(&self, tgid: Tgid) -> Option<&Process> {
        self.processes.get(&tgid)
    }

    pub fn processes(&self) -> impl Iterator<Item = &Process> {
        self.processes.values()
    }

    /// Outstanding heap blocks of one process (for age profiles); order unspecified.
    pub fn live_blocks(&self, tgid: Tgid) -> impl Iterator<Item = (u64, &Block)> {
        self.processes
            .get(&tgid)
            .into_iter()
            .flat_map(|p| p.blocks.iter().map(|(&addr, b)| (addr, b)))
    }

    /// Number of outstanding heap blocks across all processes.
    pub fn outstanding(&self) -> usize {
        self.processes.values().map(|p| p.blocks.len()).sum()
    }
}

#[cfg(test)]
mod tests;
