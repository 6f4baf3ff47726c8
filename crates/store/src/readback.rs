//! Reading an image back out of the store: every chunk is fetched, checked
//! against its id and opened with its key, on all cores.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tessera_chunk::{open_in_place, ChunkId, ChunkRef, Manifest, CHUNK_SIZE};

use crate::{ChunkStore, Error, Result};

/// A chunk that is missing, corrupt or does not open.
#[derive(Debug)]
pub struct BadChunk {
    /// Its index in the disk.
    pub index: u64,
    /// Its id.
    pub id: ChunkId,
    /// What is wrong.
    pub error: Error,
}

/// Fetches, checks and opens one chunk.
pub fn read_chunk(store: &dyn ChunkStore, r: &ChunkRef) -> Result<Vec<u8>> {
    // Opened in place: one copy out of the store's buffer (shared or not).
    let mut buf = store.get(&r.id)?.to_vec();
    open_in_place(&r.id, &r.key, &mut buf)?;
    Ok(buf)
}

/// Calls `f(index, ref)` for every stored chunk, on `threads` threads, until
/// all are done or `f` fails; returns the first failure.
fn for_each_chunk<F>(manifest: &Manifest, threads: usize, f: F) -> Result<()>
where
    F: Fn(u64, &ChunkRef) -> Result<()> + Sync,
{
    let stored: Vec<(u64, &ChunkRef)> = manifest.chunks.iter().enumerate().filter_map(|(i, c)| c.as_ref().map(|c| (i as u64, c))).collect();
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(index, r)) = stored.get(i) else { return };
                if let Err(e) = f(index, r) {
                    failure.lock().expect("no panics while holding the lock").get_or_insert(e);
                    next.store(stored.len(), Ordering::Relaxed);
                    return;
                }
            });
        }
    });
    match failure.into_inner().expect("no panics while holding the lock") {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Writes the plain disk image to `out` (sparse where the image has holes).
/// The file appears only when complete; on any error nothing is left behind.
pub fn export(manifest: &Manifest, store: &dyn ChunkStore, out: &Path, threads: usize, progress: &(dyn Fn(u64) + Sync)) -> Result<()> {
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp-{}", out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), std::process::id()));
    let _cleanup = {
        let tmp = tmp.clone();
        crate::interrupt::on_interrupt(move || {
            let _ = fs::remove_file(&tmp);
        })
    };
    let result = (|| {
        let file = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        file.set_len(manifest.geometry.disk_bytes).map_err(|e| Error::io("size", &tmp, e))?;
        for_each_chunk(manifest, threads, |index, r| {
            let data = read_chunk(store, r)?;
            file.write_all_at(&data, index * CHUNK_SIZE as u64).map_err(|e| Error::io("write", &tmp, e))?;
            progress(CHUNK_SIZE as u64);
            Ok(())
        })?;
        file.sync_all().map_err(|e| Error::io("sync", &tmp, e))?;
        fs::rename(&tmp, out).map_err(|e| Error::io("rename into place", out, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Checks every chunk of the image: present, matching its id, opening with
/// its key. Returns the bad ones (empty when the image is whole).
pub fn verify(manifest: &Manifest, store: &dyn ChunkStore, threads: usize, progress: &(dyn Fn(u64) + Sync)) -> Result<Vec<BadChunk>> {
    let bad = Mutex::new(Vec::new());
    for_each_chunk(manifest, threads, |index, r| {
        match read_chunk(store, r) {
            Ok(_) => {}
            Err(error @ (Error::NotFound(_) | Error::Chunk(_))) => {
                bad.lock().expect("no panics while holding the lock").push(BadChunk { index, id: r.id, error })
            }
            Err(other) => return Err(other),
        }
        progress(CHUNK_SIZE as u64);
        Ok(())
    })?;
    let mut bad = bad.into_inner().expect("no panics while holding the lock");
    bad.sort_by_key(|b| b.index);
    Ok(bad)
}
