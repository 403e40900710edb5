//! Starting a traced command: fork, hold the child before `exec` until the probes are
//! attached (so its first allocation is traced), then wait for its exit status.
//!
//! Nothing stands between the command and its signals: it is not ptraced (a tracer's stop
//! per signal would slow a signal-heavy program to a crawl, and keep gdb or strace away).
//! Its mappings are read from what the kernel reports as it runs (its exec, every file it
//! maps with code), while it lives. If alloctrace dies, the command carries on.

use std::{
    ffi::{CString, OsStr, OsString},
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

/// A forked child waiting to `exec` the command.
pub struct HeldChild {
    pub pid: u32,
    /// The program file the kernel will run (for planning its probes and stack mode): the
    /// command's own file, or for a script, the interpreter its `#!` line names.
    pub program: PathBuf,
    go: OwnedFd,
    exec_error: OwnedFd,
    command: String,
}

/// What the watcher tells the session about the command it started.
#[derive(Debug)]
pub enum ProcEvent {
    /// The command is gone, with its exit status.
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
        program: interpreter_of(program),
        go: go_write,
        exec_error: err_read,
        command,
    })
}

impl HeldChild {
    /// Lets the child `exec` and waits, on a thread of its own, for its exit status. Returns
    /// once `exec` succeeded, or with the reason it failed.
    pub fn release(self, events: tokio::sync::mpsc::UnboundedSender<ProcEvent>) -> Result<()> {
        let pid = self.pid as libc::pid_t;
        std::thread::Builder::new()
            .name("alloctrace-child".into())
            .spawn(move || wait_for_exit(pid, &events))
            .map_err(|source| Error::Launch {
                command: self.command.clone(),
                source,
            })?;
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
        Ok(())
    }
}

/// Reaps the command when it ends and says how.
fn wait_for_exit(pid: libc::pid_t, events: &tokio::sync::mpsc::UnboundedSender<ProcEvent>) {
    let mut status = 0;
    loop {
        // SAFETY: waiting on our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break;
        }
    }
    let (code, signal) = if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    };
    let _ = events.send(ProcEvent::Exited {
        pid: pid as u32,
        code,
        signal,
    });
}

/// The file the kernel runs for `program`: a script's `#!` interpreter (followed through
/// scripts run by scripts, as far as the kernel does), else `program` itself.
fn interpreter_of(mut program: PathBuf) -> PathBuf {
    // The kernel allows a script's interpreter to be a script, 4 deep.
    for _ in 0..4 {
        match shebang(&program) {
            Some(interpreter) => program = interpreter,
            None => break,
        }
    }
    program
}

/// The interpreter named on the `#!` line starting `path`, if it starts with one.
fn shebang(path: &Path) -> Option<PathBuf> {
    use std::io::Read as _;
    let mut head = [0u8; 256];
    let n = std::fs::File::open(path).ok()?.read(&mut head).ok()?;
    let line = head[..n].strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|&b| b == b'\n').unwrap_or(line.len())];
    let interpreter = line
        .split(|b| b.is_ascii_whitespace())
        .find(|word| !word.is_empty())?;
    Some(PathBuf::from(OsStr::from_bytes(interpreter)))
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

    /// A script is planned as its interpreter, through a script interpreting a script.
    #[test]
    fn scripts_are_planned_as_their_interpreter() {
        let dir = std::env::temp_dir().join(format!("alloctrace-shebang-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let inner = dir.join("inner");
        std::fs::write(&inner, "#! /bin/sh -e\necho\n").unwrap();
        let outer = dir.join("outer");
        std::fs::write(&outer, format!("#!{}\n", inner.display())).unwrap();
        assert_eq!(interpreter_of(outer), PathBuf::from("/bin/sh"));
        assert_eq!(
            interpreter_of(PathBuf::from("/bin/sh")),
            PathBuf::from("/bin/sh")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
