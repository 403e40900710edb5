//! Interned user stacks: identical instruction-pointer sequences share one [`StackId`].
//!
//! The kernel already deduplicates frame-pointer stacks by a 64-bit hash, sending each stack's
//! frames once; this table maps those hashes (and unwound copied stacks) to one id space, so
//! the model keys sites by a `u32` and never hashes frames on the hot path.

use rustc_hash::FxHashMap;

/// An interned stack. [`StackId::UNKNOWN`] stands for "the stack could not be captured".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StackId(pub u32);

impl StackId {
    pub const UNKNOWN: Self = Self(u32::MAX);
}

/// Every stack's frames are stored once, end to end in one vector: deep-stacked programs
/// (python: 13 000 stacks of 42 frames) made a boxed copy per stack, and a second one as the
/// lookup key, 9 MB of the model.
#[derive(Debug, Default)]
pub struct StackTable {
    /// The frames of every stack, end to end.
    arena: Vec<u64>,
    /// Per interned stack: where its frames start in `arena`, and how many there are.
    spans: Vec<(u32, u32)>,
    /// Per interned stack: callers are missing (depth limit, copy exhausted, unwinding failed).
    truncated: Vec<bool>,
    /// Content hash → the newest stack with that hash; older ones follow through
    /// `same_hash` (distinct stacks whose hashes collide).
    by_content: FxHashMap<u64, StackId>,
    same_hash: Vec<StackId>,
    /// Kernel stack hash → interned id.
    by_kernel_hash: FxHashMap<u64, StackId>,
}

impl StackTable {
    /// The interned id of a kernel stack hash seen before, if any (the hot path).
    #[inline]
    pub fn kernel(&self, hash: u64) -> Option<StackId> {
        self.by_kernel_hash.get(&hash).copied()
    }

    /// Records the frames the kernel sent with a stack hash (again if its "already sent"
    /// slot was reused: interning makes that free).
    pub fn insert_kernel(&mut self, hash: u64, frames: &[u64], truncated: bool) -> StackId {
        let id = self.intern_marked(frames, truncated);
        self.by_kernel_hash.insert(hash, id);
        id
    }

    /// Interns a stack by content.
    pub fn intern(&mut self, frames: &[u64]) -> StackId {
        self.intern_marked(frames, false)
    }

    /// Interns a stack by content, remembering whether it is known to be incomplete.
    pub fn intern_marked(&mut self, frames: &[u64], truncated: bool) -> StackId {
        let hash = content_hash(frames);
        let newest = self.by_content.get(&hash).copied();
        let mut candidate = newest;
        while let Some(id) = candidate.filter(|&id| id != StackId::UNKNOWN) {
            if self.frames(id) == frames {
                if truncated {
                    self.truncated[id.0 as usize] = true;
                }
                return id;
            }
            candidate = Some(self.same_hash[id.0 as usize]);
        }
        let id = StackId(self.spans.len() as u32);
        self.spans
            .push((self.arena.len() as u32, frames.len() as u32));
        self.arena.extend_from_slice(frames);
        self.truncated.push(truncated);
        self.same_hash.push(newest.unwrap_or(StackId::UNKNOWN));
        self.by_content.insert(hash, id);
        id
    }

    /// Whether callers are missing from this stack.
    pub fn is_truncated(&self, id: StackId) -> bool {
        self.truncated.get(id.0 as usize).copied().unwrap_or(false)
    }

    /// The frames of a stack, innermost first; empty for [`StackId::UNKNOWN`].
    pub fn frames(&self, id: StackId) -> &[u64] {
        self.spans.get(id.0 as usize).map_or(&[], |&(start, len)| {
            &self.arena[start as usize..(start + len) as usize]
        })
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }
}

fn content_hash(frames: &[u64]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = rustc_hash::FxHasher::default();
    frames.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_stacks_share_an_id() {
        let mut table = StackTable::default();
        let a = table.insert_kernel(7, &[1, 2, 3], false);
        let b = table.intern(&[1, 2, 3]);
        let c = table.insert_kernel(9, &[1, 2, 4], true);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(table.kernel(7), Some(a));
        assert_eq!(table.kernel(8), None);
        assert_eq!(table.kernel(9), Some(c));
        assert_eq!(table.frames(c), &[1, 2, 4]);
        assert!(table.frames(StackId::UNKNOWN).is_empty());
        assert!(!table.is_truncated(a));
        assert!(table.is_truncated(c));
    }

    /// Stacks whose content hashes collide stay apart, each found again by its frames.
    #[test]
    fn stacks_with_one_hash_stay_apart() {
        let mut table = StackTable::default();
        let a = table.intern(&[1, 2]);
        let b = table.intern(&[3]);
        // Forced collision: b's chain now leads to a.
        let hash = content_hash(&[1, 2]);
        table.by_content.insert(hash, b);
        table.same_hash[b.0 as usize] = a;
        assert_eq!(table.intern(&[1, 2]), a);
        assert_eq!(table.intern(&[3]), b);
        let c = table.intern(&[4, 5, 6]);
        assert_eq!(table.frames(c), &[4, 5, 6]);
        assert_eq!(table.frames(a), &[1, 2]);
        assert_eq!(table.len(), 3);
    }
}
