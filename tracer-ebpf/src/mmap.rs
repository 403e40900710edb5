//! The mmap family, from syscall tracepoints: every caller is seen, including allocators that
//! bypass libc's wrappers. Entry arguments wait in `SYSCALLS` until the exit gives the
//! result; `munmap` is emitted at entry, before the range can be handed out again.
//!
//! Syscall tracepoint records are laid out as: 8 bytes of common header, the syscall number
//! at 8, then each argument (or the return value) as 8 bytes from offset 16.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task, bpf_probe_read_kernel},
    programs::{RetProbeContext, TracePointContext},
};
use tracer_common::{Counter, EventKind, InFlight, flags, return_walk};

use crate::{
    alloc, emit, kfile,
    maps::{CALLS, SYSCALL_SLOTS, count, is_traced, now_ns, return_walk_offsets},
};

fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    // SAFETY: reads within the tracepoint record, checked by the helper.
    unsafe { ctx.read_at::<u64>(16 + 8 * n) }.unwrap_or(0)
}

fn traced_thread() -> Option<u64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    is_traced((pid_tgid >> 32) as u32).then_some(pid_tgid)
}

/// Whether the thread is inside an allocator call: one in its slot, or one a uprobe session
/// carries (rare path: only mapping syscalls and libc's `mmap` returns ask).
fn inside_allocator() -> u16 {
    if CALLS.current().is_some_and(|call| call.active != 0) || inside_carried_call() {
        flags::INSIDE_ALLOCATOR
    } else {
        0
    }
}

/// Pending returns looked at, innermost first (a mapping inside malloc has libc's `mmap`
/// and perhaps an internal call or two between them).
const RETURNS_WALKED: usize = 8;
/// Consumers looked at per pending return (ours is the first unless another tool put a
/// return probe on the same function first).
const CONSUMERS_WALKED: u32 = 4;

/// Walks the kernel's list of the thread's pending uprobe returns for the cookie of a
/// carried allocator call (`alloc::enter_carried`), at the offsets userspace found in BTF.
fn inside_carried_call() -> bool {
    let off = return_walk_offsets();
    if off[return_walk::FOUND] == 0 {
        return false;
    }
    // SAFETY: the helper returns the running task; every read below goes through the
    // helper, which fails cleanly on a bad address.
    let task = unsafe { bpf_get_current_task() };
    let at = |base: u64, offset: u32| base + u64::from(offset);
    let Some(utask) = read::<u64>(at(task, off[return_walk::TASK_UTASK])).filter(|&p| p != 0)
    else {
        return false;
    };
    let mut ret = read::<u64>(at(utask, off[return_walk::UTASK_RETURNS])).unwrap_or(0);
    for _ in 0..RETURNS_WALKED {
        if ret == 0 {
            break;
        }
        // Only the consumers counted hold cookies: the kernel records none for plain return
        // probes (libc's `mmap` return), and a recycled instance keeps an old cookie in its
        // inline slot — a carried malloc's, long returned.
        let consumers = read::<i32>(at(ret, off[return_walk::RETURN_CONSUMER_COUNT]))
            .unwrap_or(0)
            .max(0) as u32;
        let first = read::<u64>(at(ret, off[return_walk::RETURN_FIRST_COOKIE])).unwrap_or(0);
        if consumers > 0 && alloc::is_carried(first) {
            return true;
        }
        if consumers > 1 {
            let extra = read::<u64>(at(ret, off[return_walk::RETURN_EXTRA])).unwrap_or(0);
            for i in 0..CONSUMERS_WALKED - 1 {
                if extra == 0 || i + 1 >= consumers {
                    break;
                }
                let entry = extra + u64::from(i * off[return_walk::CONSUMER_SIZE]);
                let cookie = read::<u64>(at(entry, off[return_walk::CONSUMER_COOKIE]));
                if cookie.is_some_and(alloc::is_carried) {
                    return true;
                }
            }
        }
        ret = read::<u64>(at(ret, off[return_walk::RETURN_NEXT])).unwrap_or(0);
    }
    false
}

fn read<T>(addr: u64) -> Option<T> {
    // SAFETY: reads kernel memory through the helper, which fails cleanly.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

/// Holds a traced thread's syscall arguments until its exit: (size, old address, aux) as
/// the exit's event will carry them.
fn remember(kind: EventKind, size: u64, old_addr: u64, aux: u64) -> u32 {
    if traced_thread().is_none() {
        return 0;
    }
    let flags = inside_allocator();
    let Some(slot) = SYSCALL_SLOTS.current_or_create() else {
        count(Counter::SyscallsFull);
        return 0;
    };
    *slot = InFlight {
        start_ns: now_ns(),
        size,
        old_addr,
        aux,
        kind: kind as u16,
        flags,
        active: 1,
        ..InFlight::default()
    };
    0
}

const PROT_EXEC: u64 = 4;
const MAP_ANONYMOUS: u64 = 0x20;

/// `mmap(addr, len, prot, flags, fd, off)`: the fd travels as `old_addr`, prot and flags as
/// `aux`. An executable file mapping also notes the file's identity and offset (in the
/// slot's `out_ptr` and `entry_sp`, unused by syscalls) for a `MapFile` event at the exit.
pub fn enter_mmap(ctx: &TracePointContext) -> u32 {
    let (prot, flags, fd) = (arg(ctx, 2), arg(ctx, 3), arg(ctx, 4));
    let prot_flags = (prot << 32) | (flags & 0xffff_ffff);
    let done = remember(EventKind::Mmap, arg(ctx, 1), fd, prot_flags);
    if prot & PROT_EXEC != 0
        && flags & MAP_ANONYMOUS == 0
        && (fd as i64) >= 0
        && let Some(slot) = SYSCALL_SLOTS.current().filter(|s| s.active != 0)
        && let Some(file) = kfile::of_fd(fd)
    {
        slot.out_ptr = file.ino;
        slot.entry_sp = (u64::from(file.dev) << 32) | (arg(ctx, 5) >> 12) & 0xffff_ffff;
    }
    done
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
    let Some(slot) = SYSCALL_SLOTS.current().filter(|s| s.active != 0) else {
        return 0;
    };
    slot.active = 0;
    let call = *slot;
    let pid_tgid = bpf_get_current_pid_tgid();
    let ret = arg(ctx, 0);
    if ret >= (-4095i64) as u64 {
        return 0; // -errno: nothing changed
    }
    emit::without_stack(emit::completed(&call, pid_tgid, ret));
    if call.kind == EventKind::Mmap as u16 && call.out_ptr != 0 {
        let mut mapped = emit::instant(EventKind::MapFile as u16, pid_tgid, ret, call.size, 0);
        mapped.old_addr = call.out_ptr;
        mapped.aux = call.entry_sp;
        emit::lifecycle(mapped);
    }
    0
}

/// `munmap(addr, len)`, emitted at entry.
pub fn enter_munmap(ctx: &TracePointContext) -> u32 {
    let Some(pid_tgid) = traced_thread() else {
        return 0;
    };
    let flags = inside_allocator();
    let (addr, len) = (arg(ctx, 0), arg(ctx, 1));
    let kind = EventKind::Munmap as u16;
    emit::without_stack(emit::instant(kind, pid_tgid, addr, len, flags));
    0
}

/// What a session on libc's `mmap` leaves in its cookie when the return is wanted: a
/// signature no carried allocator call has (see `alloc::is_carried`).
const MAP_CALLER_MARK: u64 = 0x3a9 << 52;

/// libc's `mmap` called, in a uprobe session: its return is wanted only when the program
/// itself called it (the allocators' own mappings have their call site in their blocks).
/// Returns the session's answer: 0 to see the return, 1 to skip it.
#[inline(always)]
pub fn session_enter() -> u32 {
    if traced_thread().is_none() || inside_allocator() != 0 {
        return 1;
    }
    // SAFETY: the session cookie is 8 writable bytes for this call alone.
    unsafe { *alloc::session_cookie() = MAP_CALLER_MARK };
    0
}

/// Whether the running session's return is one [`session_enter`] asked for.
#[inline(always)]
pub fn is_caller_session() -> bool {
    // SAFETY: the session cookie, as written at the call (or still zero).
    unsafe { *alloc::session_cookie() == MAP_CALLER_MARK }
}

/// Return of libc's `mmap` to the program (not to an allocator): its stack names the call
/// site of the mapping the exit tracepoint already reported. Run by `mmap_return` where
/// uprobe sessions are missing, else by the session program, so that the one stack walk
/// there is verified once at load. Inlined: as a call of its own, its frame would join the
/// walk's on the BPF stack, past the 512 bytes the verifier allows a chain of calls.
#[inline(always)]
pub fn caller_of_mmap(ctx: &RetProbeContext) -> u32 {
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
    emit::with_stack(
        emit::CallerRegs::at_return(ctx),
        emit::instant(EventKind::MapCaller as u16, pid_tgid, addr, 0, 0),
    );
    0
}
