//! The tier chain: memory, then the sources in order, with coalescing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tessera_chunk::{check_id, decrypt_in_place, ChunkId, ChunkRef, CHUNK_SIZE};

use crate::metrics::{header, Histogram};
use crate::{CacheGauges, ChunkSource, Error, FetchContext, Lru2, Tier};

/// Plaintext of one chunk, shared by the memory cache and its readers.
pub type Plain = Arc<Vec<u8>>;

/// Sizes of the loader's caches.
#[derive(Clone, Debug)]
pub struct LoaderOptions {
    /// Bytes of plaintext chunks kept in memory.
    pub memory_bytes: u64,
}

/// Serves chunks from the nearest tier that has them.
pub struct Loader {
    memory: Mutex<Lru2<ChunkId, Plain>>,
    memory_capacity: u64,
    /// Sealed copies kept for children in a function tree, if any.
    forward: Option<Mutex<Lru2<ChunkId, Bytes>>>,
    sources: Vec<Arc<dyn ChunkSource>>,
    inflight: Mutex<HashMap<ChunkId, Arc<Flight>>>,
    /// What was served from where.
    pub stats: Stats,
}

/// Counters by tier, and other loader metrics.
#[derive(Default)]
pub struct Stats {
    reads: [AtomicU64; 5],
    bytes: [AtomicU64; 5],
    /// Sealed bytes fetched from each tier below memory (compressed
    /// chunks are smaller than their plaintext).
    fetched: [AtomicU64; 5],
    latency: [Histogram; 5],
    /// Chunks evicted from memory.
    pub memory_evictions: AtomicU64,
    /// Cached copies found corrupt (dropped and fetched again).
    pub corrupt: AtomicU64,
    /// Reads that waited for another reader's fetch of the same chunk.
    pub coalesced: AtomicU64,
    /// Sealed chunks handed to children in a function tree.
    pub forwarded: AtomicU64,
}

impl Stats {
    /// Chunks served from `tier`.
    pub fn reads(&self, tier: Tier) -> u64 {
        self.reads[tier.index()].load(Ordering::Relaxed)
    }

    fn count(&self, tier: Tier, started: Instant) {
        self.reads[tier.index()].fetch_add(1, Ordering::Relaxed);
        self.bytes[tier.index()].fetch_add(CHUNK_SIZE as u64, Ordering::Relaxed);
        self.latency[tier.index()].observe(started.elapsed());
    }
}

/// What one fetch below memory landed: the sealed bytes, where they came
/// from, and the plaintext when the reader that led it had the key.
#[derive(Clone)]
struct Fetched {
    sealed: Bytes,
    tier: Tier,
    plain: Option<Plain>,
}

type Landed = Result<Fetched, Arc<Error>>;

/// A fetch in progress that other readers of the same chunk wait for.
#[derive(Default)]
struct Flight {
    result: Mutex<Option<Landed>>,
    done: Condvar,
}

/// Publishes a fetch's result to its waiters and retires the flight; on
/// drop without a result (a panic), publishes an error.
struct Landing<'a> {
    loader: &'a Loader,
    id: ChunkId,
    flight: &'a Flight,
}

impl Landing<'_> {
    fn land(self, result: Landed) {
        *self.flight.result.lock().expect("no panics while holding the lock") = Some(result);
    }
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        if let Ok(mut r) = self.flight.result.lock() {
            r.get_or_insert_with(|| Err(Arc::new(Error::Source { id: self.id, tier: Tier::Memory, source: "the fetch failed unexpectedly".into() })));
        }
        self.flight.done.notify_all();
        if let Ok(mut m) = self.loader.inflight.lock() {
            m.remove(&self.id);
        }
    }
}

/// How a reader meets the fetch of a chunk.
enum Join<T> {
    /// It landed meanwhile: here it is.
    Landed(T),
    /// Another reader fetches it: wait for that.
    Wait(Arc<Flight>),
    /// This reader fetches it.
    Lead(Arc<Flight>),
}

impl Loader {
    /// A loader over `sources`, asked in order (typically the disk cache,
    /// a peer tree, the cache tier, the origin).
    pub fn new(options: LoaderOptions, sources: Vec<Arc<dyn ChunkSource>>) -> Loader {
        Loader {
            memory: Mutex::new(Lru2::new(options.memory_bytes, 4096, crate::CORRELATED)),
            memory_capacity: options.memory_bytes,
            forward: None,
            sources,
            inflight: Mutex::new(HashMap::new()),
            stats: Stats::default(),
        }
    }

    /// Keeps up to `bytes` of the sealed chunks fetched from below in
    /// memory too, for [`Loader::sealed`]: an agent that serves children
    /// in a function tree hands each chunk on as soon as it has it, before
    /// its disk cache has kept it.
    pub fn with_forwarding(mut self, bytes: u64) -> Loader {
        self.forward = (bytes > 0).then(|| Mutex::new(Lru2::new(bytes, 4096, crate::CORRELATED)));
        self
    }

    /// Whether chunk `id` is in memory (no access is counted).
    pub fn in_memory(&self, id: &ChunkId) -> bool {
        self.memory.lock().expect("no panics while holding the lock").contains(id)
    }

    /// The plaintext of chunk `r` if it is in memory (counted as a memory
    /// read); never blocks on I/O.
    pub fn cached(&self, r: &ChunkRef) -> Option<Plain> {
        let started = Instant::now();
        let p = self.memory.lock().expect("no panics while holding the lock").get(&r.id).cloned()?;
        self.stats.count(Tier::Memory, started);
        Some(p)
    }

    /// The plaintext of chunk `r` and the tier it came from. Blocks: call it
    /// from a thread that may wait on I/O.
    pub fn read(&self, r: &ChunkRef, ctx: &FetchContext) -> Result<(Plain, Tier), Error> {
        let started = Instant::now();
        if let Some(p) = self.cached(r) {
            return Ok((p, Tier::Memory));
        }
        // A fetch this reader waited for may have been a child's, with the
        // child's context: if it failed, this reader tries once on its own.
        let mut waited_for_another = false;
        loop {
            // A leader fills memory (or, for a child, the forwarding buffer)
            // before it leaves the map, so under the map's lock the chunk
            // is in flight, in one of those, or evicted.
            // (Only looked up under the lock: a buffered copy is opened after.)
            let landed = || {
                let in_memory = self.memory.lock().expect("no panics while holding the lock").get(&r.id).cloned();
                in_memory.map(Ok).or_else(|| self.forward.as_ref()?.lock().expect("no panics while holding the lock").get(&r.id).cloned().map(Err))
            };
            let fetched = match self.join(&r.id, landed) {
                Join::Landed(found) => {
                    let p = match found {
                        Ok(p) => p,
                        Err(sealed) => self.open_and_keep(r, &sealed, Tier::Memory)?,
                    };
                    self.stats.count(Tier::Memory, started);
                    return Ok((p, Tier::Memory));
                }
                Join::Lead(flight) => return self.lead(&r.id, &flight, Some(r), ctx, started).map(|f| (f.plain.expect("opened with the key"), f.tier)),
                Join::Wait(flight) => match self.wait(&flight) {
                    Ok(f) => f,
                    Err(_) if !waited_for_another => {
                        waited_for_another = true;
                        continue;
                    }
                    Err(e) => return Err(e),
                },
            };
            // Served from memory, by another reader's fetch: each fetch is
            // counted once, under the tier that did the work.
            let plain = match fetched.plain {
                Some(p) => p,
                // Its leader served a child and had no key: open it here.
                None => self.open_and_keep(r, &fetched.sealed, fetched.tier)?,
            };
            self.stats.count(Tier::Memory, started);
            return Ok((plain, Tier::Memory));
        }
    }

    /// Opens sealed chunk `r` (checked against its id; from `tier`) and
    /// keeps its plaintext in memory.
    fn open_and_keep(&self, r: &ChunkRef, sealed: &Bytes, tier: Tier) -> Result<Plain, Error> {
        let p = open(r, sealed, tier)?;
        let evicted = self.memory.lock().expect("no panics while holding the lock").insert(r.id, Arc::clone(&p), CHUNK_SIZE as u64);
        self.stats.memory_evictions.fetch_add(evicted.len() as u64, Ordering::Relaxed);
        Ok(p)
    }

    /// The sealed bytes of chunk `id` (checked against it) and the tier they
    /// came from, for a child in a function tree: it holds no key, so they
    /// come from the forwarding buffer ([`Loader::with_forwarding`]) or from
    /// the sources, and a fetch for a child and one for a reader of this
    /// agent are one fetch.
    pub fn sealed(&self, id: &ChunkId, ctx: &FetchContext) -> Result<(Bytes, Tier), Error> {
        let started = Instant::now();
        let buffered = || self.forward.as_ref().and_then(|f| f.lock().expect("no panics while holding the lock").get(id).cloned());
        if let Some(b) = buffered() {
            self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
            return Ok((b, Tier::Memory));
        }
        let (sealed, tier) = match self.join(id, buffered) {
            Join::Landed(b) => (b, Tier::Memory),
            Join::Lead(flight) => {
                let f = self.lead(id, &flight, None, ctx, started)?;
                (f.sealed, f.tier)
            }
            Join::Wait(flight) => (self.wait(&flight)?.sealed, Tier::Memory),
        };
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        Ok((sealed, tier))
    }

    /// Joins the fetch of `id` in flight, or starts one; `landed` looks
    /// (under the map's lock) for a copy that landed since the caller looked.
    fn join<T>(&self, id: &ChunkId, landed: impl FnOnce() -> Option<T>) -> Join<T> {
        let mut map = self.inflight.lock().expect("no panics while holding the lock");
        if let Some(f) = map.get(id) {
            self.stats.coalesced.fetch_add(1, Ordering::Relaxed);
            return Join::Wait(Arc::clone(f));
        }
        if let Some(t) = landed() {
            return Join::Landed(t);
        }
        let f = Arc::new(Flight::default());
        map.insert(*id, Arc::clone(&f));
        Join::Lead(f)
    }

    /// Waits for another reader's fetch.
    fn wait(&self, flight: &Flight) -> Result<Fetched, Error> {
        let guard = flight.result.lock().expect("no panics while holding the lock");
        let guard = flight.done.wait_while(guard, |r| r.is_none()).expect("no panics while holding the lock");
        guard.as_ref().expect("set before notifying").clone().map_err(Error::Coalesced)
    }

    /// Fetches `id` from the sources for the readers waiting on `flight`;
    /// with `r` (its key), opens it and keeps the plaintext in memory.
    fn lead(&self, id: &ChunkId, flight: &Flight, r: Option<&ChunkRef>, ctx: &FetchContext, started: Instant) -> Result<Fetched, Error> {
        // Whatever happens below (even a panic), the waiters are released.
        let landing = Landing { loader: self, id: *id, flight };
        let fetched = self.fetch_below(id, ctx).and_then(|(sealed, tier)| {
            self.stats.count(tier, started);
            self.stats.fetched[tier.index()].fetch_add(sealed.len() as u64, Ordering::Relaxed);
            if let Some(f) = &self.forward {
                f.lock().expect("no panics while holding the lock").insert(*id, sealed.clone(), sealed.len() as u64);
            }
            let plain = r.map(|r| self.open_and_keep(r, &sealed, tier)).transpose()?;
            Ok(Fetched { sealed, tier, plain })
        });
        match fetched {
            Ok(f) => {
                landing.land(Ok(f.clone()));
                Ok(f)
            }
            Err(e) => {
                let e = Arc::new(e);
                landing.land(Err(Arc::clone(&e)));
                Err(Arc::try_unwrap(e).unwrap_or_else(Error::Coalesced))
            }
        }
    }

    /// Waits for chunks being kept behind by the sources.
    pub fn drain(&self) {
        for source in &self.sources {
            source.drain();
        }
    }

    /// The sealed bytes of `id` from the first source that has a copy that
    /// matches it; the copy is offered to the sources above that one.
    fn fetch_below(&self, id: &ChunkId, ctx: &FetchContext) -> Result<(Bytes, Tier), Error> {
        let last = self.sources.len().saturating_sub(1);
        for (i, source) in self.sources.iter().enumerate() {
            let tier = source.tier();
            let Some(sealed) = source.fetch(id, ctx)? else { continue };
            if let Err(e) = check_id(id, &sealed) {
                if i == last {
                    return Err(Error::Corrupt { id: *id, tier, source: e });
                }
                // A damaged copy in a cache (or from a peer): drop it there, ask below.
                tracing::warn!("{tier}: dropping chunk {id}: {e}");
                self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                source.forget(id);
                continue;
            }
            // Kept behind: the reader does not wait for the cache disk or tier.
            for above in &self.sources[..i] {
                above.offer(id, &sealed, ctx);
            }
            return Ok((sealed, tier));
        }
        Err(Error::Missing(*id))
    }

    /// Appends the loader's metrics in Prometheus text.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        header(out, "tessera_chunk_reads_total", "counter", "Chunks served, by the tier that had them.");
        for t in Tier::ALL {
            let _ = writeln!(out, "tessera_chunk_reads_total{{source=\"{}\"}} {}", t.label(), self.stats.reads(t));
        }
        header(out, "tessera_chunk_read_bytes_total", "counter", "Plaintext bytes of the chunks served, by tier.");
        for t in Tier::ALL {
            let _ = writeln!(out, "tessera_chunk_read_bytes_total{{source=\"{}\"}} {}", t.label(), self.stats.bytes[t.index()].load(Ordering::Relaxed));
        }
        header(out, "tessera_chunk_fetched_bytes_total", "counter", "Sealed bytes fetched from each tier below memory (compressed chunks move fewer bytes).");
        for t in Tier::ALL.iter().filter(|t| **t != Tier::Memory) {
            let _ = writeln!(out, "tessera_chunk_fetched_bytes_total{{source=\"{}\"}} {}", t.label(), self.stats.fetched[t.index()].load(Ordering::Relaxed));
        }
        header(out, "tessera_chunk_read_seconds", "histogram", "Time to serve one chunk, by tier.");
        for t in Tier::ALL {
            self.stats.latency[t.index()].render(out, "tessera_chunk_read_seconds", &format!("source=\"{}\"", t.label()));
        }
        let memory = {
            let m = self.memory.lock().expect("no panics while holding the lock");
            CacheGauges {
                cache: "memory",
                bytes: m.used(),
                chunks: m.len() as u64,
                capacity: self.memory_capacity,
                evictions: self.stats.memory_evictions.load(Ordering::Relaxed),
            }
        };
        let caches: Vec<CacheGauges> = std::iter::once(memory).chain(self.sources.iter().filter_map(|s| s.cache_gauges())).collect();
        type Family = (&'static str, &'static str, &'static str, fn(&CacheGauges) -> u64);
        let families: [Family; 4] = [
            ("tessera_cache_bytes", "gauge", "Bytes held by each cache.", |c| c.bytes),
            ("tessera_cache_capacity_bytes", "gauge", "Bound of each cache.", |c| c.capacity),
            ("tessera_cache_chunks", "gauge", "Chunks held by each cache.", |c| c.chunks),
            ("tessera_cache_evictions_total", "counter", "Chunks evicted from each cache.", |c| c.evictions),
        ];
        for (name, kind, help, value) in families {
            header(out, name, kind, help);
            for c in &caches {
                let _ = writeln!(out, "{name}{{cache=\"{}\"}} {}", c.cache, value(c));
            }
        }
        header(out, "tessera_cache_corrupt_total", "counter", "Cached chunks found corrupt, dropped and fetched again.");
        let _ = writeln!(out, "tessera_cache_corrupt_total {}", self.stats.corrupt.load(Ordering::Relaxed));
        header(out, "tessera_chunk_reads_coalesced_total", "counter", "Reads that waited for another reader's fetch of the same chunk.");
        let _ = writeln!(out, "tessera_chunk_reads_coalesced_total {}", self.stats.coalesced.load(Ordering::Relaxed));
        header(out, "tessera_peer_chunks_served_total", "counter", "Sealed chunks handed to children in function trees.");
        let _ = writeln!(out, "tessera_peer_chunks_served_total {}", self.stats.forwarded.load(Ordering::Relaxed));
        for source in &self.sources {
            source.render(out);
        }
    }
}

/// The plaintext of sealed chunk `r` (already checked against its id).
fn open(r: &ChunkRef, sealed: &Bytes, tier: Tier) -> Result<Plain, Error> {
    // The sealed bytes may be shared with the caches above: the plaintext
    // is opened in a copy of its own (the only copy).
    let mut plain = sealed.to_vec();
    decrypt_in_place(&r.id, &r.key, &mut plain).map_err(|e| Error::Corrupt { id: r.id, tier, source: e })?;
    Ok(Arc::new(plain))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DiskCache, Origin};
    use tessera_chunk::{seal, Salt};
    use tessera_store::{ChunkStore, MemoryStore};

    fn ctx() -> FetchContext {
        FetchContext::image("test")
    }

    fn setup(n: u8) -> (Arc<MemoryStore>, Vec<(ChunkRef, Vec<u8>)>) {
        let store = Arc::new(MemoryStore::default());
        let salt = Salt::from_bytes([3; 32]);
        let chunks = (0..n)
            .map(|i| {
                let plain = vec![i + 1; CHUNK_SIZE];
                let s = seal(&salt, plain.clone());
                store.put(&s.id, &s.ciphertext).unwrap();
                (ChunkRef { id: s.id, key: s.key }, plain)
            })
            .collect();
        (store, chunks)
    }

    #[test]
    fn tiers_fill_on_the_way_back_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (store, chunks) = setup(3);
        let origin: Arc<dyn ChunkSource> = Arc::new(Origin::new(store.clone(), 4, 16));
        let opts = LoaderOptions { memory_bytes: 64 << 20 };
        let disk = Arc::new(DiskCache::open(dir.path(), 64 << 20).unwrap());
        let loader = Loader::new(opts.clone(), vec![disk, origin.clone()]);
        for (r, plain) in &chunks {
            assert_eq!(*loader.read(r, &ctx()).unwrap().0, *plain);
            assert_eq!(loader.read(r, &ctx()).unwrap().1, Tier::Memory);
        }
        assert_eq!(loader.stats.reads(Tier::Origin), 3);
        loader.drain();
        drop(loader);
        // A restarted agent: memory is empty, the disk cache serves.
        let disk = Arc::new(DiskCache::open(dir.path(), 64 << 20).unwrap());
        let loader = Loader::new(opts, vec![disk.clone(), origin]);
        for (r, plain) in &chunks {
            let (p, tier) = loader.read(r, &ctx()).unwrap();
            assert_eq!((&*p, tier), (plain, Tier::Disk));
        }
        // A corrupted cached copy is dropped and fetched again from the origin.
        drop(loader);
        let victim = disk.get(&chunks[0].0.id).unwrap().unwrap();
        let mut bad = victim.to_vec();
        let middle = bad.len() / 2;
        bad[middle] ^= 1;
        disk.insert(&chunks[0].0.id, &bad).unwrap();
        let loader = Loader::new(LoaderOptions { memory_bytes: 64 << 20 }, vec![disk, Arc::new(Origin::new(store, 4, 16))]);
        let (p, tier) = loader.read(&chunks[0].0, &ctx()).unwrap();
        assert_eq!((&*p, tier), (&chunks[0].1, Tier::Origin));
        assert_eq!(loader.stats.corrupt.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_corrupt_origin_chunk_is_an_error_naming_it() {
        let (store, chunks) = setup(1);
        let id = chunks[0].0.id;
        let mut bytes = store.get(&id).unwrap().to_vec();
        bytes[7] ^= 1;
        store.delete(&id).unwrap();
        store.put(&id, &bytes).unwrap();
        let loader = Loader::new(LoaderOptions { memory_bytes: 1 << 20 }, vec![Arc::new(Origin::new(store, 4, 16))]);
        let err = loader.read(&chunks[0].0, &ctx()).unwrap_err().to_string();
        assert!(err.contains(&id.to_hex()) && err.contains("origin"), "{err}");
    }

    #[test]
    fn concurrent_misses_fetch_once() {
        let (store, chunks) = setup(1);
        let origin = Arc::new(Origin::new(store, 4, 64));
        let loader = Arc::new(Loader::new(LoaderOptions { memory_bytes: 64 << 20 }, vec![origin.clone() as Arc<dyn ChunkSource>]));
        let r = chunks[0].0;
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let l = Arc::clone(&loader);
                std::thread::spawn(move || l.read(&r, &ctx()).unwrap().0)
            })
            .collect();
        for t in threads {
            assert_eq!(*t.join().unwrap(), chunks[0].1);
        }
        let fetched = origin.requests.load(Ordering::Relaxed);
        assert_eq!(fetched, 1, "16 concurrent misses caused {fetched} origin fetches");
        assert_eq!(loader.stats.reads(Tier::Origin), 1);
        assert_eq!(loader.stats.reads(Tier::Memory), 15);
    }

    #[test]
    fn a_child_and_a_reader_of_one_chunk_cause_one_fetch() {
        let (store, chunks) = setup(2);
        let origin = Arc::new(Origin::new(store, 4, 64));
        let loader = Arc::new(Loader::new(LoaderOptions { memory_bytes: 64 << 20 }, vec![origin.clone() as Arc<dyn ChunkSource>]).with_forwarding(8 << 20));
        let r = chunks[0].0;
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let l = Arc::clone(&loader);
                std::thread::spawn(move || {
                    if i % 2 == 0 {
                        l.read(&r, &ctx()).unwrap().0.to_vec()
                    } else {
                        let (sealed, _) = l.sealed(&r.id, &ctx()).unwrap();
                        let mut plain = sealed.to_vec();
                        decrypt_in_place(&r.id, &r.key, &mut plain).unwrap();
                        plain
                    }
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), chunks[0].1);
        }
        assert_eq!(origin.requests.load(Ordering::Relaxed), 1);
        // A chunk fetched for a child first is opened for a reader afterwards
        // without a second fetch, and the buffer serves children.
        let r = chunks[1].0;
        assert_eq!(loader.sealed(&r.id, &ctx()).unwrap().1, Tier::Origin);
        assert_eq!(loader.sealed(&r.id, &ctx()).unwrap().1, Tier::Memory);
        assert_eq!(*loader.read(&r, &ctx()).unwrap().0, chunks[1].1);
        assert_eq!(origin.requests.load(Ordering::Relaxed), 2);
        // Without the buffer, a missing chunk is named as missing.
        let plain = Loader::new(LoaderOptions { memory_bytes: 1 << 20 }, vec![origin as Arc<dyn ChunkSource>]);
        assert!(plain.sealed(&ChunkId([9; 32]), &ctx()).unwrap_err().is_missing());
    }
}
