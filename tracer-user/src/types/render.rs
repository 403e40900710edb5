//! Type names as people write them: `Vec<Vec<shop::Order>>`, not
//! `alloc::vec::Vec<alloc::vec::Vec<shop::Order, alloc::alloc::Global>, alloc::alloc::Global>`;
//! `std::map<int, std::string>`, not `std::map<int, std::__cxx11::basic_string<char,
//! std::char_traits<char>, std::allocator<char> >, std::less<int>, …>`.
//!
//! Standard-library paths print as the standard library exports them (Rust: the type's own
//! name; C++: `std::` without inline namespaces), trailing type arguments that are the
//! standard containers' defaults (allocators, comparators, hashers, character traits) are
//! dropped, and an `Rc`/`Arc`'s heap block (`RcInner<T>`) is named after the `Rc<T>`.

/// Rust crates of the standard library.
const RUST_STD: &[&str] = &["alloc", "core", "std", "hashbrown"];

/// Default type arguments of the standard containers, by their (qualified) name's start.
const DEFAULT_ARGUMENTS: &[&str] = &[
    "alloc::alloc::Global",
    "std::hash::random::RandomState",
    "hashbrown::DefaultHashBuilder",
    "std::allocator<",
    "std::less<",
    "std::char_traits<",
    "std::hash<",
    "std::equal_to<",
    "std::default_delete<",
];

/// Containers and owning pointers a site can have allocated, as rendered; internal
/// representations are named after the container that owns them.
const CONTAINERS: &[(&str, &str)] = &[
    ("Vec", "Vec"),
    ("RawVec", "Vec"),
    ("VecDeque", "VecDeque"),
    ("String", "String"),
    ("Box", "Box"),
    ("Rc", "Rc"),
    ("Arc", "Arc"),
    ("HashMap", "HashMap"),
    ("HashSet", "HashSet"),
    ("RawTable", "HashMap/HashSet"),
    ("BTreeMap", "BTreeMap"),
    ("BTreeSet", "BTreeSet"),
    ("BinaryHeap", "BinaryHeap"),
    ("LinkedList", "LinkedList"),
    ("std::vector", "std::vector"),
    ("std::string", "std::string"),
    ("std::basic_string", "std::basic_string"),
    ("std::deque", "std::deque"),
    ("std::list", "std::list"),
    ("std::forward_list", "std::forward_list"),
    ("std::map", "std::map"),
    ("std::multimap", "std::multimap"),
    ("std::set", "std::set"),
    ("std::multiset", "std::multiset"),
    ("std::unordered_map", "std::unordered_map"),
    ("std::unordered_set", "std::unordered_set"),
    ("std::shared_ptr", "std::shared_ptr"),
    ("std::unique_ptr", "std::unique_ptr"),
];

/// The rendered type if it is a container (see [`CONTAINERS`]), else `None`.
pub fn container(qualified: &str) -> Option<String> {
    let rendered = render(qualified);
    let (base, args) = split_generic(&rendered);
    let (_, shown) = CONTAINERS.iter().find(|(name, _)| *name == base)?;
    Some(match args {
        Some(args) => format!("{shown}<{}>", args.join(", ")),
        None => shown.to_string(),
    })
}

/// A type name in the standard library's own spelling, recursively.
pub fn render(ty: &str) -> String {
    let ty = ty.trim();
    for prefix in ["&mut ", "&", "*const ", "*mut ", "dyn "] {
        if let Some(rest) = ty.strip_prefix(prefix) {
            return format!("{prefix}{}", render(rest));
        }
    }
    if let Some(inner) = ty.strip_prefix('(').and_then(|t| t.strip_suffix(')')) {
        let parts: Vec<String> = split_arguments(inner).iter().map(|p| render(p)).collect();
        return format!("({})", parts.join(", "));
    }
    if let Some(inner) = ty.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        return match inner.rsplit_once("; ") {
            Some((element, len)) => format!("[{}; {len}]", render(element)),
            None => format!("[{}]", render(inner)),
        };
    }
    let (base, args) = split_generic(ty);
    let base = short_path(base);
    let Some(raw) = args else {
        return cxx_alias(&base, &[]).unwrap_or(base);
    };
    let mut kept: Vec<&str> = raw.clone();
    while kept.len() > 1
        && kept
            .last()
            .is_some_and(|a| DEFAULT_ARGUMENTS.iter().any(|d| a.starts_with(d)))
    {
        kept.pop();
    }
    let args: Vec<String> = kept.iter().map(|a| render(a)).collect();
    if let Some(alias) = cxx_alias(&base, &args) {
        return alias;
    }
    // An Rc's or Arc's heap block is allocated as a `Box` of its inner struct.
    if base == "Box"
        && let [inner] = &args[..]
    {
        let (inner_base, inner_args) = split_generic(inner);
        let owner = match inner_base {
            "RcInner" | "RcBox" => Some("Rc"),
            "ArcInner" => Some("Arc"),
            _ => None,
        };
        if let (Some(owner), Some(inner_args)) = (owner, inner_args) {
            return format!("{owner}<{}>", inner_args.join(", "));
        }
    }
    format!("{base}<{}>", args.join(", "))
}

/// `std::string` for `std::basic_string<char>` (and its wide siblings).
fn cxx_alias(base: &str, args: &[String]) -> Option<String> {
    if base != "std::basic_string" {
        return None;
    }
    let alias = match args.first().map(String::as_str) {
        Some("char") => "std::string",
        Some("wchar_t") => "std::wstring",
        Some("char16_t") => "std::u16string",
        Some("char32_t") => "std::u32string",
        _ => return None,
    };
    Some(alias.to_owned())
}

/// Rust standard paths shortened to the type's name (`alloc::vec::Vec` → `Vec`); C++ inline
/// namespaces dropped (`std::__cxx11::basic_string` → `std::basic_string`). Rust's `std`
/// and C++'s share a name; Rust's types are CamelCase, C++'s standard types lower case.
fn short_path(base: &str) -> String {
    let first = base.split("::").next().unwrap_or(base);
    let last = base.rsplit("::").next().unwrap_or(base);
    let rust = match first {
        "std" => last.starts_with(|c: char| c.is_ascii_uppercase()),
        _ => RUST_STD.contains(&first),
    };
    if rust && base.contains("::") {
        return last.to_owned();
    }
    base.split("::")
        .filter(|s| !(s.starts_with("__cxx") || *s == "__1"))
        .collect::<Vec<_>>()
        .join("::")
}

/// `Vec<u8, Global>` → (`Vec`, [`u8`, `Global`]); `u8` → (`u8`, None).
fn split_generic(ty: &str) -> (&str, Option<Vec<&str>>) {
    let Some(open) = ty.find('<') else {
        return (ty, None);
    };
    let Some(inner) = ty[open + 1..].trim_end().strip_suffix('>') else {
        return (ty, None);
    };
    (&ty[..open], Some(split_arguments(inner)))
}

/// Splits at top-level commas, outside `<>`, `()` and `[]`.
fn split_arguments(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '<' | '(' | '[' => depth += 1,
            '>' | ')' | ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    let last = s[start..].trim();
    if !last.is_empty() {
        parts.push(last);
    }
    parts
}

/// std modules whose impl blocks belong to one container.
const MODULES: &[(&str, &str)] = &[
    ("vec", "Vec"),
    ("raw_vec", "Vec"),
    ("vec_deque", "VecDeque"),
    ("boxed", "Box"),
    ("rc", "Rc"),
    ("sync", "Arc"),
    ("raw", "HashMap/HashSet"),
];

/// A function declared in an `impl` block of a std module (`new<shop::Order>` in
/// `alloc::boxed::{impl#0}`): the module's container of the function's first type argument
/// (rustc names the impl's type arguments first). `scopes` are innermost first.
pub fn impl_block_container(function: &str, scopes: &[String]) -> Option<String> {
    let crate_name = scopes.last()?;
    if !RUST_STD.contains(&crate_name.as_str()) || !scopes.first()?.starts_with('{') {
        return None;
    }
    let module = scopes.iter().find(|s| !s.starts_with('{'))?;
    let container = MODULES.iter().find(|(m, _)| m == module)?.1;
    let (_, args) = split_generic(function);
    let element = render(args?.first()?);
    Some(format!("{container}<{element}>"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_types_read_as_written() {
        assert_eq!(
            container(
                "alloc::vec::Vec<alloc::vec::Vec<shop::Order, alloc::alloc::Global>, alloc::alloc::Global>"
            )
            .as_deref(),
            Some("Vec<Vec<shop::Order>>")
        );
        assert_eq!(
            container("std::collections::hash::map::HashMap<u64, alloc::string::String, std::hash::random::RandomState>").as_deref(),
            Some("HashMap<u64, String>")
        );
        assert_eq!(
            container("alloc::boxed::Box<alloc::rc::RcInner<svc::Node>, alloc::alloc::Global>")
                .as_deref(),
            Some("Rc<svc::Node>")
        );
        assert_eq!(
            container("alloc::sync::Arc<svc::Node, alloc::alloc::Global>").as_deref(),
            Some("Arc<svc::Node>")
        );
        assert_eq!(
            container("alloc::string::String").as_deref(),
            Some("String")
        );
        assert_eq!(
            container("alloc::raw_vec::RawVec<(u32, &str), alloc::alloc::Global>").as_deref(),
            Some("Vec<(u32, &str)>")
        );
        assert_eq!(container("core::fmt::Formatter"), None);
        assert_eq!(container("shop::Vec<u8>"), None);
    }

    #[test]
    fn cxx_types_read_as_written() {
        assert_eq!(
            container("std::vector<Rec, std::allocator<Rec> >").as_deref(),
            Some("std::vector<Rec>")
        );
        assert_eq!(
            container(
                "std::map<int, std::__cxx11::basic_string<char, std::char_traits<char>, \
                 std::allocator<char> >, std::less<int>, std::allocator<std::pair<int const, \
                 std::__cxx11::basic_string<char, std::char_traits<char>, std::allocator<char> > > > >"
            )
            .as_deref(),
            Some("std::map<int, std::string>")
        );
        assert_eq!(
            container(
                "std::__cxx11::basic_string<char, std::char_traits<char>, std::allocator<char> >"
            )
            .as_deref(),
            Some("std::string")
        );
        assert_eq!(
            container("std::shared_ptr<Rec>").as_deref(),
            Some("std::shared_ptr<Rec>")
        );
        assert_eq!(container("std::__new_allocator<Rec>"), None);
    }

    #[test]
    fn impl_blocks_of_std_modules_name_their_container() {
        let scopes = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            impl_block_container(
                "new<(u32, alloc::vec::Vec<u8, alloc::alloc::Global>)>",
                &scopes(&["{impl#0}", "boxed", "alloc"])
            )
            .as_deref(),
            Some("Box<(u32, Vec<u8>)>")
        );
        assert_eq!(
            impl_block_container("new<[u8]>", &scopes(&["{impl#3}", "sync", "alloc"])).as_deref(),
            Some("Arc<[u8]>")
        );
        // A user module that happens to be called `vec` is not std's.
        assert_eq!(
            impl_block_container("push<u8>", &scopes(&["{impl#0}", "vec", "shop"])),
            None
        );
        assert_eq!(
            impl_block_container("alloc_impl", &scopes(&["{impl#0}", "alloc", "alloc"])),
            None
        );
    }
}
