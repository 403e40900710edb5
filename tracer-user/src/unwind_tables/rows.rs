//! The `UNWIND_ROWS` map as a store of row ranges: one range per module file, written
//! straight into the map's memory (one `mmap` of the range's pages per table, not one
//! syscall per row), freed when no listed process maps the file any more.

use std::os::fd::{AsRawFd as _, OwnedFd};

use tracer_common::unwind::UnwindRow;

const ROW_BYTES: u64 = std::mem::size_of::<UnwindRow>() as u64;

pub struct RowStore {
    fd: OwnedFd,
    capacity: u32,
    /// Rows past this were never handed out.
    next: u32,
    /// Ranges handed back, (first, len), kept sorted and merged.
    free: Vec<(u32, u32)>,
}

impl RowStore {
    pub fn new(fd: OwnedFd, capacity: u32) -> Self {
        Self {
            fd,
            capacity,
            next: 0,
            free: Vec::new(),
        }
    }

    /// Stores `rows`; returns the first row's index, or None when the map has no room.
    pub fn store(&mut self, rows: &[UnwindRow]) -> std::io::Result<Option<u32>> {
        let Ok(len) = u32::try_from(rows.len()) else {
            return Ok(None);
        };
        let Some(first) = self.allocate(len) else {
            return Ok(None);
        };
        if let Err(e) = self.write(first, rows) {
            self.release(first, len);
            return Err(e);
        }
        Ok(Some(first))
    }

    /// Hands a range back.
    pub fn release(&mut self, first: u32, len: u32) {
        let at = self.free.partition_point(|&(f, _)| f < first);
        self.free.insert(at, (first, len));
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(self.free.len());
        for &(f, l) in &self.free {
            match merged.last_mut() {
                Some((mf, ml)) if *mf + *ml == f => *ml += l,
                _ => merged.push((f, l)),
            }
        }
        if let Some(&(f, l)) = merged.last()
            && f + l == self.next
        {
            self.next = f;
            merged.pop();
        }
        self.free = merged;
    }

    /// Rows in use.
    pub fn used(&self) -> u32 {
        self.next - self.free.iter().map(|&(_, l)| l).sum::<u32>()
    }

    fn allocate(&mut self, len: u32) -> Option<u32> {
        if let Some(i) = self.free.iter().position(|&(_, l)| l >= len) {
            let (first, l) = self.free[i];
            if l == len {
                self.free.remove(i);
            } else {
                self.free[i] = (first + len, l - len);
            }
            return Some(first);
        }
        let end = self.next.checked_add(len).filter(|&e| e <= self.capacity)?;
        let first = self.next;
        self.next = end;
        Some(first)
    }

    /// Copies `rows` to rows `first..` through a mapping of just their pages, unmapped at
    /// once so the table never counts in this process's resident memory.
    fn write(&self, first: u32, rows: &[UnwindRow]) -> std::io::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let page = crate::probe::page_size() as u64;
        let start = u64::from(first) * ROW_BYTES;
        let end = start + rows.len() as u64 * ROW_BYTES;
        let map_start = start / page * page;
        let map_len = (end - map_start).div_ceil(page) * page;
        // SAFETY: a shared mapping of the map's own memory, inside its size (the range was
        // allocated below the capacity the map was created with); unmapped below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.fd.as_raw_fd(),
                map_start as libc::off_t,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `rows` fit between `start` and `end`, inside the mapping; rows are plain
        // data, and the kernel reads them only once they are listed for some process.
        unsafe {
            let dst = base.cast::<u8>().add((start - map_start) as usize);
            std::ptr::copy_nonoverlapping(rows.as_ptr().cast::<u8>(), dst, rows.len() * 16);
            libc::munmap(base, map_len as usize);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(capacity: u32) -> RowStore {
        let fd = std::fs::File::open("/dev/null").expect("/dev/null").into();
        RowStore::new(fd, capacity)
    }

    #[test]
    fn freed_ranges_are_reused_and_merged() {
        let mut s = store(100);
        let a = s.allocate(30).expect("room");
        let b = s.allocate(30).expect("room");
        let c = s.allocate(30).expect("room");
        assert_eq!((a, b, c), (0, 30, 60));
        assert_eq!(s.allocate(20), None);
        s.release(a, 30);
        s.release(b, 30);
        assert_eq!(s.free, [(0, 60)]);
        assert_eq!(s.allocate(50), Some(0));
        assert_eq!(s.used(), 80);
        s.release(c, 30);
        assert_eq!((s.next, s.used()), (50, 50));
    }
}
