//! Finds the C library a process allocates through, as a path this collector can open.

use std::path::{Path, PathBuf};

use crate::{
    error::{Error, Result},
    procfs::MapsSnapshot,
};

/// Whether a mapped file is glibc's shared C library (`libc.so.6`, `libc-2.31.so`).
pub fn is_libc(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("libc.so") || (n.starts_with("libc-") && n.ends_with(".so")))
}

/// The libc mapped by `pid`, as a path this collector can open that names the very file the
/// process mapped: the path from its maps when that is the same file here, else the same path
/// under `/proc/PID/root` (another mount namespace, a container), else the mapping itself
/// through `/proc/PID/map_files`.
pub fn of_process(pid: u32) -> Result<PathBuf> {
    let maps = MapsSnapshot::read(pid).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NoSuchProcess { pid }
        } else {
            Error::Io {
                what: format!("cannot read /proc/{pid}/maps"),
                source,
            }
        }
    })?;
    let mapping = maps
        .mappings()
        .iter()
        .find(|m| is_libc(&m.path))
        .ok_or_else(|| Error::NoAllocator {
            pid,
            reason: "it does not map glibc's libc.so.6 (statically linked, or another C library); \
                     only glibc's allocator is supported so far"
                .into(),
        })?;
    let mapped = PathBuf::from(format!(
        "/proc/{pid}/map_files/{:x}-{:x}",
        mapping.start, mapping.end
    ));
    let path = mapping.path.to_path_buf();
    let via_root =
        PathBuf::from(format!("/proc/{pid}/root")).join(path.strip_prefix("/").unwrap_or(&path));
    Ok([path, via_root]
        .into_iter()
        .find(|candidate| same_file(candidate, &mapped))
        .unwrap_or(mapped))
}

/// Checks, before it runs, that the program a `run` starts can be traced: a statically
/// linked executable carries its own malloc, not glibc's shared one.
pub fn check_program(program: &Path) -> Result<(), String> {
    let data = std::fs::read(program).map_err(|e| format!("cannot read it: {e}"))?;
    if let Some(line) = data.strip_prefix(b"#!") {
        // A script: its interpreter is what runs (`#!/usr/bin/env python3` runs env, which
        // execs python3 in the same process).
        let line = line.split(|&b| b == b'\n').next().unwrap_or_default();
        let interpreter = String::from_utf8_lossy(line);
        let interpreter = interpreter.split_whitespace().next().unwrap_or_default();
        return check_program(Path::new(interpreter));
    }
    object::File::parse(&*data).map_err(|e| format!("not an ELF executable: {e}"))?;
    if file_has_interp(&data) {
        Ok(())
    } else {
        Err(format!(
            "{} is statically linked: its allocator is compiled into it, and alloctrace probes \
             only glibc's shared libc.so.6 so far",
            program.display()
        ))
    }
}

/// Whether an ELF file asks for a program interpreter (is dynamically linked).
fn file_has_interp(data: &[u8]) -> bool {
    use object::read::elf::{FileHeader as _, ProgramHeader as _};
    let Ok(header) = object::elf::FileHeader64::<object::Endianness>::parse(data) else {
        return false;
    };
    let Ok(endian) = header.endian() else {
        return false;
    };
    header.program_headers(endian, data).is_ok_and(|phdrs| {
        phdrs
            .iter()
            .any(|ph| ph.p_type(endian) == object::elf::PT_INTERP)
    })
}

/// The libc this collector itself runs on: what a command started by `run` will load in the
/// usual case of one system C library.
pub fn of_self() -> Result<PathBuf> {
    of_process(std::process::id())
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_libc_names() {
        assert!(is_libc(Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6")));
        assert!(is_libc(Path::new("/lib/libc-2.31.so")));
        assert!(!is_libc(Path::new("/usr/lib/libcrypto.so.3")));
        assert!(!is_libc(Path::new("/usr/lib/libc++.so.1")));
    }
}
