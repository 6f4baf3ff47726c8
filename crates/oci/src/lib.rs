//! Ingest: find an image, fetch its blobs, and verify every digest before
//! anything downstream sees a byte.
//!
//! [`resolve`] turns a [`Reference`] into a [`ResolvedImage`]: the manifest
//! and config, checked against their digests, and the layer blobs (registry
//! blobs are streamed to a spool directory while they are hashed, so no
//! layer is ever held in memory). [`Layer::open`] then streams a layer's
//! tar, decompressed, checking the blob's digest and the uncompressed digest
//! (the config's diff id) as the stream ends, so each byte is read once:
//! a caller stages what it derives and commits only after every layer's
//! stream has ended cleanly.
//!
//! Transports, spelled as skopeo spells them:
//! - `oci:DIR[:TAG]`: an OCI image layout;
//! - `docker-archive:FILE[:REPO:TAG]`: a `docker save` tar;
//! - `docker://HOST[:PORT]/REPO[:TAG|@DIGEST]`: a registry, with token and
//!   basic auth, image indexes, and gzip, zstd or plain layers.
//!
//! ```no_run
//! use tessera_oci::{resolve, PullOptions, Reference, NoProgress};
//! let r = Reference::parse("oci:./layout:py").unwrap();
//! let spool = std::env::temp_dir();
//! let image = resolve(&r, &PullOptions::default(), &spool, &NoProgress).unwrap();
//! for layer in &image.layers {
//!     let mut tar = layer.open(&NoProgress).unwrap();
//!     std::io::copy(&mut tar, &mut std::io::sink()).unwrap();
//! }
//! ```
#![deny(missing_docs)]

mod archive;
mod digest;
mod layout;
mod reference;
mod registry;
mod spec;

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

pub use digest::{digest_of, Digest, Hasher, VerifyingReader};
pub use reference::{Reference, Target};
pub use spec::Compression;

/// Entry points for the fuzz targets in `fuzz/`; not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    /// Parses bytes as a manifest or index, picks a platform, and parses them as a config.
    pub fn parse_document(bytes: &[u8]) {
        if let Ok(crate::spec::Document::Index(i)) = crate::spec::Document::parse(bytes, None) {
            let _ = crate::spec::pick_platform(&i, "linux/amd64");
        }
        let _ = serde_json::from_slice::<crate::spec::ConfigFile>(bytes);
    }
}

/// Errors of ingest, naming the image, blob or layer at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The reference could not be parsed.
    #[error("invalid image reference {reference:?}: {reason}")]
    BadReference {
        /// As given.
        reference: String,
        /// What is wrong.
        reason: String,
    },
    /// A digest string is malformed.
    #[error("invalid digest {0:?}")]
    BadDigest(String),
    /// A blob's content does not match its digest (or size).
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// Which blob.
        what: String,
        /// Declared digest.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// A manifest, index or config is malformed.
    #[error("{0}")]
    BadDocument(String),
    /// A media type Tessera does not handle.
    #[error("unsupported {what} media type {media_type:?}")]
    UnsupportedMediaType {
        /// Manifest or layer.
        what: String,
        /// The type.
        media_type: String,
    },
    /// No image in an index matches the requested platform.
    #[error("no image for platform {want} (the index has: {have})")]
    NoPlatform {
        /// Requested `os/arch`.
        want: String,
        /// Available platforms.
        have: String,
    },
    /// The image was not found (tag, archive entry, registry 404).
    #[error("{0}")]
    NotFound(String),
    /// The registry refused the credentials, or needs some.
    #[error("{0}")]
    Auth(String),
    /// The registry answered with an error.
    #[error("registry {url}: HTTP {status}: {body}")]
    Registry {
        /// Request URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// Start of the response body.
        body: String,
    },
    /// Could not reach the registry.
    #[error("registry {url}: {reason}")]
    Network {
        /// Request URL.
        url: String,
        /// Transport error.
        reason: String,
    },
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(path: &Path, source: io::Error) -> Error {
        Error::Io { path: path.to_owned(), source }
    }
}

/// Options for fetching from registries.
#[derive(Clone, Debug)]
pub struct PullOptions {
    /// `os/arch[/variant]` to pick from an image index.
    pub platform: String,
    /// Use plain HTTP (and accept any certificate).
    pub insecure: bool,
    /// `user:password`; otherwise credentials come from the docker config.
    pub creds: Option<String>,
}

impl Default for PullOptions {
    fn default() -> PullOptions {
        PullOptions { platform: "linux/amd64".into(), insecure: false, creds: None }
    }
}

/// Reports progress of long transfers. All methods default to doing nothing.
pub trait Progress: Sync {
    /// A phase starts: `total` bytes are expected (0 when unknown).
    fn start(&self, _what: &str, _total: u64) {}
    /// One of a series of steps starts (a layer): like [`Progress::start`],
    /// but the step before it stays on screen with what it did.
    fn step(&self, what: &str, total: u64) {
        self.start(what, total)
    }
    /// `n` more bytes were processed.
    fn advance(&self, _n: u64) {}
}

/// A [`Progress`] that reports nothing.
pub struct NoProgress;
impl Progress for NoProgress {}

/// The runtime part of the image config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`.
    pub env: Vec<String>,
    /// `WorkingDir`.
    pub working_dir: String,
    /// `User`.
    pub user: String,
    /// `Labels`.
    pub labels: std::collections::BTreeMap<String, String>,
    /// `ExposedPorts` keys.
    pub exposed_ports: Vec<String>,
    /// `StopSignal`.
    pub stop_signal: String,
}

/// An image whose manifest, config and blobs have all been verified.
pub struct ResolvedImage {
    /// The reference as parsed.
    pub reference: Reference,
    /// Digest of the image manifest (for docker-archive: of its manifest.json entry).
    pub manifest_digest: Digest,
    /// Digest of the config blob.
    pub config_digest: Digest,
    /// `os/arch[/variant]` from the config.
    pub platform: String,
    /// Entrypoint, cmd, env and the rest.
    pub config: RuntimeConfig,
    /// Layers, lowest first.
    pub layers: Vec<Layer>,
    /// Holds spooled registry blobs; removed on drop.
    _spool: Option<Spool>,
}

/// A verified layer blob.
pub struct Layer {
    /// Digest of the blob as stored.
    pub digest: Digest,
    /// Digest of the uncompressed tar.
    pub diff_id: Digest,
    /// Media type.
    pub media_type: String,
    /// Bytes of the blob.
    pub size: u64,
    /// How the blob is compressed.
    pub compression: Compression,
    /// Position in the image, for messages (`layer 2/5 sha256:…`).
    pub label: String,
    blob: BlobLocation,
    /// Whether the blob's digest still has to be checked while streaming
    /// (registry blobs were checked as they were downloaded).
    check_blob: bool,
}

/// Where a blob's bytes are: a region of a local file.
#[derive(Clone, Debug)]
pub(crate) struct BlobLocation {
    pub path: PathBuf,
    pub offset: u64,
    pub len: u64,
}

impl BlobLocation {
    pub fn whole(path: PathBuf, len: u64) -> BlobLocation {
        BlobLocation { path, offset: 0, len }
    }

    pub fn open(&self) -> Result<io::Take<File>, Error> {
        let mut f = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        f.seek(SeekFrom::Start(self.offset)).map_err(|e| Error::io(&self.path, e))?;
        Ok(f.take(self.len))
    }

    /// Hashes the blob and compares it with `expected` (digest and size).
    pub fn verify(&self, expected: &Digest, what: &str, progress: &dyn Progress) -> Result<(), Error> {
        let reader = ProgressReader { inner: self.open()?, progress };
        let (actual, len) = digest_of(reader, expected).map_err(|e| Error::io(&self.path, e))?;
        if &actual != expected || len != self.len {
            return Err(Error::DigestMismatch { what: what.to_owned(), expected: expected.to_string(), actual: actual.to_string() });
        }
        Ok(())
    }
}

impl Layer {
    /// Streams the uncompressed tar. Reading it to the end checks the
    /// blob's digest and the diff id: a mismatch is an `InvalidData` error
    /// from the last read.
    pub fn open<'p>(&self, progress: &'p dyn Progress) -> Result<Box<dyn Read + Send + 'p>, Error> {
        let buffered = io::BufReader::with_capacity(1 << 20, ProgressReader { inner: self.blob.open()?, progress });
        // A plain tar's digest is its diff id: one check covers both.
        let raw: Box<dyn Read + Send + 'p> = if self.check_blob && self.compression != Compression::None {
            Box::new(VerifyingReader::new(buffered, self.digest.clone(), self.label.clone()))
        } else {
            Box::new(buffered)
        };
        let plain: Box<dyn Read + Send + 'p> = match self.compression {
            Compression::None => Box::new(raw),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::with_capacity(1 << 16, raw))),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(raw).map_err(|e| Error::io(&self.blob.path, e))?),
        };
        Ok(Box::new(VerifyingReader::new(plain, self.diff_id.clone(), format!("{} (uncompressed)", self.label))))
    }

    /// Hashes the blob as stored and compares it with its digest: after a
    /// failed stream, tells a damaged blob from a bad layer.
    pub fn check(&self) -> Result<(), Error> {
        self.blob.verify(&self.digest, &self.label, &NoProgress)
    }
}

struct ProgressReader<'p, R> {
    inner: R,
    progress: &'p dyn Progress,
}

impl<R: Read> Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.advance(n as u64);
        Ok(n)
    }
}

/// A directory of downloaded blobs, removed on drop.
pub(crate) struct Spool(PathBuf);

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Finds the image, fetches what must be fetched into `spool_dir`, and
/// verifies the manifest, config and every layer blob against their digests.
pub fn resolve(reference: &Reference, options: &PullOptions, spool_dir: &Path, progress: &dyn Progress) -> Result<ResolvedImage, Error> {
    match reference {
        Reference::Layout { dir, tag } => layout::resolve(reference, dir, tag.as_deref(), options),
        Reference::Archive { file, tag } => archive::resolve(reference, file, tag.as_deref(), progress),
        Reference::Registry { .. } => registry::resolve(reference, options, spool_dir, progress),
    }
}

/// Builds the resolved image from verified documents; shared by transports.
pub(crate) fn assemble(
    reference: &Reference,
    manifest_digest: Digest,
    config_digest: Digest,
    config_bytes: &[u8],
    layers: Vec<(spec::Descriptor, Compression, BlobLocation)>,
    spool: Option<Spool>,
    check_blobs: bool,
) -> Result<ResolvedImage, Error> {
    let config: spec::ConfigFile = serde_json::from_slice(config_bytes).map_err(|e| Error::BadDocument(format!("image config {config_digest}: {e}")))?;
    if config.rootfs.diff_ids.len() != layers.len() {
        return Err(Error::BadDocument(format!("image config {config_digest} lists {} diff ids for {} layers", config.rootfs.diff_ids.len(), layers.len())));
    }
    let n = layers.len();
    for (i, ((d, compression, blob), diff_id)) in layers.iter().zip(&config.rootfs.diff_ids).enumerate() {
        let what = format!("layer {}/{n} {}", i + 1, d.digest);
        if *compression == Compression::None && &d.digest != diff_id {
            return Err(Error::DigestMismatch { what: format!("{what} (uncompressed)"), expected: diff_id.to_string(), actual: d.digest.to_string() });
        }
        if blob.len != d.size {
            return Err(Error::DigestMismatch { what, expected: format!("{} bytes", d.size), actual: format!("{} bytes", blob.len) });
        }
    }
    let layers = layers
        .into_iter()
        .zip(config.rootfs.diff_ids.iter())
        .enumerate()
        .map(|(i, ((d, compression, blob), diff_id))| Layer {
            label: format!("layer {}/{n} {}", i + 1, d.digest),
            digest: d.digest,
            diff_id: diff_id.clone(),
            media_type: d.media_type,
            size: d.size,
            compression,
            blob,
            check_blob: check_blobs,
        })
        .collect();
    let run = config.config.unwrap_or_default();
    let platform = spec::Platform { os: config.os, architecture: config.architecture, variant: config.variant }.spelled();
    Ok(ResolvedImage {
        reference: reference.clone(),
        manifest_digest,
        config_digest,
        platform,
        config: RuntimeConfig {
            entrypoint: run.entrypoint.unwrap_or_default(),
            cmd: run.cmd.unwrap_or_default(),
            env: run.env.unwrap_or_default(),
            working_dir: run.working_dir.unwrap_or_default(),
            user: run.user.unwrap_or_default(),
            labels: run.labels.unwrap_or_default(),
            exposed_ports: run.exposed_ports.map(|p| p.into_keys().collect()).unwrap_or_default(),
            stop_signal: run.stop_signal.unwrap_or_default(),
        },
        layers,
        _spool: spool,
    })
}

/// Reads at most `limit` bytes of a small document; more is an error.
pub(crate) fn read_limited(mut r: impl Read, limit: u64, what: &str) -> Result<Vec<u8>, Error> {
    let mut buf = Vec::new();
    (&mut r).take(limit + 1).read_to_end(&mut buf).map_err(|e| Error::BadDocument(format!("{what}: {e}")))?;
    if buf.len() as u64 > limit {
        return Err(Error::BadDocument(format!("{what} is larger than {limit} bytes")));
    }
    Ok(buf)
}

/// Checks a small document's bytes against its descriptor.
pub(crate) fn check_document(bytes: &[u8], expected: &Digest, what: &str) -> Result<(), Error> {
    let mut h = expected.hasher();
    h.update(bytes);
    let actual = h.finish();
    if &actual != expected {
        return Err(Error::DigestMismatch { what: what.to_owned(), expected: expected.to_string(), actual: actual.to_string() });
    }
    Ok(())
}
