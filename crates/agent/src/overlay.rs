//! Copy-on-write overlays: the writes of one label over a read-only image.
//!
//! Writes land, at 4 KiB granularity, in a sparse `data` file the size of
//! the disk; a bitmap says which blocks were written. The shared chunks never
//! change. FLUSH makes acknowledged writes durable: `data` is synced, then
//! the bitmap (with a checksum, so a damaged one is refused rather than read
//! as "nothing written") is replaced atomically. The overlay lives in a
//! directory of its own, made by the first write (opening a label to read
//! writes nothing), and outlives clients and agent restarts.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use tessera_chunk::ChunkId;

use crate::vdisk::VirtualDisk;

/// Overlay granularity.
pub const BLOCK: u64 = 4096;

/// The writes of one label.
pub struct Overlay {
    dir: PathBuf,
    /// The open files, once the overlay exists on disk.
    files: OnceLock<Files>,
    /// Serialises the overlay's creation.
    creating: Mutex<()>,
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

/// An overlay's files on disk.
struct Files {
    /// Holds an exclusive lock on `DIR/lock`: one process per overlay.
    _lock: File,
    data: File,
}

/// `map` starts with this, a version, the disk size and a SHA-256 of the bits.
const MAP_MAGIC: &[u8; 4] = b"TOVM";
const MAP_VERSION: u32 = 2;
const MAP_HEADER: usize = 4 + 4 + 8 + 32;

impl Overlay {
    /// Opens the overlay in `dir` over the image version `manifest_id` of
    /// `size` bytes; an overlay that does not exist yet is made by the first
    /// write. An overlay made over another version of the image is refused:
    /// its blocks would land on the wrong files.
    pub fn open(dir: &Path, manifest_id: &str, size: u64) -> io::Result<Overlay> {
        let words = size.div_ceil(BLOCK).div_ceil(64) as usize;
        let overlay = Overlay {
            dir: dir.to_owned(),
            files: OnceLock::new(),
            creating: Mutex::new(()),
            size,
            map: Mutex::new(vec![0u64; words]),
            writing: Mutex::new(()),
            flushing: Mutex::new(()),
            manifest_id: manifest_id.to_owned(),
        };
        if dir.join("base").exists() {
            let files = overlay.open_files(false)?;
            *overlay.map.lock().expect("no panics while holding the lock") = load_map(dir, size, words)?;
            let _ = overlay.files.set(files);
        }
        Ok(overlay)
    }

    /// Whether the overlay exists on disk (something was ever written).
    pub fn exists(&self) -> bool {
        self.files.get().is_some()
    }

    /// Locks the overlay's directory and opens its files; `create` makes
    /// them, and refuses if another process made them meanwhile.
    fn open_files(&self, create: bool) -> io::Result<Files> {
        let dir = &self.dir;
        if create {
            fs::create_dir_all(dir)?;
        }
        let lock = OpenOptions::new().write(true).create(true).truncate(false).open(dir.join("lock"))?;
        // SAFETY: flock takes a valid open descriptor owned by `lock`.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(io::Error::other(format!("overlay {} is in use by another tessera process", dir.display())));
        }
        let base = dir.join("base");
        match fs::read_to_string(&base) {
            Ok(_) if create => {
                return Err(io::Error::other(format!(
                    "overlay {} was made by another process since this one was opened; reconnect to see its writes",
                    dir.display()
                )))
            }
            Ok(b) if b.trim() == self.manifest_id => {}
            Ok(b) => {
                return Err(io::Error::other(format!(
                    "overlay {} was made over manifest {}, but the image is now {}; remove the overlay to start afresh",
                    dir.display(),
                    b.trim(),
                    self.manifest_id
                )))
            }
            Err(e) if e.kind() == ErrorKind::NotFound && create => write_durably(&base, self.manifest_id.as_bytes())?,
            Err(e) => return Err(e),
        }
        let data = OpenOptions::new().read(true).write(true).create(create).truncate(false).open(dir.join("data"))?;
        data.set_len(self.size)?;
        Ok(Files { _lock: lock, data })
    }

    /// The overlay's files, made on first use.
    fn files(&self) -> io::Result<&Files> {
        if let Some(f) = self.files.get() {
            return Ok(f);
        }
        let _creating = self.creating.lock().expect("no panics while holding the lock");
        if let Some(f) = self.files.get() {
            return Ok(f);
        }
        let files = self.open_files(true)?;
        Ok(self.files.get_or_init(|| files))
    }

    /// The data file, which exists once any block was written.
    fn data(&self) -> &File {
        &self.files.get().expect("a written block means the overlay exists").data
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
                self.data().read_exact_at(part, pos)?;
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
        let data_file = &self.files()?.data;
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
        data_file.write_all_at(&buf, aligned_start)?;
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
        let data_file = &self.files()?.data;
        let _w = self.writing.lock().expect("no panics while holding the lock");
        // SAFETY: fallocate takes a valid descriptor owned by `data_file` and plain integers.
        let r = unsafe {
            libc::fallocate(data_file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, inner_start as i64, (inner_end - inner_start) as i64)
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
        // Nothing was ever written: there is nothing to make durable.
        let Some(files) = self.files.get() else { return Ok(()) };
        let _f = self.flushing.lock().expect("no panics while holding the lock");
        let bits: Vec<u8> = {
            let map = self.map.lock().expect("no panics while holding the lock");
            map.iter().flat_map(|w| w.to_le_bytes()).collect()
        };
        files.data.sync_data()?;
        let mut file = Vec::with_capacity(MAP_HEADER + bits.len());
        file.extend_from_slice(MAP_MAGIC);
        file.extend_from_slice(&MAP_VERSION.to_le_bytes());
        file.extend_from_slice(&self.size.to_le_bytes());
        file.extend_from_slice(&ChunkId::of(&bits).0);
        file.extend_from_slice(&bits);
        write_durably(&self.dir.join("map"), &file)
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

/// Reads the bitmap saved by [`Overlay::flush`] (or by a release before
/// checksums: bare bits of the right length); a damaged one is an error.
fn load_map(dir: &Path, size: u64, words: usize) -> io::Result<Vec<u64>> {
    let corrupt = |why: &str| {
        io::Error::other(format!("overlay {}: its map is {why}; its writes cannot be trusted (remove the directory to start afresh)", dir.display()))
    };
    let bytes = match fs::read(dir.join("map")) {
        Ok(b) => b,
        // Written blocks only count once a flush saved them.
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(vec![0; words]),
        Err(e) => return Err(e),
    };
    let bits = if bytes.len() == words * 8 {
        &bytes[..]
    } else {
        if bytes.len() != MAP_HEADER + words * 8 || &bytes[..4] != MAP_MAGIC {
            return Err(corrupt("not the size the disk needs"));
        }
        if u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")) != MAP_VERSION || u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) != size
        {
            return Err(corrupt("of another version or disk size"));
        }
        if ChunkId::of(&bytes[MAP_HEADER..]).0[..] != bytes[16..48] {
            return Err(corrupt("corrupt (its checksum does not match)"));
        }
        &bytes[MAP_HEADER..]
    };
    Ok(bits.chunks(8).map(|b| u64::from_le_bytes(b.try_into().expect("8-byte chunks"))).collect())
}

fn write_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    File::open(path.parent().expect("overlay files have a parent"))?.sync_all()
}
