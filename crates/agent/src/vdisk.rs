//! A manifest as a disk: reads map to chunks, holes read as zeros without a
//! fetch, and every chunk is checked before its bytes are served.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tessera_cache::{FetchContext, Loader, Plain, Tier};
use tessera_chunk::{ChunkRef, Manifest, CHUNK_SIZE};

/// Chunks read through one device (one VM's disk, say), by the tier that
/// had them: the agent's own counters are for all devices together.
#[derive(Debug, Default)]
pub struct ReadCounts([AtomicU64; Tier::ALL.len()]);

impl ReadCounts {
    fn add(&self, tier: Tier) {
        if let Some(i) = Tier::ALL.iter().position(|t| *t == tier) {
            self.0[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Chunk reads by tier label (`memory`, `disk`, `peer`, `cache`, `origin`).
    pub fn by_tier(&self) -> BTreeMap<String, u64> {
        Tier::ALL.iter().zip(&self.0).map(|(t, n)| (t.label().to_owned(), n.load(Ordering::Relaxed))).collect()
    }
}

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
        source: Box<tessera_cache::Error>,
    },
}

/// The read-only disk of one image version.
pub struct VirtualDisk {
    name: String,
    ctx: FetchContext,
    manifest_id: String,
    manifest: Manifest,
    loader: Arc<Loader>,
    /// While recording a start-up profile: chunks in first-touch order, with when.
    recording: Mutex<Option<Recording>>,
}

struct Recording {
    seen: HashSet<u64>,
    order: Vec<(u64, Instant)>,
    seen_blocks: HashSet<u64>,
    blocks: Vec<(u64, Instant)>,
}

/// The unit of a profile's blocks: the filesystem's block.
const PROFILE_BLOCK: u64 = 4096;

/// What a recording saw up to its cut-off.
#[derive(Debug, Default)]
pub struct Recorded {
    /// Chunks, in first-touch order.
    pub chunks: Vec<u64>,
    /// 4 KiB blocks, in first-touch order, as `[first, count]` runs.
    pub blocks: Vec<[u64; 2]>,
}

impl Recorded {
    /// Adds block `b` as the next one read (extending the last run when it follows it).
    pub fn push_block(&mut self, b: u64) {
        match self.blocks.last_mut() {
            Some(run) if run[0] + run[1] == b => run[1] += 1,
            _ => self.blocks.push([b, 1]),
        }
    }
}

impl VirtualDisk {
    /// The disk of `manifest` (named `name`, which points at it as `r`).
    pub fn new(name: &str, r: &tessera_store::ImageRef, manifest: Manifest, loader: Arc<Loader>) -> VirtualDisk {
        VirtualDisk { name: name.to_owned(), ctx: FetchContext::of(name, r), manifest_id: r.manifest.clone(), manifest, loader, recording: Mutex::new(None) }
    }

    /// The disk, read for `function` (`None`: for a function named after the image).
    pub fn read_for(mut self, function: Option<std::sync::Arc<str>>) -> VirtualDisk {
        self.ctx.function = function;
        self
    }

    /// Fetches chunk `index` into the caches (a no-op for a hole), as a
    /// read would; for prefetching.
    pub fn warm(&self, index: u64, counts: Option<&ReadCounts>) -> Result<(), tessera_cache::Error> {
        match self.manifest.chunks.get(index as usize) {
            Some(Some(r)) => self.loader.read(r, &self.ctx).map(|(_, tier)| {
                if let Some(c) = counts {
                    c.add(tier);
                }
            }),
            _ => Ok(()),
        }
    }

    /// The loader this disk reads through.
    pub fn loader(&self) -> &Arc<Loader> {
        &self.loader
    }

    /// Starts recording which chunks are read, in first-touch order;
    /// false (and nothing changes) if a recording is already going on.
    pub fn start_recording(&self) -> bool {
        let mut recording = self.recording.lock().expect("no panics while holding the lock");
        if recording.is_some() {
            return false;
        }
        *recording = Some(Recording { seen: HashSet::new(), order: Vec::new(), seen_blocks: HashSet::new(), blocks: Vec::new() });
        true
    }

    /// Stops recording; returns the chunks and blocks first read up to `until`.
    pub fn stop_recording(&self, until: Instant) -> Recorded {
        let Some(r) = self.recording.lock().expect("no panics while holding the lock").take() else { return Recorded::default() };
        let mut out = Recorded { chunks: r.order.into_iter().filter(|(_, t)| *t <= until).map(|(i, _)| i).collect(), blocks: Vec::new() };
        for (b, _) in r.blocks.into_iter().filter(|(_, t)| *t <= until) {
            out.push_block(b);
        }
        out
    }

    /// Notes a read of `len` bytes at `pos`, all in chunk `index`.
    fn note(&self, index: u64, pos: u64, len: usize) {
        if let Some(r) = self.recording.lock().expect("no panics while holding the lock").as_mut() {
            let now = Instant::now();
            if r.seen.insert(index) {
                r.order.push((index, now));
            }
            for b in pos / PROFILE_BLOCK..(pos + len as u64).div_ceil(PROFILE_BLOCK) {
                if r.seen_blocks.insert(b) {
                    r.blocks.push((b, now));
                }
            }
        }
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
    /// Never blocks on I/O. Counts each chunk read in `counts` as a memory read.
    pub fn read_cached(&self, buf: &mut [u8], offset: u64, counts: Option<&ReadCounts>) -> bool {
        if !self.in_range(buf, offset) || buf.is_empty() {
            return false;
        }
        // Look before touching, so a read that must block counts its chunks once.
        let first = offset / CHUNK_SIZE as u64;
        let last = (offset + buf.len() as u64 - 1) / CHUNK_SIZE as u64;
        let all_there = (first..=last).all(|i| match &self.manifest.chunks[i as usize] {
            None => true,
            Some(r) => self.loader.in_memory(&r.id),
        });
        all_there
            && self
                .fill(buf, offset, |_, r| {
                    let plain = self.loader.cached(r);
                    if let (Some(c), Some(_)) = (counts, &plain) {
                        c.add(Tier::Memory);
                    }
                    Ok::<_, ()>(plain)
                })
                .unwrap_or(false)
    }

    /// Fills `buf` with the bytes at `offset`. Blocks on fetches.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ReadError> {
        self.read_counted(buf, offset, None)
    }

    /// [`VirtualDisk::read_at`], counting each chunk read in `counts`.
    pub fn read_counted(&self, buf: &mut [u8], offset: u64, counts: Option<&ReadCounts>) -> Result<(), ReadError> {
        if !self.in_range(buf, offset) {
            return Err(ReadError::OutOfRange { image: self.name.clone(), offset, len: buf.len(), size: self.size() });
        }
        self.fill(buf, offset, |index, r| match self.loader.read(r, &self.ctx) {
            Ok((plain, tier)) => {
                if let Some(c) = counts {
                    c.add(tier);
                }
                Ok(Some(plain))
            }
            Err(source) => Err(ReadError::Chunk { image: self.name.clone(), index, source: Box::new(source) }),
        })
        .map(|_| ())
    }

    fn in_range(&self, buf: &[u8], offset: u64) -> bool {
        offset.checked_add(buf.len() as u64).is_some_and(|end| end <= self.size())
    }

    /// Copies each chunk's part of `[offset, offset + buf.len())` into
    /// `buf`: zeros for holes, else what `plain_of` returns; stops with
    /// `Ok(false)` when it returns `None`.
    fn fill<E>(&self, buf: &mut [u8], offset: u64, mut plain_of: impl FnMut(u64, &ChunkRef) -> Result<Option<Plain>, E>) -> Result<bool, E> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos / CHUNK_SIZE as u64;
            let within = (pos % CHUNK_SIZE as u64) as usize;
            let n = (CHUNK_SIZE - within).min(buf.len() - done);
            match &self.manifest.chunks[index as usize] {
                None => buf[done..done + n].fill(0),
                Some(r) => match plain_of(index, r).inspect(|p| {
                    if p.is_some() {
                        self.note(index, pos, n)
                    }
                })? {
                    Some(plain) => buf[done..done + n].copy_from_slice(&plain[within..within + n]),
                    None => return Ok(false),
                },
            }
            done += n;
        }
        Ok(true)
    }
}
