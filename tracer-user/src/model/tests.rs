use super::*;

const P: Tgid = 100;
const S1: StackId = StackId(1);
const S2: StackId = StackId(2);

struct Script {
    model: Model,
    now: u64,
}

impl Script {
    fn new() -> Self {
        Self {
            model: Model::default(),
            now: 1_000,
        }
    }

    fn at(&mut self, op: Op) -> &mut Self {
        self.now += 10;
        let ev = Event {
            tgid: P,
            ts_ns: self.now,
            start_ns: self.now - 5,
            op,
            allocator: 0,
        };
        self.model.apply(&ev);
        self
    }

    fn alloc(&mut self, addr: u64, size: u64, stack: StackId) -> &mut Self {
        self.at(Op::Alloc {
            addr,
            size,
            stack,
            recording: Recording::Every,
        })
    }

    fn free(&mut self, addr: u64) -> &mut Self {
        self.at(Op::Free { addr })
    }

    fn realloc(&mut self, old: u64, new: u64, size: u64) -> &mut Self {
        self.at(Op::Realloc {
            old,
            new,
            size,
            stack: S2,
            recording: Recording::Every,
        })
    }

    fn proc(&self) -> &Process {
        self.model.process(P).expect("process seen")
    }
}

#[test]
fn alloc_and_free_balance() {
    let mut s = Script::new();
    s.alloc(0x10, 64, S1).alloc(0x20, 32, S1).free(0x10);
    let p = s.proc();
    assert_eq!((p.live_bytes, p.live_allocations), (32, 1));
    assert_eq!((p.total_allocations, p.total_bytes, p.frees), (2, 96, 1));
    assert_eq!(p.peak_live_bytes, 96);
    assert_eq!(p.sites.len(), 1);
    assert_eq!(p.sites[0].live_bytes, 32);
}

#[test]
fn free_of_unknown_block_is_ignored() {
    let mut s = Script::new();
    s.free(0x99).alloc(0x10, 8, S1).free(0x98);
    let p = s.proc();
    assert_eq!((p.live_bytes, p.frees, p.unknown_frees), (8, 0, 2));
}

#[test]
fn realloc_null_allocates() {
    let mut s = Script::new();
    s.realloc(0, 0x40, 100);
    let p = s.proc();
    assert_eq!(
        (p.live_bytes, p.total_allocations, p.total_bytes),
        (100, 1, 100)
    );
    assert_eq!(p.sites[0].stack, S2);
}

#[test]
fn realloc_to_zero_frees() {
    let mut s = Script::new();
    s.alloc(0x10, 64, S1).realloc(0x10, 0, 0);
    let p = s.proc();
    assert_eq!((p.live_bytes, p.live_allocations, p.frees), (0, 0, 1));
    assert_eq!(
        p.total_allocations, 1,
        "realloc(p, 0) is a free, not an allocation"
    );
}

#[test]
fn realloc_in_place_and_moved() {
    let mut s = Script::new();
    s.alloc(0x10, 64, S1)
        .realloc(0x10, 0x10, 128) // grown in place
        .realloc(0x10, 0x80, 16); // shrunk and moved
    let p = s.proc();
    assert_eq!((p.live_bytes, p.live_allocations), (16, 1));
    assert_eq!((p.total_allocations, p.total_bytes), (3, 64 + 128 + 16));
    assert_eq!(p.frees, 2);
    let live: Vec<u64> = s.model.live_blocks(P).map(|(a, _)| a).collect();
    assert_eq!(live, vec![0x80]);
}

#[test]
fn realloc_of_unknown_block_counts_the_new_one_only() {
    let mut s = Script::new();
    s.realloc(0x10, 0x20, 50);
    let p = s.proc();
    assert_eq!((p.live_bytes, p.unknown_reallocs, p.frees), (50, 1, 0));
}

#[test]
fn realloc_does_not_free_a_block_born_after_it_began() {
    let mut m = Model::default();
    let ev = |ts, start, op| Event {
        tgid: P,
        ts_ns: ts,
        start_ns: start,
        op,
        allocator: 0,
    };
    m.apply(&ev(
        100,
        90,
        Op::Alloc {
            addr: 0x10,
            size: 8,
            stack: S1,
            recording: Recording::Every,
        },
    ));
    // Thread A enters realloc(0x10) at 200; glibc moves the block and frees 0x10; thread B
    // gets 0x10 from malloc at 210, and its event is written before A's.
    m.apply(&ev(
        210,
        205,
        Op::Alloc {
            addr: 0x10,
            size: 24,
            stack: S2,
            recording: Recording::Every,
        },
    ));
    m.apply(&ev(
        220,
        200,
        Op::Realloc {
            old: 0x10,
            new: 0x30,
            size: 16,
            stack: S1,
            recording: Recording::Every,
        },
    ));
    let p = m.process(P).expect("seen");
    // The first block was retired when B's allocation replaced it; B's block stays live, and
    // A's realloc, begun before B's malloc, explains the replacement: nothing was lost.
    let at_10: Vec<u64> = m
        .live_blocks(P)
        .filter(|(a, _)| *a == 0x10)
        .map(|(_, b)| b.size())
        .collect();
    assert_eq!(at_10, vec![24]);
    assert_eq!(p.live_bytes, 24 + 16);
    assert_eq!(p.replaced_live(), 0);
}

#[test]
fn processes_are_kept_apart() {
    let mut m = Model::default();
    for (tgid, size) in [(1, 10), (2, 20)] {
        m.apply(&Event {
            tgid,
            ts_ns: 1,
            start_ns: 1,
            op: Op::Alloc {
                addr: 0x10,
                size,
                stack: S1,
                recording: Recording::Every,
            },
            allocator: 0,
        });
    }
    m.apply(&Event {
        tgid: 1,
        ts_ns: 2,
        start_ns: 2,
        op: Op::Free { addr: 0x10 },
        allocator: 0,
    });
    assert_eq!(m.process(1).map(|p| p.live_bytes), Some(0));
    assert_eq!(m.process(2).map(|p| p.live_bytes), Some(20));
    assert_eq!(m.outstanding(), 1);
}

#[test]
fn blocks_pack_size_and_site() {
    let b = Block::new(123_456, 7, 4242, true);
    assert_eq!(
        (b.size(), b.site(), b.born_ns, b.sampled()),
        (123_456, 4242, 7, true)
    );
    assert!(!Block::new(1, 0, 1, false).sampled());
    assert_eq!(
        Block::new(u64::MAX, 0, 1, false).size(),
        (1 << 40) - 1,
        "sizes saturate"
    );
}

#[test]
fn sampled_weights_are_unbiased_inverses() {
    // Exact: 1:1.
    assert_eq!(Weight::sampled(100, 0), Weight::exact(100));
    // A block of the mean size is sampled with p = 1 - 1/e.
    let w = Weight::sampled(1000, 1000);
    let p = 1.0 - (-1.0f64).exp();
    assert!((w.count - 1.0 / p).abs() < 1e-9);
    assert_eq!(w.bytes, (1000.0 / p).round() as u64);
    // Tiny blocks stand for about mean/size of them, huge ones for themselves.
    assert!((Weight::sampled(8, 1 << 20).count - (1 << 20) as f64 / 8.0).abs() < 1.0);
    assert!((Weight::sampled(1 << 30, 1 << 10).count - 1.0).abs() < 1e-9);
}

#[test]
fn sampled_blocks_are_weighed_and_unweighed_alike() {
    let mut m = Model::with_sampling(4096);
    let ev = |ts, op| Event {
        tgid: P,
        ts_ns: ts,
        start_ns: ts,
        op,
        allocator: 0,
    };
    m.apply(&ev(
        1,
        Op::Alloc {
            addr: 0x10,
            size: 64,
            stack: S1,
            recording: Recording::Sampled,
        },
    ));
    m.apply(&ev(
        2,
        Op::Alloc {
            addr: 0x20,
            size: 64,
            stack: S1,
            recording: Recording::Sampled,
        },
    ));
    let w = Weight::sampled(64, 4096);
    let p = m.process(P).expect("seen");
    assert_eq!(p.live_bytes, 2 * w.bytes);
    assert!((p.est.live - 2.0 * w.count).abs() < 1e-9);
    m.apply(&ev(3, Op::Free { addr: 0x10 }));
    m.apply(&ev(
        4,
        Op::Realloc {
            old: 0x20,
            new: 0,
            size: 0,
            stack: S1,
            recording: Recording::Every,
        },
    ));
    let p = m.process(P).expect("seen");
    assert_eq!((p.live_bytes, p.live_allocations), (0, 0));
    assert!(
        p.est.live.abs() < 1e-9,
        "no phantom live memory: {}",
        p.est.live
    );
    assert!((p.est.frees - 2.0 * w.count).abs() < 1e-9);
}

/// A block predicted from the thread cache landing on an address still live contradicts a
/// prediction (the one that made the live block, or this one): counted, so the session can
/// switch prediction off. An ordinary reuse after a free is no contradiction.
#[test]
fn a_predicted_block_on_a_live_address_is_a_contradiction() {
    let predicted = |addr| Op::Alloc {
        addr,
        size: 64,
        stack: S1,
        recording: Recording::Predicted,
    };
    let mut s = Script::new();
    s.at(predicted(0x10)).free(0x10).at(predicted(0x10));
    assert_eq!(s.model.predictions_contradicted(), 0);
    // A handler's malloc took the block the interrupted one predicted: the same address twice.
    s.at(predicted(0x10));
    assert_eq!(s.model.predictions_contradicted(), 1);
    // The live block was predicted, the new one recorded from its return: still one.
    s.alloc(0x10, 64, S2);
    assert_eq!(s.model.predictions_contradicted(), 2);
    // Neither predicted: a lost free, not a contradiction.
    s.alloc(0x20, 8, S1).alloc(0x20, 8, S1);
    assert_eq!(s.model.predictions_contradicted(), 2);
    assert_eq!(s.proc().replaced_live(), 3);
}

/// A process forks a child that exits; its next child gets the same pid. Two processes, kept
/// apart: the first as it ended (its block still live, its end time kept), the second from
/// nothing, as the pid's next image. Then the same pid is reused once more, by a process
/// `system` admits at its `exec`.
#[test]
fn a_reused_pid_is_another_process() {
    const CHILD: Tgid = 200;
    let mut m = Model::default();
    let mut ts = 0;
    let mut at = |m: &mut Model, tgid: Tgid, op: Op| {
        ts += 10;
        m.apply(&Event {
            tgid,
            ts_ns: ts,
            start_ns: ts,
            op,
            allocator: 0,
        });
    };
    let alloc = |addr, size| Op::Alloc {
        addr,
        size,
        stack: S1,
        recording: Recording::Every,
    };
    let fork = Op::Fork {
        child: CHILD,
        traced: true,
    };
    at(&mut m, P, fork);
    at(&mut m, CHILD, alloc(0x10, 64));
    at(&mut m, CHILD, Op::Exit { traps: 0 });
    at(&mut m, P, fork);
    at(&mut m, CHILD, alloc(0x10, 96));
    at(&mut m, CHILD, Op::Free { addr: 0x10 });
    at(&mut m, CHILD, alloc(0x20, 32));
    at(&mut m, CHILD, Op::Exit { traps: 0 });
    at(&mut m, CHILD, Op::Exec { layout: None });
    at(&mut m, CHILD, alloc(0x30, 8));
    let mut images: Vec<(u32, u64, u64, bool)> = m
        .processes()
        .filter(|p| p.tgid == CHILD)
        .map(|p| (p.image, p.live_bytes, p.total_bytes, p.ended_ns.is_some()))
        .collect();
    images.sort_unstable();
    assert_eq!(
        images,
        [(0, 64, 64, true), (1, 32, 128, true), (2, 8, 8, false)]
    );
    assert!(m.processes().all(|p| !p.replaced_by_exec));
    // `system` releases the first two once their rows are taken; the third stays.
    assert!(m.forget(CHILD, 1, true).is_none());
    assert_eq!(m.process(CHILD).map(|p| p.image), Some(2));
    assert_eq!(m.processes().filter(|p| p.tgid == CHILD).count(), 1);
}
