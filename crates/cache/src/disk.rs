//! The agent's disk cache: sealed chunks only (a stolen cache disk reveals
//! nothing), bounded, LRU-2, and still there after a restart. Cache nodes
//! keep their stripes (one per chunk) in the same kind of cache.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender, TrySendError};

use tessera_chunk::ChunkId;

use crate::{ChunkSource, Error, Lru2, Tier, CORRELATED};

/// Sealed chunks as files `DIR/ab/ID`, at most `capacity` bytes.
pub struct DiskCache {
    inner: Arc<Inner>,
    /// Chunks waiting for the writer thread.
    behind: Mutex<Option<Sender<Pending>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct Inner {
    dir: PathBuf,
    index: Mutex<Lru2<ChunkId, ()>>,
    counter: AtomicU64,
    evictions: AtomicU64,
    pending: AtomicU64,
    dropped: AtomicU64,
}

/// A chunk waiting to be written.
type Pending = (ChunkId, Vec<u8>);

/// Chunks that may wait for the writer; past that, new ones are not cached.
const WRITE_BEHIND: usize = 64;

impl DiskCache {
    /// Opens the cache in `dir`, indexing what a previous run left there
    /// (oldest first) and trimming it to `capacity`.
    pub fn open(dir: &Path, capacity: u64) -> std::io::Result<DiskCache> {
        fs::create_dir_all(dir)?;
        let mut found: Vec<(std::time::SystemTime, ChunkId, u64, PathBuf)> = Vec::new();
        for sub in fs::read_dir(dir)? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for f in fs::read_dir(sub.path())? {
                let f = f?;
                let name = f.file_name().to_string_lossy().into_owned();
                match name.parse::<ChunkId>() {
                    Ok(id) => {
                        let md = f.metadata()?;
                        found.push((md.modified()?, id, md.len(), f.path()));
                    }
                    // A temporary left by a crash.
                    Err(_) => {
                        let _ = fs::remove_file(f.path());
                    }
                }
            }
        }
        found.sort();
        let inner = Arc::new(Inner {
            dir: dir.to_owned(),
            index: Mutex::new(Lru2::new(capacity, 4096, CORRELATED)),
            counter: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        for (_, id, len, _) in found {
            inner.admit(id, len);
        }
        let (tx, rx) = bounded::<(ChunkId, Vec<u8>)>(WRITE_BEHIND);
        let w = Arc::clone(&inner);
        let writer = std::thread::spawn(move || {
            for (id, bytes) in rx {
                if let Err(e) = w.insert(&id, &bytes) {
                    eprintln!("tessera: disk cache: cannot keep chunk {id}: {e}");
                }
                w.pending.fetch_sub(1, Ordering::Relaxed);
            }
        });
        Ok(DiskCache { inner, behind: Mutex::new(Some(tx)), writer: Mutex::new(Some(writer)) })
    }

    /// Keeps sealed `bytes` of `id` soon, on the writer thread; if the
    /// writer is too far behind, the chunk is not cached.
    pub fn insert_later(&self, id: ChunkId, bytes: Vec<u8>) {
        let behind = self.behind.lock().expect("no panics while holding the lock");
        let Some(tx) = behind.as_ref() else { return };
        self.inner.pending.fetch_add(1, Ordering::Relaxed);
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send((id, bytes)) {
            self.inner.pending.fetch_sub(1, Ordering::Relaxed);
            self.inner.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits (up to `limit`) until every chunk given to
    /// [`DiskCache::insert_later`] is written.
    pub fn drain(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.inner.pending.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Keeps sealed `bytes` of `id` now (written to a temporary, then renamed).
    pub fn insert(&self, id: &ChunkId, bytes: &[u8]) -> std::io::Result<()> {
        self.inner.insert(id, bytes)
    }

    /// Drops `id` (e.g. found corrupt).
    pub fn remove(&self, id: &ChunkId) {
        self.inner.remove(id)
    }

    /// The bytes kept under `id`, if any (counted as an access).
    pub fn get(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, Error> {
        self.inner.fetch(id)
    }

    /// Whether `id` is kept (no access is counted).
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.inner.index.lock().expect("no panics while holding the lock").contains(id)
    }

    /// Bytes cached now.
    pub fn used(&self) -> u64 {
        self.inner.index.lock().expect("no panics while holding the lock").used()
    }

    /// Chunks cached now.
    pub fn len(&self) -> usize {
        self.inner.index.lock().expect("no panics while holding the lock").len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Chunks evicted so far.
    pub fn evictions(&self) -> u64 {
        self.inner.evictions.load(Ordering::Relaxed)
    }

    /// Chunks not cached because the writer was too far behind.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for DiskCache {
    fn drop(&mut self) {
        // Close the queue; the writer finishes what is queued.
        self.behind.lock().expect("no panics while holding the lock").take();
        if let Some(w) = self.writer.lock().expect("no panics while holding the lock").take() {
            let _ = w.join();
        }
    }
}

impl Inner {
    fn path_of(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    /// Adds `id` to the index, deleting the files of what it evicts.
    fn admit(&self, id: ChunkId, len: u64) {
        let (evicted, kept) = {
            let mut index = self.index.lock().expect("no panics while holding the lock");
            let evicted = index.insert(id, (), len);
            (evicted, index.contains(&id))
        };
        for (old, ()) in evicted {
            if old != id {
                let _ = fs::remove_file(self.path_of(&old));
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        if !kept {
            let _ = fs::remove_file(self.path_of(&id)); // larger than the whole cache
        }
    }

    fn insert(&self, id: &ChunkId, bytes: &[u8]) -> std::io::Result<()> {
        let path = self.path_of(id);
        let parent = path.parent().expect("cache paths have a parent");
        fs::create_dir_all(parent)?;
        let tmp = parent.join(format!(".tmp-{}-{}", std::process::id(), self.counter.fetch_add(1, Ordering::Relaxed)));
        fs::write(&tmp, bytes).and_then(|()| fs::rename(&tmp, &path)).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })?;
        self.admit(*id, bytes.len() as u64);
        Ok(())
    }

    fn remove(&self, id: &ChunkId) {
        self.index.lock().expect("no panics while holding the lock").remove(id);
        let _ = fs::remove_file(self.path_of(id));
    }

    fn fetch(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, Error> {
        if self.index.lock().expect("no panics while holding the lock").get(id).is_none() {
            return Ok(None);
        }
        match fs::read(self.path_of(id)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.remove(id);
                Ok(None)
            }
            Err(e) => Err(Error::Source { id: *id, tier: "disk", reason: e.to_string() }),
        }
    }
}

impl ChunkSource for DiskCache {
    fn tier(&self) -> Tier {
        Tier::Disk
    }

    fn fetch(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, Error> {
        self.inner.fetch(id)
    }
}


#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn chunk(i: u8) -> (ChunkId, Vec<u8>) {
        let b = vec![i; 100];
        (ChunkId::of(&b), b)
    }

    #[test]
    fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 10_000).unwrap();
        let present: Vec<_> = (0..4).map(chunk).collect();
        for (id, b) in &present {
            cache.insert(id, b).unwrap();
        }
        crate::conformance::run(Arc::new(cache), &present, chunk(99).0);
    }

    #[test]
    fn bounded_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 350).unwrap();
        for i in 0..10 {
            let (id, b) = chunk(i);
            cache.insert(&id, &b).unwrap();
        }
        assert!(cache.used() <= 350);
        assert_eq!(cache.len(), 3);
        assert!(cache.evictions() >= 7);
        drop(cache);
        let again = DiskCache::open(dir.path(), 350).unwrap();
        assert_eq!(again.len(), 3);
        let (id, b) = chunk(9);
        assert_eq!(again.fetch(&id).unwrap(), Some(b));
        let files: usize = fs::read_dir(dir.path()).unwrap().map(|d| fs::read_dir(d.unwrap().path()).unwrap().count()).sum();
        assert_eq!(files, 3, "evicted chunks' files are deleted");
    }
}
