//! The worker's chunk sources and caches.
//!
//! A [`Loader`] answers "give me the plaintext of chunk (id, key)" from the
//! nearest source that has it, and remembers the answer on the way back:
//!
//! ```text
//! memory (plaintext, LRU-2, the loader's own)
//!   → sources, in the order given: disk cache (sealed, LRU-2, survives
//!     restarts) → peer (a function's tree) → cache tier → origin store
//! ```
//!
//! Every source implements [`ChunkSource`], whose contract is checked by one
//! suite ([`conformance`], behind the `testing` feature) that each
//! implementation runs: [`DiskCache`], [`Origin`] and [`tier::CacheTier`]
//! (the last against real cache nodes, in `tessera-cachenode`'s tests). A
//! fetch carries a [`FetchContext`] (the image, and the function when one is
//! known), so a per-function source such as a peer tree has something to
//! key on.
//!
//! Every fetched chunk is checked against its id before it is kept or
//! served: a copy from a caching source that does not match is dropped
//! there ([`ChunkSource::forget`]) and the next source is asked. A chunk
//! found below is offered to the sources above it ([`ChunkSource::offer`],
//! kept in the background). Concurrent misses for one chunk cause one fetch
//! (coalescing); a read that waited for another reader's fetch counts as
//! served from memory, so each tier's count is the work that tier did. The
//! [`Origin`] admits a bounded number of requests, queues a bounded number
//! more, and refuses the rest at once.
//!
//! [`ec`] and [`placement`] are the cache tier's erasure code and
//! rendezvous placement; [`peer`] is the function-tree source and the
//! server an agent's children read from; [`trace`] compares LRU-2 with LRU.
#![deny(missing_docs)]

#[cfg(any(test, feature = "testing"))]
pub mod conformance;
mod disk;
pub mod ec;
mod loader;
mod lruk;
pub mod metrics;
mod origin;
pub mod peer;
pub mod placement;
pub mod server;
pub mod tier;
pub mod tls;
pub mod trace;

pub use bytes::Bytes;
pub use disk::DiskCache;
pub use loader::{Loader, LoaderOptions, Plain};
pub use lruk::Lru2;
pub use origin::{Origin, Wrap as OriginWrap};

use std::sync::Arc;

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

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tier::Memory => "the memory cache",
            Tier::Disk => "the disk cache",
            Tier::Peer => "a peer",
            Tier::Cache => "the cache tier",
            Tier::Origin => "the origin",
        })
    }
}

/// Who a fetch is for: the image (its name, manifest and the store
/// generation that held it when it was opened), and the function (or run)
/// when one is known. A per-function source (a peer tree) keys on the
/// function; the origin reads the generation; other sources ignore it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FetchContext {
    /// The image being read.
    pub image: Arc<str>,
    /// The function it runs for, if known.
    pub function: Option<Arc<str>>,
    /// Id of the image's manifest (empty if unknown).
    pub manifest: Arc<str>,
    /// The store generation holding the image's chunks.
    pub generation: u64,
    /// The agents (their names in the trees) this fetch has passed
    /// through up a function tree, the nearest last (empty: it started
    /// here). An agent on it is not asked again, and past
    /// [`peer::MAX_HOPS`] no parent is asked.
    pub via: Vec<Arc<str>>,
}

impl FetchContext {
    /// A fetch for `image`, no function known, from generation 0.
    pub fn image(image: &str) -> FetchContext {
        FetchContext { image: image.into(), ..Default::default() }
    }

    /// A fetch for image `name`, which `r` names.
    pub fn of(name: &str, r: &tessera_store::ImageRef) -> FetchContext {
        FetchContext { image: name.into(), function: None, manifest: r.manifest.as_str().into(), generation: r.generation, via: Vec::new() }
    }
}

/// The error a source gives, kept whole.
pub type SourceError = Box<dyn std::error::Error + Send + Sync>;

/// Errors of fetching chunks, naming the chunk and the tier.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No source has the chunk.
    #[error("chunk {0} is in no tier (not in the origin store)")]
    Missing(ChunkId),
    /// The origin's bound and queue are full: the request was shed.
    #[error("chunk {0}: origin overloaded ({1} requests in flight and the queue is full)")]
    Overloaded(ChunkId, usize),
    /// The chunk does not match its id, or does not open with its key.
    #[error("chunk {id} from {tier}: {source}")]
    Corrupt {
        /// The chunk.
        id: ChunkId,
        /// Where it came from.
        tier: Tier,
        /// What is wrong.
        source: tessera_chunk::Error,
    },
    /// A source failed.
    #[error("chunk {id} from {tier}: {source}")]
    Source {
        /// The chunk.
        id: ChunkId,
        /// Which source.
        tier: Tier,
        /// What went wrong.
        source: SourceError,
    },
    /// The fetch this read waited for (another reader's) failed.
    #[error("{0}")]
    Coalesced(Arc<Error>),
}

impl Error {
    /// Whether no source has the chunk (here or in the fetch this read waited for).
    pub fn is_missing(&self) -> bool {
        match self {
            Error::Missing(_) => true,
            Error::Coalesced(e) => e.is_missing(),
            _ => false,
        }
    }
}

/// A tier that can hand out sealed chunks, below the loader's memory.
///
/// Contract (checked by `conformance::run`):
/// - `fetch` returns the bytes the source holds under the id, `Ok(None)`
///   when it holds none, and an error only when the source itself fails; it
///   never checks the bytes (the caller does, and tells a caching source
///   to [`forget`](ChunkSource::forget) a copy that does not match);
/// - it is safe to call from many threads at once, and one slow fetch does
///   not hold the others up;
/// - a caching source keeps what it is [`offer`](ChunkSource::offer)ed (in
///   the background; [`drain`](ChunkSource::drain) waits for it) and
///   serves it afterwards; others ignore offers.
pub trait ChunkSource: Send + Sync {
    /// Which tier this is.
    fn tier(&self) -> Tier;
    /// The sealed bytes of `id`, if this source has them.
    fn fetch(&self, id: &ChunkId, ctx: &FetchContext) -> Result<Option<Bytes>, Error>;
    /// A verified copy of `id` that a source below this one served: a
    /// caching source keeps it (in the background; the reader does not wait).
    fn offer(&self, _id: &ChunkId, _sealed: &Bytes, _ctx: &FetchContext) {}
    /// The copy of `id` this source served does not match its id: a
    /// caching source drops it.
    fn forget(&self, _id: &ChunkId) {}
    /// Waits (boundedly) until offered copies are kept.
    fn drain(&self) {}
    /// What a cache holds, for the loader's `tessera_cache_*` gauges.
    fn cache_gauges(&self) -> Option<CacheGauges> {
        None
    }
    /// Appends the source's own metrics in Prometheus text.
    fn render(&self, _out: &mut String) {}
}

/// What a caching source holds, reported under the `cache` label.
#[derive(Clone, Debug)]
pub struct CacheGauges {
    /// The `cache` label, e.g. `disk`.
    pub cache: &'static str,
    /// Bytes held.
    pub bytes: u64,
    /// Chunks held.
    pub chunks: u64,
    /// The bound.
    pub capacity: u64,
    /// Chunks evicted so far.
    pub evictions: u64,
}
