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
use object::{Object as _, ObjectSection as _, ObjectSegment as _};
use rustc_hash::FxHashMap;
use tracer_common::StackRegs;

use crate::procfs::MapsSnapshot;

type Bytes = Arc<[u8]>;

/// How often at most a process's mappings are reread because a stack started in code no
/// known module covers (a `dlopen` since the last read, or JIT code that no reread will fix).
const REFRESH_AT_MOST_EVERY: Duration = Duration::from_millis(100);

/// The unwind-relevant parts of one ELF file, shared by every process mapping it.
struct ModuleData {
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
        Some(Self {
            segments: file
                .segments()
                .filter(|seg| {
                    matches!(seg.flags(), object::SegmentFlags::Elf { p_flags, .. }
                        if p_flags.contains(object::elf::PF_X))
                })
                .map(|seg| {
                    let (off, len) = seg.file_range();
                    (seg.address(), off, len)
                })
                .collect(),
            text: section(".text"),
            eh_frame: section(".eh_frame"),
            eh_frame_hdr: section(".eh_frame_hdr"),
            debug_frame: section(".debug_frame").map(|(_, b)| b),
            got: file
                .section_by_name(".got")
                .map(|s| s.address()..s.address() + s.size()),
        })
    }

    /// The address the file's virtual address 0 is loaded at, given its executable mapping
    /// (`start`..`end` maps file offset `file_offset`, page-aligned, so the segment it holds
    /// may begin after `file_offset` and share its first page with the previous segment).
    fn base_avma(&self, start: u64, end: u64, file_offset: u64) -> Option<u64> {
        let mapped = file_offset..file_offset + (end - start);
        self.segments
            .iter()
            .find(|&&(_, off, len)| off < mapped.end && off + len > mapped.start)
            .map(|&(svma, off, _)| {
                start
                    .wrapping_add(off)
                    .wrapping_sub(file_offset)
                    .wrapping_sub(svma)
            })
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

struct ProcessUnwinder {
    unwinder: UnwinderX86_64<Bytes>,
    /// Executable ranges the unwinder knows, sorted.
    ranges: Vec<(u64, u64)>,
    read_at: Instant,
}

impl ProcessUnwinder {
    fn covers(&self, addr: u64) -> bool {
        let i = self.ranges.partition_point(|&(start, _)| start <= addr);
        i > 0 && addr < self.ranges[i - 1].1
    }
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
    /// `depth`). `maps` rereads the process's (pinned) mappings when they are needed.
    pub fn unwind(
        &mut self,
        tgid: u32,
        regs: StackRegs,
        stack: &[u8],
        depth: usize,
        out: &mut Vec<u64>,
        maps: &mut dyn FnMut(u32) -> Option<MapsSnapshot>,
    ) -> Ending {
        out.clear();
        let stale = self
            .processes
            .get(&tgid)
            .is_none_or(|p| !p.covers(regs.ip) && p.read_at.elapsed() >= REFRESH_AT_MOST_EVERY);
        if stale {
            let snapshot = maps(tgid);
            self.rebuild(tgid, snapshot.as_ref());
        }
        let Some(process) = self.processes.get(&tgid) else {
            return Ending::Truncated;
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
                Ok(Some(frame)) if out.len() < depth => out.push(frame.address()),
                Ok(Some(_)) => return Ending::Truncated,
                // The caller's frame lies past the copied bytes: the copy was too short.
                Err(framehop::Error::CouldNotReadStack(addr)) if addr >= copy_end => {
                    return Ending::Truncated;
                }
                // No CFI says where the outermost frame's caller is (`_start` has none) and
                // the frame-pointer fallback found nothing: the walk is over.
                Err(_) => return Ending::Root,
                Ok(None) => return Ending::Root,
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
            ranges.push((m.start, m.end));
        }
        self.processes.insert(
            tgid,
            ProcessUnwinder {
                unwinder,
                ranges,
                read_at: Instant::now(),
            },
        );
    }
}
