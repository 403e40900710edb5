//! Acting on processes coming and going, as soon as the kernel reports it: a traced
//! process's fork gets the child its own probes (the kernel traces it from its first
//! instruction already), an `exec` or a new code mapping is discovered again (new program,
//! new allocators, maybe another stack mode), an exit closes the process's probes.

use rustc_hash::FxHashSet;

use super::{state::State, tracer::Tracer};
use crate::{
    model::{Event, Op, Tgid},
    procfs,
    report::ProcessFacts,
    targets::ProcessPlan,
};

/// Acts on the lifecycle events and code mappings read since the last drain.
pub fn act(state: &mut State, tracer: &mut Tracer, notices: Vec<Event>) -> Vec<String> {
    let mut warnings = Vec::new();
    let mut rediscover: Vec<Tgid> = Vec::new();
    let mut execs: FxHashSet<Tgid> = FxHashSet::default();
    for event in notices {
        let pid = event.tgid;
        match event.op {
            Op::Fork { child, traced } => {
                if traced && let Err(e) = fork(state, tracer, (pid, child), event.ts_ns) {
                    if procfs::is_gone(child) {
                        ended_before_probes(state, child);
                    } else {
                        warnings.push(format!("pid {child} (forked by {pid}): {e}"));
                    }
                }
            }
            Op::Exec { .. } => {
                execs.insert(pid);
                rediscover.push(pid);
            }
            Op::Map { .. } => rediscover.push(pid),
            Op::Exit { .. } => tracer.end(pid, event.ts_ns),
            _ => {}
        }
    }
    rediscover.sort_unstable();
    rediscover.dedup();
    for pid in rediscover {
        // Gone already: what it did is still in the rings.
        if let Ok(plan) = tracer.discovery.process(pid) {
            if let Err(e) = tracer.refresh(&plan) {
                warnings.push(format!("pid {pid}: {e}"));
            }
            // A program whose `exec` is not read yet (it came through another ring) is
            // recorded when it is: its facts are not the current image's.
            let facts = state.facts_mut(pid);
            let other_program = matches!((&plan.exe, &facts.exe), (Some(a), Some(b)) if a != b);
            if execs.contains(&pid) || !other_program {
                record_plan(facts, &plan, execs.contains(&pid));
            }
        }
        // Gone by the time it was looked at: what was read of it may be nothing or part of
        // it, so finding no allocator proves nothing (unknown, not none).
        let facts = state.facts_mut(pid);
        if facts.allocators.is_empty() && procfs::is_gone(pid) {
            facts.gone_before_discovery = true;
            if !facts.ended_before_probes {
                facts.no_allocator = Some(
                    "it was gone before alloctrace could read its program and mappings: which \
                     allocator it used is unknown"
                        .into(),
                );
            }
        }
    }
    warnings
}

/// A traced process forked `child`, which the kernel traces from its first instruction (its
/// facts were started when the fork was read): it gets the parent's probes.
fn fork(
    state: &mut State,
    tracer: &mut Tracer,
    (parent, child): (Tgid, Tgid),
    forked_ns: u64,
) -> crate::error::Result<()> {
    let placed = tracer.follow(parent, child, forked_ns)?;
    let facts = state.facts_mut(child);
    if let Some(at) = placed {
        facts.probes_after_ns = Some(at.saturating_sub(forked_ns));
        facts.probes_placed_ns = Some(at);
    }
    state.observe(child);
    Ok(())
}

/// A forked child that ended before its probes could be attached: listed, without a verdict
/// (nothing it allocated was seen), and counted for one warning.
fn ended_before_probes(state: &mut State, child: Tgid) {
    let facts = state.facts_mut(child);
    facts.ended_before_probes = true;
    facts.allocators.clear();
    facts.no_allocator = Some(
        "it ended before its probes were in place, within milliseconds of its fork: nothing \
         it allocated was seen"
            .into(),
    );
    state.ended_before_probes += 1;
}

/// Starts following a process that was running before tracing began (`attach`, `system`'s
/// start): its facts say so, and what discovery found.
pub fn track_attached(state: &mut State, plan: &ProcessPlan, now_ns: u64) {
    let mut facts = ProcessFacts {
        attached: true,
        ..ProcessFacts::default()
    };
    record_plan(&mut facts, plan, true);
    state.track(plan.pid, facts, now_ns);
    state.observe(plan.pid);
}

/// What discovery found, in a process image's facts.
pub fn record_plan(facts: &mut ProcessFacts, plan: &ProcessPlan, new_program: bool) {
    facts.gone_before_discovery = false;
    let mut labels: Vec<String> = plan.allocators.iter().map(|a| a.found.label()).collect();
    labels.dedup();
    for label in labels {
        if !facts.allocators.contains(&label) {
            facts.allocators.push(label);
        }
    }
    for module in plan.allocator_modules() {
        if !facts.allocator_modules.contains(&module) {
            facts.allocator_modules.push(module);
        }
    }
    facts.no_allocator = if facts.allocators.is_empty() {
        plan.none_reason()
    } else {
        None
    };
    // A process gone before its executable was read (a command that ran for milliseconds)
    // keeps the decision its plan made from the program's file: the default taken for an
    // unreadable file would hide a warning that decision carries.
    let keep = facts.stack_mode.is_some() && plan.stack_mode.guessed;
    if (new_program && !keep) || facts.stack_mode.is_none() {
        facts.stack_mode = Some(plan.stack_mode.clone());
    }
}
