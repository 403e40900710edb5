//! `free`: emitted at entry, before the allocator can hand the block to anyone else, so the
//! ring buffer always orders a block's free before the next allocation of its address.

use aya_ebpf::helpers::bpf_get_current_pid_tgid;
use tracer_common::{Counter, EventKind};

use crate::{
    emit,
    maps::{INFLIGHT, count, uprobe_traced},
};

#[inline(always)]
pub fn enter(addr: u64) -> u32 {
    if addr == 0 {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if !uprobe_traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    // SAFETY: only tested for presence.
    if unsafe { INFLIGHT.get(&pid_tgid) }.is_some() {
        // Inside realloc (e.g. realloc(p, 0) calls free): the realloc's return reports it.
        count(Counter::NestedFree);
        return 0;
    }
    if crate::sample::enabled() && !crate::sample::forget((pid_tgid >> 32) as u32, addr) {
        return 0; // not a sampled block: nothing to report
    }
    emit::without_stack(emit::instant(EventKind::Free, pid_tgid, addr, 0, 0));
    0
}
