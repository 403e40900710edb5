//! What a site allocated (`Vec<shop::Order>`, `std::map<int, std::string>`), from DWARF.
//!
//! Library code that allocates is a method of the container it grows (`Vec<T>::push`,
//! `std::vector<Rec>::_M_realloc_insert`) or a function that returns one (`alloc::fmt::format`
//! returns a `String`, `std::make_shared<Rec>` a `std::shared_ptr<Rec>`). The binary's DWARF
//! says both: a monomorphized method is declared inside its concrete type, and a function's
//! declaration carries its return type. For every function covering an address (inlined or
//! not) this module names the container it belongs to or returns, printed as people write it
//! ([`render`]). Without DWARF nothing is named: legacy and v0 symbol names alone are never
//! used to guess.

pub mod render;

use std::{cell::RefCell, os::unix::fs::MetadataExt as _, path::Path, rc::Rc, sync::Arc};

use gimli::{AttributeValue, EndianSlice, RunTimeEndian, UnitOffset};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
use rustc_hash::FxHashMap;

type Slice<'a> = EndianSlice<'a, RunTimeEndian>;
type Unit<'a> = gimli::Unit<Slice<'a>>;
type PerModule<T> = FxHashMap<Arc<Path>, T>;
type ModuleOffset = (Arc<Path>, u64);

/// For each function covering an address, outermost first: its name as frames show it
/// (demangled linkage name, else its DWARF name), and the container type it belongs to or
/// returns, if any.
pub type Chain = Rc<[(String, Option<String>)]>;

/// A module file, mapped: only the pages a lookup reads (its symbols, its DWARF when it has
/// some) are brought in, not the whole file (reading python3's 7 MB program into memory,
/// twice under two names, was a quarter of a report's peak memory).
type Mapped = Option<Arc<memmap2::Mmap>>;

/// Looks types up in modules' DWARF, remembering every answer.
#[derive(Default)]
pub struct TypeFinder {
    files: RefCell<PerModule<Mapped>>,
    /// The same files by identity (device, inode): one mapping per file, whatever the
    /// paths it was reached by.
    by_identity: RefCell<FxHashMap<(u64, u64), Mapped>>,
    chains: RefCell<FxHashMap<ModuleOffset, Chain>>,
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
            object::File::parse(&data[..]).is_ok_and(|file| {
                file.symbols().chain(file.dynamic_symbols()).any(|s| {
                    s.name()
                        .is_ok_and(|n| n.contains("__rust_alloc") || n.contains("__rdl_alloc"))
                })
            })
        });
        self.rust_modules.borrow_mut().insert(module.clone(), rust);
        rust
    }

    fn file(&self, module: &Arc<Path>) -> Mapped {
        if let Some(known) = self.files.borrow().get(module) {
            return known.clone();
        }
        let mapped = std::fs::File::open(module).ok().and_then(|file| {
            let meta = file.metadata().ok()?;
            self.by_identity
                .borrow_mut()
                .entry((meta.dev(), meta.ino()))
                .or_insert_with(|| {
                    // SAFETY: a read-only mapping of a module file, only read. A file cut
                    // short while mapped would fault on a read past its new end; installed
                    // programs are replaced by renaming a new file over them, which leaves
                    // this one whole (blazesym maps the same files the same way).
                    unsafe { memmap2::Mmap::map(&file) }.ok().map(Arc::new)
                })
                .clone()
        });
        self.files
            .borrow_mut()
            .insert(module.clone(), mapped.clone());
        mapped
    }

    /// The functions covering `file_offset` in `module`, outermost first, each with the
    /// container type it belongs to or returns (see [`Chain`]); empty without DWARF.
    pub fn chain_at(&self, module: &Arc<Path>, file_offset: u64) -> Chain {
        let key = (module.clone(), file_offset);
        if let Some(chain) = self.chains.borrow().get(&key) {
            return chain.clone();
        }
        let chain: Chain = self
            .file(module)
            .and_then(|d| chain_in(&d, file_offset))
            .unwrap_or_default()
            .into();
        self.chains.borrow_mut().insert(key, chain.clone());
        chain
    }
}

fn chain_in(data: &[u8], file_offset: u64) -> Option<Vec<(String, Option<String>)>> {
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
    let dies = Dies::new(gimli::Dwarf::load(load).ok()?);
    // Only the unit covering the address is read whole (and those it refers to).
    (0..dies.headers.len()).find_map(|u| {
        let unit = dies.dwarf.unit(dies.headers[u]).ok()?;
        if !dies
            .dwarf
            .unit_ranges(&unit)
            .is_ok_and(|r| contains(r, svma))
        {
            return None;
        }
        let chain = dies.chain(u, svma);
        (!chain.is_empty()).then_some(chain)
    })
}

fn contains(mut ranges: gimli::RangeIter<Slice<'_>>, addr: u64) -> bool {
    while let Ok(Some(r)) = ranges.next() {
        if r.begin <= addr && addr < r.end {
            return true;
        }
    }
    false
}

/// A DIE: its unit (index into [`Dies::headers`]) and its offset in that unit.
type Die = (usize, UnitOffset);

/// A module's DWARF, its units read as they are needed (inlined functions and methods refer
/// to declarations in other units of the same module).
struct Dies<'d> {
    dwarf: gimli::Dwarf<Slice<'d>>,
    headers: Vec<gimli::UnitHeader<Slice<'d>>>,
    trees: RefCell<FxHashMap<usize, Rc<UnitTree<'d>>>>,
}

/// One unit's DIE tree, as far as naming types needs it: each DIE's parent, and the
/// functions (subprograms and inlined calls) in depth-first order.
struct UnitTree<'d> {
    unit: Unit<'d>,
    parent: FxHashMap<UnitOffset, UnitOffset>,
    functions: Vec<UnitOffset>,
}

impl<'d> Dies<'d> {
    fn new(dwarf: gimli::Dwarf<Slice<'d>>) -> Self {
        let mut headers = Vec::new();
        let mut units = dwarf.units();
        while let Ok(Some(header)) = units.next() {
            headers.push(header);
        }
        Self {
            dwarf,
            headers,
            trees: RefCell::default(),
        }
    }

    fn tree(&self, u: usize) -> Option<Rc<UnitTree<'d>>> {
        if let Some(tree) = self.trees.borrow().get(&u) {
            return Some(tree.clone());
        }
        let unit = self.dwarf.unit(*self.headers.get(u)?).ok()?;
        let mut parent = FxHashMap::default();
        let mut ancestors: Vec<UnitOffset> = Vec::new();
        let mut functions = Vec::new();
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
            ) {
                functions.push(entry.offset());
            }
        }
        let tree = Rc::new(UnitTree {
            unit,
            parent,
            functions,
        });
        self.trees.borrow_mut().insert(u, tree.clone());
        Some(tree)
    }

    /// The DIE an attribute refers to, in this unit or another.
    fn reference(&self, u: usize, value: AttributeValue<Slice<'d>>) -> Option<Die> {
        match value {
            AttributeValue::UnitRef(r) => Some((u, r)),
            AttributeValue::DebugInfoRef(offset) => self
                .headers
                .iter()
                .enumerate()
                .find_map(|(target, header)| offset.to_unit_offset(header).map(|at| (target, at))),
            _ => None,
        }
    }

    fn attr(&self, (u, at): Die, name: gimli::DwAt) -> Option<AttributeValue<Slice<'d>>> {
        self.tree(u)?.unit.entry(at).ok()?.attr_value(name)
    }

    fn string(&self, die: Die, name: gimli::DwAt) -> Option<String> {
        let tree = self.tree(die.0)?;
        let value = self.attr(die, name)?;
        let s = self.dwarf.attr_string(&tree.unit, value).ok()?;
        Some(String::from_utf8_lossy(s.slice()).into_owned())
    }

    fn parent(&self, (u, at): Die) -> Option<Die> {
        self.tree(u)?.parent.get(&at).map(|&p| (u, p))
    }

    fn tag(&self, (u, at): Die) -> Option<gimli::DwTag> {
        Some(self.tree(u)?.unit.entry(at).ok()?.tag())
    }

    /// The functions covering `addr` in unit `u`, outermost first: each one's name and what
    /// it names.
    fn chain(&self, u: usize, addr: u64) -> Vec<(String, Option<String>)> {
        let Some(tree) = self.tree(u) else {
            return Vec::new();
        };
        tree.functions
            .iter()
            .filter(|&&at| {
                tree.unit.entry(at).is_ok_and(|e| {
                    self.dwarf
                        .die_ranges(&tree.unit, &e)
                        .is_ok_and(|r| contains(r, addr))
                })
            })
            .map(|&at| {
                let die = (u, at);
                (self.function_name(die).unwrap_or_default(), self.names(die))
            })
            .collect()
    }

    /// The next DIE describing the same function: its abstract origin or specification.
    fn origin(&self, die: Die) -> Option<Die> {
        [gimli::DW_AT_abstract_origin, gimli::DW_AT_specification]
            .into_iter()
            .find_map(|a| self.reference(die.0, self.attr(die, a)?))
    }

    /// The name a symbolizer shows for a function: its linkage name demangled, or its name,
    /// looked up through its origin and specification.
    fn function_name(&self, mut die: Die) -> Option<String> {
        let mut name = None;
        for _ in 0..4 {
            if let Some(linkage) = self.string(die, gimli::DW_AT_linkage_name) {
                return Some(crate::demangle::demangle(&linkage).into_owned());
            }
            name = name.or_else(|| self.string(die, gimli::DW_AT_name));
            match self.origin(die) {
                Some(next) => die = next,
                None => break,
            }
        }
        name
    }

    /// The function's declaration, through its origin and specification.
    fn declaration(&self, mut die: Die) -> Die {
        for _ in 0..4 {
            match self.origin(die) {
                Some(next) => die = next,
                None => break,
            }
        }
        die
    }

    /// The container the function is a method of, or else the one it returns.
    fn names(&self, die: Die) -> Option<String> {
        let declared = self.declaration(die);
        let owner = self
            .parent(declared)
            .filter(|&p| {
                matches!(
                    self.tag(p),
                    Some(
                        gimli::DW_TAG_structure_type
                            | gimli::DW_TAG_class_type
                            | gimli::DW_TAG_union_type
                    )
                )
            })
            .and_then(|p| self.qualified(p))
            .and_then(|t| render::container(&t));
        let returned = || {
            [die, declared]
                .into_iter()
                .find_map(|d| self.reference(d.0, self.attr(d, gimli::DW_AT_type)?))
                .and_then(|t| self.qualified(t))
                .and_then(|t| render::container(&t))
        };
        owner
            .or_else(returned)
            .or_else(|| self.in_impl_block(declared))
    }

    /// A function declared in an `impl` block of a std module (`alloc::boxed::{impl#0}`):
    /// the module's container, with the function's first type argument as its element.
    fn in_impl_block(&self, declared: Die) -> Option<String> {
        let mut scopes = Vec::new();
        let mut up = self.parent(declared);
        while let Some(scope) = up {
            up = self.parent(scope);
            if up.is_some() {
                scopes.push(self.string(scope, gimli::DW_AT_name).unwrap_or_default());
            }
        }
        render::impl_block_container(&self.string(declared, gimli::DW_AT_name)?, &scopes)
    }

    /// A type's name with its enclosing namespaces and types: `alloc::vec::Vec<u8, …>`,
    /// `std::vector<Rec, std::allocator<Rec> >`.
    fn qualified(&self, die: Die) -> Option<String> {
        let mut path = vec![self.string(die, gimli::DW_AT_name)?];
        let mut up = self.parent(die);
        while let Some(scope) = up {
            up = self.parent(scope);
            if up.is_none() {
                break; // the compile unit
            }
            path.push(self.string(scope, gimli::DW_AT_name)?);
        }
        path.reverse();
        Some(path.join("::"))
    }
}
