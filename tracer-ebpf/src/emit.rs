//! Writing records to the ring buffer, with the stack and the batched wake-up policy.
//!
//! Records are submitted with `BPF_RB_NO_WAKEUP`: waking the reader per record costs
//! microseconds in a VM. The producer that makes the unread backlog cross a multiple of
//! `WAKEUP_BYTES` wakes it instead, and the reader also drains on a short timer.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE},
    helpers::{
        bpf_probe_read_kernel_str_bytes,
        generated::{bpf_get_smp_processor_id, bpf_probe_read_user},
    },
    maps::RingBuf,
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::{
    Counter, EVENT_RINGS, EXEC_NAME_BYTES, Event, EventKind, ExecRecord, InFlight,
    KNOWN_STACK_SLOTS, MAX_STACK_DEPTH, NO_STACK, STACK_COPY_MAX, STACK_COPY_PAGE, StackCopy,
    StackRegs, flags,
    unwind::{ProcessModules, TRUNCATED_FRAME, walk as unwind_walk},
};

use crate::{
    maps::{
        EVENTS, EVENTS_1, EVENTS_2, EVENTS_3, KNOWN_STACKS, PROCESS_MODULES, STACK_SCRATCH, count,
        default_walk, now_ns, release_scratch, stack_copy_bytes, stack_frames, take_scratch,
        wakeup_bytes,
    },
    unwind,
};

/// Ring-buffer records are 8-byte aligned with an 8-byte header.
const RECORD_BYTES: u64 = (size_of::<Event>() + 8) as u64;

/// Wakes the reader when adding `record` bytes made the `unread` total cross a multiple of
/// `WAKEUP_BYTES`: exactly one producer per boundary does.
#[inline(always)]
fn wake_flags(unread: u64, record: u64) -> u64 {
    if unread & (wakeup_bytes() - 1) < record {
        BPF_RB_FORCE_WAKEUP.into()
    } else {
        BPF_RB_NO_WAKEUP.into()
    }
}

/// Runs `$body` with `$ring` bound to this CPU's ring buffer (a `match`, as every helper
/// call needs its map as a constant).
macro_rules! with_cpu_ring {
    ($ring:ident => $body:expr) => {{
        // SAFETY: the helper takes no arguments and cannot fail.
        let cpu = unsafe { bpf_get_smp_processor_id() };
        match cpu as usize % EVENT_RINGS {
            0 => {
                let $ring = &EVENTS;
                $body
            }
            1 => {
                let $ring = &EVENTS_1;
                $body
            }
            2 => {
                let $ring = &EVENTS_2;
                $body
            }
            _ => {
                let $ring = &EVENTS_3;
                $body
            }
        }
    }};
}

/// Flags for a record reserved in `ring` (already counted in its unread data).
#[inline(always)]
fn submit_flags(ring: &RingBuf) -> u64 {
    wake_flags(ring.query(BPF_RB_AVAIL_DATA.into()), RECORD_BYTES)
}

/// The event for a call that completed with result `addr`, from its recorded entry. Its
/// timestamp is taken when it is written (see [`with_stack`] for why not here).
#[inline(always)]
pub fn completed(call: &InFlight, pid_tgid: u64, addr: u64) -> Event {
    Event {
        ts_ns: 0,
        start_ns: call.start_ns,
        addr,
        size: call.size,
        old_addr: call.old_addr,
        aux: call.aux,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        kind: call.kind,
        flags: call.flags & !flags::CHECK_PREDICTION,
        ..Event::default()
    }
}

/// The event of an instant (a free, an unmap, a mapping's caller, a fork): no separate entry
/// time. `kind` is packed with its allocator (`tracer_common::pack_kind`) where it has one.
#[inline(always)]
pub fn instant(kind: u16, pid_tgid: u64, addr: u64, size: u64, flags: u16) -> Event {
    let now = now_ns();
    Event {
        ts_ns: now,
        start_ns: now,
        addr,
        size,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        kind,
        flags,
        ..Event::default()
    }
}

/// Writes a process lifecycle event (fork, exec, exit) and wakes the reader at once: the
/// collector must attach a new process's probes, or read its mappings, while it can.
#[inline(always)]
pub fn lifecycle(event: Event) {
    let kind = event.kind;
    with_cpu_ring!(ring => match ring.reserve::<Event>(0) {
        Some(mut slot) => {
            slot.write(event);
            slot.submit(BPF_RB_FORCE_WAKEUP.into());
        }
        None => lost(kind),
    })
}

/// Writes an `Exec` event with the program's file name read from kernel memory at `name`
/// (the tracepoint's record), waking the reader at once.
#[inline(always)]
pub fn exec(mut event: Event, name: Option<u64>) {
    let kind = event.kind;
    with_cpu_ring!(ring => match ring.reserve::<ExecRecord>(0) {
        Some(mut slot) => {
            let record = slot.as_mut_ptr();
            // SAFETY: the reserved record is ours until submitted; the name is read through
            // the helper, which fails cleanly and NUL-terminates what it reads.
            unsafe {
                let buf = &mut (*record).name;
                buf[0] = 0;
                if let Some(name) = name
                    && bpf_probe_read_kernel_str_bytes(name as *const u8, buf).is_ok()
                {
                    event.flags |= flags::FILE_NAME;
                    event.payload_len = EXEC_NAME_BYTES as u32;
                }
                (*record).event = event;
            }
            slot.submit(BPF_RB_FORCE_WAKEUP.into());
        }
        None => lost(kind),
    })
}

#[inline(always)]
pub fn without_stack(mut event: Event) {
    event.stack = NO_STACK;
    if event.ts_ns == 0 {
        event.ts_ns = now_ns();
    }
    write(event);
}

#[inline(always)]
fn write(event: Event) {
    let kind = event.kind;
    with_cpu_ring!(ring => match ring.reserve::<Event>(0) {
        Some(mut slot) => {
            slot.write(event);
            slot.submit(submit_flags(ring));
        }
        None => lost(kind),
    })
}

/// Counts an event the ring had no room for, and what kind of fact it was.
#[inline(always)]
fn lost(kind: u16) {
    count(Counter::RingFull);
    match EventKind::from_raw(kind) {
        Some(k) if k.is_allocation() => count(Counter::RingFullAllocation),
        Some(EventKind::Free) => count(Counter::RingFullFree),
        _ => {}
    }
}

/// The allocator's caller's registers as they stand at the allocator's return: where its
/// stack is walked or unwound from.
#[derive(Clone, Copy)]
pub struct CallerRegs {
    /// The return address into the caller (0 while it is still at `ret_at`).
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// Where the return address is to be read, at the allocator's entry (0 at its return).
    pub ret_at: u64,
}

impl CallerRegs {
    #[inline(always)]
    pub fn at_return(ctx: &RetProbeContext) -> Self {
        // SAFETY: a uretprobe's context is the user registers just after the return.
        let regs = unsafe { &*ctx.regs };
        Self {
            ip: regs.rip,
            sp: regs.rsp,
            bp: regs.rbp,
            ret_at: 0,
        }
    }

    /// At the allocator's first instruction, the same registers are one step away: the
    /// return address is the word at the stack pointer, which the return pops. It is read
    /// with the stack (see [`with_stack`]); if it cannot be, the stack is lost, and counted.
    #[inline(always)]
    pub fn at_entry(ctx: &ProbeContext) -> Self {
        // SAFETY: a uprobe's context is the user registers at the probed instruction.
        let regs = unsafe { &*ctx.regs };
        Self {
            ip: 0,
            sp: regs.rsp + 8,
            bp: regs.rbp,
            ret_at: regs.rsp,
        }
    }

    /// The return address, read from the stack first if need be.
    #[inline(always)]
    fn read_ip(&mut self) {
        if self.ret_at != 0 {
            self.ip = unwind::read_word(self.ret_at).unwrap_or(0);
            self.ret_at = 0;
        }
    }

    /// At an entry, reads the return address and the caller's frame record (saved frame
    /// pointer, return address) in one go when they are close enough, into the scratch past
    /// anything the walk writes; returns the record.
    #[inline(always)]
    fn entry_read(&mut self, scratch: *mut StackCopy) -> Option<[u64; 2]> {
        let (at, bp) = (self.ret_at, self.bp);
        if at == 0 || bp < self.sp || bp & 7 != 0 || bp - at > ENTRY_READ_MAX - 16 {
            return None;
        }
        let len = (bp - at + 16) as u32;
        if len > ENTRY_READ_MAX as u32 {
            return None; // unreachable; bounds the length for the verifier
        }
        // SAFETY: ENTRY_READ_AT + ENTRY_READ_MAX is inside the scratch record.
        let buf = unsafe { scratch.cast::<u8>().add(ENTRY_READ_AT).cast::<u64>() };
        // SAFETY: reads user memory through the helper, which fails cleanly.
        let rc = unsafe { bpf_probe_read_user(buf.cast::<c_void>(), len, at as *const c_void) };
        if rc != 0 {
            return None;
        }
        let record = ((bp - at) / 8) as usize & (ENTRY_READ_WORDS - 1);
        // SAFETY: all indexes are below ENTRY_READ_WORDS, inside what was just read.
        unsafe {
            self.ip = *buf;
            self.ret_at = 0;
            Some([
                *buf.add(record),
                *buf.add((record + 1) & (ENTRY_READ_WORDS - 1)),
            ])
        }
    }
}

/// At an allocator's entry, the return address and the caller's frame record are read in
/// one go when they are this close (each user-memory read costs ≈ 130 ns here, its length
/// hardly anything).
const ENTRY_READ_MAX: u64 = 512;
const ENTRY_READ_WORDS: usize = (ENTRY_READ_MAX / 8) as usize;
/// Where in the scratch record that read lands: past anything the walk writes.
const ENTRY_READ_AT: usize = size_of::<Event>() + (MAX_STACK_DEPTH + 2) * 8;
// A table walk's stack window goes past the entry's read, inside the scratch record.
const _: () = assert!(
    size_of::<Event>() + unwind::WINDOW_AFTER_FRAMES * 8 == ENTRY_READ_AT + ENTRY_READ_MAX as usize
        && ENTRY_READ_AT + ENTRY_READ_MAX as usize + unwind::WINDOW_SCRATCH_BYTES
            <= size_of::<StackCopy>()
);

/// Writes `event` with its user stack, captured the way the process's entry in
/// `PROCESS_MODULES` says (the `DEFAULT_WALK` global for a process without one): walked in
/// the kernel, through frame pointers or unwind tables, or copied for userspace to unwind.
#[inline(always)]
pub fn with_stack(caller: CallerRegs, event: Event) {
    // Where either way assembles its record: too big for the BPF stack. Counted when busy.
    let Some(scratch) = take_scratch() else {
        without_stack(event);
        return;
    };
    // SAFETY: the per-CPU scratch is this program's while it holds it.
    unsafe { (*scratch).event = event };
    capture_stack(caller.ip, caller.sp, caller.bp, caller.ret_at);
    release_scratch();
}

/// Captures the stack of the event waiting in the held scratch, and writes both.
///
/// A global BPF function: the verifier checks it once, on its own, rather than again on
/// every path of every program that reaches it (its walk and copy made loading the session
/// program take over a second).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn capture_stack(ip: u64, sp: u64, bp: u64, ret_at: u64) -> i32 {
    let Some(scratch) = STACK_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: the caller holds the scratch and left the event in it.
    let tgid = unsafe { (*scratch).event.tgid };
    let caller = CallerRegs { ip, sp, bp, ret_at };
    let (walk, modules) = process_walk(tgid);
    let tables = walk == unwind_walk::TABLES;
    if walk == unwind_walk::COPY || !with_walked_stack(caller, scratch, (tables, modules)) {
        copy_stack(ip, sp, bp, ret_at);
    }
    0
}

/// Copies the stack of the event waiting in the held scratch for userspace, and writes
/// both. A global BPF function, checked once, on its own, like [`capture_stack`].
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn copy_stack(ip: u64, sp: u64, bp: u64, ret_at: u64) -> i32 {
    if let Some(scratch) = STACK_SCRATCH.get_ptr_mut(0) {
        with_copied_stack(CallerRegs { ip, sp, bp, ret_at }, scratch);
    }
    0
}

/// How `tgid`'s stacks are captured, and its modules when they are walked with tables and
/// listed (a process not listed yet is walked through its mappings).
#[inline(always)]
fn process_walk(tgid: u32) -> (u32, *const ProcessModules) {
    // SAFETY: the value is only read; userspace replaces it whole, never in place.
    match unsafe { PROCESS_MODULES.get(&tgid) } {
        Some(list) if list.walk == unwind_walk::TABLES => (unwind_walk::TABLES, list),
        Some(list) => (list.walk, core::ptr::null()),
        None => (default_walk(), core::ptr::null()),
    }
}

/// Walks the caller's stack in the kernel (the allocator's caller is frame 0 at its return),
/// hashing the return addresses as it goes. A stack whose hash was sent before travels as the
/// hash alone; otherwise the frames follow the event, and the hash is remembered once the
/// record is in the ring, so userspace always meets a stack's frames before a bare hash.
/// False when the walk met code no table covers: the stack must be copied instead.
///
/// Walked here rather than with `bpf_get_stackid`, which measured ≈1 µs per call in this VM
/// against ≈0.1 µs for a frame-pointer walk of a shallow stack.
#[inline(always)]
fn with_walked_stack(
    mut regs: CallerRegs,
    scratch: *mut StackCopy,
    (tables, modules): (bool, *const ProcessModules),
) -> bool {
    // SAFETY: the held scratch starts with the event, updated in place (the BPF stack has
    // no room for copies).
    let event = unsafe { &mut (*scratch).event };
    // SAFETY: the per-CPU scratch is this program's alone while it holds it; the frames go
    // after the event, inside the scratch record ((MAX_STACK_DEPTH + 1) * 8 bytes fit).
    let frames = unsafe { scratch.cast::<u8>().add(size_of::<Event>()).cast::<u64>() };
    unwind::clear_window(frames);
    // A table walk reads the return address with the first window of the stack; a
    // frame-pointer walk reads it with the caller's frame record when they are close.
    let first = if tables {
        if regs.ret_at != 0 {
            regs.ip = unwind::window_pair(frames, regs.ret_at).map_or(0, |pair| pair[0]);
            regs.ret_at = 0;
        }
        None
    } else {
        regs.entry_read(scratch)
    };
    regs.read_ip();
    let mut walk = unwind::Walk {
        ip: regs.ip,
        sp: regs.sp,
        bp: regs.bp,
        hash: unwind::FRAME_HASH_SEED,
        frames,
        modules,
        tables: u32::from(tables),
        first: first.unwrap_or([0; 2]),
        has_first: u32::from(first.is_some()),
        n: 0,
        limit: stack_frames() as u32,
        ending: 0,
    };
    let ending = unwind::run(&mut walk);
    if ending == unwind::Ending::NeedsCopy {
        count(Counter::WalkNeedsCopy);
        return false;
    }
    let (mut n, mut hash) = (walk.n as usize, walk.hash);
    if ending == unwind::Ending::Truncated && n > 0 && n <= MAX_STACK_DEPTH {
        // Read opaquely, so the mask (which changes nothing: n <= 127) is kept for the
        // verifier, which knows nothing of a value the loop's steps wrote.
        // SAFETY: a read of a local.
        let slot = unsafe { core::ptr::read_volatile(&n) } & 0x7f;
        // SAFETY: the slot past the deepest frame, inside the scratch.
        unsafe { *frames.add(slot) = TRUNCATED_FRAME };
        hash = unwind::mix(hash, TRUNCATED_FRAME);
        n += 1;
    }
    if n == 0 {
        count(Counter::StackLost);
        without_stack(*event);
        return true;
    }
    let hash = if hash == NO_STACK { 1 } else { hash };
    event.stack = hash;
    let slot = KNOWN_STACKS.get_ptr_mut((hash as u32) & (KNOWN_STACK_SLOTS - 1));
    // SAFETY: an array slot; a torn read is impossible for an aligned u64.
    let known = slot.is_some_and(|slot| unsafe { *slot } == hash);
    // Stamped after the slot is read: an event that found its stack already sent is then
    // later than the event that sent the frames (which marks the slot after writing), on
    // any CPU, so userspace, applying events in time order, always meets the frames first.
    event.ts_ns = now_ns();
    if known {
        write(*event);
        return true;
    }
    count(Counter::StackInline);
    event.flags |= flags::STACK_INLINE;
    event.payload_len = (n * 8) as u32;
    let kind = event.kind;
    // The mask changes nothing (n <= MAX_STACK_DEPTH + 1) but bounds the length for the
    // verifier, which knows nothing of a value the loop's steps wrote.
    let total = size_of::<Event>() + (n & 0xff) * 8;
    // SAFETY: the event and `n` frames after it are initialized.
    let record = unsafe { core::slice::from_raw_parts(scratch.cast::<u8>(), total) };
    if output(record, kind)
        && let Some(slot) = slot
    {
        // SAFETY: as above.
        unsafe { *slot = hash };
    }
    true
}

/// Whether a copy of `bytes` would take this CPU's ring past half full: then the event goes
/// without its stack, so that kilobytes of copies (a burst of code no table covers yet)
/// never crowd out the events themselves.
#[inline(always)]
fn copy_would_crowd(bytes: u64) -> bool {
    with_cpu_ring!(ring => {
        let size = ring.query(BPF_RB_RING_SIZE.into());
        ring.query(BPF_RB_AVAIL_DATA.into()) + bytes > size / 2
    })
}

/// Writes a whole record (with its 8-byte ring header); false if the ring was full.
#[inline(always)]
fn output(record: &[u8], kind: u16) -> bool {
    let record_bytes = record.len() as u64 + 8;
    let written = with_cpu_ring!(ring => {
        let unread = ring.query(BPF_RB_AVAIL_DATA.into()) + record_bytes;
        ring.output(record, wake_flags(unread, record_bytes)).is_ok()
    });
    if !written {
        lost(kind);
    }
    written
}

/// Sends the caller's registers and up to `STACK_COPY_BYTES` of its stack (from `sp` upwards,
/// stopping at the first unreadable page) after the event, for unwinding with CFI in userspace.
#[inline(always)]
fn with_copied_stack(mut regs: CallerRegs, scratch: *mut StackCopy) {
    if copy_would_crowd(stack_copy_bytes() as u64) {
        count(Counter::StackShed);
        // SAFETY: the held scratch starts with the event.
        without_stack(unsafe { (*scratch).event });
        return;
    }
    regs.read_ip();
    // SAFETY: the per-CPU scratch is this program's alone while it runs (programs do not
    // migrate, and no program using it can preempt another).
    let copy: &mut StackCopy = unsafe { &mut *scratch };
    let sp = regs.sp;
    let limit = stack_copy_bytes();
    let mut copied: usize = 0;
    let mut chunk = STACK_COPY_PAGE - (sp as usize & (STACK_COPY_PAGE - 1));
    for _ in 0..=(STACK_COPY_MAX / STACK_COPY_PAGE) {
        if copied >= limit || copied > STACK_COPY_MAX {
            break;
        }
        let len = chunk.min(limit - copied);
        if len == 0 || len > STACK_COPY_PAGE {
            break;
        }
        // SAFETY: copied <= STACK_COPY_MAX and len <= one page: inside `bytes`.
        let rc = unsafe {
            bpf_probe_read_user(
                copy.bytes.as_mut_ptr().add(copied).cast::<c_void>(),
                len as u32,
                (sp + copied as u64) as *const c_void,
            )
        };
        if rc != 0 {
            break;
        }
        copied += len;
        chunk = STACK_COPY_PAGE;
    }
    if copied > STACK_COPY_MAX + STACK_COPY_PAGE {
        return; // unreachable; bounds the size below for the verifier
    }
    let event = &mut copy.event;
    event.stack = NO_STACK;
    event.ts_ns = now_ns();
    event.flags |= flags::STACK_COPY;
    event.payload_len = (size_of::<StackRegs>() + copied) as u32;
    let kind = event.kind;
    copy.regs = StackRegs {
        ip: regs.ip,
        sp,
        bp: regs.bp,
    };
    let total = size_of::<Event>() + size_of::<StackRegs>() + copied;
    // SAFETY: `total` bytes of the scratch record are initialized (the header fields above and
    // `copied` stack bytes).
    let record = unsafe { core::slice::from_raw_parts(scratch.cast::<u8>(), total) };
    output(record, kind);
}
