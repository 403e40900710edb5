//! The command line: clap definitions and validators. No aya, no files, no processes here.

use std::{ffi::OsString, path::PathBuf, time::Duration};

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "alloctrace",
    version,
    about = "Trace allocations of unmodified, running processes with eBPF: find leaks, \
             fragmentation and warm-up growth, with symbolized call sites.",
    long_about = "Trace allocations of unmodified, running processes with eBPF.\n\n\
        alloctrace puts uprobes on the allocator (glibc's malloc family) of the traced processes, \
        tracks every outstanding allocation by (pid, address) and attributes it to the call \
        site that made it. The report lists the sites holding the most live memory, with \
        symbolized stacks, and every event that could not be recorded.\n\n\
        Needs root (CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN). The traced processes need no \
        restart, no LD_PRELOAD and no recompilation.\n\n\
        Exit codes: 0 success, 1 runtime error, 2 usage error."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Print diagnostics (probe offsets, counters) to stderr.
    #[arg(short, long, global = true)]
    pub verbose: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start CMD traced from its first allocation; report when it exits (or on Ctrl-C).
    #[command(
        after_help = "Example: alloctrace run --format json -o report.json -- ./server --port 8080"
    )]
    Run(RunArgs),
    /// Trace running processes until Ctrl-C, --duration, or until they all exit.
    #[command(after_help = "Example: alloctrace attach -p 1234 --duration 60s")]
    Attach(AttachArgs),
    /// Trace every process on the host (or those the filters choose), including every
    /// container's, and every process started meanwhile, until Ctrl-C or --duration.
    #[command(
        after_help = "Probes go on each distinct allocator file once (by device and                       inode), so every process mapping it traps on its allocation calls; the                       filters decide in the kernel which of them are traced, and a process                       filtered out pays its traps and nothing else. System mode samples by                       default (--sample-bytes 524288); --exact records every call.

                      Examples:
  alloctrace system --duration 60s
                        alloctrace system --comm nginx --comm redis-server --duration 5m
                        alloctrace system --cgroup /system.slice/postgresql.service
                        alloctrace system --exclude-comm java --format json -o host.json"
    )]
    System(SystemArgs),
    /// Live terminal view of traced processes and their sites, refreshed every --interval.
    #[command(
        after_help = "Keys: ↑/↓ select a site, Enter shows its stack (Esc back), s cycles the \
                      sort (l live, g growth, a allocated, c count), w writes the current report \
                      (--format, -o), q or Ctrl-C quits.\n\n\
                      Examples: alloctrace top -p 1234    alloctrace top -- ./server --port 8080",
        mut_arg("interval", |a| a
            .default_value("1s")
            .help("How often the view refreshes (and live bytes are sampled), e.g. 500ms, 2s")),
        mut_arg("format", |a| a.help("Format of the report `w` writes")),
        mut_arg("output", |a| a.help(
            "File `w` writes the current report to (overwritten at each press); default: \
             alloctrace-PID-N.EXT in the current directory, numbered per press")),
        mut_arg("duration", |a| a.help(
            "Stop tracing after this long (the view stays until q); default: until q or exit")),
    )]
    Top(TopArgs),
    /// Fleet agent: watch every process's memory from /proc (no probes), trace only the
    /// processes that grow, one window at a time, serve Prometheus metrics and write pprof
    /// profiles; runs until SIGTERM (SIGHUP rereads --config).
    #[command(
        args_override_self = true,
        after_help = "Every --watch-interval the agent reads each process's resident memory \
                      from /proc/PID/status (no uprobes: a watched process pays nothing) and \
                      fits its growth over the last --history readings. A process whose \
                      anonymous resident memory climbs along a straight line (R² ≥ 0.8, still \
                      rising in the last third, by at least --min-growth) is traced alone \
                      (probes scoped to its pid) for --trace-window, sampled; its verdict and \
                      sites go to the metrics, its profile to --profile-dir; it is not traced \
                      again before --backoff.\n\n\
                      Examples:\n  \
                      alloctrace agent\n  \
                      alloctrace agent --listen 0.0.0.0:9959 --profile-dir /var/lib/alloctrace\n  \
                      alloctrace agent --config /etc/alloctrace/agent.conf   (SIGHUP rereads it)"
    )]
    Agent(AgentArgs),
    /// Sites whose live bytes grew between two JSON reports of the same program.
    #[command(
        after_help = "Sites are matched by their symbolized frames (function, file, line), not by \
                      address, so reports of two runs compare. Example:\n  \
                      alloctrace attach -p 1234 --duration 1m --format json -o a.json\n  \
                      alloctrace attach -p 1234 --duration 5m --format json -o b.json\n  \
                      alloctrace diff a.json b.json"
    )]
    Diff(DiffArgs),
    /// Print a shell completion script (e.g. `alloctrace completions bash > /etc/bash_completion.d/alloctrace`).
    Completions(CompletionsArgs),
    /// Print the man page (roff) of alloctrace or of one of its commands to stdout.
    #[command(after_help = "Example: alloctrace man | man -l -    alloctrace man top | man -l -")]
    Man(ManArgs),
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["pids", "command"])))]
pub struct TopArgs {
    /// Process ids to trace, comma separated.
    #[arg(short, long = "pid", value_name = "PID[,PID...]", value_delimiter = ',',
          value_parser = clap::value_parser!(u32).range(1..))]
    pub pids: Vec<u32>,

    #[command(flatten)]
    pub trace: TraceArgs,

    /// A command to start and watch instead (after `--`).
    #[arg(trailing_var_arg = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The earlier report (`--format json`).
    #[arg(value_name = "A.json")]
    pub before: PathBuf,
    /// The later report.
    #[arg(value_name = "B.json")]
    pub after: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = DiffFormat::Text)]
    pub format: DiffFormat,
    /// How many growing sites to show (0: all).
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub top: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DiffFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// A command (run, attach, top, diff, …) to print the page of instead.
    #[arg(value_name = "COMMAND")]
    pub command: Option<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub trace: TraceArgs,

    /// The command to run, with its arguments (after `--`).
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Process ids to trace, comma separated (allocations made before the attach are ignored).
    #[arg(short, long = "pid", value_name = "PID[,PID...]", value_delimiter = ',', required = true,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub pids: Vec<u32>,

    #[command(flatten)]
    pub trace: TraceArgs,
}

/// Which processes `system` and the agent take, by name and cgroup.
#[derive(Clone, Debug, Args)]
pub struct ProcessFilters {
    /// Only processes with this command name (as `ps -o comm` shows it: the first 15 bytes);
    /// repeat for several (up to 8). A process is judged by its name when it starts or execs.
    #[arg(long = "comm", value_name = "NAME", value_parser = parse_comm)]
    pub comms: Vec<String>,

    /// Never processes with this command name; repeat for several (up to 8).
    #[arg(long = "exclude-comm", value_name = "NAME", value_parser = parse_comm)]
    pub exclude_comms: Vec<String>,

    /// Only processes in this cgroup or below it: a path under /sys/fs/cgroup (e.g.
    /// /system.slice/nginx.service), or a container id (or its first 12+ characters) whose
    /// cgroup is searched for. Repeat for several (up to 8).
    #[arg(long = "cgroup", value_name = "PATH|ID")]
    pub cgroups: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SystemArgs {
    /// Only these processes (and the processes they start), comma separated.
    #[arg(short, long = "pid", value_name = "PID[,PID...]", value_delimiter = ',',
          value_parser = clap::value_parser!(u32).range(1..))]
    pub pids: Vec<u32>,

    #[command(flatten)]
    pub filters: ProcessFilters,

    /// Record every allocation call instead of sampling (dearer: see the README's host-wide
    /// cost).
    #[arg(long, conflicts_with = "sample_bytes")]
    pub exact: bool,

    /// Outstanding allocations kept at most (all processes together); past it, new ones
    /// count in the totals but not as live, and live bytes are marked as lower bounds.
    #[arg(long, default_value_t = 4_000_000, value_name = "N")]
    pub max_tracked: u64,

    /// Processes shown in full detail after the table (the worst first).
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub detail: usize,

    #[command(flatten)]
    pub trace: TraceArgs,
}

#[derive(Clone, Debug, Args)]
pub struct AgentArgs {
    /// How often every process's memory is read from /proc (e.g. 10s, 1m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub watch_interval: Duration,

    /// Readings kept per process (4-1024); growth is fitted over them, so history ×
    /// watch interval is how far back a trend is judged (default: 5 minutes).
    #[arg(long, default_value_t = 30, value_name = "N",
          value_parser = clap::value_parser!(u16).range(4..=1024))]
    pub history: u16,

    /// Growth over the history below which a process is never flagged (e.g. 4M, 512K, 1G).
    #[arg(long, default_value = "4M", value_name = "BYTES", value_parser = parse_bytes)]
    pub min_growth: u64,

    /// How long a flagged process is traced (e.g. 60s, 5m).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub trace_window: Duration,

    /// How often live bytes are sampled within a window (the verdict's time series).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub sample_interval: Duration,

    /// How long after a window ends before the same process may be traced again.
    #[arg(long, default_value = "10m", value_parser = parse_duration_or_zero)]
    pub backoff: Duration,

    /// Processes traced at once at most.
    #[arg(long, default_value_t = 2, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub max_concurrent: u16,

    /// CPU the agent's tracing may cost, in CPU cores (0.05: 5 % of one core), estimated from
    /// the traced processes' probe hits per second and the measured cost of one hit, plus the
    /// agent's own CPU. No window starts while the estimate is over it; a window that alone
    /// costs more is ended early.
    #[arg(long, default_value_t = 0.05, value_name = "CORES", value_parser = parse_cores)]
    pub cpu_budget: f64,

    /// Address the Prometheus metrics are served on (GET /metrics).
    #[arg(long, default_value = "127.0.0.1:9959", value_name = "ADDR:PORT")]
    pub listen: std::net::SocketAddr,

    /// Where each window's profile (pprof) and report (JSON) are written.
    #[arg(
        long,
        default_value = "/var/lib/alloctrace/profiles",
        value_name = "DIR"
    )]
    pub profile_dir: PathBuf,

    /// Bytes the profile directory's files may take together (e.g. 256M); the oldest go first.
    #[arg(long, default_value = "256M", value_name = "BYTES", value_parser = parse_bytes)]
    pub profile_dir_max_bytes: u64,

    /// Mean bytes between samples in a window (0: every call, dearer).
    #[arg(long, default_value_t = 524_288, value_name = "N")]
    pub sample_bytes: u64,

    /// Size in MiB of each of a window's ring buffers (a power of two).
    #[arg(long, default_value_t = 8, value_name = "MIB", value_parser = parse_ring_mib)]
    pub ring_buffer: u32,

    #[command(flatten)]
    pub filters: ProcessFilters,

    /// Processes watched at most (memory stays bounded whatever the host runs); past it, new
    /// processes are counted, not watched.
    #[arg(long, default_value_t = 16_384, value_name = "N")]
    pub max_watched: usize,

    /// A file of options, one `name = value` per line as the long options above (`#`
    /// comments); read at start and again on SIGHUP, over the command line's.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Parses `4M`, `512K`, `1G`, `1MiB` or a bare number of bytes.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size; use e.g. 512K, 4M or 1G"))?;
    let shift = match unit.trim().trim_end_matches("iB").trim_end_matches('B') {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return Err(format!("unknown unit in `{text}`; use K, M, G or T")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("`{text}` is too large"))
}

/// A duration that may be zero (`0s`: no wait).
fn parse_duration_or_zero(text: &str) -> Result<Duration, String> {
    if text
        .trim()
        .trim_end_matches(['s', 'm', 'h'])
        .trim_end_matches('m')
        == "0"
    {
        return Ok(Duration::ZERO);
    }
    parse_duration(text)
}

/// CPU cores, more than 0.
fn parse_cores(text: &str) -> Result<f64, String> {
    let v: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of CPU cores, e.g. 0.05"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!(
            "`{text}`: the CPU budget must be more than 0 cores"
        ));
    }
    Ok(v)
}

/// A command name as the kernel keeps it: at most 15 bytes.
fn parse_comm(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("empty command name".into());
    }
    let bytes = &s.as_bytes()[..s.len().min(15)];
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Stop after this long (e.g. 500ms, 30s, 10m, 1h); default: until Ctrl-C or exit.
    #[arg(short, long, value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// How often to sample live bytes, footprint and per-site growth (e.g. 250ms, 1s). Series
    /// stay bounded: a long trace keeps its whole span at a coarser step.
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    pub interval: Duration,

    /// Report format.
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    /// Write the report to FILE instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// How many call sites to keep per process (leaks first, then by live bytes); default:
    /// 20 in text and json, every site in pprof, folded and svg.
    #[arg(long, value_name = "N")]
    pub top: Option<usize>,

    /// What stacks weigh in folded and svg output: live bytes, allocated bytes (in total), or
    /// the count of live allocations.
    #[arg(long, value_enum, default_value_t = Weight::Live)]
    pub weight: Weight,

    /// Byte sampling: 0 records every call (exact); N > 0 samples allocations as a Poisson
    /// process with a mean of N bytes between samples (jemalloc's and Go's scheme), so an
    /// allocation of s bytes is recorded with probability 1 - exp(-s/N). Unsampled calls
    /// cost no event and no stack; counts and bytes are reported as unbiased estimates.
    /// Default: 0 (exact) for run, attach and top; 524288 for system.
    #[arg(long, value_name = "N")]
    pub sample_bytes: Option<u64>,

    /// With --sample-bytes: how many sampled blocks the kernel can remember live at once
    /// (each costs ~60 bytes of kernel memory). Past it, new samples count in the totals but
    /// not as live, and the report says so.
    #[arg(long, default_value_t = tracer_common::DEFAULT_SAMPLED_ENTRIES, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=(1 << 26)))]
    pub max_sampled: u32,

    /// Seed of the sampler's random generators (with --sample-bytes): fix it to draw the
    /// same samples again; by default every run draws its own from the kernel's randomness.
    #[arg(long, value_name = "N")]
    pub sample_seed: Option<u64>,

    /// Attach empty programs instead of the tracer: measures the bare uprobe cost.
    #[arg(long, hide = true)]
    pub probe_floor: bool,

    /// The two-trap floor instead: empty uprobe sessions on the allocation functions that
    /// skip their returns, an empty probe on `free` (the least any exact tracer pays).
    #[arg(long, hide = true, conflicts_with = "probe_floor")]
    pub probe_floor_sessions: bool,

    /// How stacks are captured: `fp` walks frame pointers in the kernel (cheapest, but loses
    /// callers in code built without them); `dwarf` walks the binaries' CFI (`.eh_frame`) in
    /// the kernel, compiled once per file into unwind tables (nearly as cheap as `fp`);
    /// `dwarf-copy` copies the top of the stack and unwinds it in userspace (dearest: kept
    /// for checking, and taken per event where `dwarf` meets code no table covers, such as
    /// JIT code). `auto` picks `fp` for executables whose functions keep frame pointers,
    /// `dwarf` otherwise.
    #[arg(long, value_enum, default_value_t = StackModeArg::Auto)]
    pub stack_mode: StackModeArg,

    /// Frames kept per stack (1-127); deeper stacks are marked truncated in the report.
    #[arg(long, default_value_t = 127, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=127))]
    pub stack_depth: u16,

    /// Bytes of stack copied per event in `dwarf-copy` mode (1024-16384): more reaches deeper
    /// callers, costs more per event. Stacks the copy cannot finish are marked truncated.
    #[arg(long, default_value_t = 8192, value_name = "BYTES",
          value_parser = clap::value_parser!(u32).range(1024..=16384))]
    pub stack_bytes: u32,

    /// How the uprobes are put on: `session` (Linux ≥ 6.13) probes each allocation function
    /// with one program that skips the return trap of every call that records nothing
    /// (unsampled calls, calls in untraced processes), and the rest as `multi`; `multi` (≥ 6.6)
    /// uses one uprobe_multi link per program; `perf` one perf event per probe (any kernel,
    /// dearest per call). `auto` takes the cheapest the kernel has; the others fail where it
    /// has not.
    #[arg(long, value_enum, default_value_t = UprobesArg::Auto)]
    pub uprobes: UprobesArg,

    /// Record every malloc at its return. By default a malloc that glibc (2.34-2.41) serves
    /// from its per-thread cache is recorded at its entry, from the block the cache is about
    /// to hand out, and its return is not trapped: a third fewer traps per malloc/free pair.
    /// Predictions are checked against the real return on a sample of calls; one wrong one
    /// turns prediction off and is reported.
    #[arg(long)]
    pub no_tcache_prediction: bool,

    /// Skew every thread-cache prediction by 16 bytes (tests the check that catches them).
    #[arg(long, hide = true)]
    pub test_mispredict: bool,

    /// Never read /proc/PID/maps: symbolize from the kernel's exec and mapping events alone,
    /// as for a process gone before its mappings could be read (tests that path).
    #[arg(long, hide = true)]
    pub test_maps_from_events: bool,

    /// Size in MiB of each ring buffer (a power of two); raise it if the report shows drops.
    /// There is one per CPU, up to 4 (more CPUs share them): each holds one CPU's events.
    /// Stacks walked in the kernel keep events small (80 bytes in the ring; a distinct
    /// stack's frames travel once): the default, 8 MiB, holds ≈ 100 ms of one core allocating
    /// flat out (a garbage collector's burst of frees, or the collector busy building a big
    /// binary's unwind table). With `--stack-mode dwarf-copy` (kilobytes of stack per event)
    /// stacks past half a ring are left out (counted and named in the report) rather than
    /// events: 2 % of a python run allocating 300 000 times a second at 8, none at 64 (on 2
    /// CPUs, 16 MiB of the collector's memory against 128).
    #[arg(long, value_name = "MIB", value_parser = parse_ring_mib)]
    pub ring_buffer: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Human-readable: verdicts, then the top sites with their stacks.
    Text,
    /// The alloctrace.report/v1 JSON object.
    Json,
    /// A gzip-compressed pprof profile shaped like Go's heap profile (go tool pprof, Pyroscope,
    /// Parca, speedscope); one file for all processes, with a `pid` label.
    Pprof,
    /// Folded stacks (`process;outer;…;inner VALUE`) for flame-graph tools; see --weight.
    Folded,
    /// A flame graph (SVG) with leaking sites in red; see --weight.
    Svg,
}

impl Format {
    /// Profile formats keep every site by default: tools do their own filtering.
    pub fn is_profile(self) -> bool {
        matches!(self, Self::Pprof | Self::Folded | Self::Svg)
    }

    /// The usual file extension.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Text => "txt",
            Self::Json => "json",
            Self::Pprof => "pb.gz",
            Self::Folded => "folded",
            Self::Svg => "svg",
        }
    }
}

/// What folded stacks and flame graphs weigh each stack by (`--weight`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Weight {
    /// Bytes still allocated at the end of the trace.
    Live,
    /// Bytes allocated over the whole trace, freed or not.
    Allocated,
    /// Allocations still live at the end of the trace.
    Count,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum UprobesArg {
    Auto,
    Session,
    Multi,
    Perf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StackModeArg {
    Auto,
    Fp,
    Dwarf,
    DwarfCopy,
}

/// Parses `500ms`, `30s`, `10m`, `1h`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration; use e.g. 500ms, 30s, 10m or 1h"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "unknown unit `{unit}` in `{text}`; use ms, s, m or h"
            ));
        }
    };
    if !(seconds.is_finite() && seconds > 0.0) {
        return Err(format!("`{text}` must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn parse_ring_mib(text: &str) -> Result<u32, String> {
    let mib: u32 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number of MiB"))?;
    if !mib.is_power_of_two() || !(1..=1024).contains(&mib) {
        return Err(format!(
            "{mib} MiB is not allowed: use a power of two from 1 to 1024"
        ));
    }
    Ok(mib)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("4M"), Ok(4 << 20));
        assert_eq!(parse_bytes("512K"), Ok(512 << 10));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert!(parse_bytes("4X").is_err());
        assert!(parse_bytes("").is_err());
        assert_eq!(parse_duration_or_zero("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration_or_zero("2s"), Ok(Duration::from_secs(2)));
    }

    #[test]
    fn agent_defaults_and_overrides() {
        let cli = Cli::try_parse_from([
            "alloctrace",
            "agent",
            "--watch-interval",
            "1s",
            "--watch-interval",
            "2s",
        ])
        .expect("parses");
        let Command::Agent(a) = cli.command else {
            panic!("expected agent")
        };
        assert_eq!(
            a.watch_interval,
            Duration::from_secs(2),
            "the last one wins"
        );
        assert_eq!(a.trace_window, Duration::from_secs(60));
        assert_eq!(a.listen.port(), 9959);
        assert!(a.listen.ip().is_loopback());
        assert!(Cli::try_parse_from(["alloctrace", "agent", "--cpu-budget", "0"]).is_err());
    }

    #[test]
    fn ring_sizes() {
        assert_eq!(parse_ring_mib("64"), Ok(64));
        assert!(parse_ring_mib("48").is_err());
        assert!(parse_ring_mib("0").is_err());
        assert!(parse_ring_mib("2048").is_err());
    }

    #[test]
    fn run_takes_command_after_double_dash() {
        let cli = Cli::try_parse_from(["alloctrace", "run", "--format", "json", "--", "ls", "-l"])
            .expect("parses");
        let Command::Run(run) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(
            run.command,
            vec![OsString::from("ls"), OsString::from("-l")]
        );
        assert_eq!(run.trace.format, Format::Json);
    }

    #[test]
    fn attach_takes_pid_list() {
        let cli = Cli::try_parse_from(["alloctrace", "attach", "-p", "12,34", "--duration", "2s"])
            .expect("parses");
        let Command::Attach(attach) = cli.command else {
            panic!("expected attach")
        };
        assert_eq!(attach.pids, vec![12, 34]);
        assert_eq!(attach.trace.duration, Some(Duration::from_secs(2)));
        assert!(Cli::try_parse_from(["alloctrace", "attach", "-p", "0"]).is_err());
    }

    #[test]
    fn top_takes_pids_or_a_command_not_both() {
        let cli = Cli::try_parse_from(["alloctrace", "top", "-p", "7"]).expect("parses");
        let Command::Top(top) = cli.command else {
            panic!("expected top")
        };
        assert_eq!(top.pids, vec![7]);
        // top refreshes every second by default; run and attach sample every 250 ms.
        assert_eq!(top.trace.interval, Duration::from_secs(1));
        let cli = Cli::try_parse_from(["alloctrace", "top", "--", "ls", "-l"]).expect("parses");
        let Command::Top(top) = cli.command else {
            panic!("expected top")
        };
        assert_eq!(
            top.command,
            vec![OsString::from("ls"), OsString::from("-l")]
        );
        assert!(Cli::try_parse_from(["alloctrace", "top"]).is_err());
        assert!(Cli::try_parse_from(["alloctrace", "top", "-p", "7", "--", "ls"]).is_err());
        let cli = Cli::try_parse_from(["alloctrace", "attach", "-p", "7"]).expect("parses");
        let Command::Attach(attach) = cli.command else {
            panic!("expected attach")
        };
        assert_eq!(attach.trace.interval, Duration::from_millis(250));
    }

    #[test]
    fn profile_formats_and_weights() {
        let cli = Cli::try_parse_from([
            "alloctrace",
            "run",
            "--format",
            "svg",
            "--weight",
            "count",
            "--",
            "ls",
        ])
        .expect("parses");
        let Command::Run(run) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(run.trace.format, Format::Svg);
        assert_eq!(run.trace.weight, Weight::Count);
        assert_eq!(run.trace.top, None);
        assert!(Format::Pprof.is_profile() && !Format::Json.is_profile());
        let err = Cli::try_parse_from(["alloctrace", "run", "--weight", "heavy", "--", "ls"])
            .expect_err("bad weight");
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn the_definition_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
