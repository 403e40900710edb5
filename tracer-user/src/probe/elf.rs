//! Reads a module's functions by name: file offsets (what uprobes attach to) and the first
//! bytes of each (to choose an emulated probe offset). Names come from the dynamic and the
//! static symbol table, and from the detached debug symbols of a stripped file, found by its
//! build id or `.gnu_debuglink` where distributions install them.

use std::path::{Path, PathBuf};

use object::{Object as _, ObjectSection as _, ObjectSegment as _, ObjectSymbol as _};
use rustc_hash::FxHashMap;

use crate::error::{Error, Result};

/// A function in a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FunctionInFile {
    /// File offset of the function's first instruction.
    pub offset: u64,
    /// Up to 64 leading bytes of its code.
    pub code: [u8; 64],
    pub code_len: usize,
}

impl FunctionInFile {
    pub fn code(&self) -> &[u8] {
        &self.code[..self.code_len]
    }
}

/// The functions of an ELF file, looked up by name.
pub struct ElfFunctions {
    data: Vec<u8>,
    /// Defined symbols by name: their link-time address.
    by_name: FxHashMap<String, u64>,
    /// The file asks for a program interpreter (it is dynamically linked).
    pub dynamic: bool,
    /// Its symbols came only from its dynamic table (no static table, no debug symbols).
    pub exports_only: bool,
}

impl ElfFunctions {
    pub fn read(path: &Path) -> Result<Self> {
        let data = std::fs::read(path).map_err(|source| Error::ReadElf {
            path: path.to_owned(),
            source,
        })?;
        let file = object::File::parse(&*data).map_err(|e| Error::ParseElf {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let mut by_name = FxHashMap::default();
        let statics = index(&file, &mut by_name);
        let debug = if statics == 0 {
            debug_symbols(&file, path, &mut by_name)
        } else {
            0
        };
        let dynamic = has_interp(&data);
        Ok(Self {
            by_name,
            dynamic,
            exports_only: statics == 0 && debug == 0,
            data,
        })
    }

    /// The whole file.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Whether `name` is defined.
    pub fn defines(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Defined names, for detecting allocator families.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// The function `name`, if defined.
    pub fn find(&self, name: &str) -> Option<FunctionInFile> {
        let &address = self.by_name.get(name)?;
        let file = object::File::parse(&*self.data).ok()?;
        let offset = file_offset_of(&file, address)?;
        let mut code = [0u8; 64];
        let bytes = self.data.get(offset as usize..)?;
        let code_len = bytes.len().min(code.len());
        code[..code_len].copy_from_slice(&bytes[..code_len]);
        Some(FunctionInFile {
            offset,
            code,
            code_len,
        })
    }
}

/// Where a function that is only a jump goes (a tail call as its first instruction).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Jump {
    /// To code at this file offset.
    Local(u64),
    /// Through the PLT, to the function this module imports under that name.
    Import(String),
}

impl ElfFunctions {
    /// Where function `name` jumps, when its first instruction (after an `endbr64`) is an
    /// unconditional jump: jemalloc's `operator new[]` is `jmp operator new`, its `operator
    /// delete` is `jmp free@plt`. Probing both would count one call twice.
    pub fn jump_of(&self, name: &str) -> Option<Jump> {
        let &address = self.by_name.get(name)?;
        let file = object::File::parse(&*self.data).ok()?;
        let target = jump_target(&self.data, &file, address)?;
        if let Some(import) = plt_import(&self.data, &file, target) {
            return Some(Jump::Import(import));
        }
        file_offset_of(&file, target).map(Jump::Local)
    }
}

const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// The bytes at virtual address `addr`.
fn code_at<'d>(data: &'d [u8], file: &object::File<'_>, addr: u64) -> Option<&'d [u8]> {
    let offset = file_offset_of(file, addr)? as usize;
    data.get(offset..offset.checked_add(16)?.min(data.len()))
}

/// The target of a direct `jmp rel32`/`jmp rel8` at `addr` (past an `endbr64`).
fn jump_target(data: &[u8], file: &object::File<'_>, addr: u64) -> Option<u64> {
    let code = code_at(data, file, addr)?;
    let skip = if code.starts_with(&ENDBR64) { 4 } else { 0 };
    let code = code.get(skip..)?;
    let (len, rel) = match *code.first()? {
        0xe9 => (
            5,
            i64::from(i32::from_le_bytes(code.get(1..5)?.try_into().ok()?)),
        ),
        0xeb => (2, i64::from(*code.get(1)? as i8)),
        _ => return None,
    };
    Some(
        addr.wrapping_add(skip as u64 + len)
            .wrapping_add_signed(rel),
    )
}

/// The imported function a PLT stub at `addr` jumps to: the stub is `jmp *GOT(%rip)` (after
/// `endbr64` and a `bnd` prefix in `.plt.sec`), and the GOT slot's jump-slot relocation
/// names the function.
fn plt_import(data: &[u8], file: &object::File<'_>, addr: u64) -> Option<String> {
    use object::{ObjectSymbolTable as _, RelocationTarget};
    let in_plt = file.sections().any(|s| {
        matches!(s.name(), Ok(".plt" | ".plt.sec" | ".plt.got"))
            && (s.address()..s.address() + s.size()).contains(&addr)
    });
    if !in_plt {
        return None;
    }
    let code = code_at(data, file, addr)?;
    let mut at = if code.starts_with(&ENDBR64) { 4 } else { 0 };
    if code.get(at) == Some(&0xf2) {
        at += 1; // bnd
    }
    if code.get(at..at + 2)? != [0xff, 0x25] {
        return None;
    }
    let disp = i64::from(i32::from_le_bytes(
        code.get(at + 2..at + 6)?.try_into().ok()?,
    ));
    let slot = addr.wrapping_add(at as u64 + 6).wrapping_add_signed(disp);
    let symbols = file.dynamic_symbol_table()?;
    file.dynamic_relocations()?.find_map(|(offset, reloc)| {
        let RelocationTarget::Symbol(index) = reloc.target() else {
            return None;
        };
        (offset == slot)
            .then(|| {
                symbols
                    .symbol_by_index(index)
                    .ok()?
                    .name()
                    .ok()
                    .map(str::to_owned)
            })
            .flatten()
    })
}

/// Adds `file`'s defined symbols to `by_name`; returns how many its static table had.
fn index(file: &object::File<'_>, by_name: &mut FxHashMap<String, u64>) -> usize {
    let mut statics = 0;
    for (is_static, sym) in file
        .dynamic_symbols()
        .map(|s| (false, s))
        .chain(file.symbols().map(|s| (true, s)))
    {
        if !sym.is_definition() || sym.address() == 0 {
            continue;
        }
        if let Ok(name) = sym.name() {
            statics += usize::from(is_static);
            by_name.entry(name.to_owned()).or_insert(sym.address());
        }
    }
    statics
}

/// Adds the symbols of `file`'s detached debug file, if one is installed; returns how many.
fn debug_symbols(
    file: &object::File<'_>,
    path: &Path,
    by_name: &mut FxHashMap<String, u64>,
) -> usize {
    let Some(debug) = debug_file(file, path) else {
        return 0;
    };
    let Ok(data) = std::fs::read(&debug) else {
        return 0;
    };
    let Ok(debug) = object::File::parse(&*data) else {
        return 0;
    };
    index(&debug, by_name)
}

/// Where the detached debug symbols of `file` are: under `/usr/lib/debug/.build-id/` by its
/// build id, or by its `.gnu_debuglink` next to it, in `.debug/`, or under `/usr/lib/debug`.
pub fn debug_file(file: &object::File<'_>, path: &Path) -> Option<PathBuf> {
    if let Ok(Some(id)) = file.build_id() {
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        if let Some((dir, rest)) = hex.split_at_checked(2) {
            let by_id = PathBuf::from(format!("/usr/lib/debug/.build-id/{dir}/{rest}.debug"));
            if by_id.exists() {
                return Some(by_id);
            }
        }
    }
    let (name, _crc) = file.gnu_debuglink().ok()??;
    let name = Path::new(std::str::from_utf8(name).ok()?);
    let dir = path.parent()?;
    [
        dir.join(name),
        dir.join(".debug").join(name),
        Path::new("/usr/lib/debug")
            .join(dir.strip_prefix("/").unwrap_or(dir))
            .join(name),
    ]
    .into_iter()
    .find(|p| p.exists())
}

/// Whether an ELF file asks for a program interpreter (is dynamically linked).
pub fn has_interp(data: &[u8]) -> bool {
    object::File::parse(data).is_ok_and(|file| {
        file.sections().any(|s| s.name() == Ok(".interp")) || program_headers_have_interp(data)
    })
}

fn program_headers_have_interp(data: &[u8]) -> bool {
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

/// The file offset holding the byte loaded at virtual address `addr`, if a segment maps it
/// from the file.
pub fn file_offset_of(file: &object::File<'_>, addr: u64) -> Option<u64> {
    file.segments().find_map(|seg| {
        let (file_off, file_len) = seg.file_range();
        let start = seg.address();
        (addr >= start && addr < start + file_len).then(|| addr - start + file_off)
    })
}

/// The virtual address file offset `offset` is loaded at, if a segment maps it.
pub fn address_of_offset(file: &object::File<'_>, offset: u64) -> Option<u64> {
    file.segments().find_map(|seg| {
        let (file_off, file_len) = seg.file_range();
        (offset >= file_off && offset < file_off + file_len)
            .then(|| seg.address() + offset - file_off)
    })
}

/// The minor version in glibc's banner ("... release version 2.36."), if it is glibc.
pub fn glibc_minor(data: &[u8]) -> Option<u32> {
    const BANNER: &[u8] = b"release version 2.";
    let at = data.windows(BANNER.len()).position(|w| w == BANNER)? + BANNER.len();
    let digits = data[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&data[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// What to add to the link-time addresses of the ELF file at `path` to get the run-time
/// ones, given that it is mapped at `start` from file offset `offset`.
pub fn load_bias(path: &Path, start: u64, offset: u64) -> Option<u64> {
    let data = std::fs::read(path).ok()?;
    let file = object::File::parse(&*data).ok()?;
    let linked = address_of_offset(&file, offset)?;
    Some(start.wrapping_sub(linked))
}
