//! One process's allocation state: its outstanding blocks, its sites and their aggregates.
//!
//! Every count is kept twice when byte sampling is on: as recorded (the samples) and as an
//! unbiased estimate (each sample weighted by 1/p), with the estimate's variance beside it,
//! so the report can give every estimate its interval from the samples themselves.

use rustc_hash::FxHashMap;

use super::lifetimes::Lifetimes;
use super::regions::{Owner, Regions};
use super::{
    Recording, StackId, Tgid, regions,
    series::{Series, Steps},
};

/// Index of a site in its process's site table.
pub type SiteIdx = u32;

/// One outstanding heap block, packed into 16 bytes: with its 8-byte address key, the model
/// holds an outstanding allocation in 24 bytes plus the hash table's slack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    /// When the memory was first allocated: a block moved or resized by realloc keeps the
    /// birth of the block it replaced, since to the program it is the same object.
    pub born_ns: u64,
    /// Size (low 40 bits, saturating at 1 TiB), sampled flag (bit 40), allocator (4 bits),
    /// predicted flag, site index (high 18).
    packed: u64,
}

const SIZE_BITS: u32 = 40;
const SIZE_MASK: u64 = (1 << SIZE_BITS) - 1;
const SAMPLED_BIT: u64 = 1 << SIZE_BITS;
/// Which of its process's allocators made the block (an index into `Process::allocators`).
const ALLOCATOR_SHIFT: u32 = SIZE_BITS + 1;
const ALLOCATOR_MASK: u64 = 0xf;
/// Allocators a process can have apart; more share the last index.
const MAX_ALLOCATORS: usize = 16;
/// The block was predicted from glibc's thread cache (see `Recording::Predicted`).
const PREDICTED_BIT: u64 = 1 << (ALLOCATOR_SHIFT + 4);
const SITE_SHIFT: u32 = ALLOCATOR_SHIFT + 5;
/// Sites beyond this index (never reached: the kernel's stack map is far smaller) share it.
const MAX_SITE: SiteIdx = (1 << (64 - SITE_SHIFT)) - 1;

impl Block {
    pub fn new(size: u64, born_ns: u64, site: SiteIdx, sampled: bool) -> Self {
        Self::made_by(size, born_ns, site, sampled, 0)
    }

    /// A block made by its process's allocator number `allocator`.
    pub fn made_by(
        size: u64,
        born_ns: u64,
        site: SiteIdx,
        sampled: bool,
        allocator: usize,
    ) -> Self {
        let sampled = if sampled { SAMPLED_BIT } else { 0 };
        let allocator = (allocator as u64).min(ALLOCATOR_MASK) << ALLOCATOR_SHIFT;
        Self {
            born_ns,
            packed: size.min(SIZE_MASK)
                | sampled
                | allocator
                | (u64::from(site.min(MAX_SITE)) << SITE_SHIFT),
        }
    }

    /// Index of the allocator that made it, in its process's `allocators`.
    pub fn allocator(&self) -> usize {
        ((self.packed >> ALLOCATOR_SHIFT) & ALLOCATOR_MASK) as usize
    }

    pub fn size(&self) -> u64 {
        self.packed & SIZE_MASK
    }

    /// Whether the block was predicted from glibc's thread cache.
    pub fn predicted(&self) -> bool {
        self.packed & PREDICTED_BIT != 0
    }

    pub fn sampled(&self) -> bool {
        self.packed & SAMPLED_BIT != 0
    }

    pub fn site(&self) -> SiteIdx {
        (self.packed >> SITE_SHIFT) as SiteIdx
    }
}

const _: () = assert!(size_of::<Block>() == 16);

/// What one recorded allocation stands for: its bytes and its count, both 1:1 when exact,
/// and what it adds to the variance of the estimates it enters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Weight {
    pub bytes: u64,
    pub count: f64,
    /// Variance contribution to a byte estimate: (1 - p) / p² · size² (0 when exact).
    pub var_bytes: f64,
    /// Variance contribution to a count estimate: (1 - p) / p² (0 when exact).
    pub var_count: f64,
}

impl Weight {
    pub const fn exact(size: u64) -> Self {
        Self {
            bytes: size,
            count: 1.0,
            var_bytes: 0.0,
            var_count: 0.0,
        }
    }

    /// The unbiased weight of a block of `size` bytes chosen by Poisson byte sampling with
    /// mean `sample_bytes`: it was recorded with probability p = 1 - exp(-size / mean), so
    /// it stands for 1/p blocks. Inclusions are independent (the gaps are memoryless), so
    /// the Horvitz–Thompson variance of a sum is the sum of (1 - p) / p² · y² over its samples.
    pub fn sampled(size: u64, sample_bytes: u64) -> Self {
        if sample_bytes == 0 {
            return Self::exact(size);
        }
        let p = -(-(size.max(1) as f64) / sample_bytes as f64).exp_m1();
        let count = 1.0 / p;
        let var_count = (1.0 - p) / (p * p);
        Self {
            bytes: (size as f64 * count).round() as u64,
            count,
            var_bytes: var_count * (size as f64).powi(2),
            var_count,
        }
    }
}

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
pub const SITE_POINTS: usize = 128;
const PROCESS_POINTS: usize = 1024;
/// Sites remembered at the sample of highest live bytes.
const PEAK_SITES: usize = 5;
/// Replacements of live blocks waiting for the realloc that may explain them.
const MAX_PENDING_REPLACEMENTS: usize = 1 << 16;

/// Estimated allocation counts (sums of weights).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counts {
    pub live: f64,
    pub total: f64,
    pub frees: f64,
}

/// Variances of the sampled estimates (sums of each sample's contribution; 0 when exact).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Spread {
    pub live_bytes: f64,
    pub live_count: f64,
    pub total_bytes: f64,
    pub total_count: f64,
}

impl Spread {
    fn allocated(&mut self, w: &Weight) {
        self.live_bytes += w.var_bytes;
        self.live_count += w.var_count;
        self.total_bytes += w.var_bytes;
        self.total_count += w.var_count;
    }

    fn released(&mut self, w: &Weight) {
        self.live_bytes = (self.live_bytes - w.var_bytes).max(0.0);
        self.live_count = (self.live_count - w.var_count).max(0.0);
    }
}

/// A site's state at one sample: live bytes, and its recorded allocations and frees so far
/// (so a window cut short, e.g. before an exit's teardown, still knows what was freed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SitePoint {
    pub live_bytes: u64,
    pub allocations: u32,
    pub frees: u32,
}

impl std::ops::Add for SitePoint {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            live_bytes: self.live_bytes + other.live_bytes,
            allocations: self.allocations.saturating_add(other.allocations),
            frees: self.frees.saturating_add(other.frees),
        }
    }
}

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
    pub spread: Spread,
    pub first_ns: u64,
    pub last_alloc_ns: u64,
    /// Lifetimes of freed allocations.
    pub lifetimes: Lifetimes,
    /// Live bytes and counts at each sample since the site first held memory, as the
    /// samples where they changed (read back at the process's sample instants).
    pub series: Steps<SitePoint>,
}

impl Site {
    /// One site made of several (stacks that symbolize the same): counts, bytes and
    /// variances summed, first and last allocation the earliest and latest, lifetimes and
    /// series merged. Its stack is the first member's. `None` for no members.
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
            site.spread.live_bytes += m.spread.live_bytes;
            site.spread.live_count += m.spread.live_count;
            site.spread.total_bytes += m.spread.total_bytes;
            site.spread.total_count += m.spread.total_count;
            site.first_ns = site.first_ns.min(m.first_ns);
            site.last_alloc_ns = site.last_alloc_ns.max(m.last_alloc_ns);
            site.lifetimes.merge(&m.lifetimes);
        }
        if members.len() > 1 {
            site.series = Steps::sum(members.iter().map(|m| &m.series), SITE_POINTS);
        }
        Some(site)
    }

    fn new(stack: StackId, kind: SiteKind, now: u64) -> Self {
        Self {
            stack,
            kind,
            live_bytes: 0,
            live_allocations: 0,
            total_allocations: 0,
            total_bytes: 0,
            frees: 0,
            est: Counts::default(),
            spread: Spread::default(),
            first_ns: now,
            last_alloc_ns: now,
            lifetimes: Lifetimes::None,
            series: Steps::new(SITE_POINTS),
        }
    }

    /// Its series at the process's sample instants (`Process::sample_instants`), at most
    /// [`SITE_POINTS`] of them.
    pub fn points(&self, instants: &[u64]) -> Vec<(u64, SitePoint)> {
        self.series.at(instants, SITE_POINTS)
    }

    /// Its state now.
    pub fn point(&self) -> SitePoint {
        SitePoint {
            live_bytes: self.live_bytes,
            allocations: u32::try_from(self.total_allocations).unwrap_or(u32::MAX),
            frees: u32::try_from(self.frees).unwrap_or(u32::MAX),
        }
    }

    fn record_lifetime(&mut self, born_ns: u64, now: u64) {
        self.lifetimes.record(now.saturating_sub(born_ns) / 1000);
    }
}

/// What one allocator of a process holds and made (bytes as estimated under sampling).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocatorUse {
    /// Its family (`tracer_common::allocator`).
    pub family: u8,
    pub live_bytes: u64,
    pub total_bytes: u64,
    pub live_allocations: u64,
    pub total_allocations: u64,
}

/// Processes a process forked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Children {
    pub forked: u64,
    /// Of those, the ones traced from their first instruction.
    pub traced: u64,
}

/// What a forked child got from its parent: the parent's outstanding blocks at the fork,
/// copy-on-write. They stay in the parent's table; the child counts the ones it frees.
#[derive(Clone, Debug, PartialEq)]
pub struct Inheritance {
    pub parent: Tgid,
    pub at_ns: u64,
    /// The parent's live bytes and allocations at the fork.
    pub bytes: u64,
    pub allocations: u64,
    /// Those the child freed.
    pub freed_bytes: u64,
    pub freed_allocations: u64,
    pub(super) freed_addrs: rustc_hash::FxHashSet<u64>,
}

impl Inheritance {
    pub(super) fn new(parent: &Process, at_ns: u64) -> Self {
        Self {
            parent: parent.tgid,
            at_ns,
            bytes: parent.live_bytes,
            allocations: parent.live_allocations,
            freed_bytes: 0,
            freed_allocations: 0,
            freed_addrs: rustc_hash::FxHashSet::default(),
        }
    }

    pub(super) fn freed(&mut self, addr: u64, bytes: u64) {
        if self.freed_addrs.insert(addr) {
            self.freed_bytes += bytes;
            self.freed_allocations += 1;
        }
    }
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
    pub spread: Spread,
    /// Part of `live_bytes` in the program's own mappings.
    pub mmap_live_bytes: u64,
    pub peak_live_bytes: u64,
    pub peak_ns: u64,
    /// Variance of the live-bytes estimate at the peak (0 when exact).
    pub peak_var_bytes: f64,
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
    /// Allocations returned at an address the model still held live, and no realloc that
    /// released that address explains it: the earlier block's free was never seen (a lost
    /// event), so it was retired as freed. See [`Process::replaced_live`].
    replaced_unexplained: u64,
    /// Replacements still waiting for a realloc, begun before them, that freed the address
    /// (another thread's realloc returns after the address was handed out again).
    pending_replacements: FxHashMap<u64, u64>,
    /// Sampled allocations the kernel could not remember: counted in totals, never live.
    pub untracked_samples: u64,
    /// Allocations past `--max-tracked`, counted but not kept.
    pub capped_allocations: u64,
    /// Frees by one allocator of a block another made (a mismatch: a bug in the program, or
    /// in the attribution).
    pub mismatched_frees: u64,
    pub regions: Regions,
    pub brk: Option<u64>,
    pub series: Series<ProcessSample>,
    /// Its allocators, in the order they were first seen (blocks index into this).
    pub allocators: Vec<AllocatorUse>,
    /// When it was forked by a traced process: what it inherited.
    pub inherited: Option<Inheritance>,
    pub children: Children,
    /// Which program image of the process this is: 0, then one more at each `exec`.
    pub image: u32,
    /// When it ended (exit, or `exec` into another image).
    pub ended_ns: Option<u64>,
    pub replaced_by_exec: bool,
    /// Outstanding heap blocks by address.
    blocks: FxHashMap<u64, Block>,
    /// Mean bytes between samples (0: exact), to weigh sampled blocks.
    sample_bytes: u64,
}

impl Process {
    pub(super) fn new(tgid: Tgid, now: u64, sample_bytes: u64) -> Self {
        Self {
            tgid,
            sites: Vec::new(),
            site_of: FxHashMap::default(),
            live_bytes: 0,
            live_allocations: 0,
            est: Counts::default(),
            spread: Spread::default(),
            mmap_live_bytes: 0,
            peak_live_bytes: 0,
            peak_ns: now,
            peak_var_bytes: 0.0,
            peak_sites: Vec::new(),
            peak_sampled: 0,
            total_allocations: 0,
            total_bytes: 0,
            frees: 0,
            first_ns: now,
            last_ns: now,
            unknown_frees: 0,
            unknown_reallocs: 0,
            replaced_unexplained: 0,
            pending_replacements: FxHashMap::default(),
            untracked_samples: 0,
            capped_allocations: 0,
            mismatched_frees: 0,
            regions: Regions::default(),
            brk: None,
            series: Series::new(PROCESS_POINTS),
            allocators: Vec::new(),
            inherited: None,
            children: Children::default(),
            image: 0,
            ended_ns: None,
            replaced_by_exec: false,
            blocks: FxHashMap::default(),
            sample_bytes,
        }
    }

    /// Whether it did anything an allocator or a mapping shows.
    pub fn active(&self) -> bool {
        self.total_allocations > 0
            || self.frees > 0
            || self.unknown_frees > 0
            || !self.sites.is_empty()
    }

    /// Whether it holds a block at `addr`.
    pub fn has_block(&self, addr: u64) -> bool {
        self.blocks.contains_key(&addr)
    }

    /// Its block at `addr`.
    pub fn block(&self, addr: u64) -> Option<Block> {
        self.blocks.get(&addr).copied()
    }

    /// What a block of this process stands for.
    pub fn weight_of(&self, block: &Block) -> Weight {
        self.weight(block)
    }

    /// The index in `allocators` of family `family`, added on first use.
    fn allocator_index(&mut self, family: u8) -> usize {
        if let Some(i) = self.allocators.iter().position(|a| a.family == family) {
            return i;
        }
        if self.allocators.len() >= MAX_ALLOCATORS {
            return MAX_ALLOCATORS - 1;
        }
        self.allocators.push(AllocatorUse {
            family,
            ..AllocatorUse::default()
        });
        self.allocators.len() - 1
    }

    /// Allocations that replaced a block the model still held live with no realloc to
    /// explain it: each is a free the tracer never saw (or a wrong prediction).
    pub fn replaced_live(&self) -> u64 {
        self.replaced_unexplained + self.pending_replacements.len() as u64
    }

    /// Outstanding heap blocks, by address.
    pub fn blocks(&self) -> impl Iterator<Item = (u64, &Block)> {
        self.blocks.iter().map(|(&addr, b)| (addr, b))
    }

    pub fn outstanding(&self) -> usize {
        self.blocks.len()
    }

    pub(super) fn site(&mut self, stack: StackId, kind: SiteKind, now: u64) -> SiteIdx {
        if let Some(&idx) = self.site_of.get(&(stack, kind)) {
            return idx;
        }
        if self.sites.len() as SiteIdx >= MAX_SITE {
            return MAX_SITE - 1;
        }
        let idx = self.sites.len() as SiteIdx;
        self.sites.push(Site::new(stack, kind, now));
        self.site_of.insert((stack, kind), idx);
        idx
    }

    /// Counts an allocation at `site` (`w` as recorded); `live` is false for a sampled block
    /// the kernel could not remember, which enters the totals only.
    pub(super) fn allocated(&mut self, site: SiteIdx, w: Weight, live: bool, now: u64) {
        let size = w.bytes;
        let s = &mut self.sites[site as usize];
        s.total_allocations += 1;
        s.total_bytes += size;
        s.est.total += w.count;
        s.last_alloc_ns = now;
        self.total_allocations += 1;
        self.total_bytes += size;
        self.est.total += w.count;
        if !live {
            s.spread.total_bytes += w.var_bytes;
            s.spread.total_count += w.var_count;
            self.spread.total_bytes += w.var_bytes;
            self.spread.total_count += w.var_count;
            return;
        }
        s.live_bytes += size;
        s.live_allocations += 1;
        s.est.live += w.count;
        s.spread.allocated(&w);
        if s.kind == SiteKind::Mmap {
            self.mmap_live_bytes += size;
        }
        self.live_bytes += size;
        self.live_allocations += 1;
        self.est.live += w.count;
        self.spread.allocated(&w);
        if self.live_bytes > self.peak_live_bytes {
            self.peak_live_bytes = self.live_bytes;
            self.peak_ns = now;
            self.peak_var_bytes = self.spread.live_bytes;
        }
    }

    /// Releases a site's memory (`w` as it was allocated); `whole` when an allocation ended
    /// (not just a part of a mapping), `born_ns` to record its lifetime.
    pub(super) fn released(
        &mut self,
        site: SiteIdx,
        w: Weight,
        whole: bool,
        born_ns: u64,
        now: u64,
    ) {
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
            s.spread.released(&w);
            self.live_allocations -= 1;
            self.frees += 1;
            self.est.live -= w.count;
            self.est.frees += w.count;
            self.spread.released(&w);
            s.record_lifetime(born_ns, now);
        }
    }

    /// A new block at `addr`, born at `born_ns` (now, or the birth of the block a realloc
    /// moved or resized). Returns whether it took the address of a live block where a
    /// thread-cache prediction made either one.
    pub(super) fn allocate(
        &mut self,
        addr: u64,
        size: u64,
        stack: StackId,
        (recording, family): (Recording, u8),
        (now, born_ns): (u64, u64),
    ) -> bool {
        let site = self.site(stack, SiteKind::Heap, now);
        let allocator = self.allocator_index(family);
        let mut block = Block::made_by(size, born_ns, site, recording.sampled(), allocator);
        if recording == Recording::Predicted {
            block.packed |= PREDICTED_BIT;
        }
        let w = self.weight(&block);
        let use_ = &mut self.allocators[allocator];
        use_.total_bytes += w.bytes;
        use_.total_allocations += 1;
        if matches!(recording, Recording::SampledUntracked | Recording::Capped) {
            if recording == Recording::Capped {
                self.capped_allocations += 1;
            } else {
                self.untracked_samples += 1;
            }
            self.allocated(site, w, false, now);
            return false;
        }
        use_.live_bytes += w.bytes;
        use_.live_allocations += 1;
        let mut contradicted = false;
        if let Some(stale) = self.blocks.insert(addr, block) {
            contradicted = stale.predicted() || block.predicted();
            self.note_replacement(addr, now);
            self.release_block(&stale, now);
        }
        self.allocated(site, w, true, now);
        contradicted
    }

    /// An allocation took `addr` while the model still held a block there. A realloc that
    /// began earlier and released `addr` may still explain it when its event arrives.
    fn note_replacement(&mut self, addr: u64, now: u64) {
        if self.pending_replacements.len() >= MAX_PENDING_REPLACEMENTS {
            self.replaced_unexplained += 1;
            return;
        }
        if self.pending_replacements.insert(addr, now).is_some() {
            self.replaced_unexplained += 1;
        }
    }

    /// `free(addr)` by allocator family `family`.
    pub(super) fn free(&mut self, addr: u64, family: u8, now: u64) {
        match self.blocks.remove(&addr) {
            Some(block) => {
                let maker = self.allocators.get(block.allocator()).map(|a| a.family);
                if family != 0 && maker.is_some_and(|m| m != 0 && m != family) {
                    self.mismatched_frees += 1;
                }
                self.release_block(&block, now);
            }
            None => self.unknown_frees += 1,
        }
    }

    /// realloc(old, size) returned `new` (0: it freed `old`, or failed), the call having begun
    /// at `start_ns`.
    pub(super) fn realloc(
        &mut self,
        (old, new, size): (u64, u64, u64),
        stack: StackId,
        recording: (Recording, u8),
        (start_ns, now): (u64, u64),
    ) {
        let mut born_ns = now;
        if old != 0 {
            if self.replaced_after(old, start_ns) {
                // Realloc had already released `old` when another thread got the address
                // back, before this event was written: the block that replaced it stays,
                // and the replacement is explained.
                self.pending_replacements.remove(&old);
            } else {
                match self.blocks.remove(&old) {
                    Some(block) => {
                        born_ns = block.born_ns;
                        self.release_block(&block, now);
                    }
                    None => self.unknown_reallocs += 1,
                }
            }
        }
        if new != 0 {
            self.allocate(new, size, stack, recording, (now, born_ns.min(now)));
        }
    }

    fn replaced_after(&self, addr: u64, start_ns: u64) -> bool {
        self.pending_replacements
            .get(&addr)
            .is_some_and(|&at| at >= start_ns)
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
        if let Some(use_) = self.allocators.get_mut(block.allocator()) {
            use_.live_bytes = use_.live_bytes.saturating_sub(w.bytes);
            use_.live_allocations = use_.live_allocations.saturating_sub(1);
        }
        self.released(block.site(), w, true, block.born_ns, now);
    }

    /// Accounts for mapping pieces taken away (unmap, remap, `MAP_FIXED`).
    pub(super) fn release_pieces(&mut self, pieces: &[regions::Piece], now: u64) {
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

    /// The instants of the samples its series keep, oldest first.
    pub fn sample_instants(&self) -> Vec<u64> {
        self.series.points().iter().map(|&(t, _)| t).collect()
    }

    /// Records a sample at `now_ns`: the process's live bytes and footprint, each site's
    /// state, and the biggest sites when live bytes are at their highest so far.
    pub(super) fn sample(&mut self, now_ns: u64, footprint_bytes: Option<u64>) {
        self.series.push(
            now_ns,
            ProcessSample {
                live_bytes: self.live_bytes,
                footprint_bytes,
            },
        );
        for site in &mut self.sites {
            if site.live_bytes > 0 || !site.series.is_empty() {
                let point = site.point();
                site.series.push(now_ns, point);
            }
        }
        if self.live_bytes >= self.peak_sampled {
            self.peak_sampled = self.live_bytes;
            let mut top: Vec<(SiteIdx, u64)> = self
                .sites
                .iter()
                .enumerate()
                .filter(|(_, s)| s.live_bytes > 0)
                .map(|(i, s)| (i as SiteIdx, s.live_bytes))
                .collect();
            top.sort_unstable_by_key(|&(_, bytes)| std::cmp::Reverse(bytes));
            top.truncate(PEAK_SITES);
            self.peak_sites = top;
        }
    }
}
