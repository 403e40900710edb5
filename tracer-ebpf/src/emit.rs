//! Writing records to the ring buffer, with the stack and the batched wake-up policy.
//!
//! Records are submitted with `BPF_RB_NO_WAKEUP`: waking the reader per record costs
//! microseconds in a VM. The producer that makes the unread backlog cross a multiple of
//! `WAKEUP_BYTES` wakes it instead, and the reader also drains on a short timer.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_USER_STACK, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::generated::{bpf_get_stack, bpf_probe_read_user},
    programs::{RetProbeContext, tracing::StackIdContext},
};
use tracer_common::{
    Counter, Event, EventKind, InFlight, MAX_STACK_DEPTH, NO_STACK, STACK_COPY_MAX,
    STACK_COPY_PAGE, StackCopy, StackRegs, flags,
};

use crate::maps::{EVENTS, STACK_SCRATCH, STACKS, count, now_ns, stack_copy_bytes, wakeup_bytes};

const EEXIST: i32 = 17;
/// Ring-buffer records are 8-byte aligned with an 8-byte header.
const RECORD_BYTES: u64 = (size_of::<Event>() + 8) as u64;
const INLINE_STACK_BYTES: usize = MAX_STACK_DEPTH * 8;

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

/// Flags for a reserved record (already counted in the unread data).
#[inline(always)]
fn submit_flags() -> u64 {
    wake_flags(EVENTS.query(BPF_RB_AVAIL_DATA.into()), RECORD_BYTES)
}

/// The event for a call that completed with result `addr`, from its recorded entry.
#[inline(always)]
pub fn completed(call: &InFlight, pid_tgid: u64, addr: u64) -> Event {
    Event {
        ts_ns: now_ns(),
        start_ns: call.start_ns,
        addr,
        size: call.size,
        old_addr: call.old_addr,
        aux: call.aux,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        kind: call.kind,
        flags: call.flags,
        ..Event::default()
    }
}

/// The event of an instant (a free, an unmap, a mapping's caller): no separate entry time.
#[inline(always)]
pub fn instant(kind: EventKind, pid_tgid: u64, addr: u64, size: u64, flags: u16) -> Event {
    let now = now_ns();
    Event {
        ts_ns: now,
        start_ns: now,
        addr,
        size,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        kind: kind as u16,
        flags,
        ..Event::default()
    }
}

#[inline(always)]
pub fn without_stack(mut event: Event) {
    event.stack_id = NO_STACK;
    write(event);
}

#[inline(always)]
fn write(event: Event) {
    match EVENTS.reserve::<Event>(0) {
        Some(mut slot) => {
            slot.write(event);
            slot.submit(submit_flags());
        }
        None => count(Counter::RingFull),
    }
}

/// How an event's user stack is captured; chosen per traced process by which return
/// programs are attached to it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum StackMode {
    /// The kernel walks frame pointers into a deduplicated stack-map id.
    FramePointers,
    /// The caller's registers and the top of its stack are copied for userspace to unwind.
    Copy,
}

/// Writes `event` with its user stack captured the way `mode` says.
#[inline(always)]
pub fn with_stack_mode(ctx: &RetProbeContext, mode: StackMode, event: Event) {
    match mode {
        StackMode::FramePointers => with_stack(ctx, event),
        StackMode::Copy => with_copied_stack(ctx, event),
    }
}

/// Captures the user stack (the allocator's caller is frame 0 at its return) as a stack-map
/// id; on a stack-map hash collision the frames travel inline in the record instead.
#[inline(always)]
pub fn with_stack<C: StackIdContext>(ctx: &C, mut event: Event) {
    match ctx.get_stackid(&STACKS, BPF_F_USER_STACK.into()) {
        Ok(id) => {
            event.stack_id = id as i32;
            write(event);
        }
        Err(err) if err == -EEXIST => with_inline_stack(ctx, event),
        Err(err) => {
            count(Counter::StackLost);
            event.stack_id = err;
            write(event);
        }
    }
}

#[inline(always)]
fn with_inline_stack<C: EbpfContext>(ctx: &C, mut event: Event) {
    const TOTAL: usize = size_of::<Event>() + INLINE_STACK_BYTES;
    let Some(mut slot) = EVENTS.reserve_bytes(TOTAL, 0) else {
        count(Counter::RingFull);
        return;
    };
    let base = slot.as_mut_ptr();
    // SAFETY: `slot` is TOTAL bytes; the frames go after the fixed record.
    let got = unsafe {
        bpf_get_stack(
            ctx.as_ptr(),
            base.add(size_of::<Event>()).cast(),
            INLINE_STACK_BYTES as u32,
            BPF_F_USER_STACK.into(),
        )
    };
    if got < 0 {
        count(Counter::StackLost);
        event.stack_id = got as i32;
    } else {
        count(Counter::StackInline);
        event.stack_id = NO_STACK;
        event.flags |= flags::STACK_INLINE;
        event.payload_len = (got as u32).min(INLINE_STACK_BYTES as u32);
    }
    // SAFETY: the record starts 8-byte aligned and holds an Event first.
    unsafe { base.cast::<Event>().write(event) };
    slot.submit(submit_flags());
}

/// Sends the caller's registers and up to `STACK_COPY_BYTES` of its stack (from `sp` upwards,
/// stopping at the first unreadable page) after the event, for unwinding with CFI in userspace.
#[inline(always)]
fn with_copied_stack(ctx: &RetProbeContext, mut event: Event) {
    let Some(scratch) = STACK_SCRATCH.get_ptr_mut(0) else {
        count(Counter::StackLost);
        without_stack(event);
        return;
    };
    // SAFETY: the per-CPU scratch is this program's alone while it runs (programs do not
    // migrate, and no program using it can preempt another).
    let copy: &mut StackCopy = unsafe { &mut *scratch };
    // SAFETY: a uretprobe's context is the user registers at the return.
    let regs = unsafe { &*ctx.regs };
    let sp = regs.rsp;
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
    event.stack_id = NO_STACK;
    event.flags |= flags::STACK_COPY;
    event.payload_len = (size_of::<StackRegs>() + copied) as u32;
    copy.event = event;
    copy.regs = StackRegs {
        ip: regs.rip,
        sp,
        bp: regs.rbp,
    };
    let total = size_of::<Event>() + size_of::<StackRegs>() + copied;
    // SAFETY: `total` bytes of the scratch record are initialized (the header fields above and
    // `copied` stack bytes).
    let record = unsafe { core::slice::from_raw_parts(scratch.cast::<u8>(), total) };
    // `output` adds the record (with its 8-byte header) after this check.
    let record_bytes = total as u64 + 8;
    let unread = EVENTS.query(BPF_RB_AVAIL_DATA.into()) + record_bytes;
    if EVENTS
        .output(record, wake_flags(unread, record_bytes))
        .is_err()
    {
        count(Counter::RingFull);
    }
}
