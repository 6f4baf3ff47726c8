use std::path::PathBuf;

use tessera_chunk::ChunkId;

/// Errors of chunk stores and the catalog.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No chunk under this id.
    #[error("chunk {0} is not in the store")]
    NotFound(ChunkId),
    /// The disk holding the store is full.
    #[error("{op} {path}: no space left on the store's disk")]
    NoSpace {
        /// What was being done.
        op: &'static str,
        /// Where.
        path: PathBuf,
    },
    /// Any other I/O failure, with what was being done and where.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Where.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// No image of this name.
    #[error("no image named {0:?} (see `tessera images`)")]
    NoSuchImage(String),
    /// The image name is not allowed.
    #[error("invalid image name {0:?}: use 1-128 of A-Z a-z 0-9 . _ - , starting with a letter or digit")]
    BadName(String),
    /// A catalog file could not be parsed.
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A remote store failed a request.
    #[error("{op} {object} (at {endpoint}): {kind}: {source}")]
    Remote {
        /// What was being done.
        op: &'static str,
        /// The object, as a URL.
        object: String,
        /// The server.
        endpoint: String,
        /// What kind of failure.
        kind: crate::s3::RemoteKind,
        /// The client's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A store URL that cannot be used.
    #[error("store {url:?}: {reason}")]
    BadStoreUrl {
        /// The URL as given.
        url: String,
        /// Why.
        reason: String,
    },
    /// The process is being interrupted: no new temporaries are written.
    #[error("interrupted")]
    Interrupted,
    /// The keyring that opens this store's manifests is not there.
    #[error("{}", keyring_missing(path, *needed))]
    KeyringMissing {
        /// Where it was expected.
        path: PathBuf,
        /// Whether the store holds manifests that need it.
        needed: bool,
    },
    /// An import held its lease on a generation longer than allowed.
    #[error(
        "the import outlived its lease on store generation {generation} ({seconds} s): nothing was named; run it again (chunks already stored are reused)"
    )]
    LeaseExpired {
        /// The generation it imported into.
        generation: u64,
        /// The lease's length.
        seconds: u64,
    },
    /// The lifecycle document changed under a collector or an import, or
    /// says something this build cannot act on.
    #[error("store lifecycle: {0}")]
    Lifecycle(String),
    /// Sealing, opening or manifest error.
    #[error(transparent)]
    Chunk(#[from] tessera_chunk::Error),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn keyring_missing(path: &std::path::Path, needed: bool) -> String {
    if !needed {
        format!("the keyring {} is missing (the first import makes one, or `tessera keyring init`)", path.display())
    } else {
        format!(
            "the keyring {} is missing, and the images in this store cannot be opened without it: restore it from a backup \
             (a new keyring would not open them; `tessera keyring init` makes one only where none is)",
            path.display()
        )
    }
}

impl Error {
    /// A short label of the kind of failure, for metrics.
    pub fn kind_label(&self) -> &'static str {
        match self {
            Error::NotFound(_) => "not_found",
            Error::Remote { kind, .. } => kind.label(),
            Error::NoSpace { .. } => "no_space",
            Error::Io { .. } => "io",
            _ => "other",
        }
    }

    /// Wraps an I/O error with context, naming a full disk plainly.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        let path = path.into();
        if source.raw_os_error() == Some(libc::ENOSPC) || source.raw_os_error() == Some(libc::EDQUOT) {
            return Error::NoSpace { op, path };
        }
        Error::Io { op, path, source }
    }
}
