//! Ring buffer → decoded events → model, and the kernel's loss counters.
//!
//! Holds no allocation state of its own: it only turns records into model events, resolving
//! the kernel's stack hashes to interned stacks (the frames arrive once, before any bare hash).

pub mod decode;
pub mod ring;
pub mod unwind;

use aya::maps::{MapData, PerCpuArray};
use tracer_common::{COUNTER_SLOTS, Counter, NO_STACK};

use crate::{
    model::{Event, Model, StackId, StackTable},
    procfs::MapsSnapshot,
};

/// What the collector itself could not use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureStats {
    /// Records taken from the ring buffer.
    pub received: u64,
    /// Records that could not be decoded (a version mismatch; never expected).
    pub undecodable: u64,
    /// Stack hashes whose frames never arrived (their sites are unknown; not expected).
    pub stack_reads_failed: u64,
}

pub struct Capture {
    ring: ring::Ring,
    counters: PerCpuArray<MapData, u64>,
    scratch: Vec<u64>,
    unwinders: unwind::Unwinders,
    /// Frames kept per stack; deeper stacks are marked truncated.
    depth: usize,
    pub stats: CaptureStats,
}

impl Capture {
    pub fn new(ring: ring::Ring, counters: PerCpuArray<MapData, u64>, depth: usize) -> Self {
        Self {
            ring,
            counters,
            scratch: Vec::with_capacity(tracer_common::MAX_STACK_DEPTH),
            unwinders: unwind::Unwinders::default(),
            depth: depth.clamp(1, tracer_common::MAX_STACK_DEPTH),
            stats: CaptureStats::default(),
        }
    }

    pub fn ring(&self) -> &ring::Ring {
        &self.ring
    }

    /// Applies every record currently in the ring buffer to `model`; returns how many.
    /// `maps` reads a process's pinned mappings, for unwinding copied stacks.
    pub fn drain(
        &mut self,
        model: &mut Model,
        stacks: &mut StackTable,
        maps: &mut dyn FnMut(u32) -> Option<MapsSnapshot>,
    ) -> u64 {
        let Self {
            ring,
            scratch,
            unwinders,
            depth,
            stats,
            ..
        } = self;
        let depth = *depth;
        let n = ring.consume(|item| {
            let Ok((raw, payload)) = decode::record(item) else {
                stats.undecodable += 1;
                return;
            };
            let stack = if let Some((regs, bytes)) = decode::copied_stack(&raw, payload) {
                let ending = unwinders.unwind(raw.tgid, regs, bytes, depth, scratch, maps);
                let truncated = ending == unwind::Ending::Truncated;
                if scratch.is_empty() {
                    StackId::UNKNOWN
                } else {
                    stacks.intern_marked(scratch, truncated)
                }
            } else if decode::has_inline_stack(&raw) {
                decode::inline_frames(payload, scratch);
                let truncated = cut(scratch, depth);
                stacks.insert_kernel(raw.stack, scratch, truncated)
            } else if raw.stack != NO_STACK {
                stacks.kernel(raw.stack).unwrap_or_else(|| {
                    stats.stack_reads_failed += 1;
                    StackId::UNKNOWN
                })
            } else {
                StackId::UNKNOWN
            };
            match decode::op(&raw, stack) {
                Ok(op) => model.apply(&Event {
                    tgid: raw.tgid,
                    ts_ns: raw.ts_ns,
                    start_ns: raw.start_ns,
                    op,
                }),
                Err(_) => stats.undecodable += 1,
            }
        });
        stats.received += n;
        n
    }

    /// The kernel's counters, summed over CPUs.
    pub fn kernel_counters(&self) -> KernelCounters {
        let mut slots = [0u64; COUNTER_SLOTS as usize];
        for (i, slot) in slots.iter_mut().enumerate() {
            if let Ok(values) = self.counters.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        KernelCounters(slots)
    }
}

/// Keeps at most `depth` frames; true when frames were cut, or when the kernel's walk itself
/// stopped at its maximum depth (it records one frame beyond `depth` to tell).
fn cut(frames: &mut Vec<u64>, depth: usize) -> bool {
    let full = frames.len() >= tracer_common::MAX_STACK_DEPTH;
    let longer = frames.len() > depth;
    frames.truncate(depth);
    full || longer
}

/// Snapshot of the kernel-side counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters(pub [u64; COUNTER_SLOTS as usize]);

impl KernelCounters {
    pub fn get(&self, counter: Counter) -> u64 {
        self.0[counter as usize]
    }

    /// Events lost in the kernel: each one is an allocation or free the model never saw.
    /// (`InflightFull` is a cause, not an extra loss: that call's return is counted as
    /// `ReturnWithoutEntry`.)
    pub fn dropped(&self) -> u64 {
        self.get(Counter::RingFull)
            + self.get(Counter::ReturnWithoutEntry)
            + self.get(Counter::ReturnMissed)
            + self.get(Counter::OutPtrUnreadable)
    }
}
