//! Uncompressed copies of compressed split debug info, written once per build id.
//!
//! Debian's debug packages compress their DWARF sections with zlib. blazesym inflates every
//! section of a file onto the heap when it opens it, location lists it never reads included:
//! python3.11's 11 MB debug file became 22 MB of the collector's heap at the report's peak,
//! beside the model. An uncompressed copy is mapped instead, and only the pages that are read
//! become resident (measured on the python bench workload: collector peak 117 → 89 MB).
//!
//! The copy lives in `/var/cache/alloctrace/debug` (`ALLOCTRACE_CACHE_DIR` moves it; empty
//! turns it off), named by build id, written aside and renamed into place, and the directory
//! is kept under [`LIMIT_BYTES`] by dropping the copies used least recently. Whatever goes
//! wrong (no debug file, zstd, a read-only disk) leaves symbolization as it was.

use std::{
    fs::File,
    io::{BufWriter, Read as _, Seek as _, SeekFrom, Write as _},
    os::unix::fs::{FileExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

use object::{
    LittleEndian as LE,
    elf::{
        CompressionHeader64, ELFCOMPRESS_ZLIB, FileHeader64, PT_LOAD, ProgramHeader64,
        SHF_COMPRESSED, SHT_NOBITS, SectionHeader64,
    },
    pod,
};

/// Where distributions install debug files by build id.
const DEBUG_DIRS: [&str; 2] = ["/usr/lib/debug", "/lib/debug"];
/// The most the cache directory holds.
pub const LIMIT_BYTES: u64 = 2 << 30;
/// A section bigger than this is not inflated (a corrupt size field).
const MAX_SECTION_BYTES: u64 = 1 << 31;

/// The cache directory, when there is one to use.
#[derive(Debug, Default)]
pub struct DebugCache {
    dir: Option<PathBuf>,
}

impl DebugCache {
    /// The directory `ALLOCTRACE_CACHE_DIR` names, or the default one.
    pub fn from_env() -> Self {
        let dir = match std::env::var_os("ALLOCTRACE_CACHE_DIR") {
            Some(d) if d.is_empty() => None,
            Some(d) => Some(PathBuf::from(d)),
            None => Some(PathBuf::from("/var/cache/alloctrace/debug")),
        };
        Self { dir }
    }

    /// The uncompressed copy of `module`'s split debug info, when that debug file has
    /// compressed sections (made now if it is not there yet). `hex`: the module's build id.
    pub fn uncompressed_for(&self, hex: &str) -> Option<PathBuf> {
        let dir = self.dir.as_deref()?;
        if hex.len() < 3 {
            return None;
        }
        let source = DEBUG_DIRS
            .iter()
            .map(|d| Path::new(d).join(format!(".build-id/{}/{}.debug", &hex[..2], &hex[2..])))
            .find(|p| p.is_file())?;
        if !safe_dir(dir) {
            return None;
        }
        let copy = dir.join(format!("{hex}.debug"));
        if copy.is_file() {
            // Used now: the last to go when the directory is trimmed.
            let _ = File::options()
                .append(true)
                .open(&copy)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
            return Some(copy);
        }
        let aside = dir.join(format!(".{hex}.{}", std::process::id()));
        let written = File::create(&aside).and_then(|out| inflate(&source, out));
        match written {
            Ok(true) if std::fs::rename(&aside, &copy).is_ok() => {
                trim(dir, LIMIT_BYTES);
                Some(copy)
            }
            _ => {
                let _ = std::fs::remove_file(&aside);
                None
            }
        }
    }
}

/// Whether `dir` exists (made if need be) as a directory of this user's that nobody else can
/// write: a file planted there would be read as a program's debug info. A directory that
/// exists already is used as it is, never changed (`ALLOCTRACE_CACHE_DIR=/tmp`
/// is refused, not made private).
fn safe_dir(dir: &Path) -> bool {
    use std::os::unix::fs::DirBuilderExt as _;
    let made = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir);
    if made.is_err() {
        return false;
    }
    // SAFETY: geteuid takes no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    std::fs::symlink_metadata(dir)
        .is_ok_and(|m| m.is_dir() && m.uid() == euid && m.mode() & 0o022 == 0)
}

/// Keeps the `.debug` files of `dir` under `limit` bytes, dropping those used least recently.
fn trim(dir: &Path, limit: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "debug"))
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((m.modified().ok()?, m.len(), e.path()))
        })
        .collect();
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    files.sort();
    for (_, len, path) in files {
        if total <= limit {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            total -= len;
        }
    }
}

/// The headers of a 64-bit little-endian ELF file, read without reading the file.
struct Headers {
    file: FileHeader64<LE>,
    programs: Vec<ProgramHeader64<LE>>,
    sections: Vec<SectionHeader64<LE>>,
}

impl Headers {
    fn read(f: &File) -> std::io::Result<Self> {
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not a 64-bit LE ELF");
        let mut head = [0u8; size_of::<FileHeader64<LE>>()];
        f.read_exact_at(&mut head, 0)?;
        let (file, _) = pod::from_bytes::<FileHeader64<LE>>(&head).map_err(|_| bad())?;
        let file = *file;
        let ident = &file.e_ident;
        if ident.magic != object::elf::ELFMAG
            || ident.class != object::elf::ELFCLASS64
            || ident.data != object::elf::ELFDATA2LSB
        {
            return Err(bad());
        }
        let programs = table::<ProgramHeader64<LE>>(
            f,
            file.e_phoff.get(LE),
            file.e_phnum.get(LE),
            file.e_phentsize.get(LE),
        )?;
        let sections = table::<SectionHeader64<LE>>(
            f,
            file.e_shoff.get(LE),
            file.e_shnum.get(LE),
            file.e_shentsize.get(LE),
        )?;
        Ok(Self {
            file,
            programs,
            sections,
        })
    }

    /// The name of section `i`, from the section name table.
    fn name(&self, f: &File, i: usize) -> Option<Vec<u8>> {
        let names = self
            .sections
            .get(usize::from(self.file.e_shstrndx.get(LE).0))?;
        let at = u64::from(self.sections.get(i)?.sh_name.get(LE));
        let mut name = vec![0u8; 64];
        let n = f
            .read_at(&mut name, names.sh_offset.get(LE).checked_add(at)?)
            .ok()?;
        name.truncate(n);
        name.truncate(name.iter().position(|&b| b == 0)?);
        Some(name)
    }
}

/// `count` entries of `T` at `offset`, each `size` bytes as the header says.
fn table<T: pod::Pod>(f: &File, offset: u64, count: u16, size: u16) -> std::io::Result<Vec<T>> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad ELF header table");
    if count == 0 {
        return Ok(Vec::new());
    }
    if usize::from(size) != size_of::<T>() {
        return Err(bad());
    }
    let mut bytes = vec![0u8; usize::from(count) * size_of::<T>()];
    f.read_exact_at(&mut bytes, offset)?;
    let (entries, _) = pod::slice_from_bytes::<T>(&bytes, usize::from(count)).map_err(|_| bad())?;
    Ok(entries.to_vec())
}

/// Writes `source` to `out` with its compressed sections inflated, streaming (a section is
/// never held whole). False when there is nothing to gain or it cannot be done: no
/// compressed section, a compression other than zlib, or a `.gnu_debugaltlink` (its path is
/// relative to where the debug file lives).
fn inflate(source: &Path, out: File) -> std::io::Result<bool> {
    let src = File::open(source)?;
    let mut h = Headers::read(&src)?;
    let compressed = h
        .sections
        .iter()
        .any(|s| s.sh_flags.get(LE).0 & SHF_COMPRESSED.0 != 0);
    let altlink =
        (0..h.sections.len()).any(|i| h.name(&src, i).as_deref() == Some(b".gnu_debugaltlink"));
    if !compressed || altlink {
        return Ok(false);
    }
    let mut out = BufWriter::new(out);
    // The file header and program headers as they are (the section table's offset is
    // written at the end); sections follow, then the section table.
    let phoff = h.file.e_phoff.get(LE);
    let prefix = (size_of::<FileHeader64<LE>>() as u64)
        .max(phoff + u64::from(h.file.e_phnum.get(LE)) * size_of::<ProgramHeader64<LE>>() as u64);
    let mut pos = std::io::copy(&mut (&src).take(prefix), &mut out)?;
    if pos != prefix {
        return Ok(false);
    }
    for s in h.sections.iter_mut().skip(1) {
        let size = s.sh_size.get(LE);
        if s.sh_type.get(LE) == SHT_NOBITS || size == 0 {
            s.sh_offset.set(LE, pos);
            continue;
        }
        let Some(n) = copy_section(&src, s, &mut out, &mut pos)? else {
            return Ok(false);
        };
        pos += n;
    }
    pos = pad(&mut out, pos, 8)?;
    h.file.e_shoff.set(LE, pos);
    out.write_all(pod::bytes_of_slice(&h.sections))?;
    let out = out.into_inner().map_err(|e| e.into_error())?;
    out.write_all_at(pod::bytes_of(&h.file), 0)?;
    out.sync_all()?;
    Ok(true)
}

/// Writes section `s` at the next offset its alignment allows, inflated when compressed,
/// and updates its header; returns the bytes written, or None if it cannot be inflated.
fn copy_section(
    src: &File,
    s: &mut SectionHeader64<LE>,
    out: &mut BufWriter<File>,
    pos: &mut u64,
) -> std::io::Result<Option<u64>> {
    let (offset, size) = (s.sh_offset.get(LE), s.sh_size.get(LE));
    let mut reader = src;
    let flags = s.sh_flags.get(LE);
    if flags.0 & SHF_COMPRESSED.0 == 0 {
        *pos = pad(out, *pos, s.sh_addralign.get(LE))?;
        s.sh_offset.set(LE, *pos);
        reader.seek(SeekFrom::Start(offset))?;
        let n = std::io::copy(&mut reader.take(size), out)?;
        return Ok((n == size).then_some(n));
    }
    let mut head = [0u8; size_of::<CompressionHeader64<LE>>()];
    src.read_exact_at(&mut head, offset)?;
    let Ok((ch, _)) = pod::from_bytes::<CompressionHeader64<LE>>(&head) else {
        return Ok(None);
    };
    let inflated = ch.ch_size.get(LE);
    if ch.ch_type.get(LE) != ELFCOMPRESS_ZLIB || inflated > MAX_SECTION_BYTES {
        return Ok(None);
    }
    let align = ch.ch_addralign.get(LE);
    *pos = pad(out, *pos, align)?;
    s.sh_offset.set(LE, *pos);
    s.sh_size.set(LE, inflated);
    s.sh_addralign.set(LE, align);
    s.sh_flags
        .set(LE, object::elf::SectionFlags(flags.0 & !SHF_COMPRESSED.0));
    reader.seek(SeekFrom::Start(offset + head.len() as u64))?;
    let body = reader.take(size.saturating_sub(head.len() as u64));
    let mut zlib = flate2::read::ZlibDecoder::new(body).take(inflated);
    let n = std::io::copy(&mut zlib, out)?;
    Ok((n == inflated).then_some(n))
}

/// Zero bytes up to the next multiple of `align` after `pos`; the new position.
fn pad(out: &mut BufWriter<File>, pos: u64, align: u64) -> std::io::Result<u64> {
    let align = align.max(1);
    let to = pos.div_ceil(align).saturating_mul(align);
    std::io::copy(&mut std::io::repeat(0).take(to - pos), out)?;
    Ok(to)
}

/// The link-time addresses of `offsets` (file offsets in `module`), through its loadable
/// segments: what a debug file, whose segments hold no bytes, is searched by. None if one
/// falls in no segment.
pub fn link_addresses(module: &Path, offsets: &[u64]) -> Option<Vec<u64>> {
    let f = File::open(module).ok()?;
    let h = Headers::read(&f).ok()?;
    let loads: Vec<(u64, u64, u64)> = h
        .programs
        .iter()
        .filter(|p| p.p_type.get(LE) == PT_LOAD)
        .map(|p| (p.p_offset.get(LE), p.p_filesz.get(LE), p.p_vaddr.get(LE)))
        .collect();
    offsets
        .iter()
        .map(|&off| {
            loads
                .iter()
                .find(|&&(start, len, _)| off >= start && off - start < len)
                .map(|&(start, _, vaddr)| off - start + vaddr)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A C program with compressed debug info, inflated: every section's bytes equal what
    /// `objcopy --decompress-debug-sections` gives, and the result is an ELF file readers take.
    #[test]
    fn inflated_sections_equal_objcopys() {
        let dir = std::env::temp_dir().join(format!("alloctrace-inflate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let src = dir.join("p.c");
        std::fs::write(
            &src,
            "int f(int x) { return x * 3; }\nint main(void) { return f(2); }\n",
        )
        .expect("source");
        let compressed = dir.join("p");
        let built = std::process::Command::new("cc")
            .args(["-g", "-O1", "-gz=zlib", "-o"])
            .arg(&compressed)
            .arg(&src)
            .status()
            .expect("run cc");
        assert!(built.success());
        let ours = dir.join("ours");
        assert!(inflate(&compressed, File::create(&ours).expect("out")).expect("inflate"));
        let theirs = dir.join("theirs");
        let done = std::process::Command::new("objcopy")
            .arg("--decompress-debug-sections")
            .arg(&compressed)
            .arg(&theirs)
            .status()
            .expect("run objcopy");
        assert!(done.success());
        let sections = |path: &Path| {
            use object::{Object as _, ObjectSection as _};
            let data = std::fs::read(path).expect("read");
            let file = object::File::parse(&*data).expect("parse");
            file.sections()
                .map(|s| {
                    let name = s.name().expect("name").to_owned();
                    (name, s.uncompressed_data().expect("data").into_owned())
                })
                .collect::<Vec<_>>()
        };
        let (a, b) = (sections(&ours), sections(&theirs));
        assert!(a.iter().any(|(n, d)| n == ".debug_info" && !d.is_empty()));
        assert_eq!(a, b);
        // Nothing compressed left: readers map it as it is.
        let f = File::open(&ours).expect("open");
        let h = Headers::read(&f).expect("headers");
        assert!(
            h.sections
                .iter()
                .all(|s| s.sh_flags.get(LE).0 & SHF_COMPRESSED.0 == 0)
        );
        // A file with nothing compressed is left alone.
        assert!(!inflate(&ours, File::create(dir.join("again")).expect("out")).expect("read"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_directory_others_can_write_is_refused_and_left_alone() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("alloctrace-open-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        assert!(!safe_dir(&dir));
        let mode = std::fs::metadata(&dir).expect("stat").mode() & 0o777;
        assert_eq!(mode, 0o777, "left as it was");
        // One made here is private.
        let made = dir.join("cache/debug");
        assert!(safe_dir(&made));
        assert_eq!(
            std::fs::metadata(&made).expect("stat").mode() & 0o777,
            0o700
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_directory_is_trimmed_oldest_first() {
        let dir = std::env::temp_dir().join(format!("alloctrace-trim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let now = std::time::SystemTime::now();
        for (i, name) in ["old", "mid", "new"].iter().enumerate() {
            let path = dir.join(format!("{name}.debug"));
            std::fs::write(&path, vec![0u8; 100]).expect("write");
            let f = File::options().append(true).open(&path).expect("open");
            f.set_modified(now - std::time::Duration::from_secs(100 * (3 - i as u64)))
                .expect("mtime");
        }
        trim(&dir, 250);
        let left: Vec<bool> = ["old", "mid", "new"]
            .iter()
            .map(|n| dir.join(format!("{n}.debug")).exists())
            .collect();
        assert_eq!(left, [false, true, true]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
