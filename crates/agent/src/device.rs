//! The block device seam: what every frontend (NBD, the FUSE file, and
//! vhost-user-blk) serves, and the set of exports they look devices up in.

use std::io;
use std::sync::Arc;

/// A block device behind an export. Calls may block: frontends make them
/// from threads that may wait on I/O.
///
/// Contract: reads and writes are within `size()` (frontends check);
/// `read` fills the whole buffer or fails; a read-only device refuses
/// `write` and `zero` with `EPERM`; `flush` makes every write completed
/// before it durable.
pub trait Device: Send + Sync {
    /// Bytes of the device.
    fn size(&self) -> u64;
    /// Whether writes are allowed.
    fn writable(&self) -> bool;
    /// Fills `buf` from `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Fills `bufs` in turn from `offset` (scatter: a request whose buffer is
    /// several pieces of guest memory, say).
    fn read_vectored(&self, mut offset: u64, bufs: &mut [&mut [u8]]) -> io::Result<()> {
        for b in bufs.iter_mut() {
            self.read(offset, b)?;
            offset += b.len() as u64;
        }
        Ok(())
    }
    /// Fills `buf` without blocking when it can (everything in memory);
    /// `None` when [`Device::read`] is needed.
    fn read_cached(&self, _offset: u64, _buf: &mut [u8]) -> Option<io::Result<()>> {
        None
    }
    /// Writes `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes completed writes durable.
    fn flush(&self) -> io::Result<()>;
    /// Writes zeros over `[offset, offset + len)` (also used for trim).
    fn zero(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Allocation of `[offset, offset + len)`: runs of (length, is a hole).
    fn allocation(&self, offset: u64, len: u64) -> Vec<(u64, bool)>;
}

/// The exports a frontend offers; looked up at each open, so exports added
/// while it runs are offered at once.
pub trait Exports: Send + Sync {
    /// Names to list.
    fn names(&self) -> Vec<String>;
    /// Opens export `name`, or says why not.
    fn open(&self, name: &str) -> Result<Arc<dyn Device>, ExportError>;
}

/// Why an export cannot be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The image cannot be found or opened (no such name, no keyring, a
    /// damaged manifest).
    #[error(transparent)]
    Image(#[from] tessera_store::Error),
    /// The part after `@` is not a label.
    #[error("invalid overlay label {0:?} (use A-Z a-z 0-9 . _ -)")]
    BadLabel(String),
    /// Too many overlays are open.
    #[error("{0} overlays are open, the most allowed at once: close some NAME@LABEL connections")]
    TooManyOverlays(usize),
    /// The overlay cannot be opened.
    #[error("{0}")]
    Overlay(#[source] io::Error),
}
