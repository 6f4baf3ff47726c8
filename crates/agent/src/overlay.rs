//! Copy-on-write overlays: the writes of one label over a read-only image.
//!
//! Writes land, at 4 KiB granularity, in a sparse `data` file the size of
//! the disk; a bitmap says which blocks were written. The shared chunks never
//! change. FLUSH makes acknowledged writes durable: `data` is synced, then
//! the bitmap (with a checksum, so a damaged one is refused rather than read
//! as "nothing written") is replaced atomically. The overlay lives in a
//! directory of its own, made by the first write (opening a label to read
//! writes nothing), and outlives clients and agent restarts.
//!
//! Between flushes, each write also appends, before it is acknowledged, one
//! record per block to a journal (`journal-N`: the block and the SHA-256 of
//! the bytes written). If the agent dies (`kill -9`), the next one replays
//! the journals over the saved bitmap, taking a block as written only if
//! the data file holds exactly the bytes its record names: no acknowledged
//! write is lost with the process, and a block whose bytes never reached
//! the file (power lost before a flush) reads as it was before the write.
//! A flush saves the bitmap and removes the journals it covers.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use tessera_chunk::ChunkId;

use crate::vdisk::{ReadCounts, VirtualDisk};

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
    /// The journal written now, and its number.
    journal: Mutex<Option<(u64, File)>>,
}

/// An overlay's files on disk.
struct Files {
    /// Holds an exclusive lock on `DIR/lock`: one process per overlay.
    _lock: File,
    data: File,
}

/// Bytes of one journal record: the block, then the SHA-256 of its bytes.
const RECORD: usize = 8 + 32;

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
            journal: Mutex::new(None),
        };
        if dir.join("base").exists() {
            let files = overlay.open_files(false)?;
            let mut map = load_map(dir, size, words)?;
            let replayed = replay_journals(dir, &files.data, size, &mut map)?;
            if replayed > 0 {
                tracing::info!("overlay {}: {replayed} blocks written after its last flush recovered from its journal", dir.display());
            }
            *overlay.map.lock().expect("no panics while holding the lock") = map;
            let _ = overlay.files.set(files);
        }
        Ok(overlay)
    }

    /// Journals the blocks of `bytes`, written from block `first`.
    fn journal(&self, first: u64, bytes: &[u8]) -> io::Result<()> {
        let mut records = Vec::with_capacity(bytes.len() / BLOCK as usize * RECORD);
        for (i, block) in bytes.chunks(BLOCK as usize).enumerate() {
            records.extend_from_slice(&(first + i as u64).to_le_bytes());
            records.extend_from_slice(&block_hash(block));
        }
        self.append(&records)
    }

    /// Appends records to the journal, opening a new one if needed.
    fn append(&self, records: &[u8]) -> io::Result<()> {
        let mut journal = self.journal.lock().expect("no panics while holding the lock");
        if journal.is_none() {
            let next = journal_numbers(&self.dir)?.last().map(|n| n + 1).unwrap_or(0);
            let f = OpenOptions::new().append(true).create_new(true).open(self.dir.join(format!("journal-{next}")))?;
            *journal = Some((next, f));
        }
        let (_, f) = journal.as_mut().expect("opened above");
        let written = f.write_all(records);
        if written.is_err() {
            // A torn record would misalign every later one: later records
            // go to a new journal (replay ignores a torn tail).
            *journal = None;
        }
        written
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
        self.read_counted(base, buf, offset, None)
    }

    /// [`Overlay::read_at`], counting the image's chunks read in `counts`.
    pub fn read_counted(&self, base: &VirtualDisk, buf: &mut [u8], offset: u64, counts: Option<&ReadCounts>) -> io::Result<()> {
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
                base.read_counted(part, pos, counts).map_err(io::Error::other)?;
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
        // The record first: a write cut short leaves a record the data
        // file does not match (ignored at replay), never data without its
        // record (which would hide an earlier acknowledged write's record).
        self.journal(first, &buf)?;
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
        let zero = block_hash(&[0; BLOCK as usize]);
        let mut records = Vec::new();
        for b in inner_start / BLOCK..inner_end / BLOCK {
            records.extend_from_slice(&b.to_le_bytes());
            records.extend_from_slice(&zero);
        }
        self.append(&records)?;
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
        // The bits, and the journals that cover no more than them: taken
        // together, between writes (which journal and set bits under
        // `writing`), so a write is in the bitmap saved or in a journal kept.
        // Every journal there now (those replayed when the overlay was
        // opened, and the one being written, closed here) is covered.
        let (bits, covered): (Vec<u8>, Option<u64>) = {
            let _w = self.writing.lock().expect("no panics while holding the lock");
            let map = self.map.lock().expect("no panics while holding the lock");
            self.journal.lock().expect("no panics while holding the lock").take();
            (map.iter().flat_map(|w| w.to_le_bytes()).collect(), journal_numbers(&self.dir)?.last().copied())
        };
        files.data.sync_data()?;
        let mut file = Vec::with_capacity(MAP_HEADER + bits.len());
        file.extend_from_slice(MAP_MAGIC);
        file.extend_from_slice(&MAP_VERSION.to_le_bytes());
        file.extend_from_slice(&self.size.to_le_bytes());
        file.extend_from_slice(&ChunkId::of(&bits).0);
        file.extend_from_slice(&bits);
        write_durably(&self.dir.join("map"), &file)?;
        // The saved bitmap holds every block those journals name.
        if let Some(last) = covered {
            for n in journal_numbers(&self.dir)?.into_iter().filter(|&n| n <= last) {
                fs::remove_file(self.dir.join(format!("journal-{n}")))?;
            }
        }
        Ok(())
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

fn block_hash(block: &[u8]) -> [u8; 32] {
    ChunkId::of(block).0
}

/// The numbers of the journals in `dir`, ascending.
fn journal_numbers(dir: &Path) -> io::Result<Vec<u64>> {
    let mut out: Vec<u64> =
        fs::read_dir(dir)?.flatten().filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix("journal-")).and_then(|n| n.parse().ok())).collect();
    out.sort_unstable();
    Ok(out)
}

/// Sets the bits of journal records whose block holds exactly the bytes
/// recorded; returns how many were set that the bitmap lacked.
fn replay_journals(dir: &Path, data: &File, size: u64, map: &mut [u64]) -> io::Result<usize> {
    let mut set = 0;
    let mut block = vec![0u8; BLOCK as usize];
    for n in journal_numbers(dir)? {
        let bytes = fs::read(dir.join(format!("journal-{n}")))?;
        for record in bytes.chunks_exact(RECORD) {
            let b = u64::from_le_bytes(record[..8].try_into().expect("8 bytes"));
            let start = b.saturating_mul(BLOCK);
            if start >= size {
                continue; // a torn or damaged record
            }
            let len = BLOCK.min(size - start) as usize;
            if data.read_exact_at(&mut block[..len], start).is_err() || block_hash(&block[..len])[..] != record[8..] {
                continue;
            }
            let (word, bit) = ((b / 64) as usize, 1u64 << (b % 64));
            if map[word] & bit == 0 {
                map[word] |= bit;
                set += 1;
            }
        }
    }
    Ok(set)
}

fn write_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    File::open(path.parent().expect("overlay files have a parent"))?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tessera_cache::{Loader, LoaderOptions};
    use tessera_chunk::{Geometry, Manifest, CHUNK_SIZE, MANIFEST_FORMAT};

    use super::*;

    /// A disk of holes: reads are zeros and fetch nothing.
    fn holes(chunks: usize) -> VirtualDisk {
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            source: Default::default(),
            config: Default::default(),
            geometry: Geometry { disk_bytes: (chunks * CHUNK_SIZE) as u64, chunk_size: CHUNK_SIZE as u64, block_size: 4096, ..Default::default() },
            salt_id: String::new(),
            salt_epoch: 0,
            dedup_scope: Default::default(),
            imported_at: 0,
            chunks: vec![None; chunks],
        };
        let loader = Arc::new(Loader::new(LoaderOptions { memory_bytes: 1 << 20 }, Vec::new()));
        VirtualDisk::new("t", &tessera_store::ImageRef::new("ab".repeat(32), "t"), manifest, loader)
    }

    /// The overlay's files as a `kill -9` would leave them (the lock aside).
    fn crash_copy(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for e in fs::read_dir(from).unwrap().flatten() {
            if e.file_name() != "lock" {
                fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }

    fn read(o: &Overlay, base: &VirtualDisk, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0xee; len];
        o.read_at(base, &mut buf, offset).unwrap();
        buf
    }

    #[test]
    fn acknowledged_writes_survive_the_process_through_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let base = holes(2);
        let size = base.size();
        let o = Overlay::open(&dir.path().join("a"), "m", size).unwrap();
        o.write_at(&base, &[7u8; 10_000], 4096 + 17).unwrap();
        o.flush().unwrap();
        o.write_at(&base, &[9u8; 8192], 65_536).unwrap();
        o.zero(&base, 4096, 8192).unwrap();
        assert!(journal_numbers(&dir.path().join("a")).unwrap().len() == 1, "the flush removed the journal it covered");

        // After a crash, the next agent finds every acknowledged write.
        crash_copy(&dir.path().join("a"), &dir.path().join("b"));
        let back = Overlay::open(&dir.path().join("b"), "m", size).unwrap();
        for (offset, len) in [(0u64, 4096 * 5), (65_536 - 100, 8192 + 200)] {
            assert_eq!(read(&back, &base, offset, len), read(&o, &base, offset, len), "at {offset}");
        }
        assert_eq!(read(&back, &base, 65_536, 8192), vec![9u8; 8192]);
        assert_eq!(read(&back, &base, 4096, 8192), vec![0u8; 8192], "the zeroed blocks");
        assert_eq!(read(&back, &base, 4096 * 3, 100), vec![7u8; 100], "the flushed write past the zeroed blocks");
        back.flush().unwrap();
        assert!(journal_numbers(&dir.path().join("b")).unwrap().is_empty(), "replayed blocks are in the next saved bitmap");
        drop(back);
        let again = Overlay::open(&dir.path().join("b"), "m", size).unwrap();
        assert_eq!(read(&again, &base, 65_536, 8192), vec![9u8; 8192]);

        // A block whose bytes never reached the file reads as before the write.
        crash_copy(&dir.path().join("a"), &dir.path().join("c"));
        File::options().write(true).open(dir.path().join("c/data")).unwrap().write_all_at(&[1u8; 4096], 65_536).unwrap();
        let torn = Overlay::open(&dir.path().join("c"), "m", size).unwrap();
        assert_eq!(read(&torn, &base, 65_536, 4096), vec![0u8; 4096], "its record does not match: the base shows");
        assert_eq!(read(&torn, &base, 65_536 + 4096, 4096), vec![9u8; 4096], "the other block of the write does");
    }
}
