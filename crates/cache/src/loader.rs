//! The tier chain: memory, disk, then the lower sources, with coalescing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use tessera_chunk::{check_id, decrypt_in_place, ChunkId, ChunkRef, CHUNK_SIZE};

use crate::metrics::{header, Histogram};
use crate::{ChunkSource, DiskCache, Error, Lru2, Tier};

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
    disk: Option<Arc<DiskCache>>,
    lower: Vec<Arc<dyn ChunkSource>>,
    inflight: Mutex<HashMap<ChunkId, Arc<Flight>>>,
    /// What was served from where.
    pub stats: Stats,
}

/// Counters by tier, and other loader metrics.
#[derive(Default)]
pub struct Stats {
    reads: [AtomicU64; 5],
    bytes: [AtomicU64; 5],
    latency: [Histogram; 5],
    /// Chunks evicted from memory.
    pub memory_evictions: AtomicU64,
    /// Cached copies found corrupt (dropped and fetched again).
    pub corrupt: AtomicU64,
    /// Reads that waited for another reader's fetch of the same chunk.
    pub coalesced: AtomicU64,
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

/// A fetch in progress that other readers of the same chunk wait for.
#[derive(Default)]
struct Flight {
    result: Mutex<Option<Result<(Plain, Tier), String>>>,
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
    fn land(self, result: Result<(Plain, Tier), String>) {
        *self.flight.result.lock().expect("no panics while holding the lock") = Some(result);
    }
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        if let Ok(mut r) = self.flight.result.lock() {
            r.get_or_insert_with(|| Err("the fetch failed unexpectedly".into()));
        }
        self.flight.done.notify_all();
        if let Ok(mut m) = self.loader.inflight.lock() {
            m.remove(&self.id);
        }
    }
}

impl Loader {
    /// A loader over `disk` (if any) and `lower` sources, tried in order.
    pub fn new(options: LoaderOptions, disk: Option<Arc<DiskCache>>, lower: Vec<Arc<dyn ChunkSource>>) -> Loader {
        Loader {
            memory: Mutex::new(Lru2::new(options.memory_bytes, 4096, crate::CORRELATED)),
            memory_capacity: options.memory_bytes,
            disk,
            lower,
            inflight: Mutex::new(HashMap::new()),
            stats: Stats::default(),
        }
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
    pub fn read(&self, r: &ChunkRef) -> Result<(Plain, Tier), Error> {
        let started = Instant::now();
        if let Some(p) = self.cached(r) {
            return Ok((p, Tier::Memory));
        }
        let (flight, leader) = {
            let mut map = self.inflight.lock().expect("no panics while holding the lock");
            match map.get(&r.id) {
                Some(f) => (Arc::clone(f), false),
                None => {
                    // A fetch may have landed since we looked: a leader fills
                    // memory before it leaves the map, so under the map's lock
                    // the chunk is either in flight or in memory (or evicted).
                    if let Some(p) = self.memory.lock().expect("no panics while holding the lock").get(&r.id).cloned() {
                        drop(map);
                        self.stats.count(Tier::Memory, started);
                        return Ok((p, Tier::Memory));
                    }
                    let f = Arc::new(Flight::default());
                    map.insert(r.id, Arc::clone(&f));
                    (f, true)
                }
            }
        };
        if !leader {
            self.stats.coalesced.fetch_add(1, Ordering::Relaxed);
            let guard = flight.result.lock().expect("no panics while holding the lock");
            let guard = flight.done.wait_while(guard, |r| r.is_none()).expect("no panics while holding the lock");
            // Served from memory, by another reader's fetch: each fetch is
            // counted once, under the tier that did the work.
            return match guard.as_ref().expect("set before notifying") {
                Ok((p, _)) => {
                    self.stats.count(Tier::Memory, started);
                    Ok((Arc::clone(p), Tier::Memory))
                }
                Err(reason) => Err(Error::Source { id: r.id, tier: "coalesced fetch", reason: reason.clone() }),
            };
        }
        // Whatever happens below (even a panic), the waiters are released.
        let landing = Landing { loader: self, id: r.id, flight: &flight };
        let result = self.fetch_below(r);
        if let Ok((p, tier)) = &result {
            self.stats.count(*tier, started);
            let evicted = self.memory.lock().expect("no panics while holding the lock").insert(r.id, Arc::clone(p), CHUNK_SIZE as u64);
            self.stats.memory_evictions.fetch_add(evicted.len() as u64, Ordering::Relaxed);
        }
        landing.land(result.as_ref().map(|(p, t)| (Arc::clone(p), *t)).map_err(|e| e.to_string()));
        result
    }

    /// Waits for chunks being written behind to the disk cache and tiers.
    pub fn drain(&self) {
        if let Some(d) = &self.disk {
            d.drain(std::time::Duration::from_secs(30));
        }
        for source in &self.lower {
            source.drain();
        }
    }

    fn fetch_below(&self, r: &ChunkRef) -> Result<(Plain, Tier), Error> {
        if let Some(disk) = &self.disk {
            if let Some(mut sealed) = disk.fetch(&r.id)? {
                match check_id(&r.id, &sealed).and_then(|()| decrypt_in_place(&r.id, &r.key, &mut sealed)) {
                    Ok(()) => return Ok((Arc::new(sealed), Tier::Disk)),
                    Err(e) => {
                        // A damaged cached copy: drop it and fetch again below.
                        eprintln!("tessera: disk cache: dropping chunk {}: {e}", r.id);
                        self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                        disk.remove(&r.id);
                    }
                }
            }
        }
        for (i, source) in self.lower.iter().enumerate() {
            let tier = source.tier();
            let Some(mut sealed) = source.fetch(&r.id)? else { continue };
            check_id(&r.id, &sealed).map_err(|e| Error::Corrupt { id: r.id, tier: tier.label(), reason: e.to_string() })?;
            // Kept behind: the reader does not wait for the cache disk or tier.
            for above in &self.lower[..i] {
                above.offer(&r.id, &sealed);
            }
            if let Some(disk) = &self.disk {
                disk.insert_later(r.id, sealed.clone());
            }
            decrypt_in_place(&r.id, &r.key, &mut sealed)
                .map_err(|e| Error::Corrupt { id: r.id, tier: tier.label(), reason: e.to_string() })?;
            return Ok((Arc::new(sealed), tier));
        }
        Err(Error::Missing(r.id))
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
        header(out, "tessera_chunk_read_seconds", "histogram", "Time to serve one chunk, by tier.");
        for t in Tier::ALL {
            self.stats.latency[t.index()].render(out, "tessera_chunk_read_seconds", &format!("source=\"{}\"", t.label()));
        }
        let (mem_used, mem_len) = {
            let m = self.memory.lock().expect("no panics while holding the lock");
            (m.used(), m.len())
        };
        header(out, "tessera_cache_bytes", "gauge", "Bytes held by each cache.");
        let _ = writeln!(out, "tessera_cache_bytes{{cache=\"memory\"}} {mem_used}");
        header(out, "tessera_cache_capacity_bytes", "gauge", "Bound of each cache.");
        let _ = writeln!(out, "tessera_cache_capacity_bytes{{cache=\"memory\"}} {}", self.memory_capacity);
        header(out, "tessera_cache_chunks", "gauge", "Chunks held by each cache.");
        let _ = writeln!(out, "tessera_cache_chunks{{cache=\"memory\"}} {mem_len}");
        header(out, "tessera_cache_evictions_total", "counter", "Chunks evicted from each cache.");
        let _ = writeln!(out, "tessera_cache_evictions_total{{cache=\"memory\"}} {}", self.stats.memory_evictions.load(Ordering::Relaxed));
        if let Some(d) = &self.disk {
            let _ = writeln!(out, "tessera_cache_evictions_total{{cache=\"disk\"}} {}", d.evictions());
            let _ = writeln!(out, "tessera_cache_bytes{{cache=\"disk\"}} {}", d.used());
            let _ = writeln!(out, "tessera_cache_chunks{{cache=\"disk\"}} {}", d.len());
            header(out, "tessera_cache_write_behind_dropped_total", "counter", "Chunks not kept on the cache disk because its writer was behind.");
            let _ = writeln!(out, "tessera_cache_write_behind_dropped_total {}", d.dropped());
        }
        header(out, "tessera_cache_corrupt_total", "counter", "Cached chunks found corrupt, dropped and fetched again.");
        let _ = writeln!(out, "tessera_cache_corrupt_total {}", self.stats.corrupt.load(Ordering::Relaxed));
        header(out, "tessera_chunk_reads_coalesced_total", "counter", "Reads that waited for another reader's fetch of the same chunk.");
        let _ = writeln!(out, "tessera_chunk_reads_coalesced_total {}", self.stats.coalesced.load(Ordering::Relaxed));
        for source in &self.lower {
            source.render(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Origin;
    use tessera_chunk::{seal, Salt};
    use tessera_store::{ChunkStore, MemoryStore};

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
        let loader = Loader::new(opts.clone(), Some(disk), vec![origin.clone()]);
        for (r, plain) in &chunks {
            assert_eq!(*loader.read(r).unwrap().0, *plain);
            assert_eq!(loader.read(r).unwrap().1, Tier::Memory);
        }
        assert_eq!(loader.stats.reads(Tier::Origin), 3);
        loader.drain();
        drop(loader);
        // A restarted agent: memory is empty, the disk cache serves.
        let disk = Arc::new(DiskCache::open(dir.path(), 64 << 20).unwrap());
        let loader = Loader::new(opts, Some(disk.clone()), vec![origin]);
        for (r, plain) in &chunks {
            let (p, tier) = loader.read(r).unwrap();
            assert_eq!((&*p, tier), (plain, Tier::Disk));
        }
        // A corrupted cached copy is dropped and fetched again from the origin.
        drop(loader);
        let victim = disk.fetch(&chunks[0].0.id).unwrap().unwrap();
        let mut bad = victim.clone();
        bad[100] ^= 1;
        disk.insert(&chunks[0].0.id, &bad).unwrap();
        let loader = Loader::new(LoaderOptions { memory_bytes: 64 << 20 }, Some(disk), vec![Arc::new(Origin::new(store, 4, 16))]);
        let (p, tier) = loader.read(&chunks[0].0).unwrap();
        assert_eq!((&*p, tier), (&chunks[0].1, Tier::Origin));
        assert_eq!(loader.stats.corrupt.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_corrupt_origin_chunk_is_an_error_naming_it() {
        let (store, chunks) = setup(1);
        let id = chunks[0].0.id;
        let mut bytes = store.get(&id).unwrap();
        bytes[7] ^= 1;
        store.delete(&id).unwrap();
        store.put(&id, &bytes).unwrap();
        let loader = Loader::new(LoaderOptions { memory_bytes: 1 << 20 }, None, vec![Arc::new(Origin::new(store, 4, 16))]);
        let err = loader.read(&chunks[0].0).unwrap_err().to_string();
        assert!(err.contains(&id.to_hex()) && err.contains("origin"), "{err}");
    }

    #[test]
    fn concurrent_misses_fetch_once() {
        let (store, chunks) = setup(1);
        let origin = Arc::new(Origin::new(store, 4, 64));
        let loader = Arc::new(Loader::new(LoaderOptions { memory_bytes: 64 << 20 }, None, vec![origin.clone() as Arc<dyn ChunkSource>]));
        let r = chunks[0].0;
        let threads: Vec<_> = (0..16).map(|_| {
            let l = Arc::clone(&loader);
            std::thread::spawn(move || l.read(&r).unwrap().0)
        }).collect();
        for t in threads {
            assert_eq!(*t.join().unwrap(), chunks[0].1);
        }
        let fetched = origin.requests.load(Ordering::Relaxed);
        assert_eq!(fetched, 1, "16 concurrent misses caused {fetched} origin fetches");
        assert_eq!(loader.stats.reads(Tier::Origin), 1);
        assert_eq!(loader.stats.reads(Tier::Memory), 15);
    }
}
