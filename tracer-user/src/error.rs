//! Errors the user can act on. Each names what went wrong and what to do about it.

use std::{io, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command line that cannot work, found only once it is looked at (exit code 2).
    #[error("{message}")]
    Usage { message: String },
    #[error("no such process: pid {pid} (check it with `ps -p {pid}`)")]
    NoSuchProcess { pid: u32 },

    #[error("cannot trace pid {pid}: {reason}")]
    NotTraceable { pid: u32, reason: String },

    #[error("cannot run `{command}`: {source}")]
    Launch {
        command: String,
        #[source]
        source: io::Error,
    },

    #[error(
        "missing privileges: alloctrace needs {missing} (or CAP_SYS_ADMIN) to load eBPF programs and \
         attach uprobes; run it as root, e.g. `sudo alloctrace ...`"
    )]
    Privileges { missing: String },

    #[error("no allocator alloctrace can probe was found in pid {pid}: {reason}")]
    NoAllocator { pid: u32, reason: String },

    #[error("cannot read {}: {source}", path.display())]
    ReadElf {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cannot parse {} as ELF: {reason}", path.display())]
    ParseElf { path: PathBuf, reason: String },

    #[error("cannot load the eBPF programs: {source}")]
    Load {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("cannot attach to `{symbol}` in {}{hint}: {source}", path.display())]
    Attach {
        symbol: String,
        path: PathBuf,
        hint: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("cannot use the eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("cannot write the report to {}: {source}", path.display())]
    Output {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "{} is not an alloctrace JSON report ({reason}); write one with `--format json -o FILE`",
        path.display()
    )]
    NotAReport { path: PathBuf, reason: String },

    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// Boxes any error as the source of a load failure, turning `EPERM` into the privileges
    /// error users can act on.
    pub fn load(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        if chain_has_errno(&source, libc::EPERM) {
            return Self::Privileges {
                missing: "CAP_BPF and CAP_PERFMON".into(),
            };
        }
        Self::Load {
            source: Box::new(source),
        }
    }
}

/// Whether any error in `err`'s source chain is an OS error with this errno.
pub fn chain_has_errno(err: &(dyn std::error::Error + 'static), errno: i32) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && io.raw_os_error() == Some(errno)
        {
            return true;
        }
        cur = e.source();
    }
    false
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
