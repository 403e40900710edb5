//! A malloc's result, predicted at its entry from glibc's thread cache (layout and bins in
//! `tracer_common::tcache`): for a size whose bin holds a block, malloc returns exactly the
//! bin's first block, taken with no lock and no system call. The call is then recorded at
//! once and its return is not trapped, which saves a third of the traps of a malloc/free
//! pair.
//!
//! Reading another library's private state can only be trusted as far as it is checked:
//! each CPU checks its first `PREDICTION_CHECK_FIRST` predictions, then one in
//! `PREDICTION_CHECK_EVERY`, against the call's real return (those calls are recorded from
//! the return as usual). One wrong prediction switches prediction off for good, and the
//! report says so.

use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_user};
use tracer_common::{Counter, PREDICTION_CHECK_EVERY, PREDICTION_CHECK_FIRST, tcache};

use crate::maps::{
    PREDICTION_WRONG, PREDICTIONS, THREAD_CACHES, count, prediction_skew, shared_add,
    shared_nonzero, task_fsbase,
};

/// Whether predictions may be made (none has been found wrong).
#[inline(always)]
pub fn allowed() -> bool {
    !shared_nonzero(&PREDICTION_WRONG)
}

/// The block a malloc of `size` bytes, entered at `function`, is about to take from the
/// thread's cache, if it will. `got_delta` locates the cache (see the attach cookie).
///
/// A bin's first entry is non-null exactly while its count is non-zero (glibc pushes and
/// pops both together, and the last block's link decodes to null), so the count, which
/// malloc itself tests, is not read.
#[inline(always)]
pub fn cached_block(function: u64, got_delta: i32, size: u64) -> Option<u64> {
    if size > tcache::MAX_REQUEST {
        return None;
    }
    let cache = thread_cache(function, got_delta)?;
    let block: u64 = user(cache + tcache::ENTRIES_OFFSET + 8 * tcache::bin_of(size))?;
    (block != 0 && block & 15 == 0).then_some(block + prediction_skew())
}

/// The thread's `tcache_perthread_struct`, remembered once glibc has made it.
#[inline(always)]
fn thread_cache(function: u64, got_delta: i32) -> Option<u64> {
    if let Some(&mut cache) = THREAD_CACHES.current()
        && cache != 0
    {
        return Some(cache);
    }
    let fsbase_at = task_fsbase();
    if fsbase_at == 0 {
        return None;
    }
    // SAFETY: the helper returns the running task; the read goes through the helper,
    // which fails cleanly.
    let fsbase: u64 = unsafe {
        let task = bpf_get_current_task();
        bpf_probe_read_kernel((task + u64::from(fsbase_at)) as *const u64)
    }
    .ok()?;
    let tpoff: u64 = user(function.wrapping_add_signed(i64::from(got_delta)))?;
    let cache: u64 = user(fsbase.wrapping_add(tpoff))?;
    if cache == 0 {
        return None; // not set up yet in this thread
    }
    if let Some(slot) = THREAD_CACHES.current_or_create() {
        *slot = cache;
    }
    Some(cache)
}

/// `exec` replaced the thread's program: its cache is gone with it.
#[inline(always)]
pub fn forget_thread() {
    THREAD_CACHES.delete_current();
}

#[inline(always)]
fn user<T>(addr: u64) -> Option<T> {
    // SAFETY: reads user memory through the helper, which fails cleanly on a bad address.
    unsafe { bpf_probe_read_user(addr as *const T) }.ok()
}

/// Whether the prediction `block` for thread `tid`'s call is one to check at its return; if
/// so it is remembered for [`check`].
#[inline(always)]
pub fn to_check(tid: u32, block: u64) -> bool {
    let Some(state) = PREDICTIONS.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: this CPU's slot; programs do not migrate while running.
    let state = unsafe { &mut *state };
    let seq = state.seq;
    state.seq = seq + 1;
    if seq >= PREDICTION_CHECK_FIRST && seq & (PREDICTION_CHECK_EVERY - 1) != 0 {
        return false;
    }
    state.tid = u64::from(tid);
    state.block = block;
    true
}

/// At the return of a call whose prediction was kept for checking: compares it with the
/// real result `ret`. (A thread that moved to another CPU in between is not checked.)
#[inline(always)]
pub fn check(tid: u32, ret: u64) {
    let Some(state) = PREDICTIONS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: as above.
    let state = unsafe { &mut *state };
    if state.tid != u64::from(tid) {
        return;
    }
    state.tid = 0;
    count(Counter::PredictionChecked);
    if state.block != ret {
        count(Counter::PredictionWrong);
        shared_add(&PREDICTION_WRONG, 1);
    }
}
