//! `system`'s report: one row per process seen on the host, the worst first, and what tracing
//! cost each (its traps, and the CPU they took at the trap cost measured at start-up). Rows
//! are judged on each process's own stacks, unsymbolized but for the site that makes the
//! verdict: a host has hundreds of processes, and only the worst are shown in full.

use serde::Serialize;

use super::{ProcessFacts, context, main_allocator, split_site};
use crate::{
    analysis::{self, ProcessVerdict, SiteVerdict},
    model::{Process, StackTable, Tgid},
    symbolize::Symbolizer,
};

/// What `system` adds to the report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SystemReport {
    /// Every process traced, current and exited, the worst first.
    pub rows: Vec<ProcessRow>,
    /// Processes that exited during the trace (their rows are kept, up to a bound).
    pub exited: u64,
    /// Rows of exited processes not kept (past the bound, the least interesting first).
    pub rows_dropped: u64,
    /// What one probe hit costs, measured at start-up on the collector's own calls (a hit
    /// that is filtered out: the trap and the filter; a traced hit costs more, see the
    /// README's host-wide cost).
    pub trap_ns: f64,
    /// Probe hits in processes the filters left out, and their estimated CPU.
    pub untraced_traps: u64,
    pub untraced_trap_cpu_s: f64,
}

/// One process on the host.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessRow {
    pub pid: Tgid,
    /// Which program image of the process (an `exec` starts the next).
    pub image: u32,
    /// This image ended with an `exec` (the process went on as another program).
    pub replaced_by_exec: bool,
    pub comm: String,
    pub exe: String,
    /// Its cgroup (v2 path), and the container id in it when it names one.
    pub cgroup: Option<String>,
    pub container: Option<String>,
    pub allocator: String,
    pub live_bytes: u64,
    pub footprint_bytes: Option<u64>,
    /// How fast its leaking sites grow, together (bytes per second); null when none leaks.
    pub growth_bytes_per_s: Option<f64>,
    pub verdict: Option<ProcessVerdict>,
    pub evidence: String,
    /// The program's innermost function in its worst site.
    pub worst_site: Option<String>,
    /// Probe hits it took (each a trap into the kernel), per second of its trace, and the
    /// CPU they are estimated to have cost it.
    pub traps: u64,
    pub traps_per_s: f64,
    pub trap_cpu_s: f64,
    pub exited: bool,
    /// When it ended, in seconds since the trace began (see `ProcessReport::ended_at_s`).
    pub ended_at_s: Option<f64>,
}

/// The row of process image `p`.
pub fn row(
    p: &Process,
    facts: &ProcessFacts,
    stacks: &StackTable,
    symbolizer: &Symbolizer,
    (start_ns, end_ns, trap_ns): (u64, u64, f64),
) -> ProcessRow {
    let groups = analysis::singletons(p);
    let assessment = analysis::assess(p, &groups, &context(p, facts, end_ns));
    let leaks = || {
        assessment
            .sites
            .iter()
            .zip(&assessment.merged)
            .filter(|(a, _)| a.verdict == SiteVerdict::Leak)
    };
    let growth: f64 = leaks()
        .filter_map(|(a, _)| a.growth.as_ref())
        .map(|g| g.bytes_per_s)
        .sum();
    let worst = leaks()
        .map(|(_, s)| s)
        .chain(assessment.merged.iter())
        .max_by_key(|s| s.live_bytes)
        .filter(|s| s.live_bytes > 0);
    let worst_site = worst.and_then(|s| {
        let frames = stacks.frames(s.stack);
        let symbolized = symbolizer.stacks(&facts.maps, &[frames]);
        let split = split_site(&symbolized.first()?.to_vec(), &symbolizer.types);
        split.frames.first().map(|f| f.function.clone())
    });
    let end = facts.end_ns.unwrap_or(end_ns).max(p.first_ns);
    let span_s = (end - p.first_ns) as f64 / 1e9;
    let cgroup = facts.cgroup.clone();
    ProcessRow {
        pid: p.tgid,
        image: p.image,
        replaced_by_exec: p.replaced_by_exec,
        comm: facts.comm.clone().unwrap_or_default(),
        exe: facts
            .exe
            .as_ref()
            .map(|e| e.display().to_string())
            .unwrap_or_default(),
        container: cgroup.as_deref().and_then(container_id),
        cgroup,
        allocator: main_allocator(p, facts),
        live_bytes: p.live_bytes,
        footprint_bytes: facts.footprint_bytes,
        growth_bytes_per_s: (growth > 0.0).then_some(growth),
        verdict: assessment.verdict,
        evidence: assessment.evidence,
        worst_site,
        traps: facts.traps,
        traps_per_s: if span_s > 0.0 {
            facts.traps as f64 / span_s
        } else {
            0.0
        },
        trap_cpu_s: facts.traps as f64 * trap_ns / 1e9,
        exited: facts.exited || p.replaced_by_exec,
        ended_at_s: super::ended_at_s(p, facts, start_ns),
    }
}

/// The worst first: leaks, then fragmentation, then the rest, each by how fast it grows and
/// then by live bytes.
pub fn order(rows: &mut [ProcessRow]) {
    rows.sort_by(worse_first);
}

/// `Less` when `a` is the worse of the two (see [`order`]).
pub fn worse_first(a: &ProcessRow, b: &ProcessRow) -> std::cmp::Ordering {
    let rank = |v: Option<ProcessVerdict>| match v {
        Some(ProcessVerdict::Leak) => 0,
        Some(ProcessVerdict::Fragmentation) => 1,
        Some(ProcessVerdict::Stable) => 2,
        None => 3,
    };
    rank(a.verdict)
        .cmp(&rank(b.verdict))
        .then(
            b.growth_bytes_per_s
                .unwrap_or(0.0)
                .total_cmp(&a.growth_bytes_per_s.unwrap_or(0.0)),
        )
        .then(b.live_bytes.cmp(&a.live_bytes))
        .then(a.pid.cmp(&b.pid))
}

/// A container id in a cgroup path (docker, containerd, CRI-O, podman name theirs by a
/// 64-hex-digit id): its first 12 digits, as `docker ps` shows it.
pub fn container_id(cgroup: &str) -> Option<String> {
    cgroup
        .split(|c: char| !c.is_ascii_hexdigit())
        .find(|part| part.len() == 64)
        .map(|id| id[..12].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_are_found_in_the_usual_cgroup_names() {
        let id = "4b0b6e3d2c1a9f8e7d6c5b4a39281706f5e4d3c2b1a0f9e8d7c6b5a493827160";
        for path in [
            format!("/system.slice/docker-{id}.scope"),
            format!("/kubepods.slice/kubepods-pod1.slice/cri-containerd-{id}.scope"),
            format!("/docker/{id}"),
            format!("/machine.slice/libpod-{id}.scope/container"),
        ] {
            assert_eq!(container_id(&path).as_deref(), Some(&id[..12]), "{path}");
        }
        assert_eq!(
            container_id("/user.slice/user-0.slice/session-3.scope"),
            None
        );
    }
}
