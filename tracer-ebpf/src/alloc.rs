//! Allocation calls: remember the arguments at entry, emit one event at return.
//!
//! The arguments wait in the thread's own task-storage slot. A nested entry on the same
//! thread (glibc's `reallocarray` tail-calls `realloc`; an allocator may call another exported
//! one internally) is folded into the outermost call, whose return reports it once.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, generated::bpf_jiffies64},
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::{Counter, EventKind, InFlight, flags};

use crate::{
    emit::{self, StackMode},
    maps::{CALLS, count, current_tgid, now_ns, uprobe_traced},
    sample,
};

/// A tail call (`jmp` into another probed function) enters at the very stack pointer of the
/// call it continues, normally within microseconds; a call at that stack pointer this many
/// ticks later (≥ 250 ms at any HZ) means the earlier call's return was missed. Generous on
/// purpose: a thread preempted between the two entries on a loaded machine must not turn
/// its tail call into a false "missed return" (one tick was measured to be too short).
const TAIL_CALL_JIFFIES: u64 = 250;

/// How a probe hit at stack pointer `sp` relates to the thread's recorded call.
#[derive(PartialEq, Eq)]
pub enum Relation {
    /// No call in flight.
    Idle,
    /// Inside the recorded call (deeper on the stack, or a tail call it made).
    Nested,
    /// The recorded call's return was never seen: the hit is a new, unrelated call.
    Stale,
}

#[inline(always)]
pub fn relation(call: &InFlight, sp: u64) -> Relation {
    if call.active == 0 {
        Relation::Idle
    } else if sp < call.entry_sp
        || (sp == call.entry_sp && jiffies().wrapping_sub(call.active - 1) <= TAIL_CALL_JIFFIES)
    {
        Relation::Nested
    } else {
        Relation::Stale
    }
}

#[inline(always)]
fn jiffies() -> u64 {
    // SAFETY: the helper takes no arguments and cannot fail.
    unsafe { bpf_jiffies64() }
}

/// The user stack pointer a probe hit with.
#[inline(always)]
pub fn user_sp(ctx: &ProbeContext) -> u64 {
    // SAFETY: a uprobe's context is the user registers at the probed instruction.
    unsafe { (*ctx.regs).rsp }
}

/// `size` is `None` when the caller's size computation overflowed (the call will fail).
///
/// With byte sampling the decision is made here, where the size is known: an unsampled call
/// (that hands in no sampled block) records nothing and does not even look up its thread's
/// slot; its return finds the slot idle, or holding a call further up the stack.
///
/// Returns whether this call's return must be seen, i.e. whether it was recorded. A uprobe
/// session uses that to skip the return trap of every call that was not.
#[inline(always)]
pub fn enter(
    ctx: &ProbeContext,
    kind: EventKind,
    size: Option<u64>,
    old_addr: u64,
    out_ptr: u64,
    aux: u64,
) -> bool {
    if !uprobe_traced() {
        return false;
    }
    let sp = user_sp(ctx);
    let mut call_flags = if size.is_none() {
        flags::SIZE_OVERFLOW
    } else {
        0
    };
    if sample::enabled() {
        let sampled = size.is_some() && sample::take(size.unwrap_or(0));
        let old_sampled =
            kind.is_realloc() && old_addr != 0 && sample::is_sampled(old_addr, current_tgid);
        if !sampled && !old_sampled && !may_delegate(kind, old_addr, aux) {
            return false;
        }
        if sampled {
            call_flags |= flags::SAMPLED;
        }
        if old_sampled {
            call_flags |= flags::OLD_SAMPLED;
        }
    }
    let mut slot = CALLS.current();
    if let Some(call) = slot.as_deref_mut() {
        match relation(call, sp) {
            Relation::Nested => {
                // Only a tail call returns through the same frame as its outer call, so its
                // return is the outer call's: it must be seen.
                let tail_call = sp == call.entry_sp;
                if tail_call {
                    call.depth += 1;
                }
                count(Counter::Nested);
                return tail_call;
            }
            Relation::Stale => {
                call.active = 0;
                count(Counter::ReturnMissed);
                if sample::enabled() {
                    sample::recorded_calls_add(u64::MAX);
                }
            }
            Relation::Idle => {}
        }
    }
    let Some(call) = slot.or_else(|| CALLS.current_or_create()) else {
        count(Counter::InflightFull);
        return false;
    };
    if sample::enabled() {
        sample::recorded_calls_add(1);
    }
    *call = InFlight {
        // Only a realloc's start time is ever read (see `Event::start_ns`); the ns clock
        // costs more than the rest of this program.
        start_ns: if kind.is_realloc() { now_ns() } else { 0 },
        size: size.unwrap_or(u64::MAX),
        old_addr,
        out_ptr,
        aux,
        kind: kind as u16,
        flags: call_flags,
        depth: 0,
        entry_sp: sp,
        active: jiffies() + 1,
    };
    true
}

/// Whether the allocator may serve this call by calling another probed function, which must
/// then nest in it rather than draw a second sample for the same bytes: so the call is
/// recorded even unsampled. glibc hands `realloc(NULL, n)` to `malloc`, an alignment its
/// malloc gives anyway to `malloc`, and `reallocarray` to `realloc`. Its other calls use
/// internal functions only, so they record nothing unsampled and, as uprobe sessions,
/// skip their return trap.
#[inline(always)]
fn may_delegate(kind: EventKind, old_addr: u64, alignment: u64) -> bool {
    match kind {
        EventKind::Malloc | EventKind::Calloc | EventKind::Valloc | EventKind::Pvalloc => false,
        EventKind::Realloc => old_addr == 0,
        EventKind::PosixMemalign | EventKind::AlignedAlloc => alignment <= MALLOC_ALIGNMENT,
        _ => true,
    }
}

/// The alignment every glibc malloc block has on 64-bit targets.
const MALLOC_ALIGNMENT: u64 = 16;

#[inline(always)]
pub fn exit(ctx: &RetProbeContext, mode: StackMode) -> u32 {
    if sample::enabled() && !sample::any_recorded_call() {
        return 0; // sampling, and no thread is inside a recorded call
    }
    let Some(slot) = CALLS.current().filter(|c| c.active != 0) else {
        // Unsampled calls leave the slot idle on purpose.
        if !sample::enabled() && uprobe_traced() {
            count(Counter::ReturnWithoutEntry);
        }
        return 0;
    };
    // SAFETY: a uretprobe's context is the user registers just after the return.
    let sp = unsafe { (*ctx.regs).rsp };
    if sp != slot.entry_sp + 8 {
        return 0; // a call nested deeper inside the recorded one, or an unsampled one
    }
    if slot.depth > 0 {
        slot.depth -= 1; // the tail-called function's return; the outer one follows
        return 0;
    }
    slot.active = 0;
    let call = *slot;
    if sample::enabled() {
        sample::recorded_calls_add(u64::MAX);
    }

    let ret: u64 = ctx.ret();
    let Some(kind) = EventKind::from_raw(call.kind) else {
        return 0;
    };
    let addr = if kind == EventKind::PosixMemalign {
        if ret as u32 != 0 {
            return 0; // returned an error code: nothing allocated
        }
        // SAFETY: reads user memory through the helper, which fails cleanly on a bad pointer.
        match unsafe { bpf_probe_read_user(call.out_ptr as *const u64) } {
            Ok(addr) => addr,
            Err(_) => {
                count(Counter::OutPtrUnreadable);
                return 0;
            }
        }
    } else {
        ret
    };
    // A NULL return changes nothing, except realloc(p, 0), which frees p.
    let frees_old = kind.is_realloc() && call.old_addr != 0 && call.size == 0;
    if addr == 0 && !frees_old {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let mut event = emit::completed(&call, pid_tgid, addr);
    if sample::enabled() {
        let tgid = (pid_tgid >> 32) as u32;
        event.flags &= !flags::OLD_SAMPLED;
        // The old block's end is reported only if it was sampled (and is still: another
        // thread may have freed it meanwhile); the new block only if it was sampled at entry.
        let old_sampled =
            call.flags & flags::OLD_SAMPLED != 0 && sample::forget(tgid, call.old_addr);
        if !old_sampled {
            event.old_addr = 0;
        }
        if addr == 0 || call.flags & flags::SAMPLED == 0 {
            if old_sampled {
                // Only the sampled old block's end is news: a realloc that frees it.
                event.addr = 0;
                event.size = 0;
                event.flags &= !flags::SAMPLED;
                emit::without_stack(event);
            }
            return 0;
        }
        sample::remember(tgid, addr);
    }
    if event.addr == 0 {
        emit::without_stack(event);
    } else {
        emit::with_stack_mode(ctx, mode, event);
    }
    0
}
