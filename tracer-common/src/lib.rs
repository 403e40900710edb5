//! The wire contract between alloctrace's eBPF programs and its userspace collector.
//!
//! This crate owns only layouts and names: `#[repr(C)]` records with explicit padding and
//! compile-time size checks, the names of maps and globals userspace configures before load,
//! and the counter slots the kernel side increments when it loses something. It holds no
//! logic, so kernel and userspace can never disagree about what a byte means.
#![no_std]

/// Names of the maps userspace opens or resizes before load.
pub mod maps {
    /// `BPF_MAP_TYPE_RINGBUF` carrying [`super::Event`] records.
    pub const EVENTS: &str = "EVENTS";
    /// The event rings, one per CPU modulo [`super::EVENT_RINGS`]; the first is `EVENTS`.
    pub const EVENT_RINGS: [&str; super::EVENT_RINGS] =
        [EVENTS, "EVENTS_1", "EVENTS_2", "EVENTS_3"];
    /// Per-CPU loss and diagnostic counters, indexed by [`super::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// Non-zero switches thread-cache prediction off (a check found it wrong, or userspace
    /// saw a predicted block contradicted).
    pub const PREDICTION_WRONG: &str = "PREDICTION_WRONG";
    /// Processes to trace (tgid → 1) when [`super::globals::FILTER_TGIDS`] is set.
    pub const TARGETS: &str = "TARGETS";
    /// With byte sampling: the sampled blocks still live, so a free of any other block costs
    /// one map miss and no event.
    pub const SAMPLED: &str = "SAMPLED";
    /// Per-CPU scratch where a copied user stack is assembled before it is written out.
    pub const STACK_SCRATCH: &str = "STACK_SCRATCH";
    /// Every traced module's unwind rows (`unwind::UnwindRow`), memory-mapped by userspace.
    pub const UNWIND_ROWS: &str = "UNWIND_ROWS";
    /// tgid → `unwind::ProcessModules`.
    pub const PROCESS_MODULES: &str = "PROCESS_MODULES";
    /// `unwind::TableKey` → `unwind::FileTable`: every module file's table, by identity.
    pub const FILE_TABLES: &str = "FILE_TABLES";
}

/// Names of the read-only globals userspace sets before load (`EbpfLoader::override_global`).
pub mod globals {
    /// The collector's own tgid: never traced, whatever the filter says.
    pub const SELF_TGID: &str = "SELF_TGID";
    /// Non-zero: only tgids present in the `TARGETS` map are traced.
    pub const FILTER_TGIDS: &str = "FILTER_TGIDS";
    /// Wake the reader each time this many unread bytes accumulate (a power of two).
    pub const WAKEUP_BYTES: &str = "WAKEUP_BYTES";
    /// Non-zero: uprobes are attached per traced process, so they need no filter lookup.
    pub const UPROBES_SCOPED: &str = "UPROBES_SCOPED";
    /// Mean bytes between samples (Poisson byte sampling); 0 traces every call.
    pub const SAMPLE_BYTES: &str = "SAMPLE_BYTES";
    /// Seed of the sampler's per-CPU random generators (tests fix it).
    pub const SAMPLE_SEED: &str = "SAMPLE_SEED";
    /// Bytes of user stack copied per event by the `dwarf` stack programs (at most
    /// [`super::STACK_COPY_MAX`]).
    pub const STACK_COPY_BYTES: &str = "STACK_COPY_BYTES";
    /// Frames the frame-pointer walk records at most (`--stack-depth` + 1, so userspace can
    /// tell a cut stack; at most [`super::MAX_STACK_DEPTH`]).
    pub const STACK_FRAMES: &str = "STACK_FRAMES";
    /// `[u32; return_walk::LEN]`: where the kernel keeps a thread's pending uprobe returns,
    /// from its BTF (see [`super::return_walk`]); all zero where they could not be found.
    pub const RETURN_WALK: &str = "RETURN_WALK";
    /// `u32`: byte offset of the user thread pointer (`task_struct.thread.fsbase`), where
    /// glibc's thread-local variables are found; 0 when unknown (no tcache prediction).
    pub const TASK_FSBASE: &str = "TASK_FSBASE";
    /// `u64` added to every thread-cache prediction: 0, except to test that wrong
    /// predictions are caught.
    pub const PREDICTION_SKEW: &str = "PREDICTION_SKEW";
    /// `u8`, non-zero: a process forked by a traced one is traced too, from its first
    /// instruction (its pid goes into `TARGETS` in the kernel, at the fork).
    pub const FOLLOW_FORKS: &str = "FOLLOW_FORKS";
    /// `[u32; tracepoint_fields::LEN]`: byte offsets of the lifecycle tracepoints' fields,
    /// read from tracefs (they differ between kernels).
    pub const TRACEPOINT_FIELDS: &str = "TRACEPOINT_FIELDS";
    /// `[u32; file_walk::LEN]`: see [`crate::file_walk`].
    pub const FILE_WALK: &str = "FILE_WALK";
    /// [`crate::Admission`].
    pub const ADMISSION: &str = "ADMISSION";
    /// `u8`: count every probe hit per traced process (in `TARGETS`), and the others
    /// (`Counter::UntracedTraps`): what tracing costs each process.
    pub const COUNT_TRAPS: &str = "COUNT_TRAPS";
    /// `u32`: how processes without a `PROCESS_MODULES` entry have their stacks captured
    /// (`unwind::walk`).
    pub const DEFAULT_WALK: &str = "DEFAULT_WALK";
}

/// Slots of the `FILE_WALK` global: offsets (from the kernel's BTF) that lead from the
/// current task to a file's identity — its mapped executable, and a file descriptor's file —
/// and to the program's auxiliary vector.
pub mod file_walk {
    /// Non-zero when every offset below was found.
    pub const FOUND: usize = 0;
    pub const TASK_MM: usize = 1;
    pub const MM_EXE_FILE: usize = 2;
    pub const MM_SAVED_AUXV: usize = 3;
    pub const TASK_FILES: usize = 4;
    pub const FILES_FDT: usize = 5;
    pub const FDT_MAX_FDS: usize = 6;
    pub const FDT_FD: usize = 7;
    pub const FILE_INODE: usize = 8;
    pub const INODE_INO: usize = 9;
    pub const INODE_SB: usize = 10;
    pub const SB_DEV: usize = 11;
    /// `vm_area_struct`'s start, file page offset and file: a code address's module.
    pub const VMA_START: usize = 12;
    pub const VMA_PGOFF: usize = 13;
    pub const VMA_FILE: usize = 14;
    pub const LEN: usize = 15;
    /// Auxiliary vector entries read at most (the kernel keeps about 25).
    pub const AUXV_PAIRS: usize = 32;
    pub const AT_NULL: u64 = 0;
    pub const AT_PHDR: u64 = 3;
    pub const AT_BASE: u64 = 7;
}

/// Slots of the `TRACEPOINT_FIELDS` global.
pub mod tracepoint_fields {
    /// Non-zero when the offsets below were read.
    pub const FOUND: usize = 0;
    /// `task_newtask`: the new task's pid, and its `clone_flags` (a thread shares its
    /// creator's thread group: `CLONE_THREAD`).
    pub const NEWTASK_PID: usize = 1;
    pub const NEWTASK_FLAGS: usize = 2;
    /// `sched_process_exit`: whether the exiting task was its thread group's last
    /// (`group_dead`); 0 where the kernel does not say (then the leader's exit counts).
    pub const EXIT_GROUP_DEAD: usize = 3;
    /// `sched_process_exec`: where its `__data_loc` file name field is.
    pub const EXEC_FILENAME: usize = 4;
    /// `signal_deliver`: the handler the signal runs (0 and 1: `SIG_DFL`, `SIG_IGN`).
    pub const SIGNAL_HANDLER: usize = 5;
    pub const LEN: usize = 6;
    /// `CLONE_THREAD`.
    pub const CLONE_THREAD: u64 = 0x0001_0000;
}

/// The attach cookie of a probed allocator function: which function it is, which allocator
/// it belongs to, and for glibc's `malloc`, where its thread cache is found (see [`tcache`]).
pub mod attach_cookie {
    /// Low 16 bits: the function's [`super::EventKind`] (for session programs).
    pub const KIND_MASK: u64 = 0xffff;
    /// Bits 16–23: the allocator family ([`super::allocator`]) events of this probe carry.
    pub const ALLOCATOR_SHIFT: u32 = 16;
    /// Bit 24: the function may call another probed function (an allocator other than
    /// glibc's, a C++ `operator new`): its calls are recorded in the thread's slot, where a
    /// nested call is recognised, never carried in a session cookie alone.
    pub const MAY_NEST: u64 = 1 << 24;
    /// Bits 25–31: which predicted library this is (one per attached glibc file, below
    /// [`super::PREDICTION_LIBRARIES`]): each keeps its own check budget, so a library whose
    /// cache would be misread is checked from its first prediction, whatever others did.
    pub const LIBRARY_SHIFT: u32 = 25;
    pub const LIBRARY_MASK: u64 = 0x7f;
    /// High 32 bits (signed): the distance from `malloc`'s first instruction to the GOT slot
    /// holding the thread pointer offset of glibc's `tcache` variable; 0 for none.
    pub const TCACHE_GOT_SHIFT: u32 = 32;

    /// The allocator family of a cookie.
    pub const fn allocator(cookie: u64) -> u8 {
        (cookie >> ALLOCATOR_SHIFT) as u8
    }

    /// The predicted library of a cookie (see [`LIBRARY_SHIFT`]).
    pub const fn library(cookie: u64) -> u32 {
        ((cookie >> LIBRARY_SHIFT) & LIBRARY_MASK) as u32
    }
}

/// Allocator families, as events carry them (the high byte of [`super::Event::kind`]): a
/// block is attributed to the allocator that made it, and a free matched to its own.
pub mod allocator {
    /// Not known (perf-event uprobes carry no cookie).
    pub const UNKNOWN: u8 = 0;
    pub const GLIBC: u8 = 1;
    pub const JEMALLOC: u8 = 2;
    pub const TCMALLOC: u8 = 3;
    pub const MIMALLOC: u8 = 4;
    /// A C library's malloc compiled into the executable (musl, a static glibc, or another).
    pub const LIBC: u8 = 5;
}

/// An event's kind and allocator, packed into its 16-bit `kind` field.
pub const fn pack_kind(kind: EventKind, allocator: u8) -> u16 {
    kind as u16 | (allocator as u16) << 8
}

/// The allocator family of a packed kind.
pub const fn allocator_of(packed: u16) -> u8 {
    (packed >> 8) as u8
}

/// glibc's per-thread cache (2.34 to 2.41 on x86-64): `struct tcache_perthread_struct
/// { uint16_t counts[64]; tcache_entry *entries[64]; }`. A malloc of at most
/// [`tcache::MAX_REQUEST`] bytes whose size class has a cached block returns exactly
/// `entries[class]`, with no lock and no system call: the eBPF side reads it at the call and
/// spares the return trap (it checks itself against the real return now and then).
pub mod tcache {
    pub const BINS: u64 = 64;
    /// Byte offset of `entries` in the struct.
    pub const ENTRIES_OFFSET: u64 = 2 * BINS;
    /// The largest request the default 64 bins serve.
    pub const MAX_REQUEST: u64 = 1032;

    /// glibc's `csize2tidx (request2size (bytes))` for `bytes <= MAX_REQUEST`.
    pub const fn bin_of(bytes: u64) -> u64 {
        let chunk = (bytes + 8 + 15) & !15;
        if chunk < 32 { 0 } else { (chunk - 17) >> 4 }
    }
}

/// Slots of the `RETURN_WALK` global: byte offsets in the running kernel's structures, so a
/// mapping syscall can find the uprobe sessions its thread is inside (`task_struct.utask`,
/// `uprobe_task.return_instances`, then each `return_instance`'s fields).
pub mod return_walk {
    /// Non-zero when every offset below was found.
    pub const FOUND: usize = 0;
    pub const TASK_UTASK: usize = 1;
    pub const UTASK_RETURNS: usize = 2;
    pub const RETURN_NEXT: usize = 3;
    pub const RETURN_CONSUMER_COUNT: usize = 4;
    /// `return_instance.consumer.cookie`: the first consumer's cookie, held inline.
    pub const RETURN_FIRST_COOKIE: usize = 5;
    /// `return_instance.extra_consumers`: a pointer to the other consumers.
    pub const RETURN_EXTRA: usize = 6;
    pub const CONSUMER_SIZE: usize = 7;
    pub const CONSUMER_COOKIE: usize = 8;
    pub const LEN: usize = 9;
}

/// The helper number the eBPF side calls in place of the `bpf_session_cookie` kfunc, which
/// the loader rewrites into the real kfunc call (found in the kernel's BTF) before loading.
/// Not a helper any kernel has, so an unpatched program fails the verifier instead of
/// running something else.
pub const SESSION_COOKIE_CALL: u32 = 0x7ffe_0001;

/// Ring buffers events are spread over by CPU (see `maps::EVENT_RINGS`).
pub const EVENT_RINGS: usize = 4;

/// Default size of each per-CPU ring. Walked stacks keep events at 80 B each (≈ 1.5 MB in the
/// collector's 20 ms between timer drains at one CPU's highest rate); only `dwarf-copy`
/// events carry kilobytes of stack, and want `--ring-buffer` raised.
pub const DEFAULT_RING_BYTES: u32 = 4 << 20;
/// Slots of the kernel's direct-mapped "frames already sent" table (a power of two). A stack
/// whose slot was taken over by another is simply sent again.
pub const KNOWN_STACK_SLOTS: u32 = 16 << 10;
/// Default number of processes the `TARGETS` filter can hold.
pub const DEFAULT_TARGET_ENTRIES: u32 = 4096;
/// Deepest user stack recorded (as the kernel's `PERF_MAX_STACK_DEPTH`).
pub const MAX_STACK_DEPTH: usize = 127;

/// What an [`Event`] reports. The allocator kinds say which function returned the block, so
/// userspace can apply each one's semantics (realloc moves, posix_memalign's out pointer).
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Malloc = 1,
    Calloc = 2,
    Realloc = 3,
    ReallocArray = 4,
    PosixMemalign = 5,
    AlignedAlloc = 6,
    Valloc = 7,
    Pvalloc = 8,
    Free = 9,
    /// `mmap` returned `addr` for `size` bytes; `aux` = prot << 32 | flags; `old_addr` = fd.
    Mmap = 10,
    /// `munmap(addr, size)`, emitted at entry (before the range can be reused).
    Munmap = 11,
    /// `mremap(old_addr, aux = old size, size)` returned `addr`.
    Mremap = 12,
    /// `brk` set the program break to `addr` (`aux` = the requested break).
    Brk = 13,
    /// libc's `mmap` returned `addr` to the program (not the allocator): the stack is the
    /// mapping's call site.
    MapCaller = 14,
    /// A traced process forked: `addr` is the child's tgid (a new process, not a thread).
    Fork = 15,
    /// A traced process replaced its program (`execve`). Where the kernel's structures are
    /// known ([`file_walk`]): `addr` = the new program's `AT_PHDR` (where its program headers
    /// are mapped, which gives its load address), `size` = `AT_BASE` (its interpreter's load
    /// address), `old_addr` = the executable's inode, `aux` = its device (kernel encoding).
    Exec = 16,
    /// A traced process ended (its last thread exited).
    Exit = 17,
    /// A traced process mapped a file executable: `addr`/`size` the mapping, `old_addr` the
    /// file's inode, `aux` = device (kernel encoding) << 32 | file offset in pages. With the
    /// `Exec` layout, this lets stacks be symbolized after the process is gone.
    MapFile = 18,
}

impl EventKind {
    /// Decodes the wire value (its low byte; the high byte is the allocator); `None` for kinds
    /// this build does not know.
    pub const fn from_raw(raw: u16) -> Option<Self> {
        Some(match raw & 0xff {
            1 => Self::Malloc,
            2 => Self::Calloc,
            3 => Self::Realloc,
            4 => Self::ReallocArray,
            5 => Self::PosixMemalign,
            6 => Self::AlignedAlloc,
            7 => Self::Valloc,
            8 => Self::Pvalloc,
            9 => Self::Free,
            10 => Self::Mmap,
            11 => Self::Munmap,
            12 => Self::Mremap,
            13 => Self::Brk,
            14 => Self::MapCaller,
            15 => Self::Fork,
            16 => Self::Exec,
            17 => Self::Exit,
            18 => Self::MapFile,
            _ => return None,
        })
    }

    /// Kinds whose call takes an existing block and may move, grow, shrink or free it.
    pub const fn is_realloc(self) -> bool {
        matches!(self, Self::Realloc | Self::ReallocArray)
    }
}

/// Bits of [`Event::flags`].
pub mod flags {
    /// The frame-pointer stack's instruction pointers (u64 each, innermost first,
    /// `payload_len` bytes) follow the record: the first time the kernel sends the stack
    /// [`super::Event::stack`] names, so userspace can remember it under that hash.
    pub const STACK_INLINE: u16 = 1 << 0;
    /// The requested size overflowed (`calloc`, `reallocarray`): the call cannot succeed.
    pub const SIZE_OVERFLOW: u16 = 1 << 1;
    /// A mapping call made from inside an allocator call on the same thread: the mapping
    /// belongs to the allocator (arenas, large chunks), not to the program.
    pub const INSIDE_ALLOCATOR: u16 = 1 << 2;
    /// The block was chosen by byte sampling: it stands for 1/p blocks of its size, where
    /// p = 1 - exp(-size / sample_bytes).
    pub const SAMPLED: u16 = 1 << 3;
    /// The record carries [`super::StackRegs`] and a copy of the user stack from `sp` up
    /// (`payload_len` bytes in all) for unwinding in userspace with the modules' CFI.
    pub const STACK_COPY: u16 = 1 << 4;
    /// A sampled block the kernel could not remember (its sampled-block map was full): its
    /// free will not be reported, so userspace counts it in the totals but never as live.
    pub const UNTRACKED: u16 = 1 << 5;
    /// An `Exec` event followed by the file name the program was started by
    /// ([`super::EXEC_NAME_BYTES`], NUL-terminated), so the collector can open it even if the
    /// process is gone before it looks.
    pub const FILE_NAME: u16 = 1 << 6;
    /// The block was predicted from glibc's thread cache at the malloc's entry (its return
    /// was not trapped). Userspace holds it to a stricter standard: a predicted block found
    /// on an address still live contradicts the prediction, and switches prediction off.
    pub const PREDICTED: u16 = 1 << 7;
    /// Kernel-internal, never in an emitted event: the call's thread-cache prediction (in
    /// [`super::InFlight::aux`]) is checked against its return.
    pub const CHECK_PREDICTION: u16 = 1 << 13;
    /// Kernel-internal, never in an emitted event: the call may call other probed functions
    /// (see `attach_cookie::MAY_NEST`), so it is counted among the calls that may nest.
    pub const MAY_NEST: u16 = 1 << 14;
    /// Kernel-internal, never in an emitted event: the block a realloc was given is a live
    /// sampled one, so its end must be reported at the return.
    pub const OLD_SAMPLED: u16 = 1 << 15;
}

/// Bytes of an `Exec` event's file name (the path given to `execve`, as far as it fits).
pub const EXEC_NAME_BYTES: usize = 256;

/// An `Exec` event with the file name it carries.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecRecord {
    pub event: Event,
    pub name: [u8; EXEC_NAME_BYTES],
}

/// Value of [`Event::stack`] for events that carry no stack (frees, lost stacks).
pub const NO_STACK: u64 = 0;

/// One fact observed in the kernel, written to the ring buffer.
///
/// Allocation events are emitted at the allocator's return (the address is known and the
/// caller is frame 0 of the user stack); frees at entry, before the block can be reused, so the
/// ring's order is a valid order of every address's lifecycle. Extra bytes announced by
/// `payload_len` (inline stacks today, copied stack memory for DWARF unwinding later) follow
/// the fixed part in the same record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `CLOCK_MONOTONIC` ns when the event was recorded (allocator return, or free entry).
    pub ts_ns: u64,
    /// `CLOCK_MONOTONIC` ns at the allocator call's entry: orders a realloc's implicit free
    /// against blocks other threads got in the meantime.
    pub start_ns: u64,
    /// Block returned (allocations), or block freed (`Free`).
    pub addr: u64,
    /// Requested size in bytes (already multiplied for calloc/reallocarray).
    pub size: u64,
    /// The block passed in to realloc/reallocarray (0 for none).
    pub old_addr: u64,
    /// Kind-specific extra argument (alignment for the memalign family).
    pub aux: u64,
    pub tgid: u32,
    pub tid: u32,
    /// An [`EventKind`] value.
    pub kind: u16,
    /// Bits from [`flags`].
    pub flags: u16,
    /// Bytes following this record in the same ring-buffer entry.
    pub payload_len: u32,
    /// The kernel's 64-bit hash of the frame-pointer stack's instruction pointers, or
    /// [`NO_STACK`]. The frames travel once per hash ([`flags::STACK_INLINE`]); later events
    /// carry only the hash.
    pub stack: u64,
}

const _: () = assert!(core::mem::size_of::<Event>() == 72);
const _: () = assert!(core::mem::align_of::<Event>() == 8);

/// Largest user-stack copy one event can carry.
pub const STACK_COPY_MAX: usize = 16 << 10;
/// Default user-stack copy: enough for 64+ frames of typical C, C++ and Rust code.
pub const DEFAULT_STACK_COPY: u32 = 8 << 10;
/// The copy is read page by page (a read that crosses into an unmapped page fails whole),
/// so the scratch buffer has room for one more page than the copy limit.
pub const STACK_COPY_PAGE: usize = 4096;

/// The caller's registers at the allocator's return: where unwinding starts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackRegs {
    /// The return address into the allocator's caller.
    pub ip: u64,
    /// The caller's stack pointer (the first copied byte is at this address).
    pub sp: u64,
    pub bp: u64,
}

const _: () = assert!(core::mem::size_of::<StackRegs>() == 24);

/// Per-CPU scratch record where a stack is assembled after its event: a copied stack
/// (`regs` then `bytes`), or frame-pointer frames (u64s from `regs` on). Written out as one
/// ring-buffer record of `size_of::<Event>() + event.payload_len` bytes.
#[repr(C)]
pub struct StackCopy {
    pub event: Event,
    pub regs: StackRegs,
    pub bytes: [u8; STACK_COPY_MAX + STACK_COPY_PAGE],
}

/// A thread's allocator call between entry and return.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct InFlight {
    pub start_ns: u64,
    pub size: u64,
    pub old_addr: u64,
    /// `posix_memalign`'s `memptr`: where the result is written.
    pub out_ptr: u64,
    pub aux: u64,
    pub kind: u16,
    pub flags: u16,
    /// Tail calls made by this call into other probed functions (`reallocarray` into
    /// `realloc`): their returns come through this call's frame first, and are skipped.
    pub depth: u16,
    /// Signal handlers running on the thread that interrupted this call (delivered while it
    /// was in flight, not yet returned with `rt_sigreturn`): a probe hit meanwhile is the
    /// handler's own call, never one nested in this.
    pub signals: u16,
    /// The stack pointer at the outermost entry (pointing at its return address). A later
    /// entry from higher up the stack proves this call's return was never seen.
    pub entry_sp: u64,
    /// While the call is between entry and return: `jiffies64` at its entry plus one (never
    /// zero, and cheap to read, unlike the ns clock); zero when the thread's slot is idle.
    pub active: u64,
}

const _: () = assert!(core::mem::size_of::<InFlight>() == 64);

/// Slots of the per-CPU `COUNTERS` array. Everything lost has a slot, so the report can say
/// exactly how much it is missing and what to raise.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Events not written because the ring buffer was full (raise `--ring-buffer`).
    RingFull = 0,
    /// Allocator calls not recorded because the thread's in-flight slot could not be had
    /// (task storage allocation failed, or was busy on this CPU): the allocation is lost.
    InflightFull = 1,
    /// Allocator returns whose thread had an idle slot: the entry was never recorded, so the
    /// allocation is lost. (A thread with no slot at all already counted `InflightFull`.)
    ReturnWithoutEntry = 2,
    /// `posix_memalign` succeeded but its result could not be read from user memory.
    OutPtrUnreadable = 3,
    /// Stacks that could not be captured at all (the event is kept, its site is unknown).
    StackLost = 4,
    /// Stacks sent with their frames: first sightings, and stacks whose slot in the
    /// "already sent" table another stack took over (diagnostic, nothing lost).
    StackInline = 5,
    /// Nested allocator entries folded into their outer call (diagnostic, nothing lost).
    Nested = 6,
    /// Frees issued from inside another allocator call, folded into it (nothing lost).
    NestedFree = 7,
    /// Mapping syscalls of traced threads whose entry could not be recorded (the thread's
    /// syscall slot could not be had): their result is lost.
    SyscallsFull = 8,
    /// Sampled blocks not remembered because the sampled-block map was full: their frees
    /// will not be seen, so they are reported untracked (in totals, never live).
    SampledFull = 9,
    /// Allocator calls whose return never reached the tracer (found stale at the thread's
    /// next entry): their results are lost.
    ReturnMissed = 10,
    /// Mallocs served from glibc's thread cache, recorded at their entry from the block the
    /// cache was about to hand out: their return trap was skipped (diagnostic).
    Predicted = 11,
    /// Predictions checked against the call's real return (the first ones on each CPU,
    /// then one in [`PREDICTION_CHECK_EVERY`]).
    PredictionChecked = 12,
    /// Checked predictions that were wrong: prediction is then switched off everywhere.
    PredictionWrong = 13,
    /// Of `RingFull`: events of allocations (malloc family, reallocs) lost.
    RingFullAllocation = 14,
    /// Of `RingFull`: events of frees lost.
    RingFullFree = 15,
    /// Probe hits in processes not traced (`system` with filters, or the collector itself):
    /// each one a trap and a filter lookup, nothing more.
    UntracedTraps = 16,
    /// Of those, hits in the collector itself (its own allocations, where its C library is
    /// probed): what one filtered-out hit costs is measured on them.
    SelfTraps = 17,
    /// Allocator calls and frees made by a signal handler that interrupted a recorded call
    /// (a realloc, a memalign) on the same thread: recorded on their own, not folded into
    /// the interrupted call (diagnostic, nothing lost).
    HandlerCalls = 18,
    /// Of those, calls that could not be recorded (only the thread's one slot could have
    /// held them, and the interrupted call holds it): the allocation is lost.
    HandlerCallsLost = 19,
    /// Copied stacks not taken because this CPU's copy buffer was in use by a program this
    /// one preempted (fully preemptible kernels only): the event is kept without its stack.
    ScratchBusy = 20,
    /// Walks that met code no unwind table covers (a library loaded since the process's
    /// modules were listed, JIT code): the stack was copied for userspace instead.
    WalkNeedsCopy = 21,
    /// Stack copies not taken because the ring was already half full: the event is kept,
    /// without its stack, rather than risk losing events to kilobytes of copy.
    StackShed = 22,
}

/// Number of counter slots.
pub const COUNTER_SLOTS: u32 = 23;

/// Predicted libraries with a check budget of their own (see `attach_cookie::LIBRARY_SHIFT`);
/// libraries past these are not predicted.
pub const PREDICTION_LIBRARIES: u32 = 128;

/// Which processes `system` starts tracing when they `exec` (`ADMISSION` global): the
/// filters of the command line, applied in the kernel so a filtered-out process costs its
/// traps and nothing else.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Admission {
    /// Non-zero: a process that execs is traced when it passes the filters (and stops being
    /// traced when it no longer does).
    pub on_exec: u8,
    pub comms: u8,
    pub excluded: u8,
    pub cgroups: u8,
    pub _pad: u32,
    /// `--comm` names (NUL-padded, as the kernel's 16-byte `comm`); any one admits.
    pub comm: [[u8; 16]; admission::MAX],
    /// `--exclude-comm` names; any one refuses.
    pub exclude: [[u8; 16]; admission::MAX],
    /// `--cgroup`: (cgroup id, its level in the hierarchy); a process in it or below it is
    /// admitted.
    pub cgroup: [[u64; 2]; admission::MAX],
}

pub mod admission {
    /// Names and cgroups each filter holds at most.
    pub const MAX: usize = 8;
}

impl EventKind {
    /// Kinds that report a block the allocator returned (realloc's included).
    pub const fn is_allocation(self) -> bool {
        (self as u16) <= (Self::Pvalloc as u16)
    }
}

/// Each CPU checks its first this many thread-cache predictions against the real return...
pub const PREDICTION_CHECK_FIRST: u64 = 1024;
/// ...and one in this many after that (a power of two).
pub const PREDICTION_CHECK_EVERY: u64 = 256;

/// Default number of sampled blocks that can be live at once.
pub const DEFAULT_SAMPLED_ENTRIES: u32 = 1 << 20;
/// Slots of the sampled-block counting filter (a power of two). Small on purpose: 32 KiB of
/// counters stays in cache under an allocation-heavy program, where 256 KiB made a free of a
/// random address cost a cache miss (free program 120 → 212 ns). Past ≈ 8 K live sampled
/// blocks (≈ 4 GiB live at 512 KiB sampling) it fills up, and frees fall back to the hash.
pub const SAMPLED_FILTER_SLOTS: u32 = 1 << 13;

/// Key of the sampled-block map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockKey {
    pub addr: u64,
    pub tgid: u32,
    pub _pad: u32,
}

/// Per-CPU state of the byte sampler.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Sampler {
    /// Bytes still to allocate on this CPU before the next sample.
    pub remaining: u64,
    /// xorshift64* state; 0 until first used.
    pub rng: u64,
}

/// Tracepoint names (category, event) the collector attaches, and their programs.
pub const TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("syscalls", "sys_enter_mmap", "sys_enter_mmap"),
    ("syscalls", "sys_exit_mmap", "sys_exit_mmap"),
    ("syscalls", "sys_enter_munmap", "sys_enter_munmap"),
    ("syscalls", "sys_enter_mremap", "sys_enter_mremap"),
    ("syscalls", "sys_exit_mremap", "sys_exit_mremap"),
    ("syscalls", "sys_enter_brk", "sys_enter_brk"),
    ("syscalls", "sys_exit_brk", "sys_exit_brk"),
    ("sched", "sched_process_exec", "process_exec"),
    ("task", "task_newtask", "task_newtask"),
    ("sched", "sched_process_exit", "process_exit"),
    ("signal", "signal_deliver", "signal_deliver"),
    (
        "syscalls",
        "sys_enter_rt_sigreturn",
        "sys_enter_rt_sigreturn",
    ),
];

pub mod unwind;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::InFlight {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BlockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Sampler {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Admission {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::unwind::UnwindRow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::unwind::ProcessModules {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::unwind::TableKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::unwind::FileTable {}
}
