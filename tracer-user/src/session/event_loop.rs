//! The event loop: drain the rings on wake-ups and on a short timer, act on processes coming
//! and going, sample every interval (and report to a live view), and stop on Ctrl-C,
//! SIGTERM or SIGHUP, `--duration`, when the view asks, or when every traced process is gone.

use std::{
    os::fd::{AsRawFd, OwnedFd, RawFd},
    time::Duration,
};

use tokio::{io::unix::AsyncFd, signal::unix::Signal, sync::mpsc as tmpsc};

use super::{Config, live::Live, state::State, system::Host, tracer::Tracer};
use crate::{
    capture::{Capture, Flush},
    error::{Error, Result},
    launch::ProcEvent,
    procfs,
};

/// How often the ring buffer is drained when the kernel has not woken us.
const DRAIN_EVERY: Duration = Duration::from_millis(20);
/// How long a `run` child gets to exit after Ctrl-C (it received the SIGINT too).
const RUN_GRACE: Duration = Duration::from_secs(2);

/// What stops the trace early: the signals that ask for the final report (none when the
/// caller decides when the trace ends, as the agent does for its windows).
pub struct Stops {
    /// SIGINT, SIGTERM and SIGHUP.
    signals: Option<(Signal, Signal, Signal)>,
}

impl Stops {
    /// Catches SIGINT, SIGTERM and SIGHUP (from here on, each gives the final report).
    pub fn catch() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            signals: Some((
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
                signal(SignalKind::hangup())?,
            )),
        })
    }

    /// Catches nothing: the trace ends by its duration, its processes' exits or its view.
    pub fn none() -> Self {
        Self { signals: None }
    }

    /// Completes at the next of them; true for Ctrl-C.
    async fn next(&mut self) -> bool {
        let Some((interrupt, terminate, hangup)) = self.signals.as_mut() else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = interrupt.recv() => true,
            _ = terminate.recv() => false,
            _ = hangup.recv() => false,
        }
    }
}

/// Everything the loop works on.
pub struct Loop<'a> {
    pub state: &'a mut State,
    pub tracer: &'a mut Tracer,
    pub config: &'a Config,
    pub is_run: bool,
    pub live: Option<Live<'a>>,
    /// `system`: processes come and go; their state is released as they end.
    pub host: Option<&'a mut Host>,
    pub warnings: &'a mut Vec<String>,
}

impl Loop<'_> {
    fn drain(&mut self, capture: &mut Capture, flush: Flush) {
        self.state.drain(capture, flush);
        if self.state.model.predictions_contradicted() > 0 && self.tracer.loaded.stop_prediction() {
            self.warnings.push(
                "a block predicted from glibc's thread cache landed on an address still live \
                 (a signal handler allocating the same size inside malloc, or a lost free): \
                 prediction was turned off from then on"
                    .to_owned(),
            );
        }
        let notices = self.state.take_notices();
        if !notices.is_empty() {
            let warnings = super::lifecycle::act(self.state, self.tracer, notices);
            self.warnings.extend(warnings);
        }
        self.tracer.tables_ready();
        if let Some(host) = self.host.as_deref_mut() {
            host.retire(self.state);
        }
    }

    fn sample(&mut self, capture: &Capture) {
        if self.host.is_some() || self.config.count_traps {
            super::system::read_traps(self.tracer, self.state);
        }
        self.state.sample();
        if let Some(live) = self.live.as_mut() {
            live.report((self.state, self.host.as_deref()), capture, self.config);
        }
    }
}

pub async fn collect(
    mut lp: Loop<'_>,
    capture: Capture,
    proc_tx: tmpsc::UnboundedSender<ProcEvent>,
    mut proc_rx: tmpsc::UnboundedReceiver<ProcEvent>,
    mut stops: Stops,
) -> Result<Capture> {
    // SAFETY: the ring-buffer fd stays open and unchanged for as long as `Capture` lives,
    // which is as long as this AsyncFd.
    let mut ring =
        unsafe { AsyncFd::register_with_interest(capture, tokio::io::Interest::READABLE) }
            .map_err(|e| Error::Io {
                what: "cannot watch the ring buffer".into(),
                source: e.into(),
            })?;
    if !lp.is_run {
        // The kernel reports exits; a pidfd also catches the ones it could not.
        for &pid in &lp.state.live.clone() {
            watch_pidfd(pid, proc_tx.clone());
        }
    }
    drop(proc_tx);

    let mut drain_tick = tokio::time::interval(DRAIN_EVERY);
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sample_tick = tokio::time::interval(lp.config.interval);
    sample_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let far = tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 86_400);
    let stop_at = lp
        .config
        .duration
        .map_or(far, |d| tokio::time::Instant::now() + d);
    let deadline = tokio::time::sleep_until(stop_at);
    tokio::pin!(deadline);
    let mut interrupted = false;
    // Until every exit watcher is done: a closed channel is ready at once, every time, so
    // polling it after that would spin the loop at full CPU.
    let mut watching = true;
    let stop = lp.live.as_ref().map(|l| l.watch.stop.clone());

    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.map_err(|source| Error::Io { what: "ring buffer".into(), source })?;
                lp.drain(guard.get_inner_mut(), Flush::Settled);
                guard.clear_ready();
            }
            _ = drain_tick.tick() => lp.drain(ring.get_mut(), Flush::Settled),
            _ = sample_tick.tick() => lp.sample(ring.get_ref()),
            _ = super::live::stopped(stop.as_deref()) => break,
            event = proc_rx.recv(), if watching => match event {
                Some(ProcEvent::Exited { pid, code, signal }) => {
                    // Everything it did is in the rings by now.
                    lp.drain(ring.get_mut(), Flush::Now);
                    lp.state.exit_status(pid, code, signal);
                    lp.state.gone(pid);
                }
                None => watching = false, // no watcher left
            },
            ctrl_c = stops.next() => {
                if ctrl_c && lp.is_run && !interrupted && !lp.state.live.is_empty() {
                    // The command got the Ctrl-C too: give it a moment to finish.
                    interrupted = true;
                    deadline.as_mut().reset(tokio::time::Instant::now() + RUN_GRACE);
                } else {
                    break;
                }
            }
            _ = &mut deadline => break,
        }
        // `system` goes on while the host has no traced process: others will start.
        if lp.state.live.is_empty() && lp.host.is_none() {
            break;
        }
    }
    if lp.is_run && lp.state.live.is_empty() {
        // The kernel's exit event can beat the reaper's status: the report says how the
        // command ended, so wait for it (it is sent once the command is reaped).
        if let Ok(Some(ProcEvent::Exited { pid, code, signal })) =
            tokio::time::timeout(Duration::from_secs(2), proc_rx.recv()).await
        {
            lp.state.exit_status(pid, code, signal);
        }
    }
    let mut capture = ring.into_inner();
    lp.drain(&mut capture, Flush::All);
    if lp.host.is_some() || lp.config.count_traps {
        super::system::read_traps(lp.tracer, lp.state);
    }
    lp.state.sample();
    Ok(capture)
}

/// Reports the exit of a process we did not start, through a pidfd.
fn watch_pidfd(pid: u32, tx: tmpsc::UnboundedSender<ProcEvent>) {
    let gone = ProcEvent::Exited {
        pid,
        code: None,
        signal: None,
    };
    let Ok(fd) = procfs::pidfd(pid) else {
        let _ = tx.send(gone);
        return;
    };
    struct PidFd(OwnedFd);
    impl AsRawFd for PidFd {
        fn as_raw_fd(&self) -> RawFd {
            self.0.as_raw_fd()
        }
    }
    tokio::spawn(async move {
        // SAFETY: the pidfd is owned by the AsyncFd for its whole life.
        if let Ok(async_fd) =
            unsafe { AsyncFd::register_with_interest(PidFd(fd), tokio::io::Interest::READABLE) }
        {
            let _ = async_fd.readable().await;
        }
        let _ = tx.send(gone);
    });
}
