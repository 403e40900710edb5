//! The human-readable report: the verdicts first, then each process with its evidence and
//! its sites, each site with the frames worth reading.
//!
//! It is written for a terminal: sizes in binary units, counts with their nouns in the
//! right number, growth per second, hour and day, source paths relative to the prefix they
//! share, and the runtime frames every stack ends in (`__libc_start_call_main`, `_start`,
//! Rust's `lang_start`) folded into one dimmed line. Colour only when the caller says the
//! output is a terminal that wants it ([`color_wanted`]).

use std::{
    io::{self, IsTerminal as _, Write},
    path::{Component, Path, PathBuf},
};

use anstyle::{AnsiColor, Style};

use super::{FrameReport, ProcessReport, Report, SiteReport};
use crate::{
    analysis::{ProcessVerdict, SiteVerdict},
    model::SiteKind,
};

pub use crate::analysis::{bytes_text as bytes, units::count};

/// Frames shown per site in text (JSON carries them all).
const FRAMES_SHOWN: usize = 12;

/// Runtime frames: the start-up and thread-entry code every stack ends in. Matched as
/// prefixes of the function name.
const RUNTIME_PREFIXES: &[&str] = &[
    "_start",
    "__libc_start_main",
    "__libc_start_call_main",
    "start_thread",
    "clone",
    "__clone",
    "std::rt::lang_start",
    "std::rt::lang_start_internal",
    "std::panicking::",
    "std::panic::catch_unwind",
    "std::sys::backtrace::__rust_begin_short_backtrace",
    "core::ops::function::FnOnce::call_once",
    "std::thread::Builder::spawn_unchecked_",
    "std::sys::pal::unix::thread::Thread::new::thread_start",
];

/// Colour is for a terminal: stdout is one, and `NO_COLOR` (no-color.org) is unset or empty.
pub fn color_wanted(to_stdout: bool) -> bool {
    to_stdout
        && io::stdout().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Writes the report; `color` adds ANSI styles (see [`color_wanted`]).
pub fn write(report: &Report, color: bool, out: &mut dyn Write) -> io::Result<()> {
    let paint = Paint { color };
    let prefix = common_source_prefix(report);
    header(report, &paint, prefix.as_deref(), out)?;
    if let Some(system) = &report.system {
        super::host_table::write(system, report.processes.len(), out)?;
    }
    if report.processes.is_empty() {
        writeln!(out, "\nno process was traced")?;
    }
    let ctx = Context {
        paint,
        prefix: prefix.as_deref(),
    };
    for p in &report.processes {
        process(p, &ctx, out)?;
    }
    Ok(())
}

/// How the whole report is drawn: colour, and the prefix source paths are shown under.
struct Context<'a> {
    paint: Paint,
    prefix: Option<&'a Path>,
}

/// ANSI styles when colour is on, plain text otherwise.
#[derive(Clone, Copy)]
struct Paint {
    color: bool,
}

impl Paint {
    fn paint(self, style: Style, text: &str) -> String {
        if self.color {
            format!("{}{text}{}", style.render(), style.render_reset())
        } else {
            text.to_owned()
        }
    }

    fn bold(self, text: &str) -> String {
        self.paint(Style::new().bold(), text)
    }

    fn dim(self, text: &str) -> String {
        self.paint(Style::new().dimmed(), text)
    }

    fn warn(self, text: &str) -> String {
        self.paint(Style::new().fg_color(Some(AnsiColor::Yellow.into())), text)
    }

    fn process_verdict(self, v: Option<ProcessVerdict>) -> String {
        let color = match v {
            Some(ProcessVerdict::Leak) => AnsiColor::Red,
            Some(ProcessVerdict::Fragmentation) => AnsiColor::Yellow,
            Some(ProcessVerdict::Stable) => AnsiColor::Green,
            None => AnsiColor::Magenta,
        };
        self.paint(
            Style::new().bold().fg_color(Some(color.into())),
            verdict_word(v),
        )
    }

    fn site_verdict(self, s: &SiteReport) -> String {
        match s.assessment.verdict {
            SiteVerdict::Leak => self.paint(
                Style::new().bold().fg_color(Some(AnsiColor::Red.into())),
                "LEAK",
            ),
            SiteVerdict::Stable if s.assessment.one_time => "one-time".to_owned(),
            SiteVerdict::Stable => "stable".to_owned(),
            SiteVerdict::Temporary => self.dim("temporary"),
        }
    }
}

/// `LEAK`, `FRAGMENTATION`, `STABLE`, or `NO VERDICT` when it was withheld.
pub fn verdict_word(v: Option<ProcessVerdict>) -> &'static str {
    match v {
        Some(ProcessVerdict::Leak) => "LEAK",
        Some(ProcessVerdict::Fragmentation) => "FRAGMENTATION",
        Some(ProcessVerdict::Stable) => "STABLE",
        None => "NO VERDICT",
    }
}

/// The verdicts of every process on the first lines, then what was traced and lost.
/// Processes named on a verdict's line at most (`system`: a host has hundreds).
const NAMED: usize = 8;

/// The processes a verdict line names: every process shown, or under `system` every row
/// (processes that ended included), stable ones by count.
fn verdict_names(report: &Report, verdict: Option<ProcessVerdict>) -> Vec<String> {
    let Some(system) = &report.system else {
        return report
            .processes
            .iter()
            .filter(|p| p.verdict == verdict)
            .map(|p| format!("{} (pid {})", p.comm, p.pid))
            .collect();
    };
    let rows: Vec<&super::system::ProcessRow> = system
        .rows
        .iter()
        .filter(|r| r.verdict == verdict)
        .collect();
    if rows.is_empty() {
        return Vec::new();
    }
    if verdict == Some(ProcessVerdict::Stable) {
        return vec![count(rows.len(), "process", "processes")];
    }
    let mut names: Vec<String> = rows
        .iter()
        .take(NAMED)
        .map(|r| {
            let ended = if r.exited { ", ended" } else { "" };
            format!("{} (pid {}{ended})", r.comm, r.pid)
        })
        .collect();
    if rows.len() > NAMED {
        names.push(format!("and {} more", rows.len() - NAMED));
    }
    names
}

fn header(
    report: &Report,
    paint: &Paint,
    prefix: Option<&Path>,
    out: &mut dyn Write,
) -> io::Result<()> {
    for verdict in [
        Some(ProcessVerdict::Leak),
        Some(ProcessVerdict::Fragmentation),
        Some(ProcessVerdict::Stable),
        None,
    ] {
        let names = verdict_names(report, verdict);
        if !names.is_empty() {
            writeln!(
                out,
                "{}: {}",
                paint.process_verdict(verdict),
                names.join(", ")
            )?;
        }
    }
    let traced = report
        .system
        .as_ref()
        .map_or(report.processes.len(), |s| s.rows.len());
    writeln!(
        out,
        "traced {} for {} · {} received, {} dropped",
        count(traced, "process", "processes"),
        crate::analysis::seconds(report.duration_s),
        count(report.events.received as usize, "event", "events"),
        report.events.dropped
    )?;
    if report.sample_bytes > 0 {
        writeln!(
            out,
            "sampled: one sample per {} allocated on average; sizes and counts are estimates \
             (≈, ± their 95 % interval), 'recorded' counts are the samples themselves",
            bytes(report.sample_bytes)
        )?;
    }
    if report.partial {
        let text = "PARTIAL RESULT: events were lost or doubted (see the warnings); the numbers \
                    below may be off";
        writeln!(
            out,
            "{}",
            paint.paint(
                Style::new().bold().fg_color(Some(AnsiColor::Red.into())),
                text
            )
        )?;
    }
    for warning in &report.warnings {
        writeln!(out, "{}", paint.warn(&format!("warning: {warning}")))?;
    }
    if let Some(prefix) = prefix {
        writeln!(
            out,
            "{}",
            paint.dim(&format!(
                "source paths are relative to {}/",
                prefix.display()
            ))
        )?;
    }
    Ok(())
}

fn process(p: &ProcessReport, ctx: &Context<'_>, out: &mut dyn Write) -> io::Result<()> {
    let paint = ctx.paint;
    writeln!(out)?;
    let exited = match p.ended_at_s {
        Some(at) if p.exited => format!(" · exited at {at:.1} s"),
        _ if p.exited => " · exited".to_owned(),
        _ => String::new(),
    };
    writeln!(
        out,
        "{}",
        paint.bold(&format!("pid {} · {} · {}{exited}", p.pid, p.comm, p.exe))
    )?;
    writeln!(
        out,
        "  {}: {}",
        paint.process_verdict(p.verdict),
        p.evidence
    )?;
    if p.verdict == Some(ProcessVerdict::Leak) {
        let rate: f64 = p
            .sites
            .iter()
            .filter(|s| s.assessment.verdict == SiteVerdict::Leak)
            .filter_map(|s| s.assessment.growth.as_ref())
            .map(|g| g.bytes_per_s)
            .sum();
        if rate > 0.0 {
            writeln!(out, "  growth {}", growth(rate))?;
        }
    }
    totals(p, out)?;
    lineage(p, out)?;
    writeln!(
        out,
        "  {}",
        paint.dim(&format!("allocator: {}", p.allocator))
    )?;
    if let (Some(mode), Some(why)) = (p.stack_mode, &p.stack_mode_reason) {
        writeln!(out, "  {}", paint.dim(&format!("stacks: {mode} ({why})")))?;
    }
    writeln!(
        out,
        "  {} (leaks first, then by live bytes):",
        count(p.sites_total, "site", "sites")
    )?;
    for (rank, s) in p.sites.iter().enumerate() {
        site(rank + 1, s, ctx, out)?;
    }
    if p.sites_omitted > 0 {
        writeln!(
            out,
            "  … {} (raise --top to see them)",
            count(p.sites_omitted, "more site", "more sites")
        )?;
    }
    Ok(())
}

/// Live, peak and total figures (estimates with their intervals when sampled), what was
/// live before an exit's teardown, the footprint and its parts, and what was ignored.
fn totals(p: &ProcessReport, out: &mut dyn Write) -> io::Result<()> {
    let own_mappings = if p.mmap_live_bytes > 0 {
        format!(
            " ({} in the program's own mappings)",
            bytes(p.mmap_live_bytes)
        )
    } else {
        String::new()
    };
    let iv = p.intervals.as_ref();
    let n = |c: u64, one: &str, many: &str| {
        let text = count(c as usize, one, many);
        if iv.is_some() {
            format!("≈ {text}")
        } else {
            text
        }
    };
    writeln!(
        out,
        "  live {} in {}{own_mappings} · peak {} at {} · {} ({}) in total · {}",
        sized(p.live_bytes, iv.map(|i| i.live_bytes)),
        n(p.live_allocations, "allocation", "allocations"),
        sized(p.peak.live_bytes, iv.and_then(|i| i.peak_live_bytes)),
        crate::analysis::seconds(p.peak.at_s),
        n(p.total_allocations, "allocation", "allocations"),
        sized(p.total_bytes, iv.map(|i| i.total_bytes)),
        n(p.frees, "free", "frees")
    )?;
    if iv.is_some() {
        writeln!(
            out,
            "  recorded (the samples themselves): {}",
            count(p.recorded_allocations as usize, "allocation", "allocations")
        )?;
    }
    if let Some(t) = &p.pre_teardown {
        writeln!(
            out,
            "  before its exit teardown (at {}): live {}, freed in the last {:.0} ms",
            crate::analysis::seconds(t.at_s),
            bytes(t.live_bytes),
            t.lasted_s * 1000.0
        )?;
    }
    footprint(p, out)?;
    if !p.peak.sites.is_empty() {
        let at_peak: Vec<String> = p
            .peak
            .sites
            .iter()
            .map(|s| format!("{} {}", s.function, bytes(s.live_bytes)))
            .collect();
        writeln!(out, "  at the peak: {}", at_peak.join(", "))?;
    }
    let before = unseen_before(p);
    if p.unknown_frees > 0 {
        writeln!(
            out,
            "  {} of blocks allocated {before} ignored",
            count(p.unknown_frees as usize, "free", "frees")
        )?;
    }
    if p.unknown_reallocs > 0 {
        writeln!(
            out,
            "  {} of blocks allocated {before}: only their new blocks count",
            count(p.unknown_reallocs as usize, "realloc", "reallocs")
        )?;
    }
    Ok(())
}

/// When the blocks a process frees without their allocation having been seen were made.
fn unseen_before(p: &ProcessReport) -> &'static str {
    if p.attached {
        "before tracing began"
    } else if p.probes_after_fork_s.is_some() {
        "before its probes were in place"
    } else {
        // Traced from its first instruction: the C library's own start-up and thread-exit
        // bookkeeping, which bypasses the probed entry points.
        "where alloctrace does not see (the C library's start-up and thread-exit \
         bookkeeping)"
    }
}

/// Where the process came from and what it forked: a traced fork's start (inherited blocks,
/// and how long after the fork its probes were in place), its children traced or not.
fn lineage(p: &ProcessReport, out: &mut dyn Write) -> io::Result<()> {
    if let Some(i) = &p.inherited {
        writeln!(
            out,
            "  forked by pid {}: started with its {} ({}), freed {} of them ({})",
            i.from_pid,
            count(i.allocations as usize, "live block", "live blocks"),
            bytes(i.bytes),
            i.freed_allocations,
            bytes(i.freed_bytes)
        )?;
    }
    if let Some(after) = p.probes_after_fork_s {
        writeln!(
            out,
            "  its probes were in place {} after its fork: what it allocated before then was \
             not seen",
            crate::analysis::seconds(after)
        )?;
    }
    if p.children_forked > 0 {
        let untraced = match p.children_untraced {
            0 => "each traced".to_owned(),
            n => {
                format!("{n} of them NOT traced (the kernel's table of traced processes was full)")
            }
        };
        writeln!(
            out,
            "  forked {}: {untraced}",
            count(p.children_forked as usize, "process", "processes")
        )?;
    }
    if p.replaced_by_exec {
        writeln!(
            out,
            "  replaced its program (exec): its blocks ended with this image, not leaked"
        )?;
    }
    Ok(())
}

/// `12.0 MiB`, or `≈ 12.0 MiB ± 1.10 MiB` for an estimate with its interval.
fn sized(value: u64, interval: Option<[u64; 2]>) -> String {
    match interval {
        Some([lo, hi]) => format!("≈ {} ± {}", bytes(value), bytes((hi - lo) / 2)),
        None => bytes(value),
    }
}

/// The footprint and what is known of its parts beyond live bytes.
fn footprint(p: &ProcessReport, out: &mut dyn Write) -> io::Result<()> {
    let Some(f) = p.footprint_bytes else {
        return writeln!(
            out,
            "  footprint unknown (the process was gone before it could be measured)"
        );
    };
    let mut parts = Vec::new();
    match (&p.allocator_free, p.retained_bytes) {
        (Some(free), _) => parts.push(format!(
            "{} free in {} (retained by the allocator)",
            bytes(free.bytes),
            free.source
        )),
        (None, Some(r)) => parts.push(format!("{} freed and retained by the allocator", bytes(r))),
        (None, None) => {}
    }
    if let Some(a) = p.pre_attach_bytes.filter(|&a| a > 0) {
        parts.push(if p.allocator_free.is_some() {
            format!("{} allocated before the attach and still in use", bytes(a))
        } else {
            format!(
                "{} allocated before the attach (live or free: unknown)",
                bytes(a)
            )
        });
    }
    writeln!(
        out,
        "  footprint {} (resident heap and allocator mappings){}",
        bytes(f),
        if parts.is_empty() {
            String::new()
        } else {
            format!(": {}", parts.join("; "))
        }
    )
}

/// `+21.6 KiB/s · +75.9 MiB/h · +1.78 GiB/day`: the rate at the scales leaks are felt.
pub fn growth(bytes_per_s: f64) -> String {
    let signed = |v: f64| {
        let sign = if v < 0.0 { "-" } else { "+" };
        format!("{sign}{}", bytes(v.abs().round() as u64))
    };
    format!(
        "{}/s · {}/h · {}/day",
        signed(bytes_per_s),
        signed(bytes_per_s * 3600.0),
        signed(bytes_per_s * 86_400.0)
    )
}

/// `256 B each`, or `≈1.20 KiB each` when sizes vary (or are estimated).
pub fn per_allocation(bytes_total: u64, allocations: u64, estimated: bool) -> Option<String> {
    if allocations == 0 {
        return None;
    }
    let exact = bytes_total.is_multiple_of(allocations) && !estimated;
    let each = bytes((bytes_total as f64 / allocations as f64).round() as u64);
    Some(if exact {
        format!("{each} each")
    } else {
        format!("≈{each} each")
    })
}

fn site(rank: usize, s: &SiteReport, ctx: &Context<'_>, out: &mut dyn Write) -> io::Result<()> {
    let (one, many) = match s.kind {
        SiteKind::Heap => ("allocation", "allocations"),
        SiteKind::Mmap => ("mapping", "mappings"),
    };
    let estimated = s.recorded_allocations != s.total_allocations || s.intervals.is_some();
    let iv = s.intervals.as_ref();
    let approx = if iv.is_some() { "≈ " } else { "" };
    let live = if s.live_allocations > 0 {
        let each = per_allocation(s.live_bytes, s.live_allocations, estimated);
        format!(
            "{} live in {approx}{}, {}",
            sized(s.live_bytes, iv.map(|i| i.live_bytes)),
            count(s.live_allocations as usize, one, many),
            each.unwrap_or_default()
        )
    } else {
        "nothing live".to_owned()
    };
    let mut allocated = format!(
        "{} allocated in {approx}{}",
        sized(s.total_bytes, iv.map(|i| i.total_bytes)),
        count(s.total_allocations as usize, one, many)
    );
    if s.live_allocations == 0
        && let Some(each) = per_allocation(s.total_bytes, s.total_allocations, estimated)
    {
        allocated = format!("{allocated}, {each}");
    }
    let kind = if s.kind == SiteKind::Mmap {
        " (mmap)"
    } else {
        ""
    };
    writeln!(
        out,
        "  #{rank:<2} {}{kind}  {live} · {allocated}",
        ctx.paint.site_verdict(s)
    )?;
    writeln!(out, "      {}", s.assessment.evidence)?;
    if s.assessment.verdict == SiteVerdict::Leak
        && let Some(g) = &s.assessment.growth
    {
        writeln!(out, "      growth {}", growth(g.bytes_per_s))?;
    }
    if let Some(ty) = &s.allocated_type {
        writeln!(out, "      allocates: {ty}")?;
    }
    // The stack is shown from the program's own frame; the library code it called is named
    // by its outermost frame (all of it is in the JSON's `library_frames`).
    if let Some(called) = s.library_frames.last() {
        let inside = match s.library_frames.len() - 1 {
            0 => String::new(),
            n => format!(" (+{} inside)", count(n, "library frame", "library frames")),
        };
        writeln!(
            out,
            "      {}",
            ctx.paint
                .dim(&format!("through: {}{inside}", called.function))
        )?;
    }
    stack(s, ctx, out)
}

/// The site's frames worth reading: the program's own first (runtime frames among them
/// dimmed), at most [`FRAMES_SHOWN`], then the runtime frames the stack ends in as one
/// dimmed line with a count. "Truncated" only when the capture lost callers.
fn stack(s: &SiteReport, ctx: &Context<'_>, out: &mut dyn Write) -> io::Result<()> {
    let paint = ctx.paint;
    if s.frames.is_empty() {
        writeln!(out, "        <stack unknown>")?;
    }
    let program_end = s
        .frames
        .iter()
        .rposition(|f| !is_runtime(f))
        .map_or(s.frames.len(), |i| i + 1);
    let shown = program_end.min(FRAMES_SHOWN);
    for f in &s.frames[..shown] {
        let line = frame_line(f, ctx.prefix);
        let line = if is_runtime(f) {
            paint.dim(&line)
        } else {
            line
        };
        writeln!(out, "        {line}")?;
    }
    if program_end > shown {
        writeln!(
            out,
            "        … {}",
            count(program_end - shown, "more frame", "more frames")
        )?;
    }
    let runtime = &s.frames[program_end..];
    if !runtime.is_empty() {
        let names: Vec<&str> = runtime.iter().map(|f| short_name(&f.function)).collect();
        let text = format!(
            "… {}: {}",
            count(runtime.len(), "runtime frame", "runtime frames"),
            names.join(" ← ")
        );
        writeln!(out, "        {}", paint.dim(&text))?;
    }
    if s.stack_truncated {
        writeln!(
            out,
            "        {}",
            paint.warn(
                "… stack truncated by the capture: its outer callers were lost (raise \
                 --stack-depth, or --stack-bytes in dwarf mode)"
            )
        )?;
    }
    Ok(())
}

/// `leak_request (leak_loop.c:21)`, `memcpy [libc.so.6]`, `[inlined]` when it is.
fn frame_line(f: &FrameReport, prefix: Option<&Path>) -> String {
    let location = match (&f.file, f.line) {
        (Some(file), Some(line)) => format!(" ({}:{line})", shorten(file, prefix)),
        (Some(file), None) => format!(" ({})", shorten(file, prefix)),
        _ => f
            .module
            .as_deref()
            .map(|m| format!(" [{}]", m.rsplit('/').next().unwrap_or(m)))
            .unwrap_or_default(),
    };
    let inlined = if f.inlined { " [inlined]" } else { "" };
    format!("{}{location}{inlined}", f.function)
}

/// Whether a frame is start-up or thread-entry code rather than the program's.
pub fn is_runtime(f: &FrameReport) -> bool {
    is_runtime_function(&f.function)
}

/// Whether a function is start-up or thread-entry code rather than the program's.
pub fn is_runtime_function(name: &str) -> bool {
    let name = name.trim_start_matches('<');
    RUNTIME_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// A function name without its argument list (`f(int)` → `f`), for one-line summaries.
fn short_name(name: &str) -> &str {
    match name.find('(') {
        Some(i) if i > 0 => &name[..i],
        _ => name,
    }
}

/// `file` relative to `prefix` when it lies under it.
fn shorten(file: &str, prefix: Option<&Path>) -> String {
    prefix
        .and_then(|p| Path::new(file).strip_prefix(p).ok())
        .map_or_else(|| file.to_owned(), |rest| rest.display().to_string())
}

/// The deepest directory holding every absolute source path of the program's own frames,
/// when it says more than `/`.
pub fn common_source_prefix(report: &Report) -> Option<PathBuf> {
    let mut prefix: Option<PathBuf> = None;
    let files = report
        .processes
        .iter()
        .flat_map(|p| &p.sites)
        .flat_map(|s| &s.frames)
        .filter(|f| !is_runtime(f))
        .filter_map(|f| f.file.as_deref())
        .filter(|f| f.starts_with('/'));
    for file in files {
        let dir = Path::new(file).parent().unwrap_or(Path::new("/"));
        prefix = Some(match prefix {
            None => dir.to_owned(),
            Some(p) => p
                .components()
                .zip(dir.components())
                .take_while(|(a, b)| a == b)
                .map(|(a, _)| a)
                .collect(),
        });
    }
    prefix.filter(|p| p.components().any(|c| matches!(c, Component::Normal(_))))
}
