//! `alloctrace diff A.json B.json`: the sites whose live bytes grew between two JSON reports
//! of the same program, biggest growth first.
//!
//! Sites are matched by their symbolized frames (function, file, line, inlined), never by
//! address: another run, another pid or a rebuild moves addresses, not names. A report
//! holds sites of every process it traced; sites with the same frames in several processes
//! are summed. Reports are read as plain JSON, so any `alloctrace.report/v1` file works,
//! whatever fields later versions add.

use std::{
    io::{self, Write},
    path::{Path, PathBuf},
};

use rustc_hash::FxHashMap;
use serde::Serialize;
use serde_json::Value;

use crate::{
    cli::{DiffArgs, DiffFormat},
    error::{Error, Result},
    report::text::{bytes, count},
};

/// One site's change between the two reports.
#[derive(Clone, Debug, Serialize)]
pub struct SiteChange {
    /// The frames as the later report has them.
    pub frames: Value,
    pub growth_bytes: i64,
    pub growth_allocations: i64,
    pub before_live_bytes: u64,
    pub after_live_bytes: u64,
    pub before_live_allocations: u64,
    pub after_live_allocations: u64,
    /// The site's verdict in the later report.
    pub verdict: String,
    /// Whether the earlier report had the site; when it did not but it left sites out
    /// (`--top`), the site may only have been below its cut.
    pub in_before: bool,
}

/// Both reports compared: growing sites (biggest first) and how many did not grow.
#[derive(Clone, Debug, Serialize)]
pub struct Diff {
    pub before: PathBuf,
    pub after: PathBuf,
    pub before_live_bytes: u64,
    pub after_live_bytes: u64,
    /// Whether the earlier report left sites out (`sites_omitted`).
    pub before_incomplete: bool,
    pub grown: Vec<SiteChange>,
    pub shrunk: usize,
    pub unchanged: usize,
}

/// Runs the `diff` command: reads both reports, writes the comparison to stdout.
pub fn run(args: &DiffArgs) -> Result<()> {
    let before = load(&args.before)?;
    let after = load(&args.after)?;
    let mut diff = compare(&before, &after, &args.before, &args.after);
    let shown = if args.top == 0 {
        diff.grown.len()
    } else {
        args.top
    };
    let mut out = io::BufWriter::new(io::stdout().lock());
    let written = match args.format {
        DiffFormat::Json => {
            diff.grown.truncate(shown);
            serde_json::to_writer_pretty(&mut out, &diff)
                .map_err(io::Error::from)
                .and_then(|()| writeln!(out))
        }
        DiffFormat::Text => write_text(&diff, shown, &mut out),
    };
    written
        .and_then(|()| out.flush())
        .or_else(|e| match e.kind() {
            io::ErrorKind::BrokenPipe => Ok(()),
            _ => Err(e),
        })
        .map_err(|source| Error::Output {
            path: "<stdout>".into(),
            source,
        })
}

/// A report file, checked to be an alloctrace JSON report.
pub fn load(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        what: format!("cannot read {}", path.display()),
        source,
    })?;
    let report: Value = serde_json::from_str(&text).map_err(|e| Error::NotAReport {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let schema = report["schema"].as_str().unwrap_or_default();
    if !schema.starts_with("alloctrace.report/") || !report["processes"].is_array() {
        return Err(Error::NotAReport {
            path: path.to_owned(),
            reason: "no alloctrace.report schema and processes".into(),
        });
    }
    Ok(report)
}

/// Live bytes and allocations of each site, by its frames' identity.
#[derive(Default)]
struct Totals<'a> {
    live_bytes: u64,
    live_allocations: u64,
    frames: Option<&'a Value>,
    verdict: Option<&'a str>,
}

/// Compares two parsed reports.
pub fn compare(before: &Value, after: &Value, before_path: &Path, after_path: &Path) -> Diff {
    let (a, a_live) = sites(before);
    let (b, b_live) = sites(after);
    let mut grown = Vec::new();
    let (mut shrunk, mut unchanged) = (0, 0);
    for (key, now) in &b {
        let then = a.get(key);
        let was = then.map_or(0, |t| t.live_bytes);
        let change = now.live_bytes as i64 - was as i64;
        if change <= 0 {
            if change < 0 {
                shrunk += 1;
            } else {
                unchanged += 1;
            }
            continue;
        }
        let was_allocations = then.map_or(0, |t| t.live_allocations);
        grown.push(SiteChange {
            frames: now.frames.cloned().unwrap_or(Value::Array(Vec::new())),
            growth_bytes: change,
            growth_allocations: now.live_allocations as i64 - was_allocations as i64,
            before_live_bytes: was,
            after_live_bytes: now.live_bytes,
            before_live_allocations: was_allocations,
            after_live_allocations: now.live_allocations,
            verdict: now.verdict.unwrap_or("?").to_owned(),
            in_before: then.is_some(),
        });
    }
    // Sites gone from the later report freed everything they held.
    shrunk += a
        .iter()
        .filter(|(k, t)| !b.contains_key(*k) && t.live_bytes > 0)
        .count();
    grown.sort_by(|x, y| {
        (y.growth_bytes, &x.frames.to_string()).cmp(&(x.growth_bytes, &y.frames.to_string()))
    });
    let processes = |r: &Value| r["processes"].as_array().cloned().unwrap_or_default();
    Diff {
        before: before_path.to_owned(),
        after: after_path.to_owned(),
        before_live_bytes: a_live,
        after_live_bytes: b_live,
        before_incomplete: processes(before)
            .iter()
            .any(|p| p["sites_omitted"].as_u64().unwrap_or(0) > 0),
        grown,
        shrunk,
        unchanged,
    }
}

/// Every site of every process by identity, and the report's total live bytes.
fn sites(report: &Value) -> (FxHashMap<String, Totals<'_>>, u64) {
    let mut out: FxHashMap<String, Totals<'_>> = FxHashMap::default();
    let mut live = 0;
    let processes = report["processes"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    for p in processes {
        live += p["live_bytes"].as_u64().unwrap_or(0);
        for s in p["sites"].as_array().map_or(&[][..], Vec::as_slice) {
            let t = out.entry(identity(s)).or_default();
            t.live_bytes += s["live_bytes"].as_u64().unwrap_or(0);
            t.live_allocations += s["live_allocations"].as_u64().unwrap_or(0);
            t.frames.get_or_insert(&s["frames"]);
            t.verdict
                .get_or_insert(s["verdict"].as_str().unwrap_or("?"));
        }
    }
    (out, live)
}

/// What makes two sites the same: kind, and each frame's function, file, line and
/// whether it was inlined. Addresses and modules' paths are left out.
fn identity(site: &Value) -> String {
    let mut key = site["kind"].as_str().unwrap_or("heap").to_owned();
    for f in site["frames"].as_array().map_or(&[][..], Vec::as_slice) {
        key.push('\u{1f}');
        key.push_str(&format!(
            "{}\u{1e}{}\u{1e}{}\u{1e}{}",
            f["function"].as_str().unwrap_or(""),
            f["file"].as_str().unwrap_or(""),
            f["line"].as_u64().map_or(String::new(), |l| l.to_string()),
            f["inlined"].as_bool().unwrap_or(false)
        ));
    }
    key
}

fn write_text(diff: &Diff, shown: usize, out: &mut dyn Write) -> io::Result<()> {
    let growth = diff.after_live_bytes as i64 - diff.before_live_bytes as i64;
    writeln!(
        out,
        "live {} → {} ({}) from {} to {}",
        bytes(diff.before_live_bytes),
        bytes(diff.after_live_bytes),
        signed_bytes(growth),
        diff.before.display(),
        diff.after.display()
    )?;
    writeln!(
        out,
        "{} grew, {} shrank, {} unchanged (sites matched by function, file and line)",
        count(diff.grown.len(), "site", "sites"),
        diff.shrunk,
        diff.unchanged
    )?;
    for (rank, s) in diff.grown.iter().take(shown).enumerate() {
        let new = match (s.in_before, diff.before_incomplete) {
            (true, _) => "",
            (false, false) => " (new)",
            (false, true) => " (new, or below A's --top cut)",
        };
        writeln!(
            out,
            "#{:<2} {} ({} B, {} live allocations){new}: {} → {} · {} in B",
            rank + 1,
            signed_bytes(s.growth_bytes),
            s.growth_bytes,
            format_args!("{:+}", s.growth_allocations),
            bytes(s.before_live_bytes),
            bytes(s.after_live_bytes),
            s.verdict
        )?;
        writeln!(out, "      {}", stack_line(&s.frames))?;
    }
    if diff.grown.len() > shown {
        writeln!(
            out,
            "… {} (raise --top to see them)",
            count(diff.grown.len() - shown, "more site", "more sites")
        )?;
    }
    Ok(())
}

/// `+75.0 KiB`, `-1.00 MiB`.
fn signed_bytes(v: i64) -> String {
    let sign = if v < 0 { "-" } else { "+" };
    format!("{sign}{}", bytes(v.unsigned_abs()))
}

/// `leak (grow.c:21) ← main (grow.c:40) ← …`: the innermost frames of a site.
fn stack_line(frames: &Value) -> String {
    const SHOWN: usize = 4;
    let frames = frames.as_array().map_or(&[][..], Vec::as_slice);
    let mut parts: Vec<String> = frames
        .iter()
        .take(SHOWN)
        .map(|f| {
            let name = f["function"].as_str().unwrap_or("?");
            match (f["file"].as_str(), f["line"].as_u64()) {
                (Some(file), Some(line)) => {
                    let file = file.rsplit('/').next().unwrap_or(file);
                    format!("{name} ({file}:{line})")
                }
                _ => name.to_owned(),
            }
        })
        .collect();
    if frames.len() > SHOWN {
        parts.push(format!("… {} more", frames.len() - SHOWN));
    }
    if parts.is_empty() {
        return "<stack unknown>".to_owned();
    }
    parts.join(" ← ")
}

#[cfg(test)]
mod tests;
