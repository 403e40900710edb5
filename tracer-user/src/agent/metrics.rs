//! Prometheus metrics: what the agent knows, rendered in the text exposition format
//! (`alloctrace_*`, base units, counters ending in `_total`, labels bounded to pid, comm and
//! cgroup — never a stack), and a minimal HTTP server for `GET /metrics`. Owns no decisions.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use super::watch::Watcher;
use crate::{
    analysis::SiteVerdict,
    report::{ProcessReport, Report},
};

/// Leaking sites exported per traced process at most (their innermost function only).
const LEAK_SITES: usize = 5;

/// What the windows found in one process, over all its windows.
#[derive(Clone, Debug, Default)]
pub struct TracedStats {
    pub comm: String,
    pub cgroup: String,
    pub live_bytes: u64,
    pub retained_bytes: Option<u64>,
    pub verdict: Option<String>,
    /// (innermost function, live bytes) of its leaking sites, the largest first.
    pub leak_sites: Vec<(String, u64)>,
    /// Totals of the windows that ended, and of the one running.
    pub ended: Counts,
    pub current: Counts,
    pub windows: u64,
    pub active: bool,
    pub oom_kills: u64,
    /// When its last window ended (monotonic ns), to forget the oldest first.
    pub ended_ns: u64,
}

/// Events, drops and probe hits of one window, or summed over windows.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub events: u64,
    pub dropped: u64,
    pub traps: u64,
}

impl Counts {
    pub fn add(&mut self, other: Counts) {
        self.events += other.events;
        self.dropped += other.dropped;
        self.traps += other.traps;
    }
}

impl TracedStats {
    /// Takes in a window's report of process `pid` (the latest image of it).
    pub fn absorb(&mut self, report: &Report, pid: u32) {
        self.current = Counts {
            events: report.events.received,
            dropped: report.events.dropped,
            traps: process(report, pid).map_or(0, |p| p.traps),
        };
        let Some(p) = process(report, pid) else {
            return;
        };
        self.live_bytes = p.live_bytes;
        self.retained_bytes = p.retained_bytes;
        self.verdict = p
            .verdict
            .and_then(|v| serde_json::to_value(v).ok())
            .and_then(|v| v.as_str().map(str::to_owned));
        self.leak_sites = p
            .sites
            .iter()
            .filter(|s| s.assessment.verdict == SiteVerdict::Leak)
            .filter_map(|s| Some((s.frames.first()?.function.clone(), s.live_bytes)))
            .collect();
        self.leak_sites.sort_by_key(|s| std::cmp::Reverse(s.1));
        self.leak_sites.truncate(LEAK_SITES);
    }

    /// The window ended: its counts join the totals.
    pub fn close_window(&mut self, now_ns: u64) {
        let current = std::mem::take(&mut self.current);
        self.ended.add(current);
        self.active = false;
        self.ended_ns = now_ns;
    }

    pub fn totals(&self) -> Counts {
        let mut c = self.ended;
        c.add(self.current);
        c
    }
}

/// The traced process's own (latest image) report.
pub fn process(report: &Report, pid: u32) -> Option<&ProcessReport> {
    report
        .processes
        .iter()
        .filter(|p| p.pid == pid)
        .max_by_key(|p| p.image)
}

/// The agent's own numbers.
#[derive(Clone, Debug, Default)]
pub struct AgentStats {
    pub watched: usize,
    pub over_limit: u64,
    pub windows_total: u64,
    pub window_errors_total: u64,
    pub windows_cut_total: u64,
    pub deferred_total: u64,
    pub oom_victims_total: u64,
    /// Probe hits, events and drops of every window (ended ones, then the running ones).
    pub traps_total: u64,
    pub events_total: u64,
    pub dropped_total: u64,
    pub cpu_seconds_total: f64,
    pub resident_bytes: u64,
    pub trap_cost_seconds: f64,
    pub estimated_cpu_cores: f64,
    pub cpu_budget_cores: f64,
    pub profile_dir_bytes: u64,
    pub profile_dir_max_bytes: u64,
    pub profiles_removed_total: u64,
    pub profiles_skipped_total: u64,
    pub watch_interval: Duration,
    pub trace_window: Duration,
    pub reloads_total: u64,
}

/// One metric family: HELP, TYPE, then its samples.
struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// A label value as the exposition format wants it.
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The whole exposition.
pub fn render(
    watcher: &Watcher,
    traced: &BTreeMap<u32, TracedStats>,
    agent: &AgentStats,
) -> String {
    let mut out = String::new();
    let mut f = Family { out: &mut out };
    render_watched(&mut f, watcher);
    render_traced(&mut f, traced);
    render_agent(&mut f, agent);
    out
}

fn render_watched(f: &mut Family<'_>, watcher: &Watcher) {
    let mut procs: Vec<_> = watcher.procs.iter().collect();
    procs.sort_by_key(|(pid, _)| **pid);
    type Value = fn(&super::watch::Watched) -> f64;
    let families: [(&str, &str, Value); 4] = [
        (
            "alloctrace_process_resident_bytes",
            "Resident memory (VmRSS) of a watched process.",
            |w| w.last.resident_bytes as f64,
        ),
        (
            "alloctrace_process_anon_resident_bytes",
            "Resident anonymous memory (RssAnon) of a watched process: its heaps' footprint.",
            |w| w.last.anon_bytes as f64,
        ),
        (
            "alloctrace_process_growth_bytes_per_second",
            "Growth of resident anonymous memory, least-squares over the watch history (0 until it has 4 readings).",
            |w| w.growth.as_ref().map_or(0.0, |g| g.bytes_per_s),
        ),
        (
            "alloctrace_process_growing",
            "1 when the watch flags the process as growing (a straight climb, R2 >= 0.8, still rising).",
            |w| f64::from(u8::from(w.growing)),
        ),
    ];
    for (name, help, value) in families {
        f.head(name, "gauge", help);
        for (pid, w) in &procs {
            let pid = pid.to_string();
            let labels = [
                ("pid", pid.as_str()),
                ("comm", &w.comm),
                ("cgroup", &w.cgroup),
            ];
            f.sample(name, &labels, value(w));
        }
    }
}

fn render_traced(f: &mut Family<'_>, traced: &BTreeMap<u32, TracedStats>) {
    type Value = fn(&TracedStats) -> Option<f64>;
    let families: [(&str, &str, &str, Value); 9] = [
        (
            "alloctrace_traced_live_bytes",
            "gauge",
            "Live heap bytes of a traced process at its latest window's latest sample (an estimate when sampled).",
            |t| Some(t.live_bytes as f64),
        ),
        (
            "alloctrace_traced_retained_bytes",
            "gauge",
            "Footprint known to be freed memory the allocator kept, at the latest window's end.",
            |t| t.retained_bytes.map(|b| b as f64),
        ),
        (
            "alloctrace_traced_active",
            "gauge",
            "1 while a window traces the process.",
            |t| Some(f64::from(u8::from(t.active))),
        ),
        (
            "alloctrace_traced_windows_total",
            "counter",
            "Diagnostic windows started on the process.",
            |t| Some(t.windows as f64),
        ),
        (
            "alloctrace_traced_events_total",
            "counter",
            "Events received from the process's probes, all windows.",
            |t| Some(t.totals().events as f64),
        ),
        (
            "alloctrace_traced_dropped_events_total",
            "counter",
            "Events lost in the process's windows (any cause).",
            |t| Some(t.totals().dropped as f64),
        ),
        (
            "alloctrace_traced_traps_total",
            "counter",
            "Probe hits (traps into the kernel) the process took in its windows.",
            |t| Some(t.totals().traps as f64),
        ),
        (
            "alloctrace_traced_oom_kills_total",
            "counter",
            "Times the OOM killer picked the process while it was traced.",
            |t| Some(t.oom_kills as f64),
        ),
        (
            "alloctrace_traced_verdict_info",
            "gauge",
            "The latest window's verdict (leak, fragmentation, stable, none) as a label; always 1.",
            |t| Some(if t.windows > 0 { 1.0 } else { 0.0 }),
        ),
    ];
    for (name, kind, help, value) in families {
        f.head(name, kind, help);
        for (pid, t) in traced {
            let Some(v) = value(t) else { continue };
            let pid = pid.to_string();
            let mut labels = vec![
                ("pid", pid.as_str()),
                ("comm", &t.comm),
                ("cgroup", &t.cgroup),
            ];
            if name == "alloctrace_traced_verdict_info" {
                labels.push(("verdict", t.verdict.as_deref().unwrap_or("none")));
            }
            f.sample(name, &labels, v);
        }
    }
    let name = "alloctrace_traced_leak_site_live_bytes";
    f.head(name, "gauge", "Live bytes of a leaking site of a traced process, by its innermost function (the largest five).");
    for (pid, t) in traced {
        let pid = pid.to_string();
        for (function, live) in &t.leak_sites {
            let labels = [
                ("pid", pid.as_str()),
                ("comm", &t.comm),
                ("cgroup", &t.cgroup),
                ("function", function),
            ];
            f.sample(name, &labels, *live as f64);
        }
    }
}

/// The agent's own metrics: name, type, help, value.
type AgentMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&AgentStats) -> f64,
);

const AGENT_METRICS: [AgentMetric; 22] = [
    (
        "alloctrace_agent_watched_processes",
        "gauge",
        "Processes watched.",
        |a| a.watched as f64,
    ),
    (
        "alloctrace_agent_unwatched_processes",
        "gauge",
        "Processes not watched at the last scan: past --max-watched.",
        |a| a.over_limit as f64,
    ),
    (
        "alloctrace_agent_windows_total",
        "counter",
        "Diagnostic windows started.",
        |a| a.windows_total as f64,
    ),
    (
        "alloctrace_agent_window_errors_total",
        "counter",
        "Windows that could not trace their process.",
        |a| a.window_errors_total as f64,
    ),
    (
        "alloctrace_agent_windows_cut_total",
        "counter",
        "Windows ended early (CPU budget, OOM kill, shutdown).",
        |a| a.windows_cut_total as f64,
    ),
    (
        "alloctrace_agent_deferred_total",
        "counter",
        "Times a growing process waited: --max-concurrent or the CPU budget.",
        |a| a.deferred_total as f64,
    ),
    (
        "alloctrace_agent_oom_victims_total",
        "counter",
        "Processes the OOM killer picked, traced or not.",
        |a| a.oom_victims_total as f64,
    ),
    (
        "alloctrace_agent_traps_total",
        "counter",
        "Probe hits the traced processes took, all windows.",
        |a| a.traps_total as f64,
    ),
    (
        "alloctrace_agent_events_total",
        "counter",
        "Events received, all windows.",
        |a| a.events_total as f64,
    ),
    (
        "alloctrace_agent_dropped_events_total",
        "counter",
        "Events lost, all windows (any cause).",
        |a| a.dropped_total as f64,
    ),
    (
        "alloctrace_agent_cpu_seconds_total",
        "counter",
        "CPU time of the agent itself (all its threads).",
        |a| a.cpu_seconds_total,
    ),
    (
        "alloctrace_agent_resident_bytes",
        "gauge",
        "Resident memory of the agent.",
        |a| a.resident_bytes as f64,
    ),
    (
        "alloctrace_agent_trap_cost_seconds",
        "gauge",
        "Measured cost of one probe hit.",
        |a| a.trap_cost_seconds,
    ),
    (
        "alloctrace_agent_estimated_cpu_cores",
        "gauge",
        "Estimated CPU tracing costs now: traced processes' probe hits per second times their cost, plus the agent's own.",
        |a| a.estimated_cpu_cores,
    ),
    (
        "alloctrace_agent_cpu_budget_cores",
        "gauge",
        "The CPU budget (--cpu-budget).",
        |a| a.cpu_budget_cores,
    ),
    (
        "alloctrace_agent_profile_dir_bytes",
        "gauge",
        "Bytes of the agent's files in the profile directory.",
        |a| a.profile_dir_bytes as f64,
    ),
    (
        "alloctrace_agent_profile_dir_max_bytes",
        "gauge",
        "The profile directory's limit (--profile-dir-max-bytes).",
        |a| a.profile_dir_max_bytes as f64,
    ),
    (
        "alloctrace_agent_profiles_removed_total",
        "counter",
        "Profile and report files removed to stay under the limit.",
        |a| a.profiles_removed_total as f64,
    ),
    (
        "alloctrace_agent_profiles_skipped_total",
        "counter",
        "Files not written: larger than the whole limit.",
        |a| a.profiles_skipped_total as f64,
    ),
    (
        "alloctrace_agent_watch_interval_seconds",
        "gauge",
        "The watch interval.",
        |a| a.watch_interval.as_secs_f64(),
    ),
    (
        "alloctrace_agent_trace_window_seconds",
        "gauge",
        "The diagnostic window's length.",
        |a| a.trace_window.as_secs_f64(),
    ),
    (
        "alloctrace_agent_config_reloads_total",
        "counter",
        "Configuration reloads (SIGHUP).",
        |a| a.reloads_total as f64,
    ),
];

fn render_agent(f: &mut Family<'_>, a: &AgentStats) {
    for (name, kind, help, value) in AGENT_METRICS {
        f.head(name, kind, help);
        f.sample(name, &[], value(a));
    }
}

/// Binds the metrics address; a clear error when it cannot.
pub async fn bind(addr: std::net::SocketAddr) -> crate::error::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| crate::Error::Io {
            what: format!(
                "cannot serve metrics on {addr} (in use, or not an address of this host: choose \
             another with --listen)"
            ),
            source,
        })
}

/// Serves the latest exposition to every `GET /metrics`, forever.
pub async fn serve(listener: TcpListener, page: Arc<Mutex<String>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await; // out of fds: retry
            continue;
        };
        let page = page.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(stream, &page)).await;
        });
    }
}

/// One request: the head read (at most 8 KiB), one response, the connection closed.
async fn answer(mut stream: TcpStream, page: &Mutex<String>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, kind, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            page.lock().map(|p| p.clone()).unwrap_or_default(),
        ),
        ("GET" | "HEAD", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "alloctrace agent: metrics at /metrics\n".to_owned(),
        ),
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        response.push_str(&body);
    }
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped_and_families_typed() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let mut traced = BTreeMap::new();
        traced.insert(
            7,
            TracedStats {
                comm: "leaky".into(),
                verdict: Some("leak".into()),
                leak_sites: vec![("leak_step".into(), 4096)],
                windows: 1,
                ..TracedStats::default()
            },
        );
        let text = render(&Watcher::default(), &traced, &AgentStats::default());
        assert!(text.contains(
            "alloctrace_traced_verdict_info{pid=\"7\",comm=\"leaky\",cgroup=\"\",verdict=\"leak\"} 1\n"
        ), "{text}");
        assert!(text.contains("function=\"leak_step\"} 4096\n"), "{text}");
        assert!(text.contains("# TYPE alloctrace_traced_events_total counter\n"));
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let name = line.split_whitespace().nth(2).unwrap_or_default();
            assert!(name.starts_with("alloctrace_"), "{line}");
            assert_eq!(
                line.ends_with("counter"),
                name.ends_with("_total"),
                "{line}"
            );
        }
    }
}
