//! Rust type attribution: the element type `T` a site's memory was allocated for.
//!
//! Stable Rust's legacy symbol names say `RawVec<T,A>::grow_one`, never which `T`. The
//! binary's DWARF does: a monomorphized method is declared inside its concrete type
//! (`RawVec<shop::Order, alloc::alloc::Global>`), and inlined calls point back at that
//! declaration. So for the allocator-side frames of a stack, the innermost (possibly inlined)
//! function declared in a known container type names the type. Without DWARF the answer is
//! "unknown": names alone are never used to guess.

use std::{cell::RefCell, path::Path, sync::Arc};

use gimli::{AttributeValue, EndianSlice, RunTimeEndian, UnitOffset};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
use rustc_hash::FxHashMap;

type Slice<'a> = EndianSlice<'a, RunTimeEndian>;

/// Generic std/hashbrown types whose first type argument is what was allocated, and the name
/// shown for them.
const CONTAINERS: &[(&str, &str)] = &[
    ("Vec", "Vec"),
    ("RawVec", "Vec"),
    ("VecDeque", "VecDeque"),
    ("Box", "Box"),
    ("Rc", "Rc"),
    ("Arc", "Arc"),
    ("BTreeMap", "BTreeMap"),
    ("BinaryHeap", "BinaryHeap"),
    ("RawTable", "HashMap/HashSet"),
];

type PerModule<T> = FxHashMap<Arc<Path>, T>;
type ModuleOffset = (Arc<Path>, u64);

/// Looks types up in modules' DWARF, remembering every answer.
#[derive(Default)]
pub struct TypeFinder {
    files: RefCell<PerModule<Option<Arc<[u8]>>>>,
    answers: RefCell<FxHashMap<ModuleOffset, Option<String>>>,
    rust_modules: RefCell<PerModule<bool>>,
}

impl TypeFinder {
    /// Whether `module` is Rust code using Rust's allocator (it defines `__rust_alloc` or
    /// `__rdl_alloc`): its allocations get a type, or say it is unknown.
    pub fn is_rust(&self, module: &Arc<Path>) -> bool {
        if let Some(&known) = self.rust_modules.borrow().get(module) {
            return known;
        }
        let rust = self.file(module).is_some_and(|data| {
            object::File::parse(&*data).is_ok_and(|file| {
                file.symbols().chain(file.dynamic_symbols()).any(|s| {
                    s.name()
                        .is_ok_and(|n| n.contains("__rust_alloc") || n.contains("__rdl_alloc"))
                })
            })
        });
        self.rust_modules.borrow_mut().insert(module.clone(), rust);
        rust
    }

    fn file(&self, module: &Arc<Path>) -> Option<Arc<[u8]>> {
        self.files
            .borrow_mut()
            .entry(module.clone())
            .or_insert_with(|| std::fs::read(module).ok().map(Arc::from))
            .clone()
    }

    /// The container and element type (`Vec<shop::Order>`) whose code runs at `file_offset`
    /// in `module`, if its DWARF says so.
    pub fn at(&self, module: &Arc<Path>, file_offset: u64) -> Option<String> {
        let key = (module.clone(), file_offset);
        if let Some(answer) = self.answers.borrow().get(&key) {
            return answer.clone();
        }
        let data = self.file(module);
        let answer = data.and_then(|d| container_at(&d, file_offset));
        self.answers.borrow_mut().insert(key, answer.clone());
        answer
    }
}

fn container_at(data: &[u8], file_offset: u64) -> Option<String> {
    let file = object::File::parse(data).ok()?;
    let svma = crate::probe::elf::address_of_offset(&file, file_offset)?;
    let endian = if file.is_little_endian() {
        RunTimeEndian::Little
    } else {
        RunTimeEndian::Big
    };
    let load = |id: gimli::SectionId| -> Result<Slice<'_>, gimli::Error> {
        let bytes = file
            .section_by_name(id.name())
            .and_then(|s| s.data().ok())
            .unwrap_or(&[]);
        Ok(EndianSlice::new(bytes, endian))
    };
    let dwarf = gimli::Dwarf::load(load).ok()?;
    let mut units = dwarf.units();
    while let Ok(Some(header)) = units.next() {
        let Ok(unit) = dwarf.unit(header) else {
            continue;
        };
        if !contains(dwarf.unit_ranges(&unit).ok()?, svma) {
            continue;
        }
        if let Some(found) = container_in_unit(&dwarf, &unit, svma) {
            return Some(found);
        }
    }
    None
}

fn contains(mut ranges: gimli::RangeIter<Slice<'_>>, addr: u64) -> bool {
    while let Ok(Some(r)) = ranges.next() {
        if r.begin <= addr && addr < r.end {
            return true;
        }
    }
    false
}

/// Walks one unit: the functions (inlined or not) covering `addr`, innermost last, and each
/// DIE's parent, then names the innermost one declared in a container type.
fn container_in_unit(
    dwarf: &gimli::Dwarf<Slice<'_>>,
    unit: &gimli::Unit<Slice<'_>>,
    addr: u64,
) -> Option<String> {
    let mut parent: FxHashMap<UnitOffset, UnitOffset> = FxHashMap::default();
    let mut ancestors: Vec<UnitOffset> = Vec::new();
    let mut covering: Vec<UnitOffset> = Vec::new();
    let mut cursor = unit.entries();
    while let Ok(Some(entry)) = cursor.next_dfs() {
        let depth = usize::try_from(entry.depth()).unwrap_or(0);
        ancestors.truncate(depth);
        if let Some(&up) = ancestors.last() {
            parent.insert(entry.offset(), up);
        }
        ancestors.push(entry.offset());
        if matches!(
            entry.tag(),
            gimli::DW_TAG_subprogram | gimli::DW_TAG_inlined_subroutine
        ) && dwarf
            .die_ranges(unit, entry)
            .is_ok_and(|r| contains(r, addr))
        {
            covering.push(entry.offset());
        }
    }
    let name_of = |at: UnitOffset| -> Option<String> {
        let entry = unit.entry(at).ok()?;
        let name = dwarf
            .attr_string(unit, entry.attr_value(gimli::DW_AT_name)?)
            .ok()?;
        Some(String::from_utf8_lossy(name.slice()).into_owned())
    };
    covering.iter().rev().find_map(|&at| {
        let declared = declaration(unit, at)?;
        // Enclosing scopes, innermost first: `RawVec<shop::Order, …>` for methods declared
        // in their type, `{impl#0}`, `boxed`, `alloc` for those declared in an impl block.
        let mut scopes = Vec::new();
        let mut up = parent.get(&declared).copied();
        while let Some(scope) = up {
            scopes.push(name_of(scope).unwrap_or_default());
            up = parent.get(&scope).copied();
        }
        scopes.pop(); // the compile unit
        let function = name_of(declared)?;
        describe(&function, &scopes)
    })
}

/// Follows `DW_AT_abstract_origin` and `DW_AT_specification` to the function's declaration.
fn declaration(unit: &gimli::Unit<Slice<'_>>, mut at: UnitOffset) -> Option<UnitOffset> {
    for _ in 0..4 {
        let entry = unit.entry(at).ok()?;
        let next = [gimli::DW_AT_abstract_origin, gimli::DW_AT_specification]
            .into_iter()
            .find_map(|a| match entry.attr_value(a) {
                Some(AttributeValue::UnitRef(r)) => Some(r),
                _ => None,
            });
        match next {
            Some(r) => at = r,
            None => return Some(at),
        }
    }
    Some(at)
}

/// Names what a monomorphized function allocates, from its DWARF name (`grow_one<shop::Order,
/// alloc::alloc::Global>`: rustc lists the impl's and the function's type arguments, `T`
/// first) and its scopes: a container type it is declared in, or the std module of the
/// impl block it is declared in. `None` for anything else.
fn describe(function: &str, scopes: &[String]) -> Option<String> {
    let container = match scopes.first() {
        Some(owner) if owner.contains('<') => {
            let base = owner.split_once('<').map_or(owner.as_str(), |(b, _)| b);
            CONTAINERS.iter().find(|(n, _)| *n == base)?.1
        }
        _ => {
            let crate_name = scopes.last()?;
            if !["alloc", "std", "hashbrown"].contains(&crate_name.as_str()) {
                return None;
            }
            let module = scopes.iter().find(|s| !s.starts_with('{'))?;
            MODULES.iter().find(|(m, _)| m == module)?.1
        }
    };
    let element = first_type_argument(function)?;
    Some(format!("{container}<{element}>"))
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

/// `new<shop::Order>` → `shop::Order`; nested generics and tuples kept whole.
fn first_type_argument(name: &str) -> Option<&str> {
    let (_, args) = name.split_once('<')?;
    let mut depth = 0usize;
    let end = args.char_indices().find_map(|(i, c)| match c {
        '<' | '(' | '[' => {
            depth += 1;
            None
        }
        '>' | ')' | ']' if depth > 0 => {
            depth -= 1;
            None
        }
        ',' | '>' if depth == 0 => Some(i),
        _ => None,
    })?;
    let element = args[..end].trim();
    (!element.is_empty()).then_some(element)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_first_type_argument_of_containers() {
        let scopes = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            describe(
                "grow_one<shop::Order, alloc::alloc::Global>",
                &scopes(&[
                    "RawVec<shop::Order, alloc::alloc::Global>",
                    "raw_vec",
                    "alloc"
                ])
            )
            .as_deref(),
            Some("Vec<shop::Order>")
        );
        assert_eq!(
            describe(
                "new<(u32, alloc::vec::Vec<u8>)>",
                &scopes(&["{impl#0}", "boxed", "alloc"])
            )
            .as_deref(),
            Some("Box<(u32, alloc::vec::Vec<u8>)>")
        );
        assert_eq!(
            describe("new<[u8]>", &scopes(&["{impl#3}", "sync", "alloc"])).as_deref(),
            Some("Arc<[u8]>")
        );
        // A user module that happens to be called `vec` is not std's.
        assert_eq!(
            describe("push<u8>", &scopes(&["{impl#0}", "vec", "shop"])),
            None
        );
        assert_eq!(
            describe("alloc_impl", &scopes(&["{impl#0}", "alloc", "alloc"])),
            None
        );
        assert_eq!(
            describe(
                "unwrap<shop::Order>",
                &scopes(&["Option<shop::Order>", "option", "core"])
            ),
            None
        );
    }
}
