//! Where sealed chunks and manifests live.
//!
//! Two seams, each a trait whose contract is stated on it and checked by
//! one shared suite that every implementation's tests run
//! ([`conformance`], behind the `testing` feature):
//!
//! - [`ChunkStore`]: put-if-absent, get, exists, list, delete and sync over
//!   sealed chunks addressed by [`ChunkId`]. [`LocalDirStore`] is the
//!   embedded default, [`MemoryStore`] serves tests and caches, and
//!   [`ThrottledStore`] wraps any store to behave like a remote one.
//! - [`Catalog`]: sealed manifests, start-up profiles, and the image names
//!   that point at them. [`LocalCatalog`] keeps them in files.
//!
//! - [`Control`]: the store's small documents (lifecycle, leases, alarms),
//!   replaced whole by compare-and-swap.
//!
//! [`Store`] puts them together, a chunk store per generation, opened from
//! a URL ([`Store::open`]); [`lifecycle`] collects garbage by generations;
//! [`kms`] keeps keys in a key service; [`Home`] is `TESSERA_HOME`, a
//! host's local state plus its store; [`readback`] rebuilds or checks an
//! image from its manifest; [`interrupt`] removes an interrupted command's
//! temporaries.
//!
//! ```
//! use tessera_store::{ChunkStore, MemoryStore, Put};
//! use tessera_chunk::ChunkId;
//! let store = MemoryStore::default();
//! let id = ChunkId::of(b"sealed bytes");
//! assert_eq!(store.put(&id, b"sealed bytes").unwrap(), Put::Created);
//! assert_eq!(store.put(&id, b"sealed bytes").unwrap(), Put::AlreadyPresent);
//! assert_eq!(&store.get(&id).unwrap()[..], b"sealed bytes");
//! ```
#![deny(missing_docs)]

mod aws;
mod catalog;
#[cfg(any(test, feature = "testing"))]
pub mod conformance;
mod control;
mod error;
mod home;
pub mod interrupt;
pub mod kms;
pub mod lifecycle;
mod local;
mod local_catalog;
mod memory;
pub mod readback;
pub mod s3;
mod throttle;
mod url;

pub use bytes::Bytes;
pub use catalog::{check_name, Catalog, ImageRef, Listing, Release};
pub use control::{Control, LocalControl, Version};
pub use error::{Error, Result};
pub use home::{Home, KeyringAt};
pub use local::LocalDirStore;
pub use local_catalog::LocalCatalog;
pub use memory::MemoryStore;
use tessera_chunk::ChunkId;
pub use throttle::ThrottledStore;
pub use url::{Deleted, Store, StoreUrl};

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
/// The trait is synchronous on purpose: its callers (the import's sealing
/// threads, the agent's fetch threads, export and verify) are threads that
/// may block, and their concurrency is bounded above the store (the
/// agent's origin bound and queue). A network backend owns an async runtime
/// and blocks on it inside each call, so a call is one request with its own
/// timeout, and no async runtime leaks into the callers.
///
/// Contract, checked by `conformance::run`:
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
    fn get(&self, id: &ChunkId) -> Result<Bytes>;
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
    /// Removes what writers that died (`kill -9`, power loss) left behind;
    /// returns how many. Safe while other processes put.
    fn tidy(&self) -> Result<usize> {
        Ok(0)
    }
    /// Where the store is, for messages.
    fn describe(&self) -> String;
    /// Appends the store's own metrics in Prometheus text.
    fn render(&self, _out: &mut String) {}
}

/// Puts that become visible and durable together, at [`PutBatch::commit`]:
/// an import stages its chunks, checks every digest, then commits. A put may
/// return before its chunk is stored (a network store sends it in the
/// background); its failure is then reported by a later put or by commit.
pub trait PutBatch: Send + Sync {
    /// Stages `bytes` under `id` unless the store or this batch has it.
    fn put(&self, id: &ChunkId, bytes: &[u8]) -> Result<()>;
    /// Makes every staged put visible and durable; says what was new.
    fn commit(self: Box<Self>) -> Result<Committed>;
}

/// What a committed batch added to the store: each chunk the store did not
/// have, and its size, in no particular order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Committed {
    /// The new chunks and their sizes.
    pub new: Vec<(ChunkId, u64)>,
}

impl Committed {
    /// Counts chunk `id` of `len` bytes as new.
    pub fn add(&mut self, id: ChunkId, len: u64) {
        self.new.push((id, len));
    }

    /// How many chunks are new.
    pub fn chunks(&self) -> u64 {
        self.new.len() as u64
    }

    /// Their bytes.
    pub fn bytes(&self) -> u64 {
        self.new.iter().map(|(_, len)| len).sum()
    }
}

/// A batch whose puts go straight to the store; commit syncs it. For
/// backends with nothing to gain from staging.
pub struct ImmediateBatch<'s> {
    store: &'s dyn ChunkStore,
    new: std::sync::Mutex<Committed>,
}

impl<'s> ImmediateBatch<'s> {
    /// A batch putting straight into `store`.
    pub fn new(store: &'s dyn ChunkStore) -> ImmediateBatch<'s> {
        ImmediateBatch { store, new: Default::default() }
    }
}

impl PutBatch for ImmediateBatch<'_> {
    fn put(&self, id: &ChunkId, bytes: &[u8]) -> Result<()> {
        if self.store.put(id, bytes)? == Put::Created {
            self.new.lock().expect("no panics while holding the lock").add(*id, bytes.len() as u64);
        }
        Ok(())
    }

    fn commit(self: Box<Self>) -> Result<Committed> {
        self.store.sync()?;
        Ok(std::mem::take(&mut *self.new.lock().expect("no panics while holding the lock")))
    }
}

pub(crate) use interrupt::pid_alive;
