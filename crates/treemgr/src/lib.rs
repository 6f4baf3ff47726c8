//! The function-tree manager (`tessera treemgr`): it keeps one balanced
//! binary tree per function ([`tessera_tree::Forest`]) of the agents
//! serving it, and tells each agent its parent. Agents name themselves by
//! the address they serve chunks to their children on (`HOST:PORT`).
//!
//! HTTP/1.1 or HTTP/2, JSON bodies, a bearer token when the manager has one:
//!
//! ```text
//! POST /v1/join      {"function":"app","node":"10.0.0.5:7001"}  -> {"parent":"10.0.0.2:7001","ancestors":[...],"root":"..."}
//! POST /v1/leave     {"function":"app","node":"10.0.0.5:7001"}  -> {"moved":[{"node":..,"parent":..}]}
//! POST /v1/heartbeat {"node":"10.0.0.5:7001"}                   -> {"known":true}
//! POST /v1/failed    {"node":"10.0.0.2:7001"}                   -> {"moved":[...]}   (a child found its parent gone)
//! GET  /v1/parent?function=app&node=10.0.0.5:7001               -> {"parent":..,"ancestors":[...],"root":..}
//! GET  /v1/trees                                                -> {"app":["root","child",...]} (breadth-first)
//! ```
//!
//! **State.** Every change is written to the state file (temporary, fsync,
//! rename) before it is answered; a restarted manager rebuilds each tree
//! from it in the same shape, so a restart loses no tree.
//!
//! **Bounds.** Request bodies are at most 4 KiB; at most [`MAX_NODES`]
//! agents and [`MAX_FUNCTIONS`] functions are kept (more joins are refused
//! with 503); an agent that sends nothing (join, heartbeat, parent query)
//! for the idle timeout leaves every tree.
#![deny(missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tessera_tree::Forest;
use tokio::net::TcpListener;

/// Agents kept at most.
pub const MAX_NODES: usize = 100_000;
/// Functions kept at most.
pub const MAX_FUNCTIONS: usize = 100_000;
/// Connections the manager keeps (each agent keeps one).
pub const MAX_CONNECTIONS: usize = 4096;
/// Bytes of one request body.
const MAX_BODY: usize = 4096;

/// Errors of the manager.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The state file cannot be read or written.
    #[error("state file {path}: {reason}")]
    State {
        /// Its path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// How a manager runs.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The bearer token every request must carry.
    pub token: Option<String>,
    /// An agent silent this long leaves every tree.
    pub idle_timeout: Duration,
    /// Where the trees are kept across restarts.
    pub state: Option<PathBuf>,
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    unauthorized: AtomicU64,
    bad_requests: AtomicU64,
    moved: AtomicU64,
    expired: AtomicU64,
    refused: AtomicU64,
}

#[derive(Default)]
struct State {
    forest: Forest<String, u32>,
    ids: HashMap<String, u32>,
    addrs: HashMap<u32, String>,
    seen: HashMap<u32, Instant>,
    next: u32,
}

impl State {
    fn id(&mut self, addr: &str) -> u32 {
        if let Some(&id) = self.ids.get(addr) {
            return id;
        }
        let id = self.next;
        self.next += 1;
        self.ids.insert(addr.to_owned(), id);
        self.addrs.insert(id, addr.to_owned());
        id
    }

    fn addr(&self, id: u32) -> String {
        self.addrs.get(&id).cloned().unwrap_or_default()
    }

    /// Forgets an agent that is in no tree any more.
    fn forget_if_unused(&mut self, id: u32) {
        if !self.forest.iter().any(|(_, t)| t.contains(id)) {
            self.seen.remove(&id);
            if let Some(a) = self.addrs.remove(&id) {
                self.ids.remove(&a);
            }
        }
    }

    fn placement(&self, function: &str, id: u32) -> Placement {
        let tree = self.forest.tree(&function.to_owned());
        Placement {
            parent: tree.and_then(|t| t.parent(id)).map(|p| self.addr(p)),
            ancestors: tree.map(|t| t.ancestors(id).into_iter().map(|a| self.addr(a)).collect()).unwrap_or_default(),
            root: tree.and_then(|t| t.root()).map(|r| self.addr(r)),
        }
    }

    fn moved(&self, moved: Vec<(u32, Option<u32>)>) -> Vec<MovedNode> {
        moved.into_iter().map(|(n, p)| MovedNode { node: self.addr(n), parent: p.map(|p| self.addr(p)) }).collect()
    }

    fn snapshot(&self) -> BTreeMap<String, Vec<String>> {
        self.forest.iter().map(|(f, t)| (f.clone(), t.nodes().iter().map(|&n| self.addr(n)).collect())).collect()
    }
}

/// Where an agent sits in a function's tree.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Placement {
    /// Its parent (`None`: it is the root, or not in the tree).
    pub parent: Option<String>,
    /// Its ancestors, nearest first: where to look for a chunk the parent lacks.
    pub ancestors: Vec<String>,
    /// The tree's root: the one agent that reads from below.
    pub root: Option<String>,
}

/// An agent whose parent changed.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MovedNode {
    /// The agent.
    pub node: String,
    /// Its new parent (`None`: it is the root now).
    pub parent: Option<String>,
}

#[derive(Deserialize)]
struct Membership {
    function: String,
    node: String,
}

#[derive(Deserialize)]
struct NodeOnly {
    node: String,
}

/// The manager: the trees, behind one lock (each change is small).
pub struct Manager {
    options: Options,
    state: Mutex<State>,
    stats: Stats,
}

impl Manager {
    /// A manager; with a state file, the trees it holds.
    pub fn open(options: Options) -> Result<Manager, Error> {
        let mut state = State::default();
        if let Some(path) = &options.state {
            let fail = |reason: String| Error::State { path: path.clone(), reason };
            match std::fs::read(path) {
                Ok(bytes) => {
                    let trees: BTreeMap<String, Vec<String>> = serde_json::from_slice(&bytes).map_err(|e| fail(e.to_string()))?;
                    let now = Instant::now();
                    for (function, nodes) in trees {
                        // Breadth-first order: inserting it again gives the same tree.
                        for addr in nodes {
                            let id = state.id(&addr);
                            state.forest.join(&function, id);
                            state.seen.insert(id, now);
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(fail(e.to_string())),
            }
        }
        Ok(Manager { options, state: Mutex::new(state), stats: Stats::default() })
    }

    /// The trees: function → agents, breadth-first.
    pub fn trees(&self) -> BTreeMap<String, Vec<String>> {
        self.state.lock().expect("no panics while holding the lock").snapshot()
    }

    /// `node` joins `function`'s tree (or is found there); where it sits.
    pub fn join(&self, function: &str, node: &str) -> Result<Placement, (StatusCode, String)> {
        let mut s = self.state.lock().expect("no panics while holding the lock");
        let known_function = s.forest.tree(&function.to_owned()).is_some();
        let known_node = s.ids.contains_key(node);
        if (!known_node && s.ids.len() >= MAX_NODES) || (!known_function && s.forest.iter().count() >= MAX_FUNCTIONS) {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err((StatusCode::SERVICE_UNAVAILABLE, "the manager keeps no more agents or functions\n".into()));
        }
        let id = s.id(node);
        s.seen.insert(id, Instant::now());
        s.forest.join(&function.to_owned(), id);
        self.save(&s)?;
        Ok(s.placement(function, id))
    }

    /// `node` leaves `function`'s tree; the agents whose parent changed.
    pub fn leave(&self, function: &str, node: &str) -> Result<Vec<MovedNode>, (StatusCode, String)> {
        let mut s = self.state.lock().expect("no panics while holding the lock");
        let Some(&id) = s.ids.get(node) else { return Ok(Vec::new()) };
        let moved = s.forest.leave(&function.to_owned(), id);
        let out = s.moved(moved);
        s.forget_if_unused(id);
        self.stats.moved.fetch_add(out.len() as u64, Ordering::Relaxed);
        self.save(&s)?;
        Ok(out)
    }

    /// `node` is gone (failed, or reported so by a child): it leaves every tree.
    pub fn remove_node(&self, node: &str) -> Result<Vec<MovedNode>, (StatusCode, String)> {
        let mut s = self.state.lock().expect("no panics while holding the lock");
        let Some(&id) = s.ids.get(node) else { return Ok(Vec::new()) };
        let out = self.remove_id(&mut s, id);
        self.save(&s)?;
        Ok(out)
    }

    /// Takes agent `id` out of every tree (the state not yet saved).
    fn remove_id(&self, s: &mut State, id: u32) -> Vec<MovedNode> {
        let moved: Vec<(u32, Option<u32>)> = s.forest.remove_node(id).into_iter().flat_map(|(_, m)| m).collect();
        let out = s.moved(moved);
        s.forget_if_unused(id);
        self.stats.moved.fetch_add(out.len() as u64, Ordering::Relaxed);
        out
    }

    /// Where `node` sits in `function`'s tree (counts as a sign of life).
    pub fn placement(&self, function: &str, node: &str) -> Placement {
        let mut s = self.state.lock().expect("no panics while holding the lock");
        let Some(&id) = s.ids.get(node) else { return Placement { parent: None, ancestors: Vec::new(), root: None } };
        s.seen.insert(id, Instant::now());
        s.placement(function, id)
    }

    /// A sign of life from `node`; whether the manager knows it.
    pub fn heartbeat(&self, node: &str) -> bool {
        let mut s = self.state.lock().expect("no panics while holding the lock");
        match s.ids.get(node).copied() {
            Some(id) => {
                s.seen.insert(id, Instant::now());
                true
            }
            None => false,
        }
    }

    /// Removes the agents silent for longer than the idle timeout; how many.
    pub fn expire(&self) -> usize {
        if self.options.idle_timeout.is_zero() {
            return 0;
        }
        // All of them under one lock, and one write of the state.
        let mut s = self.state.lock().expect("no panics while holding the lock");
        let stale: Vec<u32> = s.seen.iter().filter(|(_, t)| t.elapsed() > self.options.idle_timeout).map(|(&id, _)| id).collect();
        if stale.is_empty() {
            return 0;
        }
        for &id in &stale {
            tracing::info!("{}: silent for {:?}; it leaves every tree", s.addr(id), self.options.idle_timeout);
            self.remove_id(&mut s, id);
        }
        // A failed write is logged; the next change writes the state again.
        let _ = self.save(&s);
        self.stats.expired.fetch_add(stale.len() as u64, Ordering::Relaxed);
        stale.len()
    }

    /// Writes the trees to the state file, durably, before a change is answered.
    fn save(&self, s: &State) -> Result<(), (StatusCode, String)> {
        let Some(path) = &self.options.state else { return Ok(()) };
        let write = || -> std::io::Result<()> {
            let tmp = path.with_extension("tmp");
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, &serde_json::to_vec(&s.snapshot()).expect("names serialise"))?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| {
            tracing::error!("state file {}: {e}", path.display());
            (StatusCode::INTERNAL_SERVER_ERROR, format!("the manager cannot keep its state: {e}\n"))
        })
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        self.options.token.as_deref().is_none_or(|token| tessera_cache::server::bearer_matches(req.headers(), token))
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        if !self.authorized(&req) {
            self.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
            let mut r = text(StatusCode::UNAUTHORIZED, "a valid bearer token is required\n".into());
            r.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"tessera-treemgr\""));
            return r;
        }
        let (method, path, query) = (req.method().clone(), req.uri().path().to_owned(), req.uri().query().unwrap_or("").to_owned());
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return self.bad(StatusCode::PAYLOAD_TOO_LARGE, format!("a request body is at most {MAX_BODY} bytes\n")),
        };
        let answer = match (method, path.as_str()) {
            (Method::POST, "/v1/join") => match serde_json::from_slice::<Membership>(&body) {
                Ok(m) if valid(&m.node) && valid(&m.function) => self.join(&m.function, &m.node).map(|p| json(&p)),
                _ => return self.bad(StatusCode::BAD_REQUEST, "expected {\"function\": NAME, \"node\": HOST:PORT}\n".into()),
            },
            (Method::POST, "/v1/leave") => match serde_json::from_slice::<Membership>(&body) {
                Ok(m) => self.leave(&m.function, &m.node).map(|moved| json(&serde_json::json!({ "moved": moved }))),
                Err(_) => return self.bad(StatusCode::BAD_REQUEST, "expected {\"function\": NAME, \"node\": HOST:PORT}\n".into()),
            },
            (Method::POST, "/v1/failed") => match serde_json::from_slice::<NodeOnly>(&body) {
                Ok(n) => self.remove_node(&n.node).map(|moved| json(&serde_json::json!({ "moved": moved }))),
                Err(_) => return self.bad(StatusCode::BAD_REQUEST, "expected {\"node\": HOST:PORT}\n".into()),
            },
            (Method::POST, "/v1/heartbeat") => match serde_json::from_slice::<NodeOnly>(&body) {
                Ok(n) => Ok(json(&serde_json::json!({ "known": self.heartbeat(&n.node) }))),
                Err(_) => return self.bad(StatusCode::BAD_REQUEST, "expected {\"node\": HOST:PORT}\n".into()),
            },
            (Method::GET, "/v1/parent") => {
                let arg = |k: &str| query.split('&').find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('='))).map(str::to_owned);
                match (arg("function"), arg("node")) {
                    (Some(f), Some(n)) => Ok(json(&self.placement(&f, &n))),
                    _ => return self.bad(StatusCode::BAD_REQUEST, "expected ?function=NAME&node=HOST:PORT\n".into()),
                }
            }
            (Method::GET, "/v1/trees") => Ok(json(&self.trees())),
            _ => return self.bad(StatusCode::NOT_FOUND, "no such request; see /v1/join, /v1/leave, /v1/failed, /v1/heartbeat, /v1/parent, /v1/trees\n".into()),
        };
        match answer {
            Ok(r) => r,
            Err((status, msg)) => text(status, msg),
        }
    }

    fn bad(&self, status: StatusCode, msg: String) -> Response<Full<Bytes>> {
        self.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
        text(status, msg)
    }

    /// Metrics in Prometheus text.
    pub fn render_metrics(&self) -> String {
        let mut out = String::new();
        let (trees, nodes) = {
            let s = self.state.lock().expect("no panics while holding the lock");
            (s.forest.iter().count(), s.ids.len())
        };
        tessera_cache::metrics::header(&mut out, "tessera_treemgr_trees", "gauge", "Function trees kept.");
        out.push_str(&format!("tessera_treemgr_trees {trees}\n"));
        tessera_cache::metrics::header(&mut out, "tessera_treemgr_nodes", "gauge", "Agents in at least one tree.");
        out.push_str(&format!("tessera_treemgr_nodes {nodes}\n"));
        tessera_cache::metrics::counters(
            &mut out,
            &[
                ("tessera_treemgr_requests_total", "Requests answered.", &self.stats.requests),
                ("tessera_treemgr_unauthorized_total", "Requests without the right token.", &self.stats.unauthorized),
                ("tessera_treemgr_bad_requests_total", "Malformed or unknown requests.", &self.stats.bad_requests),
                ("tessera_treemgr_moved_total", "Agents given a new parent by a leave or a failure.", &self.stats.moved),
                ("tessera_treemgr_expired_total", "Agents removed after the idle timeout.", &self.stats.expired),
                ("tessera_treemgr_refused_total", "Joins refused: the manager was full.", &self.stats.refused),
            ],
        );
        out
    }
}

/// Names and addresses: printable, short, no spaces.
fn valid(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| b.is_ascii_graphic())
}

fn json<T: Serialize>(v: &T) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(serde_json::to_vec(v).expect("answers serialise"))));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn text(status: StatusCode, msg: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(msg)));
    *r.status_mut() = status;
    r
}

/// Serves `manager` on `listener` (over TLS with `tls`) until `shutdown`
/// completes; expires silent agents meanwhile.
pub async fn serve(manager: Arc<Manager>, listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>, shutdown: impl Future<Output = ()>) {
    let reaper = {
        let manager = Arc::clone(&manager);
        let every = (manager.options.idle_timeout / 4).max(Duration::from_millis(100));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let m = Arc::clone(&manager);
                let _ = tokio::task::spawn_blocking(move || m.expire()).await;
            }
        })
    };
    let tune = |h2: &mut hyper_util::server::conn::auto::Http2Builder<'_, TokioExecutor>| {
        h2.max_concurrent_streams(64);
    };
    tessera_cache::server::serve_http(&listener, tls, MAX_CONNECTIONS, tune, shutdown, move |req| {
        let manager = Arc::clone(&manager);
        async move { manager.handle(req).await }
    })
    .await;
    reaper.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trees_survive_a_restart_in_the_same_shape() {
        let dir = tempfile::tempdir().unwrap();
        let options = Options { state: Some(dir.path().join("state.json")), idle_timeout: Duration::from_secs(60), ..Default::default() };
        let m = Manager::open(options.clone()).unwrap();
        for i in 0..7 {
            m.join("app", &format!("10.0.0.{i}:7001")).unwrap();
        }
        m.join("web", "10.0.0.3:7001").unwrap();
        let p = m.placement("app", "10.0.0.5:7001");
        assert_eq!(p.parent.as_deref(), Some("10.0.0.2:7001"));
        assert_eq!(p.ancestors, vec!["10.0.0.2:7001", "10.0.0.0:7001"]);
        let moved = m.remove_node("10.0.0.2:7001").unwrap();
        assert!(moved.iter().any(|n| n.node == "10.0.0.5:7001" && n.parent.as_deref() == Some("10.0.0.6:7001")), "{moved:?}");
        let before = m.trees();
        drop(m);
        let again = Manager::open(options).unwrap();
        assert_eq!(again.trees(), before);
        assert_eq!(again.placement("app", "10.0.0.5:7001").parent.as_deref(), Some("10.0.0.6:7001"));
    }

    #[test]
    fn silent_agents_leave_every_tree() {
        let m = Manager::open(Options { idle_timeout: Duration::from_millis(50), ..Default::default() }).unwrap();
        m.join("app", "a:1").unwrap();
        m.join("app", "b:1").unwrap();
        m.join("web", "b:1").unwrap();
        std::thread::sleep(Duration::from_millis(80));
        assert!(m.heartbeat("a:1"));
        assert_eq!(m.expire(), 1);
        assert_eq!(m.trees(), BTreeMap::from([("app".to_owned(), vec!["a:1".to_owned()])]));
        assert!(!m.heartbeat("b:1"), "forgotten");
    }
}
