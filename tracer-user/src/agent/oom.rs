//! OOM kills: the kernel's `oom:mark_victim` tracepoint, read from a tracefs instance of the
//! agent's own (its own buffer and event switches: nothing another tracer set up is
//! touched), so the report of a traced process the OOM killer picks is written at that
//! moment. Owns the instance's life; knows nothing of windows.

use std::{
    io::Read as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

/// Where tracefs may be mounted.
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
/// How often the instance's pipe is read when it had nothing.
const POLL: Duration = Duration::from_millis(50);

/// The victim's pid from a `mark_victim` line of `trace_pipe`
/// (`… mark_victim: pid=1234 comm=leak …`).
pub fn victim(line: &str) -> Option<u32> {
    let rest = &line[line.find("mark_victim:")? + "mark_victim:".len()..];
    rest.split_whitespace()
        .find_map(|field| field.strip_prefix("pid="))
        .and_then(|pid| pid.parse().ok())
}

/// The tracefs instance; dropped, it stops its reader and removes the instance.
pub struct OomWatch {
    instance: PathBuf,
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl OomWatch {
    /// Creates the instance, enables the event in it and reads victims' pids into `victims`.
    pub fn start(victims: impl Fn(u32) + Send + 'static) -> Result<Self, String> {
        let root = TRACEFS
            .iter()
            .map(Path::new)
            .find(|p| p.join("events/oom/mark_victim").exists())
            .ok_or("no tracefs with oom/mark_victim (mount tracefs on /sys/kernel/tracing)")?;
        remove_stale(&root.join("instances"));
        let instance = root.join(format!("instances/alloctrace-agent-{}", std::process::id()));
        std::fs::create_dir(&instance)
            .map_err(|e| format!("cannot create {}: {e}", instance.display()))?;
        let enable = instance.join("events/oom/mark_victim/enable");
        if let Err(e) = std::fs::write(&enable, "1") {
            let _ = std::fs::remove_dir(&instance);
            return Err(format!("cannot write {}: {e}", enable.display()));
        }
        let pipe = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(instance.join("trace_pipe"));
        let pipe = match pipe {
            Ok(p) => p,
            Err(e) => {
                let _ = std::fs::remove_dir(&instance);
                return Err(format!("cannot open the instance's trace_pipe: {e}"));
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let reader = std::thread::Builder::new()
            .name("oom-watch".into())
            .spawn(move || read_victims(pipe, &stopping, &victims))
            .map_err(|e| format!("cannot start the OOM reader: {e}"))?;
        Ok(Self {
            instance,
            stop,
            reader: Some(reader),
        })
    }
}

/// Removes the instances of agents that ended without removing theirs (killed): a node's
/// agent restarts for days, its instances must not pile up.
fn remove_stale(instances: &Path) {
    let Ok(entries) = std::fs::read_dir(instances) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix("alloctrace-agent-"))
            .and_then(|pid| pid.parse::<u32>().ok());
        if pid.is_some_and(|pid| !crate::procfs::is_alive(pid)) {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

/// Reads lines until `stop`, calling `victims` with each victim's pid.
fn read_victims(mut pipe: std::fs::File, stop: &AtomicBool, victims: &dyn Fn(u32)) {
    let mut buf = vec![0u8; 16 << 10];
    let mut pending = String::new();
    while !stop.load(Ordering::Relaxed) {
        match pipe.read(&mut buf) {
            Ok(n) if n > 0 => {
                pending.push_str(&String::from_utf8_lossy(&buf[..n]));
                while let Some(end) = pending.find('\n') {
                    if let Some(pid) = victim(&pending[..end]) {
                        victims(pid);
                    }
                    pending.drain(..=end);
                }
                if pending.len() > 64 << 10 {
                    pending.clear(); // never a line this long: keep memory bounded
                }
            }
            Ok(_) => std::thread::sleep(POLL),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => std::thread::sleep(POLL * 10),
        }
    }
}

impl Drop for OomWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join(); // closes the pipe: the instance can go
        }
        let _ = std::fs::write(self.instance.join("events/oom/mark_victim/enable"), "0");
        let _ = std::fs::remove_dir(&self.instance);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_victims_pid() {
        let line = "   oom_leak-4242  [001] ..... 123.456: mark_victim: pid=4242 comm=oom_leak \
                    total-vm=70000kB anon-rss=65000kB file-rss:0kB shmem-rss:0kB uid=0";
        assert_eq!(victim(line), Some(4242));
        assert_eq!(
            victim("  <idle>-0 [000] 1.0: sched_switch: prev_pid=1"),
            None
        );
        assert_eq!(victim("mark_victim: pid=x"), None);
    }
}
