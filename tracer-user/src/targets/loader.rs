//! The libraries a dynamically linked program will map, asked of its own dynamic loader
//! before it runs (`ld.so --list PROGRAM`, what `ldd` does), with this process's environment
//! (`LD_LIBRARY_PATH`, `LD_PRELOAD`): the same search the program's start will make, so the
//! allocators in them can be probed before its first allocation.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use object::{Object as _, ObjectSection as _};

/// The libraries `program` will load, as absolute paths; empty for a static program, or when
/// its loader cannot say (the program's start, then its mappings, will show them).
pub fn libraries(program: &Path) -> Vec<PathBuf> {
    let Some(interp) = interpreter(program) else {
        return Vec::new();
    };
    let Ok(out) = Command::new(&interp)
        .arg("--list")
        .arg(program)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    if !out.status.success() {
        return Vec::new();
    }
    let mut libs = parse(&String::from_utf8_lossy(&out.stdout));
    libs.push(interp);
    libs
}

/// The program interpreter `program` asks for (`/lib64/ld-linux-x86-64.so.2`).
fn interpreter(program: &Path) -> Option<PathBuf> {
    let data = std::fs::read(program).ok()?;
    let file = object::File::parse(&*data).ok()?;
    let interp = file.section_by_name(".interp")?.data().ok()?;
    let interp = interp.split(|&b| b == 0).next()?;
    Some(PathBuf::from(std::str::from_utf8(interp).ok()?))
}

/// Library paths in a loader's `--list` output: `libc.so.6 => /lib/…/libc.so.6 (0x…)` or
/// `/lib64/ld-linux-x86-64.so.2 (0x…)`.
fn parse(listing: &str) -> Vec<PathBuf> {
    listing
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => line.trim(),
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_loader_listing() {
        let listing = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                       \tlibjemalloc.so.2 => /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 (0x7f1)\n\
                       \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f2)\n\
                       \t/lib64/ld-linux-x86-64.so.2 (0x7f3)\n";
        assert_eq!(
            parse(listing),
            [
                PathBuf::from("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn lists_a_real_program_s_libraries() {
        let libs = libraries(Path::new("/bin/sh"));
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
    }
}
