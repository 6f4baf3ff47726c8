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

use crate::{Bytes, CacheGauges, ChunkSource, Error, FetchContext, Lru2, Tier, CORRELATED};

/// Sealed chunks as files `DIR/ab/ID`, at most `capacity` bytes.
///
/// The directory is the cache's own: it carries a marker file
/// ([`MARKER`]) written when the cache made it, and a directory that holds
/// anything without that marker is refused, so a cache pointed by mistake at
/// a chunk store (or any other data) never evicts what it did not write.
/// Within its directory the cache only ever deletes the entries it indexed
/// and its own temporaries; files it does not recognise are left alone.
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
type Pending = (ChunkId, Bytes);

/// Chunks that may wait for the writer; past that, new ones are not cached.
const WRITE_BEHIND: usize = 64;

/// The file that marks a directory as a disk cache's own.
pub const MARKER: &str = "TESSERA-DISK-CACHE";

/// Prefix of the cache's temporaries: `.cache-tmp-PID-N`.
const TMP_PREFIX: &str = ".cache-tmp-";

impl DiskCache {
    /// Opens the cache in `dir`, indexing what a previous run left there
    /// (oldest first) and trimming it to `capacity`.
    ///
    /// `dir` must be new, empty, or a cache directory (one with the
    /// [`MARKER`]); anything else is refused with an error saying why.
    pub fn open(dir: &Path, capacity: u64) -> std::io::Result<DiskCache> {
        claim(dir)?;
        let mut found: Vec<(std::time::SystemTime, ChunkId, u64)> = Vec::new();
        for sub in fs::read_dir(dir)? {
            let sub = sub?;
            let name = sub.file_name().to_string_lossy().into_owned();
            if !(name.len() == 2 && name.bytes().all(|b| b.is_ascii_hexdigit()) && sub.file_type()?.is_dir()) {
                continue;
            }
            for f in fs::read_dir(sub.path())? {
                let f = f?;
                let name = f.file_name().to_string_lossy().into_owned();
                if let Ok(id) = name.parse::<ChunkId>() {
                    let md = f.metadata()?;
                    if md.is_file() {
                        found.push((md.modified()?, id, md.len()));
                    }
                } else if is_stale_temporary(&name) {
                    // Left by a cache process that died mid-write.
                    let _ = fs::remove_file(f.path());
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
        for (_, id, len) in found {
            inner.admit(id, len);
        }
        let (tx, rx) = bounded::<Pending>(WRITE_BEHIND);
        let w = Arc::clone(&inner);
        let writer = std::thread::spawn(move || {
            for (id, bytes) in rx {
                if let Err(e) = w.insert(&id, &bytes) {
                    tracing::warn!("disk cache: cannot keep chunk {id}: {e}");
                }
                w.pending.fetch_sub(1, Ordering::Relaxed);
            }
        });
        Ok(DiskCache { inner, behind: Mutex::new(Some(tx)), writer: Mutex::new(Some(writer)) })
    }

    /// Marks `dir` as a cache directory if it holds nothing but what a disk
    /// cache of an earlier release wrote there (two-hex-digit directories of
    /// files named by chunk ids, and temporaries), so [`DiskCache::open`]
    /// takes it. Only for a directory the caller knows is its own cache (a
    /// default location): a chunk store has the same shape.
    pub fn adopt_unmarked(dir: &Path) -> std::io::Result<bool> {
        if !dir.is_dir() || dir.join(MARKER).exists() {
            return Ok(false);
        }
        for sub in fs::read_dir(dir)? {
            let sub = sub?;
            let name = sub.file_name().to_string_lossy().into_owned();
            if !(name.len() == 2 && name.bytes().all(|b| b.is_ascii_hexdigit()) && sub.file_type()?.is_dir()) {
                return Ok(false);
            }
            for f in fs::read_dir(sub.path())? {
                let name = f?.file_name().to_string_lossy().into_owned();
                if name.parse::<ChunkId>().is_err() && !name.starts_with(".tmp-") {
                    return Ok(false);
                }
            }
        }
        write_marker(dir)?;
        Ok(true)
    }

    /// Keeps sealed `bytes` of `id` soon, on the writer thread; if the
    /// writer is too far behind, the chunk is not cached.
    pub fn insert_later(&self, id: ChunkId, bytes: Bytes) {
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
    pub fn get(&self, id: &ChunkId) -> Result<Option<Bytes>, Error> {
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
        let tmp = parent.join(format!("{TMP_PREFIX}{}-{}", std::process::id(), self.counter.fetch_add(1, Ordering::Relaxed)));
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

    fn fetch(&self, id: &ChunkId) -> Result<Option<Bytes>, Error> {
        if self.index.lock().expect("no panics while holding the lock").get(id).is_none() {
            return Ok(None);
        }
        match fs::read(self.path_of(id)) {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.remove(id);
                Ok(None)
            }
            Err(e) => Err(Error::Source { id: *id, tier: Tier::Disk, source: Box::new(e) }),
        }
    }
}

/// Makes `dir` the cache's own, or refuses it: a missing or empty
/// directory is created and marked; a marked one is taken as it is; any
/// other is refused, since evicting would delete files the cache never wrote.
fn claim(dir: &Path) -> std::io::Result<()> {
    if dir.join(MARKER).is_file() {
        return Ok(());
    }
    let refuse = |why: String| {
        std::io::Error::other(format!(
            "{} {why}; a disk cache only uses a new or empty directory (or one it made), since it deletes what it evicts: give another --cache-dir",
            dir.display()
        ))
    };
    match fs::read_dir(dir) {
        Ok(mut entries) => {
            if let Some(e) = entries.next() {
                let e = e?;
                return Err(refuse(format!("is not a tessera disk cache (it holds {:?} and no {MARKER} marker)", e.file_name())));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => fs::create_dir_all(dir)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => return Err(refuse("is not a directory".into())),
        Err(e) => return Err(e),
    }
    write_marker(dir)
}

fn write_marker(dir: &Path) -> std::io::Result<()> {
    let marker = dir.join(MARKER);
    let tmp = dir.join(format!("{TMP_PREFIX}marker-{}", std::process::id()));
    fs::write(&tmp, "A tessera disk cache: files in the two-hex-digit directories are cached sealed chunks, evicted at will.\n")?;
    fs::rename(&tmp, &marker)
}

/// Whether `name` is a temporary of a cache process that no longer runs.
fn is_stale_temporary(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(TMP_PREFIX) else { return false };
    let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
    pid.is_some_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
}

impl ChunkSource for DiskCache {
    fn tier(&self) -> Tier {
        Tier::Disk
    }

    fn fetch(&self, id: &ChunkId, _ctx: &FetchContext) -> Result<Option<Bytes>, Error> {
        self.inner.fetch(id)
    }

    fn offer(&self, id: &ChunkId, sealed: &Bytes, _ctx: &FetchContext) {
        self.insert_later(*id, sealed.clone());
    }

    fn forget(&self, id: &ChunkId) {
        self.remove(id);
    }

    fn drain(&self) {
        DiskCache::drain(self, Duration::from_secs(30));
    }

    fn cache_gauges(&self) -> Option<CacheGauges> {
        let index = self.inner.index.lock().expect("no panics while holding the lock");
        Some(CacheGauges { cache: "disk", bytes: index.used(), chunks: index.len() as u64, capacity: index.capacity(), evictions: self.evictions() })
    }

    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        crate::metrics::header(out, "tessera_cache_write_behind_dropped_total", "counter", "Chunks not kept on the cache disk because its writer was behind.");
        let _ = writeln!(out, "tessera_cache_write_behind_dropped_total {}", self.dropped());
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

    struct Fixture(Arc<DiskCache>);

    impl crate::conformance::Fixture for Fixture {
        fn source(&self) -> Arc<dyn ChunkSource> {
            self.0.clone()
        }
        fn hold(&self, id: &ChunkId, sealed: &[u8]) {
            self.0.insert(id, sealed).unwrap();
        }
        fn damage(&self, id: &ChunkId) -> bool {
            let path = self.0.inner.path_of(id);
            let mut b = fs::read(&path).unwrap();
            b[3] ^= 0x40;
            fs::write(path, b).unwrap();
            true
        }
        fn keeps_offers(&self) -> bool {
            true
        }
    }

    #[test]
    fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        crate::conformance::run(&Fixture(Arc::new(DiskCache::open(dir.path(), 10 << 20).unwrap())));
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
        assert_eq!(again.get(&id).unwrap().as_deref(), Some(&b[..]));
        let files: usize = fs::read_dir(dir.path()).unwrap().map(|d| d.unwrap().path()).filter(|p| p.is_dir()).map(|p| fs::read_dir(p).unwrap().count()).sum();
        assert_eq!(files, 3, "evicted chunks' files are deleted");
    }

    /// A store's chunk directory has a cache's shape; pointed at one, the
    /// cache must refuse it, not trim it.
    #[test]
    fn a_directory_it_did_not_make_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (id, b) = chunk(1);
        let hex = id.to_hex();
        fs::create_dir_all(dir.path().join(&hex[..2])).unwrap();
        fs::write(dir.path().join(&hex[..2]).join(&hex), &b).unwrap();
        let err = DiskCache::open(dir.path(), 10).err().expect("refused");
        assert!(err.to_string().contains("is not a tessera disk cache"), "{err}");
        assert!(dir.path().join(&hex[..2]).join(&hex).exists(), "nothing was deleted");
        assert!(!dir.path().join(MARKER).exists(), "nothing was written");
        // A file that is not a directory is refused too.
        let file = dir.path().join("plain");
        fs::write(&file, b"x").unwrap();
        assert!(DiskCache::open(&file, 10).is_err());
    }

    #[test]
    fn only_its_own_entries_and_dead_temporaries_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1_000).unwrap();
        let (id, b) = chunk(1);
        cache.insert(&id, &b).unwrap();
        drop(cache);
        let sub = dir.path().join(&id.to_hex()[..2]);
        let foreign = sub.join("notes.txt");
        let import_tmp = sub.join(format!(".tmp-{}-{}-0", id.to_hex(), u32::MAX - 1));
        let dead = sub.join(format!("{TMP_PREFIX}{}-0", u32::MAX - 1));
        let live = sub.join(format!("{TMP_PREFIX}{}-0", std::process::id()));
        for f in [&foreign, &import_tmp, &dead, &live] {
            fs::write(f, b"someone else's").unwrap();
        }
        // Tiny capacity: everything indexed is evicted, nothing else.
        let cache = DiskCache::open(dir.path(), 1).unwrap();
        assert_eq!(cache.len(), 0);
        assert!(!sub.join(id.to_hex()).exists(), "its own entry was evicted");
        assert!(!dead.exists(), "a dead cache process's temporary is removed");
        for f in [&foreign, &import_tmp, &live] {
            assert!(f.exists(), "{} was left alone", f.display());
        }
    }

    #[test]
    fn an_earlier_release_cache_is_adopted_only_when_it_looks_like_one() {
        let dir = tempfile::tempdir().unwrap();
        let (id, b) = chunk(1);
        let hex = id.to_hex();
        fs::create_dir_all(dir.path().join(&hex[..2])).unwrap();
        fs::write(dir.path().join(&hex[..2]).join(&hex), &b).unwrap();
        assert!(DiskCache::adopt_unmarked(dir.path()).unwrap());
        assert_eq!(DiskCache::open(dir.path(), 1_000).unwrap().len(), 1);
        let other = tempfile::tempdir().unwrap();
        fs::write(other.path().join("keyring.json"), b"{}").unwrap();
        assert!(!DiskCache::adopt_unmarked(other.path()).unwrap());
        assert!(DiskCache::open(other.path(), 1_000).is_err());
    }
}
