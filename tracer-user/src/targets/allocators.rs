//! Which allocators a module carries, from its symbols alone, and the functions to probe in
//! each: the module's own functions, never a name a binary might mangle differently tomorrow
//! (a Rust program's global allocator is found by the allocator it links, not by
//! `__rust_alloc`).
//!
//! Non-default allocators are looked for before glibc, since they carry compatibility layers:
//! a module that defines `mallocx`, `rallocx` and `sdallocx` under one prefix is jemalloc with
//! that prefix (`je_` in redis, `_rjem_` in tikv-jemallocator, none in Debian's
//! `libjemalloc.so.2`); `tc_malloc` and `tc_free` are gperftools' tcmalloc; `mi_malloc` and
//! `mi_free` are mimalloc; glibc's `libc.so.6` is glibc; any other module defining `malloc`
//! and `free` (musl's in a static binary, a static glibc, a custom one) is a C library's.

use std::path::Path;

use crate::probe::{
    elf::{ElfFunctions, Jump},
    offsets,
    tables::{Entry, Family, Role, table_applies},
    tcache,
};

pub use crate::probe::tables::{Found, Point};

/// The allocators `functions` (the module at `path`) carries, non-default ones first. A
/// family is reported when the module both allocates and frees through it.
pub fn detect(functions: &ElfFunctions, path: &Path) -> Vec<Found> {
    let mut found = Vec::new();
    for prefix in jemalloc_prefixes(functions) {
        found.extend(resolve(functions, Family::Jemalloc, &prefix));
    }
    let defines = |n: &str| functions.defines(n);
    if defines("tc_malloc") && defines("tc_free") {
        found.extend(resolve(functions, Family::Tcmalloc, ""));
    }
    let mi_allocates = [
        "mi_malloc",
        "mi_malloc_aligned",
        "mi_zalloc_aligned",
        "mi_new",
    ]
    .iter()
    .any(|n| defines(n));
    if mi_allocates && defines("mi_free") {
        found.extend(resolve(functions, Family::Mimalloc, ""));
    }
    let plain_taken = found.iter().any(|f| f.prefix.is_empty());
    if !plain_taken && defines("malloc") && defines("free") {
        let family = if is_glibc(functions, path) {
            Family::Glibc
        } else {
            Family::Libc
        };
        found.extend(resolve(functions, family, ""));
    }
    found
}

/// glibc's C library: named as such and carrying glibc's banner.
fn is_glibc(functions: &ElfFunctions, path: &Path) -> bool {
    let named = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
        n.starts_with("libc.so") || (n.starts_with("libc-") && n.ends_with(".so"))
    });
    (named || functions.defines("__libc_malloc"))
        && crate::probe::elf::glibc_minor(functions.data()).is_some()
}

/// Every prefix under which the module defines jemalloc's own API (`mallocx`, `rallocx` and
/// `sdallocx` together), shortest first.
fn jemalloc_prefixes(functions: &ElfFunctions) -> Vec<String> {
    let mut prefixes: Vec<String> = functions
        .names()
        .filter_map(|n| n.strip_suffix("mallocx"))
        .filter(|p| {
            functions.defines(&format!("{p}rallocx")) && functions.defines(&format!("{p}sdallocx"))
        })
        .map(str::to_owned)
        .collect();
    prefixes.sort_by_key(String::len);
    prefixes.dedup();
    prefixes
}

/// The family's functions found in the module, once per address (aliases such as glibc's
/// `memalign`/`aligned_alloc` or tcmalloc's `tc_malloc`/`malloc` are probed once). `None`
/// unless something both allocates and frees: half an allocator would make every block
/// look leaked, or every free unknown.
fn resolve(functions: &ElfFunctions, family: Family, prefix: &str) -> Option<Found> {
    let mut points: Vec<Point> = Vec::new();
    for table in family.tables() {
        if !table_applies(table, prefix) {
            continue;
        }
        for entry in table.iter() {
            if let Some(p) = point(functions, prefix, entry)
                && !points.iter().any(|q| q.offset == p.offset)
            {
                points.push(p);
            }
        }
    }
    drop_trampolines(functions, &mut points);
    let has = |pred: fn(Role) -> bool| points.iter().any(|p| pred(p.role));
    if !has(Role::allocates) || !has(|r| r == Role::Free) {
        return None;
    }
    let tcache_got = (family == Family::Glibc)
        .then(|| tcache::got_delta(functions.data()))
        .flatten();
    Some(Found {
        family,
        prefix: prefix.to_owned(),
        points,
        tcache_got,
    })
}

/// Drops the points that are only a jump to another point (jemalloc's `operator new[]` to
/// its `operator new`, its `operator delete` to `free`): the target's probe sees the call,
/// with the same stack, and probing both would count it twice.
fn drop_trampolines(functions: &ElfFunctions, points: &mut Vec<Point>) {
    let jumps: Vec<Option<Jump>> = points
        .iter()
        .map(|p| functions.jump_of(&p.symbol))
        .collect();
    let probed = |jump: &Jump| {
        points.iter().any(|q| match jump {
            Jump::Local(offset) => q.offset == *offset,
            Jump::Import(name) => q.symbol == *name,
        })
    };
    let keep: Vec<bool> = jumps
        .iter()
        .map(|j| !j.as_ref().is_some_and(&probed))
        .collect();
    let mut keep = keep.into_iter();
    points.retain(|_| keep.next().unwrap_or(true));
}

fn point(functions: &ElfFunctions, prefix: &str, entry: &Entry) -> Option<Point> {
    let symbol = format!("{prefix}{}", entry.symbol);
    let f = functions.find(&symbol)?;
    let past_null_check = if entry.role.skips_null_check() {
        offsets::entry_offset_keeping_rdi(f.code())
    } else {
        0
    };
    let entry_offset = match past_null_check {
        0 => offsets::first_emulated(f.code(), entry.role.argument_registers()),
        at => at,
    };
    Some(Point {
        symbol,
        role: entry.role,
        offset: f.offset,
        entry_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn families(path: &str) -> Vec<(Family, String)> {
        let functions = ElfFunctions::read(Path::new(path)).expect("readable");
        detect(&functions, Path::new(path))
            .into_iter()
            .map(|f| (f.family, f.prefix))
            .collect()
    }

    #[test]
    fn this_machine_s_libraries_are_told_apart() {
        let lib = "/usr/lib/x86_64-linux-gnu";
        assert_eq!(
            families(&format!("{lib}/libc.so.6")),
            [(Family::Glibc, String::new())]
        );
        assert_eq!(
            families(&format!("{lib}/libjemalloc.so.2")),
            [(Family::Jemalloc, String::new())]
        );
        assert_eq!(
            families(&format!("{lib}/libtcmalloc.so.4")),
            [(Family::Tcmalloc, String::new())]
        );
        assert_eq!(
            families(&format!("{lib}/libmimalloc.so.2")),
            [(Family::Mimalloc, String::new())]
        );
        assert_eq!(families(&format!("{lib}/libz.so.1")), []);
    }

    #[test]
    fn glibc_gets_its_thread_cache_and_free_past_its_null_check() {
        let path = "/usr/lib/x86_64-linux-gnu/libc.so.6";
        let functions = ElfFunctions::read(Path::new(path)).expect("readable");
        let glibc = detect(&functions, Path::new(path)).remove(0);
        assert!(glibc.tcache_got.is_some());
        let free = glibc
            .points
            .iter()
            .find(|p| p.symbol == "free")
            .expect("free");
        assert!(free.entry_offset > 0, "{free:?}");
        // memalign and aligned_alloc are one function: probed once.
        let aligned = glibc
            .points
            .iter()
            .filter(|p| p.role == Role::AlignedAlloc)
            .count();
        assert_eq!(aligned, 1);
    }

    /// Debian's jemalloc starts `malloc` with `cmp` and `free` with `mov`s, which the kernel
    /// single-steps (≈ 13 µs a hit in this VM against ≈ 0.7 µs emulated): both are probed
    /// further in, at their first branch, and no probe sits on a single-stepped instruction
    /// when an emulated one is reachable.
    #[test]
    fn jemalloc_is_probed_where_the_kernel_emulates_the_trap() {
        let path = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";
        let functions = ElfFunctions::read(Path::new(path)).expect("readable");
        let jemalloc = detect(&functions, Path::new(path)).remove(0);
        for symbol in ["malloc", "free"] {
            let p = jemalloc
                .points
                .iter()
                .find(|p| p.symbol == symbol)
                .expect(symbol);
            assert!(p.entry_offset > 0, "{p:?}");
            let code = functions.find(symbol).expect(symbol);
            let at = p.entry_offset as usize;
            let branch = matches!(
                code.code()[at..],
                [0x70..=0x7f, ..] | [0x0f, 0x80..=0x8f, ..]
            );
            assert!(branch, "{p:?}");
        }
    }
}
