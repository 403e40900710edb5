//! One diagnostic window: `attach` on one pid (its probes scoped to that pid, so no other
//! process pays), sampled, for a bounded time, on a thread of its own. The session reports
//! to the agent through a channel as it goes and when it ends; the agent ends it early
//! through its stop handle. Owns no output.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{Notify, mpsc};

use crate::{
    cli::{Format, Weight},
    error::Error,
    probe,
    report::Report,
    session::{self, Config, Target, Watch},
};

/// What a window tells the agent.
pub enum WindowMsg {
    /// The model as it stands (each sample interval; the last one before `Ended` is final).
    Report(u32, Box<Report>),
    /// The session ended; `Err` when it could not trace the process.
    Ended(u32, Result<(), Error>),
    /// A window whose process died has waited for a late OOM notice (see `Window::settle`).
    Settled(u32),
}

/// How long the report of a process that died waits for the OOM notice that may explain it
/// (the tracefs reader polls every 50 ms; a session ending on the exit can be faster).
pub const OOM_SETTLE: Duration = Duration::from_millis(300);

/// How a window traces.
#[derive(Clone, Copy, Debug)]
pub struct WindowSettings {
    pub length: Duration,
    pub interval: Duration,
    pub sample_bytes: u64,
    pub ring_mib: u32,
}

/// A window running.
pub struct Window {
    pub comm: String,
    pub started: Instant,
    stop: Arc<Notify>,
    /// Why it was ended early, if it was.
    pub cut: Option<&'static str>,
    /// The OOM killer picked the process during the window.
    pub oom: bool,
    /// The latest report (the final one once the window has ended).
    pub last: Option<Box<Report>>,
    /// The session's end, held while a late OOM notice may still come.
    pub ended: Option<Result<(), Error>>,
}

impl Window {
    /// Starts tracing `pid` on a thread of its own.
    pub fn start(
        pid: u32,
        comm: String,
        settings: WindowSettings,
        tx: mpsc::UnboundedSender<WindowMsg>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(Notify::new());
        let stopping = stop.clone();
        std::thread::Builder::new()
            .name(format!("window-{pid}"))
            .spawn(move || {
                let reports = tx.clone();
                let config = config(pid, settings, stopping, move |report| {
                    let _ = reports.send(WindowMsg::Report(pid, Box::new(report)));
                });
                let result = session::run(config);
                let _ = tx.send(WindowMsg::Ended(pid, result));
            })?;
        Ok(Self {
            comm,
            started: Instant::now(),
            stop,
            cut: None,
            oom: false,
            last: None,
            ended: None,
        })
    }

    /// Holds the session's end for [`OOM_SETTLE`], then asks for it back through `tx`.
    pub fn settle(
        &mut self,
        pid: u32,
        result: Result<(), Error>,
        tx: mpsc::UnboundedSender<WindowMsg>,
    ) {
        self.ended = Some(result);
        tokio::spawn(async move {
            tokio::time::sleep(OOM_SETTLE).await;
            let _ = tx.send(WindowMsg::Settled(pid));
        });
    }

    /// Ends the window now; its report follows.
    pub fn end(&mut self, why: &'static str) {
        self.cut.get_or_insert(why);
        self.stop.notify_one();
    }
}

/// The session's configuration: `attach -p PID --duration LENGTH`, sampled, its reports
/// handed to `on_report`, no signals of its own (the agent's SIGHUP must not end it).
fn config(
    pid: u32,
    s: WindowSettings,
    stop: Arc<Notify>,
    on_report: impl FnMut(Report) + 'static,
) -> Config {
    Config {
        target: Target::Attach(vec![pid]),
        duration: Some(s.length),
        interval: s.interval,
        format: Format::Pprof,
        weight: Weight::Live,
        output: None,
        top: usize::MAX,
        ring_mib: s.ring_mib,
        verbose: false,
        programs: probe::Programs::Tracing,
        sample_bytes: s.sample_bytes,
        sample_seed: None,
        max_sampled: 1 << 16, // kernel memory per window: ≈ 4 MiB
        max_tracked: Some(1_000_000),
        detail: usize::MAX,
        stack_mode: None,
        stack_depth: 127,
        stack_bytes: 8192,
        uprobes: None,
        tcache_prediction: true,
        test_mispredict: false,
        test_maps_from_events: false,
        watch: Some(Watch {
            on_report: Box::new(on_report),
            stop,
        }),
        catch_signals: false,
        count_traps: true,
    }
}
