//! Symbol names as people read them: Rust and C++ names demangled, everything else untouched.
//!
//! A name is demangled only when it is mangled, as its prefix says (`_R` Rust v0, `_ZN…17h<hash>E`
//! Rust legacy, `_Z` C++): C names are stored as they were written, and a demangler asked to
//! guess reads a C function `f` as the C++ type code for `float`. C++ names go through the
//! demangler libstdc++ exports (`abi::__cxa_demangle`, GCC's own, the one addr2line, c++filt
//! and gdb use), so a frame reads exactly as those tools print it; the `cpp_demangle` crate
//! drops parameters and `&&` from some libstdc++ names. Rust names go through `rustc-demangle`,
//! without the hash, as addr2line prints them.

use std::{
    borrow::Cow,
    ffi::{CStr, CString, c_char, c_int},
};

#[link(name = "stdc++")]
unsafe extern "C" {
    /// `abi::__cxa_demangle` (Itanium C++ ABI): a `malloc`ed, NUL-terminated name, or null
    /// with `*status != 0`.
    fn __cxa_demangle(
        mangled: *const c_char,
        buffer: *mut c_char,
        length: *mut usize,
        status: *mut c_int,
    ) -> *mut c_char;
}

/// The readable form of `name`; `name` itself when it is not a mangled name or cannot be
/// demangled.
pub fn demangle(name: &str) -> Cow<'_, str> {
    if (name.starts_with("_R") || is_rust_legacy(name))
        && let Ok(d) = rustc_demangle::try_demangle(name)
    {
        return Cow::Owned(format!("{d:#}"));
    }
    if name.starts_with("_Z")
        && let Some(d) = cxx(name)
    {
        return Cow::Owned(d);
    }
    Cow::Borrowed(name)
}

/// Rust's legacy mangling is C++'s `_ZN…E` with a last component `17h` + 16 hex digits,
/// optionally followed by a suffix such as `.llvm.123` (components may contain dots too:
/// `_$LT$alloc..alloc..Global$GT$`).
fn is_rust_legacy(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("_ZN") else {
        return false;
    };
    let bytes = rest.as_bytes();
    rest.match_indices("17h").any(|(i, _)| {
        let (hash, end) = (i + 3..i + 19, i + 19);
        bytes
            .get(hash.clone())
            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
            && bytes.get(end) == Some(&b'E')
            && matches!(bytes.get(end + 1), None | Some(b'.'))
    })
}

fn cxx(name: &str) -> Option<String> {
    let mangled = CString::new(name).ok()?;
    let mut status: c_int = 0;
    // SAFETY: a NUL-terminated input, no caller buffer (the demangler allocates one), and a
    // valid status pointer; the result is checked for null and freed with `free` after copying.
    unsafe {
        let out = __cxa_demangle(
            mangled.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut status,
        );
        if out.is_null() {
            return None;
        }
        let text = (status == 0).then(|| CStr::from_ptr(out).to_string_lossy().into_owned());
        libc::free(out.cast());
        text
    }
}

#[cfg(test)]
mod tests {
    use super::demangle;

    #[test]
    fn c_names_are_never_read_as_type_codes() {
        for name in ["f", "g", "i", "main", "strdup", "__libc_start_main_impl"] {
            assert_eq!(demangle(name), name);
        }
    }

    #[test]
    fn cxx_names_read_as_addr2line_prints_them() {
        assert_eq!(demangle("_Z5storei"), "store(int)");
        assert_eq!(
            demangle("_ZNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEEC2IS3_EEmcRKS3_"),
            "std::__cxx11::basic_string<char, std::char_traits<char>, std::allocator<char> >\
             ::basic_string<std::allocator<char> >(unsigned long, char, std::allocator<char> const&)"
        );
        assert_eq!(demangle("_Z3foov.cold"), "foo() [clone .cold]");
    }

    #[test]
    fn rust_names_lose_their_hash() {
        assert_eq!(
            demangle("_ZN4core9panicking9panic_fmt17h5f1a6fd39197ad62E"),
            "core::panicking::panic_fmt"
        );
        assert_eq!(demangle("_RNvCs1234_7mycrate3foo"), "mycrate::foo");
        assert_eq!(
            demangle(
                "_ZN63_$LT$alloc..alloc..Global$u20$as$u20$core..alloc..Allocator$GT$8allocate17h0c894e74d073d628E"
            ),
            "<alloc::alloc::Global as core::alloc::Allocator>::allocate"
        );
        // A C++ name in the nested form is not Rust's.
        assert_eq!(demangle("_ZN3foo3barEv"), "foo::bar()");
    }
}
