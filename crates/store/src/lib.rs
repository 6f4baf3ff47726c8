//! Where sealed chunks and manifests live.
//!
//! [`ChunkStore`] is the seam every backend implements: put-if-absent, get,
//! exists, list, delete and sync, over chunks addressed by [`ChunkId`]. Its
//! contract (stated on the trait) is checked by one shared suite,
//! [`conformance::run`], which every backend's tests call:
//! [`LocalDirStore`] (the embedded default) and [`MemoryStore`]. An S3
//! backend (through `object_store`) maps the same calls onto `PutMode::Create`,
//! `get`, `head`, `list` and `delete`.
//!
//! [`Catalog`] keeps sealed manifests and the names that point at them under
//! `TESSERA_HOME`, and [`readback`] rebuilds or checks an image from its
//! manifest.
//!
//! ```
//! use tessera_store::{ChunkStore, MemoryStore, Put};
//! use tessera_chunk::ChunkId;
//! let store = MemoryStore::default();
//! let id = ChunkId::of(b"sealed bytes");
//! assert_eq!(store.put(&id, b"sealed bytes").unwrap(), Put::Created);
//! assert_eq!(store.put(&id, b"sealed bytes").unwrap(), Put::AlreadyPresent);
//! ```
#![deny(missing_docs)]

mod catalog;
pub mod conformance;
mod error;
mod home;
pub mod interrupt;
mod local;
mod memory;
pub mod readback;
mod throttle;

pub use catalog::{check_name, Catalog, ImageRef, Listing, Release};
pub use error::{Error, Result};
pub use home::Home;
pub use local::LocalDirStore;
pub use memory::MemoryStore;
pub use throttle::ThrottledStore;
use tessera_chunk::ChunkId;

/// What a put did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// The chunk was not there and now is.
    Created,
    /// The chunk was already there; nothing was written.
    AlreadyPresent,
}

/// A content-addressed store of sealed chunks.
///
/// Contract, checked by [`conformance::run`]:
/// - `put` is atomic: a reader sees the whole chunk or nothing, never a
///   prefix, even if the writer dies mid-way;
/// - `put` of an id that is present writes nothing and reports
///   [`Put::AlreadyPresent`]; concurrent puts of one id are harmless;
/// - a chunk is durable once [`ChunkStore::sync`] returns after its put;
/// - `get` of an absent id is [`Error::NotFound`];
/// - `delete` of an absent id is not an error;
/// - the puts of a [`PutBatch`] are all visible and durable once
///   [`PutBatch::commit`] returns; a batch dropped without commit never
///   leaves a partial chunk (a backend may hide its puts until commit, as
///   [`LocalDirStore`] does, or show them at once, as [`MemoryStore`] does);
/// - the store never checks or changes the bytes: callers verify ids.
pub trait ChunkStore: Send + Sync {
    /// Stores `bytes` under `id` unless it is already there.
    fn put(&self, id: &ChunkId, bytes: &[u8]) -> Result<Put>;
    /// Returns the bytes stored under `id`.
    fn get(&self, id: &ChunkId) -> Result<Vec<u8>>;
    /// Whether `id` is stored.
    fn exists(&self, id: &ChunkId) -> Result<bool>;
    /// Every stored id, in no particular order.
    fn list(&self) -> Result<Vec<ChunkId>>;
    /// Removes `id`; returns whether it was there.
    fn delete(&self, id: &ChunkId) -> Result<bool>;
    /// Makes every completed put durable.
    fn sync(&self) -> Result<()>;
    /// Starts a batch of puts that become visible and durable together.
    fn batch(&self) -> Box<dyn PutBatch + '_>;
}

/// Puts that become visible and durable together, at [`PutBatch::commit`]:
/// an import stages its chunks, checks every digest, then commits.
pub trait PutBatch: Send + Sync {
    /// Stages `bytes` under `id` unless the store or this batch has it.
    fn put(&self, id: &ChunkId, bytes: &[u8]) -> Result<Put>;
    /// Makes every staged put visible and durable.
    fn commit(self: Box<Self>) -> Result<()>;
}

/// A batch whose puts go straight to the store; commit syncs it. For
/// backends with nothing to gain from staging.
pub struct ImmediateBatch<'s>(pub &'s dyn ChunkStore);

impl PutBatch for ImmediateBatch<'_> {
    fn put(&self, id: &ChunkId, bytes: &[u8]) -> Result<Put> {
        self.0.put(id, bytes)
    }

    fn commit(self: Box<Self>) -> Result<()> {
        self.0.sync()
    }
}

pub(crate) use interrupt::pid_alive;
