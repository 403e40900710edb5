//! Where a site starts: the innermost frame that is the program's own code.
//!
//! Between `malloc` and the code that asked for memory there is usually library machinery:
//! `operator new`, `std::vector`'s growth and allocator traits, hashbrown's table, `core::fmt`
//! writing into a `String`, Rust's `__rdl_alloc`. A frame is such machinery when its code
//! ships with the toolchain rather than with the program: the allocator's entry points, a
//! source file in the toolchain's library sources (the C and C++ system headers, Rust's
//! `library/` tree and the crates std vendors), or a function in the standard libraries'
//! namespaces (C++ `std`, `__gnu_cxx`; Rust `std`, `core`, `alloc`, and `hashbrown`, which
//! implements std's hash maps) for code without line information. Calls into the C library
//! (`strdup`, `fopen`) stay frames of their own: they are the program's requests, and a
//! frame-pointer stack may have lost their caller.

use crate::symbolize::Frame;

/// Functions that allocate on behalf of their caller.
const ALLOCATOR_FUNCTIONS: &[&str] = &[
    "malloc",
    "calloc",
    "realloc",
    "reallocarray",
    "free",
    "posix_memalign",
    "aligned_alloc",
    "memalign",
    "valloc",
    "pvalloc",
    "operator new",
    "operator new[]",
];

/// Prefixes of the allocators' internal and shim symbols: glibc's, Rust's allocator shims
/// (`__rustc::__rust_alloc` since Rust mangles them),
/// jemalloc's (`je_`, and `_rjem_` as tikv-jemallocator builds it), tcmalloc's, mimalloc's.
const ALLOCATOR_PREFIXES: &[&str] = &[
    "__libc_",
    "__rust_",
    "__rustc::",
    "__rdl_",
    "__rg_",
    "_rjem_",
    "je_",
    "tc_",
    "mi_",
];

/// A Rust global allocator is an implementation of this trait (`tikv_jemallocator::Jemalloc`,
/// `mimalloc::MiMalloc`, a program's own wrapper): its methods allocate for their caller.
const GLOBAL_ALLOC: &str = " as core::alloc::global::GlobalAlloc>::";

/// Source trees that ship with the toolchain: system and C++ standard headers, GCC's own
/// headers, Rust's standard library and the crates it vendors (remapped paths in rustc's
/// release builds).
const LIBRARY_SOURCES: &[&str] = &["/usr/include/", "/usr/lib/gcc/", "/rust/deps/"];

/// Namespaces (C++) and crates (Rust) of the standard libraries.
const LIBRARY_NAMESPACES: &[&str] = &[
    "std",
    "__gnu_cxx",
    "__cxxabiv1",
    "core",
    "alloc",
    "hashbrown",
];

/// The number of leading frames (innermost first) that are allocator or library code, so
/// `frames[skip]` is the program's own innermost frame. When no frame is the program's (a
/// stack entirely inside libraries), only the allocator's frames are skipped; when every
/// frame is the allocator's, none are.
pub fn program_start(frames: &[Frame]) -> usize {
    if let Some(i) = frames.iter().position(|f| !is_library(f)) {
        return i;
    }
    frames
        .iter()
        .position(|f| !is_allocator(f))
        .unwrap_or_default()
}

/// Allocator entry points and shims.
pub fn is_allocator(frame: &Frame) -> bool {
    frame.function.as_deref().is_some_and(|f| {
        let base = f.split('(').next().unwrap_or(f).trim();
        ALLOCATOR_FUNCTIONS.contains(&base)
            || ALLOCATOR_PREFIXES.iter().any(|p| base.starts_with(p))
            || f.contains(GLOBAL_ALLOC)
    })
}

/// Code that ships with the toolchain (see the module documentation).
pub fn is_library(frame: &Frame) -> bool {
    if is_allocator(frame) {
        return true;
    }
    if frame.file.as_deref().is_some_and(is_library_source) {
        return true;
    }
    frame
        .function
        .as_deref()
        .is_some_and(|f| namespace_of(f).is_some_and(|ns| LIBRARY_NAMESPACES.contains(&ns)))
}

fn is_library_source(file: &str) -> bool {
    LIBRARY_SOURCES.iter().any(|p| file.starts_with(p))
        // rustc's own sources: /rustc/<commit>/library/…
        || file
            .strip_prefix("/rustc/")
            .and_then(|rest| rest.split_once('/'))
            .is_some_and(|(_, path)| path.starts_with("library/"))
}

/// The outermost namespace or crate the code of a demangled function belongs to:
/// `std` for `std::vector<Rec>::push_back(Rec const&)` and `<alloc::string::String>::push_str`,
/// `core` for `<&mut W as core::fmt::Write>::write_fmt` (a blanket impl of a core trait),
/// `shop` for `<shop::Order as core::clone::Clone>::clone` (the program's own impl), `alloc`
/// for `<str>::repeat` (only the standard library implements methods on primitive types).
fn namespace_of(function: &str) -> Option<&str> {
    let name = qualified_name(function);
    let Some(inner) = name.strip_prefix('<') else {
        return first_segment(name);
    };
    let inner = &inner[..matching_close(inner)?];
    let (self_type, trait_path) = match split_top_level(inner, " as ") {
        Some((s, t)) => (s, Some(t)),
        None => (inner, None),
    };
    let self_type = self_type
        .trim_start_matches('&')
        .trim_start_matches("mut ")
        .trim_start_matches("*const ")
        .trim_start_matches("*mut ")
        .trim_start_matches("dyn ");
    match first_segment(self_type) {
        // A path type: the impl belongs with it.
        Some(ns) if self_type.contains("::") => Some(ns),
        // A primitive or generic self type: a trait impl is its trait's crate's; an
        // inherent impl on a primitive can only be the standard library's.
        _ => match trait_path {
            Some(t) => first_segment(t),
            None => Some("alloc"),
        },
    }
}

/// The qualified name of a demangled function, without a C++ return type before it or the
/// parameter list after it.
fn qualified_name(function: &str) -> &str {
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in function.char_indices() {
        match c {
            '<' | '[' => depth += 1,
            '>' | ']' => depth -= 1,
            '(' if depth == 0 && i > 0 => return &function[start..i],
            ' ' if depth == 0 => start = i + 1,
            _ => {}
        }
    }
    &function[start..]
}

fn first_segment(path: &str) -> Option<&str> {
    let segment = path.split("::").next()?.split('<').next()?.trim();
    (!segment.is_empty()).then_some(segment)
}

/// The index of the `>` closing an already opened `<` in `s`.
fn matching_close(s: &str) -> Option<usize> {
    let mut depth = 1i32;
    for (i, c) in s.char_indices() {
        match c {
            '<' => depth += 1,
            '>' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Splits `s` at the first `sep` outside angle brackets.
fn split_top_level<'a>(s: &'a str, sep: &str) -> Option<(&'a str, &'a str)> {
    let mut depth = 0i32;
    for (i, c) in s.char_indices() {
        match c {
            '<' => depth += 1,
            '>' => depth -= 1,
            _ if depth == 0 && s[i..].starts_with(sep) => {
                return Some((&s[..i], &s[i + sep.len()..]));
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str, file: Option<&str>) -> Frame {
        Frame {
            function: Some(function.into()),
            file: file.map(Into::into),
            ..Frame::default()
        }
    }

    #[test]
    fn standard_library_code_is_library_by_namespace_or_source() {
        for (function, file) in [
            ("operator new(unsigned long)", None),
            ("__rdl_alloc", None),
            (
                "<tikv_jemallocator::Jemalloc as core::alloc::global::GlobalAlloc>::realloc",
                None,
            ),
            (
                "<mimalloc::MiMalloc as core::alloc::global::GlobalAlloc>::alloc",
                None,
            ),
            ("_rjem_mallocx", None),
            ("__rustc::__rust_realloc", None),
            ("std::sys::alloc::unix::aligned_malloc", None),
            ("hashbrown::raw::alloc::inner::do_alloc", None),
            ("<alloc::string::String>::push_str", None),
            ("<&mut W as core::fmt::Write>::write_fmt", None),
            ("<str>::repeat", None),
            ("<core::fmt::Formatter>::padding", None),
            (
                "void std::vector<Rec, std::allocator<Rec> >::_M_realloc_insert<Rec const&>(__gnu_cxx::__normal_iterator<Rec*, std::vector<Rec, std::allocator<Rec> > >, Rec const&)",
                None,
            ),
            (
                "std::__cxx11::basic_string<char, std::char_traits<char>, std::allocator<char> >::_M_mutate(unsigned long, unsigned long, char const*, unsigned long)",
                None,
            ),
            ("anything", Some("/usr/include/c++/12/bits/stl_vector.h")),
            (
                "anything",
                Some("/rustc/0123abcd/library/alloc/src/raw_vec/mod.rs"),
            ),
            (
                "anything",
                Some("/rust/deps/hashbrown-0.15.5/src/raw/mod.rs"),
            ),
        ] {
            assert!(is_library(&frame(function, file)), "{function} {file:?}");
        }
    }

    #[test]
    fn the_programs_code_is_not_library() {
        for (function, file) in [
            ("store(int)", Some("/src/containers.cpp")),
            ("f", Some("short_names.c")),
            ("strdup", Some("./string/strdup.c")),
            ("collections::greet", None),
            ("<shop::Order as core::clone::Clone>::clone", None),
            ("shop::std_like::helper", None),
        ] {
            assert!(!is_library(&frame(function, file)), "{function} {file:?}");
        }
    }

    #[test]
    fn a_site_starts_at_the_programs_innermost_frame() {
        let stack = [
            frame("operator new(unsigned long)", None),
            frame(
                "std::__new_allocator<Rec>::allocate(unsigned long, void const*)",
                Some("/usr/include/c++/12/bits/new_allocator.h"),
            ),
            frame("store(int)", Some("/src/containers.cpp")),
            frame("main", Some("/src/containers.cpp")),
        ];
        assert_eq!(program_start(&stack), 2);
        // Entirely library code: only the allocator's frames are skipped.
        let inside = [frame("malloc", None), frame("std::rt::lang_start", None)];
        assert_eq!(program_start(&inside), 1);
        assert_eq!(program_start(&[frame("malloc", None)]), 0);
    }
}
