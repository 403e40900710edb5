//! Processes coming and going: a traced process's fork (a new process, not a thread), its
//! `exec`, its end. Forks of traced processes are followed here, in the kernel, so a child is
//! traced from its first instruction; the events tell the collector to attach the child's
//! probes, reread mappings, and end a process's state.

use aya_ebpf::{helpers::bpf_get_current_pid_tgid, programs::TracePointContext};
use tracer_common::{EventKind, tracepoint_fields as field};

use crate::{
    emit, kfile,
    maps::{add_target, follow_forks, is_traced, remove_target, tracepoint_fields},
};

fn read<T>(ctx: &TracePointContext, offset: u32) -> Option<T> {
    // SAFETY: reads within the tracepoint record, checked by the helper.
    unsafe { ctx.read_at::<T>(offset as usize) }.ok()
}

/// `task_newtask`, in the creating task: a new process forked by a traced one is traced too
/// (when forks are followed) and reported.
pub fn new_task(ctx: &TracePointContext) -> u32 {
    let off = tracepoint_fields();
    if off[field::FOUND] == 0 {
        return 0;
    }
    let flags: u64 = read(ctx, off[field::NEWTASK_FLAGS]).unwrap_or(field::CLONE_THREAD);
    if flags & field::CLONE_THREAD != 0 {
        return 0; // a thread of the same process
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if !is_traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    let Some(child) = read::<i32>(ctx, off[field::NEWTASK_PID]).filter(|&p| p > 0) else {
        return 0;
    };
    let child = child as u32;
    let followed = follow_forks() && add_target(child);
    let kind = EventKind::Fork as u16;
    // `size` says whether the child is traced from its first instruction.
    emit::lifecycle(emit::instant(
        kind,
        pid_tgid,
        u64::from(child),
        u64::from(followed),
        0,
    ));
    0
}

/// `sched_process_exec`, in the process that replaced its program: with the new program's
/// layout, so its stacks can be symbolized even if it is gone before the collector looks.
pub fn exec() -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !is_traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    let mut event = emit::instant(EventKind::Exec as u16, pid_tgid, 0, 0, 0);
    if let Some(layout) = kfile::layout() {
        event.addr = layout.phdr;
        event.size = layout.interp_base;
        event.old_addr = layout.exe.ino;
        event.aux = u64::from(layout.exe.dev);
    }
    emit::lifecycle(event);
    0
}

/// `sched_process_exit`, in an exiting task: the process ends with its last task (or, where
/// the kernel does not say which is last, with its leader).
pub fn exit(ctx: &TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let off = tracepoint_fields();
    let last = if off[field::FOUND] != 0 && off[field::EXIT_GROUP_DEAD] != 0 {
        read::<u8>(ctx, off[field::EXIT_GROUP_DEAD]).unwrap_or(0) != 0
    } else {
        pid_tgid as u32 == tgid
    };
    if !last || !is_traced(tgid) {
        return 0;
    }
    emit::lifecycle(emit::instant(EventKind::Exit as u16, pid_tgid, 0, 0, 0));
    if follow_forks() {
        remove_target(tgid);
    }
    0
}
