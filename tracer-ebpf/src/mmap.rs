//! The mmap family, from syscall tracepoints: every caller is seen, including allocators that
//! bypass libc's wrappers. Entry arguments wait in `SYSCALLS` until the exit gives the
//! result; `munmap` is emitted at entry, before the range can be handed out again.
//!
//! Syscall tracepoint records are laid out as: 8 bytes of common header, the syscall number
//! at 8, then each argument (or the return value) as 8 bytes from offset 16.

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::bpf_get_current_pid_tgid,
    programs::{RetProbeContext, TracePointContext},
};
use tracer_common::{Counter, EventKind, InFlight, flags};

use crate::{
    emit::{self, StackMode},
    maps::{CALLS, SYSCALLS, count, is_traced, now_ns},
};

fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    // SAFETY: reads within the tracepoint record, checked by the helper.
    unsafe { ctx.read_at::<u64>(16 + 8 * n) }.unwrap_or(0)
}

fn traced_thread() -> Option<u64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    is_traced((pid_tgid >> 32) as u32).then_some(pid_tgid)
}

fn inside_allocator() -> u16 {
    if CALLS.current().is_some_and(|call| call.active != 0) {
        flags::INSIDE_ALLOCATOR
    } else {
        0
    }
}

/// Holds a traced thread's syscall arguments until its exit: (size, old address, aux) as
/// the exit's event will carry them.
fn remember(kind: EventKind, size: u64, old_addr: u64, aux: u64) -> u32 {
    let Some(pid_tgid) = traced_thread() else {
        return 0;
    };
    let call = InFlight {
        start_ns: now_ns(),
        size,
        old_addr,
        aux,
        kind: kind as u16,
        flags: inside_allocator(),
        ..InFlight::default()
    };
    if SYSCALLS.insert(&pid_tgid, &call, BPF_ANY.into()).is_err() {
        count(Counter::SyscallsFull);
    }
    0
}

/// `mmap(addr, len, prot, flags, fd, off)`: the fd travels as `old_addr`, prot and flags as
/// `aux`.
pub fn enter_mmap(ctx: &TracePointContext) -> u32 {
    let prot_flags = (arg(ctx, 2) << 32) | (arg(ctx, 3) & 0xffff_ffff);
    remember(EventKind::Mmap, arg(ctx, 1), arg(ctx, 4), prot_flags)
}

/// `mremap(addr, old_len, new_len, flags, new_addr)`: the old length travels as `aux`.
pub fn enter_mremap(ctx: &TracePointContext) -> u32 {
    remember(EventKind::Mremap, arg(ctx, 2), arg(ctx, 0), arg(ctx, 1))
}

/// `brk(addr)`: the requested break travels as `aux`.
pub fn enter_brk(ctx: &TracePointContext) -> u32 {
    remember(EventKind::Brk, 0, 0, arg(ctx, 0))
}

/// Exit of mmap, mremap or brk: emit the result if the call succeeded.
pub fn exit(ctx: &TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: this thread's own entry, copied out before removal.
    let Some(call) = (unsafe { SYSCALLS.get(&pid_tgid) }).copied() else {
        return 0;
    };
    let _ = SYSCALLS.remove(&pid_tgid);
    let ret = arg(ctx, 0);
    if ret >= (-4095i64) as u64 {
        return 0; // -errno: nothing changed
    }
    emit::without_stack(emit::completed(&call, pid_tgid, ret));
    0
}

/// `munmap(addr, len)`, emitted at entry.
pub fn enter_munmap(ctx: &TracePointContext) -> u32 {
    let Some(pid_tgid) = traced_thread() else {
        return 0;
    };
    let flags = inside_allocator();
    let (addr, len) = (arg(ctx, 0), arg(ctx, 1));
    emit::without_stack(emit::instant(EventKind::Munmap, pid_tgid, addr, len, flags));
    0
}

/// Return of libc's `mmap` to the program (not to an allocator): its stack names the call
/// site of the mapping the exit tracepoint already reported.
pub fn caller_of_mmap(ctx: &RetProbeContext, mode: StackMode) -> u32 {
    let Some(pid_tgid) = traced_thread() else {
        return 0;
    };
    if inside_allocator() != 0 {
        return 0;
    }
    let addr: u64 = ctx.ret();
    if addr >= (-4095i64) as u64 {
        return 0;
    }
    emit::with_stack_mode(
        ctx,
        mode,
        emit::instant(EventKind::MapCaller, pid_tgid, addr, 0, 0),
    );
    0
}
