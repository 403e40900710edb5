//! Allocation calls: remember the arguments at entry, emit one event at return.
//!
//! The arguments wait in the thread's own task-storage slot. A nested entry on the same
//! thread (glibc's `reallocarray` tail-calls `realloc`; an allocator may call another exported
//! one internally) is folded into the outermost call, whose return reports it once.
//!
//! Under uprobe sessions, a malloc or calloc made while no other recorded call is in flight
//! anywhere skips the slot: its size travels in the session's own cookie, which the kernel
//! hands back at that very call's return (see [`enter_carried`]).

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, generated::bpf_jiffies64},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};
use tracer_common::{
    Counter, Event, EventKind, InFlight, SESSION_COOKIE_CALL, attach_cookie, flags, pack_kind,
};

use crate::{
    emit::{self, CallerRegs},
    maps::{
        CALLS, OUTER_CALLS, carrying_allowed, count, current_tgid, now_ns, shared_add,
        shared_nonzero, tracepoint_fields, uprobe_traced,
    },
    sample, tcache,
};

/// A tail call (`jmp` into another probed function) enters at the very stack pointer of the
/// call it continues, normally within microseconds; a call at that stack pointer this many
/// ticks later (≥ 250 ms at any HZ) means the earlier call's return was missed. Generous on
/// purpose: a thread preempted between the two entries on a loaded machine must not turn
/// its tail call into a false "missed return" (one tick was measured to be too short).
const TAIL_CALL_JIFFIES: u64 = 250;

/// Which allocator a probed function belongs to (carried into its events), and whether it
/// may call other probed functions, from its attach cookie.
#[derive(Clone, Copy)]
pub struct Origin {
    pub allocator: u8,
    pub may_nest: bool,
}

impl Origin {
    #[inline(always)]
    pub fn of_cookie(cookie: u64) -> Self {
        Self {
            allocator: attach_cookie::allocator(cookie),
            may_nest: cookie & attach_cookie::MAY_NEST != 0,
        }
    }
}

/// How a probe hit at stack pointer `sp` relates to the thread's recorded call.
#[derive(PartialEq, Eq)]
pub enum Relation {
    /// No call in flight.
    Idle,
    /// Inside the recorded call (deeper on the stack, or a tail call it made).
    Nested,
    /// Made by a signal handler that interrupted the recorded call: a call of its own.
    Handler,
    /// The recorded call's return was never seen: the hit is a new, unrelated call.
    Stale,
}

#[inline(always)]
pub fn relation(call: &InFlight, sp: u64) -> Relation {
    if call.active == 0 {
        Relation::Idle
    } else if call.signals != 0 {
        // Before the stack test: a handler on an alternate stack may be anywhere.
        Relation::Handler
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
    who: (EventKind, Origin),
    size: Option<u64>,
    old_addr: u64,
    out_ptr: u64,
    aux: u64,
) -> bool {
    enter_flagged(ctx, who, size, (old_addr, out_ptr, aux), 0)
}

/// [`enter`], the call's slot marked with `extra` flags (kernel-internal ones).
#[inline(always)]
fn enter_flagged(
    ctx: &ProbeContext,
    (kind, origin): (EventKind, Origin),
    size: Option<u64>,
    (old_addr, out_ptr, aux): (u64, u64, u64),
    extra: u16,
) -> bool {
    if !uprobe_traced() {
        return false;
    }
    let sp = user_sp(ctx);
    let mut call_flags = extra;
    if size.is_none() {
        call_flags |= flags::SIZE_OVERFLOW;
    }
    if origin.may_nest {
        call_flags |= flags::MAY_NEST;
    }
    if sample::enabled() {
        let sampled = size.is_some() && sample::take(size.unwrap_or(0));
        let old_sampled =
            kind.is_realloc() && old_addr != 0 && sample::is_sampled(old_addr, current_tgid);
        if !sampled && !old_sampled && !origin.may_nest && !may_delegate(kind, old_addr, aux) {
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
            Relation::Handler => {
                // The thread's one slot holds the interrupted call; only a session's
                // cookie could have carried this one (`enter_carried` tries that first).
                count(Counter::HandlerCalls);
                count(Counter::HandlerCallsLost);
                return false;
            }
            Relation::Stale => {
                call.active = 0;
                if may_nest(call) {
                    outer_calls_add(u64::MAX);
                }
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
        kind: pack_kind(kind, origin.allocator),
        flags: call_flags,
        depth: 0,
        signals: 0,
        entry_sp: sp,
        active: jiffies() + 1,
    };
    if may_nest(call) {
        outer_calls_add(1);
    }
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
pub fn exit(ctx: &RetProbeContext) -> u32 {
    if sample::enabled() && !sample::any_recorded_call() {
        return 0; // sampling, and no thread is inside a recorded call
    }
    let Some(slot) = CALLS.current() else {
        return 0; // no slot at all: the entry could not create one, and counted that
    };
    if slot.active == 0 {
        // Unsampled calls leave the slot idle on purpose.
        if !sample::enabled() && uprobe_traced() {
            count(Counter::ReturnWithoutEntry);
        }
        return 0;
    }
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
    if may_nest(&call) {
        outer_calls_add(u64::MAX);
    }
    complete(ctx, &call);
    0
}

/// Reports the call `call` that returned: the event, with its stack when it made a block.
#[inline(always)]
fn complete(ctx: &RetProbeContext, call: &InFlight) {
    let ret: u64 = ctx.ret();
    if call.flags & flags::CHECK_PREDICTION != 0 {
        tcache::check(call.aux, ret);
    }
    let Some(kind) = EventKind::from_raw(call.kind) else {
        return;
    };
    let addr = if kind == EventKind::PosixMemalign {
        if ret as u32 != 0 {
            return; // returned an error code: nothing allocated
        }
        // SAFETY: reads user memory through the helper, which fails cleanly on a bad pointer.
        match unsafe { bpf_probe_read_user(call.out_ptr as *const u64) } {
            Ok(addr) => addr,
            Err(_) => {
                count(Counter::OutPtrUnreadable);
                return;
            }
        }
    } else {
        ret
    };
    // A NULL return changes nothing, except realloc(p, 0), which frees p.
    let frees_old = kind.is_realloc() && call.old_addr != 0 && call.size == 0;
    if addr == 0 && !frees_old {
        return;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let mut event = emit::completed(call, pid_tgid, addr);
    let tgid = (pid_tgid >> 32) as u32;
    if sample::enabled() {
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
            return;
        }
    }
    if event.addr == 0 {
        emit::without_stack(event);
    } else {
        new_block(CallerRegs::at_return(ctx), tgid, event);
    }
}

/// Reports the block `event` names, made by the caller whose registers are `caller`. A
/// sampled block the kernel cannot remember is marked untracked: its free will not be seen.
#[inline(always)]
fn new_block(caller: CallerRegs, tgid: u32, mut event: Event) {
    if sample::enabled() && !sample::remember(tgid, event.addr) {
        event.flags |= flags::UNTRACKED;
    }
    emit::with_stack(caller, event);
}

/// Calls that may call `free` or another probed function while in flight (glibc's realloc
/// does both; other allocators and `operator new` may call their own exported functions),
/// and mallocs whose prediction is being checked: counted in `OUTER_CALLS` while recorded.
#[inline(always)]
fn may_nest(call: &InFlight) -> bool {
    let kind = call.kind & 0xff;
    // A checked prediction too: it takes the slot, and a signal handler's malloc meanwhile
    // must see it there (and be carried alone, unpredicted), never be taken for nested.
    call.flags & (flags::MAY_NEST | flags::CHECK_PREDICTION) != 0
        || (kind != EventKind::Malloc as u16 && kind != EventKind::Calloc as u16)
}

#[inline(always)]
fn outer_calls_add(delta: u64) {
    shared_add(&OUTER_CALLS, delta);
}

/// Whether any thread is inside a recorded call of an outer kind (a realloc, a memalign...).
#[inline(always)]
pub fn outer_call_in_flight() -> bool {
    shared_nonzero(&OUTER_CALLS)
}

/// The running uprobe session's 8-byte cookie: zero at the call, and at the return what the
/// call left in it. Only valid in a session program.
#[inline(always)]
pub fn session_cookie() -> *mut u64 {
    // SAFETY: the loader turns this stand-in helper number into a call of the kernel's
    // `bpf_session_cookie` kfunc, which takes nothing and returns a valid pointer.
    unsafe {
        let kfunc: unsafe extern "C" fn() -> *mut u64 =
            core::mem::transmute(SESSION_COOKIE_CALL as usize);
        kfunc()
    }
}

/// Cookie layout of a carried call: a 12-bit signature (the kernel keeps the cookie in the
/// call's pending return, where `mmap::inside_allocator` recognises it among other tools'),
/// then the kind, a sampled bit, the allocator, and the size in the low 39 bits (larger
/// calls take the slot).
const CARRIED_SIGNATURE: u64 = 0xa11 << 52;
const CARRIED_SIGNATURE_MASK: u64 = 0xfff << 52;
const CARRIED_KIND_SHIFT: u32 = 49;
const CARRIED_SAMPLED: u64 = 1 << 48;
const CARRIED_ALLOCATOR_SHIFT: u32 = 39;
const CARRIED_SIZE_MAX: u64 = (1 << 39) - 1;

/// Whether a session cookie is one of a carried call.
#[inline(always)]
pub fn is_carried(cookie: u64) -> bool {
    cookie & CARRIED_SIGNATURE_MASK == CARRIED_SIGNATURE
}

/// Where a malloc's glibc thread cache is found (see `tcache`): `function` is the probed
/// address, `got_delta` the GOT slot's distance from it (0: no prediction for this
/// library), `library` its check budget.
#[derive(Clone, Copy)]
pub struct CacheAt {
    pub function: u64,
    pub got_delta: i32,
    pub library: u32,
}

impl CacheAt {
    pub const NONE: Self = Self {
        function: 0,
        got_delta: 0,
        library: 0,
    };
}

/// A malloc or calloc under a uprobe session: carried in the session's cookie when it is
/// the outermost call (no call that could nest it is in flight anywhere) or a signal
/// handler's call, which saves looking up, filling and clearing the thread's slot.
/// Anything else takes [`enter`].
///
/// A malloc glibc's thread cache will serve (`cache` locates it) is recorded here and now,
/// and needs no return at all, except the ones kept for checking, which take the slot.
///
/// Returns whether its return must be seen.
#[inline(always)]
pub fn enter_carried(
    ctx: &ProbeContext,
    (kind, origin): (EventKind, Origin),
    size: Option<u64>,
    cache: CacheAt,
) -> bool {
    let Some(size) = size.filter(|&s| s <= CARRIED_SIZE_MAX) else {
        return enter(ctx, (kind, origin), size, 0, 0, 0);
    };
    if origin.may_nest || !carrying_allowed() {
        return enter(ctx, (kind, origin), Some(size), 0, 0, 0);
    }
    // A call in flight on this thread may nest this one, unless a signal interrupted it.
    let in_handler = outer_call_in_flight();
    if in_handler && !interrupted_call() {
        return enter(ctx, (kind, origin), Some(size), 0, 0, 0);
    }
    if !uprobe_traced() {
        return false;
    }
    let mut carried = CARRIED_SIGNATURE
        | (kind as u64) << CARRIED_KIND_SHIFT
        | u64::from(origin.allocator) << CARRIED_ALLOCATOR_SHIFT
        | size;
    if sample::enabled() {
        if !sample::take(size) {
            return false;
        }
        carried |= CARRIED_SAMPLED;
    } else if cache.got_delta != 0
        && !in_handler
        && tcache::allowed()
        && let Some(block) = tcache::cached_block(cache.function, cache.got_delta, size)
    {
        return predicted(ctx, (kind, origin), size, cache.library, block);
    }
    if in_handler {
        count(Counter::HandlerCalls);
    }
    // SAFETY: the session cookie is 8 writable bytes for this call alone.
    unsafe { *session_cookie() = carried };
    true
}

/// A malloc of `size` bytes that glibc's thread cache is about to serve with `block`
/// (exact mode only: sampling records too few calls for the saved trap to matter).
/// Recorded now, unless it is one to check: then it takes the slot and its return is seen.
#[inline(always)]
fn predicted(
    ctx: &ProbeContext,
    (kind, origin): (EventKind, Origin),
    size: u64,
    library: u32,
    block: u64,
) -> bool {
    if tcache::to_check(library) {
        let args = (0, 0, block);
        return enter_flagged(
            ctx,
            (kind, origin),
            Some(size),
            args,
            flags::CHECK_PREDICTION,
        );
    }
    count(Counter::Predicted);
    let call = InFlight {
        size,
        kind: pack_kind(kind, origin.allocator),
        flags: flags::PREDICTED,
        ..InFlight::default()
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let event = emit::completed(&call, pid_tgid, block);
    let caller = CallerRegs::at_entry(ctx);
    new_block(caller, (pid_tgid >> 32) as u32, event);
    false
}

/// Whether this thread's recorded call is in flight and a signal handler interrupted it.
#[inline(always)]
fn interrupted_call() -> bool {
    CALLS
        .current()
        .is_some_and(|call| call.active != 0 && call.signals != 0)
}

/// `signal:signal_deliver`: a handler is about to run on this thread. If a recorded call is
/// in flight, the handler's own calls must not be folded into it.
#[inline(always)]
pub fn signal_delivered(ctx: &TracePointContext) -> u32 {
    let at = tracepoint_fields()[tracer_common::tracepoint_fields::SIGNAL_HANDLER];
    if at == 0 {
        return 0;
    }
    // SAFETY: a field of this tracepoint's record, at the offset its format file gives.
    let handler: u64 = unsafe { ctx.read_at(at as usize) }.unwrap_or(0);
    if handler <= 1 {
        return 0; // SIG_DFL or SIG_IGN: no handler runs
    }
    if let Some(call) = CALLS.current()
        && call.active != 0
    {
        call.signals = call.signals.saturating_add(1);
    }
    0
}

/// `rt_sigreturn`: a handler is done. (One that leaves with `longjmp` never gets here; the
/// call it interrupted is then abandoned too, and found stale at the thread's next entry.)
#[inline(always)]
pub fn signal_returned() -> u32 {
    if let Some(call) = CALLS.current()
        && call.active != 0
        && call.signals != 0
    {
        call.signals -= 1;
    }
    0
}

/// A session's return: a carried call is completed from its cookie, any other from the
/// thread's slot.
#[inline(always)]
pub fn session_exit(ctx: &RetProbeContext) -> u32 {
    // SAFETY: the session cookie, as written at the call (or still zero).
    let carried = unsafe { *session_cookie() };
    if !is_carried(carried) {
        return exit(ctx);
    }
    let call = InFlight {
        size: carried & CARRIED_SIZE_MAX,
        kind: ((carried >> CARRIED_KIND_SHIFT) & 0x7) as u16
            | (((carried >> CARRIED_ALLOCATOR_SHIFT) & 0xff) as u16) << 8,
        flags: if carried & CARRIED_SAMPLED != 0 {
            flags::SAMPLED
        } else {
            0
        },
        ..InFlight::default()
    };
    complete(ctx, &call);
    0
}
