//! Which traced processes' lists use which module files' tables, so that a table no list
//! uses any more can be given back (its rows reused for other files).
//!
//! A table is let go in two steps, each after a delay: unused for `IDLE` (a shell's next
//! command often maps the same files again within moments: not built again), it is taken out
//! of `FILE_TABLES`, so no new walk can reach it; `SETTLE` later (a walk that had just looked
//! it up is long over: walks take microseconds), its rows are free.

use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use crate::procfs::FileKey;

/// How long a table no list uses is kept, for the next process that maps its file.
pub const IDLE: Duration = Duration::from_secs(2);
/// How long a table taken out of `FILE_TABLES` is left untouched before its rows are reused.
pub const SETTLE: Duration = Duration::from_millis(200);

/// Where an unused table is on its way out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Leaving {
    /// Unused since then; still filed.
    Idle(Instant),
    /// Taken out of `FILE_TABLES` then.
    Unfiled(Instant),
}

/// What is due for an unused table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    /// Take it out of `FILE_TABLES`.
    Unfile(FileKey),
    /// Free its rows and forget it.
    Release(FileKey),
}

#[derive(Default)]
pub struct Usage {
    /// The files each listed process's list uses.
    by_pid: FxHashMap<u32, Vec<FileKey>>,
    /// How many lists use each file.
    users: FxHashMap<FileKey, u32>,
    /// Tables no list uses.
    leaving: FxHashMap<FileKey, Leaving>,
}

impl Usage {
    /// A table was stored for `key`: unused until a list uses it.
    pub fn stored(&mut self, key: FileKey, now: Instant) {
        if !self.users.contains_key(&key) {
            self.leaving.insert(key, Leaving::Idle(now));
        }
    }

    /// `pid`'s list now uses `files` (and nothing else). Returns the files that were taken
    /// out of `FILE_TABLES` meanwhile and must be filed again.
    pub fn listed(&mut self, pid: u32, mut files: Vec<FileKey>, now: Instant) -> Vec<FileKey> {
        files.sort_unstable_by_key(|k| (k.dev, k.ino));
        files.dedup();
        let mut refile = Vec::new();
        for &key in &files {
            *self.users.entry(key).or_default() += 1;
            if let Some(Leaving::Unfiled(_)) = self.leaving.remove(&key) {
                refile.push(key);
            }
        }
        if let Some(old) = self.by_pid.insert(pid, files) {
            self.drop_uses(&old, now);
        }
        refile
    }

    /// `pid`'s list is gone (it exited).
    pub fn forget(&mut self, pid: u32, now: Instant) {
        if let Some(old) = self.by_pid.remove(&pid) {
            self.drop_uses(&old, now);
        }
    }

    /// `child` was forked by `parent`: the kernel gave it a copy of the parent's list.
    pub fn inherit(&mut self, parent: u32, child: u32, now: Instant) {
        let files = self.by_pid.get(&parent).cloned().unwrap_or_default();
        self.listed(child, files, now);
    }

    /// What is due at `now` for the tables no list uses (at most one step per table per
    /// call, so a table is unfiled and released in different calls).
    pub fn due(&mut self, now: Instant) -> Vec<Due> {
        let mut due = Vec::new();
        for (&key, leaving) in &mut self.leaving {
            match *leaving {
                Leaving::Idle(since) if now.duration_since(since) >= IDLE => {
                    *leaving = Leaving::Unfiled(now);
                    due.push(Due::Unfile(key));
                }
                Leaving::Unfiled(since) if now.duration_since(since) >= SETTLE => {
                    due.push(Due::Release(key));
                }
                _ => {}
            }
        }
        for d in &due {
            if let Due::Release(key) = d {
                self.leaving.remove(key);
            }
        }
        due
    }

    fn drop_uses(&mut self, files: &[FileKey], now: Instant) {
        for key in files {
            let Some(n) = self.users.get_mut(key) else {
                continue;
            };
            *n -= 1;
            if *n == 0 {
                self.users.remove(key);
                self.leaving.insert(*key, Leaving::Idle(now));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: FileKey = FileKey { dev: 1, ino: 1 };
    const B: FileKey = FileKey { dev: 1, ino: 2 };

    #[test]
    fn a_table_leaves_only_when_no_list_uses_it_and_comes_back_when_one_does() {
        let t0 = Instant::now();
        let mut u = Usage::default();
        u.stored(A, t0);
        u.stored(B, t0);
        assert!(u.listed(10, vec![A, B], t0).is_empty());
        u.inherit(10, 11, t0);
        u.forget(10, t0);
        assert!(u.due(t0 + IDLE * 2).is_empty(), "the child still uses both");
        assert!(u.listed(11, vec![A], t0 + IDLE).is_empty());
        assert!(u.due(t0 + IDLE).is_empty(), "B idle for no time yet");
        assert_eq!(u.due(t0 + IDLE * 2), [Due::Unfile(B)]);
        // Listed again while unfiled: filed again, not released.
        assert_eq!(u.listed(12, vec![B], t0 + IDLE * 2), [B]);
        assert!(u.due(t0 + IDLE * 3).is_empty());
        u.forget(12, t0 + IDLE * 3);
        u.forget(11, t0 + IDLE * 3);
        let mut due = u.due(t0 + IDLE * 4);
        due.sort_by_key(|d| format!("{d:?}"));
        assert_eq!(due, [Due::Unfile(A), Due::Unfile(B)]);
        assert!(u.due(t0 + IDLE * 4).is_empty(), "settling");
        assert_eq!(u.due(t0 + IDLE * 4 + SETTLE).len(), 2);
        assert!(u.due(t0 + IDLE * 9).is_empty(), "gone for good");
    }
}
