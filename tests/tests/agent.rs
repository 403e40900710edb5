//! `alloctrace agent` (issue 21): it watches processes through `/proc`, traces only the one
//! that grows (pid-scoped probes: the steady ones get none), puts its verdict and leaking
//! site in the metrics — read by a real Prometheus — and in a pprof `go tool pprof` reads,
//! writes the report of a traced process the OOM killer takes, keeps its profile directory
//! under its limit and its own memory bounded, reloads on SIGHUP and finishes its window on
//! SIGTERM.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use alloctrace_tests::*;
use serde_json::Value;

/// Each test runs an agent watching the host and measures it: one at a time.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("its address").port()
}

/// A fresh directory under the scratch directory.
fn fresh_dir(tag: &str) -> PathBuf {
    let dir = scratch_dir().join(format!("agent-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the directory");
    dir
}

/// `GET path` on `127.0.0.1:port`: the body of a 200 response.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// Samples of an exposition: `name{labels}` → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The value of the one sample of `name` whose labels include every `pairs` entry.
fn sample(text: &str, name: &str, pairs: &[(&str, &str)]) -> Option<f64> {
    samples(text).into_iter().find_map(|(key, value)| {
        let rest = key.strip_prefix(name)?;
        let matches = (rest.is_empty() || rest.starts_with('{'))
            && pairs
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        matches.then_some(value)
    })
}

/// `alloctrace agent` running, its stderr collected as it goes.
struct Agent {
    child: Child,
    port: u16,
    log: Arc<Mutex<String>>,
}

impl Agent {
    /// Starts the agent on a port of its own; returns once it serves metrics.
    fn start(profile_dir: &Path, args: &[&str]) -> Self {
        let port = free_port();
        let mut child = Command::new(alloctrace())
            .arg("agent")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--profile-dir")
            .arg(profile_dir)
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start alloctrace agent");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = BufReader::new(child.stderr.take().expect("piped stderr"));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let agent = Self { child, port, log };
        agent.wait_for("metrics served", Duration::from_secs(20), |m| {
            m.contains("alloctrace_agent_watched_processes")
        });
        agent
    }

    fn metrics(&self) -> String {
        http_get(self.port, "/metrics").unwrap_or_default()
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Polls the metrics until `ready`; fails with everything seen when it never is.
    fn wait_for(&self, what: &str, limit: Duration, ready: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let m = self.metrics();
            if ready(&m) {
                return m;
            }
            assert!(
                start.elapsed() < limit,
                "{what}: not within {limit:?}\nlog:\n{}\nmetrics:\n{m}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGTERM, then its exit status and log.
    fn terminate(mut self) -> (ExitStatus, String) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("wait for the agent");
        std::thread::sleep(Duration::from_millis(100)); // the log reader's last lines
        (status, self.log())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fixture running until its standard input closes.
struct Running(Child);

impl Running {
    fn start(binary: &Path, args: &[&str]) -> Self {
        let child = Command::new(binary)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        Self(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// The agent's files for `pid` in `dir` ending in `suffix`.
fn files_of(dir: &Path, pid: u32, suffix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let name = p.file_name().unwrap().to_string_lossy().into_owned();
                    name.contains(&format!("-pid{pid}-")) && name.ends_with(suffix)
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// The watch, quick: 1 s readings, 6 of them judged, 2 MiB of growth at least; processes
/// chosen by name so the other tests' processes are not watched.
const QUICK_WATCH: [&str; 6] = [
    "--watch-interval",
    "1s",
    "--history",
    "6",
    "--min-growth",
    "2M",
];

/// Proof 1: with a leaking process and two steady ones watched, the leaker alone is
/// traced; its verdict `leak` and its site `host_leak_step` are in the metrics and in the
/// pprof in the profile directory (`go tool pprof -top` names it); the steady processes
/// are watched but never attached: no probe event, no window, no traced series.
#[test]
fn only_the_leaker_is_traced_and_its_site_is_in_metrics_and_profile() {
    require_root();
    let _serial = one_at_a_time();
    let dir = fresh_dir("leak");
    let leaker = Running::start(&fixture("host_leak", &[]), &["0"]);
    let steady: Vec<Running> = (0..2)
        .map(|_| Running::start(&fixture("steady_churn", &[]), &[]))
        .collect();
    let mut args = QUICK_WATCH.to_vec();
    args.extend([
        "--trace-window",
        "5s",
        "--sample-interval",
        "500ms",
        "--comm",
        "host_leak",
        "--comm",
        "steady_churn",
    ]);
    let agent = Agent::start(&dir, &args);
    let lp = leaker.pid().to_string();
    let leak = [("pid", lp.as_str()), ("verdict", "leak")];
    let m = agent.wait_for("the leaker's verdict", Duration::from_secs(45), |m| {
        sample(m, "alloctrace_traced_verdict_info", &leak) == Some(1.0)
            && sample(m, "alloctrace_traced_active", &[("pid", &lp)]) == Some(0.0)
    });
    let site = [("pid", lp.as_str()), ("function", "host_leak_step")];
    let live = sample(&m, "alloctrace_traced_leak_site_live_bytes", &site);
    assert!(live.is_some_and(|b| b > 0.0), "no leaking site in:\n{m}");
    assert!(sample(&m, "alloctrace_traced_events_total", &[("pid", &lp)]).unwrap() > 0.0);
    // A few more readings: the steady ones stay unflagged while the leaker is backed off.
    std::thread::sleep(Duration::from_secs(3));
    let m = agent.metrics();
    let (status, log) = agent.terminate();
    assert!(status.success(), "{log}");
    for s in &steady {
        let sp = s.pid().to_string();
        let p = [("pid", sp.as_str())];
        assert!(
            sample(&m, "alloctrace_process_anon_resident_bytes", &p).is_some_and(|b| b > 0.0),
            "steady pid {sp} not watched:\n{m}"
        );
        assert_eq!(
            sample(&m, "alloctrace_process_growing", &p),
            Some(0.0),
            "{m}"
        );
        assert!(
            !m.lines().any(
                |l| l.starts_with("alloctrace_traced_") && l.contains(&format!("pid=\"{sp}\""))
            ),
            "steady pid {sp} was traced:\n{m}"
        );
        assert!(!log.contains(&format!("tracing pid {sp} ")), "{log}");
        assert!(
            files_of(&dir, s.pid(), "").is_empty(),
            "a profile of steady pid {sp}"
        );
    }
    assert_eq!(log.matches("tracing pid ").count(), 1, "{log}");
    let profiles = files_of(&dir, leaker.pid(), ".pb.gz");
    assert_eq!(profiles.len(), 1, "{log}");
    let name = profiles[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        name.starts_with("alloctrace-20") && name.ends_with("-host_leak.pb.gz"),
        "{name}"
    );
    let top = go_pprof(&["-top", "-sample_index=inuse_space"], &profiles[0]);
    let first = top
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("flat"))
        .nth(1)
        .unwrap_or_default();
    assert!(first.trim_end().ends_with(" host_leak_step"), "{top}");
    let report: Value = serde_json::from_slice(
        &std::fs::read(&files_of(&dir, leaker.pid(), ".json")[0]).expect("the JSON report"),
    )
    .expect("JSON");
    let process = &report["processes"][0];
    assert_eq!(process["verdict"], "leak", "{report:#}");
    assert_eq!(
        process["sites"][0]["frames"][0]["function"],
        "host_leak_step"
    );
    drop(steady);
    drop(leaker);
    let _ = std::fs::remove_dir_all(&dir);
}
