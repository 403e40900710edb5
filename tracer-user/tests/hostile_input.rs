//! Everything alloctrace parses itself, fed malformed data (issue 18): ring-buffer records,
//! `/proc` maps and smaps text, ELF files (random, and a real executable with bytes
//! overwritten), the x86 prologue matchers, symbol names. Nothing may panic; a bad ELF is an
//! error, never a crash.

use std::path::PathBuf;

use alloctrace::{
    capture::decode,
    demangle::demangle,
    model::StackId,
    probe::{elf::ElfFunctions, offsets, stack_mode},
    procfs::{MapsSnapshot, parse_smaps},
    targets::allocators,
};
use proptest::prelude::*;

/// A file of its own per case (tests run in parallel).
fn scratch(bytes: &[u8]) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "alloctrace-hostile-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, bytes).expect("scratch file");
    path
}

/// Everything alloctrace reads from a module: its functions, its allocators, its stack mode.
fn read_module(bytes: &[u8]) {
    let path = scratch(bytes);
    if let Ok(functions) = ElfFunctions::read(&path) {
        let _ = allocators::detect(&functions, &path);
        for name in ["malloc", "free", "main", "_start"] {
            if let Some(f) = functions.find(name) {
                let _ = offsets::first_emulated(f.code(), &[iced_x86::Register::RDI]);
            }
            let _ = functions.jump_of(name);
        }
    }
    let _ = stack_mode::frame_pointer_share(bytes);
    let _ = std::fs::remove_file(&path);
}

/// A real executable, to overwrite pieces of.
fn real_elf() -> Vec<u8> {
    std::fs::read("/usr/bin/true").expect("/usr/bin/true")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn records_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok((event, payload)) = decode::record(&bytes) {
            prop_assert!(payload.len() < bytes.len().max(1));
            let _ = decode::op(&event, StackId::UNKNOWN);
            let _ = decode::exec_name(&event, payload);
            let _ = decode::copied_stack(&event, payload);
            let mut frames = Vec::new();
            decode::inline_frames(payload, &mut frames);
        }
    }

    #[test]
    fn maps_and_smaps_text_never_panics(text in "(\\PC{0,80}\n){0,12}") {
        let _ = MapsSnapshot::parse(&text);
        let _ = parse_smaps(&text);
    }

    #[test]
    fn maps_lines_with_broken_fields_never_panic(
        start in "[0-9a-fx-]{0,20}",
        perms in "[rwxps-]{0,6}",
        offset in "[0-9a-fz]{0,12}",
        path in "\\PC{0,40}",
    ) {
        let text = format!("{start} {perms} {offset} fd:01 1234 {path}\n");
        let _ = MapsSnapshot::parse(&text);
        let _ = parse_smaps(&format!("{text}Rss: {offset} kB\nAnonymous: x kB\n"));
    }

    #[test]
    fn prologue_matchers_never_panic(code in proptest::collection::vec(any::<u8>(), 0..64)) {
        let at = offsets::first_emulated(&code, &[iced_x86::Register::RDI]);
        prop_assert!(at == 0 || (at as usize) < code.len());
        let _ = offsets::entry_offset_keeping_rdi(&code);
    }

    #[test]
    fn random_files_are_not_elf(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        read_module(&bytes);
    }

    #[test]
    fn a_real_elf_with_bytes_overwritten_never_panics(
        edits in proptest::collection::vec((0usize..4096, any::<u8>()), 1..32),
    ) {
        let mut elf = real_elf();
        for (at, byte) in edits {
            if let Some(b) = elf.get_mut(at) {
                *b = byte;
            }
        }
        read_module(&elf);
    }

    #[test]
    fn names_never_panic(name in "\\PC{0,120}") {
        let _ = demangle(&name);
        let _ = demangle(&format!("_Z{name}"));
        let _ = demangle(&format!("_R{name}"));
    }
}

/// Header fields claiming huge sizes and counts (section headers far past the end of the
/// file, a section larger than the file): an error or an empty answer, quickly.
#[test]
fn an_elf_with_huge_section_sizes_is_refused_quickly() {
    let mut elf = real_elf();
    // e_shoff (0x28, 8 bytes), e_shnum (0x3c, 2 bytes): section headers beyond the file.
    elf[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes()[..8]);
    elf[0x3c..0x3e].copy_from_slice(&u16::MAX.to_le_bytes());
    let started = std::time::Instant::now();
    read_module(&elf);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}
