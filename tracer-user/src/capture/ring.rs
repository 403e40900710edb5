//! The consumer side of the kernel's BPF ring buffer, mapped and read in place.
//!
//! aya's reader publishes the consumer position after every record. Every producer reads that
//! position when it reserves, so with events arriving from another core its cache line moved
//! between cores once per event, a cost paid by the traced program and by us. Here the
//! position is published once per batch (and every [`PUBLISH_EVERY`] bytes within one), which
//! only delays, by at most that much, the space the kernel sees as free.
//!
//! The data pages are mapped once, not twice in a row as readers usually map them so that
//! a record wrapping the end reads contiguously: resident-set accounting counts both
//! mappings, so the double mapping showed every ring twice in the collector's RSS (32 of
//! its 56 MiB at default settings). The rare record that wraps is copied out instead.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd, RawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

use aya::maps::MapData;

/// The record is still being written (`BPF_RINGBUF_BUSY_BIT`).
const BUSY: u32 = 1 << 31;
/// The producer discarded the record (`BPF_RINGBUF_DISCARD_BIT`).
const DISCARDED: u32 = 1 << 30;
/// Every record starts with a header of its length and flags, then the page offset.
const HEADER_BYTES: u64 = 8;
/// Publish the consumer position at least this often while draining a long backlog.
const PUBLISH_EVERY: u64 = 256 << 10;

/// A mapped ring buffer. Records are handed out as slices into the mapping, valid only until
/// the consumer position passes them, which happens after the callback returns.
pub struct Ring {
    map: MapData,
    /// The consumer page (read-write).
    consumer: NonNull<AtomicU64>,
    /// The producer page followed by the data pages.
    producer: NonNull<u8>,
    /// A record that wraps the end of the data pages, copied whole.
    wrapped: Vec<u8>,
    page: usize,
    size: u64,
    /// Our position: records before it have been consumed.
    pos: u64,
    /// The position last written to the consumer page.
    published: u64,
    publish_every: u64,
}

// SAFETY: the mappings belong to this value alone; the kernel synchronises through atomics.
unsafe impl Send for Ring {}

impl Ring {
    /// Maps the ring buffer `map` (a `BPF_MAP_TYPE_RINGBUF`).
    pub fn new(map: MapData) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let size = u64::from(map.info().map_err(io::Error::other)?.max_entries());
        if !size.is_power_of_two() || (size as usize) < page {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("ring buffer of {size} bytes is not a power-of-two number of pages"),
            ));
        }
        let fd = map.fd().as_fd().as_raw_fd();
        let consumer = map_pages(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = match map_pages(fd, page + size as usize, libc::PROT_READ, page) {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: mapped just above with this length.
                unsafe { libc::munmap(consumer.as_ptr().cast(), page) };
                return Err(e);
            }
        };
        let consumer = consumer.cast::<AtomicU64>();
        // SAFETY: the consumer page starts with the kernel's consumer position.
        let pos = unsafe { consumer.as_ref() }.load(Ordering::Acquire);
        Ok(Self {
            map,
            consumer,
            producer,
            wrapped: Vec::new(),
            page,
            size,
            pos,
            published: pos,
            publish_every: PUBLISH_EVERY.min(size / 8),
        })
    }

    /// Hands every committed record to `f`, oldest first, and stops at the first record still
    /// being written. Returns how many records (discarded ones included) were consumed.
    pub fn consume(&mut self, mut f: impl FnMut(&[u8])) -> u64 {
        let mask = self.size - 1;
        // SAFETY: the producer page starts with the kernel's producer position.
        let produced = unsafe { self.producer.cast::<AtomicU64>().as_ref() };
        // SAFETY: the data pages follow the producer page in the same mapping.
        let data = unsafe { self.producer.as_ptr().add(self.page) };
        let mut n = 0;
        let mut end = produced.load(Ordering::Acquire);
        while self.pos < end {
            let offset = (self.pos & mask) as usize;
            // SAFETY: `offset` < size, and every record header is 8-byte aligned in the data
            // pages; the kernel writes the header last, with release semantics.
            let header = unsafe { &*data.add(offset).cast::<AtomicU32>() }.load(Ordering::Acquire);
            if header & BUSY != 0 {
                break;
            }
            let len = header & !(BUSY | DISCARDED);
            if header & DISCARDED == 0 {
                f(self.record(data, offset, len as usize));
            }
            n += 1;
            self.pos += (u64::from(len) + HEADER_BYTES + 7) & !7;
            if self.pos - self.published >= self.publish_every {
                self.publish();
            }
            if self.pos == end {
                end = produced.load(Ordering::Acquire);
            }
        }
        self.publish();
        n
    }

    /// The `len` bytes of the committed record whose header is at `offset` in `data`.
    fn record(&mut self, data: *const u8, offset: usize, len: usize) -> &[u8] {
        // SAFETY: the data pages, `size` bytes, mapped for as long as `self`.
        let pages = unsafe { std::slice::from_raw_parts(data, self.size as usize) };
        record_at(pages, offset, len, &mut self.wrapped)
    }

    /// Tells the kernel the space before `pos` is free again.
    fn publish(&mut self) {
        if self.published != self.pos {
            // SAFETY: as in `new`.
            unsafe { self.consumer.as_ref() }.store(self.pos, Ordering::Release);
            self.published = self.pos;
        }
    }
}

impl AsRawFd for Ring {
    fn as_raw_fd(&self) -> RawFd {
        self.map.fd().as_fd().as_raw_fd()
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: both regions were mapped in `new` with these lengths and are not used after.
        unsafe {
            libc::munmap(self.consumer.as_ptr().cast(), self.page);
            libc::munmap(
                self.producer.as_ptr().cast(),
                self.page + self.size as usize,
            );
        }
    }
}

/// The `len` bytes of the record whose header is at `offset` in the ring's data `pages`: in
/// place, or copied into `wrapped` when they wrap the end. The header is 8-byte aligned and
/// the ring a multiple of pages, so only the body can wrap, and only once.
fn record_at<'a>(pages: &'a [u8], offset: usize, len: usize, wrapped: &'a mut Vec<u8>) -> &'a [u8] {
    let size = pages.len();
    let start = (offset + HEADER_BYTES as usize) % size;
    let first = len.min(size - start);
    if first == len {
        return &pages[start..start + len];
    }
    wrapped.clear();
    wrapped.extend_from_slice(&pages[start..]);
    wrapped.extend_from_slice(&pages[..len - first]);
    wrapped
}

fn map_pages(fd: RawFd, len: usize, prot: i32, offset: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: a fresh shared mapping of the map's fd; the kernel checks lengths and offsets.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            fd,
            offset as libc::off_t,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(ptr.cast()).ok_or_else(io::Error::last_os_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_read_in_place_or_whole_across_the_wrap() {
        let pages: Vec<u8> = (0..64).collect();
        let mut wrapped = Vec::new();
        assert_eq!(record_at(&pages, 8, 4, &mut wrapped), &[16, 17, 18, 19]);
        // A header in the last 8 bytes: the body starts at the beginning.
        assert_eq!(record_at(&pages, 56, 3, &mut wrapped), &[0, 1, 2]);
        // A body running past the end continues at the beginning.
        assert_eq!(
            record_at(&pages, 48, 12, &mut wrapped),
            &[56, 57, 58, 59, 60, 61, 62, 63, 0, 1, 2, 3]
        );
        // Ending exactly at the end is no wrap.
        assert_eq!(record_at(&pages, 40, 16, &mut wrapped), &pages[48..64]);
    }
}
