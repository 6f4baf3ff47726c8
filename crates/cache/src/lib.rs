//! The worker's chunk sources and caches.
//!
//! A [`Loader`] answers "give me the plaintext of chunk (id, key)" from the
//! nearest tier that has it, and remembers the answer on the way back:
//!
//! ```text
//! memory (plaintext, LRU-2) → disk (sealed, LRU-2, survives restarts)
//!   → lower sources in order: peer (a later issue), cache tier, origin store
//! ```
//!
//! A read that waited for another reader's fetch of the same chunk counts
//! as served from memory, so each tier's count is the work that tier did.
//! Every fetched chunk is checked against its id and opened with its key
//! before it is served or cached; a corrupt cached copy is dropped and
//! fetched again from below. Concurrent misses for one chunk cause one fetch
//! (coalescing), and the [`Origin`] admits a bounded number of requests,
//! queues a bounded number more, and refuses the rest at once.
//!
//! Each lower source implements [`ChunkSource`]; [`conformance::run`] is the
//! suite every implementation passes.
//!
//! The shared cache tier is [`tier::CacheTier`], a source that rebuilds
//! chunks from the first `k` of `n` erasure-coded stripes ([`ec`]) on the
//! cache nodes that rendezvous hashing picks ([`placement`]); a chunk
//! fetched from the origin is offered back to it. [`trace`] compares LRU-2
//! with LRU.
#![deny(missing_docs)]

pub mod conformance;
mod disk;
pub mod ec;
mod loader;
mod lruk;
pub mod metrics;
mod origin;
pub mod placement;
pub mod tier;
pub mod trace;

pub use disk::DiskCache;
pub use loader::{Loader, LoaderOptions, Plain};
pub use lruk::Lru2;
pub use origin::Origin;

use tessera_chunk::ChunkId;

/// Accesses to one chunk within this many cache accesses of its last one
/// count as one reference (a sequential reader touches a chunk several times).
pub const CORRELATED: u64 = 64;

/// Where a chunk came from; the `source` label of the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    /// The agent's memory cache.
    Memory,
    /// The agent's disk cache.
    Disk,
    /// A parent peer in the function's tree.
    Peer,
    /// The shared cache tier.
    Cache,
    /// The origin chunk store.
    Origin,
}

impl Tier {
    /// Every tier, in lookup order.
    pub const ALL: [Tier; 5] = [Tier::Memory, Tier::Disk, Tier::Peer, Tier::Cache, Tier::Origin];

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Disk => "disk",
            Tier::Peer => "peer",
            Tier::Cache => "cache",
            Tier::Origin => "origin",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Errors of fetching chunks, naming the chunk and the tier.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No tier has the chunk.
    #[error("chunk {0} is in no tier (not in the origin store)")]
    Missing(ChunkId),
    /// The origin's bound and queue are full: the request was shed.
    #[error("chunk {0}: origin overloaded ({1} requests in flight and the queue is full)")]
    Overloaded(ChunkId, usize),
    /// The chunk fetched from the origin is corrupt or does not open.
    #[error("chunk {id} from {tier}: {reason}")]
    Corrupt {
        /// The chunk.
        id: ChunkId,
        /// Where it came from.
        tier: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A source failed.
    #[error("chunk {id} from {tier}: {reason}")]
    Source {
        /// The chunk.
        id: ChunkId,
        /// Which source.
        tier: &'static str,
        /// What went wrong.
        reason: String,
    },
}

/// A tier below the memory and disk caches that can hand out sealed chunks.
///
/// Contract (checked by [`conformance::run`]): `fetch` returns exactly the
/// bytes stored under the id (the caller verifies them), `Ok(None)` when
/// the source does not have the chunk, and an error only when the source
/// itself fails; it is safe to call from many threads at once.
pub trait ChunkSource: Send + Sync {
    /// Which tier this is.
    fn tier(&self) -> Tier;
    /// The sealed bytes of `id`, if this source has them.
    fn fetch(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, Error>;
    /// A verified copy of `id` that a source below this one served: a
    /// caching source keeps it (in the background; the reader does not wait).
    fn offer(&self, _id: &ChunkId, _sealed: &[u8]) {}
    /// Waits (boundedly) until offered copies are kept.
    fn drain(&self) {}
    /// Appends the source's own metrics in Prometheus text.
    fn render(&self, _out: &mut String) {}
}
