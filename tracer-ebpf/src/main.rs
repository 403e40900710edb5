//! alloctrace's kernel side: captures facts (who, what address, how many bytes, which stack,
//! when) and counts every loss. It never judges: deciding what is live, leaked or retained is
//! userspace's job.
//!
//! Entry points are one-line shims; the shared work is in `alloc` (entry → return pairing),
//! `free`, `emit` (ring-buffer records and stacks) and `maps` (maps, globals, the filter).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The BPF target has atomic add but no compare-and-swap: the intrinsic reaches the former.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod alloc;
#[cfg(target_arch = "bpf")]
mod emit;
#[cfg(target_arch = "bpf")]
mod free;
#[cfg(target_arch = "bpf")]
mod kfile;
#[cfg(target_arch = "bpf")]
mod lifecycle;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod mmap;
#[cfg(target_arch = "bpf")]
mod sample;
#[cfg(target_arch = "bpf")]
mod tcache;
#[cfg(target_arch = "bpf")]
mod unwind;

#[cfg(target_arch = "bpf")]
mod programs {
    use core::ffi::c_void;

    use aya_ebpf::{
        EbpfContext as _,
        helpers::generated::{bpf_get_attach_cookie, bpf_get_func_ip},
        macros::{tracepoint, uprobe, uretprobe},
        programs::{ProbeContext, RetProbeContext, TracePointContext},
    };
    use tracer_common::{EventKind, attach_cookie};

    use crate::{
        alloc::{self, Origin},
        free, lifecycle, mmap,
    };

    fn arg(ctx: &ProbeContext, n: usize) -> u64 {
        ctx.arg::<u64>(n).unwrap_or(0)
    }

    /// A plain uprobe's return value means nothing: its uretprobe fires either way.
    fn plain(_recorded: bool) -> u32 {
        0
    }

    /// `count * size`, or `None` when it may overflow. The BPF backend has no 128-bit multiply
    /// (which `checked_mul` and its division spelling both lower to), so compare bit lengths:
    /// exact for every product below 2^63, i.e. for every size an allocator can satisfy.
    fn mul_size(count: u64, size: u64) -> Option<u64> {
        if count == 0 || size == 0 {
            return Some(0);
        }
        let bits = (64 - count.leading_zeros()) + (64 - size.leading_zeros());
        if bits <= 63 { Some(count * size) } else { None }
    }

    /// The allocator and nesting of the probe that fired, from its attach cookie (perf-event
    /// uprobes carry none: the unknown allocator, no nesting).
    fn origin(ctx: &ProbeContext) -> Origin {
        // SAFETY: the helper only reads the probe's run context.
        Origin::of_cookie(unsafe { bpf_get_attach_cookie(ctx.as_ptr()) })
    }

    #[uprobe]
    pub fn malloc_enter(ctx: ProbeContext) -> u32 {
        plain(malloc(&ctx, origin(&ctx)))
    }

    #[uprobe]
    pub fn calloc_enter(ctx: ProbeContext) -> u32 {
        plain(calloc(&ctx, origin(&ctx)))
    }

    #[uprobe]
    pub fn realloc_enter(ctx: ProbeContext) -> u32 {
        plain(realloc(&ctx, origin(&ctx)))
    }

    #[uprobe]
    pub fn reallocarray_enter(ctx: ProbeContext) -> u32 {
        plain(reallocarray(&ctx, origin(&ctx)))
    }

    #[uprobe]
    pub fn posix_memalign_enter(ctx: ProbeContext) -> u32 {
        plain(posix_memalign(&ctx, origin(&ctx)))
    }

    #[uprobe]
    pub fn aligned_alloc_enter(ctx: ProbeContext) -> u32 {
        plain(aligned_alloc(&ctx, origin(&ctx)))
    }

    #[uprobe]
    pub fn valloc_enter(ctx: ProbeContext) -> u32 {
        plain(page_aligned(&ctx, (EventKind::Valloc, origin(&ctx))))
    }

    #[uprobe]
    pub fn pvalloc_enter(ctx: ProbeContext) -> u32 {
        plain(page_aligned(&ctx, (EventKind::Pvalloc, origin(&ctx))))
    }

    /// The allocation functions as uprobe sessions (kernel ≥ 6.13; userspace loads these
    /// itself, as aya cannot): one program runs at the call and at its return, and a call that
    /// recorded nothing (unsampled, nested, or in an untraced process) returns 1, which tells
    /// the kernel to skip that call's return trap. The attach cookie says which function.
    ///
    /// Written without aya's `#[uprobe]` macro, whose wrapper always returns 0.
    ///
    /// Stacks are walked or copied as the traced process's entry in `PROCESS_MODULES` says.
    /// libc's `mmap` is a session here too, so that this is the one program that captures
    /// stacks: the verifier checks the walk once per program, ≈0.15 s each time.
    #[unsafe(no_mangle)]
    #[unsafe(link_section = "uprobe.multi")]
    pub fn alloc_session(ctx: *mut c_void) -> u32 {
        let ctx = &ProbeContext::new(ctx);
        // SAFETY: the helper only reads the probe's run context.
        let function = unsafe { bpf_get_func_ip(ctx.as_ptr()) };
        // SAFETY: a uprobe's context is the user registers. At the call they stand on the
        // function's first instruction; at its return, in the caller.
        if unsafe { (*ctx.regs).rip } != function {
            let ret = RetProbeContext::new(ctx.as_ptr());
            if mmap::is_caller_session() {
                return mmap::caller_of_mmap(&ret);
            }
            return alloc::session_exit(&ret);
        }
        // SAFETY: as above.
        let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
        let origin = Origin::of_cookie(cookie);
        let recorded = match EventKind::from_raw((cookie & attach_cookie::KIND_MASK) as u16) {
            Some(EventKind::Calloc) => {
                let size = mul_size(arg(ctx, 0), arg(ctx, 1));
                let who = (EventKind::Calloc, origin);
                alloc::enter_carried(ctx, who, size, alloc::CacheAt::NONE)
            }
            Some(EventKind::Realloc) => realloc(ctx, origin),
            Some(EventKind::ReallocArray) => reallocarray(ctx, origin),
            Some(EventKind::MapCaller) => return mmap::session_enter(),
            Some(EventKind::PosixMemalign) => posix_memalign(ctx, origin),
            Some(EventKind::AlignedAlloc) => aligned_alloc(ctx, origin),
            Some(kind @ (EventKind::Valloc | EventKind::Pvalloc)) => {
                page_aligned(ctx, (kind, origin))
            }
            _ => {
                let cache = alloc::CacheAt {
                    function,
                    got_delta: (cookie >> attach_cookie::TCACHE_GOT_SHIFT) as i32,
                    library: attach_cookie::library(cookie),
                };
                let size = Some(arg(ctx, 0));
                let who = (EventKind::Malloc, origin);
                alloc::enter_carried(ctx, who, size, cache)
            }
        };
        u32::from(!recorded)
    }

    // What each function's entry records, from its arguments; true if its return is wanted.

    fn malloc(ctx: &ProbeContext, origin: Origin) -> bool {
        alloc::enter(ctx, (EventKind::Malloc, origin), Some(arg(ctx, 0)), 0, 0, 0)
    }

    fn calloc(ctx: &ProbeContext, origin: Origin) -> bool {
        let size = mul_size(arg(ctx, 0), arg(ctx, 1));
        alloc::enter(ctx, (EventKind::Calloc, origin), size, 0, 0, 0)
    }

    fn realloc(ctx: &ProbeContext, origin: Origin) -> bool {
        let (old, size) = (arg(ctx, 0), arg(ctx, 1));
        alloc::enter(ctx, (EventKind::Realloc, origin), Some(size), old, 0, 0)
    }

    fn reallocarray(ctx: &ProbeContext, origin: Origin) -> bool {
        let size = mul_size(arg(ctx, 1), arg(ctx, 2));
        let who = (EventKind::ReallocArray, origin);
        alloc::enter(ctx, who, size, arg(ctx, 0), 0, 0)
    }

    fn posix_memalign(ctx: &ProbeContext, origin: Origin) -> bool {
        let (out, align, size) = (arg(ctx, 0), arg(ctx, 1), arg(ctx, 2));
        let who = (EventKind::PosixMemalign, origin);
        alloc::enter(ctx, who, Some(size), 0, out, align)
    }

    /// `aligned_alloc` and `memalign` share one address in glibc; both take (alignment, size).
    fn aligned_alloc(ctx: &ProbeContext, origin: Origin) -> bool {
        let (align, size) = (arg(ctx, 0), arg(ctx, 1));
        let who = (EventKind::AlignedAlloc, origin);
        alloc::enter(ctx, who, Some(size), 0, 0, align)
    }

    /// `valloc` and `pvalloc` take the size alone.
    fn page_aligned(ctx: &ProbeContext, who: (EventKind, Origin)) -> bool {
        alloc::enter(ctx, who, Some(arg(ctx, 0)), 0, 0, 0)
    }

    /// One return program serves every allocation function: the in-flight record says which.
    #[uretprobe]
    pub fn alloc_return(ctx: RetProbeContext) -> u32 {
        alloc::exit(&ctx)
    }

    #[uprobe]
    pub fn free_enter(ctx: ProbeContext) -> u32 {
        free::enter(&ctx, arg(&ctx, 0), origin(&ctx).allocator)
    }

    /// libc's `mmap` returning to the program: the call site of its mapping.
    #[uretprobe]
    pub fn mmap_return(ctx: RetProbeContext) -> u32 {
        mmap::caller_of_mmap(&ctx)
    }

    #[tracepoint]
    pub fn sys_enter_mmap(ctx: TracePointContext) -> u32 {
        mmap::enter_mmap(&ctx)
    }

    #[tracepoint]
    pub fn sys_exit_mmap(ctx: TracePointContext) -> u32 {
        mmap::exit(&ctx)
    }

    #[tracepoint]
    pub fn sys_enter_munmap(ctx: TracePointContext) -> u32 {
        mmap::enter_munmap(&ctx)
    }

    #[tracepoint]
    pub fn sys_enter_mremap(ctx: TracePointContext) -> u32 {
        mmap::enter_mremap(&ctx)
    }

    #[tracepoint]
    pub fn sys_exit_mremap(ctx: TracePointContext) -> u32 {
        mmap::exit(&ctx)
    }

    #[tracepoint]
    pub fn sys_enter_brk(ctx: TracePointContext) -> u32 {
        mmap::enter_brk(&ctx)
    }

    #[tracepoint]
    pub fn sys_exit_brk(ctx: TracePointContext) -> u32 {
        mmap::exit(&ctx)
    }

    #[tracepoint]
    pub fn process_exec(ctx: TracePointContext) -> u32 {
        lifecycle::exec(&ctx)
    }

    #[tracepoint]
    pub fn signal_deliver(ctx: TracePointContext) -> u32 {
        alloc::signal_delivered(&ctx)
    }

    #[tracepoint]
    pub fn sys_enter_rt_sigreturn(_ctx: TracePointContext) -> u32 {
        alloc::signal_returned()
    }

    #[tracepoint]
    pub fn task_newtask(ctx: TracePointContext) -> u32 {
        lifecycle::new_task(&ctx)
    }

    #[tracepoint]
    pub fn process_exit(ctx: TracePointContext) -> u32 {
        lifecycle::exit(&ctx)
    }

    /// Empty programs: the uprobe floor `cargo xtask bench` compares against (the trap cost
    /// alone, which no uprobe-based tracer can go below).
    #[uprobe]
    pub fn floor_enter(_ctx: ProbeContext) -> u32 {
        0
    }

    #[uretprobe]
    pub fn floor_return(_ctx: RetProbeContext) -> u32 {
        0
    }

    /// The two-trap floor: an empty session on each allocation function that skips its
    /// return (with `floor_enter` on `free`): the least any exact uprobe tracer can pay per
    /// malloc/free pair, entry and free trapped once each.
    #[unsafe(no_mangle)]
    #[unsafe(link_section = "uprobe.multi")]
    pub fn floor_session(_ctx: *mut c_void) -> u32 {
        1
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic.
    unsafe { core::hint::unreachable_unchecked() }
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
