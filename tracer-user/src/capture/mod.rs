//! Ring buffer → decoded events, in the order they happened, and the kernel's loss counters.
//!
//! Holds no allocation state of its own: it only turns records into model events, resolving
//! the kernel's stack hashes to interned stacks (the frames arrive once, before any bare
//! hash), and hands them back in time order for the session to apply. Events that need the
//! session at once (a fork, an exec, a new executable mapping) are shown to it as they are
//! read, before they settle.

pub mod decode;
pub mod ring;
pub mod unwind;

use std::{
    collections::VecDeque,
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd, RawFd},
};

use aya::maps::{MapData, PerCpuArray};
use tracer_common::{COUNTER_SLOTS, Counter, NO_STACK};

use crate::{
    model::{Event, Op, StackId, StackTable},
    procfs::MapsSnapshot,
};

/// What the collector itself could not use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureStats {
    /// Records taken from the ring buffer.
    pub received: u64,
    /// Records that could not be decoded (a version mismatch; never expected).
    pub undecodable: u64,
    /// Stack hashes whose frames never arrived (their sites are unknown; not expected).
    pub stack_reads_failed: u64,
    /// Events read after a later one (of any process) had been applied: written more than
    /// `SETTLE_NS` after their timestamp. Not expected; their order may be wrong.
    pub late: u64,
}

/// How long an event waits before it is applied, so that every event written before it, on
/// any CPU's ring, has been read: a record is written microseconds after its timestamp is
/// taken, unless its program is preempted in between. An event read even later than this is
/// applied when it arrives, and counted in [`CaptureStats::late`]. The wait is in the
/// collector's memory (about 90 bytes per event), never in the rings, which are emptied at
/// every drain: a wait there would fill them (copied stacks are kilobytes per event).
const SETTLE_NS: u64 = 50_000_000;

/// Which waiting events a drain applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flush {
    /// Those older than [`SETTLE_NS`].
    Settled,
    /// All those stamped before now: a process stopped at its exit has written all of its.
    Now,
    /// All: tracing has stopped.
    All,
}

/// What capture needs to know of the traced processes while it decodes their events.
pub trait ProcessView {
    /// The process's (pinned) mappings now, for unwinding copied stacks.
    fn maps(&mut self, tgid: u32) -> Option<MapsSnapshot>;
    /// Whether `addr` lies in the code of an allocator alloctrace probes in the process: a
    /// mapping made from there is the allocator's own, whatever call it was made in.
    fn in_allocator(&self, tgid: u32, addr: u64) -> bool;
    /// An event read that may need action now, while the process is still as it was (a
    /// fork, an exec, an exit, a new file mapping with code): seen before it settles.
    fn noticed(&mut self, event: &Event);
    /// The file name process `tgid` just exec'd (as given to `execve`), read before its
    /// `Exec` is noticed.
    fn exec_name(&mut self, tgid: u32, name: &[u8]);
}

/// An event read from a ring, waiting for its turn. `kernel_stack` is the kernel's hash of
/// its stack while that is still to be looked up (its frames may come through another CPU's
/// ring, read later in the same drain), else `NO_STACK`.
#[derive(Clone, Copy)]
struct Waiting {
    event: Event,
    kernel_stack: u64,
}

pub struct Capture {
    rings: Vec<ring::Ring>,
    /// Per ring, its events read and not applied yet, in the ring's (time) order.
    waiting: Vec<VecDeque<Waiting>>,
    /// Readable when any ring is: what the event loop waits on.
    epoll: OwnedFd,
    /// Timestamp of the last event applied.
    applied_ns: u64,
    counters: PerCpuArray<MapData, u64>,
    scratch: Vec<u64>,
    unwinders: unwind::Unwinders,
    /// Frames kept per stack; deeper stacks are marked truncated.
    depth: usize,
    pub stats: CaptureStats,
}

impl Capture {
    pub fn new(
        rings: Vec<ring::Ring>,
        counters: PerCpuArray<MapData, u64>,
        depth: usize,
    ) -> std::io::Result<Self> {
        let epoll = epoll_of(&rings)?;
        Ok(Self {
            waiting: rings.iter().map(|_| VecDeque::new()).collect(),
            rings,
            epoll,
            applied_ns: 0,
            counters,
            scratch: Vec::with_capacity(tracer_common::MAX_STACK_DEPTH),
            unwinders: unwind::Unwinders::default(),
            depth: depth.clamp(1, tracer_common::MAX_STACK_DEPTH),
            stats: CaptureStats::default(),
        })
    }

    /// Reads every record in the rings, then hands over in `ready`, oldest first across the
    /// rings, the events that `flush` selects; returns how many records were read. `view`
    /// tells what decoding needs of the processes, and is shown the events that need action.
    ///
    /// The rings are per CPU, and the model needs a process's events in the order they
    /// happened (a free before the next allocation at its address). Each ring is in time
    /// order, so their events are merged by timestamp, once [`SETTLE_NS`] old: by then every
    /// earlier event has been read.
    pub fn drain(
        &mut self,
        stacks: &mut StackTable,
        view: &mut dyn ProcessView,
        flush: Flush,
        ready: &mut Vec<Event>,
    ) -> u64 {
        let now = crate::procfs::monotonic_ns();
        let cutoff = match flush {
            Flush::Settled => now.saturating_sub(SETTLE_NS),
            Flush::Now => now,
            Flush::All => u64::MAX,
        };
        let Self {
            rings,
            waiting,
            applied_ns,
            scratch,
            unwinders,
            depth,
            stats,
            ..
        } = self;
        let depth = *depth;
        let mut n = 0;
        for (ring, queue) in rings.iter_mut().zip(waiting.iter_mut()) {
            n += ring.consume(|item| {
                let read = read(item, stacks, view, unwinders, scratch, depth, stats);
                if let Some(event) = read {
                    if needs_notice(&event.event) {
                        view.noticed(&event.event);
                    }
                    queue.push_back(event);
                }
            });
        }
        stats.received += n;
        while let Some((ts, i)) = waiting
            .iter()
            .enumerate()
            .filter_map(|(i, q)| q.front().map(|w| (w.event.ts_ns, i)))
            .min()
        {
            if ts > cutoff {
                break;
            }
            let Some(w) = waiting[i].pop_front() else {
                break;
            };
            if ts < *applied_ns {
                stats.late += 1;
            }
            *applied_ns = (*applied_ns).max(ts);
            let mut event = w.event;
            if w.kernel_stack != NO_STACK {
                let id = stacks.kernel(w.kernel_stack).unwrap_or_else(|| {
                    stats.stack_reads_failed += 1;
                    StackId::UNKNOWN
                });
                event.op = event.op.with_stack(id);
            }
            if let Op::MapCaller {
                stack,
                caller_in_allocator,
                ..
            } = &mut event.op
            {
                let caller = stacks.frames(*stack).first().copied();
                *caller_in_allocator = caller.is_some_and(|ip| view.in_allocator(event.tgid, ip));
            }
            ready.push(event);
        }
        n
    }

    /// Unmaps the rings once every event is read: their pages (all of them, once the
    /// producers have gone round) would otherwise stay resident through the report.
    pub fn release_rings(&mut self) {
        self.rings.clear();
        self.waiting = Vec::new();
    }

    /// The kernel's counters, summed over CPUs.
    pub fn kernel_counters(&self) -> KernelCounters {
        let mut slots = [0u64; COUNTER_SLOTS as usize];
        for (i, slot) in slots.iter_mut().enumerate() {
            if let Ok(values) = self.counters.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        KernelCounters(slots)
    }
}

/// Decodes one record into the event it will apply, unwinding a copied stack now (against
/// the mappings of the moment) and interning frames the kernel sent.
fn read(
    item: &[u8],
    stacks: &mut StackTable,
    view: &mut dyn ProcessView,
    unwinders: &mut unwind::Unwinders,
    scratch: &mut Vec<u64>,
    depth: usize,
    stats: &mut CaptureStats,
) -> Option<Waiting> {
    let Ok((raw, payload)) = decode::record(item) else {
        stats.undecodable += 1;
        return None;
    };
    let mut kernel_stack = NO_STACK;
    if let Some(name) = decode::exec_name(&raw, payload) {
        view.exec_name(raw.tgid, name);
    }
    let stack = if let Some((regs, bytes)) = decode::copied_stack(&raw, payload) {
        let ending = unwinders.unwind(raw.tgid, regs, bytes, depth, scratch, &mut |tgid| {
            view.maps(tgid)
        });
        let truncated = ending == unwind::Ending::Truncated;
        if scratch.is_empty() {
            StackId::UNKNOWN
        } else {
            stacks.intern_marked(scratch, truncated)
        }
    } else if decode::has_inline_stack(&raw) {
        decode::inline_frames(payload, scratch);
        let truncated = cut(scratch, depth);
        stacks.insert_kernel(raw.stack, scratch, truncated)
    } else {
        kernel_stack = raw.stack;
        StackId::UNKNOWN
    };
    match decode::op(&raw, stack) {
        Ok(op) => Some(Waiting {
            event: Event {
                tgid: raw.tgid,
                ts_ns: raw.ts_ns,
                start_ns: raw.start_ns,
                allocator: tracer_common::allocator_of(raw.kind),
                op,
            },
            kernel_stack,
        }),
        Err(_) => {
            stats.undecodable += 1;
            None
        }
    }
}

/// Events the session acts on as soon as they are read: process lifecycle, and mappings of
/// a file with code (a library loaded: its allocators, its symbols).
fn needs_notice(event: &Event) -> bool {
    const PROT_EXEC: u32 = 4;
    match event.op {
        Op::Fork { .. } | Op::Exec { .. } | Op::Exit { .. } | Op::MapFile { .. } => true,
        Op::Map { prot, fd, .. } => fd >= 0 && prot & PROT_EXEC != 0,
        _ => false,
    }
}

/// Keeps at most `depth` frames; true when frames were cut, when the kernel's walk itself
/// stopped at its maximum depth (it records one frame beyond `depth` to tell), or when it
/// met a rule it could not follow (its last frame is then the truncation mark).
fn cut(frames: &mut Vec<u64>, depth: usize) -> bool {
    let marked = frames.last() == Some(&tracer_common::unwind::TRUNCATED_FRAME);
    if marked {
        frames.pop();
    }
    let full = frames.len() >= tracer_common::MAX_STACK_DEPTH || marked;
    let longer = frames.len() > depth;
    frames.truncate(depth);
    full || longer
}

/// Snapshot of the kernel-side counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters(pub [u64; COUNTER_SLOTS as usize]);

impl KernelCounters {
    pub fn get(&self, counter: Counter) -> u64 {
        self.0[counter as usize]
    }

    /// `ring_full=0 inflight_full=0 …`: every counter with its name, for `-v`.
    pub fn describe(&self) -> String {
        const NAMES: [&str; tracer_common::COUNTER_SLOTS as usize] = [
            "ring_full",
            "call_slot_unavailable",
            "return_without_entry",
            "unreadable_result",
            "stack_lost",
            "stacks_sent",
            "nested_calls",
            "nested_frees",
            "syscall_slot_unavailable",
            "sampled_table_full",
            "returns_missed",
            "predicted",
            "predictions_checked",
            "predictions_wrong",
            "ring_full_allocations",
            "ring_full_frees",
            "untraced_traps",
            "self_traps",
            "signal_handler_calls",
            "signal_handler_calls_lost",
            "stack_copy_buffer_busy",
            "walks_copied",
            "stack_copies_shed",
        ];
        NAMES
            .iter()
            .zip(self.0)
            .map(|(name, n)| format!("{name}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Events lost in the kernel: each one is an allocation or free the model never saw.
    /// (`InflightFull` is a cause, not an extra loss: that call's return is counted as
    /// `ReturnWithoutEntry`.)
    pub fn dropped(&self) -> u64 {
        self.get(Counter::RingFull)
            + self.get(Counter::ReturnWithoutEntry)
            + self.get(Counter::ReturnMissed)
            + self.get(Counter::OutPtrUnreadable)
            + self.get(Counter::HandlerCallsLost)
    }
}

/// An epoll instance watching every ring for records.
fn epoll_of(rings: &[ring::Ring]) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
    for (i, ring) in rings.iter().enumerate() {
        let mut interest = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        // SAFETY: both descriptors are open; `interest` is a valid event.
        let rc = unsafe {
            libc::epoll_ctl(
                epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                ring.as_raw_fd(),
                &mut interest,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(epoll)
}

impl AsRawFd for Capture {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}
