//! The profile directory: each window's pprof profile and JSON report, named by time, pid
//! and command, and the directory kept under its byte limit — room is made before a file is
//! written, the oldest of the agent's own files first, so the limit is never passed. Owns
//! no tracing and no metrics.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    time::SystemTime,
};

use crate::{
    error::{Error, Result},
    report::{self, Report},
    session::create_private,
};

/// Every file the agent writes starts with this (and only those are ever removed).
const PREFIX: &str = "alloctrace-";
const SUFFIXES: [&str; 2] = [".pb.gz", ".json"];

/// Why a window's files were written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Occasion {
    /// The window ran its course (or the agent stopped).
    Window,
    /// The OOM killer picked the traced process.
    OomKill,
}

pub struct ProfileDir {
    pub dir: PathBuf,
    pub max_bytes: u64,
    /// Files removed to stay under the limit, and windows whose files alone would not fit.
    pub removed: u64,
    pub skipped: u64,
}

/// What was written for one window.
#[derive(Debug, Default)]
pub struct Written {
    pub profile: Option<PathBuf>,
    pub report: Option<PathBuf>,
}

impl ProfileDir {
    /// Creates the directory if needed and checks it is writable: the agent fails at start,
    /// not at its first window.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self> {
        let fail = |source| Error::Io {
            what: format!(
                "cannot write profiles to {} (choose a writable --profile-dir)",
                dir.display()
            ),
            source,
        };
        std::fs::create_dir_all(dir).map_err(fail)?;
        let probe = dir.join(format!(".{PREFIX}write-test-{}", std::process::id()));
        create_private(&probe).map_err(fail)?;
        let _ = std::fs::remove_file(&probe);
        Ok(Self {
            dir: dir.to_owned(),
            max_bytes,
            removed: 0,
            skipped: 0,
        })
    }

    /// Writes `report`'s profile and JSON report for process `pid`, after making room.
    pub fn write(
        &mut self,
        report: &Report,
        (pid, comm): (u32, &str),
        occasion: Occasion,
    ) -> Result<Written> {
        let mut profile = Vec::new();
        let mut json = Vec::new();
        let encode = |source| Error::Io {
            what: "cannot encode a profile".into(),
            source,
        };
        report::pprof::write(report, &mut profile).map_err(encode)?;
        report::write_json(report, &mut json).map_err(encode)?;
        let stem = file_stem(SystemTime::now(), pid, comm, occasion);
        let mut written = Written::default();
        for (bytes, suffix, slot) in [
            (profile, SUFFIXES[0], &mut written.profile),
            (json, SUFFIXES[1], &mut written.report),
        ] {
            if !self.make_room(bytes.len() as u64) {
                self.skipped += 1;
                continue;
            }
            let path = self.dir.join(format!("{stem}{suffix}"));
            let fail = |source| Error::Output {
                path: path.clone(),
                source,
            };
            let mut file = create_private(&path).map_err(fail)?;
            file.write_all(&bytes).map_err(fail)?;
            *slot = Some(path);
        }
        Ok(written)
    }

    /// The agent's files in the directory, the oldest first, with their sizes.
    pub fn files(&self) -> Vec<(PathBuf, u64)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut files: Vec<(PathBuf, u64)> = entries
            .flatten()
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with(PREFIX) && SUFFIXES.iter().any(|s| name.ends_with(s))
            })
            .filter_map(|e| Some((e.path(), e.metadata().ok()?.len())))
            .collect();
        // Names start with the time: their order is the order they were written in.
        files.sort();
        files
    }

    /// Bytes the agent's files take.
    pub fn bytes(&self) -> u64 {
        self.files().iter().map(|f| f.1).sum()
    }

    /// Removes the oldest files until `incoming` more bytes fit; false when they never can.
    fn make_room(&mut self, incoming: u64) -> bool {
        if incoming > self.max_bytes {
            return false;
        }
        let files = self.files();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        for (path, len) in files {
            if total + incoming <= self.max_bytes {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= len;
                self.removed += 1;
            }
        }
        total + incoming <= self.max_bytes
    }

    /// A new limit (SIGHUP); applied at the next write.
    pub fn set_limit(&mut self, max_bytes: u64) {
        self.max_bytes = max_bytes;
    }
}

/// `alloctrace-20261202T160102.345Z-pid1234-server[-oom]`: sorts by time; the command name
/// is kept to letters, digits, `.`, `_` and `-`.
pub fn file_stem(at: SystemTime, pid: u32, comm: &str, occasion: Occasion) -> String {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (y, mo, d) = civil_date(secs / 86_400);
    let t = secs % 86_400;
    let safe: String = comm
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let oom = if occasion == Occasion::OomKill {
        "-oom"
    } else {
        ""
    };
    format!(
        "{PREFIX}{y:04}{mo:02}{d:02}T{:02}{:02}{:02}.{:03}Z-pid{pid}-{safe}{oom}",
        t / 3600,
        t / 60 % 60,
        t % 60,
        since.subsec_millis()
    )
}

/// Year, month, day of a day count since 1970-01-01 (the proleptic Gregorian calendar).
fn civil_date(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn names_sort_by_time_and_keep_comm_safe() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_227_262_345);
        assert_eq!(
            file_stem(at, 42, "web/worker 1", Occasion::OomKill),
            "alloctrace-20261202T160102.345Z-pid42-web_worker_1-oom"
        );
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(19_782), (2024, 2, 29));
    }

    #[test]
    fn room_is_made_oldest_first_and_never_past_the_limit() {
        let dir = std::env::temp_dir().join(format!("alloctrace-profiles-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut pd = ProfileDir::open(&dir, 250).expect("writable");
        for n in 0..5 {
            let name = dir.join(format!("{PREFIX}2026010{n}T000000.000Z-pid1-x.json"));
            std::fs::write(&name, [0u8; 100]).expect("write");
        }
        std::fs::write(dir.join("unrelated.txt"), [0u8; 1000]).expect("write");
        assert!(pd.make_room(100));
        let names: Vec<String> = pd
            .files()
            .iter()
            .map(|f| f.0.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(names[0].contains("20260104"), "the newest stays: {names:?}");
        assert!(!pd.make_room(251), "a file over the limit never fits");
        assert!(
            dir.join("unrelated.txt").exists(),
            "only the agent's files go"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
