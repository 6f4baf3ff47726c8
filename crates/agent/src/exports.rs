//! The images of a `TESSERA_HOME` as NBD exports: `NAME` read-only, and
//! `NAME@LABEL` a copy-on-write view with an overlay of its own.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};

use tessera_cache::Loader;
use tessera_chunk::CHUNK_SIZE;
use tessera_store::{check_name, Home};

use crate::device::{Device, ExportError, Exports};
use crate::overlay::{Overlay, BLOCK};
use crate::vdisk::{ReadCounts, VirtualDisk};

/// Exports backed by the catalog, looked up afresh at each handshake.
pub struct CatalogExports {
    home: Arc<Home>,
    loader: Arc<Loader>,
    overlays: PathBuf,
    /// Open disks by image name (replaced when the image is re-imported).
    disks: Mutex<HashMap<String, Arc<VirtualDisk>>>,
    /// Open overlays by export name, shared by every connection to it.
    open_overlays: Arc<OverlayTable>,
    /// The most overlays open at once.
    max_overlays: usize,
    /// Prefetch a disk's start-up profile when it is first opened.
    prefetch: bool,
    /// The function every image is read for (else each image is its own).
    function: Option<Arc<str>>,
    /// Exports whose reads are counted apart (a VM's disk), shared by every
    /// device opened on them.
    tracked: Mutex<HashMap<String, Arc<ReadCounts>>>,
}

impl CatalogExports {
    /// Exports of `home`, reading through `loader`, with overlays under
    /// `overlays`, at most `max_overlays` of them open at once.
    pub fn new(home: Arc<Home>, loader: Arc<Loader>, overlays: PathBuf, max_overlays: usize) -> CatalogExports {
        CatalogExports {
            home,
            loader,
            overlays,
            disks: Mutex::new(HashMap::new()),
            open_overlays: Arc::new(OverlayTable::default()),
            max_overlays,
            prefetch: false,
            function: None,
            tracked: Mutex::new(HashMap::new()),
        }
    }

    /// Counts the reads of every device opened on `export` from now on.
    pub fn track(&self, export: &str) -> Arc<ReadCounts> {
        Arc::clone(self.tracked.lock().expect("no panics while holding the lock").entry(export.to_owned()).or_default())
    }

    /// Stops counting `export` apart; returns its counts.
    pub fn untrack(&self, export: &str) -> Option<Arc<ReadCounts>> {
        self.tracked.lock().expect("no panics while holding the lock").remove(export)
    }

    /// The directory of the overlay of `export` (`NAME@LABEL`).
    pub fn overlay_dir(&self, export: &str) -> PathBuf {
        self.overlays.join(export)
    }

    /// Whether a device has the overlay of `export` open.
    pub fn is_overlay_open(&self, export: &str) -> bool {
        self.open_overlays.has(export)
    }

    /// The store's home.
    pub fn home(&self) -> &Home {
        &self.home
    }

    /// Whether each image's start-up profile is prefetched when its disk is
    /// first opened.
    pub fn prefetch_profiles(&mut self, on: bool) {
        self.prefetch = on;
    }

    /// Reads every image for `function` (its tree, when the agent is in
    /// function trees), not for a function named after the image.
    pub fn read_for(&mut self, function: Option<&str>) {
        self.function = function.map(Into::into);
    }

    /// Overlays open now.
    pub fn open_overlay_count(&self) -> usize {
        self.open_overlays.open().len()
    }

    /// The current disk of image `name`.
    pub fn disk(&self, name: &str) -> Result<Arc<VirtualDisk>, ExportError> {
        let r = match self.home.catalog.get(name) {
            Ok(r) => r,
            // The store cannot be asked (a remote store that does not
            // answer): a disk already open stays servable, its chunks
            // cached or fetched when the store is back.
            Err(e @ tessera_store::Error::Remote { .. }) => match self.disks.lock().expect("no panics while holding the lock").get(name) {
                Some(d) => {
                    tracing::warn!("{name}: serving the version already open: {e}");
                    return Ok(Arc::clone(d));
                }
                None => return Err(e.into()),
            },
            Err(e) => return Err(e.into()),
        };
        let mut disks = self.disks.lock().expect("no panics while holding the lock");
        if let Some(d) = disks.get(name).filter(|d| d.manifest_id() == r.manifest) {
            return Ok(Arc::clone(d));
        }
        let (r, manifest) = self.home.manifest(name)?;
        let disk = Arc::new(VirtualDisk::new(name, &r, manifest, Arc::clone(&self.loader)).read_for(self.function.clone()));
        disks.insert(name.to_owned(), Arc::clone(&disk));
        if self.prefetch {
            match crate::profile::load(&self.home, &r) {
                // Runs to its end in the background.
                Ok(Some(p)) => drop(crate::profile::Prefetcher::start(Arc::clone(&disk), p.chunks, crate::profile::PREFETCH_THREADS, None)),
                Ok(None) => {}
                Err(e) => tracing::warn!("{name}: cannot read its start-up profile: {e}"),
            }
        }
        Ok(disk)
    }

    /// Flushes every open overlay (on shutdown).
    pub fn flush_all(&self) {
        let open: Vec<(String, Arc<Overlay>)> = self.open_overlays.open();
        for (name, o) in open {
            if let Err(e) = o.flush() {
                tracing::error!("overlay {name}: {e}");
            }
        }
    }
}

impl Exports for CatalogExports {
    fn names(&self) -> Vec<String> {
        match self.home.catalog.list() {
            Ok(listing) => {
                for (name, e) in &listing.bad {
                    tracing::warn!("not exporting image {name}: {e}");
                }
                listing.images.into_iter().map(|(n, _)| n).collect()
            }
            Err(e) => {
                tracing::error!("cannot list images: {e}");
                Vec::new()
            }
        }
    }

    fn open(&self, export: &str) -> Result<Arc<dyn Device>, ExportError> {
        let (name, label) = match export.split_once('@') {
            Some((n, l)) => (n, Some(l)),
            None => (export, None),
        };
        let disk = self.disk(name)?;
        let counts = self.tracked.lock().expect("no panics while holding the lock").get(export).cloned().unwrap_or_default();
        let Some(label) = label else { return Ok(Arc::new(ImageDevice(disk, counts))) };
        check_name(label).map_err(|_| ExportError::BadLabel(label.to_owned()))?;
        let dir = self.overlays.join(format!("{name}@{label}"));
        let lease = OverlayTable::lease(&self.open_overlays, export, self.max_overlays, || Overlay::open(&dir, disk.manifest_id(), disk.size()))?;
        if lease.overlay().manifest_id() != disk.manifest_id() {
            return Err(ExportError::Overlay(io::Error::other(format!(
                "{export} is open over an earlier version of {name}; reconnect once its connections have ended"
            ))));
        }
        Ok(Arc::new(OverlayDevice { disk, lease, counts }))
    }
}

/// Holes of the image in `[offset, offset + len)` as runs.
fn image_allocation(disk: &VirtualDisk, offset: u64, len: u64, mut written: impl FnMut(u64, u64) -> bool) -> Vec<(u64, bool)> {
    let mut runs: Vec<(u64, bool)> = Vec::new();
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let index = pos / CHUNK_SIZE as u64;
        let next = ((index + 1) * CHUNK_SIZE as u64).min(end);
        // Within a chunk, overlay blocks may differ from the image.
        let mut at = pos;
        while at < next {
            let step = ((at / BLOCK + 1) * BLOCK).min(next);
            let hole = disk.is_hole(index) && !written(at, step - at);
            match runs.last_mut() {
                Some((l, h)) if *h == hole => *l += step - at,
                _ => runs.push((step - at, hole)),
            }
            at = step;
        }
        pos = next;
    }
    runs
}

/// `NAME`: the image, read-only.
struct ImageDevice(Arc<VirtualDisk>, Arc<ReadCounts>);

impl Device for ImageDevice {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn writable(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_counted(buf, offset, Some(&self.1)).map_err(io::Error::other)
    }
    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        self.0.read_cached(buf, offset, Some(&self.1)).then_some(Ok(()))
    }
    fn write(&self, _: u64, _: &[u8]) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn zero(&self, _: u64, _: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }
    fn allocation(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        image_allocation(&self.0, offset, len, |_, _| false)
    }
}

/// The overlays open now, by export name, with how many devices use each.
/// An overlay closes (files and bitmap freed) when its last device goes; an
/// open of the same export meanwhile waits for the close to finish rather
/// than race it for the overlay's lock.
#[derive(Default)]
struct OverlayTable {
    slots: Mutex<HashMap<String, Slot>>,
    closed: Condvar,
}

enum Slot {
    Open { overlay: Arc<Overlay>, users: usize },
    Closing,
}

/// One device's use of an overlay; the last one to go closes it.
struct Lease {
    table: Arc<OverlayTable>,
    export: String,
    overlay: Option<Arc<Overlay>>,
}

impl OverlayTable {
    /// A use of `export`'s overlay, opened with `open` if it is not open.
    fn lease(table: &Arc<OverlayTable>, export: &str, max: usize, open: impl FnOnce() -> io::Result<Overlay>) -> Result<Lease, ExportError> {
        let mut slots = table.slots.lock().expect("no panics while holding the lock");
        loop {
            match slots.get_mut(export) {
                Some(Slot::Closing) => slots = table.closed.wait(slots).expect("no panics while holding the lock"),
                Some(Slot::Open { overlay, users }) => {
                    *users += 1;
                    let overlay = Some(Arc::clone(overlay));
                    return Ok(Lease { table: Arc::clone(table), export: export.to_owned(), overlay });
                }
                None => break,
            }
        }
        if slots.len() >= max {
            return Err(ExportError::TooManyOverlays(max));
        }
        let overlay = Arc::new(open().map_err(ExportError::Overlay)?);
        slots.insert(export.to_owned(), Slot::Open { overlay: Arc::clone(&overlay), users: 1 });
        Ok(Lease { table: Arc::clone(table), export: export.to_owned(), overlay: Some(overlay) })
    }

    /// Whether overlay `name` is open or closing.
    fn has(&self, name: &str) -> bool {
        self.slots.lock().expect("no panics while holding the lock").contains_key(name)
    }

    /// The overlays open now.
    fn open(&self) -> Vec<(String, Arc<Overlay>)> {
        let slots = self.slots.lock().expect("no panics while holding the lock");
        slots
            .iter()
            .filter_map(|(name, s)| match s {
                Slot::Open { overlay, .. } => Some((name.clone(), Arc::clone(overlay))),
                Slot::Closing => None,
            })
            .collect()
    }
}

impl Lease {
    fn overlay(&self) -> &Overlay {
        self.overlay.as_ref().expect("held until drop")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let last = {
            let mut slots = self.table.slots.lock().expect("no panics while holding the lock");
            match slots.get_mut(&self.export) {
                Some(Slot::Open { users, .. }) if *users > 1 => {
                    *users -= 1;
                    false
                }
                _ => {
                    slots.insert(self.export.clone(), Slot::Closing);
                    true
                }
            }
        };
        // The table's reference went with its slot: this one is the last,
        // and dropping it flushes and closes the overlay.
        drop(self.overlay.take());
        if last {
            self.table.slots.lock().expect("no panics while holding the lock").remove(&self.export);
            self.table.closed.notify_all();
        }
    }
}

/// `NAME@LABEL`: the image with this label's writes on top.
struct OverlayDevice {
    disk: Arc<VirtualDisk>,
    lease: Lease,
    counts: Arc<ReadCounts>,
}

impl Device for OverlayDevice {
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn writable(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.lease.overlay().read_counted(&self.disk, buf, offset, Some(&self.counts))
    }
    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        let untouched = !self.lease.overlay().any_written(offset, buf.len() as u64);
        (untouched && self.disk.read_cached(buf, offset, Some(&self.counts))).then_some(Ok(()))
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.lease.overlay().write_at(&self.disk, data, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.lease.overlay().flush()
    }
    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        self.lease.overlay().zero(&self.disk, offset, len)
    }
    fn allocation(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        image_allocation(&self.disk, offset, len, |o, l| self.lease.overlay().any_written(o, l))
    }
}
