//! A manifest as a disk: reads map to chunks, holes read as zeros without a
//! fetch, and every chunk is checked before its bytes are served.

use std::sync::Arc;

use tessera_cache::Loader;
use tessera_chunk::{Manifest, CHUNK_SIZE};

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The range is not inside the disk.
    #[error("{image}: read of {len} bytes at {offset} is past the end ({size} bytes)")]
    OutOfRange {
        /// Image name.
        image: String,
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        len: usize,
        /// Disk size.
        size: u64,
    },
    /// A chunk could not be served.
    #[error("{image}: chunk {index}: {source}")]
    Chunk {
        /// Image name.
        image: String,
        /// Chunk index.
        index: u64,
        /// Why.
        source: tessera_cache::Error,
    },
}

/// The read-only disk of one image version.
pub struct VirtualDisk {
    name: String,
    manifest_id: String,
    manifest: Manifest,
    loader: Arc<Loader>,
}

impl VirtualDisk {
    /// The disk of `manifest` (named `name`, stored as `manifest_id`).
    pub fn new(name: &str, manifest_id: &str, manifest: Manifest, loader: Arc<Loader>) -> VirtualDisk {
        VirtualDisk { name: name.to_owned(), manifest_id: manifest_id.to_owned(), manifest, loader }
    }

    /// Bytes of the disk.
    pub fn size(&self) -> u64 {
        self.manifest.geometry.disk_bytes
    }

    /// The image name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Id of the manifest this disk serves.
    pub fn manifest_id(&self) -> &str {
        &self.manifest_id
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Whether chunk `index` is a hole (all zeros, stored nowhere).
    pub fn is_hole(&self, index: u64) -> bool {
        self.manifest.chunks.get(index as usize).is_none_or(|c| c.is_none())
    }

    /// Fills `buf` with the bytes at `offset` if every chunk it needs is a
    /// hole or in memory; returns false (with `buf` partly filled) otherwise.
    /// Never blocks on I/O.
    pub fn read_cached(&self, buf: &mut [u8], offset: u64) -> bool {
        if offset.checked_add(buf.len() as u64).is_none_or(|end| end > self.size()) {
            return false;
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos / CHUNK_SIZE as u64;
            let within = (pos % CHUNK_SIZE as u64) as usize;
            let n = (CHUNK_SIZE - within).min(buf.len() - done);
            match &self.manifest.chunks[index as usize] {
                None => buf[done..done + n].fill(0),
                Some(r) => match self.loader.cached(r) {
                    Some(plain) => buf[done..done + n].copy_from_slice(&plain[within..within + n]),
                    None => return false,
                },
            }
            done += n;
        }
        true
    }

    /// Fills `buf` with the bytes at `offset`. Blocks on fetches.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ReadError> {
        if offset.checked_add(buf.len() as u64).is_none_or(|end| end > self.size()) {
            return Err(ReadError::OutOfRange { image: self.name.clone(), offset, len: buf.len(), size: self.size() });
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos / CHUNK_SIZE as u64;
            let within = (pos % CHUNK_SIZE as u64) as usize;
            let n = (CHUNK_SIZE - within).min(buf.len() - done);
            match &self.manifest.chunks[index as usize] {
                None => buf[done..done + n].fill(0),
                Some(r) => {
                    let (plain, _) = self.loader.read(r).map_err(|source| ReadError::Chunk { image: self.name.clone(), index, source })?;
                    buf[done..done + n].copy_from_slice(&plain[within..within + n]);
                }
            }
            done += n;
        }
        Ok(())
    }
}
