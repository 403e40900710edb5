//! Every outstanding allocation, keyed by (tgid, address), and per-site aggregates.
//!
//! Pure and synchronous: no aya, no I/O, no symbols. It applies decoded events in ring-buffer
//! order and owns the allocator semantics: `realloc(NULL, n)` allocates, `realloc(p, 0)`
//! frees, a moved block frees its old address, a failed call changes nothing, and frees of
//! blocks it never saw allocated (made before tracing began) are counted apart, never
//! subtracted.

pub mod stacks;

use rustc_hash::FxHashMap;

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
    pub op: Op,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// A new block from malloc, calloc or the memalign family.
    Alloc {
        addr: u64,
        size: u64,
        stack: StackId,
    },
    /// `free(addr)`, `addr != 0`.
    Free { addr: u64 },
    /// realloc/reallocarray(old, size) returned `new`. `new == 0` only for `realloc(old, 0)`.
    Realloc {
        old: u64,
        new: u64,
        size: u64,
        stack: StackId,
    },
}

/// Index of a site in its process's site table.
pub type SiteIdx = u32;

/// One outstanding allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub size: u64,
    pub born_ns: u64,
    pub site: SiteIdx,
}

/// Aggregates of one call site (one distinct stack) in one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    pub stack: StackId,
    pub live_bytes: u64,
    pub live_allocations: u64,
    pub total_allocations: u64,
    pub total_bytes: u64,
    pub frees: u64,
    pub first_ns: u64,
    pub last_alloc_ns: u64,
}

/// Aggregates of one process.
#[derive(Clone, Debug, Default)]
pub struct Process {
    pub tgid: Tgid,
    pub sites: Vec<Site>,
    site_of_stack: FxHashMap<StackId, SiteIdx>,
    pub live_bytes: u64,
    pub live_allocations: u64,
    pub peak_live_bytes: u64,
    pub peak_ns: u64,
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
}

impl Process {
    fn new(tgid: Tgid, now: u64) -> Self {
        Self {
            tgid,
            first_ns: now,
            ..Self::default()
        }
    }

    fn site(&mut self, stack: StackId, now: u64) -> SiteIdx {
        if let Some(&idx) = self.site_of_stack.get(&stack) {
            return idx;
        }
        let idx = self.sites.len() as SiteIdx;
        self.sites.push(Site {
            stack,
            live_bytes: 0,
            live_allocations: 0,
            total_allocations: 0,
            total_bytes: 0,
            frees: 0,
            first_ns: now,
            last_alloc_ns: now,
        });
        self.site_of_stack.insert(stack, idx);
        idx
    }

    fn allocated(&mut self, site: SiteIdx, size: u64, now: u64) {
        let s = &mut self.sites[site as usize];
        s.live_bytes += size;
        s.live_allocations += 1;
        s.total_allocations += 1;
        s.total_bytes += size;
        s.last_alloc_ns = now;
        self.live_bytes += size;
        self.live_allocations += 1;
        self.total_allocations += 1;
        self.total_bytes += size;
        if self.live_bytes > self.peak_live_bytes {
            self.peak_live_bytes = self.live_bytes;
            self.peak_ns = now;
        }
    }

    fn released(&mut self, block: &Block) {
        let s = &mut self.sites[block.site as usize];
        s.live_bytes -= block.size;
        s.live_allocations -= 1;
        s.frees += 1;
        self.live_bytes -= block.size;
        self.live_allocations -= 1;
        self.frees += 1;
    }
}

/// The state of every traced process.
#[derive(Debug, Default)]
pub struct Model {
    processes: FxHashMap<Tgid, Process>,
    blocks: FxHashMap<(Tgid, u64), Block>,
}

impl Model {
    pub fn apply(&mut self, ev: &Event) {
        let Self { processes, blocks } = self;
        let proc = processes
            .entry(ev.tgid)
            .or_insert_with(|| Process::new(ev.tgid, ev.ts_ns));
        proc.last_ns = proc.last_ns.max(ev.ts_ns);
        match ev.op {
            Op::Alloc { addr, size, stack } => {
                Self::allocate(proc, blocks, ev.tgid, addr, size, stack, ev.ts_ns);
            }
            Op::Free { addr } => match blocks.remove(&(ev.tgid, addr)) {
                Some(block) => proc.released(&block),
                None => proc.unknown_frees += 1,
            },
            Op::Realloc {
                old,
                new,
                size,
                stack,
            } => {
                if old != 0 {
                    match blocks.get(&(ev.tgid, old)) {
                        // Born after this realloc began: realloc had already released `old`
                        // and another thread got the address back before this event was
                        // written; that newer block stays.
                        Some(block) if block.born_ns > ev.start_ns => {}
                        Some(_) => {
                            let block = blocks.remove(&(ev.tgid, old)).expect("present");
                            proc.released(&block);
                        }
                        None => proc.unknown_reallocs += 1,
                    }
                }
                if new != 0 {
                    Self::allocate(proc, blocks, ev.tgid, new, size, stack, ev.ts_ns);
                }
            }
        }
    }

    fn allocate(
        proc: &mut Process,
        blocks: &mut FxHashMap<(Tgid, u64), Block>,
        tgid: Tgid,
        addr: u64,
        size: u64,
        stack: StackId,
        now: u64,
    ) {
        let site = proc.site(stack, now);
        let block = Block {
            size,
            born_ns: now,
            site,
        };
        if let Some(stale) = blocks.insert((tgid, addr), block) {
            proc.replaced_live += 1;
            proc.released(&stale);
        }
        proc.allocated(site, size, now);
    }

    pub fn process(&self, tgid: Tgid) -> Option<&Process> {
        self.processes.get(&tgid)
    }

    pub fn processes(&self) -> impl Iterator<Item = &Process> {
        self.processes.values()
    }

    /// Outstanding blocks of one process (for age profiles); order unspecified.
    pub fn live_blocks(&self, tgid: Tgid) -> impl Iterator<Item = (u64, &Block)> {
        self.blocks
            .iter()
            .filter(move |((t, _), _)| *t == tgid)
            .map(|((_, addr), b)| (*addr, b))
    }

    /// Number of outstanding blocks across all processes.
    pub fn outstanding(&self) -> usize {
        self.blocks.len()
    }
}

#[cfg(test)]
mod tests;
