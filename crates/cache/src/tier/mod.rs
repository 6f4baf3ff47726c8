//! The shared cache tier, as a worker sees it: chunks erasure-coded over
//! cache nodes (`tessera cachenode`), read k-of-n.
//!
//! Each chunk's `n = k + m` stripes live on the `n` nodes that rendezvous
//! hashing picks for it ([`crate::placement`]), stripe `i` first on the
//! `i`-th of them; each node holds at most one stripe of a chunk, and the
//! stripe says which it is ([`wire`]). A read asks all `n` at once over
//! HTTP/2, rebuilds the chunk from the first `k` distinct stripes that
//! arrive, cancels the rest, and checks the rebuilt ciphertext against the
//! chunk id: one slow or lost node neither slows nor fails a read, and when
//! nodes join or leave, the nodes still among a chunk's `n` keep serving
//! the stripes they hold. A rebuild that does not match (a corrupt stripe)
//! is retried from every stripe, trying `k`-subsets; if none matches, the
//! read is a miss and the loader goes to the origin, whose copy is then
//! offered back here and rewrites the stripes.
//!
//! A node that says it holds no stripe of a chunk (it restarted empty,
//! evicted or dropped the stripe, or is new) is given one that nobody sent
//! after a read that rebuilt the chunk from the others: the tier repairs
//! itself as it is read.
//!
//! A node that errors, sends a stripe without a valid header, or times out
//! is left out for a backoff that doubles with each failure (up to
//! [`MAX_BACKOFF`]) and tried again after it. A chunk fetched from below is
//! [`offered`](ChunkSource::offer) to the tier: encoded and stored in the
//! background, after the reader has its bytes, with a bound on the copies
//! waiting ([`MAX_PENDING`]).
//!
//! The tier holds ciphertext only; chunk keys never leave the worker.

pub mod wire;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, AUTHORIZATION};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tessera_chunk::{check_id, ChunkId};
use tokio::task::JoinSet;

use crate::ec::Code;
use crate::metrics::{counters, header, Histogram};
use crate::placement::place;
use crate::{ChunkSource, Error, FetchContext, Tier};
pub use wire::StripeHeader;

/// How long one stripe request may take before its node counts as failed.
pub const STRIPE_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest a failed node is left out.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Chunks that may wait to be stored in the tier; past that, offers are dropped.
pub const MAX_PENDING: u64 = 256;

/// Which stripes a read waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadPolicy {
    /// Ask all `n`, take the first `k` (the default).
    FirstK,
    /// Ask for the `k` data stripes and wait for exactly those (the naive
    /// baseline of the tail benchmark).
    DataStripes,
}

/// How to reach the tier.
#[derive(Clone, Debug)]
pub struct TierOptions {
    /// The cache nodes, `HOST:PORT`.
    pub nodes: Vec<String>,
    /// Data stripes per chunk.
    pub k: usize,
    /// Parity stripes per chunk.
    pub m: usize,
    /// The bearer token the nodes expect, if any.
    pub token: Option<String>,
    /// Which stripes a read waits for.
    pub policy: ReadPolicy,
    /// The CA that signs the nodes' certificates: talk TLS (HTTP/2 over
    /// TLS, ALPN `h2`); `None`: cleartext HTTP/2.
    pub tls_ca: Option<std::path::PathBuf>,
}

/// Why a tier cannot be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TierError {
    /// Not a code this tier can use.
    #[error("{0:?} is not a code K+M such as 4+1 (K >= 1, K + M <= 255)")]
    BadCode(String),
    /// Not an address a node can be reached at.
    #[error("cache node {0:?} is not HOST:PORT")]
    BadAddress(String),
    /// Fewer nodes than stripes per chunk.
    #[error("a {k}+{m} code needs at least {} cache nodes, {given} given", k + m)]
    TooFewNodes {
        /// Data stripes.
        k: usize,
        /// Parity stripes.
        m: usize,
        /// Nodes given.
        given: usize,
    },
    /// A node listed twice.
    #[error("cache node {0} is listed twice")]
    DuplicateNode(String),
    /// The token cannot travel in a header.
    #[error("the cache token has characters a header cannot carry")]
    BadToken,
    /// The client's runtime could not start.
    #[error("cannot start the cache tier's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The node TLS configuration cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The token would cross the network in clear.
    #[error("cache node {0} is not on this host: the token would cross the network in clear; give --cache-tls-ca (nodes with --tls-cert)")]
    TokenInClear(String),
}

impl TierOptions {
    /// Parses an `--ec` value such as `4+1`.
    pub fn parse_code(s: &str) -> Result<(usize, usize), TierError> {
        let bad = || TierError::BadCode(s.to_owned());
        let (k, m) = s.split_once('+').ok_or_else(bad)?;
        let (k, m): (usize, usize) = (k.trim().parse().map_err(|_| bad())?, m.trim().parse().map_err(|_| bad())?);
        // The code itself says which parameters it supports.
        Code::new(k, m).map_err(|_| bad())?;
        Ok((k, m))
    }

    /// Checks that `node` is `HOST:PORT`.
    pub fn check_address(node: &str) -> Result<(), TierError> {
        match node.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok() => Ok(()),
            _ => Err(TierError::BadAddress(node.to_owned())),
        }
    }
}

/// The tier client: a [`ChunkSource`] over the cache nodes.
pub struct CacheTier {
    runtime: Option<tokio::runtime::Runtime>,
    shared: Arc<Shared>,
}

struct Shared {
    nodes: Vec<Node>,
    names: Vec<String>,
    code: Code,
    policy: ReadPolicy,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// `https` with TLS, else `http`.
    scheme: &'static str,
    auth: Option<HeaderValue>,
    pending: AtomicU64,
    stats: TierStats,
}

/// One cache node and what the client knows of its health.
struct Node {
    addr: String,
    health: Mutex<Health>,
    errors: AtomicU64,
    /// Stripes it sent that were not what they claimed (bad header, or
    /// outvoted by the others).
    corrupt: AtomicU64,
    /// Corrupt stripes since its last good one.
    corrupt_run: AtomicU64,
    /// Whether a connection to it is up (or being made by a request that
    /// is never cancelled).
    connected: std::sync::atomic::AtomicBool,
}

/// Corrupt stripes in a row after which a node is left out: one bad stripe
/// is repaired, not held against every chunk the node serves.
const CORRUPT_RUN_LIMIT: u64 = 16;

#[derive(Default)]
struct Health {
    failures: u32,
    down_until: Option<Instant>,
}

/// The tier's counters.
#[derive(Default)]
pub struct TierStats {
    /// Chunks rebuilt from the tier.
    pub hits: AtomicU64,
    /// Reads the tier could not serve (fewer than `k` stripes).
    pub misses: AtomicU64,
    /// Stripes received.
    pub stripes_received: AtomicU64,
    /// Stripe requests cancelled because `k` others arrived first.
    pub stripes_cancelled: AtomicU64,
    /// Rebuilt chunks that did not match their id (a corrupt stripe).
    pub corrupt: AtomicU64,
    /// Chunks stored (at least `k` of their stripes kept).
    pub stored: AtomicU64,
    /// Stripes stored on nodes.
    pub stripes_stored: AtomicU64,
    /// Offers dropped because too many were waiting.
    pub offers_dropped: AtomicU64,
    /// Stripes put back on nodes that held none of their chunk.
    pub stripes_repaired: AtomicU64,
    /// Time to rebuild one chunk from the tier.
    pub latency: Histogram,
}

/// What one stripe request came back with.
enum Reply {
    Stripe(Bytes),
    Missing,
    Failed,
}

/// The stripes of one chunk that came back, by stripe index.
struct Gathered {
    stripes: Vec<Option<Bytes>>,
    /// Distinct stripes received.
    have: usize,
    /// Nodes that answered that they hold no stripe of the chunk, or sent
    /// one without a valid header: they get a good one after a rebuild.
    lost: Vec<usize>,
    /// The node each stripe came from.
    from: Vec<Option<usize>>,
}

/// Where stripes go: (node, stripe index) pairs.
type Targets = Vec<(usize, u8)>;

/// The most `k`-subsets tried to rebuild a chunk with a corrupt stripe.
const MAX_SUBSETS: usize = 64;

impl CacheTier {
    /// A client of `options.nodes`; checks the options, connects lazily.
    pub fn new(options: TierOptions) -> Result<CacheTier, TierError> {
        let code = Code::new(options.k, options.m).map_err(|_| TierError::BadCode(format!("{}+{}", options.k, options.m)))?;
        for node in &options.nodes {
            TierOptions::check_address(node)?;
        }
        if options.nodes.len() < code.n() {
            return Err(TierError::TooFewNodes { k: options.k, m: options.m, given: options.nodes.len() });
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = options.nodes.iter().find(|n| !seen.insert(n.as_str())) {
            return Err(TierError::DuplicateNode(dup.clone()));
        }
        if let (Some(_), None) = (&options.token, &options.tls_ca) {
            if let Some(far) = options.nodes.iter().find(|n| !is_loopback(n)) {
                return Err(TierError::TokenInClear(far.clone()));
            }
        }
        let auth = match &options.token {
            Some(t) => Some(HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| TierError::BadToken)?),
            None => None,
        };
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("tessera-tier").enable_all().build().map_err(TierError::Runtime)?;
        let connector = crate::tls::h2_connector(options.tls_ca.as_deref(), STRIPE_TIMEOUT)?;
        // One connection per node carries every request, and cancelling a
        // stripe resets its stream, not the connection.
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .http2_initial_stream_window_size(4 << 20)
            .http2_initial_connection_window_size(64 << 20)
            .http2_max_frame_size(256 << 10)
            // Each cancelled stripe is a reset stream whose late frames must
            // still be recognised; a slow node may be hundreds behind (h2
            // keeps only 10 by default, then calls the late frames errors
            // and, past 1024 of them, drops the connection).
            .http2_max_concurrent_reset_streams(4096)
            .build(connector);
        let nodes = options
            .nodes
            .iter()
            .map(|a| Node {
                addr: a.clone(),
                health: Mutex::new(Health::default()),
                errors: AtomicU64::new(0),
                corrupt: AtomicU64::new(0),
                corrupt_run: AtomicU64::new(0),
                connected: std::sync::atomic::AtomicBool::new(false),
            })
            .collect();
        Ok(CacheTier {
            runtime: Some(runtime),
            shared: Arc::new(Shared {
                nodes,
                names: options.nodes,
                code,
                policy: options.policy,
                client,
                scheme: if options.tls_ca.is_some() { "https" } else { "http" },
                auth,
                pending: AtomicU64::new(0),
                stats: TierStats::default(),
            }),
        })
    }

    /// Chunks offered and not yet stored.
    pub fn pending(&self) -> u64 {
        self.shared.pending.load(Ordering::Relaxed)
    }

    /// The tier's counters.
    pub fn stats(&self) -> &TierStats {
        &self.shared.stats
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("present until drop")
    }

    /// Stores `sealed`'s stripes (on `targets`, or all by placement) in the
    /// background, unless too many stores are waiting already.
    fn store_later(&self, id: &ChunkId, sealed: &Bytes, targets: Option<Targets>) {
        let shared = &self.shared;
        if shared.pending.fetch_add(1, Ordering::Relaxed) >= MAX_PENDING {
            shared.pending.fetch_sub(1, Ordering::Relaxed);
            shared.stats.offers_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let me = Arc::clone(shared);
        let (id, sealed) = (*id, sealed.clone());
        self.runtime().spawn(async move {
            Arc::clone(&me).store(id, sealed, targets).await;
            me.pending.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

impl Drop for CacheTier {
    fn drop(&mut self) {
        // Never blocks, so the tier may be dropped anywhere (even in a task).
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Node {
    fn is_down(&self, now: Instant) -> bool {
        self.health.lock().expect("no panics while holding the lock").down_until.is_some_and(|t| t > now)
    }

    fn succeeded(&self) {
        let mut h = self.health.lock().expect("no panics while holding the lock");
        if h.failures > 0 {
            tracing::info!("cache node {} is back", self.addr);
        }
        *h = Health::default();
    }

    /// A stripe from this node was not what it claimed: counted, and the
    /// node is left out only after many in a row.
    fn sent_corrupt(&self, chunk: &ChunkId, why: &str) {
        self.corrupt.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("cache node {}: the stripe of chunk {chunk} {why}; it gets a good one", self.addr);
        if self.corrupt_run.fetch_add(1, Ordering::Relaxed) + 1 >= CORRUPT_RUN_LIMIT {
            self.corrupt_run.store(0, Ordering::Relaxed);
            self.failed(&format!("{CORRUPT_RUN_LIMIT} corrupt stripes in a row"));
        }
    }

    fn failed(&self, why: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut h = self.health.lock().expect("no panics while holding the lock");
        h.failures = h.failures.saturating_add(1);
        let backoff = (Duration::from_millis(100) * 2u32.saturating_pow(h.failures.min(16) - 1)).min(MAX_BACKOFF);
        if h.failures == 1 {
            tracing::warn!("cache node {}: {why}; leaving it out (retried with backoff)", self.addr);
        }
        h.down_until = Some(Instant::now() + backoff);
    }
}

impl Shared {
    fn request(&self, method: Method, node: usize, chunk: &ChunkId, body: Bytes) -> Request<Full<Bytes>> {
        let uri = format!("{}://{}{}", self.scheme, self.nodes[node].addr, wire::path(chunk));
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(a) = &self.auth {
            req = req.header(AUTHORIZATION, a.clone());
        }
        req.body(Full::new(body)).expect("the request's parts are valid")
    }

    /// Sends `METHOD /v1/stripes/CHUNK` with `body` to `node`; the status
    /// and body of the answer, or why there is none within `limit`. Marks
    /// the node failed or well.
    async fn exchange(&self, node: usize, method: Method, chunk: &ChunkId, body: Bytes, limit: Duration) -> Result<(StatusCode, Bytes), ()> {
        let attempt = async {
            let mut tries = 0;
            let resp = loop {
                tries += 1;
                match self.client.request(self.request(method.clone(), node, chunk, body.clone())).await {
                    Ok(r) => break r,
                    // Requests to a node share its connection while it is
                    // made; when the request that started it is cancelled
                    // (k other stripes came first), the others are told
                    // "canceled". That is ours, not the node's: try again.
                    Err(e) if e.is_connect() && error_chain(&e).contains("canceled") => {
                        if tries < 3 {
                            continue;
                        }
                        // Still ours after three tries (reads finishing
                        // faster than the node connects): not its fault.
                        return Err((error_chain(&e), false));
                    }
                    Err(e) => return Err((error_chain(&e), true)),
                }
            };
            let status = resp.status();
            // A node cannot make us hold more than a stripe can be.
            let body = Limited::new(resp.into_body(), wire::MAX_STRIPE).collect().await.map_err(|e| (error_chain(&*e), true))?.to_bytes();
            if status.is_success() || status == StatusCode::NOT_FOUND {
                Ok((status, body))
            } else {
                Err((format!("{status}: {}", String::from_utf8_lossy(&body[..body.len().min(200)]).trim()), true))
            }
        };
        let answer = tokio::time::timeout(limit, attempt).await.unwrap_or_else(|_| Err((format!("no answer within {limit:?}"), true)));
        match answer {
            Ok(a) => {
                self.nodes[node].succeeded();
                Ok(a)
            }
            Err((_, false)) => Err(()),
            Err((why, true)) => {
                self.nodes[node].connected.store(false, Ordering::Relaxed);
                self.nodes[node].failed(&why);
                Err(())
            }
        }
    }

    /// Makes the connection to `node` with a request nobody cancels. A read
    /// drops the stripe requests it no longer needs, and a request dropped
    /// while its node's connection is being made drops the connection
    /// attempt too: a node that is always a little slower than the others
    /// (one just restarted, say) would otherwise never be connected again.
    async fn connect(self: Arc<Self>, node: usize) {
        if self.nodes[node].connected.swap(true, Ordering::Relaxed) {
            return;
        }
        // Any answer (a 404 for a chunk nobody has) means the connection is up.
        let _ = self.exchange(node, Method::GET, &ChunkId([0; 32]), Bytes::new(), STRIPE_TIMEOUT * 3).await;
    }

    /// The stripe `node` holds of `chunk`.
    async fn get(self: Arc<Self>, node: usize, chunk: ChunkId) -> (usize, Reply) {
        let reply = match self.exchange(node, Method::GET, &chunk, Bytes::new(), STRIPE_TIMEOUT).await {
            Ok((StatusCode::NOT_FOUND, _)) => Reply::Missing,
            Ok((_, body)) => Reply::Stripe(body),
            Err(()) => Reply::Failed,
        };
        (node, reply)
    }

    /// Stores `stripe` of `chunk` on `node`; whether it was kept.
    async fn put(self: Arc<Self>, node: usize, chunk: ChunkId, stripe: Bytes) -> bool {
        // Stores run in the background: a slow node gets more time than a read.
        match self.exchange(node, Method::PUT, &chunk, stripe, STRIPE_TIMEOUT * 10).await {
            // A 404 to a PUT: whatever answers there does not keep stripes.
            Ok((StatusCode::NOT_FOUND, _)) => {
                self.nodes[node].failed("404 Not Found for a stripe store");
                false
            }
            Ok(_) => true,
            Err(()) => false,
        }
    }

    /// The index of `stripe` if its header is one of this code's.
    fn index_of(&self, stripe: &[u8]) -> Option<usize> {
        let h = StripeHeader::parse(stripe)?;
        let (k, n) = (self.code.k(), self.code.n());
        ((h.k as usize, h.m as usize) == (k, n - k) && (h.index as usize) < n).then_some(h.index as usize)
    }

    /// Gathers stripes of `id` from its nodes: the first `want` distinct
    /// ones (every one when `want` is `None`).
    async fn gather(self: Arc<Self>, id: ChunkId, want: Option<usize>) -> Gathered {
        let (k, n) = (self.code.k(), self.code.n());
        let placed = place(&self.names, &id, n);
        // The naive client asks only the nodes of the data stripes.
        let asked = if self.policy == ReadPolicy::DataStripes && want.is_some() { &placed[..k] } else { &placed[..] };
        let now = Instant::now();
        let mut set = JoinSet::new();
        for &node in asked {
            if !self.nodes[node].is_down(now) {
                if !self.nodes[node].connected.load(Ordering::Relaxed) {
                    tokio::spawn(Arc::clone(&self).connect(node));
                }
                set.spawn(Arc::clone(&self).get(node, id));
            }
        }
        let mut g = Gathered { stripes: vec![None; n], have: 0, lost: Vec::new(), from: vec![None; n] };
        let need = want.unwrap_or(n);
        while g.have < need && set.len() + g.have >= want.unwrap_or(0) {
            let Some(joined) = set.join_next().await else { break };
            match joined {
                Ok((node, Reply::Stripe(body))) => match self.index_of(&body) {
                    Some(i) if g.stripes[i].is_none() => {
                        g.stripes[i] = Some(body);
                        g.from[i] = Some(node);
                        g.have += 1;
                    }
                    // Two nodes with one stripe: one changed rank as nodes
                    // came or went. Not a new stripe.
                    Some(_) => {}
                    None => {
                        self.nodes[node].sent_corrupt(&id, "has no valid header");
                        g.lost.push(node);
                    }
                },
                Ok((node, Reply::Missing)) => g.lost.push(node),
                _ => {}
            }
        }
        // Dropping the set cancels the requests still out (their streams are reset).
        if g.have >= need {
            self.stats.stripes_cancelled.fetch_add(set.len() as u64, Ordering::Relaxed);
        }
        self.stats.stripes_received.fetch_add(g.have as u64, Ordering::Relaxed);
        g
    }

    /// Rebuilds `id` from `stripes` (by index), trying `k`-subsets when
    /// more than `k` are present (at most [`MAX_SUBSETS`]); `None` if none
    /// gives the chunk.
    fn rebuild(&self, id: &ChunkId, stripes: &[Option<Bytes>]) -> Option<Vec<u8>> {
        let (k, n) = (self.code.k(), self.code.n());
        let headed: Vec<Option<(u32, &[u8])>> = stripes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let s = s.as_ref()?;
                let h = StripeHeader::parse(s)?;
                ((h.k as usize, h.m as usize, h.index as usize) == (k, n - k, i)).then(|| (h.chunk_len, &s[wire::HEADER_LEN..]))
            })
            .collect();
        // The chunk length most stripes agree on (a damaged header is outvoted).
        let lens: Vec<u32> = headed.iter().flatten().map(|(l, _)| *l).collect();
        let len = *lens.iter().max_by_key(|l| lens.iter().filter(|x| x == l).count())?;
        let bodies: Vec<Option<&[u8]>> = headed.iter().map(|h| h.filter(|(l, _)| *l == len).map(|(_, b)| b)).collect();
        let present: Vec<usize> = (0..n).filter(|&i| bodies[i].is_some()).collect();
        if present.len() < k {
            return None;
        }
        let mut subset: Vec<usize> = (0..k).collect();
        for _ in 0..MAX_SUBSETS {
            let mut pick: Vec<Option<&[u8]>> = vec![None; n];
            for &s in &subset {
                pick[present[s]] = bodies[present[s]];
            }
            if let Ok(data) = self.code.decode(&pick, len as usize) {
                if check_id(id, &data).is_ok() {
                    return Some(data);
                }
            }
            // The next k-subset of the present stripes, in lexicographic order.
            let p = present.len();
            let i = (0..k).rev().find(|&i| subset[i] < p - k + i)?;
            subset[i] += 1;
            for j in i + 1..k {
                subset[j] = subset[j - 1] + 1;
            }
        }
        None
    }

    /// The (node, index) of each stripe in `g` that is not the stripe of
    /// `sealed` it claims to be.
    fn bad_stripes(&self, sealed: &[u8], g: &Gathered) -> Targets {
        let good = self.code.encode(sealed);
        (0..self.code.n())
            .filter_map(|i| {
                let (stripe, node) = (g.stripes[i].as_ref()?, g.from[i]?);
                let h = StripeHeader::parse(stripe)?;
                let ok = h.chunk_len as usize == sealed.len() && stripe[wire::HEADER_LEN..] == good[i][..];
                (!ok).then_some((node, i as u8))
            })
            .collect()
    }

    /// Encodes `sealed` and stores its stripes: on `targets`, or stripe `i`
    /// on the chunk's `i`-th node (skipping nodes that are down).
    async fn store(self: Arc<Self>, id: ChunkId, sealed: Bytes, targets: Option<Targets>) {
        let me = Arc::clone(&self);
        let Ok(stripes) = tokio::task::spawn_blocking(move || {
            let h = |index| StripeHeader { k: me.code.k() as u8, m: (me.code.n() - me.code.k()) as u8, index, chunk_len: sealed.len() as u32 };
            me.code.encode(&sealed).iter().enumerate().map(|(i, s)| Bytes::from(h(i as u8).wrap(s))).collect::<Vec<_>>()
        })
        .await
        else {
            return;
        };
        let repair = targets.is_some();
        // A repair goes to the nodes named, even one just left out for
        // sending a bad stripe; a full store skips nodes that are down.
        let now = Instant::now();
        let targets = targets.unwrap_or_else(|| {
            let placed = place(&self.names, &id, self.code.n()).into_iter().zip(0u8..);
            placed.filter(|&(node, _)| !self.nodes[node].is_down(now)).collect()
        });
        let mut set = JoinSet::new();
        for (node, index) in targets {
            set.spawn(Arc::clone(&self).put(node, id, stripes[index as usize].clone()));
        }
        let mut kept = 0;
        while let Some(ok) = set.join_next().await {
            kept += usize::from(ok.unwrap_or(false));
        }
        self.stats.stripes_stored.fetch_add(kept as u64, Ordering::Relaxed);
        if repair {
            self.stats.stripes_repaired.fetch_add(kept as u64, Ordering::Relaxed);
        } else if kept >= self.code.k() {
            self.stats.stored.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Whether `HOST:PORT` names this host's loopback.
pub(crate) fn is_loopback(node: &str) -> bool {
    let host = node.rsplit_once(':').map_or(node, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// An error and its causes on one line (hyper's own message is terse).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let _ = write!(s, ": {c}");
        cause = c.source();
    }
    s
}

impl ChunkSource for CacheTier {
    fn tier(&self) -> Tier {
        Tier::Cache
    }

    fn fetch(&self, id: &ChunkId, _ctx: &FetchContext) -> Result<Option<Bytes>, Error> {
        let started = Instant::now();
        let shared = &self.shared;
        let stats = &shared.stats;
        let k = shared.code.k();
        let first = self.runtime().block_on(Arc::clone(shared).gather(*id, Some(k)));
        let mut rebuilt = shared.rebuild(id, &first.stripes).map(Bytes::from);
        if rebuilt.is_some() {
            // The nodes whose stripes made the chunk are sound for now.
            for node in first.from.iter().flatten() {
                shared.nodes[*node].corrupt_run.store(0, Ordering::Relaxed);
            }
        }
        if rebuilt.is_none() && first.have >= k {
            // k stripes that do not make the chunk: one is corrupt. Ask for
            // all of them and try k-subsets.
            stats.corrupt.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("cache tier: chunk {id} did not rebuild from its first {k} stripes; trying all of them");
            let all = self.runtime().block_on(Arc::clone(shared).gather(*id, None));
            rebuilt = shared.rebuild(id, &all.stripes).map(Bytes::from);
            if let Some(good) = &rebuilt {
                // The stripes that differ from the good chunk's are bad:
                // their nodes are left out for a while and get good ones.
                // (A node in the first round may be left out of the
                // second, for another chunk's bad stripe: check both.)
                let mut bad = shared.bad_stripes(good, &first);
                for b in shared.bad_stripes(good, &all) {
                    if !bad.contains(&b) {
                        bad.push(b);
                    }
                }
                for &(node, _) in &bad {
                    shared.nodes[node].sent_corrupt(id, "did not match the others");
                }
                // Nodes that had no stripe, or a headerless one, are given
                // the stripes nobody sent too.
                let absent = (0..shared.code.n()).filter(|&i| all.stripes[i].is_none()).map(|i| i as u8);
                for t in all.lost.iter().copied().zip(absent) {
                    if !bad.iter().any(|b| b.0 == t.0) {
                        bad.push(t);
                    }
                }
                self.store_later(id, good, Some(bad));
            }
        } else if let (Some(good), false) = (&rebuilt, first.lost.is_empty()) {
            // Rebuilt, but nodes of the chunk hold no stripe of it (they
            // restarted empty, evicted or dropped it, or are new): give
            // them the stripes nobody sent.
            let absent = (0..shared.code.n()).filter(|&i| first.stripes[i].is_none()).map(|i| i as u8);
            self.store_later(id, good, Some(first.lost.iter().copied().zip(absent).collect()));
        }
        match rebuilt {
            Some(data) => {
                stats.hits.fetch_add(1, Ordering::Relaxed);
                stats.latency.observe(started.elapsed());
                Ok(Some(data))
            }
            None => {
                stats.misses.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    fn offer(&self, id: &ChunkId, sealed: &Bytes, _ctx: &FetchContext) {
        self.store_later(id, sealed, None);
    }

    fn drain(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.shared.pending.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn render(&self, out: &mut String) {
        let s = &self.shared.stats;
        counters(
            out,
            &[
                ("tessera_cache_tier_hits_total", "Chunks rebuilt from the cache tier.", &s.hits),
                ("tessera_cache_tier_misses_total", "Chunk reads the cache tier could not serve.", &s.misses),
                ("tessera_cache_tier_stripes_received_total", "Stripes received from cache nodes.", &s.stripes_received),
                ("tessera_cache_tier_stripes_cancelled_total", "Stripe requests cancelled because k others arrived first.", &s.stripes_cancelled),
                ("tessera_cache_tier_corrupt_total", "Chunks whose first k stripes did not rebuild them (a corrupt stripe).", &s.corrupt),
                ("tessera_cache_tier_stored_total", "Chunks encoded and stored in the cache tier (at least k stripes kept).", &s.stored),
                ("tessera_cache_tier_stripes_stored_total", "Stripes stored on cache nodes.", &s.stripes_stored),
                ("tessera_cache_tier_offers_dropped_total", "Chunks not stored in the tier because too many were waiting.", &s.offers_dropped),
                ("tessera_cache_tier_stripes_repaired_total", "Stripes put back on nodes that held none of their chunk.", &s.stripes_repaired),
            ],
        );
        header(out, "tessera_cache_tier_pending", "gauge", "Chunks waiting to be stored in the cache tier.");
        let _ = writeln!(out, "tessera_cache_tier_pending {}", self.shared.pending.load(Ordering::Relaxed));
        header(out, "tessera_cache_tier_rebuild_seconds", "histogram", "Time to rebuild one chunk from the cache tier.");
        s.latency.render(out, "tessera_cache_tier_rebuild_seconds", "");
        let now = Instant::now();
        header(out, "tessera_cache_tier_node_up", "gauge", "Whether each cache node is in use (0 while it is left out after errors).");
        for n in &self.shared.nodes {
            let _ = writeln!(out, "tessera_cache_tier_node_up{{node=\"{}\"}} {}", n.addr, u8::from(!n.is_down(now)));
        }
        header(out, "tessera_cache_tier_node_errors_total", "counter", "Errors and timeouts of each cache node.");
        for n in &self.shared.nodes {
            let _ = writeln!(out, "tessera_cache_tier_node_errors_total{{node=\"{}\"}} {}", n.addr, n.errors.load(Ordering::Relaxed));
        }
        header(out, "tessera_cache_tier_node_corrupt_total", "counter", "Stripes from each cache node that were not what they claimed (repaired).");
        for n in &self.shared.nodes {
            let _ = writeln!(out, "tessera_cache_tier_node_corrupt_total{{node=\"{}\"}} {}", n.addr, n.corrupt.load(Ordering::Relaxed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(k: usize, m: usize, nodes: usize) -> Result<CacheTier, TierError> {
        CacheTier::new(TierOptions {
            nodes: (0..nodes).map(|i| format!("127.0.0.1:{}", 1 + i)).collect(),
            k,
            m,
            token: None,
            policy: ReadPolicy::FirstK,
            tls_ca: None,
        })
    }

    #[test]
    fn codes_parse_and_need_enough_nodes() {
        assert_eq!(TierOptions::parse_code("4+1").unwrap(), (4, 1));
        assert_eq!(TierOptions::parse_code("1+2").unwrap(), (1, 2));
        for bad in ["4", "0+1", "4+x", "200+100", "+1"] {
            assert!(TierOptions::parse_code(bad).is_err(), "{bad}");
        }
        assert!(tier(4, 1, 5).is_ok());
        let err = tier(4, 1, 3).err().unwrap().to_string();
        assert!(err.contains("at least 5 cache nodes, 3 given"), "{err}");
        assert!(TierOptions::check_address("nowhere").is_err());
        assert!(TierOptions::check_address("[::1]:7070").is_ok());
    }

    #[test]
    fn a_corrupt_stripe_is_outvoted_by_the_others() {
        let t = tier(4, 1, 5).unwrap();
        let salt = tessera_chunk::Salt::from_bytes([5; 32]);
        let sealed = tessera_chunk::seal(&salt, (0..tessera_chunk::CHUNK_SIZE).map(|i| (i % 251) as u8).collect());
        let s = &t.shared;
        let h = |index| StripeHeader { k: 4, m: 1, index, chunk_len: sealed.ciphertext.len() as u32 };
        let fresh =
            || -> Vec<Option<Bytes>> { s.code.encode(&sealed.ciphertext).iter().enumerate().map(|(i, b)| Some(Bytes::from(h(i as u8).wrap(b)))).collect() };
        let mut stripes = fresh();
        assert_eq!(s.rebuild(&sealed.id, &stripes).as_deref(), Some(&sealed.ciphertext[..]));
        // Flip a byte of stripe 1: the first four no longer rebuild the
        // chunk, but four of the five still do.
        let mut bad = stripes[1].as_ref().unwrap().to_vec();
        bad[wire::HEADER_LEN + 10] ^= 0x40;
        stripes[1] = Some(Bytes::from(bad));
        assert_eq!(s.rebuild(&sealed.id, &stripes).as_deref(), Some(&sealed.ciphertext[..]));
        // With only four, one of them bad, there is nothing to rebuild from.
        stripes[4] = None;
        assert_eq!(s.rebuild(&sealed.id, &stripes), None);
        // A damaged length in one header is outvoted by the others.
        let mut stripes = fresh();
        let mut bad = stripes[0].as_ref().unwrap().to_vec();
        bad[9] ^= 0x01;
        stripes[0] = Some(Bytes::from(bad));
        assert_eq!(s.rebuild(&sealed.id, &stripes).as_deref(), Some(&sealed.ciphertext[..]));
        // A stripe of another code or at the wrong index is not used.
        let mut wrong = fresh();
        wrong[0] = None;
        wrong[4] = Some(Bytes::from(StripeHeader { k: 3, m: 2, index: 4, chunk_len: 1 }.wrap(b"x")));
        assert_eq!(s.rebuild(&sealed.id, &wrong), None);
    }
}
