//! `alloctrace top`: a live terminal view of a trace.
//!
//! It is the ordinary session with a [`Watch`] hung on it: every interval the session builds
//! the report of the model as it stands and hands it over a channel to the view, which runs
//! on a thread of its own (ratatui over crossterm) so keys are answered between reports.
//! Quitting the view notifies the session to stop. Nothing here knows about probes or the
//! model: the view only ever sees [`Report`]s.
//!
//! While the view is up, standard input, output and error point at `/dev/null` (a command
//! started with `top -- CMD` inherits them, so its output cannot scribble over the view);
//! the view draws on the terminal standard output was, and reads keys from `/dev/tty`.
//! Everything is put back before returning, so errors print as usual.

mod view;

use std::{
    fs::File,
    io::{self, IsTerminal as _, Write as _},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
    sync::{Arc, mpsc},
    time::Duration,
};

use ratatui::{
    Terminal,
    backend::CrosstermBackend,
    crossterm::{
        cursor, execute,
        terminal::{self, EnterAlternateScreen, LeaveAlternateScreen},
    },
};

use crate::{
    cli::{Format, Weight},
    error::{Error, Result},
    report::{self, Report},
    session::{self, Config, Target, Watch},
};

pub use view::{Sort, View};

/// Where and how `w` writes the current report.
#[derive(Clone, Debug)]
pub struct Snapshots {
    pub format: Format,
    pub weight: Weight,
    /// `-o FILE` (overwritten at each press), or numbered files in the current directory.
    pub output: Option<PathBuf>,
    written: u32,
}

impl Snapshots {
    pub fn new(format: Format, weight: Weight, output: Option<PathBuf>) -> Self {
        Self {
            format,
            weight,
            output,
            written: 0,
        }
    }

    /// Writes `report`; returns the path written.
    pub fn write(&mut self, report: &Report) -> Result<PathBuf> {
        self.written += 1;
        let path = self.output.clone().unwrap_or_else(|| {
            PathBuf::from(format!(
                "alloctrace-{}-{}.{}",
                std::process::id(),
                self.written,
                self.format.extension()
            ))
        });
        let render = report::Render {
            format: self.format,
            weight: self.weight,
            color: false,
        };
        let output_error = |source| Error::Output {
            path: path.clone(),
            source,
        };
        let mut file =
            io::BufWriter::new(crate::session::create_private(&path).map_err(output_error)?);
        report::write(report, render, &mut file)
            .and_then(|()| file.flush())
            .map_err(output_error)?;
        Ok(path)
    }
}

/// Runs the session with the view attached; returns when the view is closed.
pub fn run(mut config: Config) -> Result<()> {
    if !io::stdout().is_terminal() {
        return Err(Error::Io {
            what: "alloctrace top draws on a terminal and standard output is not one (to write \
                   a report to a file, use `alloctrace attach --format json -o FILE`)"
                .into(),
            source: io::ErrorKind::Unsupported.into(),
        });
    }
    let snapshots = Snapshots::new(config.format, config.weight, config.output.take());
    let started_command = matches!(config.target, Target::Run(_));
    let interval = config.interval;
    let (reports, received) = mpsc::channel::<Report>();
    let stop = Arc::new(tokio::sync::Notify::new());
    let quiet = Quiet::begin()?;
    let screen = quiet.terminal()?;
    let view_stop = stop.clone();
    let view = std::thread::Builder::new()
        .name("alloctrace-top".into())
        .spawn(move || {
            let view = View::new(interval, snapshots, started_command);
            show(view, screen, &received, &view_stop)
        })
        .map_err(|source| Error::Io {
            what: "cannot start the view".into(),
            source,
        })?;
    config.watch = Some(Watch {
        on_report: Box::new(move |report| {
            let _ = reports.send(report); // the view is gone: the session is stopping
        }),
        stop: stop.clone(),
    });
    let traced = session::run(config); // drops the sender: the view learns tracing ended
    let shown = view.join().unwrap_or_else(|_| {
        Err(Error::Io {
            what: "the view failed".into(),
            source: io::ErrorKind::Other.into(),
        })
    });
    drop(quiet); // standard streams back before any error is printed
    traced.and(shown)
}

/// The view's thread: waits for the first report, takes over the terminal, then draws each
/// report and answers keys until it is closed. Leaves the terminal as it found it.
fn show(
    mut view: View,
    screen: File,
    reports: &mpsc::Receiver<Report>,
    stop: &tokio::sync::Notify,
) -> Result<()> {
    // However the view ends (quit, error, panic), the trace ends with it.
    let _stop = StopOnDrop(stop);
    // Nothing is drawn before tracing starts: an error before then is printed as usual.
    let Ok(first) = reports.recv() else {
        return Ok(());
    };
    view.update(first);
    let mut terminal = enter(screen).map_err(|source| terminal_error("set up", source))?;
    let shown = answer(&mut view, &mut terminal, reports);
    if view.started_command {
        // The command would have had Ctrl-C from the terminal, were it not in raw mode.
        for pid in view.live_pids() {
            // SAFETY: plain signal to a process this session started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
        }
    }
    let restored = leave(&mut terminal).map_err(|source| terminal_error("restore", source));
    shown.and(restored)
}

/// Tells the session to stop when dropped.
struct StopOnDrop<'a>(&'a tokio::sync::Notify);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

/// The loop: redraw on every report and key; returns when the user quits.
fn answer(
    view: &mut View,
    terminal: &mut Terminal<CrosstermBackend<File>>,
    reports: &mpsc::Receiver<Report>,
) -> Result<()> {
    use ratatui::crossterm::event::{self, Event, KeyEventKind};
    loop {
        terminal
            .draw(|frame| view.draw(frame))
            .map_err(|source| terminal_error("draw on", source))?;
        let ready = event::poll(Duration::from_millis(100))
            .map_err(|source| terminal_error("read", source))?;
        if ready
            && let Event::Key(key) =
                event::read().map_err(|source| terminal_error("read", source))?
            && key.kind != KeyEventKind::Release
            && view.key(key) == view::Next::Quit
        {
            return Ok(());
        }
        loop {
            match reports.try_recv() {
                Ok(report) => view.update(report),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    view.ended();
                    break;
                }
            }
        }
    }
}

fn terminal_error(what: &str, source: io::Error) -> Error {
    Error::Io {
        what: format!("cannot {what} the terminal"),
        source,
    }
}

fn enter(mut screen: File) -> io::Result<Terminal<CrosstermBackend<File>>> {
    terminal::enable_raw_mode()?;
    execute!(screen, EnterAlternateScreen, cursor::Hide)?;
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // Put the terminal back first, so the panic message can be read.
        if let Ok(mut tty) = File::options().write(true).open("/dev/tty") {
            let _ = execute!(tty, LeaveAlternateScreen, cursor::Show);
        }
        let _ = terminal::disable_raw_mode();
        previous(info);
    }));
    Terminal::new(CrosstermBackend::new(screen))
}

fn leave(terminal: &mut Terminal<CrosstermBackend<File>>) -> io::Result<()> {
    let _ = std::panic::take_hook();
    terminal::disable_raw_mode()?;
    execute!(terminal.backend_mut(), LeaveAlternateScreen, cursor::Show)
}

/// Standard input, output and error pointed at `/dev/null` while the view is up; the
/// originals are kept and put back on drop.
struct Quiet {
    saved: [OwnedFd; 3],
}

impl Quiet {
    fn begin() -> Result<Self> {
        let error = |source| Error::Io {
            what: "cannot redirect standard streams for the view".into(),
            source,
        };
        let null = File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(error)?;
        let quiet = Self {
            saved: [
                dup(0).map_err(error)?,
                dup(1).map_err(error)?,
                dup(2).map_err(error)?,
            ],
        };
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors, which stay open.
            if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
                return Err(error(io::Error::last_os_error())); // `quiet` puts back what moved
            }
        }
        Ok(quiet)
    }

    /// The terminal standard output was, for the view to draw on.
    fn terminal(&self) -> Result<File> {
        self.saved[1]
            .try_clone()
            .map(File::from)
            .map_err(|source| Error::Io {
                what: "cannot open the terminal".into(),
                source,
            })
    }
}

impl Drop for Quiet {
    fn drop(&mut self) {
        for (fd, saved) in self.saved.iter().enumerate() {
            // SAFETY: restores a descriptor saved by `begin`.
            unsafe { libc::dup2(saved.as_raw_fd(), fd as i32) };
        }
    }
}

fn dup(fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we own, or -1.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}
