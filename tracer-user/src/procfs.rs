//! What `/proc` tells about a process: its name, executable, file mappings and memory use.
//!
//! Mapping snapshots are what let stacks of processes that have exited still be symbolized:
//! every address is later resolved against the newest snapshot that covers it.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
};

/// A file by device (as `stat` reports it) and inode: the same in every process and mount
/// namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileKey {
    pub dev: u64,
    pub ino: u64,
}

impl FileKey {
    /// The key of a file the kernel reported by its own encoding of the device
    /// (`major << 20 | minor`, what `inode->i_sb->s_dev` holds) and its inode.
    pub fn from_kernel(kernel_dev: u32, ino: u64) -> Self {
        let (major, minor) = (kernel_dev >> 20, kernel_dev & 0xf_ffff);
        Self {
            dev: libc::makedev(major, minor),
            ino,
        }
    }

    /// The device as the kernel encodes it, to match what eBPF programs read.
    pub fn kernel_dev(&self) -> u64 {
        (u64::from(libc::major(self.dev)) << 20) | u64::from(libc::minor(self.dev))
    }
}

/// One file-backed executable mapping from `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    /// The path as the process sees it (in its own mount namespace).
    pub path: Arc<Path>,
    /// Where this collector can open the same file, even after the process exits or the file
    /// is deleted (see [`FilePins`]); `path` until pinned.
    pub file: Arc<Path>,
}

impl Mapping {
    /// The file offset of `addr`, which must lie inside the mapping.
    pub fn file_offset(&self, addr: u64) -> u64 {
        addr - self.start + self.offset
    }
}

/// Executable file mappings of a process at one moment, sorted by start address.
#[derive(Clone, Debug, Default)]
pub struct MapsSnapshot {
    mappings: Vec<Mapping>,
}

impl MapsSnapshot {
    /// Parses the text of `/proc/PID/maps`, keeping only executable, file-backed mappings.
    pub fn parse(text: &str) -> Self {
        let mut mappings: Vec<Mapping> = text.lines().filter_map(parse_maps_line).collect();
        mappings.sort_by_key(|m| m.start);
        Self { mappings }
    }

    pub fn read(pid: u32) -> io::Result<Self> {
        fs::read_to_string(format!("/proc/{pid}/maps")).map(|t| Self::parse(&t))
    }

    pub fn find(&self, addr: u64) -> Option<&Mapping> {
        let idx = self.mappings.partition_point(|m| m.start <= addr);
        let m = self.mappings.get(idx.checked_sub(1)?)?;
        (addr < m.end).then_some(m)
    }

    pub fn is_empty(&self) -> bool {
        self.mappings.is_empty()
    }

    pub fn mappings(&self) -> &[Mapping] {
        &self.mappings
    }

    /// Adds `mapping`, replacing what it overlaps (as a `MAP_FIXED` mapping does).
    pub fn insert(&mut self, mapping: Mapping) {
        self.mappings
            .retain(|m| m.end <= mapping.start || m.start >= mapping.end);
        let at = self.mappings.partition_point(|m| m.start < mapping.start);
        self.mappings.insert(at, mapping);
    }

    /// Points every mapping at a file this collector holds open (see [`FilePins`]).
    pub fn pin_files(&mut self, pid: u32, pins: &mut FilePins) {
        for m in &mut self.mappings {
            if let Some(file) = pins.pin(pid, m) {
                m.file = file;
            }
        }
    }
}

/// Open handles on every mapped module, keyed by (device, inode), so a module stays readable
/// for symbolization after its process exits, when it was deleted or replaced on disk, or
/// when it lives in another mount namespace (a container): each is opened through
/// `/proc/PID/map_files` while the process lives. The module's own path is kept for opening
/// when it still names the same file here (so split debug info next to it is found),
/// `/proc/self/fd/N` otherwise.
#[derive(Debug, Default)]
pub struct FilePins {
    by_inode: std::collections::HashMap<FileKey, Pinned>,
}

/// A file held open: the path to open it by, the path a process knew it by, the handle.
#[derive(Debug)]
struct Pinned {
    open: Arc<Path>,
    known_as: Arc<Path>,
    _file: fs::File,
}

impl FilePins {
    fn pin(&mut self, pid: u32, m: &Mapping) -> Option<Arc<Path>> {
        let via = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
        self.pin_as(Path::new(&via), &m.path).map(|(open, _)| open)
    }

    /// Opens `via` (which names the file known as `known_as`) and keeps it, unless a file of
    /// the same identity is kept already; returns (path to open, path known by).
    fn pin_as(&mut self, via: &Path, known_as: &Arc<Path>) -> Option<(Arc<Path>, Arc<Path>)> {
        use std::os::{fd::AsRawFd as _, unix::fs::MetadataExt as _};
        let meta = fs::metadata(via).ok()?;
        let key = FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
        };
        if let Some(p) = self.by_inode.get(&key) {
            return Some((p.open.clone(), p.known_as.clone()));
        }
        let file = fs::File::open(via).ok()?;
        let same_here =
            fs::metadata(known_as).is_ok_and(|here| (here.dev(), here.ino()) == (key.dev, key.ino));
        let open: Arc<Path> = if same_here {
            known_as.clone()
        } else {
            Arc::from(Path::new(&format!("/proc/self/fd/{}", file.as_raw_fd())))
        };
        self.by_inode.insert(
            key,
            Pinned {
                open: open.clone(),
                known_as: known_as.clone(),
                _file: file,
            },
        );
        Some((open, known_as.clone()))
    }

    /// The file process `pid` maps at `[start, end)`, kept open from now on (if the process is
    /// still there).
    pub fn by_range(&mut self, pid: u32, start: u64, end: u64) -> Option<(Arc<Path>, Arc<Path>)> {
        let via = format!("/proc/{pid}/map_files/{start:x}-{end:x}");
        let known: Arc<Path> = Arc::from(fs::read_link(&via).ok()?.as_path());
        self.pin_as(Path::new(&via), &known)
    }

    /// A file kept open, by identity: (path to open, path known by).
    pub fn by_key(&self, key: FileKey) -> Option<(Arc<Path>, Arc<Path>)> {
        self.by_inode
            .get(&key)
            .map(|p| (p.known_as.clone(), p.open.clone()))
    }

    /// The file process `pid` names `name` (an exec's program, a program's interpreter),
    /// looked up as the process would, inside its own root, and kept open from now on:
    /// (path known by, path to open). A symbolic link in a container that points at an
    /// absolute path stays inside the container, never reaching this host's file of that name.
    pub fn as_process(&mut self, pid: u32, name: &Path) -> Option<(Arc<Path>, Arc<Path>)> {
        use std::os::fd::AsRawFd as _;
        let file = open_as_process(pid, name)?;
        let via = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        // As `/proc/PID/maps` names it: the path from this collector's root.
        let known: Arc<Path> = Arc::from(fs::read_link(&via).ok()?.as_path());
        self.pin_as(&via, &known).map(|(open, known)| (known, open))
    }

    /// The file at `path` on this host, kept open from now on: (path known by, path to open).
    pub fn by_path(&mut self, path: &Path) -> Option<(Arc<Path>, Arc<Path>)> {
        // As `/proc/PID/maps` would name it: symbolic links resolved.
        let known: Arc<Path> = Arc::from(fs::canonicalize(path).ok()?.as_path());
        self.pin_as(&known.clone(), &known)
            .map(|(open, known)| (known, open))
    }
}

fn parse_maps_line(line: &str) -> Option<Mapping> {
    // 7f1c2a000000-7f1c2a022000 r-xp 00022000 fe:01 1234   /usr/lib/x86_64-linux-gnu/libc.so.6
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let perms = fields.next()?;
    let offset = fields.next()?;
    let _dev = fields.next()?;
    let inode = fields.next()?;
    let path = fields.next()?.trim_start();
    if perms.as_bytes().get(2) != Some(&b'x') || inode == "0" || !path.starts_with('/') {
        return None;
    }
    let (start, end) = range.split_once('-')?;
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    let path: Arc<Path> = Arc::from(Path::new(path));
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        offset: u64::from_str_radix(offset, 16).ok()?,
        file: path.clone(),
        path,
    })
}

/// The short command name (`/proc/PID/comm`).
pub fn comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_owned())
}

/// Every process's pid, from `/proc`.
pub fn pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Field `n` of `/proc/PID/stat` counted from the state (0), the fields after the command
/// name (which is in parentheses and may hold anything: read after the last ')').
fn stat_field(pid: u32, n: usize) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(n)?.parse().ok()
}

/// The parent's pid.
pub fn ppid(pid: u32) -> Option<u32> {
    stat_field(pid, 1).map(|p| p as u32)
}

/// When the process started, in clock ticks after boot.
pub fn start_ticks(pid: u32) -> Option<u64> {
    stat_field(pid, 19)
}

/// Opens `name` as process `pid` resolves it (an absolute name from its root, a relative one
/// from its working directory) with `openat2(RESOLVE_IN_ROOT)`: no component, symbolic links
/// included, can lead out of that directory.
fn open_as_process(pid: u32, name: &Path) -> Option<fs::File> {
    use std::os::{
        fd::{AsRawFd as _, FromRawFd as _},
        unix::ffi::OsStrExt as _,
    };
    let base = if name.is_absolute() { "root" } else { "cwd" };
    let dir = fs::File::open(format!("/proc/{pid}/{base}")).ok()?;
    let relative = name.strip_prefix("/").unwrap_or(name);
    let c_name = std::ffi::CString::new(relative.as_os_str().as_bytes()).ok()?;
    // SAFETY: `open_how` is three integers; all zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: a plain system call on a directory fd we own, a NUL-terminated name and an
    // `open_how` of the size passed; a non-negative result is a new fd we then own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c_name.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    // SAFETY: as above: the fd is new and ours alone.
    (fd >= 0).then(|| unsafe { fs::File::from_raw_fd(fd as i32) })
}

/// Whether `pid` has ended (gone, or a zombie waiting to be reaped).
pub fn is_gone(pid: u32) -> bool {
    !same_process(pid, None)
}

/// Whether `pid` is still the process that started at `start_ticks` (when known), and not a
/// zombie.
pub fn same_process(pid: u32, start_ticks: Option<u64>) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(rest) = stat.rfind(')').map(|at| &stat[at + 1..]) else {
        return false;
    };
    let mut fields = rest.split_whitespace();
    if fields.next() == Some("Z") {
        return false;
    }
    start_ticks.is_none_or(|t| fields.nth(18).and_then(|f| f.parse().ok()) == Some(t))
}

/// The process's cgroup v2 path (`0::PATH` in `/proc/PID/cgroup`).
pub fn cgroup(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// The executable's path (`/proc/PID/exe`).
pub fn exe(pid: u32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// Whether `pid` names a live process (a zombie counts as gone).
pub fn is_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// Why a pid cannot be traced.
#[derive(Debug, PartialEq, Eq)]
pub enum Untraceable {
    /// No such process.
    Gone,
    /// It has exited and waits for its parent to reap it.
    Zombie,
    /// A kernel thread: no user-space code, no allocator.
    KernelThread,
    /// alloctrace itself.
    Myself,
}

impl Untraceable {
    pub fn into_error(self, pid: u32) -> crate::error::Error {
        use crate::error::Error;
        let reason = match self {
            Untraceable::Gone => return Error::NoSuchProcess { pid },
            Untraceable::Zombie => {
                "it is a zombie: it has exited and waits for its parent to reap it (ps shows it as Z); there is nothing left to trace"
            }
            Untraceable::KernelThread => {
                "it is a kernel thread: it runs no user-space code and has no allocator to trace"
            }
            Untraceable::Myself => "it is alloctrace itself",
        };
        Error::NotTraceable {
            pid,
            reason: reason.to_owned(),
        }
    }
}

/// Whether `pid` names a process alloctrace can trace, and why not.
pub fn traceable(pid: u32) -> Result<(), Untraceable> {
    if pid == std::process::id() {
        return Err(Untraceable::Myself);
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|_| Untraceable::Gone)?;
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Err(Untraceable::Gone);
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    match fields.first() {
        Some(&"Z") => return Err(Untraceable::Zombie),
        Some(&"X") | None => return Err(Untraceable::Gone),
        _ => {}
    }
    // Field 9 of stat (flags, 7th after the state) carries PF_KTHREAD.
    const PF_KTHREAD: u64 = 0x0020_0000;
    let flags: u64 = fields.get(6).and_then(|f| f.parse().ok()).unwrap_or(0);
    if flags & PF_KTHREAD != 0 {
        return Err(Untraceable::KernelThread);
    }
    Ok(())
}

/// A pidfd for `pid`: readable once the process has exited. `None` if it is already gone.
pub fn pidfd(pid: u32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: plain syscall; the returned fd is owned by nobody else.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd from the kernel.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// The highest CPU number the kernel may ever use (`/sys/devices/system/cpu/possible`, e.g.
/// `0-7`), as the eBPF side's `bpf_get_smp_processor_id` can return any of them.
pub fn max_possible_cpu() -> Option<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible").ok()?;
    text.trim()
        .rsplit([',', '-'])
        .next()
        .and_then(|last| last.parse().ok())
}

/// `CLOCK_MONOTONIC` now, in ns: the clock of every event timestamp.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One VMA from `/proc/PID/smaps`: its range, what backs it, and its resident anon bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// Anonymous memory: not file-backed (`[heap]` and private anonymous mappings).
    pub anonymous_mapping: bool,
    /// `[heap]`, `[stack]`, `[vdso]`…, or empty.
    pub special: String,
    /// Resident anonymous bytes (`Anonymous:`).
    pub anon_resident: u64,
}

/// Parses the text of `/proc/PID/smaps`.
pub fn parse_smaps(text: &str) -> Vec<Vma> {
    let mut vmas: Vec<Vma> = Vec::new();
    for line in text.lines() {
        if let Some(kib) = line.strip_prefix("Anonymous:") {
            if let (Some(vma), Some(kib)) = (
                vmas.last_mut(),
                kib.trim()
                    .strip_suffix("kB")
                    .and_then(|k| k.trim().parse::<u64>().ok()),
            ) {
                vma.anon_resident = kib * 1024;
            }
            continue;
        }
        let mut fields = line.split_ascii_whitespace();
        let Some((start, end)) = fields.next().and_then(|r| r.split_once('-')) else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue; // a "Key: value" line
        };
        let _perms = fields.next();
        let _offset = fields.next();
        let _dev = fields.next();
        let inode = fields.next().unwrap_or("0");
        let path = fields.next().unwrap_or("");
        vmas.push(Vma {
            start,
            end,
            anonymous_mapping: inode == "0" && !path.starts_with('/'),
            special: if path.starts_with('[') {
                path.to_owned()
            } else {
                String::new()
            },
            anon_resident: 0,
        });
    }
    vmas
}

/// Resident bytes of `[start, end)` in `pid`, from `/proc/PID/pagemap` (one u64 per page,
/// bit 63 = present). Used only for the few VMAs whose pages belong to different owners.
pub fn resident_bytes(pid: u32, start: u64, end: u64) -> Option<u64> {
    use std::os::unix::fs::FileExt as _;
    const PAGE: u64 = 4096;
    let file = fs::File::open(format!("/proc/{pid}/pagemap")).ok()?;
    let (first, last) = (start / PAGE, end.div_ceil(PAGE));
    let mut present = 0u64;
    let mut buf = vec![0u8; 8 * 4096];
    let mut page = first;
    while page < last {
        let n = ((last - page) as usize).min(buf.len() / 8);
        let bytes = &mut buf[..n * 8];
        file.read_exact_at(bytes, page * 8).ok()?;
        let (words, _) = bytes.as_chunks::<8>();
        present += words
            .iter()
            .filter(|w| u64::from_ne_bytes(**w) & (1 << 63) != 0)
            .count() as u64;
        page += n as u64;
    }
    Some(present * PAGE)
}

pub fn smaps(pid: u32) -> Option<Vec<Vma>> {
    fs::read_to_string(format!("/proc/{pid}/smaps"))
        .ok()
        .map(|t| parse_smaps(&t))
}

/// This process's CPU time (seconds) and peak RSS (bytes) so far.
pub fn self_usage() -> (f64, u64) {
    // SAFETY: getrusage fills a plain struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (
        secs(usage.ru_utime) + secs(usage.ru_stime),
        usage.ru_maxrss as u64 * 1024,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 fe:01 100 /opt/app/server
55d0c0a01000-55d0c0a02000 r-xp 00001000 fe:01 100 /opt/app/server
55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000022000 r--p 00000000 fe:01 200 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000022000-7f0000197000 r-xp 00022000 fe:01 200 /usr/lib/x86_64-linux-gnu/libc.so.6
7f00001a0000-7f00001a1000 r-xp 00000000 fe:01 300 /tmp/gone (deleted)
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0 [vdso]
";

    #[test]
    fn keeps_executable_file_mappings_only() {
        let snap = MapsSnapshot::parse(MAPS);
        let paths: Vec<_> = snap
            .mappings()
            .iter()
            .map(|m| m.path.to_path_buf())
            .collect();
        assert_eq!(
            paths,
            [
                PathBuf::from("/opt/app/server"),
                PathBuf::from("/usr/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/tmp/gone"),
            ]
        );
    }

    #[test]
    fn finds_file_offsets() {
        let snap = MapsSnapshot::parse(MAPS);
        let m = snap.find(0x55d0c0a01139).expect("in the executable");
        assert_eq!(m.file_offset(0x55d0c0a01139), 0x1139);
        let libc = snap.find(0x7f0000022010).expect("in libc");
        assert_eq!(libc.file_offset(0x7f0000022010), 0x22010);
        assert!(
            snap.find(0x55d0c1000010).is_none(),
            "heap is not a file mapping"
        );
        assert!(snap.find(0x7f0000197000).is_none(), "end is exclusive");
    }

    #[test]
    fn parses_smaps_anonymous_bytes() {
        let text = "\
55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                  12 kB
Anonymous:            12 kB
7f0000000000-7f0004000000 rw-p 00000000 00:00 0 
Size:              65536 kB
Anonymous:          2048 kB
7f0010000000-7f0010001000 r-xp 00000000 fe:01 200                        /usr/lib/libc.so.6
Anonymous:             0 kB
";
        let vmas = parse_smaps(text);
        assert_eq!(vmas.len(), 3);
        assert_eq!(
            (vmas[0].special.as_str(), vmas[0].anon_resident),
            ("[heap]", 12 * 1024)
        );
        assert!(vmas[1].anonymous_mapping && vmas[1].special.is_empty());
        assert_eq!(vmas[1].anon_resident, 2048 * 1024);
        assert!(!vmas[2].anonymous_mapping);
    }
}
