//! The import pipeline, end to end:
//!
//! ```text
//! tessera_oci::resolve      fetch + verify manifest and config (and registry blobs)
//!   → Flattener::apply_layer  stream each layer into the ext4 image, checking
//!                             the blob digest and diff id as the stream ends
//!   → seal_while              seal each finished chunk on all cores, stage it
//!   → PutBatch::commit        every digest checked: chunks visible and durable
//!   → Catalog                 sealed manifest and refs, then the name (atomic, durable)
//! ```
//!
//! An import writes into the store's active generation under a lease
//! ([`tessera_store::lifecycle::Lease`]), with that generation's salt for
//! its dedup scope; an import that outlives its lease names nothing.
//!
//! Nothing becomes visible until the end: chunks are staged and committed
//! only once every layer has streamed to its end with matching digests, and
//! an image appears under its name only once its manifest and every chunk it
//! names are durable. A failure leaves nothing behind in the local store.
#![deny(missing_docs)]

mod ahead;
mod seal_pool;

pub use tessera_flatten::PlacedFile;

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tessera_chunk::{ChunkRef, DedupScope, Geometry, ImageConfig, LayerRegion, LayerSource, Manifest, Source, CHUNK_SIZE, MANIFEST_FORMAT};
use tessera_flatten::{ChunkSink, FlatImage, Flattener, Options as FlattenOptions};
use tessera_oci::{Progress, PullOptions, Reference, ResolvedImage};
use tessera_store::lifecycle::Lease;
use tessera_store::{check_name, Home, ImageRef, Release};

pub use seal_pool::{seal_while, PoolSink, Sealed};

const _: () = assert!(CHUNK_SIZE == tessera_flatten::CHUNK_BYTES, "flatten and seal agree on the chunk size");

/// Errors of an import, each naming the image, layer or chunk at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Fetching or verifying the source image failed.
    #[error("{reference}: {source}")]
    Ingest {
        /// The image.
        reference: String,
        /// Why.
        source: tessera_oci::Error,
    },
    /// Flattening a layer failed.
    #[error("{reference}: {source}")]
    Flatten {
        /// The image.
        reference: String,
        /// Why.
        source: tessera_flatten::Error,
    },
    /// Storing failed.
    #[error("{reference}: {source}")]
    Store {
        /// The image.
        reference: String,
        /// Why.
        source: tessera_store::Error,
    },
    /// The keyring failed.
    #[error(transparent)]
    Keys(#[from] tessera_chunk::Error),
}

/// What to import and how.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// Image name; defaults to the reference's repository and tag.
    pub name: Option<String>,
    /// Tenant whose key seals the manifest.
    pub tenant: String,
    /// Registry options.
    pub pull: PullOptions,
    /// Free space to leave in the filesystem.
    pub headroom_bytes: u64,
    /// Sealing threads (0: one per core).
    pub threads: usize,
    /// Which images may share this one's chunks (default: the keyring's).
    pub dedup_scope: Option<DedupScope>,
    /// How long the import may take before it gives up naming its image
    /// (the collector waits for it that long at most).
    pub lease: std::time::Duration,
    /// Files to place together, in this order, at the end of their layers'
    /// data, beside the layers' metadata (a
    /// start-up profile's files: `tessera optimize`, `--optimize-with`).
    pub first: Vec<Vec<u8>>,
    /// Report where each file's data went ([`ImportReport::files`]).
    pub record_files: bool,
    /// Refuse the source unless its manifest has this digest (a tag that
    /// moved since it was last read).
    pub expect_digest: Option<String>,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            name: None,
            tenant: "default".into(),
            pull: PullOptions::default(),
            headroom_bytes: 1 << 30,
            threads: 0,
            dedup_scope: None,
            lease: tessera_store::lifecycle::DEFAULT_LEASE,
            first: Vec::new(),
            record_files: false,
            expect_digest: None,
        }
    }
}

/// The result of an import (the `--json` output of `tessera import`).
#[derive(Clone, Debug, Serialize)]
pub struct ImportReport {
    /// Image name.
    pub name: String,
    /// Id of the sealed manifest.
    pub manifest: String,
    /// Bytes of the disk.
    pub disk_bytes: u64,
    /// Chunks in the disk (holes included).
    pub chunks: u64,
    /// All-zero chunks (stored nowhere).
    pub holes: u64,
    /// Chunks this import added to the store.
    pub new_chunks: u64,
    /// Bytes of the chunks this import added.
    pub new_bytes: u64,
    /// Of the new chunks, those of filesystem metadata (outside every
    /// layer's data region: superblock, group descriptors, bitmaps, inode
    /// tables, directories).
    pub new_metadata_chunks: u64,
    /// Their bytes.
    pub new_metadata_bytes: u64,
    /// The store generation it was imported into.
    pub generation: u64,
    /// Which images may share its chunks.
    pub dedup_scope: DedupScope,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// The reference imported.
    pub source: String,
    /// Manifest digest of the source.
    pub source_digest: String,
    /// Layers applied.
    pub layers: usize,
    /// Bytes of file data in the layers.
    pub file_bytes: u64,
    /// What was dropped on the way.
    pub warnings: Vec<String>,
    /// Where each file's data went, with [`ImportOptions::record_files`].
    #[serde(skip)]
    pub files: Vec<PlacedFile>,
    /// The manifest written.
    #[serde(skip)]
    pub manifest_doc: Manifest,
}

/// Imports `source` into `home`.
pub fn import(home: &Home, source: &str, options: &ImportOptions, progress: &dyn Progress) -> Result<ImportReport, Error> {
    let started = Instant::now();
    let reference = parse(source)?;
    let shown = reference.to_string();
    let store_err = |e| Error::Store { reference: shown.clone(), source: e };
    let name = options.name.clone().unwrap_or_else(|| reference.default_name());
    check_name(&name).map_err(store_err)?;
    home.remove_stale_temporaries().map_err(store_err)?;
    if let Some(dir) = home.store().local_dir() {
        tessera_store::LocalDirStore::open(&dir.join("chunks")).remove_legacy_temporaries().map_err(store_err)?;
    }
    let _spools = home.clean_spools_on_interrupt();
    let mut keyring = home.keyring_for_import().map_err(store_err)?;
    keyring.ensure_tenant(&options.tenant)?;
    let lease = Lease::take(home.store(), options.lease).map_err(store_err)?;
    let generation = lease.generation;
    let scope = options.dedup_scope.unwrap_or_else(|| keyring.dedup_scope());
    let salt = keyring.base_salt()?.derive(generation, scope, &options.tenant);

    let image = resolve(home, &reference, &options.pull, progress)?;
    if let Some(expected) = options.expect_digest.as_ref().filter(|d| **d != image.manifest_digest.to_string()) {
        let source =
            tessera_oci::Error::DigestMismatch { what: "the image's manifest".into(), expected: expected.clone(), actual: image.manifest_digest.to_string() };
        return Err(Error::Ingest { reference: shown, source });
    }

    // Same layers in, same bytes out: the filesystem's UUID and hash seed
    // come from the layers' diff ids.
    let mut seed_ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for l in &image.layers {
        seed_ctx.update(l.diff_id.to_string().as_bytes());
    }
    let mut seed = [0u8; 32];
    seed.copy_from_slice(seed_ctx.finish().as_ref());

    let threads = if options.threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) } else { options.threads };
    let chunk_store = home.store().chunks(generation);
    let batch = chunk_store.batch();
    // Only paths the manifest can record exactly (UTF-8) go first.
    let first: Vec<Vec<u8>> = options.first.iter().filter(|p| std::str::from_utf8(p).is_ok()).cloned().collect();
    let flatten_options = FlattenOptions { headroom_bytes: options.headroom_bytes, seed, first: first.clone(), record_files: options.record_files };
    let (flat, sealed) = seal_while(&salt, batch.as_ref(), threads, |sink| flatten(&image, flatten_options, sink, &shown, progress));
    // A store failure explains a flatten failure, so report it first.
    let sealed = sealed.map_err(store_err)?;
    let (flat, file_bytes) = flat?;
    let committed = batch.commit().map_err(store_err)?;

    let n_chunks = flat.disk_bytes / CHUNK_SIZE as u64;
    let mut chunks: Vec<Option<ChunkRef>> = vec![None; n_chunks as usize];
    for (index, r) in sealed.refs {
        chunks[index as usize] = Some(r);
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        source: Source {
            reference: shown.clone(),
            manifest_digest: image.manifest_digest.to_string(),
            config_digest: image.config_digest.to_string(),
            platform: image.platform.clone(),
            layers: image
                .layers
                .iter()
                .map(|l| LayerSource { digest: l.digest.to_string(), diff_id: l.diff_id.to_string(), media_type: l.media_type.clone(), size: l.size })
                .collect(),
        },
        config: ImageConfig {
            entrypoint: image.config.entrypoint.clone(),
            cmd: image.config.cmd.clone(),
            env: image.config.env.clone(),
            working_dir: image.config.working_dir.clone(),
            user: image.config.user.clone(),
            labels: image.config.labels.clone(),
            exposed_ports: image.config.exposed_ports.clone(),
            stop_signal: image.config.stop_signal.clone(),
        },
        geometry: Geometry {
            disk_bytes: flat.disk_bytes,
            chunk_size: CHUNK_SIZE as u64,
            block_size: tessera_flatten::BLOCK_SIZE,
            layers: flat.layer_regions.iter().map(|&(first_chunk, chunks)| LayerRegion { first_chunk, chunks }).collect(),
            metadata_chunk: flat.metadata_chunk,
            headroom_bytes: flat.headroom_bytes,
            first_files: first.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect(),
            inodes_used: flat.inodes_used,
            inodes_total: flat.inodes_total,
        },
        salt_id: salt.id().to_owned(),
        salt_epoch: generation,
        dedup_scope: scope,
        imported_at: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        chunks,
    };
    manifest.validate()?;
    let sealed_manifest = manifest.seal(&options.tenant, &name, keyring.as_ref())?;
    let mut seen = std::collections::HashSet::new();
    let refs: Vec<_> = manifest.chunks.iter().flatten().map(|c| c.id).filter(|id| seen.insert(*id)).collect();
    let id = home.catalog.put_manifest(generation, &sealed_manifest, &refs).map_err(store_err)?;
    lease.check().map_err(store_err)?;
    let mine = ImageRef { manifest: id.to_hex(), tenant: options.tenant.clone(), generation };
    let previous = home.catalog.set(&name, &mine).map_err(store_err)?;
    if let Err(e) = lease.confirm() {
        // Named after the lease ran out: the collector may have moved on
        // without this image, so the name goes back to what it was.
        let undone = match &previous {
            Some(p) => home.catalog.replace(&name, &mine, p),
            None if home.catalog.get(&name).ok().as_ref() == Some(&mine) => home.catalog.remove(&name).map(|_| true),
            None => Ok(false),
        };
        if let Err(u) = undone {
            tracing::error!("{name}: cannot take back a name set after the import's lease ran out: {u}");
        }
        return Err(store_err(e));
    }
    drop(lease);
    // The image is imported: what follows is tidying, and a failure there
    // is a warning, never a failed import.
    let mut warnings = flat.warnings;
    tracing::debug!("{name}: set to {}, replacing {previous:?}", id.to_hex());
    if let Some(prev) = previous.filter(|p| (p.generation, &p.manifest) != (generation, &id.to_hex())) {
        let released = home.catalog.release_manifest(prev.generation, &prev.manifest);
        tracing::debug!("{name}: releasing {}: {released:?}", prev.manifest);
        match released {
            Ok(Release::Removed | Release::InUse) => {}
            Ok(Release::Unsure(bad)) => warnings.push(format!(
                "the manifest {name} pointed at before ({}) was kept: the name files of {} cannot be read, and might use it",
                prev.manifest,
                bad.join(", ")
            )),
            Err(e) => warnings.push(format!("the manifest {name} pointed at before ({}) was kept: {e}", prev.manifest)),
        }
    }
    let holes = manifest.chunks.iter().filter(|c| c.is_none()).count() as u64;
    // A new chunk is metadata if it sits outside every layer's data region.
    let in_data = |index: usize| flat.layer_regions.iter().any(|&(first, n)| (first..first + n).contains(&(index as u64)));
    let mut metadata_ids = std::collections::HashSet::new();
    let mut data_ids = std::collections::HashSet::new();
    for (index, c) in manifest.chunks.iter().enumerate() {
        if let Some(c) = c {
            if in_data(index) { &mut data_ids } else { &mut metadata_ids }.insert(c.id);
        }
    }
    let new_metadata: Vec<u64> = committed.new.iter().filter(|(id, _)| metadata_ids.contains(id) && !data_ids.contains(id)).map(|&(_, len)| len).collect();
    Ok(ImportReport {
        name,
        manifest: id.to_hex(),
        disk_bytes: flat.disk_bytes,
        chunks: n_chunks,
        holes,
        new_chunks: committed.chunks(),
        new_bytes: committed.bytes(),
        new_metadata_chunks: new_metadata.len() as u64,
        new_metadata_bytes: new_metadata.iter().sum(),
        generation,
        dedup_scope: scope,
        seconds: started.elapsed().as_secs_f64(),
        source: shown,
        source_digest: image.manifest_digest.to_string(),
        layers: image.layers.len(),
        file_bytes,
        warnings,
        files: flat.files,
        manifest_doc: manifest,
    })
}

/// Flattens `image`'s layers into `sink`; returns the disk and the bytes of
/// file data. `shown` names the image in errors.
fn flatten(image: &ResolvedImage, options: FlattenOptions, sink: &mut dyn ChunkSink, shown: &str, progress: &dyn Progress) -> Result<(FlatImage, u64), Error> {
    let counters: Vec<ahead::Counter> = image.layers.iter().map(|_| ahead::Counter::default()).collect();
    let planning = !options.first.is_empty();
    std::thread::scope(|scope| {
        let mut flattener = Flattener::new(options, sink);
        let mut file_bytes = 0;
        let mut tars = ahead::Layers::new(scope, &image.layers, &counters, progress);
        for (i, layer) in image.layers.iter().enumerate() {
            progress.step(&format!("layer {}/{}", i + 1, image.layers.len()), layer.size);
            let ingest_err = |e| Error::Ingest { reference: shown.to_owned(), source: e };
            // A damaged blob often shows first as bad compression or a bad
            // tar: name the digest mismatch when that is the cause.
            let failed = |e| layer.check().err().map(ingest_err).unwrap_or_else(|| flatten_err(e, shown));
            if planning {
                // A first read finds the listed files, their sizes, and the size of the rest.
                let tar = layer.open(&tessera_oci::NoProgress).map_err(ingest_err)?;
                flattener.plan_layer(&layer.label, tar).map_err(failed)?;
            }
            let tar = tars.next_layer().expect("one reader per layer").map_err(ingest_err)?;
            file_bytes += flattener.apply_layer(&layer.label, tar).map_err(failed)?.file_bytes;
        }
        let flat = flattener.finish().map_err(|e| flatten_err(e, shown))?;
        Ok((flat, file_bytes))
    })
}

/// Where each regular file of `source`'s layers lands when flattened (as
/// `tessera import` would, with `headroom_bytes` and `first` placed
/// first), without storing anything: maps a start-up profile's blocks to files.
pub fn place_files(
    home: &Home,
    source: &str,
    pull: &PullOptions,
    headroom_bytes: u64,
    first: Vec<Vec<u8>>,
    progress: &dyn Progress,
) -> Result<(ResolvedImage, FlatImage), Error> {
    let reference = parse(source)?;
    let image = resolve(home, &reference, pull, progress)?;
    struct Discard;
    impl ChunkSink for Discard {
        fn put_chunk(&mut self, _: u64, _: Vec<u8>) -> Result<(), tessera_flatten::SinkError> {
            Ok(())
        }
    }
    let options = FlattenOptions { record_files: true, first, headroom_bytes, ..FlattenOptions::default() };
    let (flat, _) = flatten(&image, options, &mut Discard, &reference.to_string(), progress)?;
    Ok((image, flat))
}

fn parse(source: &str) -> Result<Reference, Error> {
    Reference::parse(source).map_err(|e| Error::Ingest { reference: source.to_owned(), source: e })
}

/// Finds the image and checks its manifest, config and layer blobs.
fn resolve(home: &Home, reference: &Reference, pull: &PullOptions, progress: &dyn Progress) -> Result<ResolvedImage, Error> {
    tessera_oci::resolve(reference, pull, &home.tmp_dir(), progress).map_err(|e| Error::Ingest { reference: reference.to_string(), source: e })
}

fn flatten_err(e: tessera_flatten::Error, reference: &str) -> Error {
    Error::Flatten { reference: reference.to_owned(), source: e }
}
