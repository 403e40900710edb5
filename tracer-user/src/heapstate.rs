//! What an allocator accounts for itself inside a traced process: how much memory it holds
//! free. After an attach, that is what tells "retained by the allocator" from "allocated
//! before the attach and still live", which the trace alone cannot.
//!
//! glibc's malloc keeps every arena's free chunks in lists it walks itself (`mallinfo`'s
//! `fordblks`): the top chunk, the fast bins and the 127 regular bins of `main_arena` and of
//! each arena linked from it. They are read here from `/proc/PID/mem`, without stopping the
//! process: reading another process's memory does not pause it, and a list changed under
//! the walk is detected (a chunk that is not a plausible chunk) and the walk retried. Per-
//! thread caches (`tcache`) are not reachable from outside, so the figure is a lower bound
//! by at most a few hundred KiB per thread.
//!
//! `main_arena` is a local symbol: it is found in the library's own symbol table or in its
//! detached debug symbols (`/usr/lib/debug/.build-id/…`, Debian's `libc6-dbg`). Its layout
//! is known for glibc 2.27 and later on x86-64 (2 200 bytes, checked against the symbol's
//! size); anything else reads as unknown, never as a guess.

use std::{fs::File, os::unix::fs::FileExt as _, path::Path};

use object::{Object as _, ObjectSymbol as _};

use crate::{analysis::AllocatorFree, probe::elf};

/// `sizeof(struct malloc_state)` of the layout below.
const ARENA_SIZE: u64 = 2200;
const FASTBINS_AT: u64 = 16;
const FASTBINS: u64 = 10;
const TOP_AT: u64 = 96;
const BINS_AT: u64 = 112;
const BINS: u64 = 127;
const NEXT_AT: u64 = 2160;
const SYSTEM_MEM_AT: u64 = 2184;
/// `offsetof(struct malloc_chunk, fd)`: a bin's header is addressed as a chunk this far
/// before its pointers.
const FD_AT: u64 = 16;
/// Chunks looked at in one walk, at most.
const MAX_CHUNKS: u64 = 2_000_000;
/// Walks begun again when a list changed under the previous one.
const ATTEMPTS: usize = 3;
/// Arenas followed at most (glibc makes 8 per core at most).
const MAX_ARENAS: usize = 1024;

/// Where glibc's arenas are in one libc file: found once, used for every process mapping it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GlibcArenas {
    /// Link-time address of `main_arena`.
    main_arena: u64,
    /// Fast-bin links are mangled with their address (safe-linking, glibc 2.32 and later).
    safe_linking: bool,
}

impl GlibcArenas {
    /// Finds `main_arena` in the libc at `path` (or its debug symbols); `None` when it cannot
    /// be found or its layout is not the known one.
    pub fn find(path: &Path) -> Option<Self> {
        let data = std::fs::read(path).ok()?;
        let file = object::File::parse(&*data).ok()?;
        let minor = elf::glibc_minor(&data)?;
        if minor < 27 {
            return None;
        }
        let symbol = |f: &object::File<'_>| {
            f.symbols()
                .find(|s| s.name() == Ok("main_arena") && s.size() == ARENA_SIZE)
                .map(|s| s.address())
        };
        let main_arena = symbol(&file).or_else(|| {
            let debug = std::fs::read(debug_file(&file)?).ok()?;
            symbol(&object::File::parse(&*debug).ok()?)
        })?;
        Some(Self {
            main_arena,
            safe_linking: minor >= 32,
        })
    }

    /// Free bytes in every arena of process `pid`, whose libc (the file this was found in,
    /// `data`) is loaded with bias `bias` (its run-time address minus its link-time one).
    pub fn free_bytes(&self, pid: u32, bias: u64) -> Option<AllocatorFree> {
        let mem = File::open(format!("/proc/{pid}/mem")).ok()?;
        let reader = Reader { mem };
        let head = self.main_arena.wrapping_add(bias);
        (0..ATTEMPTS).find_map(|_| {
            let bytes = self.walk(&reader, head)?;
            Some(AllocatorFree {
                bytes,
                source: "glibc's arenas".into(),
            })
        })
    }

    /// One walk of every arena; `None` when a list changed under it.
    fn walk(&self, r: &Reader, head: u64) -> Option<u64> {
        let mut budget = MAX_CHUNKS;
        let mut free = 0u64;
        let mut arena = head;
        for _ in 0..MAX_ARENAS {
            let system_mem = r.word(arena + SYSTEM_MEM_AT)?;
            let chunk = Chunk::sane(system_mem);
            free += chunk.size(r, r.word(arena + TOP_AT)?)?;
            for i in 0..FASTBINS {
                let first = r.word(arena + FASTBINS_AT + 8 * i)?;
                free += self.fast_bin(r, first, &chunk, &mut budget)?;
            }
            for i in 0..BINS {
                let header = arena + BINS_AT + 16 * i - FD_AT;
                free += bin(r, header, &chunk, &mut budget)?;
            }
            arena = r.word(arena + NEXT_AT)?;
            if arena == head {
                return Some(free);
            }
        }
        None
    }

    fn fast_bin(&self, r: &Reader, mut p: u64, chunk: &Chunk, budget: &mut u64) -> Option<u64> {
        let mut free = 0;
        while p != 0 {
            *budget = budget.checked_sub(1)?;
            free += chunk.size(r, p)?;
            let link = r.word(p + FD_AT)?;
            p = if self.safe_linking {
                ((p + FD_AT) >> 12) ^ link
            } else {
                link
            };
        }
        Some(free)
    }
}

/// Free bytes in one doubly linked bin, whose header chunk is at `header`.
fn bin(r: &Reader, header: u64, chunk: &Chunk, budget: &mut u64) -> Option<u64> {
    let mut free = 0;
    let mut p = r.word(header + FD_AT)?;
    while p != header {
        *budget = budget.checked_sub(1)?;
        free += chunk.size(r, p)?;
        p = r.word(p + FD_AT)?;
    }
    Some(free)
}

/// What a free chunk of an arena holding `system_mem` bytes can look like.
struct Chunk {
    max: u64,
}

impl Chunk {
    fn sane(system_mem: u64) -> Self {
        Self {
            max: system_mem.max(1 << 20),
        }
    }

    /// The size of the chunk at `p`; `None` if `p` cannot be a chunk of this arena (the list
    /// was being changed while it was read).
    fn size(&self, r: &Reader, p: u64) -> Option<u64> {
        if p & 15 != 0 {
            return None;
        }
        let size = r.word(p + 8)? & !7;
        (size >= 32 && size & 15 == 0 && size <= self.max).then_some(size)
    }
}

struct Reader {
    mem: File,
}

impl Reader {
    fn word(&self, addr: u64) -> Option<u64> {
        let mut buf = [0u8; 8];
        self.mem.read_exact_at(&mut buf, addr).ok()?;
        Some(u64::from_le_bytes(buf))
    }
}

/// The detached debug symbols of `file`, by its build-id (where distributions install them).
fn debug_file(file: &object::File<'_>) -> Option<std::path::PathBuf> {
    let id = file.build_id().ok()??;
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let (dir, rest) = hex.split_at_checked(2)?;
    let path = std::path::PathBuf::from(format!("/usr/lib/debug/.build-id/{dir}/{rest}.debug"));
    path.exists().then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This process's own glibc: its arenas are found and read, and a block freed into them
    /// shows up as free memory.
    #[test]
    fn reads_this_process_s_own_arenas() {
        let maps = crate::procfs::MapsSnapshot::read(std::process::id()).expect("own maps");
        let libc = maps
            .mappings()
            .iter()
            .find(|m| {
                m.path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("libc.so"))
            })
            .expect("linked with glibc");
        let Some(arenas) = GlibcArenas::find(&libc.path) else {
            panic!(
                "main_arena not found in {} or its debug symbols: install libc6-dbg \
                 (`cargo xtask setup` does)",
                libc.path.display()
            );
        };
        let bias = elf::load_bias(&libc.path, libc.start, libc.offset).expect("load bias");
        // The process is not stopped while it is read, and the other unit tests allocate
        // meanwhile: a walk that meets a list being changed gives up (as it must), so read
        // again, as a traced process's next sample would.
        let read = || {
            (0..50)
                .find_map(|_| arenas.free_bytes(std::process::id(), bias))
                .expect("arenas readable")
        };
        let free = read();
        assert_eq!(free.source, "glibc's arenas");
        // A 16 MiB region of 16 KiB blocks, all freed but the last (which pins the top):
        // at least 15 MiB of it is then free inside the allocator.
        let blocks: Vec<Vec<u8>> = (0..1024).map(|_| vec![1u8; 16 << 10]).collect();
        let before = read().bytes;
        let mut blocks = blocks;
        let last = blocks.pop();
        drop(blocks);
        let after = read().bytes;
        assert!(after >= before + (15 << 20), "free {before} → {after}");
        drop(last);
    }
}
