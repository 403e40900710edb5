//! The host-wide tax of `alloctrace system`: uprobes on a shared libc trap in every process
//! that maps it, so a bystander that alloctrace was never asked about pays too. Measured
//! side by side in one run: the bystander's malloc/free loop with no tracer, under `system`
//! sampled (its default), under `system --exact`, and under a `system` whose filter leaves
//! the bystander out (it still traps, once per call, and the kernel stops there). Then the
//! agent's: `alloctrace agent` only watching (the bystander among the processes it reads
//! from `/proc`), and `alloctrace agent` tracing another process that leaks (its probes are
//! scoped to that pid: the bystander should pay nothing either way).

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
};

use crate::exec;

/// Runs per cell; the modes take turns within each round.
const REPEATS: usize = 5;

/// The bystander: one thread of malloc/free pairs, started after `system` is tracing.
pub(crate) const BYSTANDER: &[&str] = &["tight", "1", "1000000"];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Untraced,
    Sampled,
    Exact,
    /// `system --comm sleep` while a `sleep` runs: the C library is probed for everyone (the
    /// `sleep` maps it), and the bystander is filtered out in the kernel.
    FilteredOut,
    /// `alloctrace agent` watching every process, the bystander among them; nothing grows.
    AgentWatching,
    /// `alloctrace agent` in a window on a leaking `host_leak`, the bystander watched.
    AgentTracing,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Untraced => "no tracer",
            Mode::Sampled => "system (sampled 512K)",
            Mode::Exact => "system --exact",
            Mode::FilteredOut => "system, filtered out",
            Mode::AgentWatching => "agent, watching",
            Mode::AgentTracing => "agent, tracing another",
        }
    }
}

/// One run: the bystander's ns per pair, and the collector's CPU seconds and peak RSS.
#[derive(Clone, Copy, Default)]
struct Sample {
    ns_per_pair: f64,
    collector_cpu_s: f64,
    collector_rss: f64,
}

pub fn measure(
    report: &mut String,
    alloctrace: &Path,
    workload: &Path,
    dir: &Path,
) -> exec::Result {
    let modes = [
        Mode::Untraced,
        Mode::Sampled,
        Mode::Exact,
        Mode::FilteredOut,
        Mode::AgentWatching,
        Mode::AgentTracing,
    ];
    let leaker = exec::compile_fixture(dir, "host_leak", "-O0")?;
    let mut runs: Vec<Vec<Sample>> = vec![Vec::new(); modes.len()];
    for _ in 0..REPEATS {
        for (i, &mode) in modes.iter().enumerate() {
            let sample = match mode {
                Mode::AgentWatching | Mode::AgentTracing => crate::agent_tax::one(
                    mode == Mode::AgentTracing,
                    alloctrace,
                    (workload, BYSTANDER, &leaker),
                    dir,
                )
                .map(|(ns_per_pair, collector_cpu_s, collector_rss)| Sample {
                    ns_per_pair,
                    collector_cpu_s,
                    collector_rss,
                })?,
                _ => one(mode, alloctrace, workload, dir)?,
            };
            runs[i].push(sample);
        }
    }
    let _ = writeln!(
        report,
        "\n## host-wide tax: a bystander (bench_loop {}) started while `alloctrace system` or `alloctrace agent` runs",
        BYSTANDER.join(" ")
    );
    let _ = writeln!(
        report,
        "{:<24} {:>26} {:>10} {:>8} {:>13} {:>13}",
        "mode", "ns/pair", "added ns", "×untr.", "collector CPU", "collector RSS"
    );
    let mut untraced = None;
    for (&mode, samples) in modes.iter().zip(&runs) {
        let mut ns: Vec<f64> = samples.iter().map(|s| s.ns_per_pair).collect();
        let (median, least, most) = crate::numbers::median_range(&mut ns);
        let base = *untraced.get_or_insert(median);
        let mid = samples
            .iter()
            .find(|s| s.ns_per_pair == median)
            .copied()
            .unwrap_or_default();
        let traced = mode != Mode::Untraced;
        let _ = writeln!(
            report,
            "{:<24} {:>26} {:>10.0} {:>8.2} {:>13} {:>13}",
            mode.name(),
            format!("{median:.0} [{least:.0}–{most:.0}]"),
            median - base,
            median / base,
            if traced {
                format!("{:.2} s", mid.collector_cpu_s)
            } else {
                "-".to_owned()
            },
            if traced {
                format!("{:.1} MiB", mid.collector_rss / 1048576.0)
            } else {
                "-".to_owned()
            },
        );
    }
    Ok(())
}

fn one(mode: Mode, alloctrace: &Path, workload: &Path, dir: &Path) -> exec::Result<Sample> {
    let json = dir.join("system.json");
    // The admitted process that makes the C library probed host-wide.
    let admitted = match mode {
        Mode::FilteredOut => Some(
            Command::new("sleep")
                .arg("600")
                .spawn()
                .map_err(|e| format!("cannot start sleep: {e}"))?,
        ),
        _ => None,
    };
    let tracer = match mode {
        Mode::Untraced | Mode::AgentWatching | Mode::AgentTracing => None,
        Mode::Sampled | Mode::Exact | Mode::FilteredOut => {
            Some(start_system(alloctrace, &json, mode)?)
        }
    };
    let out = Command::new(workload)
        .args(BYSTANDER)
        .output()
        .map_err(|e| format!("cannot run the bystander: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ns_per_pair = crate::numbers::ns_per_pair(&stdout, mode.name())?;
    let mut sample = Sample {
        ns_per_pair,
        ..Sample::default()
    };
    if let Some(mut sleep) = admitted {
        let _ = sleep.kill();
        let _ = sleep.wait();
    }
    if let Some(tracer) = tracer {
        // Asks for the report as Ctrl-C would, and waits for it.
        exec::signal_and_wait(tracer, "-INT", "alloctrace system")?;
        let text = std::fs::read_to_string(&json)
            .map_err(|e| format!("system wrote no report {}: {e}", json.display()))?;
        sample.collector_cpu_s = crate::numbers::number(&text, "cpu_s").unwrap_or(0.0);
        sample.collector_rss = crate::numbers::number(&text, "max_rss_bytes").unwrap_or(0.0);
    }
    Ok(sample)
}

/// `alloctrace system`, returned once it says it is tracing (its probes are attached).
fn start_system(alloctrace: &Path, json: &Path, mode: Mode) -> exec::Result<Child> {
    let mut cmd = Command::new(alloctrace);
    cmd.args(["system", "--format", "json", "-o"]).arg(json);
    match mode {
        Mode::Exact => {
            cmd.arg("--exact");
        }
        Mode::FilteredOut => {
            cmd.args(["--comm", "sleep"]);
        }
        Mode::Untraced | Mode::Sampled | Mode::AgentWatching | Mode::AgentTracing => {}
    }
    let mut child = cmd
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start alloctrace system: {e}"))?;
    let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.starts_with("alloctrace: tracing") => break,
            Some(Ok(_)) => {}
            _ => {
                let _ = child.wait();
                return Err("alloctrace system ended before it was tracing".into());
            }
        }
    }
    // Keeps reading so that a chatty tracer never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Ok(child)
}
