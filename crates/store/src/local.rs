//! The embedded default chunk store: one file per chunk in a local directory.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tessera_chunk::ChunkId;

use crate::{Bytes, ChunkStore, Committed, Error, Put, PutBatch, Result};

/// Chunks as files `ROOT/ab/abcdef…` (the first byte of the id fans out).
///
/// A put writes a temporary file in `ROOT/.staging` (named by the writer's
/// pid), flushes it to disk and renames it into place, so a visible chunk is
/// always whole, even after a crash; [`ChunkStore::sync`] makes the renames
/// durable with one `syncfs`. Temporaries of processes that died are found
/// in one small directory ([`LocalDirStore::remove_stale_temporaries`]), and
/// an interrupted process removes its own ([`crate::interrupt`]).
///
/// Opening a store writes nothing: its directories are made by the first put.
pub struct LocalDirStore {
    root: PathBuf,
    counter: AtomicU64,
    _cleanup: crate::interrupt::Registration,
}

/// Where temporaries are written, under the root.
const STAGING: &str = ".staging";

impl LocalDirStore {
    /// Opens a store rooted at `root` (which need not exist yet).
    pub fn open(root: &Path) -> LocalDirStore {
        let staging = root.join(STAGING);
        let cleanup = crate::interrupt::on_interrupt(move || {
            let _ = remove_temporaries(&staging, |pid| pid == std::process::id());
        });
        LocalDirStore { root: root.to_owned(), counter: AtomicU64::new(0), _cleanup: cleanup }
    }

    /// Where chunk `id` lives.
    pub fn path_of(&self, id: &ChunkId) -> PathBuf {
        chunk_path(&self.root, id)
    }

    /// Removes temporaries of dead processes that releases before the
    /// staging directory left beside the chunks (`ab/.tmp-ID-PID-N`);
    /// reads every fan-out directory, so it is for imports, not every start.
    pub fn remove_legacy_temporaries(&self) -> Result<usize> {
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

    /// Writes `bytes` to a fresh temporary for `id`, flushed to disk when
    /// `sync` is set.
    fn write_temporary(&self, id: &ChunkId, bytes: &[u8], sync: bool) -> Result<PathBuf> {
        let staging = self.root.join(STAGING);
        let tmp = staging.join(format!("{}-{}-{}", std::process::id(), self.counter.fetch_add(1, Ordering::Relaxed), &id.to_hex()[..16]));
        let Some(_writing) = crate::interrupt::writing() else {
            return Err(Error::Interrupted);
        };
        let write = || -> std::io::Result<()> {
            let mut f = match OpenOptions::new().write(true).create_new(true).open(&tmp) {
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    fs::create_dir_all(&staging)?;
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
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io("list", &self.root, e)),
        };
        for entry in entries {
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

/// Where chunk `id` lives in a store rooted at `root`.
pub(crate) fn chunk_path(root: &Path, id: &ChunkId) -> PathBuf {
    let hex = id.to_hex();
    root.join(&hex[..2]).join(hex)
}

/// Puts chunk `id` of the store at `from` into the store at `to` as a hard
/// link (a copy across file systems), durably; a chunk already there is fine.
pub(crate) fn link_chunk(from: &Path, to: &Path, id: &ChunkId) -> Result<()> {
    let (src, dst) = (chunk_path(from, id), chunk_path(to, id));
    let dir = dst.parent().expect("chunk paths have a parent");
    let link = || match fs::hard_link(&src, &dst) {
        Err(e) if e.kind() == ErrorKind::NotFound && src.exists() => fs::create_dir_all(dir).and_then(|()| fs::hard_link(&src, &dst)),
        other => other,
    };
    match link() {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => return Err(Error::NotFound(*id)),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let bytes = fs::read(&src).map_err(|e| Error::io("read chunk", &src, e))?;
            LocalDirStore::open(to).put(id, &bytes)?;
            return Ok(());
        }
        Err(e) => return Err(Error::io("link chunk", &dst, e)),
    }
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("sync directory", dir, e))
}

/// Removes the temporaries in `staging` (named `PID-…`) whose writer `pid`
/// matches; returns how many.
fn remove_temporaries(staging: &Path, matches: impl Fn(u32) -> bool) -> Result<usize> {
    let entries = match fs::read_dir(staging) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io("list", staging, e)),
    };
    let mut n = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(&matches) && fs::remove_file(entry.path()).is_ok() {
            n += 1;
        }
    }
    Ok(n)
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

    fn get(&self, id: &ChunkId) -> Result<Bytes> {
        let path = self.path_of(id);
        fs::read(&path).map(Bytes::from).map_err(|e| match e.kind() {
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
        let dir = match File::open(&self.root) {
            Ok(d) => d,
            // Nothing was ever put: nothing to make durable.
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("open store", &self.root, e)),
        };
        // SAFETY: syncfs takes a valid open descriptor owned by `dir`.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(Error::io("sync store", &self.root, std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn batch(&self) -> Box<dyn PutBatch + '_> {
        Box::new(LocalBatch { store: self, staged: Mutex::new(Vec::new()), seen: Mutex::new(HashSet::new()) })
    }

    /// Cheap: temporaries live in one directory.
    fn tidy(&self) -> Result<usize> {
        remove_temporaries(&self.root.join(STAGING), |pid| !crate::pid_alive(pid))
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

/// Renames a written temporary to its chunk path, making the fan-out
/// directory if needed. Renaming over a chunk a concurrent put just placed
/// is harmless: both hold the same bytes.
fn rename_into_place(tmp: &Path, path: &Path) -> Result<()> {
    let renamed = match fs::rename(tmp, path) {
        Err(e) if e.kind() == ErrorKind::NotFound && tmp.exists() => {
            fs::create_dir_all(path.parent().expect("chunk paths have a parent")).and_then(|()| fs::rename(tmp, path))
        }
        other => other,
    };
    renamed.map_err(|e| {
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
    staged: Mutex<Vec<(PathBuf, PathBuf, ChunkId, u64)>>,
    seen: Mutex<HashSet<ChunkId>>,
}

impl PutBatch for LocalBatch<'_> {
    fn put(&self, id: &ChunkId, bytes: &[u8]) -> Result<()> {
        if !self.seen.lock().expect("no panics while holding the lock").insert(*id) {
            return Ok(());
        }
        if self.store.exists(id)? {
            tracing::debug!("chunk {id} is in the store already (dedup)");
            return Ok(());
        }
        let tmp = self.store.write_temporary(id, bytes, false)?;
        self.staged.lock().expect("no panics while holding the lock").push((tmp, self.store.path_of(id), *id, bytes.len() as u64));
        Ok(())
    }

    fn commit(self: Box<Self>) -> Result<Committed> {
        self.store.sync()?;
        let staged = std::mem::take(&mut *self.staged.lock().expect("no panics while holding the lock"));
        for (tmp, path, _, _) in &staged {
            rename_into_place(tmp, path)?;
        }
        self.store.sync()?;
        let mut committed = Committed::default();
        for (_, _, id, len) in staged {
            committed.add(id, len);
        }
        Ok(committed)
    }
}

impl Drop for LocalBatch<'_> {
    fn drop(&mut self) {
        for (tmp, ..) in self.staged.get_mut().expect("no panics while holding the lock").drain(..) {
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
        crate::conformance::run(&LocalDirStore::open(dir.path()));
    }

    #[test]
    fn concurrent_puts() {
        let dir = tempfile::tempdir().unwrap();
        crate::conformance::run_concurrent(Arc::new(LocalDirStore::open(dir.path())));
        crate::conformance::run_concurrent(Arc::new(crate::MemoryStore::default()));
    }

    #[test]
    fn a_dropped_batch_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDirStore::open(dir.path());
        let id = ChunkId::of(b"staged");
        let batch = store.batch();
        batch.put(&id, b"staged").unwrap();
        assert!(!store.exists(&id).unwrap(), "staged chunks are invisible until commit");
        drop(batch);
        assert!(store.list().unwrap().is_empty());
        assert_eq!(store.tidy().unwrap(), 0, "the batch removed its temporaries");
    }

    #[test]
    fn temporaries_are_invisible_and_removable() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDirStore::open(dir.path());
        let id = ChunkId::of(b"x");
        store.put(&id, b"x").unwrap();
        let staging = dir.path().join(STAGING);
        let stale = staging.join(format!("{}-0-abc", u32::MAX - 1));
        let live = staging.join(format!("{}-0-abc", std::process::id()));
        let legacy = store.path_of(&id).with_file_name(format!(".tmp-{}-{}-0", id.to_hex(), u32::MAX - 1));
        fs::create_dir_all(&staging).unwrap();
        for f in [&stale, &live, &legacy] {
            fs::write(f, b"half").unwrap();
        }
        assert_eq!(store.list().unwrap(), vec![id]);
        assert_eq!(store.tidy().unwrap(), 1);
        assert!(live.exists(), "a running process's temporary is left alone");
        assert_eq!(store.remove_legacy_temporaries().unwrap(), 1);
        assert!(!legacy.exists());
    }

    #[test]
    fn opening_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("chunks");
        let store = LocalDirStore::open(&root);
        assert!(store.list().unwrap().is_empty());
        assert!(!store.exists(&ChunkId::of(b"x")).unwrap());
        store.sync().unwrap();
        assert!(!root.exists());
    }
}
