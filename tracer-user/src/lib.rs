//! alloctrace: an eBPF allocation tracer that tells a leak from fragmentation from warm-up.
//!
//! Data flows one way through the modules:
//! kernel (`probe`) → ring buffer (`capture`) → `model` → `analysis` → `symbolize` → `report`.
//! At report time, stacks are symbolized first: stacks that symbolize the same are one site,
//! and the analysis judges that site. `types` names what was allocated from DWARF;
//! `demangle` turns symbol names into what people read.
//! `session` wires them together for one trace; `launch` starts a traced command; `procfs`
//! reads what the kernel tells about processes; `cli` is the command line. `top` is a live
//! view hung on a session; `diff` compares two JSON reports; `progress` draws progress bars.
//! `agent` is the long-running fleet service: it watches `/proc`, runs sessions on what grows,
//! serves metrics and keeps a profile directory.

pub mod agent;
pub mod analysis;
pub mod capture;
pub mod cli;
pub mod demangle;
pub mod diff;
pub mod error;
pub mod heapstate;
pub mod launch;
pub mod layout;
pub mod model;
pub mod privileges;
pub mod probe;
pub mod procfs;
pub mod progress;
pub mod report;
pub mod session;
pub mod symbolize;
pub mod targets;
pub mod top;
pub mod types;
pub mod unwind_tables;

pub use error::Error;
