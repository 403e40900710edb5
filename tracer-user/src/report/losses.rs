//! Everything lost or doubted, each cause with its own counter, and what each one means for
//! the numbers: whether the report is partial, and which option would have avoided it.

use serde::Serialize;
use tracer_common::Counter;

use crate::capture::{CaptureStats, KernelCounters};

#[derive(Clone, Debug, Default, Serialize)]
pub struct Events {
    pub received: u64,
    /// Every event lost or doubted anywhere: the sum of `lost`.
    pub dropped: u64,
    pub lost: Losses,
    /// Allocations whose stack could not be captured (counted, site unknown).
    pub stacks_lost: u64,
    /// Events read after later ones had been applied (see `capture::SETTLE_NS`): their order
    /// relative to those may be wrong. Expected to be zero.
    pub late: u64,
    /// Allocations at an address the trace still held live, with no realloc to explain it:
    /// the free of the earlier block was never seen (a loss counted in `lost` when one was,
    /// or an unseen one), so it was retired as freed. Expected to be zero.
    pub address_reused_while_live: u64,
    /// Mallocs recorded at their entry from glibc's thread cache, and how that was checked.
    pub tcache_predictions: Predictions,
}

/// See `--no-tcache-prediction`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Predictions {
    /// Mallocs recorded at entry, their return not trapped.
    pub recorded: u64,
    /// Predictions compared with the call's real return (those calls were recorded from it).
    pub checked: u64,
    /// Of those, the wrong ones: the first one turns prediction off.
    pub wrong: u64,
}

/// One counter per way an event or a block can be lost.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Losses {
    /// Events not written: the CPU's ring buffer was full.
    pub ring_buffer_full: u64,
    /// Of those, allocations and frees (the rest are mappings and stacks' owners).
    pub ring_buffer_full_allocations: u64,
    pub ring_buffer_full_frees: u64,
    /// Allocator calls not recorded: their thread's call slot could not be had.
    pub inflight_map_full: u64,
    /// Allocator returns whose call was never recorded.
    pub return_without_entry: u64,
    /// Calls whose return never reached the tracer (their results are lost).
    pub return_missed: u64,
    /// `posix_memalign` results that could not be read.
    pub unreadable_result: u64,
    /// Mapping syscalls (mmap, mremap, brk) whose entry could not be recorded.
    pub syscall_slot_full: u64,
    /// Sampled blocks the kernel could not remember: their frees are not seen, so they count
    /// in totals but never as live.
    pub sampled_map_full: u64,
    /// Allocator calls made by a signal handler while the call it interrupted held the
    /// thread's slot, where no uprobe session could carry them (perf-event uprobes, or an
    /// allocator whose calls may nest).
    pub signal_handler_calls: u64,
    /// Records the collector could not decode.
    pub undecodable: u64,
}

impl Losses {
    fn total(&self) -> u64 {
        self.ring_buffer_full
            + self.inflight_map_full
            + self.return_without_entry
            + self.return_missed
            + self.unreadable_result
            + self.syscall_slot_full
            + self.sampled_map_full
            + self.signal_handler_calls
            + self.undecodable
    }
}

/// What was lost and what it means.
pub struct Assessed {
    pub events: Events,
    /// A loss could change a number.
    pub partial: bool,
    pub warnings: Vec<String>,
}

/// What the options that size things were, to name them in the warnings.
pub struct Settings {
    pub ring_mib: u32,
    pub sample_bytes: u64,
    pub max_sampled: u32,
}

pub fn assess(
    k: &KernelCounters,
    capture: &CaptureStats,
    replaced_live: u64,
    settings: &Settings,
) -> Assessed {
    let lost = Losses {
        ring_buffer_full: k.get(Counter::RingFull),
        ring_buffer_full_allocations: k.get(Counter::RingFullAllocation),
        ring_buffer_full_frees: k.get(Counter::RingFullFree),
        inflight_map_full: k.get(Counter::InflightFull),
        return_without_entry: k.get(Counter::ReturnWithoutEntry),
        return_missed: k.get(Counter::ReturnMissed),
        unreadable_result: k.get(Counter::OutPtrUnreadable),
        syscall_slot_full: k.get(Counter::SyscallsFull),
        sampled_map_full: k.get(Counter::SampledFull),
        signal_handler_calls: k.get(Counter::HandlerCallsLost),
        undecodable: capture.undecodable,
    };
    let events = Events {
        received: capture.received,
        dropped: lost.total(),
        lost,
        stacks_lost: k.get(Counter::StackLost)
            + k.get(Counter::ScratchBusy)
            + k.get(Counter::StackShed)
            + capture.stack_reads_failed,
        late: capture.late,
        address_reused_while_live: replaced_live,
        tcache_predictions: Predictions {
            recorded: k.get(Counter::Predicted),
            checked: k.get(Counter::PredictionChecked),
            wrong: k.get(Counter::PredictionWrong),
        },
    };
    let predictions = &events.tcache_predictions;
    // A wrong prediction was never recorded (it was being checked), but the unchecked ones
    // before it may have been wrong the same way.
    let mispredicted = predictions.wrong > 0 && predictions.recorded > 0;
    let mut warnings = loss_warnings(&events.lost, settings);
    warnings.extend(doubt_warnings(&events, mispredicted));
    let shed = k.get(Counter::StackShed);
    if shed > 0 {
        warnings.push(format!(
            "{shed} of the allocations without a stack had theirs left out because copying \
             it would have taken a ring buffer past half full (events come first): \
             --ring-buffer {} or more keeps them",
            (settings.ring_mib * 4).min(1024)
        ));
    }
    Assessed {
        partial: events.dropped > 0
            || events.late > 0
            || events.address_reused_while_live > 0
            || mispredicted,
        events,
        warnings,
    }
}

/// One warning per cause of loss, saying what it did to the numbers and what avoids it.
fn loss_warnings(l: &Losses, s: &Settings) -> Vec<String> {
    let mut out = Vec::new();
    let mut say = |n: u64, what: String| {
        if n > 0 {
            out.push(format!("{n} {what}"));
        }
    };
    say(
        l.ring_buffer_full,
        format!(
            "events were lost because a ring buffer was full: counts are lower bounds — raise \
             --ring-buffer (now {} MiB per CPU)",
            s.ring_mib
        ),
    );
    say(
        l.inflight_map_full + l.return_without_entry + l.return_missed,
        "allocator calls were lost (no per-thread call slot, or a return the kernel never \
         delivered): counts are lower bounds; the kernel was short of memory or dropped \
         return probes — nothing alloctrace can raise; retrace when the machine is less loaded"
            .into(),
    );
    say(
        l.unreadable_result,
        "posix_memalign results could not be read from the process: those blocks are missing"
            .into(),
    );
    say(
        l.syscall_slot_full,
        "mapping syscalls (mmap/mremap/brk) could not be recorded: footprint attribution may \
         be off; the kernel was short of memory"
            .into(),
    );
    say(
        l.sampled_map_full,
        format!(
            "sampled blocks could not be remembered in the kernel (its table of live sampled \
             blocks, --max-sampled {}, was full): they count in totals but not as live, so \
             live bytes are lower bounds — raise --max-sampled, or --sample-bytes (now {}) to \
             sample fewer blocks",
            s.max_sampled, s.sample_bytes
        ),
    );
    say(
        l.signal_handler_calls,
        "allocator calls made by signal handlers were lost: the call they interrupted held \
         the thread's only slot (uprobe sessions carry such calls on their own: Linux 6.12+, \
         glibc's malloc and calloc)"
            .into(),
    );
    say(
        l.undecodable,
        "records could not be decoded (a kernel/collector version mismatch)".into(),
    );
    out
}

/// Warnings about numbers that are doubtful rather than lost.
fn doubt_warnings(events: &Events, mispredicted: bool) -> Vec<String> {
    let mut out = Vec::new();
    if events.late > 0 {
        out.push(format!(
            "{} events reached the collector late (written long after their timestamp, e.g. \
             a preempted probe on an overloaded machine); a free and a reuse of the same \
             address among them may be counted in the wrong order",
            events.late
        ));
    }
    let p = &events.tcache_predictions;
    if events.address_reused_while_live > 0 {
        out.push(format!(
            "{} allocations reused an address still live in the trace: the free of the \
             earlier block was never seen, so it was retired as freed{}",
            events.address_reused_while_live,
            if events.dropped > 0 {
                " (events were lost, see above)"
            } else if p.recorded > 0 {
                "; no loss was counted — if this persists, retrace with --no-tcache-prediction"
            } else {
                "; no loss was counted"
            }
        ));
    }
    if p.wrong > 0 {
        let before = if mispredicted {
            format!(
                "{} mallocs were recorded from predictions before that, and may be wrong the \
                 same way: retrace with --no-tcache-prediction",
                p.recorded
            )
        } else {
            "none had been recorded from a prediction, so the counts are exact".to_owned()
        };
        out.push(format!(
            "a malloc predicted from glibc's thread cache returned another block ({} of {} \
             checked); prediction was turned off: {before}",
            p.wrong, p.checked
        ));
    }
    if events.stacks_lost > 0 {
        out.push(format!(
            "{} allocations have no stack (counted under an unknown site)",
            events.stacks_lost
        ));
    }
    out
}
