//! The embedded default chunk store: one file per chunk in a local directory.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tessera_chunk::ChunkId;

use crate::{ChunkStore, Error, Put, PutBatch, Result};

/// Chunks as files `ROOT/ab/abcdef…` (the first byte of the id fans out).
///
/// A put writes a temporary file in the same directory, flushes it to disk
/// and renames it into place, so a visible chunk is always whole, even after
/// a crash; [`ChunkStore::sync`] makes the renames durable with one `syncfs`.
pub struct LocalDirStore {
    root: PathBuf,
    counter: AtomicU64,
}

impl LocalDirStore {
    /// Opens (creating if needed) a store rooted at `root`.
    pub fn open(root: &Path) -> Result<LocalDirStore> {
        fs::create_dir_all(root).map_err(|e| Error::io("create store directory", root, e))?;
        Ok(LocalDirStore { root: root.to_owned(), counter: AtomicU64::new(0) })
    }

    /// Where chunk `id` lives.
    pub fn path_of(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join(&hex[..2]).join(hex)
    }

    /// Removes temporary files left by puts whose process died (kill -9,
    /// power loss); returns how many. Safe while other processes put.
    pub fn remove_stale_temporaries(&self) -> Result<usize> {
        let mut n = 0;
        for dir in self.fanout_dirs()? {
            for entry in fs::read_dir(&dir).map_err(|e| Error::io("list", &dir, e))? {
                let entry = entry.map_err(|e| Error::io("list", &dir, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                // .tmp-ID-PID-N
                let Some(rest) = name.strip_prefix(".tmp-") else { continue };
                let pid = rest.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
                if pid.is_none_or(|p| !crate::pid_alive(p)) && fs::remove_file(entry.path()).is_ok() {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Writes `bytes` to a fresh temporary beside `id`'s path, flushed to
    /// disk when `sync` is set.
    fn write_temporary(&self, id: &ChunkId, bytes: &[u8], sync: bool) -> Result<PathBuf> {
        let path = self.path_of(id);
        let dir = path.parent().expect("chunk paths have a parent");
        let tmp = dir.join(format!(
            ".tmp-{}-{}-{}",
            id.to_hex(),
            std::process::id(),
            self.counter.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> std::io::Result<()> {
            let mut f = match OpenOptions::new().write(true).create_new(true).open(&tmp) {
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    fs::create_dir_all(dir)?;
                    OpenOptions::new().write(true).create_new(true).open(&tmp)?
                }
                other => other?,
            };
            f.write_all(bytes)?;
            if sync {
                f.sync_data()?;
            } else {
                // Start writing back now, without waiting, so the batch's
                // commit finds most of its data already on disk.
                // SAFETY: sync_file_range takes a valid open descriptor owned by `f`.
                unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
            }
            Ok(())
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io("write chunk", &tmp, e));
        }
        Ok(tmp)
    }

    fn fanout_dirs(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(|e| Error::io("list", &self.root, e))? {
            let entry = entry.map_err(|e| Error::io("list", &self.root, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.len() == 2 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                out.push(entry.path());
            }
        }
        Ok(out)
    }
}

impl ChunkStore for LocalDirStore {
    fn put(&self, id: &ChunkId, bytes: &[u8]) -> Result<Put> {
        let path = self.path_of(id);
        if path.exists() {
            return Ok(Put::AlreadyPresent);
        }
        let tmp = self.write_temporary(id, bytes, true)?;
        rename_into_place(&tmp, &path)?;
        Ok(Put::Created)
    }

    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let path = self.path_of(id);
        fs::read(&path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => Error::NotFound(*id),
            _ => Error::io("read chunk", &path, e),
        })
    }

    fn exists(&self, id: &ChunkId) -> Result<bool> {
        let path = self.path_of(id);
        match fs::metadata(&path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("stat chunk", &path, e)),
        }
    }

    fn list(&self) -> Result<Vec<ChunkId>> {
        let mut out = Vec::new();
        for dir in self.fanout_dirs()? {
            for entry in fs::read_dir(&dir).map_err(|e| Error::io("list", &dir, e))? {
                let entry = entry.map_err(|e| Error::io("list", &dir, e))?;
                if let Ok(id) = entry.file_name().to_string_lossy().parse::<ChunkId>() {
                    out.push(id);
                }
            }
        }
        Ok(out)
    }

    fn delete(&self, id: &ChunkId) -> Result<bool> {
        let path = self.path_of(id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("delete chunk", &path, e)),
        }
    }

    fn sync(&self) -> Result<()> {
        let dir = File::open(&self.root).map_err(|e| Error::io("open store", &self.root, e))?;
        // SAFETY: syncfs takes a valid open descriptor owned by `dir`.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(Error::io("sync store", &self.root, std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn batch(&self) -> Box<dyn PutBatch + '_> {
        Box::new(LocalBatch { store: self, staged: Mutex::new(Vec::new()), seen: Mutex::new(HashSet::new()) })
    }
}

/// Renames a written temporary to its chunk path. Renaming over a chunk a
/// concurrent put just placed is harmless: both hold the same bytes.
fn rename_into_place(tmp: &Path, path: &Path) -> Result<()> {
    fs::rename(tmp, path).map_err(|e| {
        let _ = fs::remove_file(tmp);
        Error::io("rename chunk into place", path, e)
    })
}

/// Staged chunks: temporaries written without a flush each; on commit one
/// `syncfs` makes them durable, they are renamed into place, and a second
/// `syncfs` makes the names durable. Until then no staged chunk is visible,
/// and a dropped batch removes its temporaries.
struct LocalBatch<'s> {
    store: &'s LocalDirStore,
    staged: Mutex<Vec<(PathBuf, PathBuf)>>,
    seen: Mutex<HashSet<ChunkId>>,
}

impl PutBatch for LocalBatch<'_> {
    fn put(&self, id: &ChunkId, bytes: &[u8]) -> Result<Put> {
        if !self.seen.lock().expect("no panics while holding the lock").insert(*id) || self.store.exists(id)? {
            return Ok(Put::AlreadyPresent);
        }
        let tmp = self.store.write_temporary(id, bytes, false)?;
        self.staged.lock().expect("no panics while holding the lock").push((tmp, self.store.path_of(id)));
        Ok(Put::Created)
    }

    fn commit(self: Box<Self>) -> Result<()> {
        self.store.sync()?;
        let staged = std::mem::take(&mut *self.staged.lock().expect("no panics while holding the lock"));
        for (tmp, path) in &staged {
            rename_into_place(tmp, path)?;
        }
        self.store.sync()
    }
}

impl Drop for LocalBatch<'_> {
    fn drop(&mut self) {
        for (tmp, _) in self.staged.get_mut().expect("no panics while holding the lock").drain(..) {
            let _ = fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        crate::conformance::run(&LocalDirStore::open(dir.path()).unwrap());
    }

    #[test]
    fn concurrent_puts() {
        let dir = tempfile::tempdir().unwrap();
        crate::conformance::run_concurrent(Arc::new(LocalDirStore::open(dir.path()).unwrap()));
        crate::conformance::run_concurrent(Arc::new(crate::MemoryStore::default()));
    }

    #[test]
    fn a_dropped_batch_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDirStore::open(dir.path()).unwrap();
        let id = ChunkId::of(b"staged");
        let batch = store.batch();
        batch.put(&id, b"staged").unwrap();
        assert!(!store.exists(&id).unwrap(), "staged chunks are invisible until commit");
        drop(batch);
        assert!(store.list().unwrap().is_empty());
        assert_eq!(store.remove_stale_temporaries().unwrap(), 0, "the batch removed its temporaries");
    }

    #[test]
    fn temporaries_are_invisible_and_removable() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDirStore::open(dir.path()).unwrap();
        let id = ChunkId::of(b"x");
        store.put(&id, b"x").unwrap();
        let stale = store.path_of(&id).with_file_name(format!(".tmp-{}-{}-0", id.to_hex(), u32::MAX - 1));
        let live = store.path_of(&id).with_file_name(format!(".tmp-{}-{}-0", id.to_hex(), std::process::id()));
        fs::write(&stale, b"half").unwrap();
        fs::write(&live, b"half").unwrap();
        assert_eq!(store.list().unwrap(), vec![id]);
        assert_eq!(store.remove_stale_temporaries().unwrap(), 1);
        assert!(live.exists(), "a running process's temporary is left alone");
    }
}
