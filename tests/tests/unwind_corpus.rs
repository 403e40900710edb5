//! In-kernel unwinding against the copy-and-unwind path, frame by frame. Each program of a
//! corpus without frame pointers — an `-O2` C fixture, a C++ program allocating through
//! libstdc++'s `operator new`, a Rust release binary, and Debian's `python3` running a small
//! script — is traced once in each stack mode; the distinct raw stacks (module and file offset
//! of every real frame, and the truncation mark) must agree: a stack the copy finished is in
//! the in-kernel run as it is, and one the copy cut short (`--stack-bytes`) begins an in-kernel
//! stack, which may go further. The programs are deterministic (fixed inputs,
//! `PYTHONHASHSEED=0`, one thread), so two runs of one mode agree too: that is what the
//! comparison stands on.
//!
//! The copies are the largest `--stack-bytes` allows, in both runs (the in-kernel run copies
//! the stacks that reach a library loaded since its code was listed): at the default 8 KiB, python's deep
//! import stacks outran the copy and the collector's unwinder, falling back to a stale frame
//! pointer, went on through the wrong frames without marking them (7 of 10 300 stacks, each
//! skipping from `PyEval_EvalCode` straight to `run_eval_code_obj`), while the kernel,
//! reading the stack itself, followed every frame.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use alloctrace_tests::*;
use serde_json::Value;

/// The stack mode under test: unwinding in the kernel from each module's CFI tables.
const IN_KERNEL: &str = "dwarf";
/// The reference: the stack copied into the event and unwound by the collector.
const COPIED: &str = "dwarf-copy";

/// Every site of the report, whatever `--top` would keep.
const ALL_SITES: &str = "1000000";

/// One real (not inlined) frame: where it is, and its inline chain's names for messages.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Frame {
    module: String,
    offset: u64,
}

/// A stack as captured: its real frames, innermost first, and whether it was cut short.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Stack {
    frames: Vec<Frame>,
    truncated: bool,
}

/// The distinct stacks of a run, each with its frames' names (`inlined ← … ← real` per
/// frame) and the allocations it made.
struct Stacks {
    mode: &'static str,
    by_stack: BTreeMap<Stack, (Vec<String>, u64)>,
}

/// Traces `command` in `mode` and collects the distinct raw stacks of its one process.
fn trace(mode: &'static str, command: &[&Path], env: &[(&str, &str)]) -> Stacks {
    let mut args = vec![
        "--stack-mode",
        mode,
        "--top",
        ALL_SITES,
        "--stack-bytes",
        "16384",
    ];
    if mode == COPIED {
        // 16 KiB a copy: the reference needs room no default ring is sized for.
        args.extend(["--ring-buffer", "256"]);
    } else {
        // Code a library `dlopen`ed a moment ago (python's `_json`) is copied until its table
        // is in place, a few milliseconds; under the load of the tests running beside this
        // one those copies can pass half a default ring and be shed (counted: see
        // `python_json`), which would leave this comparison short of stacks.
        args.extend(["--ring-buffer", "64"]);
    }
    let (traced, _) = run_traced_env(&args, command, env);
    assert_whole(&traced, mode);
    stacks_of(mode, traced.only_process())
}

/// The run ended well and lost nothing.
fn assert_whole(traced: &Traced, mode: &str) {
    assert!(traced.status.success(), "{mode}: {}", traced.pretty());
    assert_eq!(
        traced.report["partial"],
        false,
        "{mode}: {}",
        traced.pretty()
    );
    assert_eq!(traced.report["events"]["dropped"], 0, "{mode}");
    assert_eq!(traced.report["events"]["stacks_lost"], 0, "{mode}");
}

/// The distinct raw stacks of process `p`, traced in `mode`.
fn stacks_of(mode: &'static str, p: &Value) -> Stacks {
    assert_eq!(p["stack_mode"], mode, "{p}");
    assert_eq!(p["sites_omitted"], 0, "{mode}");
    let mut by_stack = BTreeMap::new();
    for site in p["sites"].as_array().expect("sites") {
        let shown: Vec<&Value> = site["library_frames"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(site["frames"].as_array().into_iter().flatten())
            .collect();
        for stack in site["stacks"].as_array().expect("stacks") {
            let addresses = stack["addresses"].as_array().expect("addresses");
            assert_eq!(addresses.len(), shown.len(), "{site}");
            let mut frames = Vec::new();
            let mut names = Vec::new();
            let mut chain = Vec::new();
            for (frame, address) in shown.iter().zip(addresses) {
                chain.push(frame["function"].as_str().unwrap_or("?"));
                if frame["inlined"] == true {
                    continue;
                }
                let address = address.as_str().expect("a hex address");
                frames.push(Frame {
                    module: frame["module"].as_str().unwrap_or("?").to_owned(),
                    offset: u64::from_str_radix(address.trim_start_matches("0x"), 16)
                        .expect("a hex address"),
                });
                names.push(std::mem::take(&mut chain).join(" ← "));
            }
            let key = Stack {
                frames,
                truncated: site["stack_truncated"] == true,
            };
            let entry = by_stack.entry(key).or_insert((names, 0));
            entry.1 += u(&stack["total_allocations"]);
        }
    }
    Stacks { mode, by_stack }
}

/// Where `stack` first parts from the nearest stack of `other` (the longest common prefix):
/// the frame index and both frames, named.
fn first_difference(stack: &Stack, names: &[String], other: &Stacks) -> String {
    let common = |s: &Stack| {
        s.frames
            .iter()
            .zip(&stack.frames)
            .take_while(|(a, b)| a == b)
            .count()
    };
    let Some((nearest, (other_names, _))) = other.by_stack.iter().max_by_key(|(s, _)| common(s))
    else {
        return format!("{} has no stacks at all", other.mode);
    };
    let i = common(nearest);
    let describe = |frames: &[Frame], names: &[String]| {
        frames.get(i).map_or_else(
            || "(the stack ends here)".to_owned(),
            |f| format!("{} in {}+{:#x}", names[i], f.module, f.offset),
        )
    };
    format!(
        "frame {i} (of {} and {}; truncated {} and {}): {}\n    {}\n  against {}\n    {}",
        stack.frames.len(),
        nearest.frames.len(),
        stack.truncated,
        nearest.truncated,
        describe(&stack.frames, names),
        names[..i.min(names.len())].join("\n    ← "),
        describe(&nearest.frames, other_names),
        other_names[..i.min(other_names.len())].join("\n    ← "),
    )
}

/// Whether `copied` holds a truncated stack whose frames begin `frames` (all of it or less).
fn copy_stops_within(copied: &Stacks, frames: &[Frame]) -> bool {
    (1..=frames.len()).any(|n| {
        copied.by_stack.contains_key(&Stack {
            frames: frames[..n].to_vec(),
            truncated: true,
        })
    })
}

/// Whether `in_kernel` holds a stack that begins with all of `frames`.
fn kernel_reaches(in_kernel: &Stacks, frames: &[Frame]) -> bool {
    let from = Stack {
        frames: frames.to_vec(),
        truncated: false,
    };
    in_kernel
        .by_stack
        .range(from..)
        .next()
        .is_some_and(|(s, _)| s.frames.starts_with(frames))
}

/// Asserts both runs saw the same stacks, frame by frame. A stack the copy finished must be
/// in the other run, whole and unmarked; a stack the copy cut short (its bytes ran out) must
/// begin a stack of the other run, which may reach further. On failure names, for each stack
/// without its match, the first frame where it parts from the other run's nearest stack.
fn assert_same_stacks(in_kernel: &Stacks, copied: &Stacks) {
    assert_stacks_match(in_kernel, copied, true);
}

/// As `assert_same_stacks`, both ways, or (`both` false) only that every in-kernel stack is
/// one the copies found too: none is wrong, though some may be missing.
fn assert_stacks_match(in_kernel: &Stacks, copied: &Stacks, both: bool) {
    let mut differing = Vec::new();
    let mut report = |stack: &Stack, names: &[String], n: u64, x: &Stacks, y: &Stacks| {
        differing.push(format!(
            "{n} allocations from a stack only {} has; {}",
            x.mode,
            first_difference(stack, names, y)
        ));
    };
    for (stack, (names, n)) in &in_kernel.by_stack {
        if !copied.by_stack.contains_key(stack) && !copy_stops_within(copied, &stack.frames) {
            report(stack, names, *n, in_kernel, copied);
        }
    }
    for (stack, (names, n)) in copied.by_stack.iter().filter(|_| both) {
        let matched = if stack.truncated {
            kernel_reaches(in_kernel, &stack.frames)
        } else {
            in_kernel.by_stack.contains_key(stack)
        };
        if !matched {
            report(stack, names, *n, copied, in_kernel);
        }
    }
    assert!(
        differing.is_empty(),
        "{} stacks differ between {} ({} stacks) and {} ({} stacks):\n{}",
        differing.len(),
        in_kernel.mode,
        in_kernel.by_stack.len(),
        copied.mode,
        copied.by_stack.len(),
        differing.join("\n")
    );
}

/// The corpus's traces run one at a time: each compares against a copy-and-unwind run whose
/// collector must keep up with 16 KiB copies, and two compilers and two pythons traced at
/// once on 2 CPUs starved it (5 000 copies shed in CI).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Traces `command` in both modes and compares; returns the in-kernel stacks for the
/// caller's own checks that the corpus holds what it should.
fn compare(command: &[&Path], env: &[(&str, &str)]) -> Stacks {
    let _serial = one_at_a_time();
    let in_kernel = trace(IN_KERNEL, command, env);
    let copied = trace(COPIED, command, env);
    assert_same_stacks(&in_kernel, &copied);
    in_kernel
}

/// A stack whose real frames' names begin with `innermost` (each the whole inline chain of
/// its frame), not truncated.
fn has_stack(stacks: &Stacks, innermost: &[&str]) -> bool {
    stacks.by_stack.iter().any(|(s, (names, _))| {
        !s.truncated
            && names.len() >= innermost.len()
            && names.iter().zip(innermost).all(|(n, want)| n == want)
    })
}

fn assert_has_stack(stacks: &Stacks, innermost: &[&str]) {
    assert!(
        has_stack(stacks, innermost),
        "no whole stack starting {innermost:?} among {}:\n{}",
        stacks.by_stack.len(),
        stacks
            .by_stack
            .values()
            .map(|(names, _)| names.join(" ← "))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn an_optimized_c_program_without_frame_pointers() {
    require_root();
    let bin = fixture("deep_leak", &["-O2", "-fomit-frame-pointer"]);
    let stacks = compare(&[&bin, Path::new("100")], &[]);
    assert_has_stack(
        &stacks,
        &[
            "level6", "level5", "level4", "level3", "level2", "level1", "main",
        ],
    );
}

#[test]
fn a_cxx_program_allocating_through_libstdcxx_operator_new() {
    require_root();
    let bin = cxx_fixture("containers", "-O2-corpus", &["-O2", "-g"]);
    let stacks = compare(&[&bin], &[]);
    // Frames inside libstdc++ (no frame pointers) between malloc and the program's own.
    assert!(
        stacks.by_stack.values().any(|(names, _)| names
            .first()
            .is_some_and(|n| n.contains("operator new"))
            && names.iter().any(|n| n.ends_with("store(int)"))),
        "no stack through operator new from store()"
    );
    assert!(stacks.by_stack.len() >= 4, "{}", stacks.by_stack.len());
}

#[test]
fn a_rust_release_binary() {
    require_root();
    // Cargo's default release profile: optimized, no frame pointers, debug info stripped.
    let bin = rust_fixture_with(
        "typed_leaks",
        "-release-corpus",
        &["-C", "opt-level=3", "-C", "strip=debuginfo"],
    );
    let stacks = compare(&[&bin, Path::new("100")], &[]);
    assert!(
        stacks.by_stack.values().any(|(names, _)| names
            .iter()
            .any(|n| n == "typed_leaks::record_orders")
            && names.iter().any(|n| n == "typed_leaks::main")),
        "no stack from record_orders"
    );
}

/// A deterministic script exercising the interpreter's allocation paths: dicts, lists,
/// strings, instances built recursively (one C-level eval loop per level) and the `json` C extension.
const SCRIPT: &str = r#"
import json

class Node:
    def __init__(self, depth):
        self.value = "n" * depth
        self.children = [Node(depth - 1) for _ in range(3)] if depth else []

def build(depth, width):
    if depth == 0:
        return {"k%d" % i: [i, str(i) * 40, {"x": i}] for i in range(width)}
    return [build(depth - 1, width) for _ in range(2)]

data = build(4, 30)
text = json.dumps(data, sort_keys=True)
back = json.loads(text)
root = Node(6)
print("chars=%d" % len(text))
"#;

fn python_script() -> PathBuf {
    // A directory of its own: the interpreter lists the script's directory while importing,
    // and a directory other tests write into while this one runs would make the two runs
    // allocate differently.
    let dir = scratch_dir().join("unwind_corpus_python");
    std::fs::create_dir_all(&dir).expect("the script's directory");
    let path = dir.join("unwind_corpus.py");
    std::fs::write(&path, SCRIPT).expect("write the script");
    path
}

#[test]
fn debians_python3_running_a_script() {
    require_root();
    let script = python_script();
    let stacks = compare(
        &[Path::new("/usr/bin/python3"), Path::new("-S"), &script],
        &[("PYTHONHASHSEED", "0"), ("PYTHONMALLOC", "malloc")],
    );
    assert_deep_python_stack(&stacks);
    assert!(stacks.by_stack.len() >= 100, "{}", stacks.by_stack.len());
}

/// A compiler driver `exec`ing a 30 MB program mid-run (`g++` starting `cc1plus`, ≈ 400 k
/// allocations in a second or two): that program's table (≈ 500 k rows) is built on a thread
/// of its own, off the event path (built on it, `g++` lost 19–67 k of ≈ 800 k events at the
/// default rings), and once it is in, the compiler's stacks are walked whole in the kernel.
/// Rings of 64 MiB: the tests running beside this one can starve the collector of CPU.
#[test]
fn a_big_programs_table_is_built_apart_and_then_walked() {
    require_root();
    let _serial = one_at_a_time();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/containers.cpp");
    let object = scratch_dir().join("big_exec_containers.o");
    let (traced, _) = run_traced_env(
        &["--top", ALL_SITES, "-v", "--ring-buffer", "64"],
        &[
            Path::new("g++"),
            Path::new("-O2"),
            Path::new("-c"),
            &source,
            Path::new("-o"),
            &object,
        ],
        &[],
    );
    assert!(traced.status.success(), "{}", traced.pretty());
    assert_eq!(traced.report["events"]["dropped"], 0, "{}", traced.pretty());
    assert_eq!(traced.report["partial"], false);
    assert!(
        traced.stderr.lines().any(|l| l.contains("/cc1plus:")
            && l.contains("unwind table")
            && l.contains("built apart")),
        "{}",
        traced.stderr
    );
    let processes = traced.report["processes"].as_array().expect("processes");
    let compiler = processes
        .iter()
        .find(|p| p["comm"] == "cc1plus")
        .unwrap_or_else(|| panic!("no cc1plus:\n{}", traced.pretty()));
    assert_eq!(compiler["stack_mode"], IN_KERNEL);
    let whole = compiler["sites"]
        .as_array()
        .expect("sites")
        .iter()
        .filter(|s| s["stack_truncated"] == false)
        .filter(|s| {
            let frames: Vec<&Value> = ["library_frames", "frames"]
                .iter()
                .flat_map(|k| s[*k].as_array().into_iter().flatten())
                .collect();
            // Debian's cc1plus keeps no symbols of its own: its frames are `cc1plus+0x…`.
            let through = frames.iter().filter(|f| {
                f["module"]
                    .as_str()
                    .is_some_and(|m| m.ends_with("/cc1plus"))
            });
            through.count() >= 3 && frames.last().is_some_and(|f| f["function"] == "_start")
        })
        .count();
    assert!(whole >= 100, "{whole} whole stacks through cc1plus");
}

/// A table no traced process uses any more is let go and its rows serve the next file: a
/// compiler run (`cc1plus`'s 500 k-row table) ends, and after the idle delay its table is
/// released; python, `exec`ed next by the same shell, gets its table in those rows, and its
/// stacks walked there equal those of a copy-and-unwind run of the same script.
#[test]
fn a_released_tables_rows_serve_the_next_program() {
    require_root();
    let _serial = one_at_a_time();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/containers.cpp");
    let object = scratch_dir().join("released_rows_containers.o");
    let script = python_script();
    let env = [("PYTHONHASHSEED", "0"), ("PYTHONMALLOC", "malloc")];
    let shell = format!(
        "g++ -O2 -c {} -o {} && sleep 3 && exec /usr/bin/python3 -S {}",
        source.display(),
        object.display(),
        script.display()
    );
    let (traced, _) = run_traced_env(
        &[
            "-v",
            "--top",
            ALL_SITES,
            "--stack-bytes",
            "16384",
            "--ring-buffer",
            "64",
        ],
        &[Path::new("sh"), Path::new("-c"), Path::new(&shell)],
        &env,
    );
    // Not `assert_whole`: python's first stacks, before its table is in, are copied, and
    // past half a ring those copies are shed (counted in `stacks_lost`).
    assert!(traced.status.success(), "{}", traced.pretty());
    assert_eq!(traced.report["events"]["dropped"], 0, "{}", traced.pretty());
    // `-v`: "unwind table for PATH: N rows from row F, …" per table built, in order.
    let built: Vec<(&str, u64, u64)> = traced
        .stderr
        .lines()
        .filter_map(|l| {
            let (path, rest) = l
                .strip_prefix("alloctrace: unwind table for ")?
                .split_once(": ")?;
            let (rows, rest) = rest.split_once(" rows from row ")?;
            Some((
                path,
                rows.parse().ok()?,
                rest.split(',').next()?.parse().ok()?,
            ))
        })
        .collect();
    assert!(
        traced
            .stderr
            .lines()
            .any(|l| l.contains("/cc1plus released")),
        "cc1plus's table was not released:\n{}",
        traced.stderr
    );
    let python_at = built
        .iter()
        .position(|(path, ..)| *path == "/usr/bin/python3.11")
        .unwrap_or_else(|| panic!("no python table:\n{}", traced.stderr));
    let (_, rows, first) = built[python_at];
    let high_water = built[..python_at]
        .iter()
        .map(|(_, rows, first)| first + rows)
        .max()
        .unwrap_or(0);
    assert!(
        first + rows <= high_water,
        "python's table (rows {first}..{}) is not in rows released tables held (below \
         {high_water}):\n{}",
        first + rows,
        traced.stderr
    );
    let mut in_kernel = stacks_of(
        IN_KERNEL,
        traced.report["processes"]
            .as_array()
            .expect("processes")
            .iter()
            .find(|p| p["comm"] == "python3")
            .unwrap_or_else(|| panic!("no python3:\n{}", traced.pretty())),
    );
    let copied = trace(
        COPIED,
        &[Path::new("/usr/bin/python3"), Path::new("-S"), &script],
        &env,
    );
    // The shed copies' allocations, under no stack, are among those counted lost (the
    // compiler's processes may have lost some too).
    let unstacked = Stack {
        frames: Vec::new(),
        truncated: false,
    };
    let shed = in_kernel.by_stack.remove(&unstacked).map_or(0, |(_, n)| n);
    assert!(shed <= u(&traced.report["events"]["stacks_lost"]), "{shed}");
    assert_stacks_match(&in_kernel, &copied, false);
    // The script's own deep stacks, walked after python's table was in.
    assert_deep_python_stack(&in_kernel);
}

/// Deep interpreter stacks, whole: each `Node(...)` of the script runs `__init__` in an eval
/// loop of its own.
fn assert_deep_python_stack(stacks: &Stacks) {
    assert!(
        stacks.by_stack.iter().any(|(s, (names, _))| !s.truncated
            && names
                .iter()
                .filter(|n| n.contains("_PyEval_EvalFrameDefault"))
                .count()
                >= 5),
        "no stack through five nested eval loops"
    );
}
