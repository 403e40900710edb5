//! `cargo xtask soak --minutes N`: alloctrace under sustained load, checked against the
//! workload's own bookkeeping. Not part of `cargo xtask test` (it takes minutes).
//!
//! The workload (`tests/fixtures/soak.c`) churns mixed-size blocks on 8 threads, keeps a
//! slowly growing set of them, and forks a child every half second that allocates, keeps a
//! quarter and exits; every process prints what it allocated and holds at the end. It runs
//! under `alloctrace run`, which reports every process of the family (the parent and each
//! child its own row), first exact for half the minutes, then sampled (`--sample-bytes
//! 524288`) for the other half. Each run is checked: the churn rate, no event lost, the
//! report's numbers against the bookkeeping (equal when exact, within the stated error when
//! sampled), and the collector's peak RSS, read from `/proc` every second, under a bound.

use std::{
    fmt::Write as _,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    build, exec,
    json::{self, Value},
};

/// The churn the issue asks for, in allocator calls per second (allocations and frees).
const MIN_EVENTS_PER_S: f64 = 500_000.0;

/// The collector's peak RSS bound. Measured: ≈ 300–330 MiB (the 64 MiB ring of each CPU is
/// mapped and touched as it fills, ≈ 128 MiB on 2 CPUs, plus the model, symbolizer caches and
/// the final report); 448 MiB leaves ≈ 1/3 margin for a slower host (deeper backlog in the
/// rings is not extra memory: they are fixed size) and for more live blocks at the end.
const RSS_BOUND_MIB: f64 = 448.0;

/// How far a sampled estimate may be from the truth, in half-widths of the 95 % interval the
/// report states (2 × 1.96 σ: a correct estimate lands outside about once in 10⁴ checks, so
/// the soak's eight such checks do not fail by chance).
const SAMPLED_TOLERANCE: f64 = 2.0;

/// The functions the workload counts its calls from (the frame 0 of their sites).
const PARENT_SITES: &[&str] = &[
    "churn",
    "keep",
    "soak_malloc",
    "soak_calloc",
    "soak_realloc",
    "soak_keep",
];
const CHILD_SITES: &[&str] = &["child", "child_alloc"];

/// The quantities compared, as the report and the bookkeeping name them.
const QUANTITIES: [&str; 4] = ["allocations", "bytes", "live_allocations", "live_bytes"];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Exact,
    Sampled,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Exact => "exact",
            Mode::Sampled => "sampled 512K",
        }
    }
}

/// One process's bookkeeping line (`proc pid=… role=… allocations=… …`).
struct Books {
    pid: u64,
    parent: bool,
    counts: [u64; 4],
    frees: u64,
    /// The parent's: children forked, and those that failed.
    children: Option<(u64, u64)>,
}

/// One traced run: the report, the bookkeeping, the collector's memory over time.
struct Run {
    mode: Mode,
    report: Value,
    books: Vec<Books>,
    rss: Vec<RssSample>,
    wall_s: f64,
    workload_status: String,
}

/// (seconds since start, VmRSS, VmHWM), the two in bytes: one a second.
type RssSample = (f64, u64, u64);

/// One line of the result table.
struct Check {
    mode: Mode,
    what: String,
    figure: String,
    passed: bool,
}

pub fn run(args: &[String]) -> exec::Result {
    let minutes = minutes(args)?;
    let alloctrace = build::run()?;
    let dir = exec::root().join("target").join("soak");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let workload = compile(&dir)?;
    let seconds = minutes * 60.0 / 2.0;
    eprintln!("xtask: soak: {minutes} min: {seconds:.0} s exact, then {seconds:.0} s sampled");
    let mut checks = Vec::new();
    let mut table = String::new();
    for mode in [Mode::Exact, Mode::Sampled] {
        let run = traced(mode, &alloctrace, &workload, seconds, &dir)?;
        figures(&mut table, &run);
        checks.extend(check(&run));
    }
    print!("{table}");
    println!("\n## checks");
    for c in &checks {
        let mark = if c.passed { "ok  " } else { "FAIL" };
        println!("{mark} {:<13} {:<44} {}", c.mode.name(), c.what, c.figure);
    }
    let failed = checks.iter().filter(|c| !c.passed).count();
    if failed > 0 {
        return Err(format!("soak: {failed} of {} checks failed", checks.len()));
    }
    println!("soak: all {} checks passed", checks.len());
    Ok(())
}

fn minutes(args: &[String]) -> exec::Result<f64> {
    match args {
        [] => Ok(10.0),
        [flag, n] if flag == "--minutes" => n
            .parse::<f64>()
            .ok()
            .filter(|m| *m > 0.0)
            .ok_or_else(|| format!("--minutes wants a positive number of minutes, not `{n}`")),
        _ => Err("usage: cargo xtask soak [--minutes N]".into()),
    }
}

fn compile(dir: &Path) -> exec::Result<PathBuf> {
    let out = dir.join("soak");
    let source = exec::root().join("tests/fixtures/soak.c");
    exec::run(
        Command::new("cc")
            .args(["-O2", "-g", "-fno-omit-frame-pointer", "-pthread", "-o"])
            .arg(&out)
            .arg(&source),
    )?;
    Ok(out)
}

/// Runs the workload for `seconds` under `alloctrace run` in `mode`, sampling the collector's
/// memory every second until it exits.
fn traced(
    mode: Mode,
    alloctrace: &Path,
    workload: &Path,
    seconds: f64,
    dir: &Path,
) -> exec::Result<Run> {
    let report = dir.join(format!("{}.json", mode_tag(mode)));
    let stderr_file = dir.join(format!("{}.stderr", mode_tag(mode)));
    let stderr = std::fs::File::create(&stderr_file)
        .map_err(|e| format!("cannot create {}: {e}", stderr_file.display()))?;
    let mut cmd = Command::new(alloctrace);
    cmd.args(["run", "--format", "json", "--top", "100", "-o"])
        .arg(&report);
    if mode == Mode::Sampled {
        cmd.args(["--sample-bytes", "524288"]);
    }
    cmd.arg("--")
        .arg(workload)
        .arg(format!("{seconds}"))
        .stdout(Stdio::piped())
        .stderr(stderr);
    eprintln!(
        "xtask: soak: {} for {seconds:.0} s (alloctrace's stderr in {})",
        mode.name(),
        stderr_file.display()
    );
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", alloctrace.display()))?;
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let (rss, status) = watch(&mut child, start)?;
    let wall_s = start.elapsed().as_secs_f64();
    let output = reader.join().unwrap_or_default();
    let text = std::fs::read_to_string(&report).map_err(|e| {
        format!(
            "alloctrace ({status}) wrote no report {}: {e}",
            report.display()
        )
    })?;
    Ok(Run {
        mode,
        report: json::parse(&text)?,
        books: books(&output)?,
        rss,
        wall_s,
        workload_status: status,
    })
}

fn mode_tag(mode: Mode) -> &'static str {
    match mode {
        Mode::Exact => "exact",
        Mode::Sampled => "sampled",
    }
}

/// Samples the collector's VmRSS and VmHWM every second until it exits.
fn watch(
    child: &mut std::process::Child,
    start: Instant,
) -> exec::Result<(Vec<RssSample>, String)> {
    let status_file = format!("/proc/{}/status", child.id());
    let mut rss = Vec::new();
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| format!("waiting for alloctrace: {e}"))?
        {
            return Ok((rss, status.to_string()));
        }
        if let Ok(text) = std::fs::read_to_string(&status_file) {
            let kib = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                    .map_or(0, |k| k * 1024)
            };
            rss.push((start.elapsed().as_secs_f64(), kib("VmRSS:"), kib("VmHWM:")));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Parses the workload's `proc …` lines.
fn books(output: &str) -> exec::Result<Vec<Books>> {
    let mut all = Vec::new();
    for line in output.lines().filter(|l| l.starts_with("proc ")) {
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        };
        let count = |key: &str| {
            field(key)
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| format!("the workload's line has no {key}: {line}"))
        };
        all.push(Books {
            pid: count("pid")?,
            parent: field("role") == Some("parent"),
            counts: [
                count(QUANTITIES[0])?,
                count(QUANTITIES[1])?,
                count(QUANTITIES[2])?,
                count(QUANTITIES[3])?,
            ],
            frees: count("frees")?,
            children: count("children").ok().zip(count("children_failed").ok()),
        });
    }
    if !all.iter().any(|b| b.parent) {
        return Err(format!(
            "the workload printed no bookkeeping of its own:\n{output}"
        ));
    }
    Ok(all)
}

/// The sites' numbers in the same order as [`QUANTITIES`].
const SITE_KEYS: [&str; 4] = [
    "total_allocations",
    "total_bytes",
    "live_allocations",
    "live_bytes",
];

/// What the report says of some processes, summed over the sites whose frame 0 is one of
/// `functions`: the estimates, the half-widths of their 95 % intervals (combined in
/// quadrature: the sites are sampled independently), and how many rows there were.
struct Seen {
    values: [f64; 4],
    half: [f64; 4],
    rows: usize,
}

fn seen(report: &Value, pids: &[u64], functions: &[&str]) -> Seen {
    let mut out = Seen {
        values: [0.0; 4],
        half: [0.0; 4],
        rows: 0,
    };
    let rows = report.get("processes").items().iter();
    for p in rows.filter(|p| p.get("pid").u64().is_some_and(|pid| pids.contains(&pid))) {
        out.rows += 1;
        let sites = p.get("sites").items().iter();
        for s in sites.filter(|s| {
            let f = s.get("frames").items().first().map(|f| f.get("function"));
            f.and_then(Value::str)
                .is_some_and(|f| functions.contains(&f))
        }) {
            for (i, key) in SITE_KEYS.iter().enumerate() {
                let v = s.get(key).f64().unwrap_or(0.0);
                out.values[i] += v;
                let iv = s.get("intervals").get(key).items();
                if let [lo, hi] = iv {
                    let (lo, hi) = (lo.f64().unwrap_or(v), hi.f64().unwrap_or(v));
                    out.half[i] = out.half[i].hypot((hi - v).max(v - lo));
                }
            }
        }
    }
    out
}

/// The figures of one run, in the table printed at the end.
fn figures(table: &mut String, run: &Run) {
    let r = &run.report;
    let duration = r.get("duration_s").f64().unwrap_or(0.0);
    let parent = run.books.iter().find(|b| b.parent);
    let children = run.books.iter().filter(|b| !b.parent).count();
    let calls: u64 = run.books.iter().map(|b| b.counts[0] + b.frees).sum();
    let events = r.get("events");
    let received = events.get("received").u64().unwrap_or(0);
    let _ = writeln!(
        table,
        "\n## {} — traced {duration:.1} s (alloctrace wall {:.1} s, alloctrace {})",
        run.mode.name(),
        run.wall_s,
        run.workload_status
    );
    let _ = writeln!(
        table,
        "workload: {} allocator calls ({:.0}/s); {children} children forked{}",
        calls,
        calls as f64 / duration.max(1e-9),
        parent
            .and_then(|p| p.children)
            .map_or(String::new(), |(n, failed)| format!(
                " (parent says {n}, {failed} failed)"
            )),
    );
    let _ = writeln!(
        table,
        "events: {received} received ({:.0}/s), {} dropped, partial {}",
        received as f64 / duration.max(1e-9),
        events.get("dropped").u64().unwrap_or(u64::MAX),
        r.get("partial") == &Value::Bool(true),
    );
    let _ = writeln!(
        table,
        "child probes after fork: max {:.3} s",
        max_probes_after_fork(r)
    );
    collector_figures(table, run);
    comparison_figures(table, run);
}

/// The longest wait of any child for its probes (what it allocated before is not seen).
fn max_probes_after_fork(report: &Value) -> f64 {
    report
        .get("processes")
        .items()
        .iter()
        .filter_map(|p| p.get("probes_after_fork_s").f64())
        .fold(0.0, f64::max)
}

fn collector_figures(table: &mut String, run: &Run) {
    let c = run.report.get("collector");
    let mib = |b: u64| b as f64 / 1048576.0;
    let hwm = run.rss.iter().map(|s| s.2).max().unwrap_or(0);
    let _ = writeln!(
        table,
        "collector: {:.1} CPU-s, peak RSS {:.1} MiB (VmHWM sampled) / {:.1} MiB (report), {} outstanding at the end",
        c.get("cpu_s").f64().unwrap_or(0.0),
        mib(hwm),
        mib(c.get("max_rss_bytes").u64().unwrap_or(0)),
        c.get("outstanding_allocations").u64().unwrap_or(0),
    );
    // VmRSS at every tenth of the run: flat once the rings are touched, or growing?
    let mut line = String::from("collector VmRSS MiB over the run:");
    let n = run.rss.len();
    for k in 0..=10 {
        if let Some(&(t, rss, _)) = run.rss.get((n.saturating_sub(1)) * k / 10) {
            let _ = write!(line, " {t:.0}s:{:.0}", mib(rss));
        }
    }
    let _ = writeln!(table, "{line}");
}

fn comparison_figures(table: &mut String, run: &Run) {
    let _ = writeln!(
        table,
        "{:<10} {:<17} {:>16} {:>16} {:>10} {:>14}",
        "who", "quantity", "workload", "report", "error", "95% half-width"
    );
    for (who, truth, seen) in groups(run) {
        for (i, q) in QUANTITIES.iter().enumerate() {
            let err = seen.values[i] - truth[i] as f64;
            let _ = writeln!(
                table,
                "{who:<10} {q:<17} {:>16} {:>16.0} {:>+9.3}% {:>14}",
                truth[i],
                seen.values[i],
                if truth[i] > 0 {
                    err / truth[i] as f64 * 100.0
                } else {
                    0.0
                },
                if run.mode == Mode::Sampled {
                    format!("{:.0}", seen.half[i])
                } else {
                    "-".into()
                },
            );
        }
    }
}

/// The parent, and all children together: (name, the bookkeeping's sums, the report's).
fn groups(run: &Run) -> Vec<(String, [u64; 4], Seen)> {
    let mut out = Vec::new();
    for parent in [true, false] {
        let books: Vec<&Books> = run.books.iter().filter(|b| b.parent == parent).collect();
        let pids: Vec<u64> = books.iter().map(|b| b.pid).collect();
        let mut truth = [0u64; 4];
        for b in &books {
            for (t, c) in truth.iter_mut().zip(b.counts) {
                *t += c;
            }
        }
        let sites = if parent { PARENT_SITES } else { CHILD_SITES };
        let name = if parent {
            "parent".to_owned()
        } else {
            format!("{} children", books.len())
        };
        out.push((name, truth, seen(&run.report, &pids, sites)));
    }
    out
}

/// The checks of one run.
fn check(run: &Run) -> Vec<Check> {
    let r = &run.report;
    let duration = r.get("duration_s").f64().unwrap_or(0.0).max(1e-9);
    let mut checks = Vec::new();
    let mut add = |what: &str, figure: String, passed: bool| {
        checks.push(Check {
            mode: run.mode,
            what: what.to_owned(),
            figure,
            passed,
        })
    };
    let calls: u64 = run.books.iter().map(|b| b.counts[0] + b.frees).sum();
    let rate = calls as f64 / duration;
    add(
        "churn ≥ 500k allocator calls/s",
        format!("{rate:.0}/s"),
        rate >= MIN_EVENTS_PER_S,
    );
    if run.mode == Mode::Exact {
        let events = r.get("events").get("received").f64().unwrap_or(0.0) / duration;
        add(
            "events received ≥ 500k/s",
            format!("{events:.0}/s"),
            events >= MIN_EVENTS_PER_S,
        );
    }
    let (lost, figure) = losses(r);
    add("no event lost, report not partial", figure, !lost);
    let (ok, figure) = workload_ok(run);
    add("workload and every child ran to the end", figure, ok);
    for (who, truth, seen) in groups(run) {
        let (ok, figure) = compare(run.mode, &truth, &seen);
        add(&format!("{who}: report = bookkeeping"), figure, ok);
    }
    if run.mode == Mode::Exact {
        let (exact, n) = children_each_exact(run);
        add(
            "each child exact on its own",
            format!("{exact}/{n}"),
            exact == n,
        );
    }
    let hwm = run
        .rss
        .iter()
        .map(|s| s.2)
        .chain(r.get("collector").get("max_rss_bytes").u64())
        .max()
        .unwrap_or(0) as f64
        / 1048576.0;
    add(
        &format!("collector peak RSS ≤ {RSS_BOUND_MIB:.0} MiB"),
        format!("{hwm:.1} MiB"),
        hwm <= RSS_BOUND_MIB,
    );
    checks
}

/// Any loss: the total, each cause, lost stacks, or a report marked partial.
fn losses(report: &Value) -> (bool, String) {
    let events = report.get("events");
    let dropped = events.get("dropped").u64();
    let causes: Vec<String> = match events.get("lost") {
        Value::Object(members) => members
            .iter()
            .filter(|(_, v)| v.u64() != Some(0))
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect(),
        _ => vec!["no `lost` section".into()],
    };
    let stacks = events.get("stacks_lost").u64();
    let partial = report.get("partial") != &Value::Bool(false);
    let lost = dropped != Some(0) || !causes.is_empty() || stacks != Some(0) || partial;
    let show = |n: Option<u64>| n.map_or("missing".to_owned(), |n| n.to_string());
    let figure = format!(
        "dropped {}, stacks_lost {}, partial {partial}{}",
        show(dropped),
        show(stacks),
        if causes.is_empty() {
            String::new()
        } else {
            format!(", {}", causes.join(" "))
        }
    );
    (lost, figure)
}

/// The workload exited 0, the parent's count of children matches their lines, and every
/// child has its row in the report.
fn workload_ok(run: &Run) -> (bool, String) {
    let lines = run.books.iter().filter(|b| !b.parent).count() as u64;
    let said = run
        .books
        .iter()
        .find_map(|b| b.children)
        .unwrap_or((u64::MAX, u64::MAX));
    let pids: Vec<u64> = run
        .books
        .iter()
        .filter(|b| !b.parent)
        .map(|b| b.pid)
        .collect();
    let rows = seen(&run.report, &pids, CHILD_SITES).rows as u64;
    let ok = run.workload_status.contains("exit status: 0") && said == (lines, 0) && rows == lines;
    (
        ok,
        format!(
            "{lines} children printed, parent forked {} ({} failed), {rows} rows",
            said.0, said.1
        ),
    )
}

/// Exact mode: equal. Sampled: within [`SAMPLED_TOLERANCE`] × the stated half-width.
fn compare(mode: Mode, truth: &[u64; 4], seen: &Seen) -> (bool, String) {
    let mut ok = true;
    let mut figure = String::new();
    for i in 0..4 {
        let err = (seen.values[i] - truth[i] as f64).abs();
        let fits = match mode {
            Mode::Exact => err == 0.0,
            Mode::Sampled => err <= SAMPLED_TOLERANCE * seen.half[i],
        };
        ok &= fits;
        let _ = match mode {
            Mode::Exact => write!(
                figure,
                "{} {}; ",
                QUANTITIES[i],
                if fits { "equal" } else { "DIFFER" }
            ),
            Mode::Sampled => write!(
                figure,
                "{} {:.2}×hw; ",
                QUANTITIES[i],
                if seen.half[i] > 0.0 {
                    err / seen.half[i]
                } else if err == 0.0 {
                    0.0
                } else {
                    f64::INFINITY
                }
            ),
        };
    }
    (ok, figure.trim_end_matches("; ").to_owned())
}

/// Exact mode: children whose own row equals their own line, of all children.
fn children_each_exact(run: &Run) -> (usize, usize) {
    let children: Vec<&Books> = run.books.iter().filter(|b| !b.parent).collect();
    let exact = children
        .iter()
        .filter(|b| {
            let s = seen(&run.report, &[b.pid], CHILD_SITES);
            s.rows == 1 && (0..4).all(|i| s.values[i] == b.counts[i] as f64)
        })
        .count();
    (exact, children.len())
}
