//! A cache node of the shared tier: it keeps stripes of sealed chunks for
//! the workers of a zone, so a cold worker reads from its neighbours'
//! cache instead of the origin.
//!
//! A [`CacheNode`] stores one opaque stripe per chunk id in memory and on
//! disk, each bounded and evicted by the same LRU-2 as the
//! worker's caches ([`tessera_cache::Lru2`], [`tessera_cache::DiskCache`]).
//! The disk copy is written to a temporary and renamed, carries a SHA-256
//! of the stripe, and is checked on every read from disk: a torn or
//! corrupted file is dropped and reported as a miss, never served. What the
//! disk holds is found again after a restart.
//!
//! [`serve`] answers `GET` and `PUT` on `/v1/stripes/CHUNK` over HTTP/1.1
//! or HTTP/2, in clear or over TLS, checking a bearer token when the node
//! has one;
//! stores buffer at most [`MAX_PUTS`] bodies at once, and connections that
//! stall are closed; [`CacheNode::render_metrics`] gives its metrics in
//! Prometheus text (served by [`tessera_cache::metrics::serve`]). The
//! node never sees a chunk key, only ciphertext cut in stripes
//! ([`tessera_cache::tier::wire`]).
#![deny(missing_docs)]

use std::fmt::Write as _;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioExecutor;
use ring::digest::{digest, SHA256};
use tessera_cache::metrics::{counters, header, Histogram};
use tessera_cache::server::SLOW_CLIENT;
use tessera_cache::tier::wire::{self, MAX_STRIPE};
use tessera_cache::{DiskCache, Lru2, CORRELATED};
use tessera_chunk::ChunkId;
use tokio::net::TcpListener;

/// Bytes of the checksum in front of each stripe on disk.
const SUM_LEN: usize = 32;

/// Connections a node keeps (each agent of the zone needs one).
pub const MAX_CONNECTIONS: usize = 4096;

/// Stores whose bodies may be buffered at once (each at most
/// [`MAX_STRIPE`]); more wait for a turn.
pub const MAX_PUTS: usize = 64;

/// Errors of a cache node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Its directory cannot be used.
    #[error("cache directory {dir}: {source}")]
    Dir {
        /// The directory.
        dir: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A stripe could not be kept on disk.
    #[error("cannot keep the stripe of chunk {chunk} on disk: {source}")]
    Store {
        /// The chunk.
        chunk: ChunkId,
        /// Why.
        source: std::io::Error,
    },
}

/// Bounds and secrets of a node.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// Bytes of stripes kept in memory.
    pub memory_bytes: u64,
    /// Bytes of stripes kept on disk.
    pub disk_bytes: u64,
    /// The bearer token every request must carry, if any.
    pub token: Option<String>,
}

/// The stripes a node keeps, and its counters.
pub struct CacheNode {
    memory: Mutex<Lru2<ChunkId, Bytes>>,
    disk: DiskCache,
    puts: tokio::sync::Semaphore,
    options: NodeOptions,
    stats: NodeStats,
}

#[derive(Default)]
struct NodeStats {
    memory_hits: AtomicU64,
    disk_hits: AtomicU64,
    misses: AtomicU64,
    stores: AtomicU64,
    unauthorized: AtomicU64,
    bad_requests: AtomicU64,
    corrupt: AtomicU64,
    disk_errors: AtomicU64,
    bytes_out: AtomicU64,
    bytes_in: AtomicU64,
    memory_evictions: AtomicU64,
    get_latency: Histogram,
    put_latency: Histogram,
}

impl CacheNode {
    /// Opens the node's disk cache in `dir` (finding what a previous run kept).
    pub fn open(dir: &Path, options: NodeOptions) -> Result<CacheNode, Error> {
        let stripes = dir.join("stripes");
        let disk = DiskCache::open(&stripes, options.disk_bytes).map_err(|source| Error::Dir { dir: stripes, source })?;
        Ok(CacheNode {
            memory: Mutex::new(Lru2::new(options.memory_bytes, 4096, CORRELATED)),
            disk,
            puts: tokio::sync::Semaphore::new(MAX_PUTS),
            options,
            stats: NodeStats::default(),
        })
    }

    /// Stripes kept on disk.
    pub fn disk_stripes(&self) -> usize {
        self.disk.len()
    }

    fn remember(&self, key: ChunkId, stripe: Bytes) {
        let len = stripe.len() as u64;
        let evicted = self.memory.lock().expect("no panics while holding the lock").insert(key, stripe, len);
        let evicted = evicted.iter().filter(|(k, _)| *k != key).count();
        self.stats.memory_evictions.fetch_add(evicted as u64, Ordering::Relaxed);
    }

    /// The stripe of chunk `key`, from memory or disk.
    pub async fn get(self: &Arc<Self>, key: ChunkId) -> Option<Bytes> {
        if let Some(s) = self.memory.lock().expect("no panics while holding the lock").get(&key).cloned() {
            self.stats.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Some(s);
        }
        if !self.disk.contains(&key) {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let me = Arc::clone(self);
        let found = tokio::task::spawn_blocking(move || me.read_disk(key)).await.ok().flatten();
        match &found {
            Some(s) => {
                self.stats.disk_hits.fetch_add(1, Ordering::Relaxed);
                self.remember(key, s.clone());
            }
            None => {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
            }
        }
        found
    }

    /// Reads and checks a stripe on disk; drops it if it is damaged.
    fn read_disk(&self, key: ChunkId) -> Option<Bytes> {
        let bytes = match self.disk.get(&key) {
            Ok(Some(b)) => b,
            Ok(None) => return None,
            Err(e) => {
                self.stats.disk_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!("{e}");
                return None;
            }
        };
        if bytes.len() < SUM_LEN || digest(&SHA256, &bytes[SUM_LEN..]).as_ref() != &bytes[..SUM_LEN] {
            self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("the stripe of chunk {key} is corrupt on disk; dropped");
            self.disk.remove(&key);
            return None;
        }
        // The stripe without its checksum, without a copy.
        Some(bytes.slice(SUM_LEN..))
    }

    /// Keeps `stripe` as chunk `key`'s, on disk and then in memory. A
    /// stripe that cannot be kept on disk is not kept at all (and an older
    /// one is dropped), so the node says one thing: stored, or not.
    pub async fn put(self: &Arc<Self>, key: ChunkId, stripe: Bytes) -> Result<(), Error> {
        let me = Arc::clone(self);
        let on_disk = stripe.clone();
        let written = tokio::task::spawn_blocking(move || {
            let mut file = Vec::with_capacity(SUM_LEN + on_disk.len());
            file.extend_from_slice(digest(&SHA256, &on_disk).as_ref());
            file.extend_from_slice(&on_disk);
            me.disk.insert(&key, &file)
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        if let Err(source) = written {
            self.stats.disk_errors.fetch_add(1, Ordering::Relaxed);
            self.memory.lock().expect("no panics while holding the lock").remove(&key);
            self.disk.remove(&key);
            return Err(Error::Store { chunk: key, source });
        }
        self.remember(key, stripe);
        self.stats.stores.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        self.options.token.as_deref().is_none_or(|token| tessera_cache::server::bearer_matches(req.headers(), token))
    }

    /// Answers one request on the stripe port.
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let started = Instant::now();
        if !self.authorized(&req) {
            self.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
            let mut r = text(StatusCode::UNAUTHORIZED, "a valid bearer token is required\n");
            r.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"tessera-cachenode\""));
            return r;
        }
        let Some(key) = wire::chunk_of(req.uri().path()) else {
            self.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            return text(StatusCode::NOT_FOUND, "no such path; stripes live at /v1/stripes/CHUNK\n");
        };
        match *req.method() {
            Method::GET => {
                let r = match self.get(key).await {
                    Some(s) => {
                        self.stats.bytes_out.fetch_add(s.len() as u64, Ordering::Relaxed);
                        Response::new(Full::new(s))
                    }
                    None => text(StatusCode::NOT_FOUND, "stripe not cached\n"),
                };
                self.stats.get_latency.observe(started.elapsed());
                r
            }
            Method::PUT => {
                let _turn = self.puts.acquire().await.expect("the semaphore is never closed");
                let body = match tokio::time::timeout(SLOW_CLIENT, Limited::new(req.into_body(), MAX_STRIPE).collect()).await {
                    Ok(Ok(b)) => b.to_bytes(),
                    Err(_) => {
                        self.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                        return text(StatusCode::REQUEST_TIMEOUT, "the stripe took too long to arrive\n");
                    }
                    Ok(Err(e)) => {
                        self.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                        return if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                            text(StatusCode::PAYLOAD_TOO_LARGE, &format!("a stripe is at most {MAX_STRIPE} bytes\n"))
                        } else {
                            text(StatusCode::BAD_REQUEST, &format!("reading the stripe: {e}\n"))
                        };
                    }
                };
                self.stats.bytes_in.fetch_add(body.len() as u64, Ordering::Relaxed);
                if let Err(why) = wire::StripeHeader::check(&body) {
                    self.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                    return text(StatusCode::BAD_REQUEST, &format!("not a stripe: {why}\n"));
                }
                let r = match self.put(key, body).await {
                    Ok(()) => text(StatusCode::NO_CONTENT, ""),
                    Err(e) => text(StatusCode::INSUFFICIENT_STORAGE, &format!("{e}\n")),
                };
                self.stats.put_latency.observe(started.elapsed());
                r
            }
            _ => {
                self.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "stripes take GET and PUT\n");
                r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, PUT"));
                r
            }
        }
    }

    /// The node's metrics in Prometheus text.
    pub fn render_metrics(&self) -> String {
        let s = &self.stats;
        let mut out = String::new();
        let load = |v: &AtomicU64| v.load(Ordering::Relaxed);
        header(&mut out, "tessera_cachenode_hits_total", "counter", "Stripes served, by the cache that had them.");
        let _ = writeln!(out, "tessera_cachenode_hits_total{{cache=\"memory\"}} {}", load(&s.memory_hits));
        let _ = writeln!(out, "tessera_cachenode_hits_total{{cache=\"disk\"}} {}", load(&s.disk_hits));
        counters(
            &mut out,
            &[
                ("tessera_cachenode_misses_total", "Stripes asked for and not held.", &s.misses),
                ("tessera_cachenode_stores_total", "Stripes stored.", &s.stores),
                ("tessera_cachenode_unauthorized_total", "Requests refused for a missing or wrong token.", &s.unauthorized),
                ("tessera_cachenode_bad_requests_total", "Requests for an unknown path or method, or with a bad body.", &s.bad_requests),
                ("tessera_cachenode_corrupt_total", "Stripes found corrupt on disk and dropped.", &s.corrupt),
                ("tessera_cachenode_disk_errors_total", "Stripes that could not be read from or written to disk.", &s.disk_errors),
            ],
        );
        header(&mut out, "tessera_cachenode_bytes_total", "counter", "Stripe bytes sent and received.");
        let _ = writeln!(out, "tessera_cachenode_bytes_total{{direction=\"out\"}} {}", load(&s.bytes_out));
        let _ = writeln!(out, "tessera_cachenode_bytes_total{{direction=\"in\"}} {}", load(&s.bytes_in));
        let (mem_used, mem_len) = {
            let m = self.memory.lock().expect("no panics while holding the lock");
            (m.used(), m.len())
        };
        header(&mut out, "tessera_cachenode_evictions_total", "counter", "Stripes evicted, by cache.");
        let _ = writeln!(out, "tessera_cachenode_evictions_total{{cache=\"memory\"}} {}", load(&s.memory_evictions));
        let _ = writeln!(out, "tessera_cachenode_evictions_total{{cache=\"disk\"}} {}", self.disk.evictions());
        header(&mut out, "tessera_cachenode_stored_bytes", "gauge", "Bytes held, by cache.");
        let _ = writeln!(out, "tessera_cachenode_stored_bytes{{cache=\"memory\"}} {mem_used}");
        let _ = writeln!(out, "tessera_cachenode_stored_bytes{{cache=\"disk\"}} {}", self.disk.used());
        header(&mut out, "tessera_cachenode_capacity_bytes", "gauge", "Bound of each cache.");
        let _ = writeln!(out, "tessera_cachenode_capacity_bytes{{cache=\"memory\"}} {}", self.options.memory_bytes);
        let _ = writeln!(out, "tessera_cachenode_capacity_bytes{{cache=\"disk\"}} {}", self.options.disk_bytes);
        header(&mut out, "tessera_cachenode_stripes", "gauge", "Stripes held, by cache.");
        let _ = writeln!(out, "tessera_cachenode_stripes{{cache=\"memory\"}} {mem_len}");
        let _ = writeln!(out, "tessera_cachenode_stripes{{cache=\"disk\"}} {}", self.disk.len());
        header(&mut out, "tessera_cachenode_request_seconds", "histogram", "Time to answer a stripe request, by operation.");
        s.get_latency.render(&mut out, "tessera_cachenode_request_seconds", "op=\"get\"");
        s.put_latency.render(&mut out, "tessera_cachenode_request_seconds", "op=\"put\"");
        out
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// Serves stripes on `listener`, over HTTP/1.1 or HTTP/2, until `shutdown`
/// completes.
///
/// With `tls`, every connection is TLS (ALPN `h2` or `http/1.1`); a client
/// that does not finish its TLS handshake within 30 s is dropped.
pub async fn serve(node: Arc<CacheNode>, listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>, shutdown: impl Future<Output = ()>) {
    let tune = |h2: &mut hyper_util::server::conn::auto::Http2Builder<'_, TokioExecutor>| {
        // A peer that stops answering pings is gone: free its connection.
        h2.keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(64 << 20)
            .max_frame_size(256 << 10)
            .max_concurrent_streams(256)
            // Clients cancel the stripes they no longer need (k others came
            // first): many resets are normal here, not an attack.
            .max_pending_accept_reset_streams(1024);
    };
    tessera_cache::server::serve_http(&listener, tls, MAX_CONNECTIONS, tune, shutdown, move |req| {
        let node = Arc::clone(&node);
        async move { node.handle(req).await }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u8) -> ChunkId {
        ChunkId([i; 32])
    }

    /// A well-formed stripe (1+0 code) of 1000 bytes of `i`.
    fn stripe(i: u8) -> Bytes {
        Bytes::from(wire::StripeHeader { k: 1, m: 0, index: 0, chunk_len: 1000 }.wrap(&[i; 1000]))
    }

    #[tokio::test]
    async fn stripes_survive_a_restart_and_corruption_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let options = NodeOptions { memory_bytes: 1 << 20, disk_bytes: 1 << 20, token: None };
        let node = Arc::new(CacheNode::open(dir.path(), options.clone()).unwrap());
        for i in 0..4 {
            node.put(key(i), stripe(i)).await.unwrap();
        }
        assert_eq!(node.get(key(2)).await, Some(stripe(2)));
        assert_eq!(node.get(key(9)).await, None);
        drop(node);
        let node = Arc::new(CacheNode::open(dir.path(), options.clone()).unwrap());
        assert_eq!(node.disk_stripes(), 4);
        assert_eq!(node.get(key(3)).await, Some(stripe(3)));
        // Damage one stripe's file: it is dropped, not served.
        let name = key(1).to_hex();
        let path = dir.path().join("stripes").join(&name[..2]).join(&name);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[SUM_LEN + 7] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(node.get(key(1)).await, None);
        assert_eq!(node.stats.corrupt.load(Ordering::Relaxed), 1);
        assert!(!path.exists());
        assert!(node.render_metrics().contains("tessera_cachenode_corrupt_total 1"));
    }

    #[tokio::test]
    async fn memory_and_disk_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let node = Arc::new(CacheNode::open(dir.path(), NodeOptions { memory_bytes: 10_000, disk_bytes: 20_000, token: None }).unwrap());
        for i in 0..40 {
            node.put(key(i), stripe(i)).await.unwrap();
        }
        let m = node.render_metrics();
        let stored = |cache: &str| -> u64 {
            let prefix = format!("tessera_cachenode_stored_bytes{{cache=\"{cache}\"}} ");
            m.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap().parse().unwrap()
        };
        assert!(stored("memory") <= 10_000 && stored("memory") > 0, "{m}");
        assert!(stored("disk") <= 20_000 && stored("disk") > 0, "{m}");
    }
}
