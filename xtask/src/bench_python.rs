//! The bench's real-program workload (issue 19): Debian's `python3`, built without frame
//! pointers, on `tests/fixtures/python/json_heavy.py` (≈ 2.5 M allocator calls in its 200
//! rounds with `PYTHONMALLOC=malloc`). Untraced, under both empty-probe floors, exact with
//! `--stack-mode fp` (the cheapest stacks, useless here: the reference a stack walk is
//! judged against), and at alloctrace's defaults (`auto` picks `dwarf` for python), with
//! the script's own time for its rounds, events lost, and the collector's CPU and peak RSS.
//! `cargo xtask bench python` runs only this.

use std::{fmt::Write as _, path::Path, process::Command, time::Instant};

use crate::{exec, json};

const PYTHON: &str = "/usr/bin/python3";

/// Runs per cell: a traced run of the script takes 4–20 s, so fewer than the loop
/// workloads' 5 (the whole table takes ≈ 2 minutes).
const REPEATS: usize = 3;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Untraced,
    Floor,
    FloorSessions,
    ExactFp,
    Defaults,
    DwarfCopy,
}

const MODES: &[Mode] = &[
    Mode::Untraced,
    Mode::Floor,
    Mode::FloorSessions,
    Mode::ExactFp,
    Mode::Defaults,
    Mode::DwarfCopy,
];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Untraced => "untraced",
            Mode::Floor => "floor (empty probes)",
            Mode::FloorSessions => "two-trap floor (sessions)",
            Mode::ExactFp => "alloctrace exact fp",
            Mode::Defaults => "alloctrace defaults",
            Mode::DwarfCopy => "alloctrace dwarf-copy",
        }
    }

    /// alloctrace's options in this mode; `None` when untraced.
    fn options(self) -> Option<&'static [&'static str]> {
        match self {
            Mode::Untraced => None,
            Mode::Floor => Some(&["--probe-floor"]),
            Mode::FloorSessions => Some(&["--probe-floor-sessions"]),
            Mode::ExactFp => Some(&["--stack-mode", "fp"]),
            Mode::Defaults => Some(&[]),
            Mode::DwarfCopy => Some(&["--stack-mode", "dwarf-copy"]),
        }
    }
}

/// One run's numbers.
#[derive(Clone, Default)]
struct Sample {
    /// The script's own time for its rounds (start-up, attach and report excluded).
    script_s: f64,
    /// The whole command, as a user waits for it.
    wall_s: f64,
    events: u64,
    dropped: u64,
    trace_s: f64,
    collector_cpu_s: f64,
    collector_rss: u64,
    stack_mode: String,
}

/// Appends the python section to `report`.
pub fn measure(report: &mut String, alloctrace: &Path, dir: &Path) -> exec::Result {
    if !Path::new(PYTHON).exists() {
        return Err(format!(
            "{PYTHON} is missing: apt install python3 (cargo xtask setup does)"
        ));
    }
    let script = exec::root().join("tests/fixtures/python/json_heavy.py");
    let mut runs: Vec<Vec<Sample>> = vec![Vec::new(); MODES.len()];
    for _ in 0..REPEATS {
        for (i, &mode) in MODES.iter().enumerate() {
            runs[i].push(run_once(mode, alloctrace, &script, dir)?);
        }
    }
    let _ = writeln!(
        report,
        "\n## python3 json_heavy.py (Debian's python3.11, no frame pointers; PYTHONMALLOC=malloc; \
         {REPEATS} runs per cell)"
    );
    let _ = writeln!(
        report,
        "{:<26} {:>22} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10} {:>9} {:>7} {:>13} {:>13}",
        "mode",
        "script s",
        "added s",
        "×floor",
        "×2-trap",
        "×untr.",
        "wall s",
        "events",
        "events/s",
        "drops",
        "collector CPU",
        "collector RSS"
    );
    let medians: Vec<f64> = runs.iter().map(|s| median(s).script_s).collect();
    let base = |mode: Mode| medians[MODES.iter().position(|&m| m == mode).unwrap_or(0)];
    let untraced = base(Mode::Untraced);
    for (&mode, samples) in MODES.iter().zip(&runs) {
        row(
            report,
            mode,
            samples,
            (untraced, base(Mode::Floor), base(Mode::FloorSessions)),
        );
    }
    Ok(())
}

/// One table row: the median run's numbers, its script time against untraced and both
/// floors (added time over the floor's added time).
fn row(
    report: &mut String,
    mode: Mode,
    samples: &[Sample],
    (untraced, floor, two_trap): (f64, f64, f64),
) {
    let mid = median(samples);
    let (min, max) = samples.iter().fold((f64::INFINITY, 0.0f64), |(a, b), s| {
        (a.min(s.script_s), b.max(s.script_s))
    });
    let traced = mode != Mode::Untraced;
    let tracer = !matches!(mode, Mode::Untraced | Mode::Floor | Mode::FloorSessions);
    let against = |base: f64| {
        if traced {
            format!("{:.2}", (mid.script_s - untraced) / (base - untraced))
        } else {
            "-".to_owned()
        }
    };
    let dash = || "-".to_owned();
    let name = if mode == Mode::Defaults {
        format!("{} ({})", mode.name(), mid.stack_mode)
    } else {
        mode.name().to_owned()
    };
    let _ = writeln!(
        report,
        "{:<26} {:>22} {:>8.2} {:>8} {:>8} {:>8.1} {:>8.2} {:>10} {:>9} {:>7} {:>13} {:>13}",
        name,
        format!("{:.2} [{min:.2}–{max:.2}]", mid.script_s),
        mid.script_s - untraced,
        against(floor),
        against(two_trap),
        mid.script_s / untraced,
        mid.wall_s,
        if tracer {
            mid.events.to_string()
        } else {
            dash()
        },
        if tracer && mid.trace_s > 0.0 {
            format!("{:.0}", mid.events as f64 / mid.trace_s)
        } else {
            dash()
        },
        if tracer {
            mid.dropped.to_string()
        } else {
            dash()
        },
        if traced {
            format!("{:.2} s", mid.collector_cpu_s)
        } else {
            dash()
        },
        if traced {
            format!("{:.1} MiB", mid.collector_rss as f64 / 1048576.0)
        } else {
            dash()
        },
    );
}

/// The run with the median script time.
fn median(samples: &[Sample]) -> Sample {
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.script_s.total_cmp(&b.script_s));
    sorted[sorted.len() / 2].clone()
}

/// Runs the script once in `mode`: its time, and what alloctrace's report says.
fn run_once(mode: Mode, alloctrace: &Path, script: &Path, dir: &Path) -> exec::Result<Sample> {
    let report = dir.join("python.json");
    let mut cmd = match mode.options() {
        None => Command::new(PYTHON),
        Some(options) => {
            let mut c = Command::new(alloctrace);
            c.args(["run", "--format", "json", "-o"])
                .arg(&report)
                .args(options)
                .args(["--", PYTHON]);
            c
        }
    };
    // Every object through malloc (pymalloc would serve most of them from its own arenas);
    // a fixed hash seed makes the runs alike. alloctrace inherits both, and ignores them.
    cmd.arg(script)
        .env("PYTHONMALLOC", "malloc")
        .env("PYTHONHASHSEED", "0");
    let start = Instant::now();
    let stdout = exec::measured(&mut cmd, &format!("python3 {}", mode.name()))?;
    let wall_s = start.elapsed().as_secs_f64();
    let script_s = stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("elapsed_s="))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("python3 {} printed no elapsed_s: {stdout}", mode.name()))?;
    let mut sample = Sample {
        script_s,
        wall_s,
        ..Sample::default()
    };
    if mode.options().is_some() {
        read_report(&report, &mut sample)?;
    }
    Ok(sample)
}

/// Fills in what alloctrace's JSON report at `path` says of the run.
fn read_report(path: &Path, sample: &mut Sample) -> exec::Result {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let report = json::parse(&text)?;
    let events = report.get("events");
    sample.events = events.get("received").u64().unwrap_or(0);
    sample.dropped = events.get("dropped").u64().unwrap_or(0);
    sample.trace_s = report.get("duration_s").f64().unwrap_or(0.0);
    let collector = report.get("collector");
    sample.collector_cpu_s = collector.get("cpu_s").f64().unwrap_or(0.0);
    sample.collector_rss = collector.get("max_rss_bytes").u64().unwrap_or(0);
    sample.stack_mode = report
        .get("processes")
        .items()
        .first()
        .and_then(|p| p.get("stack_mode").str())
        .unwrap_or("?")
        .to_owned();
    Ok(())
}
