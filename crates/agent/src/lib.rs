//! The worker agent: every imported image, served as a lazy block device.
//!
//! An [`Agent`] exports each image of a `TESSERA_HOME` over NBD (TCP or unix
//! sockets): `NAME` read-only, `NAME@LABEL` a copy-on-write view whose
//! writes land in an [`overlay::Overlay`] of its own. Reads map to 512 KiB
//! chunks ([`vdisk::VirtualDisk`]), fetched on first touch through a
//! [`tessera_cache::Loader`] (memory, disk, the shared cache tier when one
//! is configured, origin) and checked before they
//! are served. Metrics are served in Prometheus text at `/metrics`.
#![deny(missing_docs)]

pub mod client;
pub mod exports;
pub mod fuse;
pub mod nbd;
pub mod overlay;
pub mod vdisk;

use std::fmt::Write;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tessera_cache::metrics::header;
use tessera_cache::tier::{CacheTier, TierOptions};
use tessera_cache::{ChunkSource, DiskCache, Loader, LoaderOptions, Origin};
use tessera_store::{Home, LocalDirStore, ThrottledStore};
use tokio::net::{TcpListener, UnixListener};

use crate::exports::CatalogExports;
use crate::nbd::{Exports, NbdStats};

/// Where the NBD server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// `unix:PATH`.
    Unix(PathBuf),
    /// `HOST:PORT`.
    Tcp(String),
}

impl Listen {
    /// Parses `unix:PATH` or `HOST:PORT`.
    pub fn parse(s: &str) -> Result<Listen, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(Listen::Unix(p.into()));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(Listen::Tcp(s.to_owned())),
            _ => Err(format!("{s:?}: use unix:PATH or HOST:PORT")),
        }
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => f.write_str(a),
        }
    }
}

/// How to run an agent.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// NBD listeners.
    pub nbd: Vec<Listen>,
    /// Where to serve `/metrics`.
    pub metrics: Option<String>,
    /// Disk cache and overlays live here.
    pub cache_dir: PathBuf,
    /// Bytes of plaintext chunks kept in memory.
    pub cache_mem: u64,
    /// Bytes of sealed chunks kept on disk.
    pub cache_disk: u64,
    /// Origin requests allowed at once.
    pub origin_concurrency: usize,
    /// Origin requests allowed to wait for a slot; more are refused.
    pub origin_queue: usize,
    /// Latency added to each origin request (for benchmarks: a remote origin).
    pub origin_latency: std::time::Duration,
    /// Bandwidth of the link to the origin, bytes/s (for benchmarks).
    pub origin_bandwidth: Option<u64>,
    /// The shared cache tier between the disk cache and the origin, if any.
    pub tier: Option<TierOptions>,
}

/// A running worker agent.
pub struct Agent {
    options: AgentOptions,
    /// The exports.
    pub exports: Arc<CatalogExports>,
    /// The tier chain.
    pub loader: Arc<Loader>,
    origin: Arc<Origin>,
    stats: Arc<NbdStats>,
}

impl Agent {
    /// Opens the caches and the origin of `home`.
    pub fn new(home: Home, options: AgentOptions) -> std::io::Result<Agent> {
        let disk = Arc::new(DiskCache::open(&options.cache_dir.join("chunks"), options.cache_disk)?);
        let store: Arc<dyn tessera_store::ChunkStore> =
            Arc::new(LocalDirStore::open(&home.root().join("chunks")).map_err(std::io::Error::other)?);
        let store: Arc<dyn tessera_store::ChunkStore> = if options.origin_latency.is_zero() && options.origin_bandwidth.is_none() {
            store
        } else {
            Arc::new(ThrottledStore::new(store, options.origin_latency, options.origin_bandwidth))
        };
        let origin = Arc::new(Origin::new(store, options.origin_concurrency, options.origin_queue));
        let mut lower: Vec<Arc<dyn ChunkSource>> = Vec::new();
        if let Some(t) = &options.tier {
            lower.push(Arc::new(CacheTier::new(t.clone()).map_err(std::io::Error::other)?));
        }
        lower.push(Arc::clone(&origin) as Arc<dyn ChunkSource>);
        let loader = Arc::new(Loader::new(LoaderOptions { memory_bytes: options.cache_mem }, Some(disk), lower));
        let exports = Arc::new(CatalogExports::new(Arc::new(home), Arc::clone(&loader), options.cache_dir.join("overlays")));
        Ok(Agent { options, exports, loader, origin, stats: Arc::new(NbdStats::default()) })
    }

    /// All metrics, in Prometheus text.
    pub fn render_metrics(&self) -> String {
        let mut out = String::new();
        self.loader.render(&mut out);
        header(&mut out, "tessera_origin_requests_in_flight", "gauge", "Requests to the origin store in flight now.");
        let _ = writeln!(out, "tessera_origin_requests_in_flight {}", self.origin.in_flight.load(Ordering::Relaxed));
        header(&mut out, "tessera_origin_requests_in_flight_peak", "gauge", "The most requests to the origin store ever in flight at once.");
        let _ = writeln!(out, "tessera_origin_requests_in_flight_peak {}", self.origin.peak_in_flight.load(Ordering::Relaxed));
        header(&mut out, "tessera_origin_requests_total", "counter", "Requests to the origin store.");
        let _ = writeln!(out, "tessera_origin_requests_total {}", self.origin.requests.load(Ordering::Relaxed));
        header(&mut out, "tessera_origin_requests_shed_total", "counter", "Origin requests refused because the queue was full.");
        let _ = writeln!(out, "tessera_origin_requests_shed_total {}", self.origin.shed.load(Ordering::Relaxed));
        self.stats.render(&mut out);
        out
    }

    /// Listens and serves until `shutdown` completes; then flushes overlays
    /// and removes its unix sockets.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
        let mut tasks = Vec::new();
        let mut sockets = Vec::new();
        for l in &self.options.nbd {
            match l {
                Listen::Unix(path) => {
                    if let Some(dir) = path.parent() {
                        std::fs::create_dir_all(dir)?;
                    }
                    // A socket left by an agent that died is in the way.
                    if std::os::unix::net::UnixStream::connect(path).is_err() {
                        let _ = std::fs::remove_file(path);
                    }
                    let listener = UnixListener::bind(path).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
                    sockets.push(path.clone());
                    let (exports, stats) = (self.exports.clone() as Arc<dyn Exports>, self.stats.clone());
                    tasks.push(tokio::spawn(async move {
                        loop {
                            if let Ok((s, _)) = listener.accept().await {
                                tokio::spawn(nbd::serve_connection(s, exports.clone(), stats.clone(), "unix socket".into()));
                            }
                        }
                    }));
                }
                Listen::Tcp(addr) => {
                    let listener = TcpListener::bind(addr).await.map_err(|e| std::io::Error::new(e.kind(), format!("{addr}: {e}")))?;
                    let (exports, stats) = (self.exports.clone() as Arc<dyn Exports>, self.stats.clone());
                    tasks.push(tokio::spawn(async move {
                        loop {
                            if let Ok((s, peer)) = listener.accept().await {
                                let _ = s.set_nodelay(true);
                                tokio::spawn(nbd::serve_connection(s, exports.clone(), stats.clone(), peer.to_string()));
                            }
                        }
                    }));
                }
            }
        }
        if let Some(addr) = &self.options.metrics {
            let listener = TcpListener::bind(addr).await.map_err(|e| std::io::Error::new(e.kind(), format!("metrics {addr}: {e}")))?;
            let me = Arc::clone(&self);
            tasks.push(tokio::spawn(tessera_cache::metrics::serve(listener, Arc::new(move || me.render_metrics()))));
        }
        shutdown.await;
        for t in tasks {
            t.abort();
        }
        self.exports.flush_all();
        // Waiting for the caches to be written sleeps: not on a worker thread.
        let loader = Arc::clone(&self.loader);
        let _ = tokio::task::spawn_blocking(move || loader.drain()).await;
        for s in sockets {
            let _ = std::fs::remove_file(s);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(Listen::parse("unix:/run/x.sock").unwrap(), Listen::Unix("/run/x.sock".into()));
        assert_eq!(Listen::parse("127.0.0.1:10809").unwrap(), Listen::Tcp("127.0.0.1:10809".into()));
        assert_eq!(Listen::parse("[::1]:10809").unwrap(), Listen::Tcp("[::1]:10809".into()));
        for bad in ["unix:", "10809", "host:port", ":1"] {
            assert!(Listen::parse(bad).is_err(), "{bad}");
        }
    }
}
