//! The worker agent: every image of a store, served as a lazy block device.
//!
//! An [`Agent`] serves each image through its frontends ([`Frontend`]):
//! NBD over TCP or unix sockets ([`nbd`]), and one image at a time as a
//! FUSE file ([`fuse`]). Export `NAME` is read-only; `NAME@LABEL` is a
//! copy-on-write view whose writes land in an [`overlay::Overlay`] of its
//! own. Every frontend serves the same [`device::Device`] seam, looked up in
//! [`device::Exports`] ([`exports::CatalogExports`]: the store's catalog).
//!
//! Reads map to 512 KiB chunks ([`vdisk::VirtualDisk`]), fetched on first
//! touch through a [`tessera_cache::Loader`] whose sources are, in order,
//! the disk cache, the agent's parent in the function's tree (when in
//! function trees: [`TreeOptions`]), the shared cache tier (when
//! configured) and the origin store, and checked before they are served. [`profile`] records and
//! prefetches start-up profiles. Metrics are served in Prometheus text at
//! `/metrics`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tessera_agent::Error> {
//! use std::sync::Arc;
//! use tessera_agent::{Agent, AgentOptions, Frontend, Listen};
//! let home = tessera_store::Home::open("/var/lib/tessera".as_ref())?;
//! let mut options = AgentOptions::new(home.root().join("cache"));
//! options.frontends.push(Frontend::Nbd(Listen::parse("unix:/run/tessera.sock")?));
//! let agent = Arc::new(Agent::new(home, options)?);
//! agent.run(|bound| println!("serving on {:?}", bound.nbd), std::future::pending()).await
//! # }
//! ```
#![deny(missing_docs)]

mod attach;
mod background;
pub mod control;
pub mod device;
pub mod exports;
pub mod fuse;
pub mod nbd;
pub mod overlay;
pub mod policy;
pub mod profile;
pub mod vdisk;
pub mod vhost;
pub mod virtio_blk;

use std::fmt::Write;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tessera_cache::metrics::header;
use tessera_cache::peer::{PeerOptions, PeerSource};
use tessera_cache::tier::{CacheTier, TierError, TierOptions};
use tessera_cache::{ChunkSource, DiskCache, Loader, LoaderOptions, Origin};
use tessera_store::{Home, ThrottledStore};
use tokio::net::{TcpListener, UnixListener};

pub use crate::attach::{take_over, Inherited};
pub use crate::background::Background;
use crate::device::Exports;
use crate::exports::CatalogExports;
use crate::nbd::{Limits, Server};

/// Errors of starting and running an agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The cache directory cannot be used.
    #[error("--cache-dir {dir}: {reason}; give a directory of its own")]
    CacheDir {
        /// The directory.
        dir: PathBuf,
        /// Why not.
        reason: String,
    },
    /// The disk cache could not be opened.
    #[error("disk cache {dir}: {source}")]
    DiskCache {
        /// Its directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The cache tier could not be set up.
    #[error(transparent)]
    Tier(#[from] TierError),
    /// A listener could not be bound.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not a listen address.
    #[error("{0:?}: use unix:PATH or HOST:PORT")]
    BadAddress(String),
    /// Images in clear on a network address.
    #[error("refusing to serve NBD in clear on {0} (anyone who can reach it could read every image): give --tls-cert and --tls-key, or --allow-plaintext-nbd if this network is trusted")]
    Plaintext(String),
    /// The TLS configuration cannot be used.
    #[error(transparent)]
    Tls(#[from] tessera_cache::tls::TlsError),
    /// The exports policy cannot be used.
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
    /// An exports policy needs clients that say who they are.
    #[error("--exports-policy needs --tls-client-ca: without client certificates no client can be told apart")]
    PolicyWithoutClientCa,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] tessera_store::Error),
    /// A disk could not be attached to a VM, or detached.
    #[error("{0}")]
    Attach(String),
    /// Function trees cannot be set up.
    #[error("{0}")]
    Tree(String),
    /// The peer tier cannot be set up.
    #[error(transparent)]
    Peer(#[from] tessera_cache::peer::PeerError),
}

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
    pub fn parse(s: &str) -> Result<Listen, Error> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(Error::BadAddress(s.to_owned()));
            }
            return Ok(Listen::Unix(p.into()));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(Listen::Tcp(s.to_owned())),
            _ => Err(Error::BadAddress(s.to_owned())),
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

/// A way the agent serves its exports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frontend {
    /// NBD on a listener.
    Nbd(Listen),
}

/// How to run an agent.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// The frontends to serve.
    pub frontends: Vec<Frontend>,
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
    /// What NBD clients may make the agent hold.
    pub limits: Limits,
    /// `NAME@LABEL` overlays open at once.
    pub max_overlays: usize,
    /// Prefetch an image's start-up profile when it is first opened.
    pub prefetch: bool,
    /// TLS of the NBD TCP listeners.
    pub tls: Option<NbdTls>,
    /// Serve NBD in clear on addresses other than loopback.
    pub allow_plaintext_nbd: bool,
    /// Serve vhost-user-blk devices, with their sockets in this directory.
    pub vhost_user: Option<PathBuf>,
    /// Serve the control socket here (attach and detach VM disks, hand over).
    pub control: Option<PathBuf>,
    /// Take part in function trees: read from a parent agent first, serve children.
    pub tree: Option<TreeOptions>,
    /// The function every image is read for (`tessera run --function`);
    /// `None`: each image is a function of its own.
    pub function: Option<String>,
}

/// How an agent takes part in function trees (FaaSNet).
#[derive(Clone, Debug)]
pub struct TreeOptions {
    /// The tree manager, `HOST:PORT`.
    pub manager: String,
    /// Where to serve chunks to children, `HOST:PORT` (port 0: one the system picks).
    pub listen: String,
    /// The address children reach this agent at (default: the one bound).
    pub advertise: Option<String>,
    /// The bearer token of the manager and of every agent's peer server.
    pub token: Option<String>,
    /// Trust this CA (PEM) for the manager and parents: talk TLS to them.
    pub tls_ca: Option<PathBuf>,
    /// Serve children over TLS with this certificate chain and key (PEM).
    pub tls_cert: Option<(PathBuf, PathBuf)>,
}

/// Sealed chunks kept in memory for children (see `Loader::with_forwarding`).
pub const FORWARD_BYTES: u64 = 128 << 20;

/// The TLS of the NBD TCP listeners (unix sockets stay local and clear).
#[derive(Clone, Debug)]
pub struct NbdTls {
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its key (PEM).
    pub key: PathBuf,
    /// Clients must present a certificate signed by this CA (PEM).
    pub client_ca: Option<PathBuf>,
    /// Which client (certificate subject) may open which exports.
    pub policy: Option<PathBuf>,
}

impl AgentOptions {
    /// The defaults (those of `tessera serve`), caching in `cache_dir`, with
    /// no frontend.
    pub fn new(cache_dir: PathBuf) -> AgentOptions {
        AgentOptions {
            frontends: Vec::new(),
            metrics: None,
            cache_dir,
            cache_mem: 512 << 20,
            cache_disk: 10 << 30,
            origin_concurrency: 16,
            origin_queue: 256,
            origin_latency: std::time::Duration::ZERO,
            origin_bandwidth: None,
            tier: None,
            limits: Limits::default(),
            max_overlays: 1024,
            prefetch: false,
            tls: None,
            allow_plaintext_nbd: false,
            vhost_user: None,
            control: None,
            tree: None,
            function: None,
        }
    }
}

/// Where a running agent listens (TCP ports as bound: port 0 in the
/// options is a port the system picked).
#[derive(Clone, Debug, Default)]
pub struct Bound {
    /// NBD listeners: `unix:PATH` or `HOST:PORT`.
    pub nbd: Vec<String>,
    /// The metrics endpoint, `HOST:PORT`.
    pub metrics: Option<String>,
    /// Where children in function trees read from, `HOST:PORT` (as advertised).
    pub peer: Option<String>,
}

/// A running worker agent.
pub struct Agent {
    options: AgentOptions,
    tls: Option<Arc<nbd::Tls>>,
    /// The exports.
    pub exports: Arc<CatalogExports>,
    /// The tier chain.
    pub loader: Arc<Loader>,
    /// The NBD server (its bounds and counters).
    pub nbd: Arc<Server>,
    /// The vhost-user-blk devices, if served.
    pub vhost: Option<Arc<vhost::VhostUser>>,
    attachments: std::sync::Mutex<std::collections::HashMap<String, attach::Attachment>>,
    /// The listeners bound (address, descriptor), for a handover.
    listener_fds: std::sync::Mutex<Vec<(String, std::os::fd::RawFd)>>,
    /// Listeners handed over by the agent this one took over from.
    inherited: std::sync::Mutex<Option<attach::Inherited>>,
    /// Told when the agent handed itself over and must stop.
    handed_over: Arc<tokio::sync::Notify>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
    /// Set while the listeners are being handed to a successor: attaches
    /// are refused.
    handing_over: std::sync::atomic::AtomicBool,
    /// Function trees: the options, the peer tier, and how children are served.
    tree: Option<(TreeOptions, Arc<PeerSource>, tessera_cache::peer::ServeOptions)>,
}

impl Agent {
    /// Opens the caches and the origin of `home`'s store, and builds the
    /// chain of chunk sources: disk cache, cache tier, origin.
    pub fn new(home: Home, options: AgentOptions) -> Result<Agent, Error> {
        check_cache_dir(home.root(), &options.cache_dir)?;
        // Say at once what cannot be served, rather than at each client's LIST.
        let listing = home.catalog.list()?;
        for (name, e) in &listing.bad {
            tracing::warn!("not exporting image {name}: {e}");
        }
        if !listing.images.is_empty() {
            home.keyring()?;
        }
        let chunk_cache = options.cache_dir.join("chunks");
        let disk_err = |source| Error::DiskCache { dir: chunk_cache.clone(), source };
        if options.cache_dir == home.root().join("cache") && DiskCache::adopt_unmarked(&chunk_cache).map_err(disk_err)? {
            tracing::info!("adopted the disk cache of an earlier release in {}", chunk_cache.display());
        }
        let mut sources: Vec<Arc<dyn ChunkSource>> = vec![Arc::new(DiskCache::open(&chunk_cache, options.cache_disk).map_err(disk_err)?)];
        let tree = match &options.tree {
            Some(t) => {
                let serve = serve_children_options(t)?;
                let peer = PeerOptions { manager: t.manager.clone(), advertise: t.advertise.clone(), token: t.token.clone(), tls_ca: t.tls_ca.clone() };
                let source = Arc::new(PeerSource::new(peer)?);
                sources.push(source.clone());
                Some((t.clone(), source, serve))
            }
            None => None,
        };
        if let Some(t) = &options.tier {
            sources.push(Arc::new(CacheTier::new(t.clone())?));
        }
        let wrap: Option<tessera_cache::OriginWrap> = if options.origin_latency.is_zero() && options.origin_bandwidth.is_none() {
            None
        } else {
            let (latency, bandwidth) = (options.origin_latency, options.origin_bandwidth);
            Some(Box::new(move |s| Arc::new(ThrottledStore::new(s, latency, bandwidth)) as Arc<dyn tessera_store::ChunkStore>))
        };
        sources.push(Arc::new(Origin::of_store(home.store().clone(), wrap, options.origin_concurrency, options.origin_queue)));
        let forward = if tree.is_some() { FORWARD_BYTES } else { 0 };
        let loader = Arc::new(Loader::new(LoaderOptions { memory_bytes: options.cache_mem }, sources).with_forwarding(forward));
        let mut exports = CatalogExports::new(Arc::new(home), Arc::clone(&loader), options.cache_dir.join("overlays"), options.max_overlays);
        exports.prefetch_profiles(options.prefetch);
        exports.read_for(options.function.as_deref());
        let exports = Arc::new(exports);
        let nbd = Arc::new(Server::new(exports.clone() as Arc<dyn Exports>, options.limits.clone()));
        let tls = match &options.tls {
            None => None,
            Some(t) => {
                if t.policy.is_some() && t.client_ca.is_none() {
                    return Err(Error::PolicyWithoutClientCa);
                }
                let config = tessera_cache::tls::server_config(&t.cert, &t.key, t.client_ca.as_deref(), &[])?;
                let policy = t.policy.as_deref().map(policy::ExportsPolicy::load).transpose()?.map(Arc::new);
                Some(Arc::new(nbd::Tls { config, policy }))
            }
        };
        let vhost = match &options.vhost_user {
            Some(dir) => Some(Arc::new(
                vhost::VhostUser::new(dir, exports.clone() as Arc<dyn Exports>)
                    .map_err(|source| Error::Listen { addr: format!("vhost-user {}", dir.display()), source })?,
            )),
            None => None,
        };
        Ok(Agent {
            options,
            tls,
            exports,
            loader,
            nbd,
            vhost,
            attachments: Default::default(),
            listener_fds: Default::default(),
            inherited: Default::default(),
            handed_over: Arc::new(tokio::sync::Notify::new()),
            stopping: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            handing_over: std::sync::atomic::AtomicBool::new(false),
            tree,
        })
    }

    /// Serves, from [`Agent::run`] on, on the listeners handed over by the
    /// agent this one takes over from ([`take_over`]).
    pub fn inherit(&self, inherited: Inherited) {
        *self.inherited.lock().expect("no panics while holding the lock") = Some(inherited);
    }

    /// All metrics, in Prometheus text.
    pub fn render_metrics(&self) -> String {
        let mut out = String::new();
        self.loader.render(&mut out);
        self.nbd.render(&mut out);
        header(&mut out, "tessera_overlays_open", "gauge", "NAME@LABEL overlays open now.");
        let _ = writeln!(out, "tessera_overlays_open {}", self.exports.open_overlay_count());
        out
    }

    /// Listens, calls `ready` with the addresses bound, and serves until
    /// `shutdown` completes (or the agent hands itself over to a successor);
    /// then flushes overlays and removes its sockets (unless handed over:
    /// the successor serves them).
    pub async fn run(self: Arc<Self>, ready: impl FnOnce(&Bound), shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let mut tasks = Vec::new();
        let mut sockets = Vec::new();
        let mut bound = Bound::default();
        let listen_err = |addr: String| move |source| Error::Listen { addr, source };
        let mut inherited = self.inherited.lock().expect("no panics while holding the lock").take().unwrap_or_default();
        for frontend in &self.options.frontends {
            let Frontend::Nbd(l) = frontend;
            let handed = inherited.nbd.remove(&l.to_string());
            match l {
                Listen::Unix(path) => {
                    let listener = match handed {
                        Some(fd) => {
                            let std = std::os::unix::net::UnixListener::from(fd);
                            std.set_nonblocking(true).map_err(listen_err(l.to_string()))?;
                            UnixListener::from_std(std).map_err(listen_err(l.to_string()))?
                        }
                        None => {
                            if let Some(dir) = path.parent() {
                                std::fs::create_dir_all(dir).map_err(listen_err(l.to_string()))?;
                            }
                            // A socket left by an agent that died is in the way.
                            if std::os::unix::net::UnixStream::connect(path).is_err() {
                                let _ = std::fs::remove_file(path);
                            }
                            UnixListener::bind(path).map_err(listen_err(l.to_string()))?
                        }
                    };
                    self.listener_fds.lock().expect("no panics while holding the lock").push((l.to_string(), listener.as_raw_fd()));
                    sockets.push(path.clone());
                    bound.nbd.push(l.to_string());
                    let server = self.nbd.clone();
                    tasks.push(tokio::spawn(async move {
                        loop {
                            match listener.accept().await {
                                Ok((s, _)) => {
                                    if let Some(place) = server.admit("a unix socket client") {
                                        tokio::spawn(nbd::serve_connection(s, server.clone(), place, "unix socket".into(), None));
                                    }
                                }
                                Err(e) => accept_failed(&e).await,
                            }
                        }
                    }));
                }
                Listen::Tcp(addr) => {
                    let listener = match handed {
                        Some(fd) => {
                            let std = std::net::TcpListener::from(fd);
                            std.set_nonblocking(true).map_err(listen_err(addr.clone()))?;
                            TcpListener::from_std(std).map_err(listen_err(addr.clone()))?
                        }
                        None => TcpListener::bind(addr).await.map_err(listen_err(addr.clone()))?,
                    };
                    let local = listener.local_addr().map_err(listen_err(addr.clone()))?;
                    if self.tls.is_none() && !local.ip().is_loopback() && !self.options.allow_plaintext_nbd {
                        return Err(Error::Plaintext(local.to_string()));
                    }
                    self.listener_fds.lock().expect("no panics while holding the lock").push((l.to_string(), listener.as_raw_fd()));
                    bound.nbd.push(local.to_string());
                    let server = self.nbd.clone();
                    let tls = self.tls.clone();
                    tasks.push(tokio::spawn(async move {
                        loop {
                            match listener.accept().await {
                                Ok((s, peer)) => {
                                    let peer = peer.to_string();
                                    if let Some(place) = server.admit(&peer) {
                                        let _ = s.set_nodelay(true);
                                        tokio::spawn(nbd::serve_connection(s, server.clone(), place, peer, tls.clone()));
                                    }
                                }
                                Err(e) => accept_failed(&e).await,
                            }
                        }
                    }));
                }
            }
        }
        if let Some(addr) = &self.options.metrics {
            let listener = TcpListener::bind(addr).await.map_err(listen_err(format!("metrics {addr}")))?;
            bound.metrics = Some(listener.local_addr().map_err(listen_err(addr.clone()))?.to_string());
            let me = Arc::clone(&self);
            tasks.push(tokio::spawn(tessera_cache::metrics::serve(listener, Arc::new(move || me.render_metrics()))));
        }
        // Children's listener (handed over like the NBD ones), and with it
        // this agent's name in the trees.
        if let Some((t, source, serve)) = &self.tree {
            let key = format!("peer:{}", t.listen);
            let failed = |source| Error::Listen { addr: format!("peers {}", t.listen), source };
            let listener = match inherited.nbd.remove(&key) {
                Some(fd) => std::net::TcpListener::from(fd),
                None => std::net::TcpListener::bind(&t.listen).map_err(failed)?,
            };
            listener.set_nonblocking(true).map_err(failed)?;
            let local = listener.local_addr().map_err(failed)?;
            if !local.ip().is_loopback() && (t.token.is_none() || serve.tls.is_none()) {
                return Err(Error::Tree(format!(
                    "--peer-listen {local} is not a loopback address: give --tree-token-file and --peer-tls-cert/--peer-tls-key (children off this host need a token, and TLS to keep it secret)"
                )));
            }
            let advertise = match &t.advertise {
                Some(a) => a.clone(),
                None if local.ip().is_unspecified() => {
                    return Err(Error::Tree(format!("--peer-listen {local} listens on every address: give --advertise HOST:PORT")))
                }
                None => local.to_string(),
            };
            let name = source.advertise(&advertise)?.to_owned();
            self.listener_fds.lock().expect("no panics while holding the lock").push((key, listener.as_raw_fd()));
            bound.peer = Some(name);
            let listener = TcpListener::from_std(listener).map_err(failed)?;
            tasks.push(tokio::spawn(tessera_cache::peer::serve_children(Arc::clone(&self.loader), listener, serve.clone(), std::future::pending())));
        }
        // The VMs' disks of the agent before this one, then the control socket.
        self.restore_attached(std::mem::take(&mut inherited.vhost));
        let control = match &self.options.control {
            None => None,
            Some(path) => {
                let listener = match inherited.control.take() {
                    Some(l) => l,
                    None => bind_control(path).map_err(listen_err(format!("control socket {}", path.display())))?,
                };
                self.listener_fds.lock().expect("no panics while holding the lock").insert(0, ("control".into(), listener.as_raw_fd()));
                let (me, stop) = (Arc::clone(&self) as Arc<dyn control::Controlled>, Arc::clone(&self.stopping));
                let thread = std::thread::Builder::new()
                    .name("tessera-control".into())
                    .spawn(move || control::serve(listener, me, stop))
                    .map_err(listen_err(format!("control socket {}", path.display())))?;
                Some((path.clone(), thread))
            }
        };
        ready(&bound);
        let handed_over = self.handed_over.clone();
        let was_handed_over = tokio::select! {
            () = shutdown => false,
            () = handed_over.notified() => true,
        };
        self.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        if was_handed_over {
            // The successor serves the children under the same name.
            if let Some((_, source, _)) = &self.tree {
                source.stay_in_trees();
            }
        }
        for t in tasks {
            t.abort();
        }
        if let Some((path, thread)) = control {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            if !was_handed_over {
                let _ = std::fs::remove_file(path);
            }
        }
        if !was_handed_over {
            if let Some(v) = &self.vhost {
                let v = Arc::clone(v);
                let _ = tokio::task::spawn_blocking(move || v.stop_all()).await;
            }
        }
        self.exports.flush_all();
        // Waiting for the caches to be written sleeps: not on a worker thread.
        let loader = Arc::clone(&self.loader);
        let _ = tokio::task::spawn_blocking(move || loader.drain()).await;
        if !was_handed_over {
            for s in sockets {
                let _ = std::fs::remove_file(s);
            }
        }
        Ok(())
    }
}

/// How this agent serves its children (`--peer-tls-cert`, the token).
fn serve_children_options(t: &TreeOptions) -> Result<tessera_cache::peer::ServeOptions, Error> {
    let tls = match &t.tls_cert {
        Some((cert, key)) => Some(tessera_cache::tls::server_config(cert, key, None, &[b"h2", b"http/1.1"])?),
        None => None,
    };
    Ok(tessera_cache::peer::ServeOptions { token: t.token.clone(), tls })
}

/// Binds the control socket at `path` (mode 0600: only its user may attach
/// disks), replacing one left by an agent that died; refuses if an agent
/// answers there.
fn bind_control(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another agent answers there (stop it, or start this one with --takeover to take over from it)",
        ));
    }
    let _ = std::fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(listener)
}

impl control::Controlled for Agent {
    fn attach(&self, export: &str, disk: control::DiskKind, profile: control::ProfileMode, owner: Option<u32>) -> Result<control::Attached, String> {
        Agent::attach_for(self, export, disk, profile, owner).map_err(|e| e.to_string())
    }

    fn detach(&self, export: &str, record_until: Option<std::time::Duration>, discard: bool) -> Result<control::Detached, String> {
        Agent::detach(self, export, record_until, discard).map_err(|e| e.to_string())
    }

    fn status(&self) -> control::Status {
        Agent::status(self)
    }

    fn handover(&self) -> Result<(control::Handover, Vec<std::os::fd::OwnedFd>), String> {
        // From now no attach can add a device the successor would not be
        // handed.
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) || self.handing_over.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err("this agent is stopping".into());
        }
        Ok(self.handover_fds())
    }

    fn handover_failed(&self) {
        tracing::warn!("the handover failed; this agent carries on");
        self.handing_over.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    fn handed_over(&self) {
        // No new control connection, NBD connection or vhost-user front end
        // here from now on; the VMs' disks are quiesced and released.
        self.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(v) = &self.vhost {
            v.hand_over();
        }
        self.attachments.lock().expect("no panics while holding the lock").clear();
        self.exports.flush_all();
        tracing::info!("handed over to a successor; stopping");
        self.handed_over.notify_one();
    }
}

/// After a failed accept (out of descriptors, say): log, and wait a little
/// rather than spin.
async fn accept_failed(e: &std::io::Error) {
    tracing::warn!("nbd: accept: {e}");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

/// Refuses a cache directory that is, contains or lies inside a store: the
/// disk cache deletes what it evicts, and overlays are removed with their
/// runs, so the cache must never share a directory with the images.
pub fn check_cache_dir(home: &Path, cache: &Path) -> Result<(), Error> {
    let (home, cache) = (absolute(home), absolute(cache));
    let refuse = |why: &str| Err(Error::CacheDir { dir: cache.clone(), reason: why.to_owned() });
    if home.starts_with(&cache) {
        return refuse(&format!("is or contains the store {}", home.display()));
    }
    for part in ["chunks", "manifests", "images", "tmp", "run"] {
        if cache.starts_with(home.join(part)) {
            return refuse(&format!("lies inside the store {}", home.display()));
        }
    }
    if cache.join("keyring.json").exists() || (cache.join("images").is_dir() && cache.join("manifests").is_dir()) {
        return refuse("holds another tessera store (a keyring, images and manifests)");
    }
    Ok(())
}

/// `path` made absolute and free of symlinks as far as it exists (the rest
/// appended as given), so two spellings of one directory compare equal.
fn absolute(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            return rest.iter().rev().fold(real, |p, part| p.join(part));
        }
        match (existing.file_name().map(|n| n.to_owned()), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = if parent.as_os_str().is_empty() { PathBuf::from(".") } else { parent.to_path_buf() };
            }
            _ => return path.to_path_buf(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_dirs_that_share_the_store_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        for d in ["chunks", "manifests", "images"] {
            std::fs::create_dir_all(home.join(d)).unwrap();
        }
        std::fs::write(home.join("keyring.json"), b"{}").unwrap();
        assert!(check_cache_dir(&home, &home.join("cache")).is_ok(), "the default");
        assert!(check_cache_dir(&home, &dir.path().join("elsewhere/cache")).is_ok());
        for bad in [home.clone(), dir.path().to_path_buf(), home.join("chunks"), home.join("chunks/ab"), home.join("images/x"), home.join("./chunks/../")] {
            let err = check_cache_dir(&home, &bad).expect_err(&bad.display().to_string());
            assert!(err.to_string().contains("store"), "{err}");
        }
        // Another home, elsewhere.
        let other = dir.path().join("other");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("keyring.json"), b"{}").unwrap();
        assert!(check_cache_dir(&home, &other).is_err());
    }

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
