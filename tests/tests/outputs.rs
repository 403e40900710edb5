//! Issue 20's proofs: the outputs land in the tools people already use, checked with those
//! tools themselves (go tool pprof, an XML parser, tmux, a pseudo-terminal, bash, man) on
//! real traces of fixture programs.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use alloctrace_tests::*;
use serde_json::Value;

/// `alloctrace run ARGS -o FILE -- BIN`, checked to succeed; returns FILE.
fn run_to_file(tag: &str, args: &[&str], bin: &Path) -> PathBuf {
    let file = tempfile(tag);
    let out = Command::new(alloctrace())
        .arg("run")
        .args(args)
        .arg("-o")
        .arg(&file)
        .arg("--")
        .arg(bin)
        .stdin(Stdio::null())
        .output()
        .expect("run alloctrace");
    assert!(
        out.status.success(),
        "alloctrace run {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    file
}

/// The row of `go tool pprof -top -unit=B` for `function`: (flat bytes, cum bytes).
fn top_row(top: &str, function: &str) -> (u64, u64) {
    let bytes = |field: &str| {
        field
            .strip_suffix('B')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("not a byte count: {field} in\n{top}"))
    };
    top.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() == 6 && f[5] == function)
        .map(|f| (bytes(f[0]), bytes(f[3])))
        .unwrap_or_else(|| panic!("{function} missing from go tool pprof -top:\n{top}"))
}

/// Proof 1: go tool pprof reads the profile: in-use and allocated bytes exact per function,
/// whole traces, the fixture's mapping with its build id, inuse_space the default.
#[test]
fn go_tool_pprof_reads_exact_bytes_traces_and_build_ids() {
    require_root();
    let bin = fixture("leaks", &[]);
    let profile = run_to_file("pprof", &["--format", "pprof"], &bin);

    let top = go_pprof(&["-top", "-unit=B", "-sample_index=inuse_space"], &profile);
    assert_eq!(top_row(&top, "leak_small").0, 64_000, "{top}");
    assert_eq!(top_row(&top, "leak_big").0, 10 << 20, "{top}");
    // pprof leaves out what holds nothing: churn() freed everything.
    assert!(!top.contains(" churn\n"), "{top}");

    // Every churn() call: malloc(100 + i % 50) and calloc(4, 32), 1000 times.
    let churned: u64 = (0..1000).map(|i| 100 + i % 50 + 128).sum();
    let allocated = go_pprof(&["-top", "-unit=B", "-sample_index=alloc_space"], &profile);
    assert_eq!(top_row(&allocated, "churn").0, churned, "{allocated}");
    assert_eq!(top_row(&allocated, "leak_small").0, 64_000, "{allocated}");
    assert_eq!(top_row(&allocated, "leak_big").0, 10 << 20, "{allocated}");

    let traces = go_pprof(
        &["-traces", "-unit=B", "-sample_index=inuse_space"],
        &profile,
    );
    let trace: Vec<&str> = traces
        .split("-----------+")
        .find(|t| t.lines().any(|l| l.trim().ends_with(" leak_small")))
        .unwrap_or_else(|| panic!("no leak_small trace:\n{traces}"))
        .lines()
        .map(str::trim)
        .collect();
    let at = trace
        .iter()
        .position(|l| l.ends_with(" leak_small"))
        .expect("the leaf");
    assert_eq!(trace[at], "64000B   leak_small", "{traces}");
    assert_eq!(trace[at + 1], "main", "{traces}");

    // One file for every process, a string `pid` label on each sample.
    let pid = top
        .lines()
        .find_map(|l| l.strip_prefix("pid ")?.split_whitespace().next())
        .expect("the verdict comment names the pid");
    let focused = go_pprof(
        &["-top", "-unit=B", &format!("-tagfocus=pid=^{pid}$")],
        &profile,
    );
    assert_eq!(top_row(&focused, "leak_small").0, 64_000, "{focused}");
    let tags = go_pprof(&["-tags"], &profile);
    assert!(tags.contains(" pid: Total"), "{tags}");

    let default = go_pprof(&["-top"], &profile);
    assert!(default.contains("Type: inuse_space"), "{default}");

    let raw = go_pprof(&["-raw"], &profile);
    let mapping = raw
        .lines()
        .find(|l| l.contains(bin.to_str().expect("utf-8 path")))
        .unwrap_or_else(|| panic!("no mapping of {}:\n{raw}", bin.display()));
    assert!(mapping.contains(&build_id(&bin)), "{mapping}\n{raw}");
    assert!(raw.contains("PeriodType: space bytes"), "{raw}");
    assert!(
        raw.lines()
            .any(|l| l.starts_with("Comment: pid ") && l.contains("(leaks): ")),
        "verdict comment missing:\n{raw}"
    );
    let _ = std::fs::remove_file(&profile);
}

fn folded_total(file: &Path) -> (u64, Vec<String>) {
    let text = std::fs::read_to_string(file).expect("folded output");
    let mut total = 0;
    let mut stacks = Vec::new();
    for line in text.lines() {
        let (stack, value) = line.rsplit_once(' ').expect("`stack value` lines");
        total += value.parse::<u64>().expect("a count");
        stacks.push(stack.to_owned());
    }
    (total, stacks)
}

/// Proof 2a: the folded total is the JSON's live bytes; `--weight count` its live
/// allocation count (the fixture allocates the same way every run).
#[test]
fn folded_totals_equal_the_json_live_bytes_and_count() {
    require_root();
    let bin = fixture("leaks", &[]);
    let json = run_to_file("json", &["--format", "json", "--top", "10000"], &bin);
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("report")).expect("JSON");
    let p = &report["processes"][0];
    let folded = run_to_file("folded", &["--format", "folded"], &bin);
    let (bytes, stacks) = folded_total(&folded);
    assert_eq!(Some(bytes), p["live_bytes"].as_u64(), "{stacks:#?}\n{p}");
    assert!(
        stacks.iter().all(|s| s.starts_with("leaks (pid ")),
        "{stacks:#?}"
    );
    // Marked ` [leak]` when the run was long enough to call it one.
    assert!(
        stacks
            .iter()
            .any(|s| s.ends_with(";main;leak_small") || s.ends_with(";main;leak_small [leak]")),
        "{stacks:#?}"
    );
    let counted = run_to_file("count", &["--format", "folded", "--weight", "count"], &bin);
    let (count, _) = folded_total(&counted);
    assert_eq!(Some(count), p["live_allocations"].as_u64(), "{p}");
    for f in [json, folded, counted] {
        let _ = std::fs::remove_file(f);
    }
}

/// Proof 2b: the flame graph is well-formed XML and names the leaking function, marked.
#[test]
fn the_flame_graph_is_xml_and_names_the_leak() {
    require_root();
    let bin = fixture("leak_loop", &[]);
    let svg = run_to_file("svg", &["--format", "svg", "--interval", "100ms"], &bin);
    let text = std::fs::read_to_string(&svg).expect("svg written");
    let mut reader = quick_xml::Reader::from_str(&text);
    let (mut root, mut titles, mut in_title) = (None, Vec::new(), false);
    loop {
        match reader.read_event() {
            Ok(quick_xml::events::Event::Start(e)) => {
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                in_title = name == "title";
                root.get_or_insert(name);
            }
            Ok(quick_xml::events::Event::Text(t)) if in_title => {
                titles.push(String::from_utf8_lossy(&t).into_owned());
            }
            Ok(quick_xml::events::Event::End(_)) => in_title = false,
            Ok(quick_xml::events::Event::Eof) => break,
            Ok(_) => {}
            Err(e) => panic!("not well-formed XML at {}: {e}", reader.buffer_position()),
        }
    }
    assert_eq!(root.as_deref(), Some("svg"));
    assert!(
        titles
            .iter()
            .any(|t| t.starts_with("leak_request [leak] (76,800 bytes")),
        "{titles:#?}"
    );
    assert!(text.contains("rgb(224,48,48)"), "the leak is drawn red");
    let _ = std::fs::remove_file(&svg);
}

/// Attaches to `pid` for `duration` and returns the JSON report's path.
fn attach_for(pid: u32, duration: &str, tag: &str) -> PathBuf {
    let file = tempfile(tag);
    let out = Command::new(alloctrace())
        .args(["attach", "-p", &pid.to_string(), "--duration", duration])
        .args(["--interval", "100ms", "--format", "json", "-o"])
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .expect("run alloctrace attach");
    assert!(
        out.status.success(),
        "attach failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    file
}

/// The live bytes of the site whose frame 0 is `function`.
fn live_of(report: &Path, function: &str) -> u64 {
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(report).expect("report")).expect("JSON");
    site_from(&report["processes"][0], function)["live_bytes"]
        .as_u64()
        .expect("live bytes")
}

/// Proof 3: two reports of a growing program taken seconds apart: diff names the growing
/// site first, with its growth in bytes.
#[test]
fn diff_names_the_growing_site_first_with_its_growth() {
    require_root();
    let target = Growing::start();
    let a = attach_for(target.pid(), "1s", "diff-a");
    let b = attach_for(target.pid(), "3s", "diff-b");
    let growth = live_of(&b, "grow_leak") as i64 - live_of(&a, "grow_leak") as i64;
    assert!(growth > 0 && growth % 512 == 0, "growth {growth}");

    let diff = |format: &str| {
        let out = Command::new(alloctrace())
            .args(["diff", "--format", format])
            .args([&a, &b])
            .output()
            .expect("run alloctrace diff");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let json: Value = serde_json::from_str(&diff("json")).expect("diff JSON");
    let first = &json["grown"][0];
    assert_eq!(first["frames"][0]["function"], "grow_leak", "{json:#}");
    assert_eq!(first["growth_bytes"].as_i64(), Some(growth), "{json:#}");
    assert_eq!(first["verdict"], "leak", "{json:#}");

    let text = diff("text");
    let site = text.lines().nth(2).unwrap_or_default();
    assert!(
        site.starts_with("#1 ") && site.contains(&format!("({growth} B, ")),
        "{text}"
    );
    let stack = text.lines().nth(3).unwrap_or_default();
    assert!(
        stack.trim_start().starts_with("grow_leak (grow.c:"),
        "{text}"
    );
    for f in [a, b] {
        let _ = std::fs::remove_file(f);
    }
}

/// Proof 4: `alloctrace top` in tmux against a leaking program shows the process, the
/// leaking site and its verdict; `w` writes the report; `q` gives the terminal back as it
/// was (normal screen, same settings).
#[test]
fn top_in_tmux_shows_the_leak_and_q_restores_the_terminal() {
    require_root();
    let target = Growing::start();
    let pid = target.pid().to_string();
    let dir = scratch_dir();
    let snapshot = dir.join(format!("top-{}.json", std::process::id()));
    let tty_before = dir.join(format!("stty-before-{}", std::process::id()));
    let tty_after = dir.join(format!("stty-after-{}", std::process::id()));
    let tmux = Tmux::start(160, 40);
    // Type only once the shell is reading: keys typed before may be lost.
    let prompt = tmux.wait_for(Duration::from_secs(10), |s| {
        s.contains('#') || s.contains('$')
    });
    assert!(
        prompt.contains('#') || prompt.contains('$'),
        "no shell prompt:\n{prompt}"
    );
    let line = format!(
        "stty -g > {}; {} top -p {pid} --interval 250ms --format json -o {}; echo top-exit=$?; \
         stty -g > {}",
        tty_before.display(),
        alloctrace().display(),
        snapshot.display(),
        tty_after.display()
    );
    tmux.send(&["-l", &line]);
    tmux.send(&["Enter"]);
    let screen = tmux.wait_for(Duration::from_secs(30), |s| {
        s.lines()
            .any(|l| l.contains(" LEAK ") && l.contains("grow_leak (grow.c:"))
    });
    let leak_row = screen
        .lines()
        .find(|l| l.contains("grow_leak (grow.c:"))
        .unwrap_or_else(|| panic!("no grow_leak site on screen:\n{screen}"));
    assert!(leak_row.contains("LEAK"), "{screen}");
    assert!(
        screen
            .lines()
            .any(|l| l.trim_start_matches('│').trim_start().starts_with(&pid) && l.contains("grow")),
        "the process row:\n{screen}"
    );
    assert!(tmux.alternate_screen(), "top draws on the alternate screen");

    tmux.send(&["w"]);
    let screen = tmux.wait_for(Duration::from_secs(5), |s| s.contains("wrote /"));
    assert!(screen.contains("wrote /"), "{screen}");
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(&snapshot).expect("w wrote the report"))
            .expect("JSON");
    assert_eq!(written["processes"][0]["pid"].as_u64(), pid.parse().ok());

    tmux.send(&["q"]);
    // The typed command line shows `top-exit=$?` too: wait for the line echo prints.
    let screen = tmux.wait_for(Duration::from_secs(10), |s| {
        s.lines().any(|l| l.starts_with("top-exit="))
    });
    assert!(screen.contains("top-exit=0"), "{screen}");
    assert!(
        !tmux.alternate_screen(),
        "q leaves the alternate screen:\n{screen}"
    );
    std::thread::sleep(Duration::from_millis(300)); // the last stty
    let before = std::fs::read_to_string(&tty_before).expect("terminal settings before");
    let after = std::fs::read_to_string(&tty_after).expect("terminal settings after");
    assert_eq!(before, after, "q restores the terminal's settings");
    for f in [snapshot, tty_before, tty_after] {
        let _ = std::fs::remove_file(f);
    }
}

/// Proof 5: colour on a terminal, none with NO_COLOR, none into a pipe; progress bars never
/// reach a stderr that is not a terminal.
#[test]
fn the_text_report_is_coloured_only_on_a_terminal_without_no_color() {
    require_root();
    let bin = fixture("leak_loop", &[]);
    let command = |no_color: bool| {
        let mut cmd = Command::new(alloctrace());
        cmd.args(["run", "--interval", "100ms", "--"]).arg(&bin);
        if no_color {
            cmd.env("NO_COLOR", "1");
        } else {
            cmd.env_remove("NO_COLOR");
        }
        cmd
    };
    let (colored, stderr, status) = run_on_pty(command(false));
    assert!(status.success(), "{stderr}");
    assert!(
        colored.contains("\u{1b}[1m\u{1b}[31mLEAK\u{1b}[0m: leak_loop (pid "),
        "{colored}"
    );
    assert!(
        !stderr.contains('\u{1b}') && !stderr.contains('\r'),
        "{stderr:?}"
    );

    let (plain, stderr, status) = run_on_pty(command(true));
    assert!(status.success(), "{stderr}");
    assert!(!plain.contains('\u{1b}'), "{plain}");
    assert!(plain.contains("LEAK: leak_loop (pid "), "{plain}");

    let piped = command(false).stdin(Stdio::null()).output().expect("run");
    let piped = String::from_utf8_lossy(&piped.stdout);
    assert!(!piped.contains('\u{1b}'), "{piped}");
    assert!(piped.contains("traced 1 process for "), "{piped}");
}

/// Completions load in bash; zsh and fish scripts name the binary; the man pages render.
#[test]
fn completions_and_man_pages_come_from_the_command_line_definition() {
    let generated = |args: &[&str]| {
        let out = Command::new(alloctrace()).args(args).output().expect("run");
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let script = scratch_dir().join(format!("completion-{}.bash", std::process::id()));
    std::fs::write(&script, generated(&["completions", "bash"])).expect("write the script");
    let bash = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && complete -p alloctrace",
            script.display()
        ))
        .output()
        .expect("run bash");
    let registered = String::from_utf8_lossy(&bash.stdout);
    assert!(registered.contains("alloctrace"), "{registered}");
    assert!(generated(&["completions", "zsh"]).starts_with("#compdef alloctrace"));
    assert!(generated(&["completions", "fish"]).contains("complete -c alloctrace"));

    for (args, name) in [
        (&["man"][..], "alloctrace"),
        (&["man", "top"][..], "alloctrace-top"),
    ] {
        let page = scratch_dir().join(format!("{name}-{}.1", std::process::id()));
        std::fs::write(&page, generated(args)).expect("write the page");
        let man = Command::new("man")
            .args(["-l", "-P", "cat"])
            .arg(&page)
            .env("MANWIDTH", "100")
            .output()
            .expect("run man");
        let text = String::from_utf8_lossy(&man.stdout);
        let words = text.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(man.status.success(), "{text}");
        assert!(words.contains(&format!("NAME {name} - ")), "{text}");
        let _ = std::fs::remove_file(page);
    }
    let _ = std::fs::remove_file(script);
    let unknown = Command::new(alloctrace())
        .args(["man", "nosuch"])
        .output()
        .expect("run");
    assert_eq!(unknown.status.code(), Some(2));
}

/// Errors: an unwritable output is a clear runtime error (1), a bad option a usage error
/// (2), a file that is not a report is refused by diff, and top wants a terminal.
#[test]
fn output_errors_are_clear() {
    require_root();
    let run = |args: &[&str]| {
        let out = Command::new(alloctrace())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run alloctrace");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = run(&[
        "run",
        "--format",
        "pprof",
        "-o",
        "/nonexistent-dir/p.pb.gz",
        "--",
        "true",
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot write the report to /nonexistent-dir/p.pb.gz"),
        "{stderr}"
    );
    let (code, stderr) = run(&["run", "--weight", "heavy", "--", "true"]);
    assert_eq!(code, Some(2), "{stderr}");
    // A gzip-compressed profile would be garbage on a terminal: refused before tracing.
    let mut on_terminal = Command::new(alloctrace());
    on_terminal.args(["run", "--format", "pprof", "--", "true"]);
    let (shown, stderr, status) = run_on_pty(on_terminal);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("add -o FILE"), "{stderr}");
    assert!(shown.is_empty(), "{shown:?}");
    let notes = scratch_dir().join(format!("notes-{}.txt", std::process::id()));
    std::fs::write(&notes, "not a report").expect("write");
    let notes_path = notes.to_str().expect("utf-8 path");
    let (code, stderr) = run(&["diff", notes_path, notes_path]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("is not an alloctrace JSON report"),
        "{stderr}"
    );
    let _ = std::fs::remove_file(notes);
    let (code, stderr) = run(&["top", "-p", &std::process::id().to_string()]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("draws on a terminal"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `alloctrace top -- CMD` starts the command with its output kept off the view, keeps the
/// last report on screen when it exits, and quits on `q`.
#[test]
fn top_runs_a_command_and_keeps_its_last_report() {
    require_root();
    let bin = fixture("leak_loop", &[]);
    let tmux = Tmux::start(160, 40);
    let prompt = tmux.wait_for(Duration::from_secs(10), |s| {
        s.contains('#') || s.contains('$')
    });
    assert!(
        prompt.contains('#') || prompt.contains('$'),
        "no shell prompt:\n{prompt}"
    );
    let line = format!(
        "{} top --interval 250ms -- {}; echo top-exit=$?",
        alloctrace().display(),
        bin.display()
    );
    tmux.send(&["-l", &line]);
    tmux.send(&["Enter"]);
    let screen = tmux.wait_for(Duration::from_secs(30), |s| s.contains("tracing ended"));
    assert!(screen.contains("tracing ended"), "{screen}");
    assert!(screen.contains("leak_loop (exited)"), "{screen}");
    assert!(
        screen
            .lines()
            .any(|l| l.contains("leak_request (leak_loop.c:21)") && l.contains("75.0 KiB")),
        "the final numbers stay on screen:\n{screen}"
    );
    assert!(
        !screen.contains("leak_bytes_per_s"),
        "the command's output is kept off:\n{screen}"
    );
    tmux.send(&["q"]);
    let screen = tmux.wait_for(Duration::from_secs(10), |s| {
        s.lines().any(|l| l.starts_with("top-exit="))
    });
    assert!(screen.contains("top-exit=0"), "{screen}");
    assert!(!tmux.alternate_screen(), "{screen}");
}
