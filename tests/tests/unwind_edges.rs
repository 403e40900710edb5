//! Frames only special unwind rules can cross: a signal frame (glibc's `__restore_rt`, whose
//! CFI computes the interrupted context from the saved `ucontext`) and a PLT stub interrupted
//! by that signal (the linker's CFA expression `rsp + 8 + ((rip & 15) >= 11) * 8`). In every
//! stack mode that unwinds from CFI, each of those stacks must be the fixture's call chain
//! (see `fixtures/unwind_edges.c`), or a prefix of it marked truncated where the unwinder
//! could not go on: never a wrong frame, never a short stack that claims to be whole.

use alloctrace_tests::*;
use serde_json::Value;

/// Unwinding in the kernel from each module's CFI tables.
const IN_KERNEL: &str = "dwarf";
/// The stack copied into the event and unwound by the collector.
const COPIED: &str = "dwarf-copy";

/// What a frame of the expected chain may be shown as.
#[derive(Debug)]
enum Expect<'a> {
    /// Exactly this function.
    Named(&'a str),
    /// This symbol, or no symbol (`MODULE+0xoffset`) in this module: glibc has no symbol at
    /// the byte before `__restore_rt` the signal frame's address points into, and no symbol
    /// covers a PLT stub.
    NamedOrBare(&'a str, &'a str),
}

impl Expect<'_> {
    fn admits(&self, shown: &str) -> bool {
        match self {
            Expect::Named(name) => shown == *name,
            Expect::NamedOrBare(name, module) => {
                shown == *name || shown.starts_with(&format!("{module}+0x"))
            }
        }
    }
}

/// The frames from `main` outwards, through glibc's start-up.
const START: [Expect<'static>; 4] = [
    Expect::Named("main"),
    Expect::Named("__libc_start_call_main"),
    Expect::Named("__libc_start_main_impl"),
    Expect::Named("_start"),
];

const TRAMPOLINE: Expect<'static> = Expect::NamedOrBare("__restore_rt", "libc.so.6");

/// Checks one site's stack against `chain`: each shown frame is the expected one, and a
/// stack shorter than the chain is marked truncated.
fn check_stack(mode: &str, site: &Value, chain: &[Expect]) {
    let names: Vec<&str> = site["library_frames"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(site["frames"].as_array().into_iter().flatten())
        .map(|f| f["function"].as_str().unwrap_or("?"))
        .collect();
    assert!(
        names.len() <= chain.len(),
        "{mode}: more frames than the call chain has: {names:#?}"
    );
    for (i, (shown, want)) in names.iter().zip(chain).enumerate() {
        assert!(
            want.admits(shown),
            "{mode}: frame {i} is {shown}, expected {want:?}: {names:#?}"
        );
    }
    if names.len() < chain.len() {
        assert_eq!(
            site["stack_truncated"],
            true,
            "{mode}: the stack ends after {} of {} frames without a truncation mark: {names:#?}",
            names.len(),
            chain.len()
        );
    }
}

fn trace_edges(mode: &str) {
    let bin = fixture(
        "unwind_edges",
        &["-O2", "-fomit-frame-pointer", "-fno-builtin"],
    );
    let exe = bin.file_name().and_then(|n| n.to_str()).expect("a name");
    let (traced, out) = run_traced_output(&["--stack-mode", mode], &[&bin]);
    assert!(traced.status.success(), "{mode}: {}", traced.pretty());
    assert_eq!(
        traced.report["partial"],
        false,
        "{mode}: {}",
        traced.pretty()
    );
    let p = traced.only_process();
    assert_eq!(p["stack_mode"], mode);

    let signal_chain: Vec<Expect> = [
        Expect::Named("handler_alloc"),
        Expect::Named("on_alarm"),
        TRAMPOLINE,
        Expect::Named("spin"),
    ]
    .into_iter()
    .chain(START)
    .collect();
    let plt_chain: Vec<Expect> = [
        Expect::Named("plt_alloc"),
        Expect::Named("on_alarm"),
        TRAMPOLINE,
        Expect::NamedOrBare("labs@plt", exe),
        Expect::Named("plt_loop"),
    ]
    .into_iter()
    .chain(START)
    .collect();
    for (function, chain, count, bytes) in [
        (
            "handler_alloc",
            &signal_chain,
            "signal_allocs",
            "signal_bytes",
        ),
        ("plt_alloc", &plt_chain, "plt_allocs", "plt_bytes"),
    ] {
        let sites = sites_from(p, function);
        assert!(!sites.is_empty(), "{mode}: no {function} site");
        for site in &sites {
            check_stack(mode, site, chain);
        }
        let n = fixture_value(&out, count);
        let (total, live, live_bytes, frees) = totals(p, function);
        assert_eq!(
            (total, live, live_bytes, frees),
            (n, n, n * fixture_value(&out, bytes), 0),
            "{mode}: {function}"
        );
    }
}

#[test]
fn signal_and_plt_stacks_are_right_or_truncated_in_kernel() {
    require_root();
    trace_edges(IN_KERNEL);
}

#[test]
fn signal_and_plt_stacks_are_right_or_truncated_when_copied() {
    require_root();
    trace_edges(COPIED);
}
