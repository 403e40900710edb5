//! What a site is to the user: the sequence of its symbolized frames (function, file, line,
//! inlined, module). The model keys sites by interned stack, so the hot path never touches a
//! string; stacks that differ only in return addresses (a call the compiler unrolled or
//! duplicated, a loop peeled) symbolize the same and are grouped here into one site, before
//! the analysis judges it and before the top sites are chosen, so a site split over many
//! stacks is neither misjudged nor cut. So are stacks that differ only in how many
//! start-up frames they end in.

use rustc_hash::FxHashMap;

use crate::{
    model::{Site, SiteIdx, SiteKind},
    symbolize::{Frame, Stacks},
};

/// What makes two frames the same to the user. An address no symbol covers is known only by
/// its module and offset.
#[derive(Clone, PartialEq, Eq, Hash)]
struct FrameKey<'a> {
    function: Option<&'a str>,
    file: Option<&'a str>,
    line: Option<u32>,
    inlined: bool,
    module: Option<&'a std::path::Path>,
    unknown_address: Option<u64>,
}

impl<'a> FrameKey<'a> {
    fn of(f: &'a Frame) -> Self {
        Self {
            function: f.function.as_deref(),
            file: f.file.as_deref(),
            line: f.line,
            inlined: f.inlined,
            module: f.module.as_deref(),
            unknown_address: f.function.is_none().then_some(f.address),
        }
    }
}

/// Groups the process's sites (indexed like `sites`, with `frames[i]` the symbolized stack
/// of `sites[i]`) into the sites the user sees: one group per kind and symbolized stack.
/// Each group lists its members by total bytes, largest first (the first one's addresses
/// are the ones shown); groups come in order of their first member's index.
pub fn group(sites: &[Site], frames: &Stacks) -> Vec<Vec<SiteIdx>> {
    let mut interned: FxHashMap<FrameKey<'_>, u32> = FxHashMap::default();
    let mut by_key: FxHashMap<(SiteKind, Vec<u32>), usize> = FxHashMap::default();
    let mut groups: Vec<Vec<SiteIdx>> = Vec::new();
    for (i, site) in sites.iter().enumerate().take(frames.len()) {
        let frames: Vec<&Frame> = frames.get(i).frames().collect();
        let key: Vec<u32> = frames[..without_runtime_tail(&frames)]
            .iter()
            .map(|&f| {
                let next = interned.len() as u32;
                *interned.entry(FrameKey::of(f)).or_insert(next)
            })
            .collect();
        let group = *by_key.entry((site.kind, key)).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[group].push(i as SiteIdx);
    }
    for members in &mut groups {
        members.sort_by_key(|&i| std::cmp::Reverse(sites[i as usize].total_bytes));
    }
    groups
}

/// How many of `frames` are left without the start-up or thread-entry frames the stack ends
/// in. Those say nothing of the call site, and how many a stack has depends on how it was
/// walked: a program's first stacks, walked with its unwind tables before its frame
/// pointers were known to be usable, reach `_start`; the frame-pointer walks after them stop
/// at `__libc_start_call_main`. Kept, they split one site in two (the first leaked blocks
/// judged "one-time", the rest a leak).
fn without_runtime_tail(frames: &[&Frame]) -> usize {
    let runtime = |f: &&&Frame| {
        f.function
            .as_deref()
            .is_some_and(super::text::is_runtime_function)
    };
    frames.len() - frames.iter().rev().take_while(runtime).count()
}
