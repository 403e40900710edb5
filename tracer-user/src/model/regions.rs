//! Memory mappings of one process, as the mmap family's syscalls created them.
//!
//! Kept apart from heap blocks: a mapping is not an allocation unless the program itself made
//! it. The allocator's own mappings (arenas, chunks served by mmap) are the allocator's cost,
//! thread stacks and file mappings are neither, and only anonymous mappings the program made
//! through libc's `mmap` are the program's allocations, attributed to their call site.
//! Overlapping inserts replace what they cover (`MAP_FIXED`), and unmaps split regions.

use std::collections::BTreeMap;

use super::SiteIdx;

/// Who a mapping belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// Made from inside an allocator call: part of the allocator's footprint.
    Allocator,
    /// An anonymous mapping the program made itself, from this site.
    Program(SiteIdx),
    /// A thread stack (`MAP_STACK`).
    Stack,
    /// Backed by a file.
    File,
    /// Anonymous, with no known program call site (the dynamic loader, direct syscalls).
    Other,
}

impl Owner {
    /// Whether resident memory in this mapping is the heap's cost to the machine.
    pub fn in_footprint(self) -> bool {
        matches!(self, Self::Allocator | Self::Program(_))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub end: u64,
    pub owner: Owner,
    pub born_ns: u64,
}

/// A piece of a region that an unmap, a remap or a `MAP_FIXED` mapping took away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub start: u64,
    pub end: u64,
    pub owner: Owner,
    pub born_ns: u64,
    /// How many parts of the region remain: 0 (all gone), 1 (cut at an edge), 2 (a hole).
    pub remaining: u8,
}

impl Piece {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

#[derive(Clone, Debug, Default)]
pub struct Regions {
    by_start: BTreeMap<u64, Region>,
}

impl Regions {
    /// Maps `[start, start + len)`, replacing whatever it overlaps; returns what it replaced.
    /// `born_ns` is when the mapping was first made (kept across `mremap`).
    pub fn insert(&mut self, start: u64, len: u64, owner: Owner, born_ns: u64) -> Vec<Piece> {
        let removed = self.remove(start, len);
        if len > 0 {
            self.by_start.insert(
                start,
                Region {
                    end: start.saturating_add(len),
                    owner,
                    born_ns,
                },
            );
        }
        removed
    }

    /// Unmaps `[start, start + len)`, splitting regions it cuts; returns the pieces removed.
    pub fn remove(&mut self, start: u64, len: u64) -> Vec<Piece> {
        let end = start.saturating_add(len);
        let mut removed = Vec::new();
        if len == 0 {
            return removed;
        }
        // Regions starting before `end` that may overlap: the one before `start`, and all
        // starting inside the range.
        let first = self
            .by_start
            .range(..start)
            .next_back()
            .filter(|(_, r)| r.end > start)
            .map(|(&s, _)| s);
        let inside: Vec<u64> = self.by_start.range(start..end).map(|(&s, _)| s).collect();
        for s in first.into_iter().chain(inside) {
            let region = self.by_start.remove(&s).expect("present");
            let cut_start = s.max(start);
            let cut_end = region.end.min(end);
            let mut remaining = 0;
            if s < cut_start {
                remaining += 1;
                self.by_start.insert(
                    s,
                    Region {
                        end: cut_start,
                        ..region
                    },
                );
            }
            if cut_end < region.end {
                remaining += 1;
                self.by_start.insert(cut_end, region);
            }
            removed.push(Piece {
                start: cut_start,
                end: cut_end,
                owner: region.owner,
                born_ns: region.born_ns,
                remaining,
            });
        }
        removed
    }

    /// The region starting exactly at `start`.
    pub fn starting_at(&mut self, start: u64) -> Option<&mut Region> {
        self.by_start.get_mut(&start)
    }

    /// Regions overlapping `[start, end)`, in address order, with their start addresses.
    pub fn iter_overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, &Region)> {
        let before = self
            .by_start
            .range(..start)
            .next_back()
            .filter(move |(_, r)| r.end > start);
        before
            .into_iter()
            .chain(self.by_start.range(start..end))
            .map(|(&s, r)| (s, r))
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, &Region)> {
        self.by_start.iter().map(|(&s, r)| (s, r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(r: &Regions) -> Vec<(u64, u64, Owner)> {
        r.iter().map(|(s, reg)| (s, reg.end, reg.owner)).collect()
    }

    #[test]
    fn partial_unmap_splits() {
        let mut r = Regions::default();
        r.insert(0x1000, 0x4000, Owner::Program(3), 1);
        let removed = r.remove(0x2000, 0x1000);
        assert_eq!(
            removed,
            vec![Piece {
                start: 0x2000,
                end: 0x3000,
                owner: Owner::Program(3),
                born_ns: 1,
                remaining: 2
            }]
        );
        assert_eq!(
            layout(&r),
            vec![
                (0x1000, 0x2000, Owner::Program(3)),
                (0x3000, 0x5000, Owner::Program(3))
            ]
        );
    }

    #[test]
    fn fixed_mapping_replaces_what_it_covers() {
        let mut r = Regions::default();
        r.insert(0x1000, 0x2000, Owner::Other, 1);
        r.insert(0x3000, 0x2000, Owner::Allocator, 1);
        let replaced = r.insert(0x2000, 0x2000, Owner::File, 2);
        assert_eq!(replaced.iter().map(Piece::len).sum::<u64>(), 0x2000);
        assert_eq!(
            layout(&r),
            vec![
                (0x1000, 0x2000, Owner::Other),
                (0x2000, 0x4000, Owner::File),
                (0x4000, 0x5000, Owner::Allocator),
            ]
        );
    }

    #[test]
    fn unmap_across_several_regions() {
        let mut r = Regions::default();
        r.insert(0x1000, 0x1000, Owner::Stack, 1);
        r.insert(0x2000, 0x1000, Owner::Allocator, 1);
        r.insert(0x4000, 0x1000, Owner::Other, 1);
        let removed = r.remove(0x1800, 0x3000);
        assert_eq!(
            removed.iter().map(Piece::len).sum::<u64>(),
            0x800 + 0x1000 + 0x800
        );
        assert_eq!(
            layout(&r),
            vec![
                (0x1000, 0x1800, Owner::Stack),
                (0x4800, 0x5000, Owner::Other)
            ]
        );
        let starts: Vec<u64> = r.iter_overlapping(0x0, 0x4900).map(|(s, _)| s).collect();
        assert_eq!(starts, vec![0x1000, 0x4800]);
    }
}
