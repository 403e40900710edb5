//! `alloctrace agent`: a long-running service that watches every process's memory cheaply
//! (`watch`: `/proc` only, no probes), traces the ones that grow for a bounded window each
//! (`window`, reusing the `attach` session with probes scoped to that pid), within a number
//! of windows and a CPU budget (`schedule`), writes each window's profile and report
//! (`profiles`, and at once when the OOM killer picks a traced process: `oom`) and serves
//! what it knows as Prometheus metrics (`metrics`). This module owns the event loop, the
//! configuration and its reload; the stages own everything else.

mod metrics;
mod oom;
mod profiles;
mod schedule;
mod watch;
mod window;

use std::{
    collections::BTreeMap,
    ffi::OsString,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use clap::Parser as _;
use rustc_hash::FxHashMap;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use self::{
    metrics::{AgentStats, TracedStats},
    profiles::{Occasion, ProfileDir},
    schedule::{Backoff, Load},
    watch::{WatchSettings, Watcher},
    window::{Window, WindowMsg, WindowSettings},
};
use crate::{
    cli::{AgentArgs, Cli, Command},
    error::{Error, Result},
    privileges, procfs,
    session::{self, SystemTarget, system::Filters},
};

/// Processes gone whose traced metrics are kept (so a scrape after an OOM kill sees them).
const GONE_TRACED_KEPT: usize = 64;
/// How long SIGTERM waits for the running windows' reports.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Cost of one probe hit assumed when it cannot be measured (this VM measures ≈ 0.6–1 µs).
const FALLBACK_TRAP_NS: f64 = 1000.0;

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(cli: AgentArgs) -> Result<()> {
    privileges::check()?;
    let args = with_config_file(&cli)?;
    let filters = filters(&args)?;
    let profiles = ProfileDir::open(&args.profile_dir, args.profile_dir_max_bytes)?;
    let runtime = crate::session::current_thread_runtime()?;
    runtime.block_on(async move {
        let listener = metrics::bind(args.listen).await?;
        let trap_ns = session::measure_trap_ns().unwrap_or_else(|e| {
            log(&format!(
                "cannot measure a probe hit's cost ({e}); assuming {FALLBACK_TRAP_NS} ns"
            ));
            FALLBACK_TRAP_NS
        });
        let page = Arc::new(Mutex::new(String::new()));
        tokio::spawn(metrics::serve(listener, page.clone()));
        let (tx, rx) = mpsc::unbounded_channel();
        let (oom_tx, oom_rx) = mpsc::unbounded_channel();
        let _oom = oom::OomWatch::start(move |pid| {
            let _ = oom_tx.send(pid);
        })
        .map_err(|e| log(&format!("OOM kills will not be reported: {e}")))
        .ok();
        let mut agent = Agent::new(cli, args, filters, profiles, trap_ns, tx, page);
        log(&format!(
            "watching {} processes every {:?}; metrics on http://{}/metrics; profiles in {}",
            agent.watcher.procs.len(),
            agent.args.watch_interval,
            agent.args.listen,
            agent.profiles.dir.display()
        ));
        agent.serve(rx, oom_rx).await
    })
}

/// One line on stderr: what the agent did.
fn log(line: &str) {
    eprintln!("alloctrace agent: {line}");
}

/// The options: the command line's, then those of `--config` over them.
fn with_config_file(cli: &AgentArgs) -> Result<AgentArgs> {
    let Some(path) = &cli.config else {
        return Ok(cli.clone());
    };
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        what: format!("cannot read --config {}", path.display()),
        source,
    })?;
    let mut argv: Vec<OsString> = std::env::args_os().collect();
    argv.extend(config_words(&text).map_err(|message| Error::Usage {
        message: format!("{}: {message}", path.display()),
    })?);
    match Cli::try_parse_from(argv) {
        Ok(Cli {
            command: Command::Agent(args),
            ..
        }) => Ok(args),
        Ok(_) => Ok(cli.clone()),
        Err(e) => Err(Error::Usage {
            message: format!(
                "{}: {}",
                path.display(),
                e.to_string().lines().next().unwrap_or("invalid option")
            ),
        }),
    }
}

/// `name = value` lines (`#` comments) as the long options they stand for.
fn config_words(text: &str) -> std::result::Result<Vec<OsString>, String> {
    let mut words = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (name, value) = match line.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
            None => (line, None),
        };
        if name.is_empty() || name.starts_with('-') || name == "config" {
            return Err(format!("line {}: `{line}` is not `name = value`", n + 1));
        }
        words.push(format!("--{name}").into());
        words.extend(value.map(OsString::from));
    }
    Ok(words)
}

/// The processes watched: `--comm`, `--exclude-comm`, `--cgroup`, as `system` reads them.
fn filters(args: &AgentArgs) -> Result<Filters> {
    Filters::resolve(&SystemTarget {
        pids: Vec::new(),
        comms: args.filters.comms.clone(),
        exclude_comms: args.filters.exclude_comms.clone(),
        cgroups: args.filters.cgroups.clone(),
    })
}

/// Everything the agent holds; bounded by the watched processes and `GONE_TRACED_KEPT`.
struct Agent {
    /// The command line as given (reread with the config file on SIGHUP).
    cli: AgentArgs,
    args: AgentArgs,
    filters: Filters,
    watcher: Watcher,
    traced: BTreeMap<u32, TracedStats>,
    windows: FxHashMap<u32, Window>,
    backoff: Backoff,
    profiles: ProfileDir,
    stats: AgentStats,
    trap_ns: f64,
    tx: mpsc::UnboundedSender<WindowMsg>,
    page: Arc<Mutex<String>>,
    /// Probe hits, events and drops of the windows that ended.
    closed: metrics::Counts,
    /// The agent's CPU seconds at the last scan, and its CPU rate since, in cores.
    cpu: (Instant, f64, f64),
    stopping: Option<Instant>,
}

impl Agent {
    fn new(
        cli: AgentArgs,
        args: AgentArgs,
        filters: Filters,
        profiles: ProfileDir,
        trap_ns: f64,
        tx: mpsc::UnboundedSender<WindowMsg>,
        page: Arc<Mutex<String>>,
    ) -> Self {
        let mut agent = Self {
            cli,
            args,
            filters,
            watcher: Watcher::default(),
            traced: BTreeMap::new(),
            windows: FxHashMap::default(),
            backoff: Backoff::default(),
            profiles,
            stats: AgentStats {
                trap_cost_seconds: trap_ns / 1e9,
                ..AgentStats::default()
            },
            trap_ns,
            tx,
            page,
            closed: metrics::Counts::default(),
            cpu: (Instant::now(), procfs::self_usage().0, 0.0),
            stopping: None,
        };
        agent.scan();
        agent
    }

    /// The event loop: scans, window reports, OOM kills, signals.
    async fn serve(
        &mut self,
        mut rx: mpsc::UnboundedReceiver<WindowMsg>,
        mut oom_rx: mpsc::UnboundedReceiver<u32>,
    ) -> Result<()> {
        let catch = |kind| {
            signal(kind).map_err(|source| Error::Io {
                what: "cannot catch SIGTERM, SIGINT and SIGHUP".into(),
                source,
            })
        };
        let (mut term, mut int, mut hup) = (
            catch(SignalKind::terminate())?,
            catch(SignalKind::interrupt())?,
            catch(SignalKind::hangup())?,
        );
        let mut tick = ticker(self.args.watch_interval);
        loop {
            tokio::select! {
                _ = tick.tick() => self.scan(),
                Some(msg) = rx.recv() => self.window_msg(msg),
                Some(pid) = oom_rx.recv() => self.oom_kill(pid),
                _ = term.recv() => self.stop("SIGTERM"),
                _ = int.recv() => self.stop("SIGINT"),
                _ = hup.recv() => if self.reload() {
                    tick = ticker(self.args.watch_interval);
                },
            }
            self.publish();
            if let Some(since) = self.stopping {
                if self.windows.is_empty() {
                    return Ok(());
                }
                if since.elapsed() > SHUTDOWN_GRACE {
                    log("windows did not end in time; exiting without their reports");
                    return Ok(());
                }
            }
        }
    }

    /// Reads every process, ends windows over the budget, starts windows on growing ones.
    fn scan(&mut self) {
        let admits = |pid| self.filters.admits(pid);
        let settings = WatchSettings {
            admits: &admits,
            history: usize::from(self.args.history),
            min_growth: self.args.min_growth,
            max_watched: self.args.max_watched,
        };
        self.watcher.scan(&settings, procfs::monotonic_ns());
        let now = Instant::now();
        let (at, cpu_then, _) = self.cpu;
        let cpu_now = procfs::self_usage().0;
        let wall = now.duration_since(at).as_secs_f64();
        let rate = if wall > 0.0 {
            (cpu_now - cpu_then) / wall
        } else {
            0.0
        };
        self.cpu = (now, cpu_now, rate);
        let watched = &self.watcher.procs;
        self.backoff.prune(now, |pid| watched.contains_key(&pid));
        self.enforce_budget();
        self.schedule(now);
        self.forget_gone();
    }

    /// Estimated cores tracing costs now: each window's probe hits, and the agent's own CPU.
    fn estimated_cores(&self) -> f64 {
        let windows: f64 = self
            .windows
            .iter()
            .map(|(pid, w)| self.window_cores(*pid, w))
            .sum();
        windows + self.cpu.2
    }

    fn window_cores(&self, pid: u32, w: &Window) -> f64 {
        let traps = self.traced.get(&pid).map_or(0, |t| t.current.traps);
        schedule::trap_cores(traps, w.started.elapsed(), self.trap_ns)
    }

    /// Ends a window whose process alone costs more than the budget.
    fn enforce_budget(&mut self) {
        let over: Vec<u32> = self
            .windows
            .iter()
            .filter(|(pid, w)| self.window_cores(**pid, w) > self.args.cpu_budget)
            .map(|(pid, _)| *pid)
            .collect();
        for pid in over {
            if let Some(w) = self.windows.get_mut(&pid) {
                log(&format!(
                    "pid {pid} ({}): over the CPU budget, window ended",
                    w.comm
                ));
                w.end("over the CPU budget");
            }
        }
    }

    /// Starts windows on growing processes, as the schedule allows.
    fn schedule(&mut self, now: Instant) {
        if self.stopping.is_some() {
            return;
        }
        let growing = self.watcher.growing();
        let load = Load {
            active: self.windows.len(),
            max_concurrent: usize::from(self.args.max_concurrent),
            estimated_cores: self.estimated_cores(),
            budget_cores: self.args.cpu_budget,
        };
        let (start, deferred) = schedule::choose(
            &growing,
            |pid| !self.windows.contains_key(&pid) && !self.backoff.waiting(pid, now),
            &load,
        );
        self.stats.deferred_total += deferred;
        for pid in start {
            self.start_window(pid);
        }
    }

    fn start_window(&mut self, pid: u32) {
        let Some(w) = self.watcher.procs.get(&pid) else {
            return;
        };
        let (comm, cgroup) = (w.comm.clone(), w.cgroup.clone());
        let growth = w.growth.as_ref().map_or(0.0, |g| g.bytes_per_s);
        let settings = WindowSettings {
            length: self.args.trace_window,
            interval: self.args.sample_interval,
            sample_bytes: self.args.sample_bytes,
            ring_mib: self.args.ring_buffer,
        };
        match Window::start(pid, comm.clone(), settings, self.tx.clone()) {
            Ok(window) => {
                log(&format!(
                    "tracing pid {pid} ({comm}) for {:?}: anonymous memory {}",
                    settings.length,
                    crate::analysis::rate(growth)
                ));
                self.windows.insert(pid, window);
                let t = self.traced.entry(pid).or_default();
                (t.comm, t.cgroup) = (comm, cgroup);
                t.windows += 1;
                t.active = true;
                self.stats.windows_total += 1;
            }
            Err(e) => log(&format!("cannot start a window on pid {pid}: {e}")),
        }
    }

    fn window_msg(&mut self, msg: WindowMsg) {
        match msg {
            WindowMsg::Report(pid, report) => {
                if let Some(t) = self.traced.get_mut(&pid) {
                    t.absorb(&report, pid);
                }
                if let Some(w) = self.windows.get_mut(&pid) {
                    w.last = Some(report);
                }
            }
            WindowMsg::Ended(pid, result) => {
                // A process that died may have been the OOM killer's: its notice can come
                // just after the session saw the exit.
                if let Some(w) = self.windows.get_mut(&pid)
                    && !w.oom
                    && procfs::is_gone(pid)
                {
                    w.settle(pid, result, self.tx.clone());
                    return;
                }
                self.window_ended(pid, result);
            }
            WindowMsg::Settled(pid) => {
                let result = self.windows.get_mut(&pid).and_then(|w| w.ended.take());
                if let Some(result) = result {
                    self.window_ended(pid, result);
                }
            }
        }
    }

    /// A window's session ended: its report and profile are written, its process backs off.
    fn window_ended(&mut self, pid: u32, result: Result<()>) {
        let Some(w) = self.windows.remove(&pid) else {
            return;
        };
        self.backoff
            .after_window(pid, Instant::now(), self.args.backoff);
        if w.cut.is_some() {
            self.stats.windows_cut_total += 1;
        }
        let t = self.traced.entry(pid).or_default();
        if let Some(report) = w.last.as_ref() {
            t.absorb(report, pid);
        }
        self.closed.add(t.current);
        if let Err(e) = result {
            self.stats.window_errors_total += 1;
            t.close_window(procfs::monotonic_ns());
            log(&format!("pid {pid} ({}): cannot trace it: {e}", w.comm));
            return;
        }
        let occasion = if w.oom {
            Occasion::OomKill
        } else {
            Occasion::Window
        };
        let written = w
            .last
            .as_ref()
            .map(|report| self.profiles.write(report, (pid, &w.comm), occasion));
        t.close_window(procfs::monotonic_ns());
        let verdict = t.verdict.clone().unwrap_or_else(|| "no verdict".into());
        let sites: Vec<&str> = t.leak_sites.iter().map(|s| s.0.as_str()).collect();
        let files = match written {
            Some(Ok(w)) => [w.profile, w.report]
                .iter()
                .flatten()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            Some(Err(e)) => format!("not written: {e}"),
            None => "no report".into(),
        };
        log(&format!(
            "pid {pid} ({}): {verdict}{}{}; {files}",
            w.comm,
            if sites.is_empty() {
                String::new()
            } else {
                format!(" at {}", sites.join(", "))
            },
            match (w.oom, w.cut) {
                (true, _) => " (OOM-killed)",
                (false, Some(_)) => " (window cut short)",
                _ => "",
            }
        ));
    }

    /// The OOM killer picked `pid`: a traced one's report is written now.
    fn oom_kill(&mut self, pid: u32) {
        self.stats.oom_victims_total += 1;
        let Some(w) = self.windows.get_mut(&pid) else {
            return;
        };
        w.oom = true;
        if w.ended.is_none() {
            w.end("the OOM killer picked the process");
        }
        if let Some(t) = self.traced.get_mut(&pid) {
            t.oom_kills += 1;
        }
        log(&format!("pid {pid} ({}): picked by the OOM killer", w.comm));
    }

    /// SIGTERM or SIGINT: the running windows end now, their reports are written, then exit.
    fn stop(&mut self, why: &str) {
        if self.stopping.is_some() {
            return;
        }
        log(&format!(
            "{why}: finishing {} window(s), then exiting",
            self.windows.len()
        ));
        self.stopping = Some(Instant::now());
        for w in self.windows.values_mut() {
            w.end("the agent is stopping");
        }
    }

    /// SIGHUP: the options again (command line, then config file). True when the watch
    /// interval changed.
    fn reload(&mut self) -> bool {
        let args = match with_config_file(&self.cli) {
            Ok(args) => args,
            Err(e) => {
                log(&format!("configuration not reloaded: {e}"));
                return false;
            }
        };
        match filters(&args) {
            Ok(f) => self.filters = f,
            Err(e) => {
                log(&format!("configuration not reloaded: {e}"));
                return false;
            }
        }
        if args.profile_dir != self.profiles.dir {
            match ProfileDir::open(&args.profile_dir, args.profile_dir_max_bytes) {
                Ok(p) => self.profiles = p,
                Err(e) => log(&format!("keeping the profile directory: {e}")),
            }
        }
        self.profiles.set_limit(args.profile_dir_max_bytes);
        if args.listen != self.args.listen {
            log("a new --listen takes effect at the next start");
        }
        let retick = args.watch_interval != self.args.watch_interval;
        self.args = args;
        self.stats.reloads_total += 1;
        log("configuration reloaded");
        retick
    }

    /// Keeps the traced metrics of processes gone bounded: the most recent few stay.
    fn forget_gone(&mut self) {
        let gone: Vec<(u64, u32)> = self
            .traced
            .iter()
            .filter(|(pid, t)| !t.active && !self.watcher.procs.contains_key(pid))
            .map(|(pid, t)| (t.ended_ns, *pid))
            .collect();
        if gone.len() <= GONE_TRACED_KEPT {
            return;
        }
        let mut gone = gone;
        gone.sort();
        for (_, pid) in &gone[..gone.len() - GONE_TRACED_KEPT] {
            self.traced.remove(pid);
            self.backoff.forget(*pid);
        }
    }

    /// Renders the metrics page.
    fn publish(&mut self) {
        let own = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| watch::parse_status(&s));
        let mut all = self.closed;
        for pid in self.windows.keys() {
            if let Some(t) = self.traced.get(pid) {
                all.add(t.current);
            }
        }
        (
            self.stats.traps_total,
            self.stats.events_total,
            self.stats.dropped_total,
        ) = (all.traps, all.events, all.dropped);
        self.stats.watched = self.watcher.procs.len();
        self.stats.over_limit = self.watcher.over_limit;
        self.stats.cpu_seconds_total = procfs::self_usage().0;
        self.stats.resident_bytes = own.map_or(0, |(_, r)| r.resident_bytes);
        self.stats.estimated_cpu_cores = self.estimated_cores();
        self.stats.cpu_budget_cores = self.args.cpu_budget;
        self.stats.profile_dir_bytes = self.profiles.bytes();
        self.stats.profile_dir_max_bytes = self.profiles.max_bytes;
        self.stats.profiles_removed_total = self.profiles.removed;
        self.stats.profiles_skipped_total = self.profiles.skipped;
        self.stats.watch_interval = self.args.watch_interval;
        self.stats.trace_window = self.args.trace_window;
        let text = metrics::render(&self.watcher, &self.traced, &self.stats);
        if let Ok(mut page) = self.page.lock() {
            *page = text;
        }
    }
}

/// A timer for the watch, its first tick one interval away (the first scan is done).
fn ticker(every: Duration) -> tokio::time::Interval {
    let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_lines_are_long_options() {
        let words =
            config_words("# agent\nwatch-interval = 5s\n\ncomm = \"redis-server\"  # one\nexact\n")
                .expect("valid");
        let words: Vec<&str> = words.iter().map(|w| w.to_str().unwrap()).collect();
        assert_eq!(
            words,
            [
                "--watch-interval",
                "5s",
                "--comm",
                "redis-server",
                "--exact"
            ]
        );
        assert!(config_words("--watch-interval 5s").is_err());
        assert!(config_words("config = other").is_err());
    }
}
