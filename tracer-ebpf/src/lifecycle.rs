//! Processes coming and going: a traced process's fork (a new process, not a thread), its
//! `exec`, its end. Forks of traced processes are followed here, in the kernel, so a child is
//! traced from its first instruction; the events tell the collector to attach the child's
//! probes, reread mappings, and end a process's state.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::bpf_get_current_ancestor_cgroup_id,
    },
    programs::TracePointContext,
};
use tracer_common::{EventKind, admission, tracepoint_fields as field};

use crate::{
    emit, kfile,
    maps::{
        PROCESS_MODULES, TARGETS, add_target, admission, follow_forks, global_at, is_traced,
        remove_target, tracepoint_fields,
    },
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
    if followed {
        inherit_stack_walk((pid_tgid >> 32) as u32, child);
    }
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

/// A forked child has its parent's code at the same addresses: its stacks are captured as
/// its parent's from its first instruction, until userspace lists it itself.
#[inline(always)]
fn inherit_stack_walk(parent: u32, child: u32) {
    // SAFETY: the value is only read, and copied whole by the helper.
    if let Some(list) = unsafe { PROCESS_MODULES.get(&parent) } {
        let _ = PROCESS_MODULES.insert(&child, list, 0);
    }
}

/// Whether the current process passes `system`'s filters (`tracer_common::Admission`).
fn admitted() -> bool {
    let a = admission();
    // SAFETY: field pointers into the static filter.
    let (comms, excluded, cgroups) = unsafe {
        (
            global_at(&raw const (*a).comms) as usize,
            global_at(&raw const (*a).excluded) as usize,
            global_at(&raw const (*a).cgroups) as usize,
        )
    };
    let Ok(comm) = bpf_get_current_comm() else {
        return false;
    };
    let named = |list: *const [[u8; 16]; admission::MAX], n: usize| {
        for i in 0..admission::MAX {
            if i >= n {
                break;
            }
            // SAFETY: `i` < MAX: inside the array.
            let name: [u8; 16] = global_at(unsafe { (list as *const [u8; 16]).add(i) });
            if name == comm {
                return true;
            }
        }
        false
    };
    // SAFETY: field pointers into the static filter.
    if excluded > 0 && named(unsafe { &raw const (*a).exclude }, excluded) {
        return false;
    }
    if comms > 0 && !named(unsafe { &raw const (*a).comm }, comms) {
        return false;
    }
    if cgroups == 0 {
        return true;
    }
    for i in 0..admission::MAX {
        if i >= cgroups {
            break;
        }
        // SAFETY: `i` < MAX: inside the array.
        let [id, level] = global_at(unsafe { (&raw const (*a).cgroup as *const [u64; 2]).add(i) });
        // SAFETY: a helper without pointer arguments.
        if unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) } == id {
            return true;
        }
    }
    false
}

/// `system`: a process that execs starts being traced when it passes the filters, and stops
/// when it no longer does (an exit event ends it for the collector). True if traced after.
fn admit_on_exec(tgid: u32, pid_tgid: u64) -> bool {
    let was = is_traced(tgid);
    // SAFETY: a field pointer into the static filter.
    if global_at(unsafe { &raw const (*admission()).on_exec }) == 0 {
        return was;
    }
    match (was, admitted()) {
        (false, true) => add_target(tgid),
        (true, false) => {
            emit::lifecycle(emit::instant(EventKind::Exit as u16, pid_tgid, 0, 0, 0));
            remove_target(tgid);
            false
        }
        (was, _) => was,
    }
}

/// `sched_process_exec`, in the process that replaced its program: with the new program's
/// layout and the name it was started by, so its stacks can be symbolized even if it is gone
/// before the collector looks.
pub fn exec(ctx: &TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !admit_on_exec((pid_tgid >> 32) as u32, pid_tgid) {
        return 0;
    }
    // The old program's code is gone: until userspace lists the new one's, its stacks are
    // walked as before but through the new mappings (an empty list).
    if let Some(list) = PROCESS_MODULES.get_ptr_mut(&((pid_tgid >> 32) as u32)) {
        // SAFETY: a map value, replaced whole by userspace, never freed under us.
        unsafe { (*list).count = 0 };
    }
    let mut event = emit::instant(EventKind::Exec as u16, pid_tgid, 0, 0, 0);
    if let Some(layout) = kfile::layout() {
        event.addr = layout.phdr;
        event.size = layout.interp_base;
        event.old_addr = layout.exe.ino;
        event.aux = u64::from(layout.exe.dev);
    }
    let name_at = tracepoint_fields()[field::EXEC_FILENAME];
    let loc = if name_at != 0 {
        read::<u32>(ctx, name_at).unwrap_or(0)
    } else {
        0
    };
    // `__data_loc`: the string's offset in the record (low half) and length (high half).
    let name = (loc != 0).then(|| ctx.as_ptr() as u64 + u64::from(loc & 0xffff));
    emit::exec(event, name);
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
    // The probe hits it took, counted in its `TARGETS` entry (when counted).
    // SAFETY: the value is read once; a hit racing the exit is not possible (last thread).
    let traps = unsafe { TARGETS.get(&tgid) }.copied().unwrap_or(0);
    emit::lifecycle(emit::instant(EventKind::Exit as u16, pid_tgid, 0, traps, 0));
    let _ = PROCESS_MODULES.remove(&tgid);
    if follow_forks() {
        remove_target(tgid);
    }
    0
}
