use super::*;
use crate::model::{Event, Op, StackId};

const S: u64 = 1_000_000_000;

/// Applies allocations of 16 B at the given seconds (freed at the optional second), sampling
/// every second, and returns the model.
fn model_with(lives: &[(u64, Option<u64>)], seconds: u64) -> Model {
    let mut m = Model::default();
    for t in 0..=seconds {
        for (i, &(born, freed)) in lives.iter().enumerate() {
            let addr = 0x1000 + i as u64 * 16;
            if born == t {
                m.apply(&Event {
                    tgid: 1,
                    ts_ns: t * S,
                    start_ns: t * S,
                    op: Op::Alloc {
                        addr,
                        size: 16,
                        stack: StackId(0),
                        sampled: false,
                    },
                });
            }
            if freed == Some(t) {
                m.apply(&Event {
                    tgid: 1,
                    ts_ns: t * S,
                    start_ns: t * S,
                    op: Op::Free { addr },
                });
            }
        }
        m.sample(t * S + 1, &[(1, None)]);
    }
    m
}

fn verdict(m: &Model, end: u64) -> SiteAssessment {
    let p = m.process(1).expect("seen");
    assess_sites(m, p, window_of(p, end)).remove(0)
}

#[test]
fn steady_pile_up_is_a_leak_with_its_rate() {
    let lives: Vec<(u64, Option<u64>)> = (0..20).map(|t| (t, None)).collect();
    let m = model_with(&lives, 20);
    let a = verdict(&m, 20 * S);
    assert_eq!(a.verdict, SiteVerdict::Leak, "{a:?}");
    let g = a.growth.expect("fitted");
    assert!((g.bytes_per_s - 16.0).abs() < 1.0, "{g:?}");
    assert!(a.evidence.contains("never freed"), "{}", a.evidence);
}

#[test]
fn a_full_cache_that_replaces_entries_is_stable() {
    // 5 slots filled in the first 5 s, then each second one entry is replaced.
    let mut lives: Vec<(u64, Option<u64>)> =
        (0..5).map(|t| (t, Some(t + 5 + 5 * (t % 2)))).collect();
    for t in 5..30 {
        lives.push((t, Some(t + 5)));
    }
    let m = model_with(&lives, 30);
    let a = verdict(&m, 30 * S);
    assert_eq!(a.verdict, SiteVerdict::Stable, "{a:?}");
}

#[test]
fn start_up_allocations_never_freed_are_one_time() {
    let m = model_with(&[(0, None)], 20);
    let a = verdict(&m, 20 * S);
    assert_eq!(a.verdict, SiteVerdict::Stable);
    assert!(a.one_time, "{a:?}");
    assert!(a.evidence.starts_with("one-time"), "{}", a.evidence);
}

#[test]
fn everything_freed_is_temporary_with_lifetimes() {
    let m = model_with(&[(0, Some(2)), (5, Some(7))], 10);
    let a = verdict(&m, 10 * S);
    assert_eq!(a.verdict, SiteVerdict::Temporary);
    let p50 = a.lifetime_p50_s.expect("lifetimes recorded");
    assert!((1.8..=2.2).contains(&p50), "{p50}");
}

#[test]
fn one_young_allocation_is_never_a_leak() {
    let m = model_with(&[(19, None)], 20);
    assert_eq!(verdict(&m, 20 * S).verdict, SiteVerdict::Stable);
}

#[test]
fn retained_memory_with_flat_live_bytes_is_fragmentation() {
    let m = model_with(&[(0, None)], 10);
    let p = m.process(1).expect("seen");
    let w = window_of(p, 10 * S);
    let sites = assess_sites(&m, p, w);
    let live: Vec<u64> = p.sites.iter().map(|s| s.live_bytes).collect();
    let (v, evidence) = assess_process(p, &live, &sites, Some(200 << 20), w);
    assert_eq!(v, ProcessVerdict::Fragmentation, "{evidence}");
    assert!(evidence.contains("Hint"), "{evidence}");
    let (v, _) = assess_process(p, &live, &sites, Some(1 << 20), w);
    assert_eq!(v, ProcessVerdict::Stable);
}

/// One call site copied by the compiler into two stacks: a steady pile-up's first 12 s come
/// from one, the rest from the other. Neither alone is a leak (one stopped growing, the other
/// has no old allocations); judged as the one site they are, it is.
#[test]
fn a_site_made_of_several_stacks_is_judged_as_one() {
    let mut m = Model::default();
    for t in 0..=20u64 {
        if t < 20 {
            m.apply(&Event {
                tgid: 1,
                ts_ns: t * S,
                start_ns: t * S,
                op: Op::Alloc {
                    addr: 0x1000 + t * 16,
                    size: 16,
                    stack: StackId(if t < 12 { 0 } else { 1 }),
                    sampled: false,
                },
            });
        }
        m.sample(t * S + 1, &[(1, None)]);
    }
    let p = m.process(1).expect("seen");
    let w = window_of(p, 20 * S);
    let apart = assess_sites(&m, p, w);
    assert!(
        apart.iter().all(|a| a.verdict != SiteVerdict::Leak),
        "{apart:?}"
    );
    let together = assess_groups(&m, p, &[vec![0, 1]], w);
    let (site, a) = &together[0];
    assert_eq!(site.live_allocations, 20);
    assert_eq!(site.live_bytes, 320);
    assert_eq!(a.verdict, SiteVerdict::Leak, "{a:?}");
    assert!((a.growth.as_ref().expect("fitted").bytes_per_s - 16.0).abs() < 1.0);
}
