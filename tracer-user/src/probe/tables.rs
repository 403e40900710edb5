//! Every allocator's probes, as data: for each family, the entry points its callers use, what
//! each one does (its role), and whether it may be missing. One table per allocator, so adding
//! an allocator is adding a table, not code.

use tracer_common::{EventKind, allocator};

/// What a probed function does with its arguments, which decides the program that runs at
/// its entry (and return) and the event it reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// `(size, …)` → a block (malloc, `operator new`, `mallocx`, `mi_malloc_aligned` …).
    Malloc,
    /// `(count, size, …)` → a zeroed block (calloc, `mi_mallocn` …).
    Calloc,
    /// `(ptr, size, …)` → the block moved or resized (realloc, `rallocx` …).
    Realloc,
    /// `(ptr, count, size)` → realloc of count × size.
    ReallocArray,
    /// `(out, alignment, size)` → 0 and `*out` set.
    PosixMemalign,
    /// `(alignment, size)` → a block.
    AlignedAlloc,
    /// `(size)` → a page-aligned block.
    Valloc,
    Pvalloc,
    /// `(ptr, …)`: the block ends (free, `sdallocx`, sized and aligned `operator delete` …).
    Free,
    /// libc's `mmap` wrapper, probed at its return: the call site of a mapping the program
    /// makes itself.
    MmapReturn,
}

impl Role {
    /// The program run at the function's entry, if any (the non-session path).
    pub fn entry_program(self) -> Option<&'static str> {
        Some(match self {
            Role::Malloc => "malloc_enter",
            Role::Calloc => "calloc_enter",
            Role::Realloc => "realloc_enter",
            Role::ReallocArray => "reallocarray_enter",
            Role::PosixMemalign => "posix_memalign_enter",
            Role::AlignedAlloc => "aligned_alloc_enter",
            Role::Valloc => "valloc_enter",
            Role::Pvalloc => "pvalloc_enter",
            Role::Free => "free_enter",
            Role::MmapReturn => return None,
        })
    }

    /// The program run at the function's return, if any (the non-session path).
    pub fn return_program(self) -> Option<&'static str> {
        match self {
            Role::Free => None,
            Role::MmapReturn => Some("mmap_return"),
            _ => Some("alloc_return"),
        }
    }

    /// The kind a uprobe session is told in its cookie, for roles the session program
    /// serves: every role but `free`, whose return is never wanted. `reallocarray` (whose
    /// return glibc's tail call to realloc always needs) and libc's `mmap` (whose return is
    /// wanted only outside allocators) save no trap as sessions; they are sessions so that
    /// the session program is the only one that captures stacks, and is verified alone.
    pub fn session_kind(self) -> Option<EventKind> {
        Some(match self {
            Role::Malloc => EventKind::Malloc,
            Role::Calloc => EventKind::Calloc,
            Role::Realloc => EventKind::Realloc,
            Role::ReallocArray => EventKind::ReallocArray,
            Role::MmapReturn => EventKind::MapCaller,
            Role::PosixMemalign => EventKind::PosixMemalign,
            Role::AlignedAlloc => EventKind::AlignedAlloc,
            Role::Valloc => EventKind::Valloc,
            Role::Pvalloc => EventKind::Pvalloc,
            _ => return None,
        })
    }

    /// Probed after its pointer argument's NULL check, where one is recognised (a first
    /// instruction `test %rdi,%rdi` is single-stepped, ≈13× dearer than an emulated one).
    pub fn skips_null_check(self) -> bool {
        self == Role::Free
    }

    /// The argument registers its probes read (`tracer-ebpf/src/main.rs`): an instruction
    /// writing one of them must not run before the probe.
    pub fn argument_registers(self) -> &'static [iced_x86::Register] {
        use iced_x86::Register::{R8, R9, RCX, RDI, RDX, RSI};
        match self {
            Role::Malloc | Role::Free | Role::Valloc | Role::Pvalloc => &[RDI],
            Role::Calloc | Role::Realloc | Role::AlignedAlloc => &[RDI, RSI],
            Role::ReallocArray | Role::PosixMemalign => &[RDI, RSI, RDX],
            Role::MmapReturn => &[RDI, RSI, RDX, RCX, R8, R9],
        }
    }

    /// Whether it hands out blocks (rather than ending them, or mapping memory).
    pub fn allocates(self) -> bool {
        !matches!(self, Role::Free | Role::MmapReturn)
    }

    /// Part of the allocator fast path the floor measurement mirrors.
    pub fn in_floor(self) -> bool {
        self != Role::MmapReturn
    }
}

/// One function of an allocator: its name (after the allocator's prefix) and its role. Any
/// may be missing: a statically linked allocator keeps only what its program calls (Rust's
/// `mimalloc` crate calls `mi_malloc_aligned`, never `mi_malloc`).
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub symbol: &'static str,
    pub role: Role,
}

const fn fun(symbol: &'static str, role: Role) -> Entry {
    Entry { symbol, role }
}

/// The C library's malloc API: glibc's, musl's, or another libc's, and the compatibility
/// layer every other allocator exports.
const C_API: &[Entry] = &[
    fun("malloc", Role::Malloc),
    fun("free", Role::Free),
    fun("calloc", Role::Calloc),
    fun("realloc", Role::Realloc),
    fun("reallocarray", Role::ReallocArray),
    fun("posix_memalign", Role::PosixMemalign),
    fun("aligned_alloc", Role::AlignedAlloc),
    fun("memalign", Role::AlignedAlloc),
    fun("valloc", Role::Valloc),
    fun("pvalloc", Role::Pvalloc),
];

/// C++ `operator new` and `operator delete` in every variant (plain, nothrow, sized, aligned),
/// probed where an allocator defines them itself: its `new` does not go through `malloc`.
const CXX: &[Entry] = &[
    fun("_Znwm", Role::Malloc),
    fun("_Znam", Role::Malloc),
    fun("_ZnwmRKSt9nothrow_t", Role::Malloc),
    fun("_ZnamRKSt9nothrow_t", Role::Malloc),
    fun("_ZnwmSt11align_val_t", Role::Malloc),
    fun("_ZnamSt11align_val_t", Role::Malloc),
    fun("_ZnwmSt11align_val_tRKSt9nothrow_t", Role::Malloc),
    fun("_ZnamSt11align_val_tRKSt9nothrow_t", Role::Malloc),
    fun("_ZdlPv", Role::Free),
    fun("_ZdaPv", Role::Free),
    fun("_ZdlPvm", Role::Free),
    fun("_ZdaPvm", Role::Free),
    fun("_ZdlPvRKSt9nothrow_t", Role::Free),
    fun("_ZdaPvRKSt9nothrow_t", Role::Free),
    fun("_ZdlPvSt11align_val_t", Role::Free),
    fun("_ZdaPvSt11align_val_t", Role::Free),
    fun("_ZdlPvmSt11align_val_t", Role::Free),
    fun("_ZdaPvmSt11align_val_t", Role::Free),
    fun("_ZdlPvSt11align_val_tRKSt9nothrow_t", Role::Free),
    fun("_ZdaPvSt11align_val_tRKSt9nothrow_t", Role::Free),
];

/// jemalloc's own API beside the C one (`je_`, `_rjem_` or no prefix).
const JEMALLOC: &[Entry] = &[
    fun("mallocx", Role::Malloc),
    fun("rallocx", Role::Realloc),
    fun("dallocx", Role::Free),
    fun("sdallocx", Role::Free),
    fun("free_sized", Role::Free),
    fun("free_aligned_sized", Role::Free),
];

/// gperftools' tcmalloc: its `tc_` names (mostly aliases of the C ones, probed once).
const TCMALLOC: &[Entry] = &[
    fun("tc_malloc", Role::Malloc),
    fun("tc_free", Role::Free),
    fun("tc_calloc", Role::Calloc),
    fun("tc_realloc", Role::Realloc),
    fun("tc_cfree", Role::Free),
    fun("tc_free_sized", Role::Free),
    fun("tc_memalign", Role::AlignedAlloc),
    fun("tc_posix_memalign", Role::PosixMemalign),
    fun("tc_valloc", Role::Valloc),
    fun("tc_pvalloc", Role::Pvalloc),
    fun("tc_malloc_skip_new_handler", Role::Malloc),
    fun("tc_new", Role::Malloc),
    fun("tc_newarray", Role::Malloc),
    fun("tc_new_nothrow", Role::Malloc),
    fun("tc_newarray_nothrow", Role::Malloc),
    fun("tc_new_aligned", Role::Malloc),
    fun("tc_newarray_aligned", Role::Malloc),
    fun("tc_new_aligned_nothrow", Role::Malloc),
    fun("tc_newarray_aligned_nothrow", Role::Malloc),
    fun("tc_delete", Role::Free),
    fun("tc_deletearray", Role::Free),
    fun("tc_delete_nothrow", Role::Free),
    fun("tc_deletearray_nothrow", Role::Free),
    fun("tc_delete_sized", Role::Free),
    fun("tc_deletearray_sized", Role::Free),
    fun("tc_delete_aligned", Role::Free),
    fun("tc_deletearray_aligned", Role::Free),
    fun("tc_delete_sized_aligned", Role::Free),
    fun("tc_deletearray_sized_aligned", Role::Free),
    fun("tc_delete_aligned_nothrow", Role::Free),
    fun("tc_deletearray_aligned_nothrow", Role::Free),
];

/// mimalloc's `mi_` API, including the `_aligned` variants Rust's `mimalloc` crate calls.
const MIMALLOC: &[Entry] = &[
    fun("mi_malloc", Role::Malloc),
    fun("mi_free", Role::Free),
    fun("mi_zalloc", Role::Malloc),
    fun("mi_malloc_small", Role::Malloc),
    fun("mi_zalloc_small", Role::Malloc),
    fun("mi_malloc_aligned", Role::Malloc),
    fun("mi_malloc_aligned_at", Role::Malloc),
    fun("mi_zalloc_aligned", Role::Malloc),
    fun("mi_zalloc_aligned_at", Role::Malloc),
    fun("mi_new", Role::Malloc),
    fun("mi_new_nothrow", Role::Malloc),
    fun("mi_new_aligned", Role::Malloc),
    fun("mi_new_aligned_nothrow", Role::Malloc),
    fun("mi_calloc", Role::Calloc),
    fun("mi_mallocn", Role::Calloc),
    fun("mi_new_n", Role::Calloc),
    fun("mi_calloc_aligned", Role::Calloc),
    fun("mi_calloc_aligned_at", Role::Calloc),
    fun("mi_realloc", Role::Realloc),
    fun("mi_reallocf", Role::Realloc),
    fun("mi_realloc_aligned", Role::Realloc),
    fun("mi_realloc_aligned_at", Role::Realloc),
    fun("mi_new_realloc", Role::Realloc),
    fun("mi_reallocn", Role::ReallocArray),
    fun("mi_reallocarray", Role::ReallocArray),
    fun("mi_new_reallocn", Role::ReallocArray),
    fun("mi_posix_memalign", Role::PosixMemalign),
    fun("mi_aligned_alloc", Role::AlignedAlloc),
    fun("mi_memalign", Role::AlignedAlloc),
    fun("mi_valloc", Role::Valloc),
    fun("mi_pvalloc", Role::Pvalloc),
    fun("mi_free_size", Role::Free),
    fun("mi_free_aligned", Role::Free),
    fun("mi_free_size_aligned", Role::Free),
    fun("mi_cfree", Role::Free),
];

/// libc's `mmap` wrapper, whose return names the call site of the program's own mappings.
const MMAP: &[Entry] = &[fun("mmap", Role::MmapReturn)];

/// An allocator family alloctrace can probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    Glibc,
    Jemalloc,
    Tcmalloc,
    Mimalloc,
    /// A C library's malloc compiled into an executable: musl's, a static glibc's, or any
    /// other exporting the C API.
    Libc,
}

impl Family {
    pub fn id(self) -> u8 {
        match self {
            Family::Glibc => allocator::GLIBC,
            Family::Jemalloc => allocator::JEMALLOC,
            Family::Tcmalloc => allocator::TCMALLOC,
            Family::Mimalloc => allocator::MIMALLOC,
            Family::Libc => allocator::LIBC,
        }
    }

    pub fn of_id(id: u8) -> Option<Self> {
        Some(match id {
            allocator::GLIBC => Family::Glibc,
            allocator::JEMALLOC => Family::Jemalloc,
            allocator::TCMALLOC => Family::Tcmalloc,
            allocator::MIMALLOC => Family::Mimalloc,
            allocator::LIBC => Family::Libc,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::Glibc => "glibc",
            Family::Jemalloc => "jemalloc",
            Family::Tcmalloc => "tcmalloc",
            Family::Mimalloc => "mimalloc",
            Family::Libc => "libc",
        }
    }

    /// The tables of this family's functions, each read with the allocator's prefix.
    pub fn tables(self) -> &'static [&'static [Entry]] {
        match self {
            Family::Glibc => &[C_API, MMAP],
            Family::Jemalloc => &[C_API, JEMALLOC, CXX],
            Family::Tcmalloc => &[C_API, TCMALLOC, CXX],
            Family::Mimalloc => &[MIMALLOC, C_API, CXX],
            Family::Libc => &[C_API, MMAP],
        }
    }

    /// Whether its exported functions may call one another (mimalloc's `mi_new` calls
    /// `mi_malloc`; jemalloc's aligned `operator new` calls its exported `aligned_alloc`
    /// through the PLT; musl's calloc calls malloc): their calls are then recorded in the
    /// thread's slot, where the inner call is recognised as nested and not counted twice.
    pub fn may_nest(self) -> bool {
        matches!(self, Family::Mimalloc | Family::Jemalloc | Family::Libc)
    }
}

/// The C++ operators are probed only in the module that defines the allocator itself, and
/// without a prefix (a prefixed jemalloc leaves `operator new` to the C++ library).
pub fn table_applies(table: &[Entry], prefix: &str) -> bool {
    !(std::ptr::eq(table, CXX) && !prefix.is_empty())
}

/// An allocator found in a module (by the discovery stage, `targets`), and its functions
/// there: what `probe::attach` puts probes on.
#[derive(Clone, Debug)]
pub struct Found {
    pub family: Family,
    /// What its functions' names start with (`je_`, `_rjem_`, or nothing).
    pub prefix: String,
    pub points: Vec<Point>,
    /// For glibc's malloc: where its thread cache is found (see `super::tcache`).
    pub tcache_got: Option<i32>,
}

impl Found {
    /// `jemalloc`, `jemalloc (je_)`.
    pub fn label(&self) -> String {
        if self.prefix.is_empty() || self.family == Family::Mimalloc {
            self.family.name().to_owned()
        } else {
            format!("{} ({})", self.family.name(), self.prefix)
        }
    }
}

/// One function to probe in a module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Point {
    pub symbol: String,
    pub role: Role,
    /// File offset of its first instruction.
    pub offset: u64,
    /// Where the entry probe goes, from the first instruction (past a NULL check).
    pub entry_offset: u64,
}
