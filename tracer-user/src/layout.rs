//! Where a process's code is, rebuilt from what the kernel reported as it happened (the
//! program and interpreter an `exec` loaded, each executable file mapping after that), for a
//! process gone before `/proc/PID/maps` could be read. The files themselves are the ones the
//! collector holds open by identity ([`FilePins`]): nothing is read from the process.

use std::{
    fs::File,
    io::{Read as _, Seek as _, SeekFrom},
    path::Path,
    sync::Arc,
};

use object::{
    elf::{FileHeader64, PF_X, PT_INTERP, PT_LOAD, PT_PHDR},
    read::elf::{FileHeader as _, ProgramHeader as _},
};

use crate::{
    model::ExecLayout,
    procfs::{FileKey, FilePins, Mapping},
};

const PAGE: u64 = 4096;
/// Program headers read at most (real files have about a dozen).
const MAX_PHDRS: usize = 64;

/// An ELF file's loadable code and what it asks of the loader.
struct Loadable {
    /// (virtual address, size in memory, file offset) of each executable segment.
    code: Vec<(u64, u64, u64)>,
    /// The address its program headers are loaded at, before relocation.
    phdr_vaddr: Option<u64>,
    interp: Option<String>,
}

/// Where the program headers may start, at most (they follow the ELF header in real files).
const MAX_PHOFF: u64 = 1 << 20;

/// Reads the ELF header and program headers of `path` (not the whole file: executables can
/// be hundreds of megabytes).
fn loadable(path: &Path) -> Option<Loadable> {
    let mut file = File::open(path).ok()?;
    let mut data = vec![0u8; 64];
    file.read_exact(&mut data).ok()?;
    let header = FileHeader64::<object::Endianness>::parse(&*data).ok()?;
    let endian = header.endian().ok()?;
    let phoff = header.e_phoff.get(endian);
    let phnum = usize::from(header.e_phnum.get(endian)).min(MAX_PHDRS);
    if phoff > MAX_PHOFF {
        return None;
    }
    // The headers at their own offset in a buffer holding only what was read.
    data.resize(phoff as usize + phnum * 56, 0);
    file.seek(SeekFrom::Start(phoff)).ok()?;
    file.read_exact(&mut data[phoff as usize..]).ok()?;
    let header = FileHeader64::<object::Endianness>::parse(&*data).ok()?;
    let phdrs = header.program_headers(endian, &*data).ok()?;
    let mut out = Loadable {
        code: Vec::new(),
        phdr_vaddr: None,
        interp: None,
    };
    let mut first_load = None;
    for ph in phdrs.iter().take(MAX_PHDRS) {
        let (vaddr, offset) = (ph.p_vaddr(endian), ph.p_offset(endian));
        match ph.p_type(endian) {
            PT_LOAD => {
                if offset == 0 && first_load.is_none() {
                    first_load = Some(vaddr);
                }
                if ph.p_flags(endian).contains(PF_X) {
                    out.code.push((vaddr, ph.p_memsz(endian), offset));
                }
            }
            PT_PHDR => out.phdr_vaddr = Some(vaddr),
            PT_INTERP => out.interp = read_string(&mut file, offset, ph.p_filesz(endian)),
            _ => {}
        }
    }
    out.phdr_vaddr = out.phdr_vaddr.or(first_load.map(|v| v + phoff));
    Some(out)
}

fn read_string(file: &mut File, offset: u64, len: u64) -> Option<String> {
    let mut bytes = vec![0u8; len.min(4096) as usize];
    file.seek(SeekFrom::Start(offset)).ok()?;
    file.read_exact(&mut bytes).ok()?;
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8(bytes[..end].to_vec()).ok()
}

/// The executable mappings of a file loaded with load bias `bias`.
fn mappings(
    code: &[(u64, u64, u64)],
    bias: u64,
    path: &Arc<Path>,
    file: &Arc<Path>,
) -> Vec<Mapping> {
    code.iter()
        .map(|&(vaddr, memsz, offset)| Mapping {
            start: bias.wrapping_add(vaddr & !(PAGE - 1)),
            end: bias.wrapping_add((vaddr + memsz).next_multiple_of(PAGE)),
            offset: offset & !(PAGE - 1),
            path: path.clone(),
            file: file.clone(),
        })
        .collect()
}

/// The code an `exec` loaded: the program, and its interpreter when it has one (looked up
/// inside process `pid`'s root, as its kernel did: a container's own `ld.so`, and none if the
/// process is gone by then).
pub fn after_exec(pid: u32, layout: &ExecLayout, pins: &mut FilePins) -> Vec<Mapping> {
    let (dev, ino) = layout.exe;
    let Some((path, file)) = pins.by_key(FileKey { dev, ino }) else {
        return Vec::new();
    };
    let Some(exe) = loadable(&file) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Some(phdr_vaddr) = exe.phdr_vaddr {
        let bias = layout.phdr.wrapping_sub(phdr_vaddr);
        out.extend(mappings(&exe.code, bias, &path, &file));
    }
    if let Some(interp) = exe.interp.filter(|_| layout.interp_base != 0)
        && let Some((path, file)) = pins.as_process(pid, Path::new(&interp))
        && let Some(ld) = loadable(&file)
    {
        out.extend(mappings(&ld.code, layout.interp_base, &path, &file));
    }
    out
}

/// A file mapped executable after the `exec`, when the collector holds the file.
pub fn mapped(
    (addr, len, offset): (u64, u64, u64),
    (dev, ino): (u64, u64),
    pins: &FilePins,
) -> Option<Mapping> {
    let (path, file) = pins.by_key(FileKey { dev, ino })?;
    Some(Mapping {
        start: addr,
        end: addr.saturating_add(len),
        offset,
        path,
        file,
    })
}
