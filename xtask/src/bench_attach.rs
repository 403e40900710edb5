//! How soon tracing starts, and what the unwind tables cost: the wall time from
//! `alloctrace attach -p PID` (an idle process) to its "tracing" line, the same for
//! `run -- /bin/true` to its end, and each module's table (rows, size, build time) as `-v`
//! reports them for libc, python3 and a large Rust release binary (alloctrace itself).

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use crate::exec;

const REPEATS: usize = 7;

/// Appends the attach section to `report`.
pub fn measure(report: &mut String, alloctrace: &Path) -> exec::Result {
    let mut attach = Vec::new();
    let mut whole = Vec::new();
    for _ in 0..REPEATS {
        attach.push(attach_latency(alloctrace)?);
        whole.push(run_true(alloctrace)?);
    }
    let _ = writeln!(
        report,
        "\n## attach latency ({REPEATS} runs, median [min–max])"
    );
    let _ = writeln!(
        report,
        "attach -p PID (idle process) → \"tracing\": {}",
        spread(&mut attach)
    );
    let _ = writeln!(
        report,
        "run -- /bin/true, start to exit: {}",
        spread(&mut whole)
    );
    let _ = writeln!(
        report,
        "\n## unwind tables (alloctrace run -v, built once per file)"
    );
    let python = "import json; json.dumps({'a': [1] * 10})";
    tables(
        report,
        alloctrace,
        &[
            Path::new("/usr/bin/python3"),
            Path::new("-c"),
            Path::new(python),
        ],
    )?;
    tables(report, alloctrace, &[alloctrace, Path::new("--version")])?;
    Ok(())
}

fn spread(values: &mut [f64]) -> String {
    let (median, least, most) = crate::numbers::median_range(values);
    format!("{median:.3} s [{least:.3}–{most:.3}]")
}

/// Seconds from starting `attach -p` on a sleeping process to its "tracing" line.
fn attach_latency(alloctrace: &Path) -> exec::Result<f64> {
    let mut target = Command::new("sleep")
        .arg("30")
        .spawn()
        .map_err(|e| format!("cannot start sleep: {e}"))?;
    let started = Instant::now();
    let mut tracer = Command::new(alloctrace)
        .args(["attach", "-p", &target.id().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start alloctrace attach: {e}"))?;
    let stderr = tracer.stderr.take().ok_or("no stderr")?;
    let mut latency = None;
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        if line.contains("alloctrace: tracing") {
            latency = Some(started.elapsed().as_secs_f64());
            break;
        }
    }
    let stopped = exec::signal_and_wait(tracer, "-INT", "alloctrace attach");
    let _ = target.kill();
    let _ = target.wait();
    stopped?;
    latency.ok_or_else(|| "alloctrace attach never said it was tracing".to_owned())
}

fn run_true(alloctrace: &Path) -> exec::Result<f64> {
    let started = Instant::now();
    let status = Command::new(alloctrace)
        .args(["run", "--", "/bin/true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run alloctrace: {e}"))?;
    if !status.success() {
        return Err(format!("alloctrace run -- /bin/true failed: {status}"));
    }
    Ok(started.elapsed().as_secs_f64())
}

/// The `-v` lines about unwind tables from tracing `command`, copied into the report.
fn tables(report: &mut String, alloctrace: &Path, command: &[&Path]) -> exec::Result {
    let out = Command::new(alloctrace)
        .args(["run", "-v", "--stack-mode", "dwarf", "--"])
        .args(command)
        .stdout(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run alloctrace: {e}"))?;
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        if let Some(rest) = line.strip_prefix("alloctrace: unwind table for ") {
            let _ = writeln!(report, "{rest}");
        }
    }
    Ok(())
}
