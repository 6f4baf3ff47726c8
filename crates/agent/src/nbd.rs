//! An NBD server: the fixed-newstyle handshake and the transmission phase
//! of the NBD protocol, over TCP or unix sockets, many clients at once.
//!
//! Options: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`,
//! `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and `SET_META_CONTEXT` (for
//! `base:allocation`); others are answered "unsupported". Commands: `READ`,
//! `WRITE`, `FLUSH`, `TRIM`, `WRITE_ZEROES`, `BLOCK_STATUS`, `CACHE`, `DISC`.
//! Requests on one connection run concurrently; replies are written whole,
//! one at a time. A malformed or hostile request closes that connection
//! (logged); the server and other clients carry on.
//!
//! What clients can make the server hold is bounded per server, not per
//! connection ([`Limits`]): the connections served at once, and the bytes of
//! request and reply buffers of all of them together (a request waits for
//! its share before its buffer exists, so a client that floods gets
//! back-pressure, not memory). A client that stops reading its replies, or
//! stalls in the handshake, is disconnected after a timeout.

use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Mutex, Notify, OwnedSemaphorePermit, Semaphore};

use tessera_cache::metrics::{header, Histogram};

use crate::device::{Device, Exports};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_POLICY: u32 = (1 << 31) + 2;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_BLOCK_SIZE: u16 = 3;

const TF_HAS_FLAGS: u16 = 1;
const TF_READ_ONLY: u16 = 2;
const TF_SEND_FLUSH: u16 = 4;
const TF_SEND_FUA: u16 = 8;
const TF_SEND_TRIM: u16 = 32;
const TF_SEND_WRITE_ZEROES: u16 = 64;
const TF_SEND_DF: u16 = 128;
const TF_CAN_MULTI_CONN: u16 = 256;
const TF_SEND_CACHE: u16 = 1024;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_CACHE: u16 = 5;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;

const CMD_FLAG_FUA: u16 = 1;
const CMD_FLAG_REQ_ONE: u16 = 8;

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// The context id of `base:allocation`.
const ALLOCATION_CONTEXT: u32 = 1;
/// Largest request payload accepted (32 MiB, as qemu-nbd).
pub const MAX_REQUEST: u32 = 32 << 20;
/// Largest option payload accepted during the handshake.
const MAX_OPTION: u32 = 64 << 10;
/// Requests of one connection that may run at once.
const MAX_IN_FLIGHT: usize = 64;

/// What a server lets its clients make it hold.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections served at once; more are closed as they come.
    pub max_connections: usize,
    /// Bytes of request and reply buffers all connections hold at once.
    pub buffer_bytes: u64,
    /// How long a client may take over its handshake, or to take a reply.
    pub client_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_connections: 1024, buffer_bytes: 256 << 20, client_timeout: Duration::from_secs(30) }
    }
}

/// Buffers are accounted in pages of this many bytes.
const PAGE: u64 = 4096;

/// One NBD server: its exports, bounds and counters, shared by all its
/// listeners and connections.
pub struct Server {
    exports: Arc<dyn Exports>,
    /// Counters.
    pub stats: NbdStats,
    limits: Limits,
    connections: Arc<Semaphore>,
    /// Pages of buffer all connections may hold.
    buffers: Arc<Semaphore>,
    buffer_pages: u32,
}

impl Server {
    /// A server of `exports` within `limits`.
    pub fn new(exports: Arc<dyn Exports>, limits: Limits) -> Server {
        // At least one largest request must fit.
        let pages = (limits.buffer_bytes / PAGE).clamp((MAX_REQUEST as u64 + PAGE) / PAGE + 1, u32::MAX as u64 / 2) as u32;
        Server {
            exports,
            stats: NbdStats::default(),
            connections: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            buffers: Arc::new(Semaphore::new(pages as usize)),
            buffer_pages: pages,
            limits,
        }
    }

    /// A place for one more connection, or `None` (counted) when the server
    /// is full: the caller closes the connection.
    pub fn admit(&self, peer: &str) -> Option<OwnedSemaphorePermit> {
        match Arc::clone(&self.connections).try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                if self.stats.refused.fetch_add(1, Ordering::Relaxed).is_multiple_of(1000) {
                    tracing::warn!("nbd: {} connections are open, the most allowed (--max-connections): closing {peer}", self.limits.max_connections);
                }
                None
            }
        }
    }

    /// A connection's share of the buffers: an eighth of them, or one
    /// largest request if that is more. One client that stops reading then
    /// holds at most its share, and the others are served meanwhile.
    fn share(&self) -> Arc<Semaphore> {
        let one_request = ((MAX_REQUEST as u64).div_ceil(PAGE) + 1) as u32;
        Arc::new(Semaphore::new((self.buffer_pages / 8).max(one_request) as usize))
    }

    /// Waits for room for a buffer of `bytes`: in the connection's `share`
    /// first, then in the server's.
    async fn buffer(&self, share: &Arc<Semaphore>, bytes: u64) -> (OwnedSemaphorePermit, OwnedSemaphorePermit) {
        let pages = (bytes.div_ceil(PAGE) + 1).min(self.buffer_pages as u64) as u32;
        // A share holds at least one largest request, so this is granted in time.
        let mine = Arc::clone(share).acquire_many_owned(pages).await.expect("the semaphore is never closed");
        let all = Arc::clone(&self.buffers).acquire_many_owned(pages).await.expect("the semaphore is never closed");
        (mine, all)
    }

    /// Bytes of buffer held now.
    pub fn buffer_bytes_used(&self) -> u64 {
        (self.buffer_pages as u64 - self.buffers.available_permits() as u64) * PAGE
    }

    /// Appends the server's metrics in Prometheus text.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        self.stats.render(out);
        header(out, "tessera_nbd_connections_refused_total", "counter", "NBD connections closed at once because --max-connections were open.");
        let _ = writeln!(out, "tessera_nbd_connections_refused_total {}", self.stats.refused.load(Ordering::Relaxed));
        header(
            out,
            "tessera_nbd_clients_timed_out_total",
            "counter",
            "NBD clients disconnected for not taking a reply, or not finishing the handshake, in time.",
        );
        let _ = writeln!(out, "tessera_nbd_clients_timed_out_total {}", self.stats.timed_out.load(Ordering::Relaxed));
        header(out, "tessera_nbd_buffer_bytes", "gauge", "Bytes of request and reply buffers held by all NBD connections.");
        let _ = writeln!(out, "tessera_nbd_buffer_bytes {}", self.buffer_bytes_used());
        header(out, "tessera_nbd_buffer_capacity_bytes", "gauge", "The bound on those bytes.");
        let _ = writeln!(out, "tessera_nbd_buffer_capacity_bytes {}", self.buffer_pages as u64 * PAGE);
    }
}

/// Server-wide counters.
#[derive(Default)]
pub struct NbdStats {
    /// Connections closed at once because the server was full.
    pub refused: AtomicU64,
    /// Clients disconnected for stalling.
    pub timed_out: AtomicU64,
    /// Connections open now.
    pub connections: AtomicU64,
    /// Connections accepted so far.
    pub connections_total: AtomicU64,
    /// Connections closed for a protocol violation.
    pub protocol_errors: AtomicU64,
    requests: [AtomicU64; 8],
    errors: [AtomicU64; 8],
    latency: [Histogram; 8],
}

const OP_NAMES: [&str; 8] = ["read", "write", "disc", "flush", "trim", "cache", "write_zeroes", "block_status"];

impl NbdStats {
    /// Appends the server's metrics in Prometheus text.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        header(out, "tessera_nbd_connections", "gauge", "NBD connections open now.");
        let _ = writeln!(out, "tessera_nbd_connections {}", self.connections.load(Ordering::Relaxed));
        header(out, "tessera_nbd_connections_total", "counter", "NBD connections accepted.");
        let _ = writeln!(out, "tessera_nbd_connections_total {}", self.connections_total.load(Ordering::Relaxed));
        header(out, "tessera_nbd_protocol_errors_total", "counter", "NBD connections closed for a malformed request.");
        let _ = writeln!(out, "tessera_nbd_protocol_errors_total {}", self.protocol_errors.load(Ordering::Relaxed));
        header(out, "tessera_nbd_requests_total", "counter", "NBD requests, by command.");
        for (i, op) in OP_NAMES.iter().enumerate() {
            let _ = writeln!(out, "tessera_nbd_requests_total{{op=\"{op}\"}} {}", self.requests[i].load(Ordering::Relaxed));
        }
        header(out, "tessera_nbd_request_errors_total", "counter", "NBD requests answered with an error, by command.");
        for (i, op) in OP_NAMES.iter().enumerate() {
            let _ = writeln!(out, "tessera_nbd_request_errors_total{{op=\"{op}\"}} {}", self.errors[i].load(Ordering::Relaxed));
        }
        header(out, "tessera_nbd_request_seconds", "histogram", "Time to answer an NBD request, by command.");
        for i in [CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_BLOCK_STATUS] {
            self.latency[i as usize].render(out, "tessera_nbd_request_seconds", &format!("op=\"{}\"", OP_NAMES[i as usize]));
        }
    }
}

/// A protocol violation: the connection is closed.
#[derive(Debug)]
struct Violation(String);

fn violation<T>(msg: impl Into<String>) -> Result<T, Violation> {
    Err(Violation(msg.into()))
}

impl From<io::Error> for Violation {
    fn from(e: io::Error) -> Violation {
        Violation(e.to_string())
    }
}

/// A stream a connection runs over: the socket, or TLS over it after
/// `NBD_OPT_STARTTLS`.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type BoxIo = Box<dyn Io>;

/// The TLS of a listener: every client must upgrade with `NBD_OPT_STARTTLS`
/// before any other option (a plaintext option is answered
/// `NBD_REP_ERR_TLS_REQD`), and, with a policy, may open only the exports
/// its certificate's subject is granted.
pub struct Tls {
    /// The server's TLS configuration (with or without client certificates).
    pub config: Arc<rustls::ServerConfig>,
    /// Who may open what; `None`: every client may open every export.
    pub policy: Option<Arc<crate::policy::ExportsPolicy>>,
}

/// Serves one client connection to its end; `admitted` is its place
/// ([`Server::admit`]), `tls` the listener's TLS, if it has any. `peer`
/// names it in logs.
pub async fn serve_connection<S>(stream: S, server: Arc<Server>, admitted: OwnedSemaphorePermit, peer: String, tls: Option<Arc<Tls>>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stats = &server.stats;
    stats.connections.fetch_add(1, Ordering::Relaxed);
    stats.connections_total.fetch_add(1, Ordering::Relaxed);
    let mut conn = None;
    let result = async {
        let timeout = server.limits.client_timeout;
        let handshake = tokio::time::timeout(timeout, handshake(Box::new(stream), &server.exports, tls.as_deref())).await;
        let Ok(agreed) = handshake else {
            stats.timed_out.fetch_add(1, Ordering::Relaxed);
            return violation(format!("no handshake within {timeout:?}"));
        };
        let (io, session) = agreed?;
        let (rd, wr) = tokio::io::split(io);
        let c = Arc::new(Connection { writer: Mutex::new(wr), broken: AtomicBool::new(false), gone: Notify::new() });
        conn = Some(c.clone());
        let Some(session) = session else { return Ok(()) };
        transmission(rd, c, session, server.clone()).await
    }
    .await;
    if let Err(Violation(msg)) = result {
        if !msg.contains("early eof") && !msg.contains("reset by peer") && !msg.contains("Broken pipe") && !msg.contains("close_notify") {
            stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("nbd: closing connection from {peer}: {msg}");
        }
    }
    if let Some(conn) = conn.filter(|c| !c.broken.load(Ordering::Relaxed)) {
        let _ = tokio::time::timeout(server.limits.client_timeout, async { conn.writer.lock().await.shutdown().await }).await;
    }
    stats.connections.fetch_sub(1, Ordering::Relaxed);
    drop(admitted);
}

/// The writing side of a connection, shared by its requests.
struct Connection<S> {
    writer: Mutex<tokio::io::WriteHalf<S>>,
    /// Set when a reply could not be written in time: nothing more is sent.
    broken: AtomicBool,
    /// Wakes the request reader when the connection breaks.
    gone: Notify,
}

impl<S: AsyncWrite> Connection<S> {
    /// Writes a whole reply, unless the connection is broken; a client that
    /// does not take it within `timeout` breaks the connection.
    async fn send(&self, bytes: &[u8], timeout: Duration) -> Result<(), Violation> {
        if self.broken.load(Ordering::Relaxed) {
            return violation("connection closed");
        }
        let mut w = self.writer.lock().await;
        if self.broken.load(Ordering::Relaxed) {
            return violation("connection closed");
        }
        // Flushed: over TLS the last record would otherwise wait in the
        // session for the next reply, and the client for it.
        match tokio::time::timeout(timeout, async {
            w.write_all(bytes).await?;
            w.flush().await
        })
        .await
        {
            Ok(r) => Ok(r?),
            Err(_) => {
                self.broken.store(true, Ordering::Relaxed);
                self.gone.notify_one();
                violation(format!("the client took no reply for {timeout:?}"))
            }
        }
    }
}

/// What the handshake agreed on.
struct Session {
    device: Arc<dyn Device>,
    structured: bool,
    allocation: bool,
}

type Writer<S> = Arc<Connection<S>>;

async fn option_reply(io: &mut BoxIo, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(20 + data.len());
    m.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    io.write_all(&m).await?;
    io.flush().await
}

fn transmission_flags(device: &dyn Device, structured: bool) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_CAN_MULTI_CONN | TF_SEND_CACHE;
    if device.writable() {
        f |= TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
    } else {
        f |= TF_READ_ONLY;
    }
    if structured {
        f |= TF_SEND_DF;
    }
    f
}

/// Reads a length-prefixed string from an option payload.
fn take_string(data: &[u8], at: &mut usize) -> Result<String, Violation> {
    let Some(len) = data.get(*at..*at + 4) else { return violation("option payload too short") };
    let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
    *at += 4;
    let Some(s) = data.get(*at..*at + len) else { return violation("option string runs past the payload") };
    *at += len;
    String::from_utf8(s.to_vec()).or_else(|_| violation("option string is not UTF-8"))
}

/// Opens an export on a blocking thread (it may read and decrypt a
/// manifest); the reason it cannot be opened, to tell the client.
async fn open_export(exports: &Arc<dyn Exports>, name: &str) -> Result<Arc<dyn Device>, String> {
    let (exports, name) = (Arc::clone(exports), name.to_owned());
    match tokio::task::spawn_blocking(move || exports.open(&name)).await {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Parses a meta context request: export name, then queries, nothing after.
fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut at = 0;
    let name = take_string(data, &mut at).ok()?;
    let n = u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?);
    at += 4;
    let mut queries = Vec::new();
    for _ in 0..n {
        queries.push(take_string(data, &mut at).ok()?);
    }
    (at == data.len()).then_some((name, queries))
}

/// Who the client is, once TLS says so, and what it may open.
struct Client<'t> {
    /// The subject of its certificate.
    identity: Option<String>,
    policy: Option<&'t crate::policy::ExportsPolicy>,
}

impl Client<'_> {
    fn may_open(&self, export: &str) -> bool {
        self.policy.is_none_or(|p| p.allows(self.identity.as_deref(), export))
    }
}

/// Opens `name` for `client`: refused by policy, or the reason it cannot
/// be opened.
async fn open_for(client: &Client<'_>, exports: &Arc<dyn Exports>, name: &str) -> Result<Arc<dyn Device>, (u32, String)> {
    if !client.may_open(name) {
        return Err((REP_ERR_POLICY, format!("{} may not open {name:?}", client.identity.as_deref().unwrap_or("this client"))));
    }
    open_export(exports, name).await.map_err(|why| (REP_ERR_UNKNOWN, why))
}

async fn handshake(mut io: BoxIo, exports: &Arc<dyn Exports>, tls: Option<&Tls>) -> Result<(BoxIo, Option<Session>), Violation> {
    let mut hello = NBDMAGIC.to_be_bytes().to_vec();
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    io.write_all(&hello).await?;
    io.flush().await?;
    let client_flags = io.read_u32().await?;
    if client_flags & !(FLAG_FIXED_NEWSTYLE as u32 | FLAG_NO_ZEROES as u32) != 0 {
        return violation(format!("unknown client flags {client_flags:#x}"));
    }
    let no_zeroes = client_flags & FLAG_NO_ZEROES as u32 != 0;
    let mut structured = false;
    let mut allocation = false;
    let mut secured = false;
    let mut client = Client { identity: None, policy: tls.and_then(|t| t.policy.as_deref()) };
    loop {
        if io.read_u64().await? != IHAVEOPT {
            return violation("option without the IHAVEOPT magic");
        }
        let opt = io.read_u32().await?;
        let len = io.read_u32().await?;
        if len > MAX_OPTION {
            return violation(format!("option {opt} of {len} bytes"));
        }
        let mut data = vec![0u8; len as usize];
        io.read_exact(&mut data).await?;
        // A listener with TLS takes nothing in clear but STARTTLS and ABORT.
        if let (Some(tls), false) = (tls, secured) {
            match opt {
                OPT_STARTTLS if len != 0 => option_reply(&mut io, opt, REP_ERR_INVALID, b"STARTTLS takes no data").await?,
                OPT_STARTTLS => {
                    option_reply(&mut io, opt, REP_ACK, &[]).await?;
                    let stream =
                        tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.config)).accept(io).await.map_err(|e| Violation(format!("TLS handshake: {e}")))?;
                    client.identity = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|leaf| crate::policy::subject(leaf));
                    io = Box::new(stream);
                    secured = true;
                    // Nothing negotiated in clear carries over.
                    (structured, allocation) = (false, false);
                }
                OPT_ABORT => {
                    let _ = option_reply(&mut io, opt, REP_ACK, &[]).await;
                    return Ok((io, None));
                }
                // It cannot be answered with an error: the connection ends.
                OPT_EXPORT_NAME => return violation("EXPORT_NAME before STARTTLS on a TLS-only server"),
                _ => option_reply(&mut io, opt, REP_ERR_TLS_REQD, b"this server requires TLS: use NBD_OPT_STARTTLS (nbds://)").await?,
            }
            continue;
        }
        match opt {
            OPT_STARTTLS if secured => option_reply(&mut io, opt, REP_ERR_INVALID, b"TLS is already on").await?,
            OPT_STARTTLS => option_reply(&mut io, opt, REP_ERR_UNSUP, b"this listener has no TLS").await?,
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let device = match open_for(&client, exports, &name).await {
                    Ok(d) => d,
                    Err((_, why)) => return violation(format!("export {name:?}: {why}")),
                };
                let mut m = device.size().to_be_bytes().to_vec();
                m.extend_from_slice(&transmission_flags(device.as_ref(), structured).to_be_bytes());
                if !no_zeroes {
                    m.extend_from_slice(&[0u8; 124]);
                }
                io.write_all(&m).await?;
                io.flush().await?;
                return Ok((io, Some(Session { device, structured, allocation })));
            }
            OPT_ABORT => {
                let _ = option_reply(&mut io, opt, REP_ACK, &[]).await;
                return Ok((io, None));
            }
            OPT_LIST => {
                if len != 0 {
                    option_reply(&mut io, opt, REP_ERR_INVALID, b"LIST takes no data").await?;
                    continue;
                }
                for name in exports.names().into_iter().filter(|n| client.may_open(n)) {
                    let mut m = (name.len() as u32).to_be_bytes().to_vec();
                    m.extend_from_slice(name.as_bytes());
                    option_reply(&mut io, opt, REP_SERVER, &m).await?;
                }
                option_reply(&mut io, opt, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let mut at = 0;
                let name = take_string(&data, &mut at)?;
                let Some(n) = data.get(at..at + 2) else { return violation("INFO/GO without a request count") };
                let n = u16::from_be_bytes(n.try_into().expect("2 bytes")) as usize;
                at += 2;
                if data.len() != at + 2 * n {
                    option_reply(&mut io, opt, REP_ERR_INVALID, b"malformed information requests").await?;
                    continue;
                }
                let wanted: Vec<u16> = data[at..].chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
                let device = match open_for(&client, exports, &name).await {
                    Ok(d) => d,
                    Err((code, why)) => {
                        option_reply(&mut io, opt, code, why.as_bytes()).await?;
                        continue;
                    }
                };
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&device.size().to_be_bytes());
                info.extend_from_slice(&transmission_flags(device.as_ref(), structured).to_be_bytes());
                option_reply(&mut io, opt, REP_INFO, &info).await?;
                if wanted.contains(&INFO_NAME) {
                    let mut m = INFO_NAME.to_be_bytes().to_vec();
                    m.extend_from_slice(name.as_bytes());
                    option_reply(&mut io, opt, REP_INFO, &m).await?;
                }
                if wanted.contains(&INFO_BLOCK_SIZE) {
                    let mut m = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    for v in [1u32, 4096, MAX_REQUEST] {
                        m.extend_from_slice(&v.to_be_bytes());
                    }
                    option_reply(&mut io, opt, REP_INFO, &m).await?;
                }
                option_reply(&mut io, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    return Ok((io, Some(Session { device, structured, allocation })));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    option_reply(&mut io, opt, REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data").await?;
                    continue;
                }
                structured = true;
                option_reply(&mut io, opt, REP_ACK, &[]).await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let listing = opt == OPT_LIST_META_CONTEXT;
                if !listing {
                    // The set is replaced, even when this request fails.
                    allocation = false;
                }
                if !structured {
                    option_reply(&mut io, opt, REP_ERR_INVALID, b"negotiate structured replies first").await?;
                    continue;
                }
                let Some((name, queries)) = parse_meta_request(&data) else {
                    option_reply(&mut io, opt, REP_ERR_INVALID, b"malformed meta context request").await?;
                    continue;
                };
                if let Err((code, why)) = open_for(&client, exports, &name).await {
                    option_reply(&mut io, opt, code, why.as_bytes()).await?;
                    continue;
                }
                let matches = |q: &str| q == "base:allocation" || (listing && q == "base:");
                if (listing && queries.is_empty()) || queries.iter().any(|q| matches(q)) {
                    // Listing does not select: its context id is 0.
                    let id = if listing { 0 } else { ALLOCATION_CONTEXT };
                    let mut m = id.to_be_bytes().to_vec();
                    m.extend_from_slice(b"base:allocation");
                    option_reply(&mut io, opt, REP_META_CONTEXT, &m).await?;
                    if !listing {
                        allocation = true;
                    }
                }
                option_reply(&mut io, opt, REP_ACK, &[]).await?;
            }
            _ => option_reply(&mut io, opt, REP_ERR_UNSUP, b"unsupported option").await?,
        }
    }
}

/// One request as read from the wire.
struct Request {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    length: u32,
    payload: Vec<u8>,
}

async fn transmission<S>(mut rd: tokio::io::ReadHalf<S>, conn: Writer<S>, session: Session, server: Arc<Server>) -> Result<(), Violation>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let session = Arc::new(session);
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let share = server.share();
    loop {
        let mut head = [0u8; 28];
        tokio::select! {
            read = rd.read_exact(&mut head) => { read?; }
            () = conn.gone.notified() => {
                server.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                return violation("the client stopped taking replies");
            }
        }
        let magic = u32::from_be_bytes(head[0..4].try_into().expect("4 bytes"));
        if magic != REQUEST_MAGIC {
            return violation(format!("bad request magic {magic:#x}"));
        }
        let mut req = Request {
            flags: u16::from_be_bytes(head[4..6].try_into().expect("2 bytes")),
            kind: u16::from_be_bytes(head[6..8].try_into().expect("2 bytes")),
            cookie: u64::from_be_bytes(head[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(head[16..24].try_into().expect("8 bytes")),
            length: u32::from_be_bytes(head[24..28].try_into().expect("4 bytes")),
            payload: Vec::new(),
        };
        if req.kind == CMD_DISC {
            // Let requests in flight finish, then close.
            let _ = slots.acquire_many(MAX_IN_FLIGHT as u32).await;
            return Ok(());
        }
        let permit = slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        // The buffer this request needs is granted before it exists: a
        // flood waits here, and stops reading more requests.
        let buffer = match req.kind {
            CMD_WRITE => {
                if req.length > MAX_REQUEST {
                    return violation(format!("write of {} bytes (limit {MAX_REQUEST})", req.length));
                }
                let buffer = server.buffer(&share, req.length as u64).await;
                req.payload = vec![0u8; req.length as usize];
                rd.read_exact(&mut req.payload).await?;
                Some(buffer)
            }
            CMD_READ | CMD_CACHE if req.length <= MAX_REQUEST => Some(server.buffer(&share, req.length as u64).await),
            _ => None,
        };
        let (session, conn, server) = (session.clone(), conn.clone(), server.clone());
        tokio::spawn(async move {
            let stats = &server.stats;
            let started = Instant::now();
            let op = (req.kind as usize).min(OP_NAMES.len());
            if let Some(c) = stats.requests.get(op) {
                c.fetch_add(1, Ordering::Relaxed);
            }
            let reply = answer(&session, req).await;
            if let (true, Some(c)) = (reply.failed, stats.errors.get(op)) {
                c.fetch_add(1, Ordering::Relaxed);
            }
            let _ = conn.send(&reply.bytes, server.limits.client_timeout).await;
            if let Some(h) = stats.latency.get(op) {
                h.observe(started.elapsed());
            }
            drop((reply, buffer, permit));
        });
    }
}

/// A reply, ready to write.
struct Reply {
    bytes: Vec<u8>,
    failed: bool,
}

fn simple(cookie: u64, error: u32, data: &[u8]) -> Reply {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&error.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(data);
    Reply { bytes: m, failed: error != 0 }
}

fn structured_chunk(out: &mut Vec<u8>, cookie: u64, flags: u16, kind: u16, payload: &[&[u8]]) {
    let len: usize = payload.iter().map(|p| p.len()).sum();
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&(len as u32).to_be_bytes());
    for p in payload {
        out.extend_from_slice(p);
    }
}

/// An error reply in the form the session and command call for.
fn error_reply(session: &Session, req: &Request, error: u32, msg: &str) -> Reply {
    if session.structured && (req.kind == CMD_READ || req.kind == CMD_BLOCK_STATUS) {
        let mut m = Vec::new();
        let mut cut = msg.len().min(4096);
        while !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        let msg = &msg.as_bytes()[..cut];
        structured_chunk(&mut m, req.cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, &[&error.to_be_bytes(), &(msg.len() as u16).to_be_bytes(), msg]);
        Reply { bytes: m, failed: true }
    } else {
        simple(req.cookie, error, &[])
    }
}

fn errno_of(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ENOSPC,
        _ if e.kind() == io::ErrorKind::InvalidInput => EINVAL,
        _ => EIO,
    }
}

async fn answer(session: &Arc<Session>, req: Request) -> Reply {
    let size = session.device.size();
    let in_range = req.offset.checked_add(req.length as u64).is_some_and(|end| end <= size);
    match req.kind {
        CMD_WRITE | CMD_WRITE_ZEROES if !in_range && session.device.writable() => error_reply(session, &req, ENOSPC, "write past the end of the export"),
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS | CMD_CACHE if !in_range => {
            error_reply(session, &req, EINVAL, "request past the end of the export")
        }
        CMD_BLOCK_STATUS if req.length == 0 => error_reply(session, &req, EINVAL, "block status of zero bytes"),
        CMD_READ | CMD_CACHE if req.length > MAX_REQUEST => error_reply(session, &req, EINVAL, "request too large"),
        CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES if !session.device.writable() => error_reply(session, &req, EPERM, "export is read-only"),
        CMD_READ | CMD_CACHE => {
            let (offset, len) = (req.offset, req.length as usize);
            // The reply is built around the data: the device reads straight
            // into it, after room for the header.
            let head = if session.structured { 28 } else { 16 };
            let mut m = vec![0u8; head + len];
            // Chunks in memory are served here; anything else on a blocking thread.
            let read = match session.device.read_cached(offset, &mut m[head..]) {
                Some(r) => r.map(|()| m),
                None => {
                    let s = session.clone();
                    tokio::task::spawn_blocking(move || s.device.read(offset, &mut m[head..]).map(|()| m))
                        .await
                        .unwrap_or_else(|e| Err(io::Error::other(e.to_string())))
                }
            };
            match read {
                Err(e) => {
                    tracing::error!("nbd: read of {len} bytes at {offset}: {e}");
                    error_reply(session, &req, errno_of(&e), &e.to_string())
                }
                Ok(_) if req.kind == CMD_CACHE => simple(req.cookie, 0, &[]),
                Ok(_) if session.structured && len == 0 => {
                    let mut m = Vec::new();
                    structured_chunk(&mut m, req.cookie, REPLY_FLAG_DONE, 0, &[]);
                    Reply { bytes: m, failed: false }
                }
                Ok(m) if session.structured && tessera_chunk::is_zero(&m[head..]) => {
                    let mut r = Vec::new();
                    structured_chunk(&mut r, req.cookie, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, &[&req.offset.to_be_bytes(), &req.length.to_be_bytes()]);
                    Reply { bytes: r, failed: false }
                }
                Ok(mut m) if session.structured => {
                    let mut h = Vec::with_capacity(head);
                    structured_chunk(&mut h, req.cookie, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, &[]);
                    h[16..20].copy_from_slice(&(8 + len as u32).to_be_bytes());
                    h.extend_from_slice(&req.offset.to_be_bytes());
                    m[..head].copy_from_slice(&h);
                    Reply { bytes: m, failed: false }
                }
                Ok(mut m) => {
                    m[..head].copy_from_slice(&simple(req.cookie, 0, &[]).bytes);
                    Reply { bytes: m, failed: false }
                }
            }
        }
        CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_FLUSH => {
            let s = session.clone();
            let fua = req.flags & CMD_FLAG_FUA != 0;
            let (kind, offset, length) = (req.kind, req.offset, req.length as u64);
            let payload = req.payload;
            let done = tokio::task::spawn_blocking(move || {
                match kind {
                    CMD_WRITE => s.device.write(offset, &payload)?,
                    CMD_TRIM | CMD_WRITE_ZEROES => s.device.zero(offset, length)?,
                    _ => {}
                }
                if fua || kind == CMD_FLUSH {
                    s.device.flush()?;
                }
                Ok::<(), io::Error>(())
            })
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
            match done {
                Ok(()) => simple(req.cookie, 0, &[]),
                Err(e) => {
                    tracing::error!("nbd: {} at {offset}: {e}", OP_NAMES[kind as usize]);
                    simple(req.cookie, errno_of(&e), &[])
                }
            }
        }
        CMD_BLOCK_STATUS => {
            if !session.allocation {
                return error_reply(session, &req, EINVAL, "base:allocation was not negotiated");
            }
            let s = session.clone();
            let (offset, length) = (req.offset, req.length as u64);
            let runs = tokio::task::spawn_blocking(move || s.device.allocation(offset, length)).await.unwrap_or_default();
            if runs.is_empty() {
                return error_reply(session, &req, EIO, "no allocation information");
            }
            let mut payload = ALLOCATION_CONTEXT.to_be_bytes().to_vec();
            for (len, hole) in runs.iter().take(if req.flags & CMD_FLAG_REQ_ONE != 0 { 1 } else { usize::MAX }) {
                payload.extend_from_slice(&(*len as u32).to_be_bytes());
                payload.extend_from_slice(&(if *hole { 3u32 } else { 0 }).to_be_bytes());
            }
            let mut m = Vec::new();
            structured_chunk(&mut m, req.cookie, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, &[&payload]);
            Reply { bytes: m, failed: false }
        }
        _ => simple(req.cookie, EINVAL, &[]),
    }
}
