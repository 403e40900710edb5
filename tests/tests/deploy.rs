//! The deployment files (issue 21), checked offline — no registry, no cluster: the
//! DaemonSet manifest parses as YAML and grants the agent exactly what it needs (host PID
//! namespace; CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE and nothing else; tracefs, debugfs and
//! the cgroup tree mounted; limits; the Prometheus scrape annotations on the port it
//! listens on), and the Dockerfile is made of well-formed instructions that run the agent.
//! `cargo xtask check-deploy` runs only these.

use std::path::{Path, PathBuf};

use serde_norway::Value;

fn deploy(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name)
}

fn manifest() -> Value {
    let text = std::fs::read_to_string(deploy("daemonset.yaml")).expect("deploy/daemonset.yaml");
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("daemonset.yaml is not YAML: {e}"))
}

/// The strings of a YAML sequence.
fn strings(v: &Value) -> Vec<&str> {
    v.as_sequence()
        .map(|s| s.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The value after `flag` in `args`.
fn arg<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| *a == flag)
        .and_then(|i| args.get(i + 1).copied())
}

#[test]
fn manifest_grants_exactly_what_the_agent_needs() {
    let m = manifest();
    assert_eq!(m["apiVersion"], "apps/v1");
    assert_eq!(m["kind"], "DaemonSet");
    let spec = &m["spec"]["template"]["spec"];
    assert_eq!(
        spec["hostPID"], true,
        "the node's processes must be visible"
    );
    assert!(
        spec["hostNetwork"].is_null(),
        "no host network: the pod IP is scraped"
    );
    assert_eq!(spec["automountServiceAccountToken"], false);
    let c = &spec["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    let mut add = strings(&sc["capabilities"]["add"]);
    add.sort_unstable();
    assert_eq!(add, ["BPF", "PERFMON", "SYS_PTRACE"], "exactly these");
    assert_eq!(
        sc["seccompProfile"]["type"], "Unconfined",
        "bpf() and perf_event_open()"
    );
    let mounts: Vec<(&str, &str, bool)> = c["volumeMounts"]
        .as_sequence()
        .expect("volumeMounts")
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap_or_default(),
                v["mountPath"].as_str().unwrap_or_default(),
                v["readOnly"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    let host_path = |name: &str| {
        spec["volumes"]
            .as_sequence()
            .and_then(|vs| vs.iter().find(|v| v["name"] == name))
            .and_then(|v| v["hostPath"]["path"].as_str())
            .unwrap_or_else(|| panic!("no hostPath volume {name}"))
    };
    for (path, read_only) in [
        ("/sys/kernel/tracing", false),
        ("/sys/kernel/debug", false),
        ("/sys/fs/cgroup", true),
    ] {
        let mount = mounts.iter().find(|m| m.1 == path);
        let (name, _, ro) = mount.unwrap_or_else(|| panic!("{path} not mounted: {mounts:?}"));
        assert_eq!(host_path(name), path, "{path} must be the node's");
        assert_eq!(*ro, read_only, "{path}");
    }
    let args = strings(&c["args"]);
    let profiles = arg(&args, "--profile-dir").expect("--profile-dir");
    assert!(
        mounts.iter().any(|m| m.1 == profiles && !m.2),
        "{profiles} is not a writable mount"
    );
    let listen = arg(&args, "--listen").expect("--listen");
    let port = listen.rsplit(':').next().expect("a port");
    assert_eq!(
        c["ports"][0]["containerPort"]
            .as_u64()
            .map(|p| p.to_string())
            .as_deref(),
        Some(port)
    );
    let annotations = &m["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"].as_str(), Some(port));
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                c["resources"][kind][resource].is_string(),
                "{kind}.{resource} missing"
            );
        }
    }
    let labels = &m["spec"]["template"]["metadata"]["labels"];
    for (k, v) in m["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .expect("selector")
    {
        assert_eq!(
            &labels[k.as_str().expect("a label")],
            v,
            "the selector must match the pods"
        );
    }
}

/// One Dockerfile instruction: its keyword and its arguments (continuations joined).
#[derive(Debug)]
struct Instruction {
    keyword: String,
    args: String,
    line: usize,
}

const KEYWORDS: [&str; 18] = [
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

/// Parses a Dockerfile's instructions (comments, parser directives and `\` continuations as
/// the builder reads them); an error names the line.
fn parse_dockerfile(text: &str) -> Result<Vec<Instruction>, String> {
    let mut out = Vec::new();
    let mut pending: Option<Instruction> = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('#') || (line.is_empty() && pending.is_none()) {
            continue;
        }
        let (body, continued) = match line.strip_suffix('\\') {
            Some(body) => (body.trim_end(), true),
            None => (line, false),
        };
        match pending.as_mut() {
            Some(p) => {
                p.args.push(' ');
                p.args.push_str(body);
            }
            None => {
                let (keyword, args) = body.split_once(char::is_whitespace).unwrap_or((body, ""));
                let keyword = keyword.to_ascii_uppercase();
                if !KEYWORDS.contains(&keyword.as_str()) {
                    return Err(format!("line {}: unknown instruction `{keyword}`", n + 1));
                }
                pending = Some(Instruction {
                    keyword,
                    args: args.trim().to_owned(),
                    line: n + 1,
                });
            }
        }
        if !continued && let Some(p) = pending.take() {
            if p.args.is_empty() {
                return Err(format!("line {}: {} without arguments", p.line, p.keyword));
            }
            out.push(p);
        }
    }
    if let Some(p) = pending {
        return Err(format!("line {}: a continuation never ends", p.line));
    }
    match out.iter().find(|i| i.keyword != "ARG") {
        Some(i) if i.keyword == "FROM" => Ok(out),
        _ => Err("the first instruction (after ARG) must be FROM".into()),
    }
}

/// The exec form of an instruction (`["a", "b"]`) as strings.
fn exec_form(i: &Instruction) -> Vec<String> {
    serde_json::from_str(&i.args)
        .unwrap_or_else(|e| panic!("line {}: {} is not a JSON array: {e}", i.line, i.keyword))
}

#[test]
fn dockerfile_is_well_formed_and_runs_the_agent() {
    let text = std::fs::read_to_string(deploy("Dockerfile")).expect("deploy/Dockerfile");
    let instructions = parse_dockerfile(&text).unwrap_or_else(|e| panic!("Dockerfile: {e}"));
    let one = |k: &str| {
        let all: Vec<&Instruction> = instructions.iter().filter(|i| i.keyword == k).collect();
        assert_eq!(all.len(), 1, "one {k}: {instructions:?}");
        all[0]
    };
    assert!(
        one("FROM").args.starts_with("debian:bookworm"),
        "the glibc it is built on"
    );
    let entrypoint = exec_form(one("ENTRYPOINT"));
    assert_eq!(entrypoint, ["/usr/local/bin/alloctrace", "agent"]);
    let copy = one("COPY");
    let (from, to) = copy.args.split_once(' ').expect("COPY SRC DEST");
    assert_eq!(
        to.trim(),
        entrypoint[0],
        "the binary goes where ENTRYPOINT runs it"
    );
    assert_eq!(
        from, "target/release/alloctrace",
        "what `cargo xtask build` makes"
    );
    let cmd = exec_form(one("CMD"));
    let port = arg(
        &cmd.iter().map(String::as_str).collect::<Vec<_>>(),
        "--listen",
    )
    .and_then(|l| l.rsplit(':').next())
    .expect("CMD sets --listen")
    .to_owned();
    assert_eq!(one("EXPOSE").args, format!("{port}/tcp"));
    assert!(one("RUN").args.contains("libc6-dbg"));
    // The image and the DaemonSet agree: port and profile directory.
    let m = manifest();
    let c = &m["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        c["ports"][0]["containerPort"]
            .as_u64()
            .map(|p| p.to_string()),
        Some(port)
    );
    let volume = exec_form(one("VOLUME"));
    let args = strings(&c["args"]);
    assert_eq!(arg(&args, "--profile-dir"), Some(volume[0].as_str()));
}

#[test]
fn the_dockerfile_parser_rejects_what_a_builder_would() {
    assert!(parse_dockerfile("FROM debian\nRUN a \\\n  b\n").is_ok());
    assert!(parse_dockerfile("RUN true\n").is_err(), "FROM first");
    assert!(
        parse_dockerfile("FROM debian\nCOPPY a b\n")
            .unwrap_err()
            .contains("line 2")
    );
    assert!(
        parse_dockerfile("FROM debian\nRUN a \\\n").is_err(),
        "an open continuation"
    );
    assert!(
        parse_dockerfile("FROM debian\nEXPOSE\n").is_err(),
        "no arguments"
    );
}
