//! The origin chunk store, behind a bound on concurrent requests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tessera_chunk::ChunkId;
use tessera_store::lifecycle::Watch;
use tessera_store::{ChunkStore, Store};

use crate::metrics::{header, Histogram};
use crate::{Bytes, ChunkSource, Error, FetchContext, Tier};

/// The origin store, admitting at most `limit` requests at once and queueing
/// at most `queue` more; past that a request is refused at once, so a cold
/// or lost cache cannot turn into a flood on the store.
pub struct Origin {
    chunks: Chunks,
    limit: usize,
    queue: usize,
    state: Mutex<Admission>,
    freed: Condvar,
    /// Requests in flight now (a gauge).
    pub in_flight: AtomicU64,
    /// The most ever in flight at once.
    pub peak_in_flight: AtomicU64,
    /// Requests refused because the queue was full.
    pub shed: AtomicU64,
    /// Requests made (admitted or not).
    pub requests: AtomicU64,
    /// Time the store took to answer.
    latency: Histogram,
    /// Failed requests, by kind.
    errors: Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

/// Wraps a generation's chunk store (e.g. in a throttle).
pub type Wrap = Box<dyn Fn(Arc<dyn ChunkStore>) -> Arc<dyn ChunkStore> + Send + Sync>;

enum Chunks {
    /// One store for every fetch.
    One(Arc<dyn ChunkStore>),
    /// A store's generations, each opened once.
    Store(Box<Generations>),
}

struct Generations {
    store: Store,
    wrap: Option<Wrap>,
    opened: Mutex<HashMap<u64, Arc<dyn ChunkStore>>>,
    /// Reads of expired generations.
    watch: Watch,
    /// Images the collector moved to another generation since they
    /// were opened: (generation, manifest) → generation.
    moved: Mutex<HashMap<(u64, Arc<str>), u64>>,
}

impl Chunks {
    fn generation(&self, g: u64) -> Arc<dyn ChunkStore> {
        match self {
            Chunks::One(s) => Arc::clone(s),
            Chunks::Store(gens) => {
                let Generations { store, wrap, opened, .. } = gens.as_ref();
                let mut opened = opened.lock().expect("no panics while holding the lock");
                Arc::clone(opened.entry(g).or_insert_with(|| {
                    let s = store.chunks(g);
                    match wrap {
                        Some(w) => w(s),
                        None => s,
                    }
                }))
            }
        }
    }

    /// Reads `id` for `ctx`: from the image's generation, or where the
    /// collector has moved the image since.
    fn get(&self, id: &ChunkId, ctx: &FetchContext) -> tessera_store::Result<tessera_store::Bytes> {
        let Chunks::Store(gens) = self else { return self.generation(0).get(id) };
        let Generations { store, watch, moved, .. } = gens.as_ref();
        let key = (ctx.generation, Arc::clone(&ctx.manifest));
        let g = moved.lock().expect("no panics while holding the lock").get(&key).copied().unwrap_or(ctx.generation);
        watch.note_read(g, &ctx.image);
        match self.generation(g).get(id) {
            Err(tessera_store::Error::NotFound(_)) if !ctx.manifest.is_empty() => {
                let now = match store.catalog.get(&ctx.image) {
                    Ok(r) if *r.manifest == *ctx.manifest && r.generation != g => r.generation,
                    _ => return Err(tessera_store::Error::NotFound(*id)),
                };
                tracing::info!("image {}: moved from store generation {g} to {now}; reading from there", ctx.image);
                moved.lock().expect("no panics while holding the lock").insert(key, now);
                watch.note_read(now, &ctx.image);
                self.generation(now).get(id)
            }
            other => other,
        }
    }
}

#[derive(Default)]
struct Admission {
    running: usize,
    waiting: usize,
}

/// How long a queued request waits for a slot before it gives up.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(30);

impl Origin {
    /// Wraps one chunk store, which serves every fetch.
    pub fn new(store: Arc<dyn ChunkStore>, limit: usize, queue: usize) -> Origin {
        Origin::with(Chunks::One(store), limit, queue)
    }

    /// Wraps `store`: each fetch reads the generation its image is in
    /// (each generation's chunk store passed through `wrap`, if given),
    /// and reads of expired generations are counted and alarmed.
    pub fn of_store(store: Store, wrap: Option<Wrap>, limit: usize, queue: usize) -> Origin {
        let watch = Watch::new(&store);
        Origin::with(Chunks::Store(Box::new(Generations { store, wrap, opened: Mutex::default(), watch, moved: Mutex::default() })), limit, queue)
    }

    fn with(chunks: Chunks, limit: usize, queue: usize) -> Origin {
        Origin {
            chunks,
            limit: limit.max(1),
            queue,
            state: Mutex::new(Admission::default()),
            freed: Condvar::new(),
            in_flight: AtomicU64::new(0),
            peak_in_flight: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            latency: Histogram::default(),
            errors: Mutex::new(Default::default()),
        }
    }

    fn admit(&self, id: &ChunkId) -> Result<Slot<'_>, Error> {
        let mut s = self.state.lock().expect("no panics while holding the lock");
        if s.running >= self.limit {
            if s.waiting >= self.queue {
                self.shed.fetch_add(1, Ordering::Relaxed);
                return Err(Error::Overloaded(*id, s.running));
            }
            s.waiting += 1;
            let (mut guard, timeout) = self.freed.wait_timeout_while(s, QUEUE_TIMEOUT, |s| s.running >= self.limit).expect("no panics while holding the lock");
            guard.waiting -= 1;
            if timeout.timed_out() {
                self.shed.fetch_add(1, Ordering::Relaxed);
                return Err(Error::Overloaded(*id, guard.running));
            }
            s = guard;
        }
        s.running += 1;
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_in_flight.fetch_max(now, Ordering::Relaxed);
        Ok(Slot(self))
    }
}

/// An admitted request; frees its slot on drop.
struct Slot<'o>(&'o Origin);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.state.lock().expect("no panics while holding the lock").running -= 1;
        self.0.freed.notify_one();
    }
}

impl ChunkSource for Origin {
    fn tier(&self) -> Tier {
        Tier::Origin
    }

    fn fetch(&self, id: &ChunkId, ctx: &FetchContext) -> Result<Option<Bytes>, Error> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let _slot = self.admit(id)?;
        let started = std::time::Instant::now();
        let got = self.chunks.get(id, ctx);
        self.latency.observe(started.elapsed());
        match got {
            Ok(b) => Ok(Some(b)),
            Err(tessera_store::Error::NotFound(_)) => Ok(None),
            Err(e) => {
                *self.errors.lock().expect("no panics while holding the lock").entry(e.kind_label()).or_default() += 1;
                Err(Error::Source { id: *id, tier: Tier::Origin, source: Box::new(e) })
            }
        }
    }

    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let load = |v: &AtomicU64| v.load(Ordering::Relaxed);
        header(out, "tessera_origin_requests_in_flight", "gauge", "Requests to the origin store in flight now.");
        let _ = writeln!(out, "tessera_origin_requests_in_flight {}", load(&self.in_flight));
        header(out, "tessera_origin_requests_in_flight_peak", "gauge", "The most requests to the origin store ever in flight at once.");
        let _ = writeln!(out, "tessera_origin_requests_in_flight_peak {}", load(&self.peak_in_flight));
        header(out, "tessera_origin_requests_total", "counter", "Requests to the origin store.");
        let _ = writeln!(out, "tessera_origin_requests_total {}", load(&self.requests));
        header(out, "tessera_origin_requests_shed_total", "counter", "Origin requests refused because the queue was full.");
        let _ = writeln!(out, "tessera_origin_requests_shed_total {}", load(&self.shed));
        header(out, "tessera_origin_request_seconds", "histogram", "Time the origin store took to answer a request.");
        self.latency.render(out, "tessera_origin_request_seconds", "");
        header(out, "tessera_origin_request_errors_total", "counter", "Origin requests that failed, by kind.");
        for (kind, n) in self.errors.lock().expect("no panics while holding the lock").iter() {
            let _ = writeln!(out, "tessera_origin_request_errors_total{{kind=\"{kind}\"}} {n}");
        }
        match &self.chunks {
            Chunks::One(s) => s.render(out),
            Chunks::Store(gens) => {
                gens.watch.render(out);
                gens.store.render(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_store::MemoryStore;

    struct Fixture(Arc<MemoryStore>, Arc<Origin>);

    impl crate::conformance::Fixture for Fixture {
        fn source(&self) -> Arc<dyn ChunkSource> {
            self.1.clone()
        }
        fn hold(&self, id: &ChunkId, sealed: &[u8]) {
            self.0.put(id, sealed).unwrap();
        }
        fn damage(&self, id: &ChunkId) -> bool {
            let mut b = self.0.get(id).unwrap().to_vec();
            b[0] ^= 1;
            self.0.delete(id).unwrap();
            self.0.put(id, &b).unwrap();
            true
        }
        fn keeps_offers(&self) -> bool {
            false
        }
        fn slow(&self, delay: Duration) -> Option<Arc<dyn ChunkSource>> {
            let slow = tessera_store::ThrottledStore::new(self.0.clone(), delay, None);
            Some(Arc::new(Origin::new(Arc::new(slow), 8, 16)))
        }
    }

    #[test]
    fn conformance() {
        let store = Arc::new(MemoryStore::default());
        let origin = Arc::new(Origin::new(store.clone(), 4, 64));
        crate::conformance::run(&Fixture(store, origin));
    }

    /// A store whose gets take a while, to pile requests up.
    struct Slow(MemoryStore);

    impl ChunkStore for Slow {
        fn put(&self, id: &ChunkId, b: &[u8]) -> tessera_store::Result<tessera_store::Put> {
            self.0.put(id, b)
        }
        fn get(&self, id: &ChunkId) -> tessera_store::Result<Bytes> {
            std::thread::sleep(Duration::from_millis(20));
            self.0.get(id)
        }
        fn exists(&self, id: &ChunkId) -> tessera_store::Result<bool> {
            self.0.exists(id)
        }
        fn list(&self) -> tessera_store::Result<Vec<ChunkId>> {
            self.0.list()
        }
        fn delete(&self, id: &ChunkId) -> tessera_store::Result<bool> {
            self.0.delete(id)
        }
        fn sync(&self) -> tessera_store::Result<()> {
            Ok(())
        }
        fn batch(&self) -> Box<dyn tessera_store::PutBatch + '_> {
            Box::new(tessera_store::ImmediateBatch::new(self))
        }
        fn describe(&self) -> String {
            "slow".into()
        }
    }

    #[test]
    fn in_flight_never_exceeds_the_bound_and_overflow_is_shed() {
        let store = MemoryStore::default();
        let id = ChunkId::of(b"x");
        store.put(&id, b"x").unwrap();
        let origin = Arc::new(Origin::new(Arc::new(Slow(store)), 3, 5));
        let threads: Vec<_> = (0..32)
            .map(|_| {
                let o = Arc::clone(&origin);
                std::thread::spawn(move || o.fetch(&id, &FetchContext::default()))
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(origin.peak_in_flight.load(Ordering::Relaxed) <= 3);
        let shed = results.iter().filter(|r| matches!(r, Err(Error::Overloaded(..)))).count();
        assert!(shed > 0, "32 requests against a bound of 3 and a queue of 5 shed some");
        assert_eq!(shed as u64, origin.shed.load(Ordering::Relaxed));
        assert!(results.iter().filter(|r| r.is_ok()).count() >= 8);
    }
}
