//! `free`: emitted at entry, before the allocator can hand the block to anyone else, so the
//! ring buffer always orders a block's free before the next allocation of its address.

use aya_ebpf::{helpers::bpf_get_current_pid_tgid, programs::ProbeContext};
use tracer_common::{Counter, EventKind, pack_kind};

use crate::{
    alloc::{Relation, outer_call_in_flight, relation, user_sp},
    emit,
    maps::{CALLS, count, current_tgid, uprobe_traced},
    sample,
};

#[inline(always)]
pub fn enter(ctx: &ProbeContext, addr: u64, allocator: u8) -> u32 {
    if addr == 0 {
        return 0;
    }
    if !uprobe_traced() {
        return 0;
    }
    // Sampling: most frees are of unsampled blocks and end at the filter's array read.
    let sampling = sample::enabled();
    if sampling && !sample::is_sampled(addr, current_tgid) {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if outer_call_in_flight()
        && let Some(call) = CALLS.current()
    {
        match relation(call, user_sp(ctx)) {
            Relation::Nested => {
                // Inside realloc (e.g. realloc(p, 0) calls free): its return reports it.
                count(Counter::NestedFree);
                return 0;
            }
            // A signal handler's free while the call it interrupted is in flight.
            Relation::Handler => count(Counter::HandlerCalls),
            Relation::Idle | Relation::Stale => {}
        }
    }
    if sampling && !sample::forget(tgid, addr) {
        return 0; // another thread's free of the same block won the race
    }
    let kind = pack_kind(EventKind::Free, allocator);
    emit::without_stack(emit::instant(kind, pid_tgid, addr, 0, 0));
    0
}
