//! A malloc's result, predicted at its entry from glibc's thread cache (layout and bins in
//! `tracer_common::tcache`): for a size whose bin holds a block, malloc returns exactly the
//! bin's first block, taken with no lock and no system call. The call is then recorded at
//! once and its return is not trapped, which saves a third of the traps of a malloc/free
//! pair.
//!
//! Reading another library's private state can only be trusted as far as it is checked:
//! each CPU checks the first `PREDICTION_CHECK_FIRST` predictions of each predicted library
//! (its own budget, so one library's good record never vouches for another's), then one in
//! `PREDICTION_CHECK_EVERY`, against the call's real return (those calls are recorded from
//! the return as usual, the prediction kept in the thread's own slot). One wrong prediction
//! switches prediction off for good, and the report says so.
//!
//! The cache is found afresh at every prediction, as malloc itself finds it: the thread
//! pointer from the task, the variable's offset from the library's GOT, the variable through
//! both. A remembered address would outlive the cache it named (glibc frees it in
//! `tcache_thread_shutdown`, and a runtime may move the thread pointer); this read sees what
//! malloc is about to see, whichever libc copy (`dlmopen`) the probe was hit in.

use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_user};
use tracer_common::{Counter, PREDICTION_CHECK_EVERY, PREDICTION_CHECK_FIRST, tcache};

use crate::maps::{
    PREDICTION_WRONG, PREDICTIONS, count, prediction_skew, shared_add, shared_nonzero, task_fsbase,
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

/// The thread's `tcache_perthread_struct`, read as malloc is about to read it (null
/// before glibc made it and after `tcache_thread_shutdown` released it).
#[inline(always)]
fn thread_cache(function: u64, got_delta: i32) -> Option<u64> {
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
    (cache != 0).then_some(cache)
}

#[inline(always)]
fn user<T>(addr: u64) -> Option<T> {
    // SAFETY: reads user memory through the helper, which fails cleanly on a bad address.
    unsafe { bpf_probe_read_user(addr as *const T) }.ok()
}

/// Whether this prediction, by predicted library `library`, is one to check at its return.
///
/// The sequence is this CPU's; a program preempting another between its read and write
/// (fully preemptible kernels only) can at worst make one more or one fewer call checked.
#[inline(always)]
pub fn to_check(library: u32) -> bool {
    let Some(seq) = PREDICTIONS.get_ptr_mut(library) else {
        return true;
    };
    // SAFETY: this CPU's slot for the library.
    let seq = unsafe { &mut *seq };
    let n = *seq;
    *seq = n + 1;
    n < PREDICTION_CHECK_FIRST || n & (PREDICTION_CHECK_EVERY - 1) == 0
}

/// At the return of a call whose prediction `predicted` was kept for checking (in the
/// thread's slot): compares it with the real result `ret`.
#[inline(always)]
pub fn check(predicted: u64, ret: u64) {
    count(Counter::PredictionChecked);
    if predicted != ret {
        count(Counter::PredictionWrong);
        shared_add(&PREDICTION_WRONG, 1);
    }
}
