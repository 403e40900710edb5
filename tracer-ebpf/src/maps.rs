//! Maps, load-time globals, the process filter and the loss counters.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf, StackTrace},
};
use tracer_common::{
    BlockKey, COUNTER_SLOTS, Counter, DEFAULT_INFLIGHT_ENTRIES, DEFAULT_RING_BYTES,
    DEFAULT_SAMPLED_ENTRIES, DEFAULT_STACK_COPY, DEFAULT_STACK_ENTRIES, DEFAULT_TARGET_ENTRIES,
    InFlight, STACK_COPY_MAX, Sampler, StackCopy,
};

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// A plain preallocated hash: measurably cheaper per call than an LRU one. An entry left by
/// a thread killed inside an allocator call stays until the collector exits; a full map is
/// counted (`InflightFull`), never silent.
#[map]
pub static INFLIGHT: HashMap<u64, InFlight> =
    HashMap::with_max_entries(DEFAULT_INFLIGHT_ENTRIES, 0);

/// Mapping syscalls between entry and exit (a thread can be inside malloc and its mmap).
#[map]
pub static SYSCALLS: LruHashMap<u64, InFlight> =
    LruHashMap::with_max_entries(DEFAULT_INFLIGHT_ENTRIES, 0);

#[map]
pub static STACKS: StackTrace = StackTrace::with_max_entries(DEFAULT_STACK_ENTRIES, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Live sampled blocks (byte sampling only).
#[map]
pub static SAMPLED: HashMap<BlockKey, u8> = HashMap::with_max_entries(DEFAULT_SAMPLED_ENTRIES, 0);

#[map]
pub static SAMPLER: PerCpuArray<Sampler> = PerCpuArray::with_max_entries(1, 0);

/// Where a copied stack is assembled (`dwarf` stack mode): too big for the BPF stack, and a
/// fixed-size ring reservation would waste ring space on every shallow stack.
#[map]
pub static STACK_SCRATCH: PerCpuArray<StackCopy> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static TARGETS: HashMap<u32, u8> = HashMap::with_max_entries(DEFAULT_TARGET_ENTRIES, 0);

#[unsafe(no_mangle)]
static SELF_TGID: u32 = 0;
#[unsafe(no_mangle)]
static FILTER_TGIDS: u8 = 0;
#[unsafe(no_mangle)]
static WAKEUP_BYTES: u64 = 1 << 20;
#[unsafe(no_mangle)]
static SAMPLE_BYTES: u64 = 0;
#[unsafe(no_mangle)]
static STACK_COPY_BYTES: u32 = DEFAULT_STACK_COPY;
#[unsafe(no_mangle)]
static SAMPLE_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

pub fn sample_bytes() -> u64 {
    global(&SAMPLE_BYTES)
}

pub fn sample_seed() -> u64 {
    global(&SAMPLE_SEED)
}

/// Non-zero: every uprobe was attached for one traced process, so uprobes skip the filter.
#[unsafe(no_mangle)]
static UPROBES_SCOPED: u8 = 0;

fn global<T: Copy>(value: &T) -> T {
    // SAFETY: a read of a static; volatile so the loader's override is not constant-folded away.
    unsafe { core::ptr::read_volatile(value) }
}

/// Bytes of user stack to copy per event, never more than the scratch buffer allows.
pub fn stack_copy_bytes() -> usize {
    (global(&STACK_COPY_BYTES) as usize).min(STACK_COPY_MAX)
}

pub fn wakeup_bytes() -> u64 {
    global(&WAKEUP_BYTES)
}

/// [`is_traced`] for uprobes: free when each uprobe only fires in its traced process.
#[inline(always)]
pub fn uprobe_traced(tgid: u32) -> bool {
    global(&UPROBES_SCOPED) != 0 || is_traced(tgid)
}

/// Whether this process is one the user asked to trace (and never the collector itself).
#[inline(always)]
pub fn is_traced(tgid: u32) -> bool {
    if tgid == global(&SELF_TGID) {
        return false;
    }
    // SAFETY: the value is only tested for presence.
    global(&FILTER_TGIDS) == 0 || unsafe { TARGETS.get(&tgid) }.is_some()
}

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot; programs do not migrate CPUs while running.
        unsafe { *slot += 1 };
    }
}

/// `CLOCK_MONOTONIC` in ns, the clock userspace converts event times from.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: the helper takes no arguments and cannot fail.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() }
}
