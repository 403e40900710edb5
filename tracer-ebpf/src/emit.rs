//! Writing records to the ring buffer, with the stack and the batched wake-up policy.
//!
//! Records are submitted with `BPF_RB_NO_WAKEUP`: waking the reader per record costs
//! microseconds in a VM. The producer that makes the unread backlog cross a multiple of
//! `WAKEUP_BYTES` wakes it instead, and the reader also drains on a short timer.

use core::mem::size_of;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_USER_STACK, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::generated::bpf_get_stack,
    programs::tracing::StackIdContext,
};
use tracer_common::{Counter, Event, EventKind, InFlight, MAX_STACK_DEPTH, NO_STACK, flags};

use crate::maps::{EVENTS, STACKS, count, now_ns, wakeup_bytes};

const EEXIST: i32 = 17;
/// Ring-buffer records are 8-byte aligned with an 8-byte header.
const RECORD_BYTES: u64 = (size_of::<Event>() + 8) as u64;
const INLINE_STACK_BYTES: usize = MAX_STACK_DEPTH * 8;

#[inline(always)]
fn submit_flags() -> u64 {
    let mask = wakeup_bytes() - 1;
    if EVENTS.query(BPF_RB_AVAIL_DATA.into()) & mask < RECORD_BYTES {
        BPF_RB_FORCE_WAKEUP.into()
    } else {
        BPF_RB_NO_WAKEUP.into()
    }
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
