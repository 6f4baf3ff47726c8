//! An S3-compatible object store as the origin: chunks, manifests and names
//! in one bucket (under a prefix), shared by every host.
//!
//! ```text
//! PREFIX/chunks/ab/ID          sealed chunks of generation 0 (put-if-absent)
//! PREFIX/manifests/ID          sealed manifests of generation 0 (put-if-absent);
//!                              ID.refs and ID.profile beside
//! PREFIX/gen/G/chunks/ab/ID    the same for generation G
//! PREFIX/gen/G/manifests/ID
//! PREFIX/images/NAME.json      names, set by compare-and-swap on the ETag
//! PREFIX/lifecycle.json        generations (see `lifecycle`), compare-and-swap
//! PREFIX/leases/G/…            imports' leases on generation G
//! PREFIX/alarms/…              reads of expired generations
//! ```
//!
//! Chunks and manifests are written with `If-None-Match: *`: a 412 means
//! another writer stored the same content (a dedup hit), a 409
//! (`ConditionalRequestConflict`, a racing write still in progress) is tried
//! again. An importer never reads a chunk. Names are replaced with
//! `If-Match` on the ETag read, so two writers racing for a name each learn
//! what they replaced. Every call is one request (plus retries of server
//! errors, a few, with backoff) on the store's own runtime, with a timeout:
//! the agent's origin bound and queue stay in charge of the load.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as Key;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutPayload, RetryConfig, UpdateVersion};
use tessera_chunk::{ChunkId, SealedManifest};

use crate::catalog::is_manifest_id;
use crate::control::{Control, Version};
use crate::url::{Backend, Deleted};
use crate::{check_name, Bytes, Catalog, ChunkStore, Committed, Error, ImageRef, Put, PutBatch, Result};

/// Where an S3 store is:
/// `s3://BUCKET[/PREFIX][?endpoint=URL&region=R&virtual_hosted=true&timeout=10s]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Url {
    /// The bucket.
    pub bucket: String,
    /// Key prefix (no leading or trailing slash; may be empty).
    pub prefix: String,
    /// Endpoint URL (`http://` allowed), overriding `AWS_ENDPOINT_URL`.
    pub endpoint: Option<String>,
    /// Region, overriding `AWS_REGION`.
    pub region: Option<String>,
    /// Virtual-hosted-style addressing (default: path style).
    pub virtual_hosted: bool,
    /// How long one request may take, retries included (default 10 s).
    pub timeout: Duration,
}

impl S3Url {
    /// Parses the part after `s3://`.
    pub fn parse(url: &str, rest: &str) -> Result<S3Url> {
        let bad = |why: String| Error::BadStoreUrl { url: url.to_owned(), reason: why };
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
        if bucket.len() < 3 || bucket.len() > 63 || !bucket.chars().all(valid) {
            return Err(bad(format!("{bucket:?} is not a bucket name (3-63 of a-z 0-9 . -)")));
        }
        let mut out = S3Url {
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
            endpoint: None,
            region: None,
            virtual_hosted: false,
            timeout: REQUEST_TIMEOUT,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "endpoint" => out.endpoint = Some(v.to_owned()),
                "region" => out.region = Some(v.to_owned()),
                "virtual_hosted" => out.virtual_hosted = matches!(v, "true" | "1" | "yes"),
                "timeout" => {
                    let secs: f64 = v.trim_end_matches('s').parse().map_err(|_| bad(format!("timeout {v:?}: use seconds, e.g. 10s")))?;
                    if !(0.1..=600.0).contains(&secs) {
                        return Err(bad(format!("timeout {v:?} out of range")));
                    }
                    out.timeout = Duration::from_secs_f64(secs);
                }
                other => return Err(bad(format!("unknown parameter {other:?} (use endpoint, region, virtual_hosted, timeout)"))),
            }
        }
        Ok(out)
    }
}

impl std::fmt::Display for S3Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}", self.bucket)?;
        if !self.prefix.is_empty() {
            write!(f, "/{}", self.prefix)?;
        }
        Ok(())
    }
}

/// An S3 operation, for counting.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// GET.
    Get,
    /// PUT.
    Put,
    /// HEAD.
    Head,
    /// A LIST page.
    List,
    /// DELETE (one request may delete up to 1,000 objects).
    Delete,
    /// A server-side copy.
    Copy,
}

const OPS: [(Op, &str); 6] = [(Op::Get, "get"), (Op::Put, "put"), (Op::Head, "head"), (Op::List, "list"), (Op::Delete, "delete"), (Op::Copy, "copy")];

/// How many requests of each operation a store made, for chunks and for
/// the catalog (manifests, profiles, names) apart.
#[derive(Default, Debug)]
pub struct Requests {
    counts: [[AtomicU64; 6]; 2],
}

impl Requests {
    fn add(&self, op: Op, key: &Key) {
        self.counts[usize::from(!is_chunk(key))][op as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests of `op` made for chunks (`chunks` true) or the catalog.
    pub fn count(&self, op: Op, chunks: bool) -> u64 {
        self.counts[usize::from(!chunks)][op as usize].load(Ordering::Relaxed)
    }
}

/// Whether `key` is a chunk's.
fn is_chunk(key: &Key) -> bool {
    key.parts().any(|p| p.as_ref() == "chunks")
}

/// The S3 client shared by the chunk store and the catalog.
pub struct S3 {
    client: AmazonS3,
    runtime: Option<tokio::runtime::Runtime>,
    url: S3Url,
    /// Where requests go, for messages.
    endpoint: String,
    /// Requests made so far.
    pub requests: Requests,
}

/// How long one request may take by default; a call with its retries takes
/// at most twice that.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl S3 {
    /// A client of the store at `url`, with credentials from the standard
    /// AWS variables (or the shared files of `AWS_PROFILE`). Connects
    /// lazily: nothing is sent yet.
    pub fn open(url: &S3Url) -> Result<Arc<S3>> {
        // Signing and TLS on ring; the provider is per process.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let options = ClientOptions::new()
            .with_timeout(url.timeout)
            .with_connect_timeout(url.timeout.min(Duration::from_secs(3)))
            .with_pool_idle_timeout(Duration::from_secs(60));
        // A few retries of server errors, quickly: the caller's own bounds
        // (the agent's origin queue) decide how long a read may wait.
        let retry = RetryConfig {
            max_retries: 2,
            retry_timeout: url.timeout * 2,
            backoff: BackoffConfig { init_backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(2), base: 2.0 },
        };
        let mut b = with_aws_profile(AmazonS3Builder::from_env()).with_client_options(options).with_retry(retry).with_bucket_name(&url.bucket);
        if let Some(e) = &url.endpoint {
            b = b.with_endpoint(e);
        }
        let endpoint = b.get_config_value(&AmazonS3ConfigKey::Endpoint);
        if endpoint.as_deref().is_some_and(|e| e.starts_with("http://")) {
            b = b.with_allow_http(true);
        }
        if let Some(r) = &url.region {
            b = b.with_region(r);
        }
        b = b.with_virtual_hosted_style_request(url.virtual_hosted);
        let client = b.build().map_err(|e| Error::BadStoreUrl { url: url.to_string(), reason: e.to_string() })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tessera-s3")
            .enable_all()
            .build()
            .map_err(|e| Error::io("start the S3 client's runtime", "", e))?;
        let endpoint = endpoint.unwrap_or_else(|| "AWS".into());
        Ok(Arc::new(S3 { client, runtime: Some(runtime), url: url.clone(), endpoint, requests: Requests::default() }))
    }

    fn key(&self, rel: &str) -> Key {
        if self.url.prefix.is_empty() {
            Key::from(rel)
        } else {
            Key::from(format!("{}/{rel}", self.url.prefix))
        }
    }

    fn chunk_key(generation: u64, id: &ChunkId) -> String {
        let hex = id.to_hex();
        format!("{}chunks/{}/{hex}", generation_base(generation), &hex[..2])
    }

    fn manifest_key(generation: u64, file: &str) -> String {
        format!("{}manifests/{file}", generation_base(generation))
    }

    /// The error of `op` on `key`, saying where and what kind.
    fn error(&self, op: &'static str, key: &Key, e: object_store::Error) -> Error {
        let text = e.to_string();
        let kind = match &e {
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => RemoteKind::Denied,
            _ if text.contains("NoSuchBucket") => RemoteKind::NoBucket,
            _ if ["InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Access Denied", "403"].iter().any(|t| text.contains(t)) => RemoteKind::Denied,
            _ if text.contains("error sending request") || text.contains("timed out") || text.contains("Timeout") || text.contains(" 5") => {
                RemoteKind::Unavailable
            }
            _ => RemoteKind::Other,
        };
        Error::Remote { op, object: format!("s3://{}/{key}", self.url.bucket), endpoint: self.endpoint.clone(), kind, source: Box::new(e) }
    }

    /// GETs `key`: its bytes and ETag, or `None` if it does not exist.
    fn get(&self, op: &'static str, key: &Key) -> Result<Option<(Bytes, Option<String>)>> {
        self.requests.add(Op::Get, key);
        self.rt().block_on(async {
            match self.client.get(key).await {
                Ok(r) => {
                    let etag = r.meta.e_tag.clone();
                    let bytes = r.bytes().await.map_err(|e| self.error(op, key, e))?;
                    Ok(Some((bytes, etag)))
                }
                Err(object_store::Error::NotFound { source, .. }) if source.to_string().contains("NoSuchBucket") => {
                    Err(self.error(op, key, object_store::Error::Generic { store: "S3", source }))
                }
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.error(op, key, e)),
            }
        })
    }

    /// Whether `key` exists.
    fn head(&self, op: &'static str, key: &Key) -> Result<bool> {
        self.requests.add(Op::Head, key);
        self.rt().block_on(async {
            match self.client.head(key).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(self.error(op, key, e)),
            }
        })
    }

    /// PUTs `bytes` at `key` unless something is there.
    async fn create(&self, op: &'static str, key: &Key, bytes: Bytes) -> Result<Put> {
        let mut conflicts = 0;
        loop {
            self.requests.add(Op::Put, key);
            match self.client.put_opts(key, PutPayload::from(bytes.clone()), PutMode::Create.into()).await {
                Ok(_) => return Ok(Put::Created),
                // 409: a racing create of the same key is still in progress;
                // it may yet fail, so this one tries again.
                Err(object_store::Error::AlreadyExists { source, .. }) if is_conflict(&*source) && conflicts < 5 => {
                    conflicts += 1;
                    tokio::time::sleep(Duration::from_millis(50 << conflicts)).await;
                }
                Err(object_store::Error::AlreadyExists { .. }) => return Ok(Put::AlreadyPresent),
                Err(e) => return Err(self.error(op, key, e)),
            }
        }
    }

    /// PUTs `bytes` at `key`, replacing what is there.
    fn overwrite(&self, op: &'static str, key: &Key, bytes: Bytes) -> Result<()> {
        self.requests.add(Op::Put, key);
        self.rt().block_on(async { self.client.put(key, PutPayload::from(bytes)).await.map(|_| ()).map_err(|e| self.error(op, key, e)) })
    }

    /// Deletes `key` (absent is fine).
    fn delete(&self, op: &'static str, key: &Key) -> Result<()> {
        self.requests.add(Op::Delete, key);
        self.rt().block_on(async {
            match self.client.delete(key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.error(op, key, e)),
            }
        })
    }

    /// Calls `each` with the key (relative to `dir`) and size of every
    /// object under `dir`, page by page, holding one page at a time.
    fn list(&self, op: &'static str, dir: &str, each: &mut dyn FnMut(&str, u64)) -> Result<()> {
        let prefix = self.key(dir);
        let strip = format!("{prefix}/");
        self.rt().block_on(async {
            let mut stream = self.client.list(Some(&prefix));
            self.requests.add(Op::List, &prefix);
            let mut seen = 0u64;
            while let Some(meta) = stream.try_next().await.map_err(|e| self.error(op, &prefix, e))? {
                seen += 1;
                if seen.is_multiple_of(1000) {
                    self.requests.add(Op::List, &prefix);
                }
                let key = meta.location.to_string();
                if let Some(rel) = key.strip_prefix(&strip) {
                    each(rel, meta.size);
                }
            }
            Ok(())
        })
    }

    /// Requests made, as Prometheus text.
    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP tessera_s3_requests_total Requests to the S3 store, by operation and by what they were for.");
        let _ = writeln!(out, "# TYPE tessera_s3_requests_total counter");
        for (chunks, what) in [(true, "chunk"), (false, "catalog")] {
            for (op, name) in OPS {
                let _ = writeln!(out, "tessera_s3_requests_total{{op=\"{name}\",object=\"{what}\"}} {}", self.requests.count(op, chunks));
            }
        }
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("present until drop")
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        // Never blocks, so the store may be dropped anywhere (even in a task).
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// What kind of failure a remote store reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteKind {
    /// Credentials refused, or the operation not allowed (401, 403).
    Denied,
    /// The bucket does not exist.
    NoBucket,
    /// The server did not answer, or answered with a server error.
    Unavailable,
    /// Anything else.
    Other,
}

impl RemoteKind {
    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            RemoteKind::Denied => "denied",
            RemoteKind::NoBucket => "no_bucket",
            RemoteKind::Unavailable => "unavailable",
            RemoteKind::Other => "other",
        }
    }
}

impl std::fmt::Display for RemoteKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RemoteKind::Denied => "access denied (check the credentials and their policy)",
            RemoteKind::NoBucket => "no such bucket",
            RemoteKind::Unavailable => "the server did not answer, or failed",
            RemoteKind::Other => "request failed",
        })
    }
}

/// Whether a create failed because another create of the key is in
/// progress (409 ConditionalRequestConflict) rather than done (412).
fn is_conflict(e: &(dyn std::error::Error + Send + Sync)) -> bool {
    let text = e.to_string();
    text.contains("409") || text.contains("ConditionalRequestConflict")
}

/// Static credentials of `AWS_PROFILE` (or `default`) from the shared
/// credentials and config files, when the environment gives none.
fn with_aws_profile(mut b: AmazonS3Builder) -> AmazonS3Builder {
    if b.get_config_value(&AmazonS3ConfigKey::AccessKeyId).is_some() {
        return b;
    }
    let (creds, config) = crate::aws::profile_keys();
    let get = |k: &str| creds.get(k).or_else(|| config.get(k)).cloned();
    if let (Some(id), Some(secret)) = (get("aws_access_key_id"), get("aws_secret_access_key")) {
        b = b.with_access_key_id(id).with_secret_access_key(secret);
        if let Some(t) = get("aws_session_token") {
            b = b.with_token(t);
        }
    }
    if b.get_config_value(&AmazonS3ConfigKey::Region).is_none() {
        if let Some(r) = config.get("region") {
            b = b.with_region(r);
        }
    }
    b
}

/// The key prefix of generation `g` (empty for generation 0).
fn generation_base(g: u64) -> String {
    if g == 0 {
        String::new()
    } else {
        format!("gen/{g}/")
    }
}

/// Sealed chunks of one generation in S3.
pub struct S3ChunkStore {
    s3: Arc<S3>,
    generation: u64,
}

impl S3ChunkStore {
    /// The chunks of `generation`.
    pub fn new(s3: Arc<S3>, generation: u64) -> S3ChunkStore {
        S3ChunkStore { s3, generation }
    }

    fn key(&self, id: &ChunkId) -> Key {
        self.s3.key(&S3::chunk_key(self.generation, id))
    }
}

impl ChunkStore for S3ChunkStore {
    fn put(&self, id: &ChunkId, bytes: &[u8]) -> Result<Put> {
        let key = self.key(id);
        self.s3.rt().block_on(self.s3.create("store chunk", &key, Bytes::copy_from_slice(bytes)))
    }

    fn get(&self, id: &ChunkId) -> Result<Bytes> {
        self.s3.get("read chunk", &self.key(id))?.map(|(b, _)| b).ok_or(Error::NotFound(*id))
    }

    fn exists(&self, id: &ChunkId) -> Result<bool> {
        self.s3.head("check chunk", &self.key(id))
    }

    fn list(&self) -> Result<Vec<ChunkId>> {
        let mut out = Vec::new();
        self.s3.list("list chunks", &format!("{}chunks", generation_base(self.generation)), &mut |rel, _| {
            if let Some(id) = rel.rsplit('/').next().and_then(|n| n.parse::<ChunkId>().ok()) {
                out.push(id);
            }
        })?;
        Ok(out)
    }

    fn delete(&self, id: &ChunkId) -> Result<bool> {
        let key = self.key(id);
        // S3 does not say whether a delete removed anything.
        let there = self.s3.head("delete chunk", &key)?;
        self.s3.delete("delete chunk", &key)?;
        Ok(there)
    }

    fn sync(&self) -> Result<()> {
        // A PUT is durable when it is answered.
        Ok(())
    }

    fn batch(&self) -> Box<dyn PutBatch + '_> {
        Box::new(S3Batch {
            s3: Arc::clone(&self.s3),
            generation: self.generation,
            seen: Mutex::new(std::collections::HashSet::new()),
            slots: Arc::new(tokio::sync::Semaphore::new(BATCH_IN_FLIGHT)),
            tasks: Mutex::new(Vec::new()),
            failed: Arc::new(Mutex::new(None)),
            new: Arc::new(Mutex::new(Committed::default())),
        })
    }

    fn describe(&self) -> String {
        format!("{} at {}", self.s3.url, self.s3.endpoint)
    }
}

/// PUTs a batch keeps in flight at once.
const BATCH_IN_FLIGHT: usize = 32;

/// Puts sent in the background, many at once (the sealing threads do not
/// wait a round trip per chunk); each chunk is visible as soon as its PUT
/// is answered, which the contract allows: a failed import leaves only
/// chunks no name points at.
struct S3Batch {
    s3: Arc<S3>,
    generation: u64,
    seen: Mutex<std::collections::HashSet<ChunkId>>,
    slots: Arc<tokio::sync::Semaphore>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    failed: Arc<Mutex<Option<Error>>>,
    new: Arc<Mutex<Committed>>,
}

impl PutBatch for S3Batch {
    fn put(&self, id: &ChunkId, bytes: &[u8]) -> Result<()> {
        if let Some(e) = self.failed.lock().expect("no panics while holding the lock").take() {
            return Err(e);
        }
        if !self.seen.lock().expect("no panics while holding the lock").insert(*id) {
            return Ok(());
        }
        // Waits here while the batch has enough in flight: back-pressure.
        let slot = self.s3.rt().block_on(Arc::clone(&self.slots).acquire_owned()).expect("the semaphore is never closed");
        let (s3, failed, new) = (Arc::clone(&self.s3), Arc::clone(&self.failed), Arc::clone(&self.new));
        let key = s3.key(&S3::chunk_key(self.generation, id));
        let (id, bytes) = (*id, Bytes::copy_from_slice(bytes));
        let task = self.s3.rt().spawn(async move {
            let len = bytes.len() as u64;
            match s3.create("store chunk", &key, bytes).await {
                Ok(Put::Created) => new.lock().expect("no panics while holding the lock").add(id, len),
                Ok(Put::AlreadyPresent) => tracing::debug!("chunk {} is in the store already (dedup)", key),
                Err(e) => {
                    failed.lock().expect("no panics while holding the lock").get_or_insert(e);
                }
            }
            drop(slot);
        });
        let mut tasks = self.tasks.lock().expect("no panics while holding the lock");
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
        Ok(())
    }

    fn commit(self: Box<Self>) -> Result<Committed> {
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("no panics while holding the lock"));
        self.s3.rt().block_on(async {
            for t in tasks {
                let _ = t.await;
            }
        });
        if let Some(e) = self.failed.lock().expect("no panics while holding the lock").take() {
            return Err(e);
        }
        Ok(std::mem::take(&mut *self.new.lock().expect("no panics while holding the lock")))
    }
}

impl Drop for S3Batch {
    fn drop(&mut self) {
        // Dropped without a commit (an import failed): stop what is still
        // queued; chunks already stored stay, unnamed.
        for t in self.tasks.get_mut().expect("no panics while holding the lock").drain(..) {
            t.abort();
        }
    }
}

/// Manifests, profiles and names in S3.
pub struct S3Catalog(pub Arc<S3>);

impl S3Catalog {
    fn name_key(&self, name: &str) -> Key {
        self.0.key(&format!("images/{name}.json"))
    }
}

/// Tries at a name's compare-and-swap before giving up.
const SET_TRIES: usize = 16;

impl Catalog for S3Catalog {
    fn put_manifest(&self, generation: u64, sealed: &SealedManifest, refs: &[ChunkId]) -> Result<ChunkId> {
        let bytes = sealed.to_bytes();
        let id = ChunkId::of(&bytes);
        let refs_key = self.0.key(&S3::manifest_key(generation, &format!("{}.refs", id.to_hex())));
        let key = self.0.key(&S3::manifest_key(generation, &id.to_hex()));
        // Refs first: a manifest is never without them.
        self.0.rt().block_on(self.0.create("store manifest refs", &refs_key, Bytes::from(crate::catalog::encode_refs(refs))))?;
        self.0.rt().block_on(self.0.create("store manifest", &key, Bytes::from(bytes)))?;
        Ok(id)
    }

    fn get_refs(&self, generation: u64, id: &str) -> Result<Option<Vec<ChunkId>>> {
        let key = self.0.key(&S3::manifest_key(generation, &format!("{id}.refs")));
        let path = PathBuf::from(format!("s3://{}/{key}", self.0.url.bucket));
        if !is_manifest_id(id) {
            return Err(Error::Corrupt { path, reason: "not a manifest id".into() });
        }
        match self.0.get("read manifest refs", &key)? {
            Some((bytes, _)) => crate::catalog::decode_refs(&bytes).map(Some).ok_or(Error::Corrupt { path, reason: "damaged refs".into() }),
            None => Ok(None),
        }
    }

    fn get_manifest(&self, generation: u64, id: &str) -> Result<SealedManifest> {
        let key = self.0.key(&S3::manifest_key(generation, id));
        let path = PathBuf::from(format!("s3://{}/{key}", self.0.url.bucket));
        if !is_manifest_id(id) {
            return Err(Error::Corrupt { path, reason: "not a manifest id".into() });
        }
        let Some((bytes, _)) = self.0.get("read manifest", &key)? else {
            return Err(Error::Corrupt { path, reason: "the manifest is missing".into() });
        };
        if ChunkId::of(&bytes).to_hex() != id {
            return Err(Error::Corrupt { path, reason: "manifest bytes do not match its id".into() });
        }
        Ok(SealedManifest::from_bytes(&bytes)?)
    }

    fn remove_manifest(&self, generation: u64, id: &str) -> Result<()> {
        self.0.delete("remove manifest", &self.0.key(&S3::manifest_key(generation, id)))?;
        self.0.delete("remove manifest refs", &self.0.key(&S3::manifest_key(generation, &format!("{id}.refs"))))?;
        self.0.delete("remove profile", &self.0.key(&S3::manifest_key(generation, &format!("{id}.profile"))))
    }

    fn has_manifests(&self) -> Result<bool> {
        // Generation 0's manifests, then any generation's.
        for dir in ["manifests", "gen"] {
            let prefix = self.0.key(dir);
            self.0.requests.add(Op::List, &prefix);
            let found = self.0.rt().block_on(async {
                let mut stream = self.0.client.list(Some(&prefix));
                while let Some(meta) = stream.try_next().await.map_err(|e| self.0.error("list manifests", &prefix, e))? {
                    if meta.location.filename().is_some_and(is_manifest_id) {
                        return Ok(true);
                    }
                }
                Ok::<_, Error>(false)
            })?;
            if found {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn put_profile(&self, generation: u64, id: &str, sealed: &SealedManifest) -> Result<()> {
        self.0.overwrite("store profile", &self.0.key(&S3::manifest_key(generation, &format!("{id}.profile"))), Bytes::from(sealed.to_bytes()))
    }

    fn get_profile(&self, generation: u64, id: &str) -> Result<Option<SealedManifest>> {
        match self.0.get("read profile", &self.0.key(&S3::manifest_key(generation, &format!("{id}.profile"))))? {
            Some((bytes, _)) => Ok(Some(SealedManifest::from_bytes(&bytes)?)),
            None => Ok(None),
        }
    }

    fn set(&self, name: &str, r: &ImageRef) -> Result<Option<ImageRef>> {
        check_name(name)?;
        let key = self.name_key(name);
        let body = Bytes::from(serde_json::to_vec_pretty(r).expect("ref serialises"));
        for _ in 0..SET_TRIES {
            let current = self.0.get("read image name", &key)?;
            let mode = match &current {
                Some((_, etag)) => PutMode::Update(UpdateVersion { e_tag: etag.clone(), version: None }),
                None => PutMode::Create,
            };
            self.0.requests.add(Op::Put, &key);
            let put = self.0.rt().block_on(self.0.client.put_opts(&key, PutPayload::from(body.clone()), mode.into()));
            match put {
                Ok(_) => return Ok(current.and_then(|(b, _)| serde_json::from_slice(&b).ok())),
                // Another writer got there first: read again and retry.
                Err(object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. }) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(self.0.error("set image name", &key, e)),
            }
        }
        Err(self.0.error(
            "set image name",
            &key,
            object_store::Error::Generic { store: "S3", source: format!("{SET_TRIES} writers in a row changed it first").into() },
        ))
    }

    fn replace(&self, name: &str, expected: &ImageRef, new: &ImageRef) -> Result<bool> {
        check_name(name)?;
        let key = self.name_key(name);
        let Some((bytes, etag)) = self.0.get("read image name", &key)? else { return Ok(false) };
        if serde_json::from_slice::<ImageRef>(&bytes).ok().as_ref() != Some(expected) {
            return Ok(false);
        }
        let body = Bytes::from(serde_json::to_vec_pretty(new).expect("ref serialises"));
        self.0.requests.add(Op::Put, &key);
        let mode = PutMode::Update(UpdateVersion { e_tag: etag, version: None });
        match self.0.rt().block_on(self.0.client.put_opts(&key, PutPayload::from(body), mode.into())) {
            Ok(_) => Ok(true),
            Err(object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.0.error("set image name", &key, e)),
        }
    }

    fn get(&self, name: &str) -> Result<ImageRef> {
        check_name(name)?;
        let key = self.name_key(name);
        let Some((bytes, _)) = self.0.get("read image name", &key)? else { return Err(Error::NoSuchImage(name.to_owned())) };
        serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt { path: PathBuf::from(format!("s3://{}/{key}", self.0.url.bucket)), reason: e.to_string() })
    }

    fn remove(&self, name: &str) -> Result<Option<ImageRef>> {
        let r = match self.get(name) {
            Ok(r) => Some(r),
            Err(Error::Corrupt { .. }) => None,
            Err(e) => return Err(e),
        };
        self.0.delete("remove image name", &self.name_key(name))?;
        Ok(r)
    }

    fn scan(&self, each: &mut dyn FnMut(String, Result<ImageRef>)) -> Result<()> {
        // S3 lists keys in order; one page of names is held at a time.
        let mut names = Vec::new();
        let mut result = Ok(());
        self.0.list("list images", "images", &mut |rel, _| {
            if let Some(name) = rel.strip_suffix(".json").filter(|n| check_name(n).is_ok()) {
                names.push(name.to_owned());
                if names.len() >= 1000 {
                    for n in names.drain(..) {
                        match self.get(&n) {
                            Err(Error::NoSuchImage(_)) => {}
                            Err(e @ Error::Remote { .. }) if result.is_ok() => result = Err(e),
                            r => each(n, r),
                        }
                    }
                }
            }
        })?;
        for n in names {
            match self.get(&n) {
                Err(Error::NoSuchImage(_)) => {}
                Err(e @ Error::Remote { .. }) => return Err(e),
                r => each(n, r),
            }
        }
        result
    }

    fn describe(&self) -> String {
        format!("{} at {}", self.0.url, self.0.endpoint)
    }
}

/// Control documents in S3: compare-and-swap on the ETag.
pub struct S3Control(pub Arc<S3>);

impl Control for S3Control {
    fn read(&self, key: &str) -> Result<Option<(Bytes, Version)>> {
        crate::control::check_key(key)?;
        let k = self.0.key(key);
        Ok(self.0.get("read", &k)?.map(|(b, etag)| (b, Version(etag.unwrap_or_default()))))
    }

    fn write(&self, key: &str, bytes: &[u8], expected: Option<&Version>) -> Result<bool> {
        crate::control::check_key(key)?;
        let k = self.0.key(key);
        let mode = match expected {
            None => PutMode::Create,
            Some(v) => PutMode::Update(UpdateVersion { e_tag: Some(v.0.clone()), version: None }),
        };
        self.0.requests.add(Op::Put, &k);
        match self.0.rt().block_on(self.0.client.put_opts(&k, PutPayload::from(Bytes::copy_from_slice(bytes)), mode.into())) {
            Ok(_) => Ok(true),
            Err(object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.0.error("write", &k, e)),
        }
    }

    fn remove(&self, key: &str) -> Result<()> {
        crate::control::check_key(key)?;
        self.0.delete("remove", &self.0.key(key))
    }

    fn list(&self, dir: &str) -> Result<Vec<String>> {
        crate::control::check_key(dir)?;
        let mut out = Vec::new();
        self.0.list("list", dir, &mut |rel, _| out.push(rel.to_owned()))?;
        out.sort();
        Ok(out)
    }
}

/// Generations in S3: server-side copies, whole-prefix deletes.
pub struct S3Backend(pub Arc<S3>);

impl S3Backend {
    async fn copy(&self, id: &ChunkId, from: u64, to: u64) -> Result<()> {
        let (src, dst) = (self.0.key(&S3::chunk_key(from, id)), self.0.key(&S3::chunk_key(to, id)));
        self.0.requests.add(Op::Copy, &dst);
        // Same bytes under the same id: a copy over a racing put is harmless.
        match self.0.client.copy(&src, &dst).await {
            Ok(()) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => Err(Error::NotFound(*id)),
            Err(e) => Err(self.0.error("copy chunk", &src, e)),
        }
    }
}

impl Backend for S3Backend {
    fn open_chunks(&self, generation: u64) -> Arc<dyn ChunkStore> {
        Arc::new(S3ChunkStore::new(Arc::clone(&self.0), generation))
    }

    fn copy_chunk(&self, id: &ChunkId, from: u64, to: u64) -> Result<()> {
        self.0.rt().block_on(self.copy(id, from, to))
    }

    fn copy_chunks(&self, ids: &[ChunkId], from: u64, to: u64) -> Result<()> {
        self.0.rt().block_on(async {
            let mut copies = futures::stream::iter(ids.iter().map(|id| self.copy(id, from, to))).buffer_unordered(BATCH_IN_FLIGHT);
            while let Some(r) = copies.next().await {
                r?;
            }
            Ok(())
        })
    }

    fn delete_generation(&self, generation: u64) -> Result<Deleted> {
        let base = generation_base(generation);
        let mut out = Deleted::default();
        for dir in ["chunks", "manifests"] {
            let mut keys = Vec::new();
            self.0.list("list generation", &format!("{base}{dir}"), &mut |rel, size| {
                if dir == "chunks" {
                    out.chunks += 1;
                    out.bytes += size;
                } else {
                    out.others += 1;
                }
                keys.push(self.0.key(&format!("{base}{dir}/{rel}")));
            })?;
            while !keys.is_empty() {
                let batch: Vec<Key> = keys.drain(..keys.len().min(1000)).collect();
                let stream = futures::stream::iter(batch.into_iter().map(Ok)).boxed();
                self.0.requests.add(Op::Delete, &self.0.key(&format!("{base}{dir}")));
                self.0.rt().block_on(async {
                    let mut results = self.0.client.delete_stream(stream);
                    while let Some(r) = results.next().await {
                        match r {
                            Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                            Err(e) => return Err(self.0.error("delete generation", &self.0.key(&format!("{base}{dir}")), e)),
                        }
                    }
                    Ok(())
                })?;
            }
        }
        Ok(out)
    }

    fn generations(&self) -> Result<Vec<u64>> {
        let mut out = std::collections::BTreeSet::new();
        for dir in ["chunks", "manifests"] {
            let prefix = self.0.key(dir);
            self.0.requests.add(Op::List, &prefix);
            let any =
                self.0.rt().block_on(async { self.0.client.list(Some(&prefix)).try_next().await.map_err(|e| self.0.error("list generations", &prefix, e)) })?;
            if any.is_some() {
                out.insert(0);
            }
        }
        let prefix = self.0.key("gen");
        self.0.requests.add(Op::List, &prefix);
        let listed =
            self.0.rt().block_on(async { self.0.client.list_with_delimiter(Some(&prefix)).await.map_err(|e| self.0.error("list generations", &prefix, e)) })?;
        for p in listed.common_prefixes {
            if let Some(g) = p.filename().and_then(|n| n.parse::<u64>().ok()).filter(|&g| g > 0) {
                out.insert(g);
            }
        }
        Ok(out.into_iter().collect())
    }

    fn render(&self, out: &mut String) {
        self.0.render(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = S3Url::parse("s3://b", "my-bucket/some/prefix/?endpoint=http://127.0.0.1:9000&region=us-east-1").unwrap();
        assert_eq!(u.bucket, "my-bucket");
        assert_eq!(u.prefix, "some/prefix");
        assert_eq!(u.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(u.region.as_deref(), Some("us-east-1"));
        assert!(!u.virtual_hosted);
        assert_eq!(u.to_string(), "s3://my-bucket/some/prefix");
        assert!(S3Url::parse("x", "my-bucket?virtual_hosted=true").unwrap().virtual_hosted);
        assert_eq!(S3Url::parse("x", "my-bucket?timeout=2s").unwrap().timeout, Duration::from_secs(2));
        for bad in ["", "ab", "Upper", "b_b", "bucket?colour=red", "bucket?timeout=never"] {
            assert!(S3Url::parse("x", bad).is_err(), "{bad}");
        }
    }
}
