use super::*;
use crate::model::{Event, Model, Op, Recording, StackId};

const S: u64 = 1_000_000_000;

/// A scripted process: allocations of `size` bytes at given seconds from given stacks,
/// freed at given seconds, sampled every second.
struct Script {
    model: Model,
    next_addr: u64,
    /// (second, op) to apply, in order.
    ops: Vec<(u64, Op)>,
}

impl Script {
    fn new() -> Self {
        Self {
            model: Model::default(),
            next_addr: 0x1000,
            ops: Vec::new(),
        }
    }

    /// An allocation of `size` at second `born` from `stack`, freed at `freed`; its address.
    fn block(&mut self, stack: u32, size: u64, born: u64, freed: Option<u64>) -> u64 {
        let addr = self.next_addr;
        self.next_addr += 0x100;
        self.ops.push((
            born,
            Op::Alloc {
                addr,
                size,
                stack: StackId(stack),
                recording: Recording::Every,
            },
        ));
        if let Some(t) = freed {
            self.ops.push((t, Op::Free { addr }));
        }
        addr
    }

    fn realloc(&mut self, stack: u32, at: u64, old: u64, size: u64) -> u64 {
        let new = self.next_addr;
        self.next_addr += 0x100;
        self.ops.push((
            at,
            Op::Realloc {
                old,
                new,
                size,
                stack: StackId(stack),
                recording: Recording::Every,
            },
        ));
        new
    }

    /// Applies everything up to `seconds`, sampling at each second (+1 ns).
    fn run(self, seconds: u64) -> Model {
        self.run_measured(seconds, |_| None)
    }

    /// As [`Script::run`], each sample measuring the footprint `footprint(second)`.
    fn run_measured(mut self, seconds: u64, footprint: impl Fn(u64) -> Option<u64>) -> Model {
        self.ops.sort_by_key(|&(t, _)| t);
        self.model.track(1, 0);
        let mut ops = self.ops.into_iter().peekable();
        for t in 0..=seconds {
            while let Some((_, op)) = ops.next_if(|&(at, _)| at == t) {
                self.model.apply(&Event {
                    tgid: 1,
                    ts_ns: t * S,
                    start_ns: t * S,
                    op,
                    allocator: 0,
                });
            }
            self.model.sample(t * S + 1, &[(1, footprint(t))]);
        }
        self.model
    }
}

fn ctx(end: u64) -> Context {
    Context {
        end_ns: end,
        ..Context::default()
    }
}

fn assessed<'m>(m: &'m Model, c: &Context) -> ProcessAssessment<'m> {
    let p = m.process(1).expect("seen");
    assess(p, &singletons(p), c)
}

fn first_site(m: &Model, end: u64) -> SiteAssessment {
    assessed(m, &ctx(end)).sites.remove(0)
}

#[test]
fn steady_pile_up_is_a_leak_with_its_rate() {
    let mut s = Script::new();
    for t in 0..20 {
        s.block(0, 16, t, None);
    }
    let m = s.run(20);
    let a = first_site(&m, 20 * S);
    assert_eq!(a.verdict, SiteVerdict::Leak, "{a:?}");
    let g = a.growth.expect("fitted");
    assert!((g.bytes_per_s - 16.0).abs() < 1.0, "{g:?}");
    assert!(a.evidence.contains("never freed"), "{}", a.evidence);
    assert_eq!(
        assessed(&m, &ctx(20 * S)).verdict,
        Some(ProcessVerdict::Leak)
    );
}

#[test]
fn a_full_cache_that_replaces_entries_is_stable() {
    // 5 slots filled in the first 5 s, then each second one entry is replaced.
    let mut s = Script::new();
    for t in 0..5 {
        s.block(0, 16, t, Some(t + 5 + 5 * (t % 2)));
    }
    for t in 5..30 {
        s.block(0, 16, t, Some(t + 5));
    }
    let a = first_site(&s.run(30), 30 * S);
    assert_eq!(a.verdict, SiteVerdict::Stable, "{a:?}");
}

#[test]
fn start_up_allocations_never_freed_are_one_time() {
    let mut s = Script::new();
    s.block(0, 16, 0, None);
    let a = first_site(&s.run(20), 20 * S);
    assert_eq!(a.verdict, SiteVerdict::Stable);
    assert!(a.one_time, "{a:?}");
    assert!(a.evidence.starts_with("one-time"), "{}", a.evidence);
}

#[test]
fn everything_freed_is_temporary_with_lifetimes() {
    let mut s = Script::new();
    s.block(0, 16, 0, Some(2));
    s.block(0, 16, 5, Some(7));
    let a = first_site(&s.run(10), 10 * S);
    assert_eq!(a.verdict, SiteVerdict::Temporary);
    let p50 = a.lifetime_p50_s.expect("lifetimes recorded");
    assert!((1.8..=2.2).contains(&p50), "{p50}");
}

#[test]
fn one_young_allocation_is_never_a_leak() {
    let mut s = Script::new();
    s.block(0, 16, 19, None);
    assert_eq!(first_site(&s.run(20), 20 * S).verdict, SiteVerdict::Stable);
}

/// A cache of 20 slots filled from stack 0, then refilled one slot a second from stack 1:
/// stack 1 grows exactly as stack 0 shrinks.
fn turnover(s: &mut Script) {
    let fills: Vec<u64> = (0..20).map(|i| 1 + i).collect();
    for (i, &freed) in fills.iter().enumerate() {
        let _ = i;
        s.block(0, 64, 0, Some(freed));
        s.block(1, 64, freed, None);
    }
}

#[test]
fn a_site_taking_over_from_another_is_turnover_not_a_leak() {
    let mut s = Script::new();
    turnover(&mut s);
    let m = s.run(22);
    let a = assessed(&m, &ctx(22 * S));
    assert_eq!(a.verdict, Some(ProcessVerdict::Stable), "{}", a.evidence);
    let taker = &a.sites[1];
    assert_eq!(taker.verdict, SiteVerdict::Stable, "{taker:?}");
    assert_eq!(taker.taking_over_from, vec![0]);
    assert!(taker.evidence.contains("turnover"), "{}", taker.evidence);
}

#[test]
fn a_true_leak_beside_turnover_is_the_only_leak() {
    let mut s = Script::new();
    turnover(&mut s);
    for t in 0..22 {
        s.block(2, 48, t, None);
    }
    let m = s.run(22);
    let a = assessed(&m, &ctx(22 * S));
    assert_eq!(a.verdict, Some(ProcessVerdict::Leak), "{}", a.evidence);
    let verdicts: Vec<SiteVerdict> = a.sites.iter().map(|s| s.verdict).collect();
    assert_eq!(
        verdicts,
        // Sites in order of first allocation: the cache's first filler, the leak, the taker.
        vec![
            SiteVerdict::Temporary,
            SiteVerdict::Leak,
            SiteVerdict::Stable
        ]
    );
}

#[test]
fn growth_released_only_at_exit_is_a_leak_that_says_so() {
    let mut s = Script::new();
    for t in 0..20 {
        s.block(0, 1000, t, Some(20));
    }
    let m = s.run(20);
    let c = Context {
        end_ns: 20 * S + S / 10,
        exited: true,
        ..Context::default()
    };
    let a = assessed(&m, &c);
    assert_eq!(a.verdict, Some(ProcessVerdict::Leak), "{}", a.evidence);
    let t = a.teardown.expect("a teardown");
    assert_eq!(t.live_before, 20 * 1000);
    assert!(a.sites[0].released_at_exit, "{:?}", a.sites[0]);
    assert_eq!(a.sites[0].pre_teardown_live_bytes, Some(20 * 1000));
    assert!(
        a.evidence.contains("released only at exit"),
        "{}",
        a.evidence
    );
    // Not exited (the trace stopped): everything freed is just temporary.
    let a = assessed(&m, &ctx(20 * S + S / 10));
    assert_eq!(a.verdict, Some(ProcessVerdict::Stable), "{}", a.evidence);
}

#[test]
fn a_buffer_grown_by_realloc_in_steps_is_a_leak() {
    let mut s = Script::new();
    let mut block = s.block(0, 1024, 0, None);
    for (k, t) in [4, 8, 12, 16, 19].into_iter().enumerate() {
        block = s.realloc(0, t, block, 1024 * (k as u64 + 2));
    }
    let m = s.run(20);
    let a = first_site(&m, 20 * S);
    assert_eq!(a.verdict, SiteVerdict::Leak, "{a:?}");
    assert_eq!(a.growth_steps, Some(5));
    assert!(a.evidence.contains("never freed"), "{}", a.evidence);
}

#[test]
fn a_buffer_doubled_once_beside_a_leak_is_part_of_it() {
    let mut s = Script::new();
    let buffer = s.block(0, 1 << 20, 0, None);
    s.realloc(0, 15, buffer, 2 << 20);
    for t in 0..20 {
        s.block(1, 4096, t, None);
    }
    let m = s.run(20);
    let a = assessed(&m, &ctx(20 * S));
    assert_eq!(a.verdict, Some(ProcessVerdict::Leak), "{}", a.evidence);
    assert_eq!(a.sites[0].verdict, SiteVerdict::Leak, "{:?}", a.sites[0]);
    assert!(a.evidence.contains("2 sites"), "{}", a.evidence);
}

#[test]
fn retained_memory_with_flat_live_bytes_is_fragmentation() {
    let mut s = Script::new();
    s.block(0, 16, 0, None);
    let m = s.run(10);
    let with = |footprint| Context {
        footprint_bytes: Some(footprint),
        ..ctx(10 * S)
    };
    let a = assessed(&m, &with(200 << 20));
    assert_eq!(
        a.verdict,
        Some(ProcessVerdict::Fragmentation),
        "{}",
        a.evidence
    );
    assert!(a.evidence.contains("Hint"), "{}", a.evidence);
    let a = assessed(&m, &with(1 << 20));
    assert_eq!(a.verdict, Some(ProcessVerdict::Stable));
}

#[test]
fn after_an_attach_unseen_heap_is_not_called_retained() {
    let mut s = Script::new();
    s.block(0, 16, 0, None);
    let m = s.run(10);
    let attached = Context {
        footprint_bytes: Some(200 << 20),
        attached: true,
        ..ctx(10 * S)
    };
    let a = assessed(&m, &attached);
    assert_eq!(a.verdict, Some(ProcessVerdict::Stable), "{}", a.evidence);
    assert!(
        a.evidence
            .contains("predates the attach: live or free, unknown"),
        "{}",
        a.evidence
    );
    assert_eq!(a.pre_attach_bytes, Some((200 << 20) - 16));
    // The allocator's own accounting shows the memory free: that is fragmentation.
    let known = Context {
        allocator_free: Some(AllocatorFree {
            bytes: 150 << 20,
            source: "glibc's arenas".into(),
        }),
        ..attached
    };
    let a = assessed(&m, &known);
    assert_eq!(
        a.verdict,
        Some(ProcessVerdict::Fragmentation),
        "{}",
        a.evidence
    );
    assert_eq!(a.retained_bytes, Some(150 << 20));
}

#[test]
fn a_withheld_verdict_says_why() {
    let m = Script::new().run(5);
    let c = Context {
        withheld: Some("no allocator".into()),
        ..ctx(5 * S)
    };
    let a = assessed(&m, &c);
    assert_eq!(a.verdict, None);
    assert_eq!(a.evidence, "no allocator");
}

#[test]
fn a_quiet_process_is_reported_stable_with_no_activity() {
    let m = Script::new().run(5);
    let c = Context {
        footprint_bytes: Some(4 << 20),
        attached: true,
        ..ctx(5 * S)
    };
    let a = assessed(&m, &c);
    assert_eq!(a.verdict, Some(ProcessVerdict::Stable));
    assert!(
        a.evidence.starts_with("no allocation activity seen"),
        "{}",
        a.evidence
    );
}

/// One call site copied by the compiler into two stacks: a steady pile-up's first 12 s come
/// from one, the rest from the other. Neither alone is a leak (one stopped growing, the other
/// has no old allocations); judged as the one site they are, it is.
#[test]
fn a_site_made_of_several_stacks_is_judged_as_one() {
    let mut s = Script::new();
    for t in 0..20 {
        s.block(if t < 12 { 0 } else { 1 }, 16, t, None);
    }
    let m = s.run(20);
    let p = m.process(1).expect("seen");
    let apart = assess(p, &singletons(p), &ctx(20 * S));
    assert!(
        apart.sites.iter().all(|a| a.verdict != SiteVerdict::Leak),
        "{:?}",
        apart.sites
    );
    let together = assess(p, &[vec![0, 1]], &ctx(20 * S));
    assert_eq!(together.merged[0].live_allocations, 20);
    assert_eq!(together.merged[0].live_bytes, 320);
    let a = &together.sites[0];
    assert_eq!(a.verdict, SiteVerdict::Leak, "{a:?}");
    assert!((a.growth.as_ref().expect("fitted").bytes_per_s - 16.0).abs() < 1.0);
}

/// Live bytes above the footprint are doubtful only when both were seen at the same moment:
/// a block allocated after the last footprint measurement is no contradiction.
#[test]
fn live_above_the_footprint_is_judged_at_the_same_sample() {
    let footprint = Context {
        footprint_bytes: Some(1 << 20),
        ..ctx(6 * S)
    };
    let mut s = Script::new();
    s.block(0, 8 << 20, 5, None);
    let measured_early = s.run_measured(6, |t| (t <= 2).then_some(1 << 20));
    assert!(assessed(&measured_early, &footprint).notes.is_empty());
    let mut s = Script::new();
    s.block(0, 8 << 20, 0, None);
    let measured_after = s.run_measured(6, |t| (t <= 2).then_some(1 << 20));
    let notes = assessed(&measured_after, &footprint).notes;
    assert!(
        notes[0].contains("exceed the footprint (1.00 MiB)"),
        "{notes:?}"
    );
}

#[test]
fn a_window_too_short_for_a_late_slope_is_judged_by_its_newest_blocks() {
    // Four samples in 3.5 s, one of them in the last third: no slope to measure there.
    // Still allocating in the last quarter: a leak, as its fit says.
    let mut s = Script::new();
    for t in 0..4 {
        s.block(0, 64 << 10, t, None);
    }
    let a = first_site(&s.run(3), 3 * S + S / 2);
    assert_eq!(a.verdict, SiteVerdict::Leak, "{a:?}");
    // Its last block made in the first third: it stopped growing.
    let mut s = Script::new();
    for t in 0..2 {
        s.block(0, 64 << 10, t, None);
    }
    let a = first_site(&s.run(3), 3 * S + S / 2);
    assert_eq!(a.verdict, SiteVerdict::Stable, "{a:?}");
}
