//! The baseline that import throughput is measured against: sealing the
//! same bytes alone (hash + encrypt + hash, all cores), with no ingest,
//! no flattening and no store.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;
use tessera_chunk::{is_zero, seal_in_place, Salt, CHUNK_SIZE};

/// What [`seal_file`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct SealBench {
    /// Non-hole chunks sealed.
    pub chunks: u64,
    /// Their plaintext bytes.
    pub bytes: u64,
    /// Wall-clock seconds for reading (from the page cache) and sealing.
    pub seconds: f64,
    /// Threads used.
    pub threads: usize,
}

/// Seals every non-zero chunk of `path` on `threads` threads and times it.
/// The file is read once beforehand so the timing covers sealing, not the disk.
pub fn seal_file(path: &Path, threads: usize) -> std::io::Result<SealBench> {
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
    let chunks = sealed.into_inner();
    Ok(SealBench { chunks, bytes: chunks * CHUNK_SIZE as u64, seconds: started.elapsed().as_secs_f64(), threads: threads.max(1) })
}
