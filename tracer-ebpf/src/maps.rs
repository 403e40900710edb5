//! Maps, load-time globals, the process filter and the loss counters.

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd, atomic_xchg},
    ptr,
};

use aya_ebpf::{
    bindings::{
        BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_LOCAL_STORAGE_GET_F_CREATE,
        bpf_map_type::BPF_MAP_TYPE_TASK_STORAGE,
    },
    helpers::generated::{bpf_get_current_task_btf, bpf_task_storage_get},
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use tracer_common::{
    Admission, BlockKey, COUNTER_SLOTS, Counter, DEFAULT_RING_BYTES, DEFAULT_SAMPLED_ENTRIES,
    DEFAULT_STACK_COPY, DEFAULT_TARGET_ENTRIES, InFlight, KNOWN_STACK_SLOTS, MAX_STACK_DEPTH,
    PREDICTION_LIBRARIES, SAMPLED_FILTER_SLOTS, STACK_COPY_MAX, Sampler, StackCopy, admission,
    file_walk, return_walk, tracepoint_fields,
    unwind::{FILE_TABLE_ENTRIES, FileTable, ProcessModules, TableKey, UnwindRow, walk},
};

/// One ring buffer per CPU (CPUs beyond `EVENT_RINGS` share them, modulo): a ring's
/// reservation lock and producer position are then written by one CPU only, instead of
/// bouncing between all of them on every event. Userspace merges the rings by time.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);
#[map]
pub static EVENTS_1: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);
#[map]
pub static EVENTS_2: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);
#[map]
pub static EVENTS_3: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// Task-local storage: the kernel keeps one slot per thread, found through the task itself,
/// which costs a fraction of a hash-map insert and delete per call (measured: entry program
/// 400 → under 100 ns). The slot goes away with its thread.
///
/// Declared by hand in BTF form (the loader reads the map's shape from the field types),
/// since task storage needs BTF for its key and value and aya-ebpf has no wrapper for it.
#[repr(C)]
pub struct TaskStorage<T> {
    r#type: *const [i32; BPF_MAP_TYPE_TASK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}

// SAFETY: the fields are placeholders the loader replaces; nothing dereferences them.
unsafe impl<T> Sync for TaskStorage<T> {}

impl<T> TaskStorage<T> {
    pub const fn new() -> Self {
        Self {
            r#type: ptr::null(),
            key: ptr::null(),
            value: ptr::null(),
            max_entries: ptr::null(),
            map_flags: ptr::null(),
        }
    }

    /// The current thread's slot, created zeroed on first use; `None` only if the kernel
    /// could not allocate it or the storage was busy on this CPU.
    #[inline(always)]
    pub fn current_or_create(&self) -> Option<&mut T> {
        self.current_with(BPF_LOCAL_STORAGE_GET_F_CREATE.into())
    }

    /// The current thread's slot, if it has one.
    #[inline(always)]
    pub fn current(&self) -> Option<&mut T> {
        self.current_with(0)
    }

    #[inline(always)]
    fn current_with(&self, flags: u64) -> Option<&mut T> {
        // SAFETY: the helper returns a trusted pointer to the running task, and either null or
        // a pointer to this thread's value, which only this thread touches.
        unsafe {
            let task = bpf_get_current_task_btf();
            let slot = bpf_task_storage_get(
                ptr::from_ref(self).cast_mut().cast(),
                task,
                ptr::null_mut(),
                flags,
            );
            slot.cast::<T>().as_mut()
        }
    }
}

#[unsafe(link_section = ".maps")]
#[unsafe(export_name = "CALLS")]
pub static CALLS: TaskStorage<InFlight> = TaskStorage::new();

/// A traced thread's mapping syscall between entry and exit (a thread can be inside malloc
/// and its mmap, so apart from `CALLS`). Task storage, not a hash map: it can neither fill
/// up with threads that died inside a syscall nor evict a live entry, and it goes away with
/// its thread.
#[unsafe(link_section = ".maps")]
#[unsafe(export_name = "SYSCALL_SLOTS")]
pub static SYSCALL_SLOTS: TaskStorage<InFlight> = TaskStorage::new();

/// Hashes of frame-pointer stacks whose frames are already in the ring, direct-mapped by
/// hash: one inlined array lookup per event, where a hash map costs a locked bucket walk.
#[map]
pub static KNOWN_STACKS: Array<u64> = Array::with_max_entries(KNOWN_STACK_SLOTS, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Live sampled blocks (byte sampling only).
#[map]
pub static SAMPLED: HashMap<BlockKey, u8> = HashMap::with_max_entries(DEFAULT_SAMPLED_ENTRIES, 0);

/// How many live sampled blocks hash to each slot (byte sampling only): a zero proves a block
/// unsampled with one inlined array read, so most frees never touch the `SAMPLED` hash.
#[map]
pub static SAMPLED_FILTER: Array<u32> = Array::with_max_entries(SAMPLED_FILTER_SLOTS, 0);

/// Allocator calls recorded and not yet returned, all threads together (byte sampling
/// only): while it is zero, a return knows its call was unsampled without looking up the
/// thread's slot, whose pointer chase misses the cache under a busy program.
#[map]
pub static RECORDED_CALLS: Array<u64> = Array::with_max_entries(1, 0);

/// Recorded calls in flight that may call `free` or another probed function (every kind but
/// malloc and calloc), all threads together. While it is zero, `free` knows it is not inside
/// a realloc without looking up its thread's slot, and a malloc or calloc knows it is the
/// outermost call, so a uprobe session can carry it alone (see `alloc::enter_carried`). A
/// thread that dies inside such a call leaves it raised: everything then takes the slower,
/// equally exact path.
#[map]
pub static OUTER_CALLS: Array<u64> = Array::with_max_entries(1, 0);

/// Thread-cache predictions found wrong, all CPUs together: non-zero switches prediction
/// off everywhere (see `tcache`).
#[map]
pub static PREDICTION_WRONG: Array<u64> = Array::with_max_entries(1, 0);

/// Each CPU's count of thread-cache predictions, per predicted library (see `tcache`).
#[map]
pub static PREDICTIONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PREDICTION_LIBRARIES, 0);

#[map]
pub static SAMPLER: PerCpuArray<Sampler> = PerCpuArray::with_max_entries(1, 0);

/// Where a copied stack is assembled (`dwarf` stack mode): too big for the BPF stack, and a
/// fixed-size ring reservation would waste ring space on every shallow stack.
#[map]
pub static STACK_SCRATCH: PerCpuArray<StackCopy> = PerCpuArray::with_max_entries(1, 0);

/// Every traced module's unwind rows (see `tracer_common::unwind`), written by userspace
/// through the map's memory; sized at load.
#[map]
pub static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// How each traced process's stacks are captured, and where its code is (8 KiB each, so
/// allocated as processes are listed rather than up front).
#[map]
pub static PROCESS_MODULES: HashMap<u32, ProcessModules> =
    HashMap::with_max_entries(DEFAULT_TARGET_ENTRIES, BPF_F_NO_PREALLOC);

/// Every module file's table by identity: for code a process's list does not cover yet.
#[map]
pub static FILE_TABLES: HashMap<TableKey, FileTable> =
    HashMap::with_max_entries(FILE_TABLE_ENTRIES, 0);

/// Non-zero while a program on this CPU holds `STACK_SCRATCH` (see [`take_scratch`]).
#[map]
pub static SCRATCH_HELD: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The traced processes, each with the number of probe hits it took while counted
/// (`COUNT_TRAPS`).
#[map]
pub static TARGETS: HashMap<u32, u64> = HashMap::with_max_entries(DEFAULT_TARGET_ENTRIES, 0);

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
static STACK_FRAMES: u32 = MAX_STACK_DEPTH as u32;
#[unsafe(no_mangle)]
static SAMPLE_SEED: u64 = 0x9e37_79b9_7f4a_7c15;
#[unsafe(no_mangle)]
static RETURN_WALK: [u32; return_walk::LEN] = [0; return_walk::LEN];
#[unsafe(no_mangle)]
static TASK_FSBASE: u32 = 0;
#[unsafe(no_mangle)]
static PREDICTION_SKEW: u64 = 0;
#[unsafe(no_mangle)]
static FOLLOW_FORKS: u8 = 0;
#[unsafe(no_mangle)]
static TRACEPOINT_FIELDS: [u32; tracepoint_fields::LEN] = [0; tracepoint_fields::LEN];
#[unsafe(no_mangle)]
static FILE_WALK: [u32; file_walk::LEN] = [0; file_walk::LEN];
#[unsafe(no_mangle)]
static ADMISSION: Admission = Admission {
    on_exec: 0,
    comms: 0,
    excluded: 0,
    cgroups: 0,
    _pad: 0,
    comm: [[0; 16]; admission::MAX],
    exclude: [[0; 16]; admission::MAX],
    cgroup: [[0; 2]; admission::MAX],
};
#[unsafe(no_mangle)]
static COUNT_TRAPS: u8 = 0;
#[unsafe(no_mangle)]
static DEFAULT_WALK: u32 = walk::FRAME_POINTERS;

/// How the stacks of a process without an entry in `PROCESS_MODULES` are captured.
#[inline(always)]
pub fn default_walk() -> u32 {
    global(&DEFAULT_WALK)
}

/// The `system` filters (see `tracer_common::Admission`); read each field with
/// [`global_at`], so the loader's values are not constant-folded away.
#[inline(always)]
pub fn admission() -> *const Admission {
    &raw const ADMISSION
}

/// A field of a load-time global, read through a volatile pointer.
#[inline(always)]
pub fn global_at<T: Copy>(field: *const T) -> T {
    // SAFETY: `field` points into a static.
    unsafe { core::ptr::read_volatile(field) }
}

/// Offsets to files' identities (see `tracer_common::file_walk`).
#[inline(always)]
pub fn file_walk_offsets() -> [u32; file_walk::LEN] {
    global(&FILE_WALK)
}

/// Whether processes forked by traced ones are traced too.
#[inline(always)]
pub fn follow_forks() -> bool {
    global(&FOLLOW_FORKS) != 0
}

/// Offsets of the lifecycle tracepoints' fields (see `tracer_common::tracepoint_fields`).
#[inline(always)]
pub fn tracepoint_fields() -> [u32; tracepoint_fields::LEN] {
    global(&TRACEPOINT_FIELDS)
}

/// Starts tracing process `tgid` (a child of a traced one); false if the filter is full.
#[inline(always)]
pub fn add_target(tgid: u32) -> bool {
    TARGETS.insert(&tgid, &0, 0).is_ok()
}

/// Stops tracing process `tgid` (it ended).
#[inline(always)]
pub fn remove_target(tgid: u32) {
    let _ = TARGETS.remove(&tgid);
}

/// Added to every thread-cache prediction (0 but in tests of the check).
#[inline(always)]
pub fn prediction_skew() -> u64 {
    global(&PREDICTION_SKEW)
}

/// Offset of `task_struct.thread.fsbase`, or 0 when unknown.
#[inline(always)]
pub fn task_fsbase() -> u32 {
    global(&TASK_FSBASE)
}

/// Offsets to a thread's pending uprobe returns (see `tracer_common::return_walk`).
#[inline(always)]
pub fn return_walk_offsets() -> [u32; return_walk::LEN] {
    global(&RETURN_WALK)
}

/// Whether a uprobe session may carry a malloc in its cookie alone: only when a mapping
/// syscall made inside that malloc can still tell it is (see `mmap::inside_allocator`).
#[inline(always)]
pub fn carrying_allowed() -> bool {
    global(&RETURN_WALK)[return_walk::FOUND] != 0
}

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

/// Frames the frame-pointer walk records at most.
pub fn stack_frames() -> usize {
    (global(&STACK_FRAMES) as usize).min(MAX_STACK_DEPTH)
}

pub fn wakeup_bytes() -> u64 {
    global(&WAKEUP_BYTES)
}

/// [`is_traced`] for uprobes: free when each uprobe only fires in its traced process (not
/// even the pid is read then: every helper call costs tens of ns here).
#[inline(always)]
pub fn uprobe_traced() -> bool {
    if global(&UPROBES_SCOPED) != 0 {
        return true;
    }
    if global(&COUNT_TRAPS) == 0 {
        return is_traced(current_tgid());
    }
    let tgid = current_tgid();
    if tgid == global(&SELF_TGID) {
        count(Counter::UntracedTraps);
        count(Counter::SelfTraps);
        return false;
    }
    if let Some(hits) = TARGETS.get_ptr_mut(&tgid) {
        // SAFETY: a map value; concurrent hits of one process's threads add atomically.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(hits, 1) };
        return true;
    }
    count(Counter::UntracedTraps);
    false
}

#[inline(always)]
pub fn current_tgid() -> u32 {
    (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32
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

/// Adds `delta` to a one-slot counter shared by all CPUs (`u64::MAX` is a wrapping -1).
#[inline(always)]
pub fn shared_add(counter: &Array<u64>, delta: u64) {
    if let Some(slot) = counter.get_ptr_mut(0) {
        // SAFETY: an aligned array slot shared by all CPUs, updated with the BPF atomic add.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, delta) };
    }
}

/// Whether a one-slot shared counter is non-zero (true if it cannot be read: the safe side).
#[inline(always)]
pub fn shared_nonzero(counter: &Array<u64>) -> bool {
    // SAFETY: an aligned array slot, only read.
    counter
        .get_ptr(0)
        .is_none_or(|slot| unsafe { core::ptr::read_volatile(slot) } != 0)
}

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: this CPU's aligned slot. Added atomically: on a fully preemptible kernel
        // a uprobe program can be preempted (never migrated) by another that counts too.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, 1) };
    }
}

/// This CPU's stack scratch, unless a program this one preempted holds it.
///
/// Uprobe programs run with migration, not preemption, disabled: on a kernel booted with
/// `preempt=full` or `lazy` another task can run a program on this CPU between our reads
/// and writes of the per-CPU buffer. The exchange makes holding it exclusive; every
/// [`take_scratch`] that succeeds is paired with [`release_scratch`].
#[inline(always)]
pub fn take_scratch() -> Option<*mut StackCopy> {
    let held = SCRATCH_HELD.get_ptr_mut(0)?;
    // SAFETY: this CPU's aligned slot, exchanged atomically.
    if unsafe { atomic_xchg::<u64, { AtomicOrdering::Relaxed }>(held, 1) } != 0 {
        count(Counter::ScratchBusy);
        return None;
    }
    STACK_SCRATCH.get_ptr_mut(0).or_else(|| {
        release_scratch();
        None
    })
}

#[inline(always)]
pub fn release_scratch() {
    if let Some(held) = SCRATCH_HELD.get_ptr_mut(0) {
        // SAFETY: this CPU's slot, held by this program.
        unsafe { core::ptr::write_volatile(held, 0) };
    }
}

/// `CLOCK_MONOTONIC` in ns, the clock userspace converts event times from.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: the helper takes no arguments and cannot fail.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() }
}
