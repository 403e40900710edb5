//! Starting a traced command: fork, hold the child before `exec` until the probes are
//! attached (so its first allocation is traced), then watch it with ptrace's exit stop.
//!
//! The exit stop (`PTRACE_O_TRACEEXIT`) pauses the process at exit while its address space is
//! still intact, long enough for the session to read its mappings; without it, a short-lived
//! command would be gone before its stacks could be tied to files. Signals are passed through
//! untouched. If alloctrace dies, the kernel detaches ptrace and the child carries on.

use std::{
    ffi::{CString, OsStr, OsString},
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
    sync::mpsc,
    time::Duration,
};

use crate::error::{Error, Result};

/// A forked child waiting to `exec` the command.
pub struct HeldChild {
    pub pid: u32,
    /// The program file it will execute (for choosing its stack mode).
    pub program: PathBuf,
    go: OwnedFd,
    exec_error: OwnedFd,
    command: String,
}

/// What watchers tell the session about a traced process.
#[derive(Debug)]
pub enum ProcEvent {
    /// The process is about to exit; its mappings are readable until `resume` is answered.
    Exiting { pid: u32, resume: mpsc::Sender<()> },
    /// The process is gone (exit status known only for our own children).
    Exited {
        pid: u32,
        code: Option<i32>,
        signal: Option<i32>,
    },
}

/// Forks a child that will `exec` `argv` once released.
pub fn spawn_held(argv: &[OsString]) -> Result<HeldChild> {
    let command = argv
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let launch_error = |source: io::Error| Error::Launch {
        command: command.clone(),
        source,
    };
    let first = argv
        .first()
        .ok_or_else(|| launch_error(io::ErrorKind::InvalidInput.into()))?;
    let program = resolve(first).map_err(launch_error)?;
    let c_program = cstring(program.as_os_str()).map_err(launch_error)?;
    let c_args = argv
        .iter()
        .map(|a| cstring(a))
        .collect::<io::Result<Vec<_>>>()
        .map_err(launch_error)?;
    let mut arg_ptrs: Vec<*const libc::c_char> = c_args.iter().map(|a| a.as_ptr()).collect();
    arg_ptrs.push(std::ptr::null());

    let (go_read, go_write) = pipe().map_err(launch_error)?;
    let (err_read, err_write) = pipe().map_err(launch_error)?;

    // SAFETY: the child only calls async-signal-safe functions (close, read, execv, write,
    // _exit) on data prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(launch_error(io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: see above; every pointer stays valid in the child's copy of memory.
        unsafe {
            libc::close(go_write.as_raw_fd());
            libc::close(err_read.as_raw_fd());
            let mut byte = 0u8;
            if libc::read(go_read.as_raw_fd(), (&raw mut byte).cast(), 1) != 1 {
                libc::_exit(127); // the collector went away before releasing us
            }
            libc::execv(c_program.as_ptr(), arg_ptrs.as_ptr());
            let errno = *libc::__errno_location();
            libc::write(err_write.as_raw_fd(), (&raw const errno).cast(), 4);
            libc::_exit(127);
        }
    }
    drop(go_read);
    drop(err_write);
    Ok(HeldChild {
        pid: pid as u32,
        program,
        go: go_write,
        exec_error: err_read,
        command,
    })
}

impl HeldChild {
    /// Lets the child `exec` and starts watching it on a thread of its own (ptrace requests
    /// must all come from the thread that attached). Returns once `exec` succeeded, or the
    /// reason it failed; `Ok(false)` means the exit stop could not be armed (ptrace forbidden
    /// by policy) and the child runs unwatched except for its exit.
    pub fn release(self, events: tokio::sync::mpsc::UnboundedSender<ProcEvent>) -> Result<bool> {
        let pid = self.pid as libc::pid_t;
        let (seized_tx, seized_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("alloctrace-child".into())
            .spawn(move || {
                // SAFETY: plain ptrace call on our own child.
                let seized = unsafe {
                    libc::ptrace(
                        libc::PTRACE_SEIZE,
                        pid,
                        std::ptr::null_mut::<libc::c_void>(),
                        libc::PTRACE_O_TRACEEXIT as usize as *mut libc::c_void,
                    )
                } == 0;
                let _ = seized_tx.send(seized);
                watch_loop(pid, seized, &events);
            })
            .map_err(|source| Error::Launch {
                command: self.command.clone(),
                source,
            })?;
        let seized = seized_rx.recv().unwrap_or(false);
        let byte = 1u8;
        // SAFETY: writing one byte from a valid buffer to our pipe.
        unsafe { libc::write(self.go.as_raw_fd(), (&raw const byte).cast(), 1) };
        drop(self.go);
        let mut errno = 0i32;
        // SAFETY: reading at most 4 bytes into an i32; the pipe closes on a successful exec.
        let n = unsafe { libc::read(self.exec_error.as_raw_fd(), (&raw mut errno).cast(), 4) };
        if n == 4 {
            return Err(Error::Launch {
                command: self.command,
                source: io::Error::from_raw_os_error(errno),
            });
        }
        Ok(seized)
    }
}

fn watch_loop(
    pid: libc::pid_t,
    traced: bool,
    events: &tokio::sync::mpsc::UnboundedSender<ProcEvent>,
) {
    loop {
        let mut status = 0;
        // SAFETY: waiting on our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if r < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            let _ = events.send(ProcEvent::Exited {
                pid: pid as u32,
                code: None,
                signal: None,
            });
            return;
        }
        if libc::WIFEXITED(status) {
            let code = Some(libc::WEXITSTATUS(status));
            let _ = events.send(ProcEvent::Exited {
                pid: pid as u32,
                code,
                signal: None,
            });
            return;
        }
        if libc::WIFSIGNALED(status) {
            let signal = Some(libc::WTERMSIG(status));
            let _ = events.send(ProcEvent::Exited {
                pid: pid as u32,
                code: None,
                signal,
            });
            return;
        }
        if !traced || !libc::WIFSTOPPED(status) {
            continue;
        }
        let event = (status >> 16) & 0xff;
        let signal = libc::WSTOPSIG(status);
        let (request, inject) = if event == libc::PTRACE_EVENT_EXIT {
            let (resume, resumed) = mpsc::channel();
            if events
                .send(ProcEvent::Exiting {
                    pid: pid as u32,
                    resume,
                })
                .is_ok()
            {
                // Never hold the process for long, whatever the session is doing.
                let _ = resumed.recv_timeout(Duration::from_secs(10));
            }
            (libc::PTRACE_CONT, 0)
        } else if event == libc::PTRACE_EVENT_STOP {
            if matches!(
                signal,
                libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
            ) {
                (libc::PTRACE_LISTEN, 0) // group stop: stay stopped until SIGCONT
            } else {
                (libc::PTRACE_CONT, 0) // the group stop ended (SIGCONT): run on
            }
        } else {
            (libc::PTRACE_CONT, signal) // signal-delivery stop: deliver it unchanged
        };
        // SAFETY: resuming our own tracee.
        unsafe {
            libc::ptrace(
                request,
                pid,
                std::ptr::null_mut::<libc::c_void>(),
                inject as usize as *mut libc::c_void,
            )
        };
    }
}

/// `execvp`'s search, done up front so a missing command is reported before anything loads.
fn resolve(program: &OsStr) -> io::Result<PathBuf> {
    let path = Path::new(program);
    if program.as_bytes().contains(&b'/') {
        return check_executable(path).map(|()| path.to_owned());
    }
    let search = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    let mut last = io::Error::from(io::ErrorKind::NotFound);
    for dir in std::env::split_paths(&search) {
        let candidate = dir.join(path);
        match check_executable(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn check_executable(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() {
        return Err(io::Error::from_raw_os_error(libc::EISDIR));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(io::Error::from_raw_os_error(libc::EACCES));
    }
    Ok(())
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: valid out-array of two fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_through_path_and_reports_missing_commands() {
        assert!(resolve(OsStr::new("sh")).is_ok());
        let err = resolve(OsStr::new("/no/such/binary")).expect_err("missing");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let err = resolve(OsStr::new("no-such-command-alloctrace")).expect_err("missing");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
