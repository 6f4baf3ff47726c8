//! Start-up profiles: the chunks a run of an image reads before its program
//! is ready, in first-touch order. A first run records one
//! ([`VirtualDisk::start_recording`]); it is sealed beside the manifest
//! ([`save`]); later runs, or an agent opening the image, fetch those chunks
//! ahead of the reads that will want them ([`Prefetcher`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tessera_chunk::{Profile, MANIFEST_FORMAT};
use tessera_store::{Home, ImageRef};

use crate::vdisk::{ReadCounts, Recorded, VirtualDisk};

/// Threads a prefetch uses: enough to keep a remote origin busy while the
/// guest boots, few enough to leave room for the guest's own reads.
pub const PREFETCH_THREADS: usize = 8;

/// Fetches a profile's chunks into the caches in the background.
pub struct Prefetcher {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Prefetcher {
    /// Starts fetching `chunks` of `disk`, in order, on `threads` threads,
    /// counting them in `counts` (the device they are fetched for).
    pub fn start(disk: Arc<VirtualDisk>, chunks: Vec<u64>, threads: usize, counts: Option<Arc<ReadCounts>>) -> Prefetcher {
        let stop = Arc::new(AtomicBool::new(false));
        let queue = Arc::new(Mutex::new(chunks.into_iter()));
        let threads = (0..threads.max(1))
            .map(|_| {
                let (queue, disk, stop, counts) = (queue.clone(), disk.clone(), stop.clone(), counts.clone());
                std::thread::spawn(move || loop {
                    let next = queue.lock().expect("no panics while holding the lock").next();
                    let Some(index) = next else { return };
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    // A chunk that fails here fails again, and is reported,
                    // when the guest reads it.
                    let _ = disk.warm(index, counts.as_deref());
                })
            })
            .collect();
        Prefetcher { stop, threads }
    }

    /// Stops taking chunks and waits for the fetches in flight.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// The start-up profile recorded for `image` (its manifest), if any.
pub fn load(home: &Home, image: &ImageRef) -> Result<Option<Profile>, tessera_store::Error> {
    let Some(sealed) = home.catalog.get_profile(image.generation, &image.manifest)? else { return Ok(None) };
    Ok(Some(sealed.open_profile(home.keyring()?.as_ref())?))
}

/// Seals what a run read (up to `seconds` into it) as the start-up profile
/// of image `name` (`image`), replacing any; nothing is stored for an empty list.
pub fn save(home: &Home, name: &str, image: &ImageRef, recorded: Recorded, seconds: f64) -> Result<(), tessera_store::Error> {
    if recorded.chunks.is_empty() {
        return Ok(());
    }
    let profile = Profile {
        format: MANIFEST_FORMAT,
        manifest: image.manifest.clone(),
        chunks: recorded.chunks,
        blocks: recorded.blocks,
        recorded_at: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        seconds,
    };
    let ctx = tessera_chunk::KeyContext { tenant: &image.tenant, image: name };
    home.catalog.put_profile(image.generation, &image.manifest, &profile.seal(ctx, home.keyring()?.as_ref())?)
}
