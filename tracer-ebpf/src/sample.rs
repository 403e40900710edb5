//! Poisson byte sampling, decided here so unsampled calls cost no event and no stack.
//!
//! Each CPU counts down the bytes allocated on it; the allocation that crosses the count is
//! sampled and a fresh gap is drawn from an exponential distribution with the mean the user
//! chose. Gaps being memoryless, an allocation of `s` bytes is sampled with probability
//! `1 - exp(-s / mean)` whatever came before it, which userspace inverts into its weight.

use tracer_common::{BlockKey, Counter, SAMPLED_FILTER_SLOTS, Sampler};

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::helpers::generated::bpf_get_smp_processor_id;

use crate::maps::{
    RECORDED_CALLS, SAMPLED, SAMPLED_FILTER, SAMPLER, count, sample_bytes, sample_seed, shared_add,
    shared_nonzero,
};

/// `log2(1 + i/16)` in Q16, for the fraction of the logarithm (linear in between).
const LOG2_FRAC: [u64; 17] = [
    0, 5732, 11136, 16248, 21098, 25711, 30109, 34312, 38336, 42196, 45904, 49472, 52911, 56229,
    59434, 62534, 65536,
];
/// ln 2 in Q16.
const LN2_Q16: u64 = 45426;

/// Whether byte sampling is on.
#[inline(always)]
pub fn enabled() -> bool {
    sample_bytes() != 0
}

/// Whether an allocation of `size` bytes is sampled (counting it down on this CPU).
#[inline(always)]
pub fn take(size: u64) -> bool {
    let Some(state) = SAMPLER.get_ptr_mut(0) else {
        return true; // cannot happen; err on the side of recording
    };
    // SAFETY: this CPU's slot; programs do not migrate while running.
    let state = unsafe { &mut *state };
    let size = size.max(1);
    if state.rng == 0 {
        // Each CPU draws its own sequence from the one seed.
        // SAFETY: the helper takes no arguments and cannot fail.
        let cpu = u64::from(unsafe { bpf_get_smp_processor_id() });
        state.rng = (sample_seed() ^ cpu.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
        state.remaining = gap(state);
    }
    if size < state.remaining {
        state.remaining -= size;
        return false;
    }
    state.remaining = gap(state);
    true
}

/// An exponential gap with the configured mean: `-ln(U) * mean` for U uniform in (0, 1].
#[inline(always)]
fn gap(state: &mut Sampler) -> u64 {
    // xorshift64*
    let mut x = state.rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    state.rng = x;
    let u = (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) + 1; // 1 ..= 2^32
    // log2(u) in Q16 from its leading bit and a table for the fraction.
    let msb = 63 - u.leading_zeros() as u64;
    let mantissa = (u << (63 - msb)) << 1; // fraction bits at the top
    let idx = (mantissa >> 60) as usize & 15;
    let within = (mantissa >> 44) & 0xffff; // position between table entries, Q16
    let lo = LOG2_FRAC[idx];
    let hi = LOG2_FRAC[idx + 1];
    let frac = lo + (((hi - lo) * within) >> 16);
    let log2_u = (msb << 16) + frac;
    let neg_log2 = (32u64 << 16).saturating_sub(log2_u); // -log2(u / 2^32), Q16
    let mean = sample_bytes();
    (((mean.min(1 << 40) * neg_log2) >> 16) * LN2_Q16 >> 16).max(1)
}

/// Remembers a sampled block, so its free is reported; false if the map is full.
#[inline(always)]
pub fn remember(tgid: u32, addr: u64) -> bool {
    if SAMPLED.insert(&key(tgid, addr), &1, 0).is_err() {
        count(Counter::SampledFull);
        return false;
    }
    filter_add(addr, 1);
    true
}

/// False when no live sampled block (of any process) has `addr`'s filter slot: one array
/// read, without even the pid.
#[inline(always)]
fn maybe_sampled(addr: u64) -> bool {
    let Some(slot) = SAMPLED_FILTER.get_ptr(filter_slot(addr)) else {
        return true;
    };
    // SAFETY: an aligned array slot, only read.
    unsafe { core::ptr::read_volatile(slot) != 0 }
}

/// Whether `addr` is a live sampled block of process `tgid()`: almost always answered by the
/// filter alone, before the pid is even read.
#[inline(always)]
pub fn is_sampled(addr: u64, tgid: impl FnOnce() -> u32) -> bool {
    // SAFETY: only tested for presence.
    maybe_sampled(addr) && unsafe { SAMPLED.get(&key(tgid(), addr)) }.is_some()
}

/// Forgets a block; true if it was a sampled one (and this caller the one that removed it).
#[inline(always)]
pub fn forget(tgid: u32, addr: u64) -> bool {
    if SAMPLED.remove(&key(tgid, addr)).is_err() {
        return false;
    }
    filter_add(addr, u32::MAX); // wrapping -1
    true
}

fn key(tgid: u32, addr: u64) -> BlockKey {
    BlockKey {
        addr,
        tgid,
        _pad: 0,
    }
}

#[inline(always)]
fn filter_slot(addr: u64) -> u32 {
    let h = (addr >> 4).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> 32) as u32 & (SAMPLED_FILTER_SLOTS - 1)
}

/// Counts a recorded call in (`1`) or out (`u64::MAX`, a wrapping -1).
#[inline(always)]
pub fn recorded_calls_add(delta: u64) {
    shared_add(&RECORDED_CALLS, delta);
}

/// False when no recorded call is in flight on any thread.
#[inline(always)]
pub fn any_recorded_call() -> bool {
    shared_nonzero(&RECORDED_CALLS)
}

#[inline(always)]
fn filter_add(addr: u64, delta: u32) {
    if let Some(slot) = SAMPLED_FILTER.get_ptr_mut(filter_slot(addr)) {
        // SAFETY: an aligned array slot, shared by all CPUs: updated with the BPF atomic add
        // (the BPF target has no compare-and-swap, so `AtomicU64::fetch_add` is unavailable).
        unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(slot, delta) };
    }
}
