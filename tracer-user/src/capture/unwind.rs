//! Copied user stacks → return addresses, unwound with each module's own CFI (`.eh_frame`,
//! `.debug_frame`) through framehop.
//!
//! The kernel sends the caller's registers and the top of its stack; everything else happens
//! here, once per event, against per-process module lists built from the same pinned mapping
//! snapshots the symbolizer uses, so a module deleted or in another mount namespace still
//! unwinds. Section bytes are read once per file and shared between processes.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use framehop::{
    ExplicitModuleSectionInfo, Module, Unwinder as _,
    x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64},
};
use object::{Object as _, ObjectSection as _};
use rustc_hash::FxHashMap;
use tracer_common::{
    StackRegs,
    unwind::{UnwindRow, cfa},
};

use crate::{procfs::MapsSnapshot, unwind_tables::compile};

type Bytes = Arc<[u8]>;

/// How often at most a process's mappings are reread because a stack started in code no
/// known module covers (a `dlopen` since the last read, or JIT code that no reread will fix).
const REFRESH_AT_MOST_EVERY: Duration = Duration::from_millis(10);

/// Code a stack stopped in is remembered by 1 MiB region: the first stop in a region rereads
/// the mappings at once (a library just loaded, a program just started), later ones only as
/// often as [`REFRESH_AT_MOST_EVERY`] allows (JIT code, which no reread will cover).
const MISSING_REGION_SHIFT: u32 = 20;

/// The unwind-relevant parts of one ELF file, shared by every process mapping it.
struct ModuleData {
    path: Arc<Path>,
    /// Its compiled unwind table, built the first time a stack ends in it: what says whether
    /// that frame is the outermost one.
    table: std::sync::OnceLock<Vec<UnwindRow>>,
    /// (svma, file offset, file size) of each executable loadable segment.
    segments: Vec<(u64, u64, u64)>,
    text: Option<(std::ops::Range<u64>, Bytes)>,
    eh_frame: Option<(std::ops::Range<u64>, Bytes)>,
    eh_frame_hdr: Option<(std::ops::Range<u64>, Bytes)>,
    debug_frame: Option<Bytes>,
    got: Option<std::ops::Range<u64>>,
}

impl ModuleData {
    fn read(path: &Path) -> Option<Self> {
        let data = std::fs::read(path).ok()?;
        let file = object::File::parse(&*data).ok()?;
        let section = |name: &str| {
            let s = file.section_by_name(name)?;
            let bytes: Bytes = s.data().ok()?.into();
            Some((s.address()..s.address() + s.size(), bytes))
        };
        let eh_frame = section(".eh_frame");
        let eh_frame_hdr = section(".eh_frame_hdr")
            .filter(|hdr| eh_frame.as_ref().is_some_and(|eh| index_fits(hdr, eh)));
        Some(Self {
            path: Arc::from(path),
            table: std::sync::OnceLock::new(),
            segments: compile::exec_segments(&file),
            text: section(".text"),
            eh_frame,
            eh_frame_hdr,
            debug_frame: section(".debug_frame").map(|(_, b)| b),
            got: file
                .section_by_name(".got")
                .map(|s| s.address()..s.address() + s.size()),
        })
    }

    /// Whether the code at `svma` (a return address, minus the load bias) is an outermost
    /// frame: its CFI says there is no return address (`_start`, a thread's start).
    fn is_root(&self, svma: u64) -> bool {
        let rows = self.table.get_or_init(|| {
            std::fs::read(&*self.path)
                .ok()
                .and_then(|data| compile::compile(&data))
                .map(|c| c.rows)
                .unwrap_or_default()
        });
        u32::try_from(svma.wrapping_sub(1))
            .is_ok_and(|pc| compile::row_at(rows, pc).is_some_and(|r| r.cfa == cfa::END))
    }

    /// The address the file's virtual address 0 is loaded at, given its executable mapping
    /// (see [`compile::bias`]).
    fn base_avma(&self, start: u64, end: u64, file_offset: u64) -> Option<u64> {
        compile::bias(&self.segments, start, end, file_offset)
    }

    fn module(&self, name: &Path, range: std::ops::Range<u64>, base: u64) -> Module<Bytes> {
        let info = ExplicitModuleSectionInfo {
            base_svma: 0,
            text_svma: self.text.as_ref().map(|(r, _)| r.clone()),
            text: self.text.as_ref().map(|(_, b)| b.clone()),
            got_svma: self.got.clone(),
            eh_frame_svma: self.eh_frame.as_ref().map(|(r, _)| r.clone()),
            eh_frame: self.eh_frame.as_ref().map(|(_, b)| b.clone()),
            eh_frame_hdr_svma: self.eh_frame_hdr.as_ref().map(|(r, _)| r.clone()),
            eh_frame_hdr: self.eh_frame_hdr.as_ref().map(|(_, b)| b.clone()),
            debug_frame: self.debug_frame.clone(),
            ..ExplicitModuleSectionInfo::default()
        };
        Module::new(name.display().to_string(), range, base, info)
    }
}

/// Whether `.eh_frame_hdr`'s index can be trusted: it names `.eh_frame` where that is, and
/// every entry points inside it. gimli turns an entry into an offset by subtracting the two
/// unchecked (a panic in a debug build, a wild offset in a release one), so the index of a
/// corrupt or hostile file is dropped, once per file, and framehop indexes `.eh_frame` itself.
fn index_fits(
    (hdr_at, hdr): &(std::ops::Range<u64>, Bytes),
    (eh_at, _): &(std::ops::Range<u64>, Bytes),
) -> bool {
    use gimli::{BaseAddresses, EhFrameHdr, LittleEndian, Pointer};
    let bases = BaseAddresses::default()
        .set_eh_frame_hdr(hdr_at.start)
        .set_eh_frame(eh_at.start);
    let Ok(parsed) = EhFrameHdr::new(hdr, LittleEndian).parse(&bases, 8) else {
        return false;
    };
    if parsed.eh_frame_ptr() != Pointer::Direct(eh_at.start) {
        return false;
    }
    let Some(table) = parsed.table() else {
        return true; // no index: framehop makes its own
    };
    let mut entries = table.iter(&bases);
    loop {
        match entries.next() {
            Ok(Some((_, Pointer::Direct(fde)))) if eh_at.contains(&fde) => {}
            Ok(None) => return true,
            _ => return false,
        }
    }
}

struct ProcessUnwinder {
    unwinder: UnwinderX86_64<Bytes>,
    /// Regions of code stacks stopped in that no module covered (see
    /// [`MISSING_REGION_SHIFT`]); kept across rebuilds.
    missing: rustc_hash::FxHashSet<u64>,
    /// Executable ranges the unwinder knows, sorted, with their modules and load biases.
    ranges: Vec<(u64, u64, u64, Arc<ModuleData>)>,
    read_at: Instant,
}

impl ProcessUnwinder {
    /// Mappings are reread at most this often for code they do not cover (JIT code, which no
    /// reread will cover, would otherwise cost a read of `/proc` per event).
    fn may_refresh(&self) -> bool {
        self.read_at.elapsed() >= REFRESH_AT_MOST_EVERY
    }

    fn covers(&self, addr: u64) -> bool {
        self.module(addr).is_some()
    }

    fn module(&self, addr: u64) -> Option<&(u64, u64, u64, Arc<ModuleData>)> {
        let i = self.ranges.partition_point(|r| r.0 <= addr);
        let range = self.ranges.get(i.checked_sub(1)?)?;
        (addr < range.1).then_some(range)
    }

    /// Whether the return address `ip` is in an outermost frame.
    fn is_root(&self, ip: u64) -> bool {
        self.module(ip.saturating_sub(1))
            .is_some_and(|(_, _, base, data)| data.is_root(ip.wrapping_sub(*base)))
    }
}

/// How one walk over a copy ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Walked {
    Root,
    Truncated,
    /// It stopped in code no known module covers.
    Unknown,
}

/// Whether an unwound stack reached its root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Unwinding found no further caller inside the copied stack (`_start`, a thread's start,
    /// or code without CFI or frame pointers, which no unwinder could pass).
    Root,
    /// The copy ran out before the callers' frames, or the depth limit was hit.
    Truncated,
}

/// Per-process unwinders, built lazily from mapping snapshots.
#[derive(Default)]
pub struct Unwinders {
    processes: FxHashMap<u32, ProcessUnwinder>,
    files: FxHashMap<Arc<Path>, Option<Arc<ModuleData>>>,
    cache: CacheX86_64,
}

impl Unwinders {
    /// Unwinds one copied stack into `out` (return addresses, innermost first, at most
    /// `depth`). `maps` rereads the process's (pinned) mappings when they are needed: when the
    /// stack starts, or stops, in code no known module covers (a library loaded, or a program
    /// replaced, since the last read). A stack that still stops in such code is marked
    /// truncated, never passed off as whole.
    pub fn unwind(
        &mut self,
        tgid: u32,
        regs: StackRegs,
        stack: &[u8],
        depth: usize,
        out: &mut Vec<u64>,
        maps: &mut dyn FnMut(u32) -> Option<MapsSnapshot>,
    ) -> Ending {
        let refreshed = match self.processes.get(&tgid) {
            None => self.refresh(tgid, maps),
            Some(p) if !p.covers(regs.ip) => self.refresh_for(tgid, regs.ip, maps),
            Some(_) => false,
        };
        let mut ending = self.walk(tgid, regs, stack, depth, out);
        if ending == Walked::Unknown
            && !refreshed
            && let Some(&ip) = out.last()
            && self.refresh_for(tgid, ip, maps)
        {
            ending = self.walk(tgid, regs, stack, depth, out);
        }
        match ending {
            Walked::Root => Ending::Root,
            Walked::Truncated | Walked::Unknown => Ending::Truncated,
        }
    }

    /// Rereads `tgid`'s mappings for code at `addr` they did not cover, if allowed: at once
    /// the first time its region is met, else at most every [`REFRESH_AT_MOST_EVERY`].
    fn refresh_for(
        &mut self,
        tgid: u32,
        addr: u64,
        maps: &mut dyn FnMut(u32) -> Option<MapsSnapshot>,
    ) -> bool {
        let allowed = self
            .processes
            .get_mut(&tgid)
            .is_none_or(|p| p.missing.insert(addr >> MISSING_REGION_SHIFT) || p.may_refresh());
        allowed && self.refresh(tgid, maps)
    }

    fn refresh(&mut self, tgid: u32, maps: &mut dyn FnMut(u32) -> Option<MapsSnapshot>) -> bool {
        let snapshot = maps(tgid);
        self.rebuild(tgid, snapshot.as_ref());
        true
    }

    fn walk(
        &mut self,
        tgid: u32,
        regs: StackRegs,
        stack: &[u8],
        depth: usize,
        out: &mut Vec<u64>,
    ) -> Walked {
        out.clear();
        let Some(process) = self.processes.get(&tgid) else {
            return Walked::Truncated;
        };
        let mut read = |addr: u64| -> Result<u64, ()> {
            let at = addr.checked_sub(regs.sp).ok_or(())? as usize;
            let word = stack.get(at..at.checked_add(8).ok_or(())?).ok_or(())?;
            Ok(u64::from_le_bytes(word.try_into().map_err(|_| ())?))
        };
        let start = UnwindRegsX86_64::new(regs.ip, regs.sp, regs.bp);
        let copy_end = regs.sp.saturating_add(stack.len() as u64);
        let mut frames = process
            .unwinder
            .iter_frames(regs.ip, start, &mut self.cache, &mut read);
        loop {
            match frames.next() {
                // Code no module covers is never unwound by guesswork (a frame-pointer
                // guess there names wrong callers): the stack stops at it, cut.
                Ok(Some(frame)) if out.len() < depth => {
                    out.push(frame.address());
                    if !process.covers(frame.address().saturating_sub(1)) {
                        return Walked::Unknown;
                    }
                }
                Ok(Some(_)) => return Walked::Truncated,
                // The caller's frame lies past the copied bytes: the copy was too short.
                Err(framehop::Error::CouldNotReadStack(addr)) if addr >= copy_end => {
                    return Walked::Truncated;
                }
                // The unwinder found no caller: the stack is whole only if the last frame's
                // CFI says it is the outermost one (`_start`, a thread's start); in a
                // signal frame, or in code no rule or frame pointer can pass, it is cut.
                Err(_) | Ok(None) => {
                    return match out.last() {
                        None => Walked::Root,
                        Some(&ip) if !process.covers(ip.saturating_sub(1)) => Walked::Unknown,
                        Some(&ip) if process.is_root(ip) => Walked::Root,
                        Some(_) => Walked::Truncated,
                    };
                }
            }
        }
    }

    /// Replaces the process's module list with the modules of `snapshot` (keeps the old one
    /// when the process can no longer be read).
    fn rebuild(&mut self, tgid: u32, snapshot: Option<&MapsSnapshot>) {
        let Some(snapshot) = snapshot.filter(|s| !s.is_empty()) else {
            if let Some(p) = self.processes.get_mut(&tgid) {
                p.read_at = Instant::now();
            }
            return;
        };
        let mut unwinder = UnwinderX86_64::new();
        let mut ranges = Vec::new();
        for m in snapshot.mappings() {
            let data = self
                .files
                .entry(m.file.clone())
                .or_insert_with(|| ModuleData::read(&m.file).map(Arc::new));
            let Some(data) = data else { continue };
            let Some(base) = data.base_avma(m.start, m.end, m.offset) else {
                continue;
            };
            unwinder.add_module(data.module(&m.path, m.start..m.end, base));
            ranges.push((m.start, m.end, base, data.clone()));
        }
        let missing = self
            .processes
            .remove(&tgid)
            .map(|p| p.missing)
            .unwrap_or_default();
        self.processes.insert(
            tgid,
            ProcessUnwinder {
                unwinder,
                missing,
                ranges,
                read_at: Instant::now(),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real files keep their index: checking it must not throw away what is sound.
    #[test]
    fn real_indexes_are_kept() {
        for path in ["/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/bin/true"] {
            let data = ModuleData::read(Path::new(path)).expect(path);
            assert!(
                data.eh_frame.is_some() && data.eh_frame_hdr.is_some(),
                "{path}"
            );
        }
    }

    /// An index whose `.eh_frame` pointer is moved past the section (so every entry lies
    /// before it) is dropped.
    #[test]
    fn an_index_pointing_outside_eh_frame_is_dropped() {
        let data = ModuleData::read(Path::new("/usr/bin/true")).expect("/usr/bin/true");
        let (hdr_at, hdr) = data.eh_frame_hdr.clone().expect("an index");
        let eh = data.eh_frame.clone().expect(".eh_frame");
        assert!(index_fits(&(hdr_at.clone(), hdr.clone()), &eh));
        // eh_frame_ptr: 4 bytes after the version and three encodings, pc-relative sdata4.
        let mut bad = hdr.to_vec();
        let ptr = i32::from_le_bytes(bad[4..8].try_into().expect("4 bytes"));
        bad[4..8].copy_from_slice(&(ptr + 0x10_0000).to_le_bytes());
        assert!(!index_fits(&(hdr_at, bad.into()), &eh));
    }
}
