//! The agent's disk cache: sealed chunks only (a stolen cache disk reveals
//! nothing), bounded, LRU-2, and still there after a restart.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tessera_chunk::ChunkId;

use crate::{ChunkSource, Error, Lru2, Tier};

/// Sealed chunks as files `DIR/ab/ID`, at most `capacity` bytes.
pub struct DiskCache {
    dir: PathBuf,
    index: Mutex<Lru2<ChunkId, ()>>,
    counter: AtomicU64,
    /// Chunks evicted so far.
    pub evictions: AtomicU64,
}

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
        let cache = DiskCache {
            dir: dir.to_owned(),
            index: Mutex::new(Lru2::new(capacity, 4096)),
            counter: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        };
        for (_, id, len, _) in found {
            cache.admit(id, len);
        }
        Ok(cache)
    }

    fn path_of(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    /// Adds `id` to the index, deleting the files of what it evicts.
    fn admit(&self, id: ChunkId, len: u64) {
        let evicted = self.index.lock().expect("no panics while holding the lock").insert(id, (), len);
        for (old, ()) in evicted {
            if old != id {
                let _ = fs::remove_file(self.path_of(&old));
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        if !self.index.lock().expect("no panics while holding the lock").contains(&id) {
            let _ = fs::remove_file(self.path_of(&id)); // larger than the whole cache
        }
    }

    /// Keeps sealed `bytes` of `id` (written to a temporary, then renamed).
    pub fn insert(&self, id: &ChunkId, bytes: &[u8]) -> std::io::Result<()> {
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

    /// Drops `id` (e.g. found corrupt).
    pub fn remove(&self, id: &ChunkId) {
        self.index.lock().expect("no panics while holding the lock").remove(id);
        let _ = fs::remove_file(self.path_of(id));
    }

    /// Bytes cached now.
    pub fn used(&self) -> u64 {
        self.index.lock().expect("no panics while holding the lock").used()
    }

    /// Chunks cached now.
    pub fn len(&self) -> usize {
        self.index.lock().expect("no panics while holding the lock").len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ChunkSource for DiskCache {
    fn tier(&self) -> Tier {
        Tier::Disk
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
        assert!(cache.evictions.load(Ordering::Relaxed) >= 7);
        drop(cache);
        let again = DiskCache::open(dir.path(), 350).unwrap();
        assert_eq!(again.len(), 3);
        let (id, b) = chunk(9);
        assert_eq!(again.fetch(&id).unwrap(), Some(b));
        let files: usize = fs::read_dir(dir.path()).unwrap().map(|d| fs::read_dir(d.unwrap().path()).unwrap().count()).sum();
        assert_eq!(files, 3, "evicted chunks' files are deleted");
    }
}
