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
    /// After a failed assertion: SIGTERM first, so the agent removes its tracefs instance.
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
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
    let traps = sample(&m, "alloctrace_traced_traps_total", &[("pid", &lp)]);
    assert!(traps > Some(0.0), "{m}");
    assert!(
        sample(&m, "alloctrace_agent_traps_total", &[]) >= traps,
        "{m}"
    );
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

/// `query` URL-encoded for the Prometheus HTTP API.
fn url_encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A real Prometheus (Debian's `prometheus`), scraping `target` every second; killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Prometheus {
    fn start(target: u16) -> Self {
        let dir = fresh_dir("prometheus");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  \
                 - job_name: alloctrace\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).expect("log file"))
            .spawn()
            .expect("run prometheus (apt install prometheus; cargo xtask setup does)");
        Self { child, port, dir }
    }

    /// The result vector of an instant query (empty until it has the series).
    fn query(&self, query: &str) -> Vec<Value> {
        let path = format!("/api/v1/query?query={}", url_encode(query));
        let Some(body) = http_get(self.port, &path) else {
            return Vec::new();
        };
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// Polls `query` until it returns a series; its result, or a failure with the log.
    fn wait_for(&self, query: &str, limit: Duration) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let result = self.query(query);
            if !result.is_empty() {
                return result;
            }
            assert!(
                start.elapsed() < limit,
                "prometheus has no `{query}` after {limit:?}; its log:\n{}",
                std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Proof 2: a real Prometheus scraping the agent has the leaker's live-bytes series and its
/// verdict, through its own HTTP API.
#[test]
fn prometheus_scrapes_the_leakers_live_bytes_and_verdict() {
    require_root();
    let _serial = one_at_a_time();
    let dir = fresh_dir("prom");
    let leaker = Running::start(&fixture("host_leak", &[]), &["0"]);
    let mut args = QUICK_WATCH.to_vec();
    args.extend([
        "--trace-window",
        "8s",
        "--sample-interval",
        "500ms",
        "--comm",
        "host_leak",
    ]);
    let agent = Agent::start(&dir, &args);
    let prometheus = Prometheus::start(agent.port);
    let pid = leaker.pid();
    let live = prometheus.wait_for(
        &format!("alloctrace_traced_live_bytes{{pid=\"{pid}\"}} > 0"),
        Duration::from_secs(60),
    );
    assert_eq!(live[0]["metric"]["comm"], "host_leak", "{live:?}");
    assert_eq!(live[0]["metric"]["job"], "alloctrace", "{live:?}");
    let verdict = prometheus.wait_for(
        &format!("alloctrace_traced_verdict_info{{pid=\"{pid}\",verdict=\"leak\"}}"),
        Duration::from_secs(60),
    );
    assert_eq!(verdict[0]["value"][1], "1", "{verdict:?}");
    let site = prometheus.wait_for(
        &format!("alloctrace_traced_leak_site_live_bytes{{pid=\"{pid}\"}}"),
        Duration::from_secs(10),
    );
    assert_eq!(site[0]["metric"]["function"], "host_leak_step", "{site:?}");
    let own = prometheus.wait_for("alloctrace_agent_resident_bytes", Duration::from_secs(10));
    assert_eq!(own.len(), 1, "{own:?}");
    let (status, log) = agent.terminate();
    assert!(status.success(), "{log}");
    drop(leaker);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A memory cgroup limited to `limit` bytes and no swap: cgroup v2's `memory.max` where the
/// v2 hierarchy has the memory controller, else v1's `memory.limit_in_bytes` (hosts that
/// keep memory on v1, as this CI's VM). Removed on drop.
struct MemoryCgroup {
    dir: PathBuf,
}

impl MemoryCgroup {
    fn new(name: &str, limit: u64) -> Self {
        let v2 = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
        let root = if v2 {
            "/sys/fs/cgroup"
        } else {
            "/sys/fs/cgroup/memory"
        };
        let dir = Path::new(root).join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let write = |file: &str, value: &str| {
            std::fs::write(dir.join(file), value)
                .unwrap_or_else(|e| panic!("write {value} to {file}: {e}"))
        };
        if v2 {
            write("memory.max", &limit.to_string());
            if dir.join("memory.swap.max").exists() {
                write("memory.swap.max", "0");
            }
        } else {
            write("memory.limit_in_bytes", &limit.to_string());
            if dir.join("memory.memsw.limit_in_bytes").exists() {
                write("memory.memsw.limit_in_bytes", &limit.to_string());
            }
        }
        Self { dir }
    }

    /// `binary` started inside the cgroup (the shell moves itself in, then execs it).
    fn spawn(&self, binary: &Path) -> Child {
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec {}",
                self.dir.display(),
                binary.display()
            ))
            .stdin(Stdio::null())
            .spawn()
            .expect("start in the cgroup")
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Proof 3: a leaking process in a 64 MiB memory cgroup is flagged and traced; when the OOM
/// killer takes it (`oom:mark_victim`), the agent writes its report and profile at once,
/// named `…-oom`, with the leaking site and the verdict so far.
#[test]
fn an_oom_killed_process_gets_its_report_with_the_leaking_site() {
    require_root();
    let _serial = one_at_a_time();
    assert!(
        Path::new("/sys/kernel/tracing/events/oom/mark_victim").exists(),
        "no oom:mark_victim tracepoint (mount tracefs: cargo xtask setup does)"
    );
    let dir = fresh_dir("oom");
    let bin = fixture("oom_leak", &[]);
    let agent = Agent::start(
        &dir,
        &[
            "--watch-interval",
            "500ms",
            "--history",
            "4",
            "--min-growth",
            "2M",
            "--trace-window",
            "60s",
            "--sample-interval",
            "250ms",
            "--comm",
            "oom_leak",
        ],
    );
    let cgroup = MemoryCgroup::new("alloctrace-oom", 64 << 20);
    let mut child = cgroup.spawn(&bin);
    let pid = child.id();
    let status = child.wait().expect("wait for the fixture");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "the OOM killer should have taken it: {status}\n{}",
        agent.log()
    );
    let p = pid.to_string();
    let m = agent.wait_for("the OOM kill's report", Duration::from_secs(20), |m| {
        sample(m, "alloctrace_traced_oom_kills_total", &[("pid", &p)]) == Some(1.0)
            && sample(m, "alloctrace_traced_active", &[("pid", &p)]) == Some(0.0)
    });
    let (status, log) = agent.terminate();
    assert!(status.success(), "{log}");
    assert!(
        log.contains(&format!("pid {pid} (oom_leak): picked by the OOM killer")),
        "{log}"
    );
    assert!(
        sample(&m, "alloctrace_agent_oom_victims_total", &[]) >= Some(1.0),
        "{m}"
    );
    let reports = files_of(&dir, pid, "-oom_leak-oom.json");
    assert_eq!(reports.len(), 1, "{log}");
    assert_eq!(files_of(&dir, pid, "-oom_leak-oom.pb.gz").len(), 1, "{log}");
    let report: Value =
        serde_json::from_slice(&std::fs::read(&reports[0]).expect("read")).expect("JSON");
    let process = &report["processes"][0];
    assert_eq!(process["pid"], pid, "{report:#}");
    assert_eq!(
        process["sites"][0]["frames"][0]["function"], "oom_leak_step",
        "{report:#}"
    );
    assert_eq!(process["sites"][0]["verdict"], "leak", "{report:#}");
    assert_eq!(process["verdict"], "leak", "{report:#}");
    drop(cgroup);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Proof 4a: over many windows (the leaker traced again and again) the agent's files in the
/// profile directory never take more than `--profile-dir-max-bytes`: room is made, the
/// oldest first, before each file is written.
#[test]
fn the_profile_directory_never_exceeds_its_limit() {
    require_root();
    let _serial = one_at_a_time();
    let dir = fresh_dir("rotate");
    const LIMIT: u64 = 48 << 10;
    let leaker = Running::start(&fixture("host_leak", &[]), &["0"]);
    let mut args = QUICK_WATCH.to_vec();
    let limit = LIMIT.to_string();
    args.extend([
        "--trace-window",
        "1s",
        "--sample-interval",
        "250ms",
        "--backoff",
        "0s",
        "--profile-dir-max-bytes",
        &limit,
        "--comm",
        "host_leak",
    ]);
    let agent = Agent::start(&dir, &args);
    let start = Instant::now();
    let mut most = 0;
    let mut metrics = String::new();
    while start.elapsed() < Duration::from_secs(60) {
        let bytes: u64 = std::fs::read_dir(&dir)
            .map(|e| {
                e.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        most = most.max(bytes);
        assert!(
            bytes <= LIMIT,
            "{bytes} bytes in {} (limit {LIMIT})",
            dir.display()
        );
        metrics = agent.metrics();
        if sample(&metrics, "alloctrace_agent_profiles_removed_total", &[]) >= Some(6.0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let removed = sample(&metrics, "alloctrace_agent_profiles_removed_total", &[]);
    assert!(
        removed >= Some(6.0),
        "too few rotations:\n{}\n{metrics}",
        agent.log()
    );
    let windows = sample(&metrics, "alloctrace_agent_windows_total", &[]).unwrap_or(0.0);
    eprintln!(
        "profile dir: at most {most} bytes of {LIMIT} over {windows} windows, {removed:?} files removed"
    );
    let (status, log) = agent.terminate();
    assert!(status.success(), "{log}");
    assert!(
        !files_of(&dir, leaker.pid(), ".pb.gz").is_empty(),
        "the newest stay: {log}"
    );
    drop(leaker);
    let _ = std::fs::remove_dir_all(&dir);
}

/// VmRSS of `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// Starts `n` short-lived processes, `at_once` at a time, each living 300 ms.
fn churn(binary: &Path, n: usize, at_once: usize) {
    let mut running: Vec<Child> = Vec::new();
    for _ in 0..n {
        if running.len() >= at_once {
            let _ = running.remove(0).wait();
        }
        running.push(
            Command::new(binary)
                .arg("300")
                .stdin(Stdio::null())
                .spawn()
                .expect("start short_lived"),
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    for mut c in running {
        let _ = c.wait();
    }
}

/// Proof 4b: hundreds of short-lived processes come and go under the watch; the agent
/// watches them (its count rises) and forgets them as they end: its count goes back down
/// and its RSS after a second batch of 400 is what it was after the first.
#[test]
fn the_agents_memory_stays_bounded_over_hundreds_of_short_lived_processes() {
    require_root();
    let _serial = one_at_a_time();
    let dir = fresh_dir("rss");
    let bin = fixture("short_lived", &[]);
    let agent = Agent::start(
        &dir,
        &[
            "--watch-interval",
            "100ms",
            "--history",
            "8",
            "--comm",
            "short_lived",
        ],
    );
    let most = Arc::new(Mutex::new(0f64));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let port = agent.port;
    let watcher = {
        let (most, stop) = (most.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let m = http_get(port, "/metrics").unwrap_or_default();
                if let Some(w) = sample(&m, "alloctrace_agent_watched_processes", &[]) {
                    let mut most = most.lock().unwrap();
                    *most = most.max(w);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    churn(&bin, 400, 20);
    std::thread::sleep(Duration::from_millis(500));
    let first = rss(agent.pid());
    churn(&bin, 400, 20);
    std::thread::sleep(Duration::from_millis(500));
    let second = rss(agent.pid());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    watcher.join().expect("the metrics reader");
    let m = agent.wait_for(
        "the short-lived ones forgotten",
        Duration::from_secs(5),
        |m| sample(m, "alloctrace_agent_watched_processes", &[]) == Some(0.0),
    );
    let most = *most.lock().unwrap();
    eprintln!(
        "agent RSS: {first} bytes after 400 short-lived processes, {second} after 800; \
         at most {most} watched at once"
    );
    assert!(
        most >= 5.0,
        "the short-lived processes were not watched: {most}\n{m}"
    );
    assert!(
        second <= first + (1 << 20),
        "the agent's RSS grew from {first} to {second} bytes over 400 more processes"
    );
    assert!(second < 64 << 20, "the agent's RSS is {second} bytes\n{m}");
    let (status, log) = agent.terminate();
    assert!(status.success(), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGHUP rereads `--config` (a changed watch interval shows in the metrics); SIGTERM ends
/// the running window and writes its report before the agent exits 0.
#[test]
fn sighup_reloads_the_config_and_sigterm_finishes_the_window() {
    require_root();
    let _serial = one_at_a_time();
    let dir = fresh_dir("signals");
    let config = dir.join("agent.conf");
    std::fs::write(
        &config,
        "# quick\nwatch-interval = 1s\ntrace-window = 10m\n",
    )
    .expect("write");
    let leaker = Running::start(&fixture("host_leak", &[]), &["0"]);
    let profiles = dir.join("profiles");
    let conf = config.to_string_lossy().into_owned();
    let agent = Agent::start(
        &profiles,
        &[
            "--config",
            &conf,
            "--history",
            "6",
            "--min-growth",
            "2M",
            "--sample-interval",
            "500ms",
            "--comm",
            "host_leak",
        ],
    );
    let m = agent.metrics();
    assert_eq!(
        sample(&m, "alloctrace_agent_watch_interval_seconds", &[]),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "alloctrace_agent_trace_window_seconds", &[]),
        Some(600.0)
    );
    let lp = leaker.pid().to_string();
    // Until the window's interim reports already say `leak` (a window cut after a second or
    // two of sampling can still say `stable`: too few samples to call it).
    agent.wait_for("a window on the leaker", Duration::from_secs(45), |m| {
        sample(m, "alloctrace_traced_active", &[("pid", &lp)]) == Some(1.0)
            && sample(
                m,
                "alloctrace_traced_verdict_info",
                &[("pid", &lp), ("verdict", "leak")],
            ) == Some(1.0)
    });
    // A few more samples: the window's final report is judged on its own series, and one
    // cut within a second of its start has three points (see `analysis::site`).
    std::thread::sleep(Duration::from_secs(2));
    std::fs::write(&config, "watch-interval = 2s\ntrace-window = 10m\n").expect("rewrite");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
    agent.wait_for("the reload", Duration::from_secs(10), |m| {
        sample(m, "alloctrace_agent_config_reloads_total", &[]) == Some(1.0)
            && sample(m, "alloctrace_agent_watch_interval_seconds", &[]) == Some(2.0)
    });
    assert_eq!(
        sample(
            &agent.metrics(),
            "alloctrace_traced_active",
            &[("pid", &lp)]
        ),
        Some(1.0),
        "SIGHUP must not end the window"
    );
    let asked = Instant::now();
    let (status, log) = agent.terminate();
    assert!(status.success(), "{log}");
    assert!(asked.elapsed() < Duration::from_secs(20), "{log}");
    assert!(log.contains("SIGTERM: finishing 1 window(s)"), "{log}");
    // On failure, the window's own report says why it judged as it did.
    let report = files_of(&profiles, leaker.pid(), ".json")
        .first()
        .and_then(|f| std::fs::read_to_string(f).ok())
        .unwrap_or_default();
    assert!(
        log.contains(&format!(
            "pid {lp} (host_leak): leak at host_leak_step (window cut short)"
        )),
        "{log}\n{report}"
    );
    assert_eq!(
        files_of(&profiles, leaker.pid(), ".pb.gz").len(),
        1,
        "{log}"
    );
    drop(leaker);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bad input gets one clear line and exit status 1 (2 for usage), never a panic: a port in
/// use, a profile directory that cannot be written, a config file with a bad line.
#[test]
fn bad_input_gets_clear_errors() {
    require_root();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("address").port();
    let dir = fresh_dir("errors");
    let run = |args: &[&str]| {
        let out = Command::new(alloctrace())
            .arg("agent")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run alloctrace agent");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let d = dir.to_string_lossy().into_owned();
    let (code, err) = run(&[
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--profile-dir",
        &d,
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot serve metrics on 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(
        err.contains("--listen") && !err.contains("panicked"),
        "{err}"
    );
    let (code, err) = run(&["--profile-dir", "/proc/self/alloctrace"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot write profiles to /proc/self/alloctrace"),
        "{err}"
    );
    let conf = dir.join("bad.conf");
    std::fs::write(&conf, "watch-interval = soon\n").expect("write");
    let c = conf.to_string_lossy().into_owned();
    let (code, err) = run(&["--config", &c, "--profile-dir", &d]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("bad.conf") && err.contains("soon"), "{err}");
    let (code, err) = run(&["--watch-interval", "0s"]);
    assert_eq!(code, Some(2), "{err}");
    drop(taken);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The capabilities `deploy/daemonset.yaml` grants (`add`), as `setpriv` names them.
fn daemonset_capabilities() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    let m: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(path).expect("the manifest"))
            .expect("YAML");
    m["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
        .as_sequence()
        .expect("capabilities.add")
        .iter()
        .map(|c| c.as_str().expect("a name").to_ascii_lowercase())
        .collect()
}

/// The DaemonSet's privileges are enough: the agent as uid 0 with only the capabilities the
/// manifest grants (everything else out of its bounding set) watches, traces the leaker to
/// its site and sets up its OOM tracepoint.
#[test]
fn the_daemonsets_capabilities_are_enough() {
    require_root();
    let _serial = one_at_a_time();
    let dir = fresh_dir("caps");
    let caps = daemonset_capabilities();
    let bounding = format!(
        "-all,{}",
        caps.iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let leaker = Running::start(&fixture("host_leak", &[]), &["0"]);
    let port = free_port();
    let mut child = Command::new("setpriv")
        .args(["--bounding-set", &bounding, "--"])
        .arg(alloctrace())
        .args([
            "agent",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--profile-dir",
        ])
        .arg(&dir)
        .args(QUICK_WATCH)
        .args([
            "--trace-window",
            "4s",
            "--sample-interval",
            "500ms",
            "--comm",
            "host_leak",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("setpriv (util-linux) runs the agent");
    let log = Arc::new(Mutex::new(String::new()));
    let stderr = BufReader::new(child.stderr.take().expect("piped"));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            sink.lock().unwrap().push_str(&(line + "\n"));
        }
    });
    let agent = Agent { child, port, log };
    let lp = leaker.pid().to_string();
    agent.wait_for(
        "the leak, with the manifest's capabilities",
        Duration::from_secs(45),
        |m| {
            sample(
                m,
                "alloctrace_traced_verdict_info",
                &[("pid", &lp), ("verdict", "leak")],
            ) == Some(1.0)
                && sample(m, "alloctrace_traced_active", &[("pid", &lp)]) == Some(0.0)
        },
    );
    let effective = std::fs::read_to_string(format!("/proc/{}/status", agent.pid()))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_owned()))
        .expect("CapEff");
    // CAP_SYS_PTRACE (19), CAP_PERFMON (38), CAP_BPF (39) alone.
    assert_eq!(effective, "000000c000080000", "{caps:?}");
    let (status, log) = agent.terminate();
    assert!(status.success(), "{log}");
    assert!(!log.contains("OOM kills will not be reported"), "{log}");
    assert!(log.contains("leak at host_leak_step"), "{log}");
    drop(leaker);
    let _ = std::fs::remove_dir_all(&dir);
}
