//! Reads the allocator's exported symbols: file offsets (what uprobes attach to) and the
//! first bytes of each function (to choose an emulated probe offset).

use std::path::Path;

use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};

use crate::error::{Error, Result};

/// An exported function in a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FunctionInFile {
    /// File offset of the function's first instruction.
    pub offset: u64,
    /// Up to 16 leading bytes of its code.
    pub code: [u8; 16],
    pub code_len: usize,
}

impl FunctionInFile {
    pub fn code(&self) -> &[u8] {
        &self.code[..self.code_len]
    }
}

/// The exported functions of an ELF file, looked up by name.
pub struct ElfFunctions {
    data: Vec<u8>,
}

impl ElfFunctions {
    pub fn read(path: &Path) -> Result<Self> {
        let data = std::fs::read(path).map_err(|source| Error::ReadElf {
            path: path.to_owned(),
            source,
        })?;
        object::File::parse(&*data).map_err(|e| Error::ParseElf {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Self { data })
    }

    /// The whole file.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The function `name` from the dynamic symbol table, if defined there.
    pub fn find(&self, name: &str) -> Option<FunctionInFile> {
        let file = object::File::parse(&*self.data).ok()?;
        let sym = file
            .dynamic_symbols()
            .chain(file.symbols())
            .find(|s| s.is_definition() && s.name() == Ok(name))?;
        let offset = file_offset_of(&file, sym.address())?;
        let mut code = [0u8; 16];
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
