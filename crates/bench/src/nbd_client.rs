//! A minimal blocking NBD client (fixed newstyle, `NBD_OPT_GO`, simple
//! replies, one request at a time, or requests sent without waiting): enough
//! to measure any NBD server the same way.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// A connection in the transmission phase.
pub struct Client {
    sock: UnixStream,
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
        let mut sock = UnixStream::connect(path)?;
        sock.set_read_timeout(Some(std::time::Duration::from_secs(60)))?;
        let mut hello = [0u8; 18];
        sock.read_exact(&mut hello)?;
        if &hello[..8] != b"NBDMAGIC" || &hello[8..16] != b"IHAVEOPT" {
            return Err(bad("not a newstyle NBD server"));
        }
        sock.write_all(&3u32.to_be_bytes())?; // fixed newstyle, no zeroes
        let mut go = Vec::new();
        go.extend_from_slice(b"IHAVEOPT");
        go.extend_from_slice(&7u32.to_be_bytes());
        go.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        go.extend_from_slice(&(export.len() as u32).to_be_bytes());
        go.extend_from_slice(export.as_bytes());
        go.extend_from_slice(&0u16.to_be_bytes());
        sock.write_all(&go)?;
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
        self.sock.write_all(&req)
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
