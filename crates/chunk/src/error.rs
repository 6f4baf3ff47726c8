use crate::ChunkId;

/// Errors of sealing, opening and manifest handling.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A chunk's bytes do not hash to its id: it was corrupted or swapped.
    #[error("chunk {id}: content does not match its id (stored bytes are corrupt)")]
    IdMismatch {
        /// The chunk asked for.
        id: ChunkId,
    },
    /// A chunk's authentication tag did not verify under the manifest's key.
    #[error("chunk {id}: does not open with its key (wrong key or corrupt bytes)")]
    OpenFailed {
        /// The chunk asked for.
        id: ChunkId,
    },
    /// A chunk has the wrong length.
    #[error("chunk {id}: {len} bytes, expected at most {expected}")]
    BadLength {
        /// The chunk asked for.
        id: ChunkId,
        /// Its length.
        len: usize,
        /// The sealed chunk size.
        expected: usize,
    },
    /// A compressed chunk opened (its tag verified) but does not inflate
    /// to one chunk.
    #[error("chunk {id}: corrupt compressed chunk: {reason}")]
    BadCompression {
        /// The chunk asked for.
        id: ChunkId,
        /// Why.
        reason: String,
    },
    /// A manifest (or its envelope) could not be parsed.
    #[error("malformed manifest: {0}")]
    MalformedManifest(String),
    /// The manifest envelope did not open: wrong tenant key or tampered bytes.
    #[error("manifest does not open with the key of tenant {tenant:?} (wrong key or tampered manifest)")]
    ManifestOpen {
        /// Tenant named by the envelope.
        tenant: String,
    },
    /// The keyring has no key for this tenant.
    #[error("no master key for tenant {0:?} in the keyring")]
    UnknownTenant(String),
    /// There is no keyring where one was expected.
    #[error("the keyring {path} is missing")]
    KeyringMissing {
        /// Where it was expected.
        path: String,
    },
    /// The keyring file is unreadable or malformed.
    #[error("keyring {path}: {reason}")]
    Keyring {
        /// Keyring path.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A key service failed or refused a request.
    #[error("{0}")]
    KeyService(String),
    /// A hex chunk id or key could not be parsed.
    #[error("invalid {what}: {value:?}")]
    Parse {
        /// What was being parsed.
        what: &'static str,
        /// The offending text.
        value: String,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
