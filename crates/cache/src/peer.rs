//! Function trees (FaaSNet), as an agent sees them: a [`PeerSource`] that
//! reads chunks from the agent's parent in the tree of the function it
//! serves, and [`serve_children`], the server its own children read from.
//!
//! The tree manager (`tessera treemgr`) keeps one balanced binary tree of
//! agents per function and tells each agent its parent. An agent joins a
//! function's tree the first time it reads a chunk for it (the function is
//! [`FetchContext::function`], else the image name), and asks its parent
//! before the cache tier and the origin. The parent answers from its own
//! chain ([`Loader::sealed`]): its memory of recently fetched sealed chunks,
//! its disk cache, then its own parent, and so on up; so only the root reads
//! below the peer tier for a chunk no ancestor has, and concurrent requests
//! for one chunk (from both children and the parent's own readers) are one
//! fetch at each level.
//!
//! Chunks cross between agents sealed, and each receiver checks them
//! against their ids (the loader does): a lying parent is caught like a
//! lying cache node, and the read goes below.
//!
//! **Failure.** A parent whose connection fails (refused, reset, or silent
//! past the HTTP/2 keep-alive) is reported to the manager (`POST
//! /v1/failed`), which takes it out of every tree; the agent joins again
//! for its new parent and asks that one. Any other trouble (an error
//! status, a wrong chunk, no answer within [`CHUNK_TIMEOUT`]) sends the
//! read below at once without reporting anyone: a slow or busy parent is
//! not a dead one. A manager that cannot be reached makes the agent a root
//! until the next [`REFRESH`]. Reads never fail because of the tree: at
//! worst they go below, as without one.
//!
//! **Loops.** While a tree is being rearranged an agent's idea of its
//! parent can be stale for up to [`REFRESH`]. A request carries the agents
//! it passed through (`x-tessera-via`): an agent on that list, or one a
//! request has reached through [`MAX_HOPS`] agents, reads below instead of
//! asking its parent; and an agent asked by the agent it takes for its
//! parent asks the manager where it sits before going on.
//!
//! **Bounds.** A server keeps at most [`MAX_CONNECTIONS`] connections of
//! [`MAX_STREAMS`] requests each, works on at most [`MAX_SERVING`] chunks
//! at once, lets the others wait [`QUEUE_WAIT`] at most, and answers 503
//! past that.
//!
//! ```text
//! GET /v1/chunks/{id}   x-tessera-image, x-tessera-function, x-tessera-manifest,
//!                       x-tessera-generation, x-tessera-via: A,B,...
//!   -> 200 sealed bytes | 404 in no tier | 502 the chain failed | 503 busy
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use tessera_chunk::{ChunkId, SEALED_CHUNK_SIZE};
use tokio::net::TcpListener;

use crate::metrics::header;
use crate::tier::{error_chain, is_loopback};
use crate::{ChunkSource, Error, FetchContext, Loader, Tier};

/// The most agents one request climbs.
pub const MAX_HOPS: u32 = 16;
/// Chunks one agent fetches for its children at once; more wait for a turn.
pub const MAX_SERVING: usize = 64;
/// How long a child's request may wait for a turn before it is refused (503).
pub const QUEUE_WAIT: Duration = Duration::from_secs(5);
/// Connections a peer server keeps (each child needs one; a binary tree
/// gives an agent two, more while a tree is being rearranged).
pub const MAX_CONNECTIONS: usize = 16;
/// Requests in flight on one connection (a child reads many chunks at once).
pub const MAX_STREAMS: u32 = 64;
/// How often an agent tells the manager it lives and asks again where it
/// sits in each tree.
pub const REFRESH: Duration = Duration::from_secs(5);
/// The longest a parent may take to send a chunk (it may be fetching it
/// from its own parent, or the origin); past it the read goes below.
pub const CHUNK_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest the manager may take to answer.
const MANAGER_TIMEOUT: Duration = Duration::from_secs(5);

const H_IMAGE: &str = "x-tessera-image";
const H_FUNCTION: &str = "x-tessera-function";
const H_MANIFEST: &str = "x-tessera-manifest";
const H_GENERATION: &str = "x-tessera-generation";
const H_VIA: &str = "x-tessera-via";

/// How an agent takes part in function trees.
#[derive(Clone, Debug)]
pub struct PeerOptions {
    /// The tree manager, `HOST:PORT`.
    pub manager: String,
    /// The address this agent's children reach it at, `HOST:PORT`: its
    /// name in the trees (`None`: given later, [`PeerSource::advertise`],
    /// once its listener is bound; until then it reads below).
    pub advertise: Option<String>,
    /// The bearer token of the manager and of every agent's peer server.
    pub token: Option<String>,
    /// Talk TLS to the manager and to parents, trusting this CA (PEM).
    pub tls_ca: Option<PathBuf>,
}

/// Why function trees cannot be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// Not `HOST:PORT`.
    #[error("{0:?} is not HOST:PORT")]
    BadAddress(String),
    /// The token cannot travel in a header.
    #[error("the tree token has characters a header cannot carry")]
    BadToken,
    /// The token would cross the network in clear.
    #[error("{0} is not on this host: the tree token would cross the network in clear; give --tree-tls-ca (and --peer-tls-cert/--peer-tls-key on every agent, --tls-cert/--tls-key on the manager)")]
    TokenInClear(String),
    /// The client's runtime could not start.
    #[error("cannot start the function-tree runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The TLS configuration cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// The peer tier: chunks from this agent's parent in each function's tree.
pub struct PeerSource {
    runtime: Option<tokio::runtime::Runtime>,
    shared: Arc<Shared>,
}

struct Shared {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    scheme: &'static str,
    auth: Option<HeaderValue>,
    manager: String,
    me: std::sync::OnceLock<String>,
    /// Handed over to a successor with the same name: stay in the trees.
    stay: std::sync::atomic::AtomicBool,
    /// Function → this agent's parent in its tree (`None`: the root).
    parents: Mutex<HashMap<Arc<str>, Option<String>>>,
    /// One join at a time (concurrent first reads of a function join once).
    joining: tokio::sync::Mutex<()>,
    stats: PeerStats,
}

/// The peer tier's counters.
#[derive(Default)]
pub struct PeerStats {
    /// Chunks a parent sent.
    pub hits: AtomicU64,
    /// Reads that went below: this agent is the root, its parent lacked
    /// the chunk or was busy, or the manager could not be reached.
    pub below: AtomicU64,
    /// Parents found gone and reported to the manager.
    pub parent_failures: AtomicU64,
    /// Requests that came back to this agent, or reached [`MAX_HOPS`].
    pub loops: AtomicU64,
    /// Chunks a parent sent that did not match their ids.
    pub corrupt: AtomicU64,
    /// Requests to the manager that failed.
    pub manager_errors: AtomicU64,
}

#[derive(Deserialize)]
struct Placement {
    parent: Option<String>,
}

/// What a parent said.
enum Answer {
    Chunk(Bytes),
    /// It (and everything above it) lacks the chunk, is busy or slow, or refused us.
    Below,
    /// Its connection failed: report it.
    Gone(String),
}

impl PeerSource {
    /// A member of the trees `options.manager` keeps, as `options.advertise`.
    pub fn new(options: PeerOptions) -> Result<PeerSource, PeerError> {
        for addr in std::iter::once(&options.manager).chain(&options.advertise) {
            crate::tier::TierOptions::check_address(addr).map_err(|_| PeerError::BadAddress(addr.clone()))?;
        }
        if let (Some(_), None) = (&options.token, &options.tls_ca) {
            if !is_loopback(&options.manager) {
                return Err(PeerError::TokenInClear(options.manager.clone()));
            }
        }
        let auth = match &options.token {
            Some(t) => Some(HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| PeerError::BadToken)?),
            None => None,
        };
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("tessera-peer").enable_all().build().map_err(PeerError::Runtime)?;
        let connector = crate::tls::h2_connector(options.tls_ca.as_deref(), Duration::from_secs(1))?;
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .http2_initial_stream_window_size(4 << 20)
            .http2_initial_connection_window_size(32 << 20)
            // A parent that stops answering pings is gone, even mid-chunk.
            .http2_keep_alive_interval(Duration::from_secs(1))
            .http2_keep_alive_timeout(Duration::from_secs(2))
            .http2_keep_alive_while_idle(true)
            .timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
        let shared = Arc::new(Shared {
            client,
            scheme: if options.tls_ca.is_some() { "https" } else { "http" },
            auth,
            manager: options.manager,
            me: options.advertise.map(std::sync::OnceLock::from).unwrap_or_default(),
            stay: std::sync::atomic::AtomicBool::new(false),
            parents: Mutex::new(HashMap::new()),
            joining: tokio::sync::Mutex::new(()),
            stats: PeerStats::default(),
        });
        runtime.spawn(Arc::clone(&shared).refresh_forever());
        Ok(PeerSource { runtime: Some(runtime), shared })
    }

    /// The tier's counters.
    pub fn stats(&self) -> &PeerStats {
        &self.shared.stats
    }

    /// Names this agent `addr` in the trees (where its children reach it),
    /// if it has no name yet; its name.
    pub fn advertise(&self, addr: &str) -> Result<&str, PeerError> {
        crate::tier::TierOptions::check_address(addr).map_err(|_| PeerError::BadAddress(addr.to_owned()))?;
        Ok(self.shared.me.get_or_init(|| addr.to_owned()))
    }

    /// The agent hands over to a successor under the same name: it does
    /// not leave its trees when it stops.
    pub fn stay_in_trees(&self) {
        self.shared.stay.store(true, Ordering::SeqCst);
    }

    /// This agent's parent in `function`'s tree as last heard (`None`: the
    /// root, or not in the tree yet).
    pub fn parent(&self, function: &str) -> Option<String> {
        self.shared.parents.lock().expect("no panics while holding the lock").get(function).cloned().flatten()
    }
}

impl Drop for PeerSource {
    /// Leaves every tree (briefly: a manager that does not answer expires
    /// this agent instead).
    fn drop(&mut self) {
        let Some(runtime) = self.runtime.take() else { return };
        let shared = Arc::clone(&self.shared);
        // A thread of its own: the source may be dropped inside a runtime.
        let _ = std::thread::spawn(move || {
            if !shared.stay.load(Ordering::SeqCst) {
                runtime.block_on(async {
                    let _ = tokio::time::timeout(Duration::from_secs(2), shared.leave_all()).await;
                });
            }
            runtime.shutdown_background();
        })
        .join();
    }
}

impl ChunkSource for PeerSource {
    fn tier(&self) -> Tier {
        Tier::Peer
    }

    fn fetch(&self, id: &ChunkId, ctx: &FetchContext) -> Result<Option<Bytes>, Error> {
        let runtime = self.runtime.as_ref().expect("present until dropped");
        Ok(runtime.block_on(Arc::clone(&self.shared).fetch(*id, ctx.clone())))
    }

    fn forget(&self, _id: &ChunkId) {
        // The parent's copy did not match its id: not a hit after all.
        let s = &self.shared.stats;
        s.corrupt.fetch_add(1, Ordering::Relaxed);
        s.hits.fetch_sub(1, Ordering::Relaxed);
        s.below.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String) {
        let s = &self.shared.stats;
        header(out, "tessera_peer_requests_total", "counter", "Chunk requests to this agent's parents, by outcome.");
        for (outcome, n) in [("hit", &s.hits), ("below", &s.below), ("parent_failed", &s.parent_failures), ("loop", &s.loops), ("corrupt", &s.corrupt)] {
            let _ = writeln!(out, "tessera_peer_requests_total{{result=\"{outcome}\"}} {}", n.load(Ordering::Relaxed));
        }
        header(out, "tessera_peer_manager_errors_total", "counter", "Requests to the tree manager that failed.");
        let _ = writeln!(out, "tessera_peer_manager_errors_total {}", s.manager_errors.load(Ordering::Relaxed));
        header(out, "tessera_peer_trees", "gauge", "Function trees this agent is in.");
        let _ = writeln!(out, "tessera_peer_trees {}", self.shared.parents.lock().expect("no panics while holding the lock").len());
    }
}

impl Shared {
    async fn fetch(self: Arc<Self>, id: ChunkId, ctx: FetchContext) -> Option<Bytes> {
        let Some(me) = self.me.get() else {
            // Not named yet (its listener is not bound): no tree to read from.
            self.stats.below.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        if ctx.via.len() >= MAX_HOPS as usize || ctx.via.iter().any(|a| **a == *me) {
            self.stats.loops.fetch_add(1, Ordering::Relaxed);
            self.stats.below.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let function: Arc<str> = ctx.function.clone().unwrap_or_else(|| Arc::clone(&ctx.image));
        let asker = ctx.via.last().map(|a| a.to_string());
        // A parent found gone is reported, and the new one asked once.
        for attempt in 0..2 {
            let parent = match self.parent(&function).await {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("tree manager {}: {e}; reading below the peer tier until it answers", self.manager);
                    break;
                }
            };
            if asker.as_deref() == Some(parent.as_str()) {
                // Asked by the agent taken for the parent: the tree was
                // rearranged and this agent's placement is stale.
                self.stats.loops.fetch_add(1, Ordering::Relaxed);
                self.parents.lock().expect("no panics while holding the lock").remove(&function);
                if attempt == 0 {
                    continue;
                }
                break;
            }
            match self.ask(&parent, &id, &ctx).await {
                Answer::Chunk(b) => {
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    return Some(b);
                }
                Answer::Below => break,
                Answer::Gone(why) => {
                    tracing::warn!("parent {parent} of {function}: {why}; telling the tree manager");
                    self.stats.parent_failures.fetch_add(1, Ordering::Relaxed);
                    self.failed(&parent).await;
                }
            }
        }
        self.stats.below.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// This agent's parent in `function`'s tree, joining it first if need be.
    async fn parent(&self, function: &Arc<str>) -> Result<Option<String>, String> {
        if let Some(p) = self.parents.lock().expect("no panics while holding the lock").get(function) {
            return Ok(p.clone());
        }
        let _one = self.joining.lock().await;
        if let Some(p) = self.parents.lock().expect("no panics while holding the lock").get(function) {
            return Ok(p.clone());
        }
        self.join(function).await
    }

    /// Joins `function`'s tree (or is found there); remembers the parent.
    /// If the manager cannot be reached, the agent is a root until the
    /// next refresh (its reads go below rather than wait for the manager).
    async fn join(&self, function: &Arc<str>) -> Result<Option<String>, String> {
        let body = serde_json::json!({"function": &**function, "node": self.me.get()}).to_string();
        let placement = match self.manager_call(Method::POST, "/v1/join", body).await {
            Ok(reply) => serde_json::from_slice::<Placement>(&reply).map_err(|e| format!("bad answer to a join: {e}")),
            Err(e) => Err(e),
        };
        let parent = placement.as_ref().ok().and_then(|p| p.parent.clone());
        self.parents.lock().expect("no panics while holding the lock").insert(Arc::clone(function), parent.clone());
        placement.map(|_| parent)
    }

    /// Tells the manager `parent` is gone, and forgets it as a parent: the
    /// next read of each function it was parent in joins again.
    async fn failed(&self, parent: &str) {
        let body = serde_json::json!({"node": parent}).to_string();
        if let Err(e) = self.manager_call(Method::POST, "/v1/failed", body).await {
            tracing::warn!("tree manager {}: {e}", self.manager);
        }
        self.parents.lock().expect("no panics while holding the lock").retain(|_, p| p.as_deref() != Some(parent));
    }

    /// Every [`REFRESH`]: a heartbeat, and where this agent sits now in
    /// each of its trees (its parent may have left, or the tree been
    /// rebalanced).
    async fn refresh_forever(self: Arc<Self>) {
        loop {
            tokio::time::sleep(REFRESH).await;
            if self.me.get().is_none() {
                continue;
            }
            let functions: Vec<Arc<str>> = self.parents.lock().expect("no panics while holding the lock").keys().cloned().collect();
            if functions.is_empty() {
                let body = serde_json::json!({"node": self.me.get()}).to_string();
                let _ = self.manager_call(Method::POST, "/v1/heartbeat", body).await;
            }
            for f in functions {
                if let Err(e) = self.join(&f).await {
                    tracing::warn!("tree manager {}: {e}", self.manager);
                    break;
                }
            }
        }
    }

    async fn leave_all(&self) {
        let functions: Vec<Arc<str>> = self.parents.lock().expect("no panics while holding the lock").drain().map(|(f, _)| f).collect();
        for f in functions {
            let body = serde_json::json!({"function": &*f, "node": self.me.get()}).to_string();
            let _ = self.manager_call(Method::POST, "/v1/leave", body).await;
        }
    }

    async fn manager_call(&self, method: Method, path: &str, body: String) -> Result<Bytes, String> {
        let call = async {
            let mut req = Request::builder().method(method).uri(format!("{}://{}{path}", self.scheme, self.manager)).header(CONTENT_TYPE, "application/json");
            if let Some(a) = &self.auth {
                req = req.header(AUTHORIZATION, a.clone());
            }
            let req = req.body(Full::new(Bytes::from(body))).map_err(|e| e.to_string())?;
            let resp = self.client.request(req).await.map_err(|e| error_chain(&e))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), 64 << 10).collect().await.map_err(|e| error_chain(&*e))?.to_bytes();
            if status.is_success() {
                Ok(body)
            } else {
                Err(format!("{path}: {status}: {}", String::from_utf8_lossy(&body).trim()))
            }
        };
        let result = match tokio::time::timeout(MANAGER_TIMEOUT, call).await {
            Ok(r) => r,
            Err(_) => Err(format!("{path}: no answer within {MANAGER_TIMEOUT:?}")),
        };
        if result.is_err() {
            self.stats.manager_errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Asks `parent` for chunk `id`.
    async fn ask(&self, parent: &str, id: &ChunkId, ctx: &FetchContext) -> Answer {
        if self.auth.is_some() && self.scheme == "http" && !is_loopback(parent) {
            tracing::warn!("parent {parent} is not on this host: not sending it the tree token in clear (give --tree-tls-ca)");
            return Answer::Below;
        }
        let Some(req) = self.chunk_request(parent, id, ctx) else { return Answer::Below };
        // A failed connection is a gone parent; anything else is not.
        let call = async {
            let resp = self.client.request(req).await.map_err(|e| Answer::Gone(error_chain(&e)))?;
            let status = resp.status();
            // A parent cannot make us hold more than a chunk can be.
            let body = Limited::new(resp.into_body(), SEALED_CHUNK_SIZE).collect().await.map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    Answer::Below
                } else {
                    Answer::Gone(error_chain(&*e))
                }
            })?;
            Ok::<_, Answer>((status, body.to_bytes()))
        };
        match tokio::time::timeout(CHUNK_TIMEOUT, call).await {
            Err(_) => {
                tracing::warn!("parent {parent}: no chunk within {CHUNK_TIMEOUT:?}; reading below");
                Answer::Below
            }
            Ok(Err(answer)) => answer,
            Ok(Ok((StatusCode::OK, body))) => Answer::Chunk(body),
            Ok(Ok((status @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN), _))) => {
                tracing::warn!("parent {parent} refused us ({status}): is --tree-token-file the same on every agent?");
                Answer::Below
            }
            Ok(Ok(_)) => Answer::Below,
        }
    }

    fn chunk_request(&self, parent: &str, id: &ChunkId, ctx: &FetchContext) -> Option<Request<Full<Bytes>>> {
        let mut req = Request::builder().method(Method::GET).uri(format!("{}://{parent}/v1/chunks/{id}", self.scheme));
        if let Some(a) = &self.auth {
            req = req.header(AUTHORIZATION, a.clone());
        }
        // Names that cannot travel in a header are not read through peers.
        let image = HeaderValue::from_str(&ctx.image).ok()?;
        req = req.header(H_IMAGE, image).header(H_MANIFEST, HeaderValue::from_str(&ctx.manifest).ok()?);
        if let Some(f) = &ctx.function {
            req = req.header(H_FUNCTION, HeaderValue::from_str(f).ok()?);
        }
        let via: Vec<&str> = ctx.via.iter().map(|a| &**a).chain(self.me.get().map(String::as_str)).collect();
        req = req.header(H_GENERATION, ctx.generation).header(H_VIA, HeaderValue::from_str(&via.join(",")).ok()?);
        req.body(Full::new(Bytes::new())).ok()
    }
}

/// How an agent serves its children.
#[derive(Clone)]
pub struct ServeOptions {
    /// The bearer token every request must carry.
    pub token: Option<String>,
    /// TLS (HTTP/2 or HTTP/1.1 over TLS).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Serves sealed chunks to this agent's children on `listener`, from
/// `loader` ([`Loader::sealed`]), until `shutdown` completes.
pub async fn serve_children(loader: Arc<Loader>, listener: TcpListener, options: ServeOptions, shutdown: impl Future<Output = ()>) {
    let serving = Arc::new(tokio::sync::Semaphore::new(MAX_SERVING));
    let token: Option<Arc<str>> = options.token.map(Into::into);
    let tune = |h2: &mut hyper_util::server::conn::auto::Http2Builder<'_, TokioExecutor>| {
        h2.keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(32 << 20)
            .max_concurrent_streams(MAX_STREAMS);
    };
    crate::server::serve_http(&listener, options.tls, MAX_CONNECTIONS, tune, shutdown, move |req: Request<hyper::body::Incoming>| {
        let (loader, serving, token) = (Arc::clone(&loader), Arc::clone(&serving), token.clone());
        async move {
            if let Some(t) = &token {
                if !crate::server::bearer_matches(req.headers(), t) {
                    return text(StatusCode::UNAUTHORIZED, "a bearer token is required\n");
                }
            }
            let id = match (req.method(), req.uri().path().strip_prefix("/v1/chunks/")) {
                (&Method::GET, Some(hex)) => match hex.parse::<ChunkId>() {
                    Ok(id) => id,
                    Err(_) => return text(StatusCode::BAD_REQUEST, "not a chunk id\n"),
                },
                _ => return text(StatusCode::NOT_FOUND, "GET /v1/chunks/{id}\n"),
            };
            let Some(ctx) = context(req.headers()) else { return text(StatusCode::BAD_REQUEST, "bad x-tessera-* headers\n") };
            let Ok(Ok(permit)) = tokio::time::timeout(QUEUE_WAIT, serving.acquire_owned()).await else {
                return text(StatusCode::SERVICE_UNAVAILABLE, "busy\n");
            };
            let got = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                loader.sealed(&id, &ctx)
            })
            .await;
            match got {
                Ok(Ok((sealed, _))) => Response::new(Full::new(sealed)),
                Ok(Err(e)) if e.is_missing() => text(StatusCode::NOT_FOUND, "in no tier\n"),
                Ok(Err(e)) => text(StatusCode::BAD_GATEWAY, &format!("{e}\n")),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
            }
        }
    })
    .await;
}

/// The fetch context a child sent.
fn context(h: &HeaderMap) -> Option<FetchContext> {
    let get = |name: &str| h.get(name).map(|v| v.to_str().ok()).unwrap_or(Some(""));
    Some(FetchContext {
        image: Some(get(H_IMAGE)?).filter(|i| !i.is_empty())?.into(),
        function: h.get(H_FUNCTION).map(|v| v.to_str().map(Into::into)).transpose().ok()?,
        manifest: get(H_MANIFEST)?.into(),
        generation: get(H_GENERATION)?.parse().unwrap_or(0),
        via: get(H_VIA)?.split(',').filter(|a| !a.is_empty()).map(Into::into).collect(),
    })
}

fn text(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(msg.to_owned())));
    *r.status_mut() = status;
    r
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tessera_chunk::{seal, ChunkRef, Salt, CHUNK_SIZE};
    use tessera_store::{ChunkStore, MemoryStore};

    use super::*;
    use crate::{LoaderOptions, Origin};

    /// An HTTP server on loopback answering with `handle`; its address.
    async fn spawn_server<H, F>(handle: H) -> String
    where
        H: Fn(Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move { crate::server::serve_http(&listener, None, 16, |_| {}, std::future::pending(), handle).await });
        addr
    }

    /// A tree manager that places every agent under `parent` and counts
    /// the parents reported gone.
    async fn fake_manager(parent: String, failed: Arc<AtomicUsize>) -> String {
        spawn_server(move |req: Request<hyper::body::Incoming>| {
            let (parent, failed) = (parent.clone(), Arc::clone(&failed));
            async move {
                if req.uri().path() == "/v1/failed" {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                Response::new(Full::new(Bytes::from(serde_json::json!({"parent": parent}).to_string())))
            }
        })
        .await
    }

    /// A parent that answers every chunk request with the same bytes.
    async fn liar() -> String {
        spawn_server(|_| async { Response::new(Full::new(Bytes::from(vec![7u8; 4096]))) }).await
    }

    fn chunk() -> (Arc<MemoryStore>, ChunkRef, Vec<u8>) {
        let store = Arc::new(MemoryStore::default());
        let plain = vec![5u8; CHUNK_SIZE];
        let s = seal(&Salt::from_bytes([1; 32]), plain.clone());
        store.put(&s.id, &s.ciphertext).unwrap();
        (store, ChunkRef { id: s.id, key: s.key }, plain)
    }

    fn chain(manager: String, origin: Arc<MemoryStore>) -> (Loader, Arc<PeerSource>) {
        let peer = Arc::new(PeerSource::new(PeerOptions { manager, advertise: Some("127.0.0.1:9".into()), token: None, tls_ca: None }).unwrap());
        let sources: Vec<Arc<dyn ChunkSource>> = vec![peer.clone(), Arc::new(Origin::new(origin, 4, 16))];
        (Loader::new(LoaderOptions { memory_bytes: 8 << 20 }, sources), peer)
    }

    #[test]
    fn a_lying_parent_is_caught_and_the_read_goes_below() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let failed = Arc::new(AtomicUsize::new(0));
        let liar = rt.block_on(liar());
        let manager = rt.block_on(fake_manager(liar, Arc::clone(&failed)));
        let (store, r, plain) = chunk();
        let (loader, peer) = chain(manager, store);
        let (got, tier) = loader.read(&r, &FetchContext::image("app")).unwrap();
        assert_eq!((&*got, tier), (&plain, Tier::Origin));
        assert_eq!(loader.stats.corrupt.load(Ordering::Relaxed), 1, "the parent's copy was checked and dropped");
        let s = peer.stats();
        assert_eq!((s.hits.load(Ordering::Relaxed), s.corrupt.load(Ordering::Relaxed), s.below.load(Ordering::Relaxed)), (0, 1, 1));
        assert_eq!(failed.load(Ordering::Relaxed), 0, "a wrong chunk is not a gone parent");
    }

    #[test]
    fn a_gone_parent_is_reported_and_reads_do_not_fail() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let failed = Arc::new(AtomicUsize::new(0));
        // A parent that hangs up on every connection.
        let gone = rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    drop(stream);
                }
            });
            addr
        });
        let manager = rt.block_on(fake_manager(gone.clone(), Arc::clone(&failed)));
        let (store, r, plain) = chunk();
        let (loader, peer) = chain(manager, store);
        let (got, tier) = loader.read(&r, &FetchContext::image("app")).unwrap();
        assert_eq!((&*got, tier), (&plain, Tier::Origin));
        // Reported, joined again (the manager names it again), reported again, then below.
        assert_eq!(failed.load(Ordering::Relaxed), 2);
        assert_eq!(peer.stats().parent_failures.load(Ordering::Relaxed), 2);
        assert_eq!(peer.stats().below.load(Ordering::Relaxed), 1);
        assert_eq!(peer.parent("app"), None, "a gone parent is forgotten");
    }

    #[test]
    fn a_request_that_comes_back_goes_below() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let failed = Arc::new(AtomicUsize::new(0));
        let liar = rt.block_on(liar());
        let manager = rt.block_on(fake_manager(liar.clone(), Arc::clone(&failed)));
        let (store, r, plain) = chunk();
        let (loader, peer) = chain(manager, store);
        // A request that passed through this agent already.
        let ctx = FetchContext { via: vec!["127.0.0.1:9".into()], ..FetchContext::image("app") };
        assert_eq!(loader.read(&r, &ctx).unwrap(), (Arc::new(plain.clone()), Tier::Origin));
        assert_eq!((peer.stats().loops.load(Ordering::Relaxed), peer.stats().hits.load(Ordering::Relaxed)), (1, 0));
        // A request from the agent this one takes for its parent: asked again, still so, below.
        let (store, r, plain) = chunk();
        let failed = Arc::new(AtomicUsize::new(0));
        let manager = rt.block_on(fake_manager(liar.clone(), Arc::clone(&failed)));
        let (loader, peer) = chain(manager, store);
        let ctx = FetchContext { via: vec![liar.as_str().into()], ..FetchContext::image("app") };
        assert_eq!(loader.read(&r, &ctx).unwrap(), (Arc::new(plain), Tier::Origin));
        assert_eq!((peer.stats().loops.load(Ordering::Relaxed), peer.stats().hits.load(Ordering::Relaxed)), (2, 0));
        assert_eq!(failed.load(Ordering::Relaxed), 0);
    }
}
