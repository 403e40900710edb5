//! Reports while tracing: the model as it stands, for a live view (`alloctrace top`), and the
//! final report, built the same way.

use std::time::Instant;

use tracer_common::Counter;

use super::{Config, Watch, state::State, system};
use crate::{
    capture::{Capture, KernelCounters},
    procfs,
    report::{self, Report},
    symbolize::Symbolizer,
};

/// The report of the model as it stands: at the end of the trace, or mid-way for a view.
pub fn report_now(
    (state, host): (&State, Option<&system::Host>),
    capture: &Capture,
    kernel: KernelCounters,
    config: &Config,
    started: Instant,
    warnings: Vec<String>,
    symbolizer: &Symbolizer,
) -> Report {
    report::build(
        report::Inputs {
            model: &state.model,
            stacks: &state.stacks,
            facts: &state.facts,
            capture: capture.stats,
            kernel,
            duration: started.elapsed(),
            end_ns: procfs::monotonic_ns(),
            top: config.top,
            sample_bytes: config.sample_bytes,
            ring_mib: config.ring_mib,
            max_sampled: config.max_sampled,
            warnings,
            system: host.map(|h| report::SystemInputs {
                exited_rows: &h.exited_rows,
                exited_detail: &h.exited_detail,
                rows_dropped: h.rows_dropped,
                trap_ns: h.trap_ns,
                untraced_traps: kernel
                    .get(Counter::UntracedTraps)
                    .saturating_sub(kernel.get(Counter::SelfTraps)),
                detail: config.detail,
            }),
        },
        symbolizer,
    )
}

/// A live view's hook, with what building its reports needs; one symbolizer for the whole
/// trace, so modules are parsed once.
pub struct Live<'a> {
    pub watch: &'a mut Watch,
    pub symbolizer: Symbolizer,
    pub started: Instant,
    pub warnings: Vec<String>,
}

impl Live<'_> {
    pub fn report(
        &mut self,
        (state, host): (&State, Option<&system::Host>),
        capture: &Capture,
        config: &Config,
    ) {
        let kernel = capture.kernel_counters();
        let warnings = self.warnings.clone();
        let report = report_now(
            (state, host),
            capture,
            kernel,
            config,
            self.started,
            warnings,
            &self.symbolizer,
        );
        (self.watch.on_report)(report);
    }
}

/// Completes when the view asks to stop; never without a view.
pub async fn stopped(stop: Option<&tokio::sync::Notify>) {
    match stop {
        Some(stop) => stop.notified().await,
        None => std::future::pending().await,
    }
}
