//! The kernel's walk of a user stack: frame pointers, or the modules' unwind tables (see
//! `tracer_common::unwind`), one frame per `bpf_loop` step.
//!
//! `bpf_loop` keeps the verifier's work to one pass over a step however deep the walk (a
//! plain bounded loop is verified once per iteration: 127 frames of table searches would
//! take seconds to load), and the kernel inlines it into a direct call per frame.

use core::ffi::c_void;

use aya_ebpf::helpers::generated::{
    bpf_find_vma, bpf_get_current_task_btf, bpf_loop, bpf_probe_read_user,
};
use tracer_common::{
    Event, MAX_STACK_DEPTH, file_walk,
    unwind::{MAX_PROCESS_MODULES, ModuleRange, ProcessModules, TableKey, UnwindRow, cfa, rbp},
};

use crate::{
    kfile,
    maps::{FILE_TABLES, STACK_SCRATCH, UNWIND_ROWS},
};

/// How a walk ended.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Ending {
    /// The outermost frame was reached, or the chain of frames ended.
    Complete = 0,
    /// A rule the kernel does not evaluate, or an unreadable caller frame under a table
    /// rule: the stack is cut there.
    Truncated = 1,
    /// A return address in code no table covers yet (a library loaded since the process's
    /// list was written, JIT code): the stack must be copied for userspace instead.
    NeedsCopy = 2,
}

/// The walk's state, on the BPF stack for `bpf_loop`'s steps.
#[repr(C)]
pub struct Walk {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    pub hash: u64,
    /// Where the return addresses go (`MAX_STACK_DEPTH` + 1 slots).
    pub frames: *mut u64,
    /// The process's modules (null: none listed yet).
    pub modules: *const ProcessModules,
    /// Non-zero: walk with tables (else frame pointers only).
    pub tables: u32,
    /// The caller's frame record when the entry read it with the return address.
    pub first: [u64; 2],
    pub has_first: u32,
    pub n: u32,
    pub limit: u32,
    pub ending: u32,
}

/// How much of the stack a table walk reads at once, at most: a user-memory read costs
/// ≈ 30 ns in this VM whatever its length up to a few hundred bytes, and a frame needs one
/// or two, so the frames that fit in one window (a deep C or python stack packs several per
/// KiB) share a read. A power of two: indexes into it are masked for the verifier.
pub const WINDOW_BYTES: usize = 2048;
const WINDOW_WORDS: usize = WINDOW_BYTES / 8;

/// The first window of a walk is this small, and each next one twice the last, up to
/// `WINDOW_BYTES`: most stacks are shallow (an allocation from a thread's loop is three
/// frames, often far apart), and reading 2 KiB where 16 bytes serve cost time and, worse,
/// evicted the program's own data from the cache; deep stacks soon read whole windows.
const FIRST_WINDOW_BYTES: u64 = 256;

/// Where the window lives, in words past the frames' first slot (in the same scratch
/// record; the BPF stack has no room for it): a header of two words, the user address of the
/// window's first byte and how many of its bytes are valid with, above bit 32, how long the
/// next window is to be (0: none read yet; `u64::MAX`: a window read failed, read frame by
/// frame from then on), then the window.
pub const WINDOW_AFTER_FRAMES: usize = MAX_STACK_DEPTH + 2 + 64;
pub const WINDOW_SCRATCH_BYTES: usize = 16 + WINDOW_BYTES;

/// Empties the window before a walk.
#[inline(always)]
pub fn clear_window(frames: *mut u64) {
    // SAFETY: the header is inside the scratch record (see WINDOW_AFTER_FRAMES).
    unsafe { *frames.add(WINDOW_AFTER_FRAMES + 1) = 0 };
}

/// Walks from the state `walk` was set up with: `walk.n` frames, hashed into `walk.hash`.
#[inline(always)]
pub fn run(walk: &mut Walk) -> Ending {
    let step_fn: extern "C" fn(u32, *mut c_void) -> i64 = step;
    // SAFETY: the callback and its context (on this program's stack) are valid for the
    // loop's duration; the helper fails cleanly.
    unsafe {
        bpf_loop(
            MAX_STACK_DEPTH as u32,
            step_fn as *mut c_void,
            (walk as *mut Walk).cast(),
            0,
        )
    };
    match walk.ending {
        1 => Ending::Truncated,
        2 => Ending::NeedsCopy,
        _ => Ending::Complete,
    }
}

/// One frame: records the return address, then finds the caller's registers. 0 goes on, 1
/// stops.
#[inline(never)]
extern "C" fn step(index: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Walk` on the stack of the program that runs the loop.
    let walk = unsafe { &mut *ctx.cast::<Walk>() };
    // Step `index` records frame `index` (a step that records none ends the loop). Taken
    // from the loop's index, which the verifier knows nothing of, rather than counted in
    // `walk`: a count it could follow would make it check this step once per frame.
    let n = index as usize;
    if n >= walk.limit as usize || n >= MAX_STACK_DEPTH || walk.ip == 0 {
        return 1;
    }
    // SAFETY: n < MAX_STACK_DEPTH: inside the frames' slots.
    unsafe { *walk.frames.add(n) = walk.ip };
    walk.hash = mix(walk.hash, walk.ip);
    walk.n = n as u32 + 1;
    let row = if walk.tables == 0 {
        FRAME_POINTER_ROW
    } else {
        match row_for(walk.modules, walk.ip) {
            Ok(row) => row,
            Err(ending) => return stop(walk, ending),
        }
    };
    let next = match row.cfa {
        cfa::RSP | cfa::RBP | cfa::PLT => by_table(walk, &row),
        cfa::END => return stop(walk, Ending::Complete),
        cfa::FRAME_POINTER => by_frame_pointer(walk),
        _ => return stop(walk, Ending::Truncated),
    };
    match next {
        Some(()) => 0,
        None => 1,
    }
}

fn stop(walk: &mut Walk, ending: Ending) -> i64 {
    walk.ending = ending as u32;
    1
}

const FRAME_POINTER_ROW: UnwindRow = UnwindRow {
    pc: 0,
    cfa_offset: 0,
    rbp_offset: 0,
    cfa: cfa::FRAME_POINTER,
    rbp: rbp::SAME,
    _pad: 0,
};

/// Steps to the caller through the frame record at `bp` (saved `bp`, return address).
///
/// In `fp` mode a chain that leaves the stack or goes down ends the walk, complete, as it
/// always has: that is where the frame-pointer code ends (libc's start-up frames keep
/// none), and the report says `fp` stacks stop at the first frameless caller. In a table
/// walk, a frame-pointer step is taken only for code without CFI, so such a chain ends it
/// cut, unless `bp` is zero (which `_start` and every thread start leave).
#[inline(always)]
fn by_frame_pointer(walk: &mut Walk) -> Option<()> {
    let bp = walk.bp;
    if bp < walk.sp || bp & 7 != 0 {
        let cut = walk.tables != 0 && bp != 0;
        stop(
            walk,
            if cut {
                Ending::Truncated
            } else {
                Ending::Complete
            },
        );
        return None;
    }
    let record = if walk.n == 1 && walk.has_first != 0 {
        walk.first
    } else {
        let Some(record) = stack_pair(walk, bp) else {
            stop(walk, Ending::Truncated);
            return None;
        };
        record
    };
    walk.ip = record[1];
    walk.sp = bp + 16;
    walk.bp = record[0];
    Some(())
}

/// Steps to the caller by a table row: the CFA from the row, the return address below it,
/// `rbp` where the row says. Unreadable or non-advancing frames cut the stack.
#[inline(always)]
fn by_table(walk: &mut Walk, row: &UnwindRow) -> Option<()> {
    let offset = row.cfa_offset as i64 as u64;
    let cfa = match row.cfa {
        cfa::RSP => walk.sp.wrapping_add(offset),
        cfa::RBP => walk.bp.wrapping_add(offset),
        _ => walk.sp + 8 + if walk.ip & 15 >= offset { 8 } else { 0 },
    };
    if cfa <= walk.sp || cfa & 7 != 0 {
        stop(walk, Ending::Truncated);
        return None;
    }
    let (ip, bp) = if row.rbp == rbp::AT_CFA && row.rbp_offset == -16 {
        let Some([bp, ip]) = stack_pair(walk, cfa - 16) else {
            stop(walk, Ending::Truncated);
            return None;
        };
        (ip, bp)
    } else {
        let Some([ip, _]) = stack_pair(walk, cfa - 8) else {
            stop(walk, Ending::Truncated);
            return None;
        };
        let bp = if row.rbp == rbp::AT_CFA {
            let at = cfa.wrapping_add(row.rbp_offset as i64 as u64);
            let Some([bp, _]) = stack_pair(walk, at) else {
                stop(walk, Ending::Truncated);
                return None;
            };
            bp
        } else {
            walk.bp
        };
        (ip, bp)
    };
    walk.ip = ip;
    walk.sp = cfa;
    walk.bp = bp;
    Some(())
}

/// The row for return address `ip` (looked up at `ip - 1`, inside the call): through the
/// process's list, else through the mapping that holds it and its file's table. Without a
/// row: `Truncated` for code in no file (JIT code: a copy would end there too, at the price
/// of a copy per event), else `NeedsCopy` (a file whose table is not built yet).
#[inline(always)]
fn row_for(list: *const ProcessModules, ip: u64) -> Result<UnwindRow, Ending> {
    let at = ip - 1;
    // SAFETY: null, or a map value pointer set by the program that runs the loop.
    let listed = if list.is_null() {
        None
    } else {
        module_for(unsafe { &*list }, at)
    };
    let (first, rows, pc) = match listed {
        Some(m) => (m.first_row, m.rows, at.wrapping_sub(m.bias)),
        None => by_mapping(at)?,
    };
    if rows == 0 || pc > u64::from(u32::MAX) {
        return Err(Ending::NeedsCopy);
    }
    search_rows(first, rows, pc as u32).ok_or(Ending::NeedsCopy)
}

/// What the kernel knows of the mapping holding a code address.
#[repr(C)]
struct MappedAt {
    start: u64,
    pgoff: u64,
    ino: u64,
    dev: u64,
    /// 1: a file's mapping, identified; 2: a mapping of no file (anonymous: JIT code).
    found: u64,
}

/// (first row, rows, address in the table's terms) of `addr` from the file mapped there, if
/// that file has a table: the mapping is looked up (`bpf_find_vma`, ≈ the cost of a few
/// frames), so only for code the process's list does not cover yet.
#[inline(always)]
fn by_mapping(addr: u64) -> Result<(u32, u32, u64), Ending> {
    // Cleared word by word, in place: a zeroed literal compiles to a call of a byte-wise
    // `memset`, whose 40 rounds the verifier checked again on each of the 224 paths here.
    let mut slot = core::mem::MaybeUninit::<MappedAt>::uninit();
    let words = slot.as_mut_ptr().cast::<u64>();
    for i in 0..size_of::<MappedAt>() / 8 {
        // SAFETY: every word of the struct, each written once, before anything reads it.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    // SAFETY: every field is a u64, all written above.
    let at = unsafe { slot.assume_init_mut() };
    let found_fn: extern "C" fn(*mut c_void, *mut c_void, *mut c_void) -> i64 = mapping_found;
    // SAFETY: the task is the current one (trusted); the callback and its context (on this
    // stack) live through the call; the helper fails cleanly.
    unsafe {
        bpf_find_vma(
            bpf_get_current_task_btf(),
            addr,
            found_fn as *mut c_void,
            (at as *mut MappedAt).cast(),
            0,
        )
    };
    match at.found {
        1 => {}
        2 => return Err(Ending::Truncated),
        _ => return Err(Ending::NeedsCopy),
    }
    let key = TableKey {
        ino: at.ino,
        dev: at.dev,
    };
    // SAFETY: the value is only read.
    let table = unsafe { FILE_TABLES.get(&key) }.ok_or(Ending::NeedsCopy)?;
    if table.rows == 0 {
        // A big file whose table is being built: copying its stacks would make the collector
        // parse the same file on its event path, the stall building apart avoids.
        return Err(Ending::Truncated);
    }
    let offset = addr.wrapping_sub(at.start).wrapping_add(at.pgoff << 12);
    Ok((
        table.first_row,
        table.rows,
        offset.wrapping_add(table.delta),
    ))
}

/// `bpf_find_vma`'s callback: the mapping's start, file offset and file identity.
#[inline(never)]
extern "C" fn mapping_found(_task: *mut c_void, vma: *mut c_void, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `MappedAt` on the caller's stack.
    let at = unsafe { &mut *ctx.cast::<MappedAt>() };
    let Some(off) = kfile::offsets() else {
        return 0;
    };
    let vma = vma as u64;
    let (Some(start), Some(pgoff), Some(file)) = (
        kfile::read::<u64>(vma + u64::from(off[file_walk::VMA_START])),
        kfile::read::<u64>(vma + u64::from(off[file_walk::VMA_PGOFF])),
        kfile::read::<u64>(vma + u64::from(off[file_walk::VMA_FILE])),
    ) else {
        return 0;
    };
    if file == 0 {
        at.found = 2;
        return 0;
    }
    if let Some(id) = kfile::identity(&off, file) {
        *at = MappedAt {
            start,
            pgoff,
            ino: id.ino,
            dev: u64::from(id.dev),
            found: 1,
        };
    }
    0
}

/// The module whose range holds `addr` (the list is sorted by start).
#[inline(always)]
fn module_for(list: &ProcessModules, addr: u64) -> Option<ModuleRange> {
    // Past the most a list holds (userspace never writes more) the search finds nothing. Not
    // clamped to that most: the verifier followed the constant through the search, every
    // one of its 2^8 paths apart. Nor returned from early or masked: python's 42-frame walks
    // then measured slower (by 5-10 %, in a noisy A/B).
    let count = list.count as usize;
    let count = if count > MAX_PROCESS_MODULES {
        0
    } else {
        count
    };
    let (mut lo, mut len) = (0usize, count);
    // Invariant: the answer, if any, is in lo..lo + len.
    for _ in 0..8 {
        if len <= 1 {
            break;
        }
        let half = len / 2;
        let mid = lo + half;
        if mid >= MAX_PROCESS_MODULES {
            return None;
        }
        if list.modules[mid].start <= addr {
            lo = mid;
        }
        len -= half;
    }
    if len != 1 || lo >= MAX_PROCESS_MODULES {
        return None;
    }
    let module = list.modules[lo];
    (module.start <= addr && addr < module.end).then_some(module)
}

/// The last row at or below `pc` among `rows` rows from `first`.
#[inline(always)]
fn search_rows(first: u32, rows: u32, pc: u32) -> Option<UnwindRow> {
    let at = row_index(first, rows, pc);
    if at < 0 {
        return None;
    }
    UNWIND_ROWS.get(at as u32).copied()
}

/// The index of the last row at or below `pc` among `rows` rows from `first`, or -1.
///
/// A global BPF function, checked once on its own: inside a walk step its 24 rounds were
/// checked again on every path into the step.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn row_index(first: u32, rows: u32, pc: u32) -> i64 {
    let (mut lo, mut len) = (first, rows);
    for _ in 0..24 {
        if len <= 1 {
            break;
        }
        let half = len / 2;
        let mid = lo + half;
        match UNWIND_ROWS.get(mid) {
            Some(row) if row.pc <= pc => lo = mid,
            Some(_) => {}
            None => return -1,
        }
        len -= half;
    }
    match UNWIND_ROWS.get(lo) {
        Some(row) if len == 1 && row.pc <= pc => i64::from(lo),
        _ => -1,
    }
}

/// The two words at `addr` on the walked stack: from the window when it holds them, else
/// from a new window read there (or, near the top of the stack, where a window's length
/// would run past the mapping, from a read of the two words alone).
#[inline(always)]
fn stack_pair(walk: &mut Walk, addr: u64) -> Option<[u64; 2]> {
    if walk.tables == 0 {
        return read_pair(addr);
    }
    window_pair(walk.frames, addr)
}

/// Reads a window of `size` bytes (at most `WINDOW_BYTES`) of the stack from `addr` into
/// `window`; returns how many bytes it holds. Near the top of the stack a whole window would
/// run past the mapping, and then the rest of `addr`'s page is read instead (a stack mapping
/// holds every page from a frame to its top).
#[inline(always)]
fn fill_window(window: *mut u64, addr: u64, size: u64) -> u64 {
    // SAFETY: `window` has WINDOW_BYTES of room, `size` is at most that; the helper fails
    // cleanly.
    let whole =
        unsafe { bpf_probe_read_user(window.cast::<c_void>(), size as u32, addr as *const c_void) };
    if whole == 0 {
        return size;
    }
    let rest = 4096 - (addr & 4095);
    if rest < 16 || rest >= size {
        return 0;
    }
    // SAFETY: as above; `rest` < WINDOW_BYTES.
    let part =
        unsafe { bpf_probe_read_user(window.cast::<c_void>(), rest as u32, addr as *const c_void) };
    if part == 0 { rest } else { 0 }
}

/// The two words at `addr` through the window of the walk whose frames go at `frames`.
#[inline(always)]
pub fn window_pair(frames: *mut u64, addr: u64) -> Option<[u64; 2]> {
    if addr & 7 != 0 {
        return read_pair(addr);
    }
    let at = window_index(addr);
    if at < 0 {
        return read_pair(addr);
    }
    // Below WINDOW_WORDS - 1 (the window holds both words): the masks change nothing.
    let i = at as usize & (WINDOW_WORDS - 1);
    // SAFETY: the window is inside the scratch record (see WINDOW_AFTER_FRAMES).
    unsafe {
        let window = frames.add(WINDOW_AFTER_FRAMES + 2);
        Some([*window.add(i), *window.add((i + 1) & (WINDOW_WORDS - 1))])
    }
}

/// The index, in words, of `addr` (8-aligned) in this CPU's walk window, read anew there
/// when the window does not hold the 16 bytes from `addr`; -1 when the stack there cannot
/// be read through a window (then read the two words alone).
///
/// A global BPF function, checked once on its own: inlined, the window's reads and their
/// fallbacks were checked again at every place the walk reads the stack, and made the
/// verifier take 0.3–0.4 s per stack-capturing program (attach latency 0.59 s).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn window_index(addr: u64) -> i64 {
    let Some(scratch) = STACK_SCRATCH.get_ptr_mut(0) else {
        return -1;
    };
    // SAFETY: the walk's frames follow the event in the scratch record this CPU's walk
    // holds (see `emit::with_walked_stack`); the header and window follow them (see
    // WINDOW_AFTER_FRAMES), inside the record.
    unsafe {
        let frames = scratch
            .cast::<u8>()
            .add(core::mem::size_of::<Event>())
            .cast::<u64>();
        let header = frames.add(WINDOW_AFTER_FRAMES);
        let window = header.add(2);
        let (at, state) = (*header, *header.add(1));
        if state == u64::MAX {
            return -1;
        }
        let len = state & 0xffff_ffff;
        let off = addr.wrapping_sub(at);
        if off.saturating_add(16) <= len {
            return (off / 8) as i64;
        }
        // Read from memory, so kept: the verifier bounds the read's length by it.
        let size = (state >> 32).clamp(FIRST_WINDOW_BYTES, WINDOW_BYTES as u64);
        let filled = fill_window(window, addr, size);
        if filled < 16 {
            *header.add(1) = u64::MAX;
            return -1;
        }
        *header = addr;
        *header.add(1) = ((size * 2) << 32) | filled;
        0
    }
}

#[inline(always)]
pub fn read_word(addr: u64) -> Option<u64> {
    let mut word = 0u64;
    // SAFETY: reads user memory through the helper, which fails cleanly.
    let rc =
        unsafe { bpf_probe_read_user((&raw mut word).cast::<c_void>(), 8, addr as *const c_void) };
    (rc == 0).then_some(word)
}

#[inline(always)]
fn read_pair(addr: u64) -> Option<[u64; 2]> {
    let mut pair = [0u64; 2];
    // SAFETY: as above.
    let rc = unsafe {
        bpf_probe_read_user(
            pair.as_mut_ptr().cast::<c_void>(),
            16,
            addr as *const c_void,
        )
    };
    (rc == 0).then_some(pair)
}

/// Seed and step of the frame hash (a multiply-xorshift mix: a 64-bit hash over a few
/// thousand distinct stacks makes a collision vanishingly unlikely).
pub const FRAME_HASH_SEED: u64 = 0x243f_6a88_85a3_08d3;

#[inline(always)]
pub fn mix(hash: u64, ip: u64) -> u64 {
    let x = (hash ^ ip).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^ (x >> 29)
}
