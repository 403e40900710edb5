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

#[derive(Debug, Default)]
pub struct StackTable {
    frames: Vec<Box<[u64]>>,
    /// Per interned stack: callers are missing (depth limit, copy exhausted, unwinding failed).
    truncated: Vec<bool>,
    by_content: FxHashMap<Box<[u64]>, StackId>,
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
        if let Some(&id) = self.by_content.get(frames) {
            if truncated {
                self.truncated[id.0 as usize] = true;
            }
            return id;
        }
        let id = StackId(self.frames.len() as u32);
        let boxed: Box<[u64]> = frames.into();
        self.frames.push(boxed.clone());
        self.truncated.push(truncated);
        self.by_content.insert(boxed, id);
        id
    }

    /// Whether callers are missing from this stack.
    pub fn is_truncated(&self, id: StackId) -> bool {
        self.truncated.get(id.0 as usize).copied().unwrap_or(false)
    }

    /// The frames of a stack, innermost first; empty for [`StackId::UNKNOWN`].
    pub fn frames(&self, id: StackId) -> &[u64] {
        self.frames.get(id.0 as usize).map_or(&[], |f| f)
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
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
}
