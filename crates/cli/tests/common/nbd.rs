//! A hand-made NBD client, to send what a real client never would.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Speaks just enough NBD by hand to send what a real client never would.
pub struct RawClient(pub UnixStream);

impl RawClient {
    pub fn connect(socket: &std::path::Path) -> RawClient {
        let s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = RawClient(s);
        let mut hello = [0u8; 18];
        c.0.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        c.0.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
        c
    }

    pub fn option(&mut self, opt: u32, data: &[u8]) {
        let mut m = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.0.write_all(&m).unwrap();
    }

    /// EXPORT_NAME: straight into transmission.
    pub fn open(socket: &std::path::Path, export: &str) -> RawClient {
        let mut c = RawClient::connect(socket);
        c.option(1, export.as_bytes());
        let mut info = [0u8; 10];
        c.0.read_exact(&mut info).unwrap();
        c
    }

    pub fn request(&mut self, kind: u16, offset: u64, len: u32) {
        let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&7u64.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        self.0.write_all(&m).unwrap();
    }

    /// The error of a simple reply.
    pub fn simple_error(&mut self) -> u32 {
        let mut r = [0u8; 16];
        self.0.read_exact(&mut r).unwrap();
        assert_eq!(u32::from_be_bytes(r[..4].try_into().unwrap()), 0x6744_6698);
        u32::from_be_bytes(r[4..8].try_into().unwrap())
    }

    /// Whether the server closed the connection.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

impl RawClient {
    /// `GO` with structured replies off: straight into transmission, or
    /// `None` if the server refused the export.
    pub fn go(socket: &std::path::Path, export: &str) -> Option<RawClient> {
        let mut c = RawClient::connect(socket);
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        c.option(7, &data);
        loop {
            let mut head = [0u8; 20];
            c.0.read_exact(&mut head).ok()?;
            let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
            let mut body = vec![0u8; len];
            c.0.read_exact(&mut body).ok()?;
            match kind {
                1 => return Some(c),
                k if k >= 1 << 31 => return None,
                _ => {}
            }
        }
    }

    /// Connects and nothing more (not even the server's greeting is read).
    pub fn connect_raw(socket: &std::path::Path) -> RawClient {
        let s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        RawClient(s)
    }

    /// Reads a simple reply with `len` bytes of data, which must succeed.
    pub fn read_reply_data(&mut self, len: usize) -> Vec<u8> {
        assert_eq!(self.simple_error(), 0);
        let mut data = vec![0u8; len];
        self.0.read_exact(&mut data).unwrap();
        data
    }

    /// Reads a simple reply with `len` bytes of data; its error.
    pub fn read_reply(&mut self, len: usize) -> u32 {
        let error = self.simple_error();
        if error == 0 {
            let mut data = vec![0u8; len];
            self.0.read_exact(&mut data).unwrap();
        }
        error
    }
}
