//! Files as the kernel knows them (inode, device), read from the current task at the offsets
//! userspace found in BTF. They let the collector tell which file a process mapped, and where,
//! without reading `/proc` — so stacks of a process that has already exited can still be
//! symbolized (the collector keeps the files themselves open by identity).

use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel};
use tracer_common::file_walk as walk;

use crate::maps::file_walk_offsets;

/// A file's identity: its inode number and its device (the kernel's encoding).
#[derive(Clone, Copy)]
pub struct FileId {
    pub ino: u64,
    pub dev: u32,
}

/// The program's layout after an `exec`: its executable, and where it and its interpreter
/// were loaded.
pub struct Layout {
    pub exe: FileId,
    pub phdr: u64,
    pub interp_base: u64,
}

pub fn read<T>(addr: u64) -> Option<T> {
    // SAFETY: kernel memory read through the helper, which fails cleanly on a bad address.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

pub fn ptr(base: u64, offset: u32) -> Option<u64> {
    read::<u64>(base + u64::from(offset)).filter(|&p| p != 0)
}

pub fn offsets() -> Option<[u32; walk::LEN]> {
    let off = file_walk_offsets();
    (off[walk::FOUND] != 0).then_some(off)
}

fn current_task() -> u64 {
    // SAFETY: returns the running task's address; only read through the helper.
    unsafe { bpf_get_current_task() }
}

/// The identity of the `struct file` at `file`.
pub fn identity(off: &[u32; walk::LEN], file: u64) -> Option<FileId> {
    let inode = ptr(file, off[walk::FILE_INODE])?;
    let ino = read::<u64>(inode + u64::from(off[walk::INODE_INO]))?;
    let sb = ptr(inode, off[walk::INODE_SB])?;
    let dev = read::<u32>(sb + u64::from(off[walk::SB_DEV]))?;
    Some(FileId { ino, dev })
}

/// The file behind the current process's descriptor `fd`.
pub fn of_fd(fd: u64) -> Option<FileId> {
    let off = offsets()?;
    let files = ptr(current_task(), off[walk::TASK_FILES])?;
    let fdt = ptr(files, off[walk::FILES_FDT])?;
    let max = read::<u32>(fdt + u64::from(off[walk::FDT_MAX_FDS]))?;
    if fd >= u64::from(max) {
        return None;
    }
    let array = ptr(fdt, off[walk::FDT_FD])?;
    let file = read::<u64>(array + 8 * fd).filter(|&p| p != 0)?;
    identity(&off, file)
}

/// The current process's program, just loaded by `exec`.
pub fn layout() -> Option<Layout> {
    let off = offsets()?;
    let mm = ptr(current_task(), off[walk::TASK_MM])?;
    let exe = identity(&off, ptr(mm, off[walk::MM_EXE_FILE])?)?;
    let auxv = mm + u64::from(off[walk::MM_SAVED_AUXV]);
    let (mut phdr, mut interp_base) = (0, 0);
    for i in 0..walk::AUXV_PAIRS as u64 {
        let key = read::<u64>(auxv + 16 * i)?;
        let value = read::<u64>(auxv + 16 * i + 8)?;
        match key {
            walk::AT_NULL => break,
            walk::AT_PHDR => phdr = value,
            walk::AT_BASE => interp_base = value,
            _ => {}
        }
    }
    Some(Layout {
        exe,
        phdr,
        interp_base,
    })
}
