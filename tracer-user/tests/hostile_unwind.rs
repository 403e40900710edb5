//! The copied-stack unwinder (`capture::unwind`) fed malformed data (issue 18): random stack
//! bytes and registers against a real module's CFI, a real ELF whose `.eh_frame` and
//! `.eh_frame_hdr` are overwritten or cut short, mappings and pointers into nowhere. Nothing
//! may panic or hang, and no stack may come back with more frames than asked for.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use alloctrace::{
    capture::unwind::{Ending, Unwinders},
    procfs::MapsSnapshot,
};
use object::{Object as _, ObjectSection as _, ObjectSegment as _, ObjectSymbol as _};
use proptest::prelude::*;
use tracer_common::StackRegs;

/// Where the tests pretend the module is loaded.
const BASE: u64 = 0x7f12_3400_0000;
/// One unwind, however hostile its input, takes far less than this.
const SLOW: Duration = Duration::from_secs(2);

/// The real modules the tests unwind through: one with plenty of CFI, one small enough to
/// rewrite per case.
const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";
const SMALL: &str = "/usr/bin/true";

/// A file of its own per case (tests run in parallel), removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(bytes: &[u8]) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "alloctrace-unwind-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, bytes).expect("scratch file");
        Self(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The executable segment of a real ELF: (address, file offset, size), page-aligned as the
/// loader maps it.
fn text_segment(bytes: &[u8]) -> (u64, u64, u64) {
    let file = object::File::parse(bytes).expect("a real ELF");
    let seg = file
        .segments()
        .find(|s| {
            matches!(s.flags(), object::SegmentFlags::Elf { p_flags, .. }
                if p_flags.contains(object::elf::PF_X))
        })
        .expect("an executable segment");
    let (offset, size) = seg.file_range();
    let page = |n: u64| n & !0xfff;
    (page(seg.address()), page(offset), (size + 0xfff) & !0xfff)
}

/// `/proc/PID/maps` text mapping `path`'s executable segment at `BASE`.
fn maps_of(path: &Path, (vaddr, offset, size): (u64, u64, u64)) -> MapsSnapshot {
    let start = BASE + vaddr;
    MapsSnapshot::parse(&format!(
        "{start:x}-{:x} r-xp {offset:08x} 00:00 1 {}\n",
        start + size,
        path.display()
    ))
}

/// Unwinds once with a fresh unwinder; checks the bound on frames and on time.
fn unwind(maps: &MapsSnapshot, regs: StackRegs, stack: &[u8], depth: usize) -> (Vec<u64>, Ending) {
    let mut unwinders = Unwinders::default();
    let mut out = Vec::new();
    let started = Instant::now();
    let ending = unwinders.unwind(1, regs, stack, depth, &mut out, &mut |_| Some(maps.clone()));
    assert!(
        started.elapsed() < SLOW,
        "one unwind took {:?}",
        started.elapsed()
    );
    assert!(
        out.len() <= depth,
        "{} frames, {depth} asked for",
        out.len()
    );
    (out, ending)
}

/// A stack whose words are each a return address into the module, a pointer back into
/// the stack, or anything: what makes an unwinder go on for many frames.
fn plausible_stack(words: &[(u8, u64)], sp: u64, text: (u64, u64)) -> Vec<u8> {
    let mut stack = Vec::with_capacity(words.len() * 8);
    for &(kind, r) in words {
        let word = match kind % 4 {
            0 => text.0 + r % (text.1 - text.0).max(1),
            1 => sp.wrapping_add(r % (words.len() as u64 * 8 + 64)),
            2 => r,
            _ => 0,
        };
        stack.extend_from_slice(&word.to_le_bytes());
    }
    stack
}

/// Addresses of nowhere in particular, and of the edges of everything.
fn pointer() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(u64::MAX),
        Just(u64::MAX - 7),
        Just(BASE),
        Just(BASE - 1),
        (0u64..0x10_0000).prop_map(|o| BASE + o),
        any::<u64>(),
    ]
}

/// A real ELF with `edit` applied to its bytes, mapped as its loader would map it.
fn edited_module(edit: impl FnOnce(&mut Vec<u8>)) -> (Scratch, MapsSnapshot, (u64, u64)) {
    let mut bytes = std::fs::read(SMALL).expect(SMALL);
    let segment = text_segment(&bytes);
    edit(&mut bytes);
    let file = Scratch::new(&bytes);
    let maps = maps_of(&file.0, segment);
    let text = (BASE + segment.0, BASE + segment.0 + segment.2);
    (file, maps, text)
}

/// (file offset, size) of section `name` in the small module.
fn section(name: &str) -> (usize, usize) {
    let bytes = std::fs::read(SMALL).expect(SMALL);
    let file = object::File::parse(&*bytes).expect("a real ELF");
    let s = file.section_by_name(name).expect(name);
    let (offset, size) = s.file_range().expect("in the file");
    (offset as usize, size as usize)
}

/// The section header of `name` in the small module: its file offset.
fn section_header(name: &str) -> usize {
    let bytes = std::fs::read(SMALL).expect(SMALL);
    let file = object::File::parse(&*bytes).expect("a real ELF");
    let index = file.section_by_name(name).expect(name).index().0;
    let shoff = u64::from_le_bytes(bytes[0x28..0x30].try_into().expect("8 bytes"));
    let shentsize = u16::from_le_bytes(bytes[0x3a..0x3c].try_into().expect("2 bytes"));
    shoff as usize + index * shentsize as usize
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random registers and stack bytes against libc's real CFI.
    #[test]
    fn random_stacks_against_real_cfi(
        ip_in_text in any::<bool>(),
        ip in any::<u64>(),
        sp in pointer(),
        bp in pointer(),
        words in proptest::collection::vec((any::<u8>(), any::<u64>()), 0..1024),
        depth in 1usize..128,
    ) {
        let bytes = std::fs::read(LIBC).expect(LIBC);
        let segment = text_segment(&bytes);
        let maps = maps_of(Path::new(LIBC), segment);
        let text = (BASE + segment.0, BASE + segment.0 + segment.2);
        let ip = if ip_in_text { text.0 + ip % (text.1 - text.0) } else { ip };
        let stack = plausible_stack(&words, sp, text);
        unwind(&maps, StackRegs { ip, sp, bp }, &stack, depth);
    }

    /// `.eh_frame` and `.eh_frame_hdr` overwritten, in places or whole, with random bytes.
    #[test]
    fn overwritten_eh_frame(
        which in prop_oneof![Just(".eh_frame"), Just(".eh_frame_hdr")],
        whole in any::<bool>(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..64),
        ip in any::<u64>(),
        words in proptest::collection::vec((any::<u8>(), any::<u64>()), 0..256),
        depth in 1usize..128,
    ) {
        let (offset, size) = section(which);
        let (_file, maps, text) = edited_module(|bytes| {
            if whole {
                let mut r = edits[0].0 as u64 | 1;
                for b in &mut bytes[offset..offset + size] {
                    r ^= r << 13; r ^= r >> 7; r ^= r << 17;
                    *b = r as u8;
                }
            }
            for &(at, byte) in &edits {
                bytes[offset + at % size] = byte;
            }
        });
        let sp = 0x7ffd_0000_0000;
        let stack = plausible_stack(&words, sp, text);
        let ip = text.0 + ip % (text.1 - text.0);
        unwind(&maps, StackRegs { ip, sp, bp: sp + 64 }, &stack, depth);
    }

    /// The file cut short inside or after its unwind sections, or a section's size in its
    /// header changed (shorter, longer, absurd).
    #[test]
    fn truncated_sections(
        cut in any::<bool>(),
        which in prop_oneof![Just(".eh_frame"), Just(".eh_frame_hdr")],
        at in any::<usize>(),
        claimed in prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>(), 0u64..0x4000],
        ip in any::<u64>(),
        words in proptest::collection::vec((any::<u8>(), any::<u64>()), 0..256),
    ) {
        let (offset, size) = section(which);
        let header = section_header(which);
        let (_file, maps, text) = edited_module(|bytes| {
            if cut {
                bytes.truncate(offset + at % (size + 1));
            } else {
                // sh_size is at byte 32 of a 64-bit section header.
                bytes[header + 32..header + 40].copy_from_slice(&claimed.to_le_bytes());
            }
        });
        let sp = 0x7ffd_0000_0000;
        let stack = plausible_stack(&words, sp, text);
        let ip = text.0 + ip % (text.1 - text.0);
        unwind(&maps, StackRegs { ip, sp, bp: sp + 64 }, &stack, 127);
    }

    /// Mappings that make no sense for the file (offsets past its end, ranges anywhere, even
    /// ending before they start), and registers pointing anywhere.
    #[test]
    fn mappings_and_pointers_into_nowhere(
        start in pointer(),
        end in prop_oneof![Just(None), Just(Some(0x1000u64)), any::<u64>().prop_map(Some)],
        offset in prop_oneof![Just(0u64), Just(0x2000u64), any::<u64>()],
        ip in pointer(),
        sp in pointer(),
        bp in pointer(),
        stack in proptest::collection::vec(any::<u8>(), 0..4096),
    ) {
        // Mostly a range after `start`; sometimes any end at all.
        let end = end.map_or(start.wrapping_sub(0x1000), |len| start.saturating_add(len));
        let maps = MapsSnapshot::parse(&format!("{start:x}-{end:x} r-xp {offset:x} 00:00 1 {SMALL}\n"));
        unwind(&maps, StackRegs { ip, sp, bp }, &stack, 127);
    }
}

/// A stack made entirely of one return address, just past the first instruction of libc's
/// `malloc` (where its CFI says the return address is the word at the stack pointer): each
/// frame's caller is the same again, for as long as the copy lasts. The unwinder stops at
/// the depth asked for and says the stack was cut short; the real CFI is read (a sanity
/// check that the tests above exercise the unwinder, not an empty module list).
#[test]
fn an_endless_chain_of_frames_stops_at_the_depth() {
    let bytes = std::fs::read(LIBC).expect(LIBC);
    let segment = text_segment(&bytes);
    let maps = maps_of(Path::new(LIBC), segment);
    let file = object::File::parse(&*bytes).expect("libc");
    let malloc = file
        .dynamic_symbols()
        .find(|s| s.name() == Ok("malloc"))
        .expect("libc's malloc")
        .address();
    let ret = BASE + malloc + 1;
    let stack: Vec<u8> = (0..2048).flat_map(|_| ret.to_le_bytes()).collect();
    let sp: u64 = 0x7ffd_0000_0000;
    for depth in [1, 16, 127] {
        let regs = StackRegs {
            ip: ret - 1,
            sp,
            bp: 0,
        };
        let (frames, ending) = unwind(&maps, regs, &stack, depth);
        assert_eq!(
            (frames.len(), ending),
            (depth, Ending::Truncated),
            "{frames:x?}"
        );
    }
}
