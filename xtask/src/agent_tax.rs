//! The agent's tax on a bystander (part of `bench host`): the bystander's malloc/free loop
//! while `alloctrace agent` only watches (it reads every process's `/proc/PID/status`, the
//! bystander's included, and probes nothing), and while it traces another process — a
//! leaking `host_leak` it flagged — with probes scoped to that pid. Also the agent's own
//! CPU and peak RSS over the run.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use crate::exec;

/// Its own port, away from the agent's default (a deployed agent may be running).
const LISTEN: &str = "127.0.0.1:19961";

/// One run: (bystander ns per pair, agent CPU seconds, agent peak RSS bytes).
pub fn one(
    tracing: bool,
    alloctrace: &Path,
    (workload, bystander, leaker): (&Path, &[&str], &Path),
    dir: &Path,
) -> exec::Result<(f64, f64, f64)> {
    let mut leak = if tracing {
        Some(
            Command::new(leaker)
                .arg("0")
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start host_leak: {e}"))?,
        )
    } else {
        None
    };
    let wait_for = leak.as_ref().map(|l| format!("tracing pid {} ", l.id()));
    let agent = start(alloctrace, dir, wait_for.as_deref());
    let result = agent.and_then(|agent| {
        let out = Command::new(workload)
            .args(bystander)
            .output()
            .map_err(|e| format!("cannot run the bystander: {e}"));
        let usage = usage(agent.id());
        // SIGTERM: the agent finishes its window's report and exits.
        exec::signal_and_wait(agent, "-TERM", "alloctrace agent")?;
        let name = if tracing {
            "agent, tracing"
        } else {
            "agent, watching"
        };
        let ns = crate::numbers::ns_per_pair(&String::from_utf8_lossy(&out?.stdout), name)?;
        Ok((ns, usage.0, usage.1))
    });
    if let Some(mut l) = leak.take() {
        drop(l.stdin.take()); // it stops at its next step
        let _ = l.wait();
    }
    result
}

/// `alloctrace agent` on every process, returned once it watches (and, with `wait_for`,
/// once its log has that line: a window on the leaker has started).
fn start(alloctrace: &Path, dir: &Path, wait_for: Option<&str>) -> exec::Result<Child> {
    let mut child = Command::new(alloctrace)
        .args(["agent", "--listen", LISTEN, "--profile-dir"])
        .arg(dir.join("agent-profiles"))
        .args([
            "--watch-interval",
            "1s",
            "--history",
            "4",
            "--min-growth",
            "1M",
        ])
        .args(["--trace-window", "10m"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start alloctrace agent: {e}"))?;
    let (tx, rx) = mpsc::channel();
    let stderr = BufReader::new(child.stderr.take().expect("piped"));
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wanted = wait_for.unwrap_or("alloctrace agent: watching");
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.contains(wanted) => break,
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("alloctrace agent never logged `{wanted}`"));
            }
        }
    }
    std::thread::spawn(move || rx.iter().for_each(drop));
    Ok(child)
}

/// The agent's CPU seconds (user + system; /proc counts in 1/100 s) and peak RSS so far.
fn usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    ((ticks(11) + ticks(12)) / 100.0, hwm * 1024.0)
}
