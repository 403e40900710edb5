//! Verdicts over the model: is a site leaking, holding steady, or only making temporaries; is
//! a process leaking, fragmented, or stable — or is the evidence too thin to say. Pure: it
//! reads the model and what the session measured, and never mutates or prints.
//!
//! Every verdict carries the numbers it rests on. A leak needs growth over the whole run —
//! along a line, or in steps (a buffer grown by realloc) — from allocations never freed, and
//! the process's own live bytes growing with it; a young allocation alone is never a leak,
//! and a site taking over from another (turnover) is not one either. Fragmentation needs
//! memory known to be freed and kept by the allocator while live bytes are not growing.

pub mod growth;
pub mod process;
pub mod site;
pub mod teardown;
pub mod turnover;
pub mod units;

pub use growth::Growth;
pub use process::{AllocatorFree, Context, ProcessAssessment, ProcessVerdict, assess, singletons};
pub use site::{SiteAssessment, SiteVerdict};
pub use teardown::Teardown;
pub use units::{bytes_text, rate, seconds};

/// The observation window of one process, `CLOCK_MONOTONIC` ns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start_ns: u64,
    pub end_ns: u64,
}

impl Window {
    pub fn span_s(&self) -> f64 {
        self.end_ns.saturating_sub(self.start_ns) as f64 / 1e9
    }

    /// Where `ts` falls in the window, 0 (start) to 1 (end).
    pub fn fraction(&self, ts: u64) -> f64 {
        let span = self.end_ns.saturating_sub(self.start_ns);
        if span == 0 {
            1.0
        } else {
            ts.saturating_sub(self.start_ns) as f64 / span as f64
        }
    }

    pub fn age_s(&self, ts: u64) -> f64 {
        self.end_ns.saturating_sub(ts) as f64 / 1e9
    }
}

#[cfg(test)]
mod tests;
