//! Checks the capabilities tracing needs before anything is loaded, so a missing one is one
//! clear line instead of an `EPERM` from deep inside the loader.

use crate::error::{Error, Result};

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Fails with [`Error::Privileges`] unless the effective set has CAP_BPF and CAP_PERFMON, or
/// CAP_SYS_ADMIN (which implies both).
pub fn check() -> Result<()> {
    let Some(effective) = effective_caps() else {
        return Ok(()); // cannot tell: let the loader report what the kernel says
    };
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) {
        return Ok(());
    }
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|(cap, _)| !has(*cap))
        .map(|(_, name)| name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::Privileges {
            missing: missing.join(" and "),
        })
    }
}

fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Lifts the locked-memory limit that kernels before 5.11 charge BPF maps against; harmless
/// (and ignored) where memory cgroups account for them instead.
pub fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}
