//! `cargo xtask bench`: the cost of tracing, measured side by side in one run.
//!
//! Each workload runs untraced, under the empty-probe floor (`alloctrace run --probe-floor`:
//! empty programs at the very places alloctrace probes — the trap cost no uprobe tracer can go
//! below), under alloctrace, and under heaptrack when it can be installed. Every cell is the
//! median of several runs (with min–max), and ratios are taken within this one run, since
//! absolute timings drift on a shared VM. A real program follows (`bench_python`: Debian's
//! python3 on a JSON-heavy script). Results go to stdout and `target/bench/`.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{
    build, exec,
    numbers::{median_range, ns_per_pair, number},
};

/// Runs per cell. Modes take turns within each round, so drift on a shared VM falls on all
/// of them alike instead of on whichever ran last.
const REPEATS: usize = 5;

struct Workload {
    name: &'static str,
    args: &'static [&'static str],
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "tight 1 thread",
        args: &["tight", "1", "1000000"],
    },
    Workload {
        name: "tight 4 threads",
        args: &["tight", "4", "250000"],
    },
    Workload {
        name: "mixed sizes",
        args: &["mixed", "1", "500000"],
    },
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Untraced,
    Floor,
    /// An empty session on each allocation function (its return skipped) and `free`.
    FloorSessions,
    Exact,
    /// Exact, with every malloc's return trapped: what thread-cache prediction saves.
    ExactReturns,
    Dwarf,
    /// Exact, the stack copied and unwound by the collector (the path before in-kernel
    /// unwinding, and its fallback).
    DwarfCopy,
    Sampled,
    /// Sampled, with a uretprobe on every malloc: what the uprobe sessions save.
    SampledPlain,
    Heaptrack,
    Memleak,
}

/// `--sample-bytes` of the sampled mode (jemalloc's default profiling interval).
const SAMPLE_BYTES: &str = "524288";

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Untraced => "untraced",
            Mode::Floor => "floor (empty probes)",
            Mode::FloorSessions => "two-trap floor (sessions)",
            Mode::Exact => "alloctrace exact fp",
            Mode::ExactReturns => "  same, --no-tcache-prediction",
            Mode::Dwarf => "alloctrace exact dwarf",
            Mode::DwarfCopy => "  same, dwarf-copy",
            Mode::Sampled => "alloctrace sampled fp 512K",
            Mode::SampledPlain => "  same, --uprobes multi",
            Mode::Heaptrack => "heaptrack (LD_PRELOAD)",
            Mode::Memleak => "bcc memleak-bpfcc -p",
        }
    }

    /// Runs alloctrace itself (the floor included).
    fn runs_alloctrace(self) -> bool {
        matches!(
            self,
            Mode::Floor
                | Mode::FloorSessions
                | Mode::Exact
                | Mode::ExactReturns
                | Mode::Dwarf
                | Mode::DwarfCopy
                | Mode::Sampled
                | Mode::SampledPlain
        )
    }
}

/// One run's numbers.
#[derive(Clone, Copy, Default)]
struct Sample {
    ns_per_pair: f64,
    events: u64,
    dropped: u64,
    trace_s: f64,
    collector_cpu_s: f64,
    collector_rss: u64,
}

pub fn run(args: &[String]) -> exec::Result {
    let alloctrace = build::run()?;
    let dir = exec::root().join("target").join("bench");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let workload = compile(&dir, "bench_loop")?;
    if args.first().map(String::as_str) == Some("host") {
        let mut report = format!("alloctrace bench host — commit {}\n", commit());
        crate::host_tax::measure(&mut report, &alloctrace, &workload, &dir)?;
        print!("{report}");
        return Ok(());
    }
    if args.first().map(String::as_str) == Some("attach") {
        let mut report = format!("alloctrace bench attach — commit {}\n", commit());
        crate::bench_attach::measure(&mut report, &alloctrace)?;
        print!("{report}");
        return Ok(());
    }
    if args.first().map(String::as_str) == Some("python") {
        let mut report = format!("alloctrace bench python — commit {}\n", commit());
        crate::bench_python::measure(&mut report, &alloctrace, &dir)?;
        crate::bench_attach::measure(&mut report, &alloctrace)?;
        print!("{report}");
        return Ok(());
    }
    let hold = compile(&dir, "bench_hold")?;
    let heaptrack = install_heaptrack();
    let kheaders = install_memleak(&dir);

    let mut modes = vec![
        Mode::Untraced,
        Mode::Floor,
        Mode::FloorSessions,
        Mode::Exact,
        Mode::Dwarf,
        Mode::ExactReturns,
        Mode::DwarfCopy,
        Mode::Sampled,
        Mode::SampledPlain,
    ];
    if heaptrack {
        modes.push(Mode::Heaptrack);
    }
    if kheaders.is_some() {
        modes.push(Mode::Memleak);
    }
    let mut report = String::new();
    let _ = writeln!(
        report,
        "alloctrace bench — {} runs per cell, median [min–max]; commit {}",
        REPEATS,
        commit()
    );
    if !heaptrack {
        let _ = writeln!(report, "heaptrack: not installable here, skipped");
    }
    match &kheaders {
        Some(dir) => {
            let _ = writeln!(
                report,
                "bcc memleak-bpfcc: with Debian's nearest kernel headers ({}; the running kernel is {})",
                dir.display(),
                kernel()
            );
        }
        None => {
            let _ = writeln!(report, "bcc memleak-bpfcc: not installable here, skipped");
        }
    }
    for w in WORKLOADS {
        let mut runs: Vec<Vec<Sample>> = vec![Vec::new(); modes.len()];
        for _ in 0..REPEATS {
            for (i, &mode) in modes.iter().enumerate() {
                runs[i].push(match (mode, &kheaders) {
                    (Mode::Memleak, Some(headers)) => measure_memleak(&workload, w.args, headers)?,
                    _ => measure(mode, &alloctrace, &workload, w.args, &dir)?,
                });
            }
        }
        let _ = writeln!(report, "\n## {} (bench_loop {})", w.name, w.args.join(" "));
        let _ = writeln!(
            report,
            "{:<24} {:>26} {:>10} {:>8} {:>8} {:>8} {:>12} {:>7} {:>13} {:>13}",
            "mode",
            "ns/pair",
            "added ns",
            "×floor",
            "×2-trap",
            "×untr.",
            "events/s",
            "drops",
            "collector CPU",
            "collector RSS"
        );
        let mut medians: Vec<(Mode, f64)> = Vec::new();
        for (&mode, samples) in modes.iter().zip(&runs) {
            let mut ns: Vec<f64> = samples.iter().map(|s| s.ns_per_pair).collect();
            let (median, least, most) = median_range(&mut ns);
            medians.push((mode, median));
            let median_of = |wanted: Mode| {
                medians
                    .iter()
                    .find(|(m, _)| *m == wanted)
                    .map(|&(_, ns)| ns)
            };
            let untraced = median_of(Mode::Untraced).unwrap_or(median);
            let floor = median_of(Mode::Floor);
            let two_trap = median_of(Mode::FloorSessions);
            let exact = median_of(Mode::Exact);
            let mid = samples
                .iter()
                .find(|s| s.ns_per_pair == median)
                .copied()
                .unwrap_or_default();
            let traced = mode.runs_alloctrace();
            let tracer = traced && !matches!(mode, Mode::Floor | Mode::FloorSessions);
            let against = |base: Option<f64>| match (mode, base) {
                (Mode::Untraced, _) | (_, None) => "-".to_owned(),
                (_, Some(f)) => format!("{:.2}", (median - untraced) / (f - untraced)),
            };
            let _ = writeln!(
                report,
                "{:<24} {:>26} {:>10.0} {:>8} {:>8} {:>8.1} {:>12} {:>7} {:>13} {:>13}",
                mode.name(),
                format!("{median:.0} [{least:.0}–{most:.0}]"),
                median - untraced,
                against(floor),
                against(two_trap),
                median / untraced,
                if tracer && mid.trace_s > 0.0 {
                    format!("{:.0}", mid.events as f64 / mid.trace_s)
                } else {
                    "-".to_owned()
                },
                if tracer {
                    mid.dropped.to_string()
                } else {
                    "-".to_owned()
                },
                if traced {
                    format!("{:.2} s", mid.collector_cpu_s)
                } else {
                    "-".to_owned()
                },
                if traced {
                    format!("{:.1} MiB", mid.collector_rss as f64 / 1048576.0)
                } else {
                    "-".to_owned()
                },
            );
            if let (Mode::Dwarf, Some(exact)) = (mode, exact) {
                let paired = paired_ratios(&modes, &runs, Mode::Dwarf, Mode::Exact);
                let _ = writeln!(
                    report,
                    "  → in-kernel dwarf / exact fp: {:.2}× per pair (medians); {} (target ≤ 1.15)",
                    median / exact,
                    paired
                );
            }
            if let (Mode::Memleak, Some(exact)) = (mode, exact) {
                let sampled = median_of(Mode::Sampled);
                let _ = writeln!(
                    report,
                    "  → memleak adds {:.1}× what alloctrace exact adds{}",
                    (median - untraced) / (exact - untraced),
                    sampled.map_or(String::new(), |s| format!(
                        ", {:.1}× what sampled adds",
                        (median - untraced) / (s - untraced)
                    ))
                );
            }
        }
    }
    crate::bench_python::measure(&mut report, &alloctrace, &dir)?;
    crate::bench_attach::measure(&mut report, &alloctrace)?;
    accuracy(&mut report, &alloctrace, &workload, &dir)?;
    crate::host_tax::measure(&mut report, &alloctrace, &workload, &dir)?;
    let _ = writeln!(report, "\n## collector memory per outstanding allocation");
    let base = measure_hold(&alloctrace, &hold, 0, &dir)?;
    let held = measure_hold(&alloctrace, &hold, 5_000_000, &dir)?;
    let per = (held.0.saturating_sub(base.0)) as f64 / 5_000_000.0;
    let _ = writeln!(
        report,
        "5 000 000 live allocations: collector peak RSS {:.1} MiB vs {:.1} MiB with none → {per:.1} bytes each ({} tracked)",
        held.0 as f64 / 1048576.0,
        base.0 as f64 / 1048576.0,
        held.1
    );
    let _ = writeln!(
        report,
        "\n×floor = added ns / the floor's added ns (the uprobe traps alone: entry and return \
         of malloc, entry of free); ×2-trap = added ns / the two-trap floor's (an empty \
         session on malloc that skips its return, and free: the least any exact uprobe \
         tracer can pay per pair)."
    );

    print!("{report}");
    let file = dir.join(format!("results-{}.txt", commit()));
    std::fs::write(&file, &report).map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    println!("written to {}", file.display());
    Ok(())
}

/// `a`'s ns/pair over `b`'s, round by round (the two ran seconds apart within a round, so
/// the VM's drift between rounds cancels): the median of those ratios, with min–max.
fn paired_ratios(modes: &[Mode], runs: &[Vec<Sample>], a: Mode, b: Mode) -> String {
    let of = |m: Mode| modes.iter().position(|&x| x == m).map(|i| &runs[i]);
    let (Some(a), Some(b)) = (of(a), of(b)) else {
        return String::new();
    };
    let mut ratios: Vec<f64> = a
        .iter()
        .zip(b)
        .filter(|(_, b)| b.ns_per_pair > 0.0)
        .map(|(a, b)| a.ns_per_pair / b.ns_per_pair)
        .collect();
    if ratios.is_empty() {
        return String::new();
    }
    let (median, least, most) = median_range(&mut ratios);
    format!("{median:.2}× [{least:.2}–{most:.2}] paired by round")
}

/// `bench_loop retain` pairs: ends with ≈ 2 GiB live in each of its two retaining sites, enough
/// for a 5 % check to sit beyond 3 standard deviations of 512 KiB sampling (≈ √(bytes ×
/// mean) per site, 1.6 % here).
const RETAIN_PAIRS: &str = "262144";
/// Sites whose sampled estimate is checked against exact mode.
const RETAIN_SITES: &[&str] = &["retain_buffer", "retain_record"];

/// A sampled estimate, with its 95 % interval when the report gives one.
type Estimate = (f64, Option<(f64, f64)>);

/// Seeds each sampled accuracy row is measured over.
const ACCURACY_SEEDS: u32 = 8;

/// The sampled estimates against exact mode's numbers, on the mixed workload with two
/// retaining sites (`bench_loop retain`), over several seeds: the mean error, its spread
/// (standard deviation), and how often the report's 95 % interval held the exact number.
fn accuracy(report: &mut String, alloctrace: &Path, workload: &Path, dir: &Path) -> exec::Result {
    let args = ["retain", "0", RETAIN_PAIRS];
    let exact = traced_report(
        alloctrace,
        workload,
        &args,
        &["--stack-mode", "fp"],
        &dir.join("retain-exact.json"),
    )?;
    let heap = |json: &str| {
        number(json, "live_bytes").unwrap_or(0.0) - number(json, "mmap_live_bytes").unwrap_or(0.0)
    };
    let mut rows: Vec<(String, f64, Vec<Estimate>)> =
        vec![("total".to_owned(), heap(&exact), Vec::new())];
    for site in RETAIN_SITES {
        let truth = site_number(&exact, site, "live_bytes").unwrap_or(0.0);
        rows.push((format!("site {site}"), truth, Vec::new()));
    }
    for seed in 1..=ACCURACY_SEEDS {
        let seed = seed.to_string();
        let sampled = traced_report(
            alloctrace,
            workload,
            &args,
            &[
                "--stack-mode",
                "fp",
                "--sample-bytes",
                SAMPLE_BYTES,
                "--sample-seed",
                &seed,
            ],
            &dir.join(format!("retain-sampled-{seed}.json")),
        )?;
        rows[0].2.push((heap(&sampled), None));
        for (row, site) in rows[1..].iter_mut().zip(RETAIN_SITES) {
            let estimate = site_number(&sampled, site, "live_bytes").unwrap_or(0.0);
            row.2.push((estimate, site_interval(&sampled, site)));
        }
    }
    let _ = writeln!(
        report,
        "\n## sampling accuracy (bench_loop {}; --sample-bytes {SAMPLE_BYTES} against exact, \
         {ACCURACY_SEEDS} seeds)",
        args.join(" ")
    );
    let _ = writeln!(
        report,
        "{:<24} {:>13} {:>11} {:>9} {:>17}  {:>13}",
        "live heap bytes", "exact", "mean error", "spread", "min … max", "95 % interval"
    );
    for (what, exact, runs) in rows {
        accuracy_row(report, &what, exact, &runs);
    }
    Ok(())
}

/// One row: the errors of every seed's estimate, and how often its interval held the truth.
fn accuracy_row(report: &mut String, what: &str, exact: f64, runs: &[Estimate]) {
    let errors: Vec<f64> = runs
        .iter()
        .map(|(e, _)| {
            if exact > 0.0 {
                (e - exact) / exact * 100.0
            } else {
                f64::NAN
            }
        })
        .collect();
    let n = errors.len().max(1) as f64;
    let mean = errors.iter().sum::<f64>() / n;
    let spread = (errors.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / n).sqrt();
    let (min, max) = errors
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &e| {
            (a.min(e), b.max(e))
        });
    let covered = runs
        .iter()
        .filter(|(_, iv)| iv.is_some_and(|(lo, hi)| lo <= exact && exact <= hi))
        .count();
    let held = if runs.iter().any(|(_, iv)| iv.is_some()) {
        format!("{covered}/{} hold it", runs.len())
    } else {
        "-".to_owned()
    };
    let _ = writeln!(
        report,
        "{what:<24} {exact:>13.0} {mean:>+10.2}% {spread:>8.2}% {min:>+7.2}% … {max:>+6.2}%  {held:>13}"
    );
}

/// The `[low, high]` interval of a site's live bytes, from a report.
fn site_interval(json: &str, function: &str) -> Option<(f64, f64)> {
    let sites = json.find("\"sites_omitted\"")?;
    let rest = &json[sites..];
    let frame = rest.find(&format!("\"function\": \"{function}\""))?;
    let rest = &rest[frame..];
    let intervals = rest.find("\"intervals\": {")?;
    let rest = &rest[intervals..];
    let at = rest.find("\"live_bytes\": [")? + "\"live_bytes\": [".len();
    let mut numbers = rest[at..]
        .split([',', ']'])
        .map(|n| n.trim().parse::<f64>());
    Some((numbers.next()?.ok()?, numbers.next()?.ok()?))
}

/// Traces `workload args` with extra alloctrace options; returns the JSON report.
fn traced_report(
    alloctrace: &Path,
    workload: &Path,
    args: &[&str],
    options: &[&str],
    out: &Path,
) -> exec::Result<String> {
    exec::run(
        Command::new(alloctrace)
            .args(["run", "--format", "json", "-o"])
            .arg(out)
            .args(options)
            .arg("--")
            .arg(workload)
            .args(args),
    )?;
    std::fs::read_to_string(out).map_err(|e| format!("cannot read {}: {e}", out.display()))
}

/// A number of the reported site whose innermost frame is `function` (sites follow the
/// process's own fields and its peak, after `sites_omitted`).
fn site_number(json: &str, function: &str, key: &str) -> Option<f64> {
    let sites = json.find("\"sites_omitted\"")?;
    let rest = &json[sites..];
    let frame = rest.find(&format!("\"function\": \"{function}\""))?;
    number(&rest[frame..], key)
}

fn compile(dir: &Path, name: &str) -> exec::Result<PathBuf> {
    exec::compile_fixture(dir, name, "-O2")
}

fn install_heaptrack() -> bool {
    if exec::succeeds(Command::new("heaptrack").arg("--version")) {
        return true;
    }
    exec::apt_install(&["heaptrack"]).is_ok()
        && exec::succeeds(Command::new("heaptrack").arg("--version"))
}

/// Installs bcc's memleak and Debian's nearest kernel headers, merged into one tree for
/// `BCC_KERNEL_SOURCE` (the running kernel's own headers are not packaged).
fn install_memleak(dir: &Path) -> Option<PathBuf> {
    let headers = dir.join("kheaders");
    let ready = |h: &Path| {
        h.join("include/linux/kconfig.h").exists()
            && exec::succeeds(Command::new("memleak-bpfcc").arg("-h"))
    };
    if ready(&headers) {
        return Some(headers);
    }
    let list = exec::output(Command::new("apt-cache").args([
        "search",
        "--names-only",
        "^linux-headers-[0-9.]+-[0-9]+-amd64$",
    ]))?;
    let mut names: Vec<&str> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    names.sort_by_key(|n| {
        n.trim_start_matches("linux-headers-")
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|p| p.parse::<u32>().ok())
            .collect::<Vec<_>>()
    });
    let arch = names.last()?.to_string();
    let common = arch.replace("-amd64", "-common");
    exec::apt_install(&["bpfcc-tools", &arch]).ok()?;
    let _ = std::fs::remove_dir_all(&headers);
    std::fs::create_dir_all(&headers).ok()?;
    for part in [&common, &arch] {
        let src = format!("/usr/src/{part}/.");
        exec::run(Command::new("cp").arg("-a").arg(&src).arg(&headers)).ok()?;
    }
    ready(&headers).then_some(headers)
}

/// memleak attaches by pid: start the workload held, let memleak compile and attach, then go.
fn measure_memleak(workload: &Path, args: &[&str], headers: &Path) -> exec::Result<Sample> {
    use std::{
        io::{BufRead as _, BufReader, Read as _, Write as _},
        process::Stdio,
    };
    let mut target = Command::new(workload)
        .args(args)
        .env("BENCH_WAIT", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the workload: {e}"))?;
    let mut memleak = Command::new("memleak-bpfcc")
        .args(["-p", &target.id().to_string(), "3600"])
        .env("BCC_KERNEL_SOURCE", headers)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start memleak-bpfcc: {e}"))?;
    let mut lines = BufReader::new(memleak.stdout.take().expect("piped"));
    let mut line = String::new();
    while !line.starts_with("Attaching to pid") {
        line.clear();
        if lines.read_line(&mut line).unwrap_or(0) == 0 {
            let _ = target.kill();
            return Err("memleak-bpfcc exited before attaching".into());
        }
    }
    std::thread::sleep(std::time::Duration::from_secs(3)); // its probes go in after the line
    let _ = target.stdin.take().expect("piped").write_all(b"g");
    let mut out = String::new();
    let _ = target
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut out);
    let _ = target.wait();
    let _ = memleak.kill();
    let _ = memleak.wait();
    let ns_per_pair = ns_per_pair(&out, Mode::Memleak.name())?;
    Ok(Sample {
        ns_per_pair,
        ..Sample::default()
    })
}

fn measure(
    mode: Mode,
    alloctrace: &Path,
    workload: &Path,
    args: &[&str],
    dir: &Path,
) -> exec::Result<Sample> {
    let report = dir.join("report.json");
    let mut cmd = match mode {
        Mode::Untraced => Command::new(workload),
        Mode::Floor
        | Mode::FloorSessions
        | Mode::Exact
        | Mode::ExactReturns
        | Mode::Dwarf
        | Mode::DwarfCopy
        | Mode::Sampled
        | Mode::SampledPlain => {
            let mut c = Command::new(alloctrace);
            c.args(["run", "--format", "json", "-o"]).arg(&report);
            if mode == Mode::Floor {
                c.arg("--probe-floor");
            }
            if mode == Mode::FloorSessions {
                c.arg("--probe-floor-sessions");
            }
            // The same workload binary in both stack modes: the per-event cost of each.
            c.args([
                "--stack-mode",
                match mode {
                    Mode::Dwarf => "dwarf",
                    Mode::DwarfCopy => "dwarf-copy",
                    _ => "fp",
                },
            ]);
            if matches!(mode, Mode::Sampled | Mode::SampledPlain) {
                c.args(["--sample-bytes", SAMPLE_BYTES]);
            }
            if mode == Mode::SampledPlain {
                c.args(["--uprobes", "multi"]);
            }
            if mode == Mode::ExactReturns {
                c.arg("--no-tcache-prediction");
            }
            c.arg("--").arg(workload);
            c
        }
        Mode::Memleak => unreachable!("measured by measure_memleak"),
        Mode::Heaptrack => {
            let mut c = Command::new("heaptrack");
            c.arg("-o").arg(dir.join("heaptrack.out")).arg(workload);
            c
        }
    };
    cmd.args(args);
    let stdout = exec::measured(&mut cmd, mode.name())?;
    let ns_per_pair = ns_per_pair(&stdout, mode.name())?;
    let mut sample = Sample {
        ns_per_pair,
        ..Sample::default()
    };
    if mode.runs_alloctrace() {
        let json = std::fs::read_to_string(&report).unwrap_or_default();
        sample.events = number(&json, "received").unwrap_or(0.0) as u64;
        sample.dropped = number(&json, "dropped").unwrap_or(0.0) as u64;
        sample.trace_s = number(&json, "duration_s").unwrap_or(0.0);
        sample.collector_cpu_s = number(&json, "cpu_s").unwrap_or(0.0);
        sample.collector_rss = number(&json, "max_rss_bytes").unwrap_or(0.0) as u64;
    }
    Ok(sample)
}

/// The collector's peak RSS and tracked allocations while a process holds `n` allocations.
fn measure_hold(alloctrace: &Path, hold: &Path, n: u64, dir: &Path) -> exec::Result<(u64, u64)> {
    let json = traced_report(
        alloctrace,
        hold,
        &[&n.to_string()],
        &[],
        &dir.join("hold.json"),
    )?;
    Ok((
        number(&json, "max_rss_bytes").unwrap_or(0.0) as u64,
        number(&json, "outstanding_allocations").unwrap_or(0.0) as u64,
    ))
}

fn commit() -> String {
    exec::output(
        Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .current_dir(exec::root()),
    )
    .map(|s| s.trim().to_owned())
    .unwrap_or_else(|| "unknown".into())
}

fn kernel() -> String {
    exec::output(Command::new("uname").arg("-r"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}
