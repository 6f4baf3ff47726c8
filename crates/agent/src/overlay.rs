//! Copy-on-write overlays: the writes of one label over a read-only image.
//!
//! Writes land, at 4 KiB granularity, in a sparse `data` file the size of
//! the disk; a bitmap says which blocks were written. The shared chunks never
//! change. FLUSH makes acknowledged writes durable: `data` is synced, then
//! the bitmap is replaced atomically. The overlay lives in a directory of its
//! own and outlives clients and agent restarts.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::vdisk::VirtualDisk;

/// Overlay granularity.
pub const BLOCK: u64 = 4096;

/// The writes of one label.
pub struct Overlay {
    dir: PathBuf,
    /// Holds an exclusive lock on `DIR/lock`: one process per overlay.
    _lock: File,
    data: File,
    size: u64,
    /// One bit per block: written here.
    map: Mutex<Vec<u64>>,
    /// Serialises writes, whose partial blocks are read, patched and written.
    writing: Mutex<()>,
    /// Serialises flushes, so an older bitmap never replaces a newer one.
    flushing: Mutex<()>,
    /// The image version this overlay was made over.
    manifest_id: String,
}

impl Overlay {
    /// Opens (creating) the overlay in `dir` over the image version
    /// `manifest_id` of `size` bytes. An overlay made over another version
    /// of the image is refused: its blocks would land on the wrong files.
    pub fn open(dir: &Path, manifest_id: &str, size: u64) -> io::Result<Overlay> {
        fs::create_dir_all(dir)?;
        let lock = File::create(dir.join("lock"))?;
        // SAFETY: flock takes a valid open descriptor owned by `lock`.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(io::Error::other(format!("overlay {} is in use by another tessera process", dir.display())));
        }
        let base = dir.join("base");
        match fs::read_to_string(&base) {
            Ok(b) if b.trim() == manifest_id => {}
            Ok(b) => {
                return Err(io::Error::other(format!(
                    "overlay {} was made over manifest {}, but the image is now {manifest_id}; remove the overlay to start afresh",
                    dir.display(),
                    b.trim()
                )))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => write_durably(&base, manifest_id.as_bytes())?,
            Err(e) => return Err(e),
        }
        let data = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(dir.join("data"))?;
        data.set_len(size)?;
        let words = size.div_ceil(BLOCK).div_ceil(64) as usize;
        let mut map = vec![0u64; words];
        match fs::read(dir.join("map")) {
            Ok(bytes) if bytes.len() == words * 8 => {
                for (w, b) in map.iter_mut().zip(bytes.chunks(8)) {
                    *w = u64::from_le_bytes(b.try_into().expect("8-byte chunks"));
                }
            }
            Ok(_) => return Err(io::Error::other(format!("overlay {}: map does not match the disk size", dir.display()))),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(Overlay {
            dir: dir.to_owned(),
            _lock: lock,
            data,
            size,
            map: Mutex::new(map),
            writing: Mutex::new(()),
            flushing: Mutex::new(()),
            manifest_id: manifest_id.to_owned(),
        })
    }

    /// The image version this overlay was made over.
    pub fn manifest_id(&self) -> &str {
        &self.manifest_id
    }

    fn written(map: &[u64], block: u64) -> bool {
        map[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// Reads `buf` at `offset`: written blocks from the overlay, the rest from `base`.
    pub fn read_at(&self, base: &VirtualDisk, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if offset.checked_add(buf.len() as u64).is_none_or(|end| end > self.size) {
            return Err(io::Error::new(ErrorKind::InvalidInput, "read past the end of the disk"));
        }
        let map = self.map.lock().expect("no panics while holding the lock").clone_range(offset, buf.len() as u64);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let here = map(pos / BLOCK);
            // Extend the run while blocks stay on the same side.
            let mut end = ((pos / BLOCK + 1) * BLOCK).min(offset + buf.len() as u64);
            while end < offset + buf.len() as u64 && map(end / BLOCK) == here {
                end = ((end / BLOCK + 1) * BLOCK).min(offset + buf.len() as u64);
            }
            let part = &mut buf[done..(end - offset) as usize];
            if here {
                self.data.read_exact_at(part, pos)?;
            } else {
                base.read_at(part, pos).map_err(io::Error::other)?;
            }
            done = (end - offset) as usize;
        }
        Ok(())
    }

    /// Writes `data` at `offset` (partial blocks are read, patched, written).
    pub fn write_at(&self, base: &VirtualDisk, data: &[u8], offset: u64) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        if end > self.size {
            return Err(io::Error::new(ErrorKind::InvalidInput, "write past the end of the disk"));
        }
        let first = offset / BLOCK;
        let last = (end - 1) / BLOCK;
        let aligned_start = first * BLOCK;
        let aligned_end = ((last + 1) * BLOCK).min(self.size);
        // Bring the chunks of partial blocks into the cache before taking
        // the lock, so other writers do not wait behind a cold fetch.
        let mut warm = [0u8; 1];
        if offset != aligned_start {
            let _ = base.read_at(&mut warm, aligned_start);
        }
        if end != aligned_end {
            let _ = base.read_at(&mut warm, last * BLOCK);
        }
        let _w = self.writing.lock().expect("no panics while holding the lock");
        let mut buf = vec![0u8; (aligned_end - aligned_start) as usize];
        if offset != aligned_start {
            self.read_at(base, &mut buf[..BLOCK as usize], aligned_start)?;
        }
        if end != aligned_end && (last > first || offset == aligned_start) {
            let tail = (last * BLOCK - aligned_start) as usize;
            let len = buf.len() - tail;
            self.read_at(base, &mut buf[tail..tail + len], last * BLOCK)?;
        }
        buf[(offset - aligned_start) as usize..(end - aligned_start) as usize].copy_from_slice(data);
        self.data.write_all_at(&buf, aligned_start)?;
        let mut map = self.map.lock().expect("no panics while holding the lock");
        for b in first..=last {
            map[(b / 64) as usize] |= 1 << (b % 64);
        }
        Ok(())
    }

    /// Writes zeros over `len` bytes at `offset`; whole blocks become holes
    /// in the overlay's data file.
    pub fn zero(&self, base: &VirtualDisk, offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        let inner_start = offset.next_multiple_of(BLOCK);
        let inner_end = (end / BLOCK) * BLOCK;
        if inner_start >= inner_end {
            return self.write_at(base, &vec![0; len as usize], offset);
        }
        self.write_at(base, &vec![0; (inner_start - offset) as usize], offset)?;
        self.write_at(base, &vec![0; (end - inner_end) as usize], inner_end)?;
        let _w = self.writing.lock().expect("no panics while holding the lock");
        // SAFETY: fallocate takes a valid descriptor owned by `self.data` and plain integers.
        let r = unsafe {
            libc::fallocate(
                self.data.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                inner_start as i64,
                (inner_end - inner_start) as i64,
            )
        };
        if r != 0 {
            drop(_w);
            // No hole punching here: write the zeros.
            for at in (inner_start..inner_end).step_by(1 << 20) {
                let n = (inner_end - at).min(1 << 20);
                self.write_at(base, &vec![0; n as usize], at)?;
            }
            return Ok(());
        }
        let mut map = self.map.lock().expect("no panics while holding the lock");
        for b in inner_start / BLOCK..inner_end / BLOCK {
            map[(b / 64) as usize] |= 1 << (b % 64);
        }
        Ok(())
    }

    /// Makes every completed write durable: the bitmap is taken first, then
    /// the data synced, so no saved bit names a block whose data is not on
    /// disk; flushes run one at a time, so a newer bitmap is never replaced
    /// by an older one.
    pub fn flush(&self) -> io::Result<()> {
        let _f = self.flushing.lock().expect("no panics while holding the lock");
        let bytes: Vec<u8> = {
            let map = self.map.lock().expect("no panics while holding the lock");
            map.iter().flat_map(|w| w.to_le_bytes()).collect()
        };
        self.data.sync_data()?;
        write_durably(&self.dir.join("map"), &bytes)
    }

    /// Whether any block in `[offset, offset + len)` was written here.
    pub fn any_written(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len).min(self.size);
        let map = self.map.lock().expect("no panics while holding the lock");
        (offset / BLOCK..end.div_ceil(BLOCK)).any(|b| Self::written(&map, b))
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// A snapshot of the bits covering a range, as a lookup function.
trait CloneRange {
    fn clone_range(&self, offset: u64, len: u64) -> Box<dyn Fn(u64) -> bool>;
}

impl CloneRange for Vec<u64> {
    fn clone_range(&self, offset: u64, len: u64) -> Box<dyn Fn(u64) -> bool> {
        let first = offset / BLOCK;
        let last = (offset + len.max(1) - 1) / BLOCK;
        let bits: Vec<bool> = (first..=last).map(|b| Overlay::written(self, b)).collect();
        Box::new(move |b| bits[(b - first) as usize])
    }
}

fn write_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    File::open(path.parent().expect("overlay files have a parent"))?.sync_all()
}
