//! The baseline that import throughput is measured against: sealing the
//! same bytes alone (hash + encrypt + hash, all cores), with no ingest,
//! no flattening and no store.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;
use tessera_chunk::{is_zero, open_in_place, seal_in_place, Salt, CHUNK_SIZE};

/// What [`seal_file`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct SealBench {
    /// Non-hole chunks sealed.
    pub chunks: u64,
    /// Their plaintext bytes.
    pub bytes: u64,
    /// Wall-clock seconds for reading (from the page cache) and sealing.
    pub seconds: f64,
    /// Plaintext MiB/s of opening (id check + decrypt) on all threads: the
    /// limit of serving cold chunks on this CPU.
    pub open_mib_per_second: f64,
    /// Threads used.
    pub threads: usize,
}

/// Seals every non-zero chunk of `path` on `threads` threads and times it.
/// The file is read once beforehand so the timing covers sealing, not the disk.
pub fn run(path: &Path, threads: usize) -> std::io::Result<SealBench> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let n = len.div_ceil(CHUNK_SIZE as u64);
    let mut buf = vec![0u8; CHUNK_SIZE];
    for i in 0..n {
        file.read_at(&mut buf, i * CHUNK_SIZE as u64)?; // warm the page cache
    }
    let salt = Salt::from_bytes([0x5a; 32]);
    let next = AtomicU64::new(0);
    let sealed = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let mut buf = Vec::with_capacity(CHUNK_SIZE + 16);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return;
                    }
                    buf.clear();
                    buf.resize(CHUNK_SIZE, 0);
                    if file.read_at(&mut buf, i * CHUNK_SIZE as u64).is_err() || is_zero(&buf) {
                        continue;
                    }
                    std::hint::black_box(seal_in_place(&salt, &mut buf));
                    sealed.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    let chunks = sealed.into_inner();
    // Opening, timed the same way on a sample of chunks sealed afresh.
    let sample = chunks.clamp(1, 256);
    let mut plain = Vec::with_capacity(CHUNK_SIZE + 16);
    let mut opened = Vec::new();
    for i in 0..n {
        plain.clear();
        plain.resize(CHUNK_SIZE, 0);
        file.read_at(&mut plain, i * CHUNK_SIZE as u64)?;
        if is_zero(&plain) {
            continue;
        }
        let (id, key) = seal_in_place(&salt, &mut plain);
        opened.push((id, key, plain.clone()));
        if opened.len() as u64 >= sample {
            break;
        }
    }
    let next = AtomicU64::new(0);
    let open_started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let mut buf = Vec::with_capacity(CHUNK_SIZE + 16);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some((id, key, sealed)) = opened.get(i) else { return };
                    buf.clear();
                    buf.extend_from_slice(sealed);
                    open_in_place(id, key, &mut buf).expect("a chunk just sealed opens");
                }
            });
        }
    });
    let open_seconds = open_started.elapsed().as_secs_f64();
    let open_mib_per_second = (opened.len() * CHUNK_SIZE) as f64 / (1 << 20) as f64 / open_seconds;
    Ok(SealBench { chunks, bytes: chunks * CHUNK_SIZE as u64, seconds, open_mib_per_second, threads: threads.max(1) })
}
