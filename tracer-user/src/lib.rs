//! alloctrace: an eBPF allocation tracer that tells a leak from fragmentation from warm-up.
//!
//! Data flows one way through the modules:
//! kernel (`probe`) → ring buffer (`capture`) → `model` → `analysis` → `symbolize` → `report`.
//! `types` reads Rust element types from DWARF for the report.
//! `session` wires them together for one trace; `launch` starts a traced command; `procfs`
//! reads what the kernel tells about processes; `cli` is the command line. `top` is a live
//! view hung on a session; `diff` compares two JSON reports; `progress` draws progress bars.

pub mod analysis;
pub mod capture;
pub mod cli;
pub mod diff;
pub mod error;
pub mod launch;
pub mod model;
pub mod privileges;
pub mod probe;
pub mod procfs;
pub mod progress;
pub mod report;
pub mod session;
pub mod symbolize;
pub mod top;
pub mod types;

pub use error::Error;
