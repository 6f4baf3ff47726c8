//! A minimal blocking NBD client (fixed newstyle, `NBD_OPT_GO`, simple
//! replies, one request at a time, or requests sent without waiting): enough
//! to measure any NBD server the same way.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A stream the client talks over.
trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// Where an NBD server is, and how to reach it.
#[derive(Clone, Debug)]
pub enum Server {
    /// A unix socket.
    Unix(PathBuf),
    /// `HOST:PORT`, with TLS when given.
    Tcp(String, Option<TlsClient>),
}

/// How the client does TLS (`NBD_OPT_STARTTLS`).
#[derive(Clone, Debug)]
pub struct TlsClient {
    /// The CA of the server's certificate (PEM).
    pub ca: PathBuf,
    /// The client's certificate and key (PEM), for servers that ask.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The name the server's certificate must carry.
    pub server_name: String,
}

/// A connection in the transmission phase.
pub struct Client {
    sock: Box<dyn Stream>,
    /// Bytes of the export.
    pub size: u64,
    cookie: u64,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Client {
    /// Connects to `export` on the unix socket `path`.
    pub fn connect(path: &Path, export: &str) -> io::Result<Client> {
        Client::open(&Server::Unix(path.to_owned()), export)
    }

    /// Connects to `export` on `server`.
    pub fn open(server: &Server, export: &str) -> io::Result<Client> {
        let timeout = Some(std::time::Duration::from_secs(60));
        let (mut sock, tls): (Box<dyn Stream>, _) = match server {
            Server::Unix(path) => {
                let s = UnixStream::connect(path)?;
                s.set_read_timeout(timeout)?;
                (Box::new(s), None)
            }
            Server::Tcp(addr, tls) => {
                let s = TcpStream::connect(addr)?;
                s.set_read_timeout(timeout)?;
                s.set_nodelay(true)?;
                (Box::new(QuickAck(s)), tls.as_ref())
            }
        };
        let mut hello = [0u8; 18];
        sock.read_exact(&mut hello)?;
        if &hello[..8] != b"NBDMAGIC" || &hello[8..16] != b"IHAVEOPT" {
            return Err(bad("not a newstyle NBD server"));
        }
        sock.write_all(&3u32.to_be_bytes())?; // fixed newstyle, no zeroes
        if let Some(tls) = tls {
            sock = start_tls(sock, tls)?;
        }
        let mut go = Vec::new();
        go.extend_from_slice(b"IHAVEOPT");
        go.extend_from_slice(&7u32.to_be_bytes());
        go.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        go.extend_from_slice(&(export.len() as u32).to_be_bytes());
        go.extend_from_slice(export.as_bytes());
        go.extend_from_slice(&0u16.to_be_bytes());
        sock.write_all(&go)?;
        sock.flush()?;
        let mut size = None;
        loop {
            let mut head = [0u8; 20];
            sock.read_exact(&mut head)?;
            let kind = u32::from_be_bytes(head[12..16].try_into().expect("4 bytes"));
            let len = u32::from_be_bytes(head[16..20].try_into().expect("4 bytes")) as usize;
            let mut data = vec![0u8; len];
            sock.read_exact(&mut data)?;
            match kind {
                1 => break, // ACK
                3 if len >= 12 && data[..2] == [0, 0] => size = Some(u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"))),
                3 => {}
                k if k >= 1 << 31 => return Err(bad(format!("export {export:?} refused: {}", String::from_utf8_lossy(&data)))),
                _ => {}
            }
        }
        Ok(Client { sock, size: size.ok_or_else(|| bad("no export size"))?, cookie: 0 })
    }

    /// Sends a read of `len` bytes at `offset` without waiting for the reply.
    pub fn send_read(&mut self, offset: u64, len: u32) -> io::Result<()> {
        self.cookie += 1;
        let mut req = Vec::with_capacity(28);
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&self.cookie.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        self.sock.write_all(&req)?;
        // Over TLS a request would otherwise wait in the session.
        self.sock.flush()
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.send_read(offset, buf.len() as u32)?;
        let mut head = [0u8; 16];
        self.sock.read_exact(&mut head)?;
        let error = u32::from_be_bytes(head[4..8].try_into().expect("4 bytes"));
        if error != 0 {
            return Err(io::Error::other(format!("server error {error}")));
        }
        self.sock.read_exact(buf)
    }
}

/// A TCP socket that acknowledges at once after every read: a server that
/// sends a reply in two writes without `TCP_NODELAY` (qemu-nbd over TLS
/// does) would otherwise wait for a delayed ACK (~40 ms) per request, which
/// a client with requests in flight never suffers.
struct QuickAck(TcpStream);

impl Read for QuickAck {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.0.read(buf)?;
        let one: libc::c_int = 1;
        // SAFETY: the descriptor is the open socket `self.0` owns; the option value is a valid c_int.
        unsafe {
            libc::setsockopt(
                std::os::unix::io::AsRawFd::as_raw_fd(&self.0),
                libc::IPPROTO_TCP,
                libc::TCP_QUICKACK,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        Ok(n)
    }
}

impl Write for QuickAck {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// `NBD_OPT_STARTTLS`, then a rustls client over the same socket.
fn start_tls(mut sock: Box<dyn Stream>, tls: &TlsClient) -> io::Result<Box<dyn Stream>> {
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&5u32.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    sock.write_all(&opt)?;
    let mut head = [0u8; 20];
    sock.read_exact(&mut head)?;
    let len = u32::from_be_bytes(head[16..20].try_into().expect("4 bytes")) as usize;
    sock.read_exact(&mut vec![0u8; len])?;
    if u32::from_be_bytes(head[12..16].try_into().expect("4 bytes")) != 1 {
        return Err(bad("the server refused STARTTLS"));
    }
    let identity = tls.identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
    let config = tessera_cache::tls::client_config(&tls.ca, identity).map_err(io::Error::other)?;
    let name = rustls::pki_types::ServerName::try_from(tls.server_name.clone()).map_err(|e| bad(e.to_string()))?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(io::Error::other)?;
    Ok(Box::new(rustls::StreamOwned::new(conn, sock)))
}
