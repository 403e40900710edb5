//! Every frame names what addr2line names. A corpus of traced programs — fixtures with short
//! and long names in C (DWARF 4 and 5, `-O0` and `-O2` with inlining), C++ and Rust, and real
//! Debian binaries (python3 with the debug info Debian's `python3.11-dbg` ships, sqlite3 and
//! git without any) — and for every frame of every reported site, the whole inline chain at
//! its address is compared with `addr2line -f -i -C -e MODULE`: function, file and line.
//!
//! The reference is GNU addr2line (binutils 2.40 here), checked against llvm-addr2line: a
//! field agrees when it equals either tool's answer. Binutils 2.40 mis-joins DWARF 5
//! directories (`./csu/./csu/libc-start.c`), names some header functions after their caller's
//! file (`Py_DECREF` at `pythonrun.c:523`, gdb and LLVM say `object.h:523`) and names an
//! inlined `atoi` after its caller; LLVM names glibc's functions by `DW_AT_name` (`abort`)
//! where binutils and gdb use the linkage name (`__GI_abort`). Where a module has no debug
//! info, both tools name the nearest symbol below an address even past that symbol's end;
//! there alloctrace says no symbol covers it (`module+0xoffset`), and that is checked with
//! the symbols' sizes (`nm -S`).

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    process::Command,
};

use alloctrace_tests::*;
use serde_json::Value;

/// One frame as shown or as a reference tool names it: function, and `file:line` if known.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Named {
    function: String,
    location: Option<String>,
}

/// A frame of a report: where it is, and what alloctrace named it.
#[derive(Clone, Debug)]
struct Shown {
    module: String,
    offset: u64,
    named: Named,
}

/// The whole symbolized stack of a site: the library frames the site starts after, then
/// the frames from the program's own.
fn full_stack(site: &Value) -> Vec<&Value> {
    let library = site["library_frames"].as_array().into_iter().flatten();
    library
        .chain(site["frames"].as_array().into_iter().flatten())
        .collect()
}

/// Frames grouped by address: each inline chain ends at its real (not inlined) frame.
fn chains(process: &Value) -> Vec<Vec<Shown>> {
    let mut out = Vec::new();
    for site in process["sites"].as_array().into_iter().flatten() {
        let mut chain = Vec::new();
        for frame in full_stack(site) {
            let (Some(module), Some(offset)) = (
                frame["module"].as_str(),
                frame["address"]
                    .as_str()
                    .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok()),
            ) else {
                continue; // an address in no file: nothing to compare with
            };
            let file_name = module.rsplit('/').next().unwrap_or(module);
            let function = frame["function"].as_str().unwrap_or_default();
            let function = if function.starts_with(&format!("{file_name}+0x")) {
                "??".to_owned()
            } else {
                function.to_owned()
            };
            let location = match (frame["file"].as_str(), frame["line"].as_u64()) {
                (Some(file), Some(line)) if line > 0 => Some(format!("{file}:{line}")),
                _ => None,
            };
            chain.push(Shown {
                module: module.to_owned(),
                offset,
                named: Named { function, location },
            });
            if frame["inlined"] != true {
                out.push(std::mem::take(&mut chain));
            }
        }
    }
    out
}

/// `(file offset, size, virtual address)` of each loadable segment (`readelf -lW`).
fn segments(module: &str) -> Vec<(u64, u64, u64)> {
    let out = Command::new("readelf")
        .args(["-lW", module])
        .output()
        .expect("run readelf");
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.first() == Some(&"LOAD")).then(|| Some((hex(w[1])?, hex(w[4])?, hex(w[2])?)))?
        })
        .collect()
}

fn virtual_address(segments: &[(u64, u64, u64)], offset: u64) -> Option<u64> {
    segments
        .iter()
        .find(|&&(off, size, _)| off <= offset && offset < off + size)
        .map(|&(off, _, vaddr)| offset - off + vaddr)
}

/// Runs an addr2line-compatible `tool -f -i -C -a -e MODULE ADDR...`: the inline chain per
/// address, innermost first.
fn reference(tool: &str, module: &str, addresses: &[u64]) -> HashMap<u64, Vec<Named>> {
    let mut cmd = Command::new(tool);
    cmd.args(["-f", "-i", "-C", "-a", "-e", module]);
    cmd.args(addresses.iter().map(|a| format!("{a:#x}")));
    let out = cmd.output().unwrap_or_else(|e| panic!("run {tool}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut chains: HashMap<u64, Vec<Named>> = HashMap::new();
    let mut lines = text.lines();
    let mut current = None;
    while let Some(line) = lines.next() {
        if let Some(hex) = line.strip_prefix("0x") {
            let address = u64::from_str_radix(hex, 16).expect("an address line");
            chains.insert(address, Vec::new());
            current = Some(address);
            continue;
        }
        let location = lines.next().unwrap_or_default();
        let location = location.split(" (discriminator").next().unwrap_or(location);
        let known =
            !(location.starts_with("??") || location.ends_with(":?") || location.ends_with(":0"));
        if let Some(chain) = current.and_then(|a| chains.get_mut(&a)) {
            chain.push(Named {
                function: line.to_owned(),
                location: known.then(|| location.to_owned()),
            });
        }
    }
    chains
}

/// Virtual address ranges of every sized symbol of a module (`.symtab` and `.dynsym`).
fn symbol_ranges(module: &str) -> Vec<(u64, u64)> {
    let mut ranges = Vec::new();
    for table in [
        &["-S", "--defined-only"][..],
        &["-D", "-S", "--defined-only"],
    ] {
        let out = Command::new("nm")
            .args(table)
            .arg(module)
            .output()
            .expect("run nm");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            if let [start, size, _, _] = w[..]
                && let (Ok(start), Ok(size)) = (
                    u64::from_str_radix(start, 16),
                    u64::from_str_radix(size, 16),
                )
            {
                ranges.push((start, start + size));
            }
        }
    }
    ranges
}

/// Frames compared, frames that differ (described), and symbol-less frames accepted because
/// the symbol the reference tools name ends before the address.
#[derive(Default)]
struct Tally {
    compared: usize,
    differing: Vec<String>,
    past_symbol_end: usize,
}

/// Compares every chain of a report with both reference tools.
fn compare(all: &[Vec<Shown>], tally: &mut Tally) {
    let mut by_module: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for chain in all {
        by_module
            .entry(&chain[0].module)
            .or_default()
            .push(chain[0].offset);
    }
    for (module, offsets) in by_module {
        let segments = segments(module);
        let mut addresses: Vec<u64> = offsets
            .iter()
            .filter_map(|&o| virtual_address(&segments, o))
            .collect();
        addresses.sort_unstable();
        addresses.dedup();
        let gnu = reference("addr2line", module, &addresses);
        let llvm = reference("/usr/lib/llvm-22/bin/llvm-addr2line", module, &addresses);
        let symbols = symbol_ranges(module);
        for chain in all.iter().filter(|c| c[0].module == module) {
            compare_chain(chain, &segments, &gnu, &llvm, &symbols, tally);
        }
    }
}

fn compare_chain(
    chain: &[Shown],
    segments: &[(u64, u64, u64)],
    gnu: &HashMap<u64, Vec<Named>>,
    llvm: &HashMap<u64, Vec<Named>>,
    symbols: &[(u64, u64)],
    tally: &mut Tally,
) {
    let head = &chain[0];
    let empty = Vec::new();
    let address = virtual_address(segments, head.offset);
    let (g, l) = address.map_or((&empty, &empty), |a| {
        (
            gnu.get(&a).unwrap_or(&empty),
            llvm.get(&a).unwrap_or(&empty),
        )
    });
    let ours: Vec<&Named> = chain.iter().map(|s| &s.named).collect();
    // Where no symbol covers the address, the tools still name the nearest one below it.
    let uncovered = address.is_some_and(|a| !symbols.iter().any(|&(s, e)| s <= a && a < e));
    if let [only] = &ours[..]
        && only.function == "??"
        && only.location.is_none()
        && uncovered
        && g.iter().chain(l).all(|n| n.location.is_none())
    {
        tally.compared += 1;
        tally.past_symbol_end += 1;
        return;
    }
    let frames = ours.len().max(g.len()).max(l.len());
    tally.compared += ours.len();
    let agrees = |i: usize| {
        let Some(ours) = ours.get(i) else {
            return false;
        };
        let field = |f: &dyn Fn(&Named) -> Option<&str>| {
            [g.get(i), l.get(i)]
                .iter()
                .any(|r| r.is_some_and(|r| f(r) == f(ours)))
        };
        field(&|n| Some(n.function.as_str())) && field(&|n| n.location.as_deref())
    };
    let same_length = ours.len() == g.len() || ours.len() == l.len();
    for i in 0..frames {
        if !(same_length && agrees(i)) {
            tally.differing.push(format!(
                "{} +{:#x} (vaddr {:?}) frame {i} of the chain:\n  ours {:?}\n  addr2line {:?}\n  llvm-addr2line {:?}",
                head.module,
                head.offset,
                address.map(|a| format!("{a:#x}")),
                ours.get(i),
                g.get(i),
                l.get(i)
            ));
        }
    }
}

/// A traced program of the corpus.
struct Program {
    name: String,
    command: Vec<String>,
    env: Vec<(&'static str, &'static str)>,
}

fn program(name: &str, command: &[&str]) -> Program {
    Program {
        name: name.to_owned(),
        command: command.iter().map(|s| s.to_string()).collect(),
        env: Vec::new(),
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

fn corpus() -> Vec<Program> {
    let mut programs = Vec::new();
    for (tag, flags) in [
        ("C -O0, DWARF 5", &[][..]),
        ("C -O0, DWARF 4", &["-gdwarf-4"][..]),
        ("C -O2, DWARF 5", &["-O2"][..]),
        ("C -O2, DWARF 4", &["-O2", "-gdwarf-4"][..]),
    ] {
        let bin = fixture("short_names", flags);
        programs.push(program(tag, &[path_str(&bin)]));
    }
    for (tag, dwarf) in [
        ("C++ -O2, DWARF 5", "-gdwarf-5"),
        ("C++ -O2, DWARF 4", "-gdwarf-4"),
    ] {
        let bin = cxx_fixture("containers", dwarf, &["-O2", "-g", dwarf]);
        programs.push(program(tag, &[path_str(&bin)]));
    }
    let rust_debug = rust_fixture("collections");
    programs.push(program("Rust debug", &[path_str(&rust_debug)]));
    let rust_release = rust_fixture_with(
        "collections",
        "-release-debug",
        &["-C", "opt-level=3", "-C", "debuginfo=2"],
    );
    programs.push(program("Rust release", &[path_str(&rust_release)]));
    let script = "import json; d = [{'k': i, 'v': str(i) * 10} for i in range(3000)]; \
                  json.loads(json.dumps(d))";
    for python in ["/usr/bin/python3.11", "/usr/bin/python3.11d"] {
        let mut p = program(python, &[python, "-c", script]);
        p.env.push(("PYTHONMALLOC", "malloc"));
        programs.push(p);
    }
    programs.push(program(
        "/usr/bin/sqlite3",
        &[
            "/usr/bin/sqlite3",
            ":memory:",
            "create table t(a, b); \
             with recursive n(i) as (select 1 union all select i + 1 from n where i < 2000) \
             insert into t select i, hex(randomblob(20)) from n; \
             create index ti on t(b); select count(*) from t where b > 'A';",
        ],
    ));
    let repo = scratch_dir().join(format!("corpus-repo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&repo);
    programs.push(program(
        "/usr/bin/git",
        &["/usr/bin/git", "init", "-q", path_str(&repo)],
    ));
    programs
}

#[test]
fn every_frame_names_what_addr2line_names() {
    require_root();
    let mut total = Tally::default();
    let mut lines = Vec::new();
    for p in corpus() {
        let command: Vec<&Path> = p.command.iter().map(Path::new).collect();
        let (traced, _) = run_traced_env(&["--top", "200"], &command, &p.env);
        assert!(traced.status.success(), "{}: {}", p.name, traced.pretty());
        let process = &traced.report["processes"][0];
        let all = chains(process);
        assert!(
            !all.is_empty(),
            "{}: no frames\n{}",
            p.name,
            traced.pretty()
        );
        let mut tally = Tally::default();
        compare(&all, &mut tally);
        lines.push(format!(
            "{:<22} {:>3} sites {:>5} frames compared, {:>3} differing, {:>3} past a symbol's end",
            p.name,
            process["sites"].as_array().map_or(0, Vec::len),
            tally.compared,
            tally.differing.len(),
            tally.past_symbol_end
        ));
        total.compared += tally.compared;
        total.past_symbol_end += tally.past_symbol_end;
        total.differing.extend(tally.differing);
    }
    let _ =
        std::fs::remove_dir_all(scratch_dir().join(format!("corpus-repo-{}", std::process::id())));
    let summary = format!(
        "{}\ntotal: {} frames compared, {} differing, {} past a symbol's end",
        lines.join("\n"),
        total.compared,
        total.differing.len(),
        total.past_symbol_end
    );
    eprintln!("{summary}");
    assert!(
        total.differing.is_empty(),
        "{summary}\n\n{}",
        total.differing.join("\n")
    );
}

/// The frames of the short-name fixture by name: `f` is `f` (a demangler once made it
/// `float`), and so on for every build.
#[test]
fn short_c_names_are_not_demangled_as_types() {
    require_root();
    for flags in [
        &[][..],
        &["-gdwarf-4"][..],
        &["-O2"][..],
        &["-O2", "-gdwarf-4"][..],
    ] {
        let bin = fixture("short_names", flags);
        let (traced, out) = run_traced_output(&[], &[&bin]);
        assert!(traced.status.success(), "{}", traced.pretty());
        assert_eq!(fixture_value(&out, "allocations"), 25);
        let p = traced.only_process();
        let mut from: Vec<(String, u64)> = [
            "f",
            "g",
            "a_function_with_a_rather_long_name_for_comparison",
        ]
        .iter()
        .map(|name| {
            let total = sites_from(p, name)
                .iter()
                .map(|s| s["total_allocations"].as_u64().unwrap_or(0))
                .sum();
            (name.to_string(), total)
        })
        .collect();
        from.sort();
        assert_eq!(
            from,
            [
                (
                    "a_function_with_a_rather_long_name_for_comparison".to_owned(),
                    10
                ),
                ("f".to_owned(), 5 + 5), // 5 calls from h (even i), 5 from g
                ("g".to_owned(), 5),
            ],
            "{flags:?}\n{}",
            traced.pretty()
        );
    }
}
