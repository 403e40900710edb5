//! Where the report goes, opened before tracing so an unwritable path fails first.

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

pub fn open(path: Option<&PathBuf>) -> Result<Box<dyn io::Write>> {
    match path {
        None => Ok(Box::new(io::BufWriter::new(io::stdout()))),
        Some(path) => create_private(path)
            .map(|f| Box::new(io::BufWriter::new(f)) as Box<dyn io::Write>)
            .map_err(|source| error(Some(path), source)),
    }
}

/// Creates (or truncates) `path`, readable and writable by its owner only when it is new: a
/// report names a program's functions, files and sizes, which is not everyone's business.
pub fn create_private(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

pub fn error(path: Option<&PathBuf>, source: io::Error) -> Error {
    Error::Output {
        path: path.cloned().unwrap_or_else(|| PathBuf::from("<stdout>")),
        source,
    }
}

/// Flushes the report's destination.
pub fn flush(out: &mut dyn io::Write, path: Option<&PathBuf>) -> Result<()> {
    out.flush().map_err(|source| error(path, source))
}
