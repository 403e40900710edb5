//! Allocation calls: remember the arguments at entry, emit one event at return.
//!
//! Keyed by the full `pid_tgid`, so concurrent threads never mix. A nested entry on the same
//! thread (glibc's `reallocarray` tail-calls `realloc`; an allocator may call another exported
//! one internally) is folded into the outermost call, whose return reports it once.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    programs::RetProbeContext,
};
use tracer_common::{Counter, EventKind, InFlight, flags};

use crate::{
    emit::{self, StackMode},
    maps::{INFLIGHT, count, now_ns, uprobe_traced},
    sample,
};

/// `size` is `None` when the caller's size computation overflowed (the call will fail).
#[inline(always)]
pub fn enter(kind: EventKind, size: Option<u64>, old_addr: u64, out_ptr: u64, aux: u64) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !uprobe_traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    if let Some(outer) = INFLIGHT.get_ptr_mut(&pid_tgid) {
        // SAFETY: the entry belongs to this thread, which is the only one touching it.
        unsafe { (*outer).depth += 1 };
        count(Counter::Nested);
        return 0;
    }
    let call = InFlight {
        start_ns: now_ns(),
        size: size.unwrap_or(u64::MAX),
        old_addr,
        out_ptr,
        aux,
        kind: kind as u16,
        flags: if size.is_none() {
            flags::SIZE_OVERFLOW
        } else {
            0
        },
        depth: 0,
    };
    if INFLIGHT
        .insert(&pid_tgid, &call, BPF_NOEXIST.into())
        .is_err()
    {
        count(Counter::InflightFull);
    }
    0
}

#[inline(always)]
pub fn exit(ctx: &RetProbeContext, mode: StackMode) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(entry) = INFLIGHT.get_ptr_mut(&pid_tgid) else {
        if uprobe_traced((pid_tgid >> 32) as u32) {
            count(Counter::ReturnWithoutEntry);
        }
        return 0;
    };
    // SAFETY: this thread's own entry.
    let call = unsafe { &mut *entry };
    if call.depth > 0 {
        call.depth -= 1;
        return 0;
    }
    let call = *call;
    let _ = INFLIGHT.remove(&pid_tgid);

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
    let mut event = emit::completed(&call, pid_tgid, addr);
    if sample::enabled() {
        let tgid = (pid_tgid >> 32) as u32;
        // The old block's free is reported only if it was sampled; the new block only if
        // it is sampled now.
        if kind.is_realloc() && call.old_addr != 0 && !sample::forget(tgid, call.old_addr) {
            event.old_addr = 0;
        }
        let sampled = addr != 0 && sample::take(call.size);
        if sampled {
            sample::remember(tgid, addr);
            event.flags |= flags::SAMPLED;
        } else if event.old_addr != 0 {
            // Only the sampled old block's end is news: a realloc that frees it.
            event.addr = 0;
            event.size = 0;
            emit::without_stack(event);
            return 0;
        } else {
            return 0;
        }
    }
    if event.addr == 0 {
        emit::without_stack(event);
    } else {
        emit::with_stack_mode(ctx, mode, event);
    }
    0
}
