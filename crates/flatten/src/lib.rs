//! Deterministic flattening of OCI layers into one ext4 filesystem image.
//!
//! A [`Flattener`] applies layer tars in order ([`Flattener::apply_layer`]),
//! writing each regular file's data straight into that layer's region of the
//! disk, and hands the disk out as [`CHUNK_BYTES`] chunks to a [`ChunkSink`]
//! as soon as each is final. When a layer ends, the ext4 metadata that layer
//! introduces follows its data in the same region; [`Flattener::finish`]
//! then writes chunk 0 (superblock, group descriptors) and the inode tables.
//!
//! Layout rules that make chunks dedup across images and versions:
//! - each layer's region starts on a chunk boundary: its file data in tar
//!   order, then its metadata (see the `layout` module);
//! - a region depends only on its layer's tar and the layers below it, so
//!   images sharing their first N layers share those layers' regions, and a
//!   new version that changes its top layer stores little beyond that layer:
//!   chunk 0, and the inode-table blocks of lower directories it changed;
//! - the same layers give the same bytes: inode numbers, times, UUID and hash
//!   seed are all derived from the input, never from the clock or a random
//!   source.
//!
//! The bytes of a file that an upper layer deletes or replaces stay in its
//! layer's region as free blocks, just as they stay in the layer blob; this
//! keeps lower-layer chunks shared between images.
//!
//! ```no_run
//! use tessera_flatten::{Flattener, Options, ChunkSink, SinkError};
//! struct Count(usize);
//! impl ChunkSink for Count {
//!     fn put_chunk(&mut self, _index: u64, _data: Vec<u8>) -> Result<(), SinkError> {
//!         self.0 += 1;
//!         Ok(())
//!     }
//! }
//! let mut sink = Count(0);
//! let mut f = Flattener::new(Options::default(), &mut sink);
//! let layer = std::fs::File::open("layer.tar").unwrap();
//! f.apply_layer("layer 1", layer).unwrap();
//! let image = f.finish().unwrap();
//! println!("{} bytes", image.disk_bytes);
//! ```
#![deny(missing_docs)]

mod ext4;
mod layer;
mod layout;
mod tree;

use std::collections::{HashMap, HashSet};
use std::io::Read;

pub use layer::LayerStats;

/// Filesystem block size.
pub const BLOCK_SIZE: u64 = 4096;
/// Bytes per chunk; layer regions start on this boundary.
pub const CHUNK_BYTES: usize = 512 * 1024;
/// Blocks per chunk.
pub(crate) const REGION_BLOCKS: u64 = CHUNK_BYTES as u64 / BLOCK_SIZE;

/// Error a [`ChunkSink`] may return (e.g. the chunk store is full).
pub type SinkError = Box<dyn std::error::Error + Send + Sync>;

/// Receives the disk, chunk by chunk, each exactly once and in any order.
/// Chunks never handed over are all zeros.
pub trait ChunkSink {
    /// Takes chunk `index` ([`CHUNK_BYTES`] bytes). `data` may be all zeros.
    fn put_chunk(&mut self, index: u64, data: Vec<u8>) -> Result<(), SinkError>;

    /// A spent buffer to fill again, if the sink keeps any (its contents do
    /// not matter). Saves allocating and zeroing a chunk per chunk.
    fn recycled(&mut self) -> Option<Vec<u8>> {
        None
    }
}

/// Flattening options.
#[derive(Clone, Debug)]
pub struct Options {
    /// Free space to leave for a writable root, in bytes (rounded up to chunks).
    pub headroom_bytes: u64,
    /// Seed for the filesystem UUID and directory hash seed; derive it from
    /// the image's digests so equal inputs give equal bytes.
    pub seed: [u8; 32],
    /// Files whose data goes together, in this order, at the end of their
    /// layer's data, right before the layer's metadata
    /// (a start-up profile's files, for `tessera optimize`), by path as the
    /// layer's tar names it, cleaned (`usr/bin/python3`). Each layer must be
    /// scanned with [`Flattener::plan_layer`] before it is applied.
    pub first: Vec<Vec<u8>>,
    /// Record where each regular file's data went ([`FlatImage::files`]).
    pub record_files: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options { headroom_bytes: 1 << 30, seed: [0; 32], first: Vec::new(), record_files: false }
    }
}

/// At most this many bytes of a layer's listed files go together (they are held in
/// memory until the layer ends); the rest of the list keeps tar order.
pub const FIRST_BYTES_MAX: u64 = 256 << 20;

/// Where a regular file's data went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacedFile {
    /// Path, as the layer's tar names it, cleaned.
    pub path: Vec<u8>,
    /// Layer (1 = the lowest).
    pub layer: u32,
    /// First block of its data (contiguous).
    pub first_block: u64,
    /// Blocks of data.
    pub blocks: u64,
}

/// Errors of flattening, naming the layer and path at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The layer is not a readable tar (corrupt, truncated, bad compression).
    #[error("{layer}: unreadable tar: {source}")]
    Tar {
        /// Layer name.
        layer: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// An entry was refused (e.g. it would write through a non-directory, or
    /// a hard link points outside the tree).
    #[error("{layer}: {path}: {reason}")]
    Entry {
        /// Layer name.
        layer: String,
        /// Path as written in the tar.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The result cannot be represented in the filesystem format.
    #[error("cannot build the filesystem: {0}")]
    Format(String),
    /// The chunk sink failed.
    #[error("storing chunk {index}: {source}")]
    Sink {
        /// Chunk index.
        index: u64,
        /// Underlying error.
        source: SinkError,
    },
}

/// The finished disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlatImage {
    /// Bytes of the disk (a whole number of chunks).
    pub disk_bytes: u64,
    /// (first chunk, chunk count) of each layer's file data; the layer's
    /// metadata follows it, up to the next layer's first chunk.
    pub layer_regions: Vec<(u64, u64)>,
    /// First chunk after every layer's region (the tail, then headroom).
    pub metadata_chunk: u64,
    /// Free space asked for a writable root (rounded up to chunks; the disk
    /// may have a little more, being whole block groups). Flattening the
    /// same layers with this as [`Options::headroom_bytes`] gives the same disk.
    pub headroom_bytes: u64,
    /// Inodes in use and in total.
    pub inodes_used: u64,
    /// Inodes in the filesystem.
    pub inodes_total: u64,
    /// Things dropped on the way (e.g. xattrs of unknown namespaces).
    pub warnings: Vec<String>,
    /// Every regular file written, in the order written, when
    /// [`Options::record_files`] is set (files later layers deleted included).
    pub files: Vec<PlacedFile>,
}

/// Applies layers in order and writes the disk to a [`ChunkSink`].
pub struct Flattener<'s> {
    options: Options,
    tree: tree::Tree,
    sink: &'s mut dyn ChunkSink,
    /// The chunk being filled with layer data.
    current: Vec<u8>,
    /// Next free block of layer data (the current chunk holds its block).
    cursor: u64,
    regions: Vec<(u64, u64)>,
    layout: layout::Layout,
    warnings: Vec<String>,
    /// Rank of each path of [`Options::first`].
    rank: HashMap<Vec<u8>, usize>,
    /// The front of the next layer's region, from [`Flattener::plan_layer`].
    planned: Option<Front>,
    /// The front of the layer being applied.
    front: Option<Front>,
    files: Vec<PlacedFile>,
}

/// The files a layer places first (its "front"): together, in the order
/// listed, at the end of the layer's data, so the layer's metadata follows
/// them at once. Held in memory until the layer ends.
struct Front {
    /// Blocks of the layer's other data, which go before the front.
    before: u64,
    /// First block of the front.
    start: u64,
    /// Path → (block offset in the front, bytes), until written.
    slots: HashMap<Vec<u8>, (u64, u64)>,
    blocks: u64,
    buf: Vec<u8>,
}

impl<'s> Flattener<'s> {
    /// Starts an empty disk.
    pub fn new(options: Options, sink: &'s mut dyn ChunkSink) -> Flattener<'s> {
        Flattener {
            tree: tree::Tree::new(),
            sink,
            current: new_chunk(None),
            cursor: REGION_BLOCKS, // chunk 0 holds the superblock
            regions: Vec::new(),
            layout: layout::Layout::new(),
            warnings: Vec::new(),
            rank: options.first.iter().enumerate().map(|(i, p)| (p.clone(), i)).collect(),
            planned: None,
            front: None,
            files: Vec::new(),
            options,
        }
    }

    /// Reads a layer's tar (a first pass, before [`Flattener::apply_layer`]
    /// of the same tar) to find which of [`Options::first`] it holds and how
    /// big they are, and how much other data the layer has; returns the
    /// bytes of listed files it holds. A no-op returning
    /// 0 without `first`.
    pub fn plan_layer(&mut self, name: &str, tar: impl Read) -> Result<u64, Error> {
        if self.rank.is_empty() {
            return Ok(0);
        }
        let tar_err = |source: std::io::Error| Error::Tar { layer: name.to_owned(), source };
        let mut found: Vec<(usize, Vec<u8>, u64)> = Vec::new();
        let mut seen = HashSet::new();
        let mut total = 0u64; // blocks of file data the layer writes, as `layer::apply` counts them
        for entry in tar::Archive::new(tar).entries().map_err(tar_err)? {
            let entry = entry.map_err(tar_err)?;
            if !matches!(entry.header().entry_type(), tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse) {
                continue;
            }
            let components = tree::clean_path(&entry.path_bytes());
            if components.last().is_none_or(|name| layer::is_whiteout(name)) {
                continue;
            }
            total += entry.size().div_ceil(BLOCK_SIZE);
            let path = components.join(&b'/');
            if let Some(&rank) = self.rank.get(&path) {
                if seen.insert(path.clone()) {
                    found.push((rank, path, entry.size()));
                }
            }
        }
        found.sort();
        let mut slots = HashMap::new();
        let mut blocks = 0u64;
        for (_, path, size) in found {
            let need = size.div_ceil(BLOCK_SIZE);
            if (blocks + need) * BLOCK_SIZE > FIRST_BYTES_MAX {
                continue; // too big for what is left: smaller ones may still fit
            }
            slots.insert(path, (blocks, size));
            blocks += need;
        }
        let bytes = blocks * BLOCK_SIZE;
        self.planned = (blocks > 0).then(|| Front { before: total - blocks, start: 0, slots, blocks, buf: vec![0; bytes as usize] });
        Ok(bytes)
    }

    /// Applies one uncompressed layer tar, read to its very end (so a
    /// digest-checking reader sees every byte). `name` names the layer in errors.
    pub fn apply_layer(&mut self, name: &str, tar: impl Read) -> Result<LayerStats, Error> {
        let first_chunk = self.cursor / REGION_BLOCKS;
        let layer_index = self.regions.len() as u32 + 1;
        if let Some(mut front) = self.planned.take() {
            front.start = self.cursor + front.before;
            self.front = Some(front);
        }
        let stats = layer::apply(self, name, layer_index, tar)?;
        self.flush_front()?;
        let data_chunks = self.cursor.div_ceil(REGION_BLOCKS) - first_chunk;
        self.regions.push((first_chunk, data_chunks));
        self.close_region()?;
        Ok(stats)
    }

    /// Writes the filesystem's last metadata and hands over the remaining chunks.
    pub fn finish(mut self) -> Result<FlatImage, Error> {
        if self.regions.is_empty() {
            self.close_region()?; // the root directory still needs its blocks
        }
        let data_end = self.cursor;
        let headroom_blocks = self.options.headroom_bytes.div_ceil(BLOCK_SIZE).next_multiple_of(REGION_BLOCKS);
        let layout = std::mem::replace(&mut self.layout, layout::Layout::new());
        let done = layout.finish(&self.tree, data_end, headroom_blocks, &self.options.seed)?;
        for (index, data) in done.chunks {
            self.put(index, data)?;
        }
        Ok(FlatImage {
            disk_bytes: done.total_blocks * BLOCK_SIZE,
            layer_regions: self.regions,
            metadata_chunk: data_end / REGION_BLOCKS,
            headroom_bytes: headroom_blocks * BLOCK_SIZE,
            inodes_used: done.inodes_used,
            inodes_total: done.inodes_total,
            warnings: self.warnings,
            files: self.files,
        })
    }

    /// Writes the layer's front after its other data (whose last chunk,
    /// partly filled, is `current`), and leaves the chunk the front ends in
    /// as `current` for the metadata that follows.
    fn flush_front(&mut self) -> Result<(), Error> {
        let Some(front) = self.front.take() else { return Ok(()) };
        if self.cursor != front.start {
            return Err(Error::Format(format!(
                "the layer's data took {} blocks, not the {} its first read counted",
                self.cursor - (front.start - front.before),
                front.before
            )));
        }
        let end = front.start + front.blocks;
        for index in front.start / REGION_BLOCKS..end.div_ceil(REGION_BLOCKS) {
            let from = (index * REGION_BLOCKS).max(front.start);
            let to = end.min((index + 1) * REGION_BLOCKS);
            let part = &front.buf[((from - front.start) * BLOCK_SIZE) as usize..((to - front.start) * BLOCK_SIZE) as usize];
            let off = ((from % REGION_BLOCKS) * BLOCK_SIZE) as usize;
            self.current[off..off + part.len()].copy_from_slice(part);
            if to == (index + 1) * REGION_BLOCKS {
                let data = std::mem::replace(&mut self.current, new_chunk(self.sink.recycled()));
                self.put(index, data)?;
            }
        }
        self.cursor = end;
        Ok(())
    }

    /// Writes a file planned for the front; returns its first block, or
    /// `None` when it is not one (or was written already).
    fn write_front(&mut self, path: &[u8], src: &mut dyn Read, size: u64) -> Option<std::io::Result<u64>> {
        let front = self.front.as_mut()?;
        let (at, _) = *front.slots.get(path).filter(|s| s.1 == size)?;
        front.slots.remove(path);
        let off = (at * BLOCK_SIZE) as usize;
        let read = src.read_exact(&mut front.buf[off..off + size as usize]);
        Some(read.map(|()| front.start + at).map_err(|e| if e.kind() == std::io::ErrorKind::UnexpectedEof { ends_early() } else { e }))
    }

    /// Writes a regular file's data, with the layer's front when it is
    /// planned there, else at the next free blocks; returns its first block.
    fn place_file(&mut self, path: Vec<u8>, layer: u32, src: &mut dyn Read, size: u64) -> std::io::Result<u64> {
        let first_block = match self.write_front(&path, src, size) {
            Some(r) => r?,
            None => self.write_file(src, size)?,
        };
        if self.options.record_files {
            self.files.push(PlacedFile { path, layer, first_block, blocks: size.div_ceil(BLOCK_SIZE) });
        }
        Ok(first_block)
    }

    /// Lays out the metadata of the layer just applied after its data, and
    /// hands over the region's chunks (those holding inode tables wait for
    /// [`Flattener::finish`]).
    fn close_region(&mut self) -> Result<(), Error> {
        self.add_lost_found();
        let region = self.layout.close_region(&self.tree, self.cursor, &mut self.warnings)?;
        let first = self.cursor / REGION_BLOCKS;
        let mut data = std::mem::replace(&mut self.current, new_chunk(self.sink.recycled()));
        let used = ((self.cursor % REGION_BLOCKS) * BLOCK_SIZE) as usize;
        data[used..].fill(0);
        for index in first..region.end / REGION_BLOCKS {
            if index > first {
                data = new_chunk(self.sink.recycled());
                data.fill(0);
            }
            for (block, bytes) in region.blocks.range(index * REGION_BLOCKS..(index + 1) * REGION_BLOCKS) {
                let off = ((block % REGION_BLOCKS) * BLOCK_SIZE) as usize;
                data[off..off + bytes.len()].copy_from_slice(bytes);
            }
            let it = region.itables;
            if it.len > 0 && index * REGION_BLOCKS < it.start + it.len && it.start < (index + 1) * REGION_BLOCKS {
                self.layout.hold(index, std::mem::take(&mut data));
            } else {
                self.put(index, std::mem::take(&mut data))?;
            }
        }
        self.cursor = region.end;
        Ok(())
    }

    /// Keeps a `/lost+found` directory (e2fsck wants one), adding it when no
    /// layer has or a layer replaced it.
    fn add_lost_found(&mut self) {
        let root = self.tree.children(tree::ROOT).expect("root is a directory");
        if root.get(b"lost+found".as_slice()).is_some_and(|c| self.tree.is_dir(c.node)) {
            return;
        }
        let meta = tree::Meta { perm: 0o700, ..tree::Meta::implied_dir() };
        let id = self.tree.add(tree::Node { meta, kind: tree::Kind::Dir(Default::default()) });
        self.tree.children_mut(tree::ROOT).expect("root is a directory").insert(b"lost+found".to_vec(), tree::Child { node: id, layer: 0 });
    }

    fn put(&mut self, index: u64, data: Vec<u8>) -> Result<(), Error> {
        self.sink.put_chunk(index, data).map_err(|source| Error::Sink { index, source })
    }

    /// Copies a file's data from `src` to the next free blocks; returns its
    /// first block. Errors if `src` ends before `size` bytes.
    fn write_file(&mut self, src: &mut dyn Read, size: u64) -> std::io::Result<u64> {
        let start = self.cursor;
        if self.front.as_ref().is_some_and(|f| start + size.div_ceil(BLOCK_SIZE) > f.start) {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "the layer holds more data than its first read counted"));
        }
        let mut left = size;
        while left > 0 {
            let off = ((self.cursor % REGION_BLOCKS) * BLOCK_SIZE) as usize;
            let room = (CHUNK_BYTES - off) as u64;
            let want = left.min(room) as usize;
            let mut filled = 0;
            while filled < want {
                let n = src.read(&mut self.current[off + filled..off + want])?;
                if n == 0 {
                    return Err(ends_early());
                }
                filled += n;
            }
            left -= want as u64;
            let blocks = (want as u64).div_ceil(BLOCK_SIZE);
            // The buffer may be recycled: zero the tail of the last block.
            self.current[off + want..off + (blocks * BLOCK_SIZE) as usize].fill(0);
            self.cursor += blocks;
            if self.cursor.is_multiple_of(REGION_BLOCKS) {
                let data = std::mem::replace(&mut self.current, new_chunk(self.sink.recycled()));
                let index = self.cursor / REGION_BLOCKS - 1;
                self.sink.put_chunk(index, data).map_err(|e| std::io::Error::other(SinkFailed(index, e.to_string())))?;
            }
        }
        Ok(start)
    }
}

/// A file's data ended before the size its header gave.
fn ends_early() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "file data ends early")
}

/// Marks a sink failure (chunk index, message) that travelled through an `io::Error`.
#[derive(Debug)]
struct SinkFailed(u64, String);

impl std::fmt::Display for SinkFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.1)
    }
}

impl std::error::Error for SinkFailed {}

/// A chunk buffer of [`CHUNK_BYTES`]; a recycled one keeps its old bytes,
/// which the writer overwrites or zeroes before handing it over.
fn new_chunk(recycled: Option<Vec<u8>>) -> Vec<u8> {
    let mut v = recycled.unwrap_or_else(|| Vec::with_capacity(CHUNK_BYTES + 16)); // room for a GCM tag
    v.resize(CHUNK_BYTES, 0);
    v
}
