//! Symbols that survive: a binary deleted after it started, and a process whose root is
//! another directory (as in a container), are still symbolized with function, file and line.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use alloctrace_tests::*;

/// Starts attach_target through `command` (with "exit"), attaches, lets it allocate and exit,
/// and returns the report.
fn trace_attach_target(command: Command, before_attach: impl FnOnce(u32)) -> (Traced, u32) {
    let mut target = AttachTarget::start(command);
    let pid = target.pid();
    before_attach(pid);
    let tracer = Attached::start(&[pid], &[]);
    target.go();
    target.finish();
    (tracer.wait(), pid)
}

fn assert_symbolized(traced: &Traced, pid: u32) {
    let p = traced.process(pid);
    let site = site_from(p, "after_attach");
    assert_eq!(site["live_bytes"], 960, "{}", traced.pretty());
    let f = &site["frames"][0];
    assert!(
        f["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("attach_target.c"))
            && f["line"] == 21,
        "{}",
        traced.pretty()
    );
    assert_eq!(site["frames"][1]["function"], "main");
}

#[test]
fn a_binary_deleted_after_it_started_is_still_symbolized() {
    require_root();
    let original = fixture("attach_target", &[]);
    let copy = scratch_dir().join(format!("deleted-target-{}", std::process::id()));
    std::fs::copy(&original, &copy).expect("copy the fixture");
    let mut cmd = Command::new(&copy);
    cmd.arg("exit");
    let (traced, pid) = trace_attach_target(cmd, |_| {
        std::fs::remove_file(&copy).expect("delete the running binary");
    });
    assert!(!copy.exists());
    assert_symbolized(&traced, pid);
}

/// The fixture with its shared libraries, copied into a directory that becomes its root.
fn root_with(binary: &Path) -> PathBuf {
    let root = scratch_dir().join(format!("root-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("root directory");
    std::fs::copy(binary, root.join("target")).expect("copy the fixture");
    let ldd = Command::new("ldd").arg(binary).output().expect("run ldd");
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let dest = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("lib directory");
        std::fs::copy(lib, &dest).expect("copy a library");
    }
    root
}

#[test]
fn a_process_with_another_root_is_symbolized_through_proc() {
    require_root();
    let root = root_with(&fixture("attach_target", &[]));
    let mut cmd = Command::new("unshare");
    cmd.arg("--mount")
        .arg(format!("--root={}", root.display()))
        .args(["/target", "exit"]);
    let (traced, pid) = trace_attach_target(cmd, |pid| {
        let exe = std::fs::read_link(format!("/proc/{pid}/root")).expect("its root");
        assert_eq!(exe, root, "the fixture runs in its own root");
    });
    assert_symbolized(&traced, pid);
    let _ = std::fs::remove_dir_all(&root);
}
