//! A store that behaves like a remote one: each get waits a fixed latency,
//! and all gets share one link of limited bandwidth. For honest benchmarks
//! on one machine (lazy loading against a remote origin, not a local disk).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_chunk::ChunkId;

use crate::{Bytes, ChunkStore, ImmediateBatch, Put, PutBatch, Result};

/// Wraps a store with per-request latency and a shared bandwidth cap on gets.
pub struct ThrottledStore {
    inner: Arc<dyn ChunkStore>,
    latency: Duration,
    /// Bytes per second of the shared link; `None` for unlimited.
    bandwidth: Option<u64>,
    /// When the link is next free.
    link: Mutex<Instant>,
}

impl ThrottledStore {
    /// `inner` behind `latency` per get and `bandwidth` bytes/s shared by all gets.
    pub fn new(inner: Arc<dyn ChunkStore>, latency: Duration, bandwidth: Option<u64>) -> ThrottledStore {
        ThrottledStore { inner, latency, bandwidth, link: Mutex::new(Instant::now()) }
    }

    /// Waits as a transfer of `len` bytes over the shared link would.
    fn transfer(&self, len: usize) {
        let Some(bw) = self.bandwidth.filter(|&b| b > 0) else { return };
        let cost = Duration::from_secs_f64(len as f64 / bw as f64);
        let done = {
            let mut next = self.link.lock().expect("no panics while holding the lock");
            let start = (*next).max(Instant::now());
            *next = start + cost;
            *next
        };
        std::thread::sleep(done.saturating_duration_since(Instant::now()));
    }
}

impl ChunkStore for ThrottledStore {
    fn put(&self, id: &ChunkId, bytes: &[u8]) -> Result<Put> {
        self.inner.put(id, bytes)
    }

    fn get(&self, id: &ChunkId) -> Result<Bytes> {
        std::thread::sleep(self.latency);
        let bytes = self.inner.get(id)?;
        self.transfer(bytes.len());
        Ok(bytes)
    }

    fn exists(&self, id: &ChunkId) -> Result<bool> {
        std::thread::sleep(self.latency);
        self.inner.exists(id)
    }

    fn list(&self) -> Result<Vec<ChunkId>> {
        self.inner.list()
    }

    fn delete(&self, id: &ChunkId) -> Result<bool> {
        self.inner.delete(id)
    }

    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }

    fn batch(&self) -> Box<dyn PutBatch + '_> {
        Box::new(ImmediateBatch::new(self))
    }

    fn tidy(&self) -> Result<usize> {
        self.inner.tidy()
    }

    fn describe(&self) -> String {
        format!("{} (throttled)", self.inner.describe())
    }

    fn render(&self, out: &mut String) {
        self.inner.render(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    #[test]
    fn conformance() {
        crate::conformance::run(&ThrottledStore::new(Arc::new(MemoryStore::default()), Duration::from_micros(10), Some(1 << 30)));
    }

    #[test]
    fn latency_and_bandwidth_are_applied() {
        let store = ThrottledStore::new(Arc::new(MemoryStore::default()), Duration::from_millis(20), Some(10 << 20));
        let bytes = vec![1u8; 1 << 20];
        let id = ChunkId::of(&bytes);
        store.put(&id, &bytes).unwrap();
        let t = Instant::now();
        store.get(&id).unwrap();
        // 20 ms of latency plus 1 MiB at 10 MiB/s = 100 ms.
        assert!(t.elapsed() >= Duration::from_millis(115), "{:?}", t.elapsed());
        // Two concurrent gets share the link: ~200 ms, not ~100 ms.
        let store = Arc::new(store);
        let t = Instant::now();
        let a = {
            let s = store.clone();
            std::thread::spawn(move || s.get(&id).unwrap())
        };
        let b = {
            let s = store.clone();
            std::thread::spawn(move || s.get(&id).unwrap())
        };
        a.join().unwrap();
        b.join().unwrap();
        assert!(t.elapsed() >= Duration::from_millis(210), "{:?}", t.elapsed());
    }
}
