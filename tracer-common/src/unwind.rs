//! Compact unwind tables the kernel walks stacks with (`dwarf` stack mode).
//!
//! Userspace compiles each module's CFI (`.eh_frame`, `.debug_frame`) once per file into
//! sorted [`UnwindRow`]s, all modules' rows in one array map (`UNWIND_ROWS`), and lists per
//! traced process where each module is mapped ([`ProcessModules`], in `PROCESS_MODULES`).
//! The kernel finds a return address's module, then its row, and from the row computes the
//! caller's frame: the few rules an x86-64 unwind needs, nothing else.

/// One row: from `pc` (the module's virtual address, as in its file, below 4 GiB) until the
/// next row's `pc`, the canonical frame address (CFA) and the caller's `rbp` are found so.
/// The return address is always the word at CFA - 8 (rows where it is not say so in `cfa`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnwindRow {
    pub pc: u32,
    /// Added to the register `cfa` names (for [`cfa::PLT`]: the `rip & 15` threshold).
    pub cfa_offset: i32,
    /// Where `rbp` was saved, from the CFA (for [`rbp::AT_CFA`]).
    pub rbp_offset: i32,
    /// One of [`cfa`].
    pub cfa: u8,
    /// One of [`rbp`].
    pub rbp: u8,
    pub _pad: u16,
}

/// 16 bytes: the kernel rounds an array's elements up to 8 bytes anyway, and userspace
/// writes the rows straight into the map's memory at that stride.
const _: () = assert!(core::mem::size_of::<UnwindRow>() == 16);

/// How a row finds the CFA, or why it cannot.
pub mod cfa {
    /// `rsp + offset`.
    pub const RSP: u8 = 0;
    /// `rbp + offset`.
    pub const RBP: u8 = 1;
    /// A PLT stub's expression: `rsp + 8`, plus 8 when `(rip & 15) >= offset`.
    pub const PLT: u8 = 2;
    /// The return address is undefined: this frame is the outermost (`_start`, a thread's
    /// start). The stack ends here, complete.
    pub const END: u8 = 3;
    /// A rule the kernel does not evaluate (other expressions, signal frames, a return
    /// address not at CFA - 8): the stack ends here, marked truncated.
    pub const UNSUPPORTED: u8 = 4;
    /// No CFI covers this address (a gap between functions, code without CFI): the caller
    /// is found through the frame pointer, as in `fp` mode.
    pub const FRAME_POINTER: u8 = 5;
}

/// Where the caller's `rbp` is.
pub mod rbp {
    /// Unchanged (not saved by this frame).
    pub const SAME: u8 = 0;
    /// Saved at CFA + `rbp_offset`.
    pub const AT_CFA: u8 = 1;
}

/// A module file by identity, as the kernel sees it: its device in the kernel's encoding
/// (major << 20 | minor) and its inode.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TableKey {
    pub ino: u64,
    pub dev: u64,
}

/// A module file's table in `UNWIND_ROWS`, found by identity when a return address is in code
/// its process's list does not cover yet (just `exec`ed, just loaded): the kernel asks for the
/// mapping holding the address, and turns it into the table's addresses itself.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileTable {
    pub first_row: u32,
    pub rows: u32,
    /// Virtual address minus file offset of the file's executable segment.
    pub delta: u64,
}

/// Module files `FILE_TABLES` holds.
pub const FILE_TABLE_ENTRIES: u32 = 8192;

/// Executable mappings one process's list holds; code past them unwinds through copies.
pub const MAX_PROCESS_MODULES: usize = 192;

/// One executable mapping of a traced process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModuleRange {
    pub start: u64,
    pub end: u64,
    /// Load bias: a mapped address minus the module's virtual address for it.
    pub bias: u64,
    /// The module's first row in `UNWIND_ROWS`.
    pub first_row: u32,
    /// Its number of rows; 0: no table yet (or none fits), and the event's stack is copied
    /// for userspace to unwind instead.
    pub rows: u32,
}

/// How a process's stacks are captured, and, for [`walk::TABLES`], where its code is.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcessModules {
    /// One of [`walk`].
    pub walk: u32,
    /// Entries of `modules` in use, sorted by `start`.
    pub count: u32,
    pub modules: [ModuleRange; MAX_PROCESS_MODULES],
}

impl Default for ProcessModules {
    fn default() -> Self {
        Self {
            walk: walk::FRAME_POINTERS,
            count: 0,
            modules: [ModuleRange::default(); MAX_PROCESS_MODULES],
        }
    }
}

/// Which way a process's stacks are captured ([`ProcessModules::walk`]; the `DEFAULT_WALK`
/// global for processes not listed).
pub mod walk {
    /// Frame pointers, walked in the kernel.
    pub const FRAME_POINTERS: u32 = 0;
    /// Unwind tables, walked in the kernel (frame pointers where no CFI covers the code):
    /// found through the process's list, else through the mapping and `FILE_TABLES`.
    pub const TABLES: u32 = 1;
    /// The top of the stack copied for userspace to unwind.
    pub const COPY: u32 = 2;
}

/// Rows `UNWIND_ROWS` holds by default (16 bytes each: 32 MiB of kernel memory); Debian's
/// libc needs 28 k, python3 65 k, a 20 MB Rust release binary 107 k.
pub const DEFAULT_UNWIND_ROWS: u32 = 2 << 20;

/// The last frame of a walked stack that could not go on (an unsupported rule): the stack
/// is truncated there, never continued with a guess.
pub const TRUNCATED_FRAME: u64 = u64::MAX;
