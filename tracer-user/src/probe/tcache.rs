//! Finds glibc's thread cache from `malloc`'s own code, so the eBPF side can predict a
//! malloc's result at its entry and spare the return trap (see `tracer_common::tcache`).
//!
//! glibc keeps the cache pointer in a thread-local variable, `tcache`, which no exported
//! symbol names. malloc reaches it in its first few instructions, always the same way for
//! a shared libc built for x86-64: it loads the variable's thread-pointer offset from a GOT
//! slot, then reads through `%fs`:
//!
//! ```text
//! mov  0x13a408(%rip),%r12     ; GOT slot with an R_X86_64_TPOFF64 relocation
//! mov  %fs:(%r12),%rdx         ; tcache
//! ```
//!
//! The prediction is used only when that shape is found, the slot carries a TLS offset
//! relocation, the code indexes 16-bit counts, and the library says it is glibc 2.34 to 2.41
//! (no malloc hooks; the cache layout of `tracer_common::tcache`). Anything else: every
//! malloc's return is trapped, as before.

use object::{Object as _, ObjectSymbol as _};

/// Bytes of malloc's code searched for the shape.
const SCAN_BYTES: usize = 0x180;
/// glibc releases whose malloc and cache match `tracer_common::tcache` (2.34 removed the
/// malloc hooks; 2.42 reworked the cache).
const VERSIONS: std::ops::RangeInclusive<u32> = 34..=41;

/// The distance from `malloc`'s first instruction to the GOT slot of the `tcache` variable's
/// thread-pointer offset, when this library is a glibc whose cache can be predicted.
pub fn got_delta(data: &[u8]) -> Option<i32> {
    let file = object::File::parse(data).ok()?;
    if !VERSIONS.contains(&super::elf::glibc_minor(data)?) {
        return None;
    }
    let malloc = file
        .dynamic_symbols()
        .find(|s| s.is_definition() && s.name() == Ok("malloc"))?;
    let offset = super::elf::file_offset_of(&file, malloc.address())? as usize;
    let code = data.get(offset..)?;
    let code = &code[..code.len().min(SCAN_BYTES)];
    let delta = tls_load(code)?;
    if !indexes_u16_counts(code) {
        return None;
    }
    let slot = malloc.address().checked_add_signed(delta.into())?;
    let tpoff = file.dynamic_relocations()?.any(|(at, reloc)| {
        at == slot
            && matches!(reloc.flags(), object::RelocationFlags::Elf { r_type }
                if r_type == object::elf::R_X86_64_TPOFF64)
    });
    tpoff.then_some(delta)
}

/// Finds `mov disp32(%rip),%reg` directly followed by `mov %fs:(%reg),%reg2`; returns the GOT
/// slot's distance from the start of `code`.
fn tls_load(code: &[u8]) -> Option<i32> {
    (0..code.len()).find_map(|i| {
        let w = code.get(i..i + 12)?;
        // REX.W (R for r8–r15), 8b, modrm with mod 00 and rm 101: %rip-relative load.
        if w[0] & 0xfb != 0x48 || w[1] != 0x8b || w[2] & 0xc7 != 0x05 {
            return None;
        }
        let reg = ((w[0] >> 2) & 1) << 3 | (w[2] >> 3) & 7;
        let disp = i32::from_le_bytes(w[3..7].try_into().ok()?);
        // %fs prefix, REX.W (B selects r8–r15), 8b, modrm with mod 00 and rm = reg.
        let (rex, modrm) = (w[8], w[10]);
        if w[7] != 0x64 || rex & 0xf8 != 0x48 || w[9] != 0x8b || modrm & 0xc0 != 0 {
            return None;
        }
        let base = (rex & 1) << 3 | modrm & 7;
        // rm 100 takes a SIB byte (0x24: no index, that base); rm 101 would mean %rip.
        let sib_ok = match modrm & 7 {
            4 => w[11] == 0x24,
            5 => false,
            _ => true,
        };
        (base == reg && sib_ok).then(|| i32::try_from(i + 7).ok()?.checked_add(disp))?
    })
}

/// Whether the code reads a `uint16_t` array element (`movzwl (base,index,2)`): the cache's
/// counts, as 2.30 and later lay them out.
fn indexes_u16_counts(code: &[u8]) -> bool {
    code.windows(4)
        .any(|w| w[0] == 0x0f && w[1] == 0xb7 && w[2] & 0xc7 == 0x04 && w[3] >> 6 == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian 12's glibc 2.36 malloc, from its first instruction to the counts read.
    const DEBIAN12_MALLOC: &[u8] = &[
        0x41, 0x54, 0x55, 0x53, 0x48, 0x89, 0xfb, 0x48, 0x83, 0xec, 0x10, 0x80, 0x3d, 0x46, 0x1b,
        0x14, 0x00, 0x00, 0x0f, 0x84, 0xf8, 0x01, 0x00, 0x00, 0x48, 0x85, 0xdb, 0x0f, 0x88, 0xfd,
        0x01, 0x00, 0x00, 0x48, 0x8d, 0x43, 0x17, 0x31, 0xed, 0x48, 0x83, 0xf8, 0x1f, 0x76, 0x0c,
        0x48, 0x83, 0xe0, 0xf0, 0x48, 0x8d, 0x68, 0xef, 0x48, 0xc1, 0xed, 0x04, 0x4c, 0x8b, 0x25,
        0x08, 0xa4, 0x13, 0x00, 0x64, 0x49, 0x8b, 0x14, 0x24, 0x48, 0x85, 0xd2, 0x0f, 0xb7, 0x0c,
        0x6a,
    ];

    #[test]
    fn finds_the_tcache_slot_in_debian12_malloc() {
        // mov 0x13a408(%rip),%r12 at +0x39, 7 bytes long: the slot is at +0x40 + 0x13a408.
        assert_eq!(tls_load(DEBIAN12_MALLOC), Some(0x40 + 0x13a408));
        assert!(indexes_u16_counts(DEBIAN12_MALLOC));
    }

    #[test]
    fn other_code_is_not_taken_for_it() {
        // The same load into %r12, then an ordinary (not %fs) read through it.
        let plain = [
            0x4c, 0x8b, 0x25, 0x08, 0xa4, 0x13, 0x00, 0x49, 0x8b, 0x14, 0x24, 0x90,
        ];
        assert_eq!(tls_load(&plain), None);
        // The %fs read goes through another register than the one loaded.
        let other = [
            0x4c, 0x8b, 0x25, 0x08, 0xa4, 0x13, 0x00, 0x64, 0x48, 0x8b, 0x10, 0x90,
        ];
        assert_eq!(tls_load(&other), None);
        assert!(!indexes_u16_counts(&[0x0f, 0xb7, 0x07, 0x90]));
    }

    #[test]
    fn reads_the_banner_version() {
        let lib = b"\0GNU C Library (Debian GLIBC 2.36-9+deb12u14) release version 2.36.\n\0";
        assert_eq!(super::super::elf::glibc_minor(lib), Some(36));
        assert_eq!(super::super::elf::glibc_minor(b"musl libc"), None);
    }

    /// The machine's own libc (glibc 2.36 here and in CI) is recognised end to end,
    /// relocation included.
    #[test]
    fn this_machines_libc_is_predictable() {
        let maps = crate::procfs::MapsSnapshot::read(std::process::id()).expect("own maps");
        let path = maps
            .mappings()
            .iter()
            .map(|m| m.path.to_path_buf())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("libc.so"))
            })
            .expect("own libc");
        let data = std::fs::read(&path).expect("read libc");
        assert!(got_delta(&data).is_some(), "{}", path.display());
    }
}
