//! Choosing a store by URL.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tessera_chunk::ChunkId;

use crate::control::{Control, LocalControl};
use crate::{Catalog, ChunkStore, Error, ImageRef, LocalCatalog, LocalDirStore, Result};

/// Where a store lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// `file:DIR` (or a bare path): chunks in `DIR/chunks`, the catalog in
    /// `DIR/manifests` and `DIR/images`.
    Local(PathBuf),
    /// `s3://BUCKET[/PREFIX][?endpoint=URL&region=R&virtual_hosted=true]`.
    S3(crate::s3::S3Url),
}

impl StoreUrl {
    /// Parses `file:DIR`, `file:///DIR`, a bare path, or `s3://…`.
    pub fn parse(url: &str) -> Result<StoreUrl> {
        let bad = |why: &str| Error::BadStoreUrl { url: url.to_owned(), reason: why.to_owned() };
        if let Some(rest) = url.strip_prefix("file:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(bad("file: needs a directory"));
            }
            return Ok(StoreUrl::Local(PathBuf::from(path)));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            return Ok(StoreUrl::S3(crate::s3::S3Url::parse(url, rest)?));
        }
        if let Some((scheme, _)) = url.split_once("://") {
            return Err(bad(&format!("{scheme}:// stores are not supported (use file:DIR or s3://BUCKET)")));
        }
        if url.is_empty() {
            return Err(bad("empty"));
        }
        Ok(StoreUrl::Local(PathBuf::from(url)))
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::Local(p) => write!(f, "file:{}", p.display()),
            StoreUrl::S3(u) => u.fmt(f),
        }
    }
}

/// What deleting a generation removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deleted {
    /// Chunks.
    pub chunks: u64,
    /// Bytes this freed (locally, a chunk another generation links to
    /// frees nothing).
    pub bytes: u64,
    /// Other objects (manifests, refs, profiles).
    pub others: u64,
}

/// What a store does per generation, beyond the [`ChunkStore`] of each:
/// the operations of the collector ([`crate::lifecycle`]).
pub(crate) trait Backend: Send + Sync {
    /// Opens the chunk store of `generation`.
    fn open_chunks(&self, generation: u64) -> Arc<dyn ChunkStore>;
    /// Copies chunk `id` from one generation to another, on the server or
    /// the file system (no bytes pass through this process where it can
    /// help it); a chunk already there is fine.
    fn copy_chunk(&self, id: &ChunkId, from: u64, to: u64) -> Result<()>;
    /// [`Backend::copy_chunk`] of each of `ids` (a remote backend runs
    /// several at once).
    fn copy_chunks(&self, ids: &[ChunkId], from: u64, to: u64) -> Result<()> {
        ids.iter().try_for_each(|id| self.copy_chunk(id, from, to))
    }
    /// Deletes everything of `generation`: chunks, manifests, refs, profiles.
    fn delete_generation(&self, generation: u64) -> Result<Deleted>;
    /// The generations that hold anything.
    fn generations(&self) -> Result<Vec<u64>>;
    /// Appends the backend's own metrics.
    fn render(&self, _out: &mut String) {}
}

/// A store: a chunk store per generation, a catalog and control documents
/// that belong together. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    /// Manifests, profiles and names.
    pub catalog: Arc<dyn Catalog>,
    /// Lifecycle, leases, alarms.
    pub control: Arc<dyn Control>,
    backend: Arc<dyn Backend>,
    opened: Arc<Mutex<HashMap<u64, Arc<dyn ChunkStore>>>>,
    local: Option<PathBuf>,
    url: StoreUrl,
}

impl Store {
    /// Opens the store at `url`; writes nothing (and sends nothing yet).
    pub fn open(url: &StoreUrl) -> Result<Store> {
        match url {
            StoreUrl::Local(dir) => Ok(Store::local(dir)),
            StoreUrl::S3(u) => {
                let s3 = crate::s3::S3::open(u)?;
                Ok(Store::with(
                    Arc::new(crate::s3::S3Catalog(Arc::clone(&s3))),
                    Arc::new(crate::s3::S3Control(Arc::clone(&s3))),
                    Arc::new(crate::s3::S3Backend(s3)),
                    None,
                    url.clone(),
                ))
            }
        }
    }

    /// The local store in `dir`.
    pub fn local(dir: &Path) -> Store {
        Store::with(
            Arc::new(LocalCatalog::open(dir)),
            Arc::new(LocalControl::open(dir)),
            Arc::new(LocalBackend { root: dir.to_owned() }),
            Some(dir.to_owned()),
            StoreUrl::Local(dir.to_owned()),
        )
    }

    fn with(catalog: Arc<dyn Catalog>, control: Arc<dyn Control>, backend: Arc<dyn Backend>, local: Option<PathBuf>, url: StoreUrl) -> Store {
        Store { catalog, control, backend, opened: Arc::default(), local, url }
    }

    /// The chunk store of `generation` (0 for stores that never collected).
    pub fn chunks(&self, generation: u64) -> Arc<dyn ChunkStore> {
        let mut opened = self.opened.lock().expect("no panics while holding the lock");
        Arc::clone(opened.entry(generation).or_insert_with(|| self.backend.open_chunks(generation)))
    }

    /// The chunk store holding the image `r` names.
    pub fn chunks_of(&self, r: &ImageRef) -> Arc<dyn ChunkStore> {
        self.chunks(r.generation)
    }

    pub(crate) fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// The directory of a local store.
    pub fn local_dir(&self) -> Option<&Path> {
        self.local.as_deref()
    }

    /// Removes what writers that died left behind, in every generation (of
    /// a local store: a remote one has no temporaries).
    pub fn tidy(&self) -> Result<usize> {
        if self.local.is_none() {
            return Ok(0);
        }
        let mut n = 0;
        for g in self.backend.generations()? {
            n += self.chunks(g).tidy()?;
        }
        Ok(n)
    }

    /// Appends the store's own metrics (request counters) once.
    pub fn render(&self, out: &mut String) {
        self.backend.render(out);
    }

    /// Where the store is.
    pub fn url(&self) -> &StoreUrl {
        &self.url
    }
}

/// Generation `g` of a local store lives in `ROOT/gen/g` (`chunks/` and
/// `manifests/`); generation 0 in `ROOT` itself, where stores made before
/// generations keep it.
pub(crate) fn local_generation_dir(root: &Path, generation: u64) -> PathBuf {
    if generation == 0 {
        root.to_owned()
    } else {
        root.join("gen").join(generation.to_string())
    }
}

struct LocalBackend {
    root: PathBuf,
}

impl Backend for LocalBackend {
    fn open_chunks(&self, generation: u64) -> Arc<dyn ChunkStore> {
        Arc::new(LocalDirStore::open(&local_generation_dir(&self.root, generation).join("chunks")))
    }

    fn copy_chunk(&self, id: &ChunkId, from: u64, to: u64) -> Result<()> {
        crate::local::link_chunk(&local_generation_dir(&self.root, from).join("chunks"), &local_generation_dir(&self.root, to).join("chunks"), id)
    }

    fn delete_generation(&self, generation: u64) -> Result<Deleted> {
        let dir = local_generation_dir(&self.root, generation);
        let mut out = Deleted::default();
        let chunks = LocalDirStore::open(&dir.join("chunks"));
        for id in chunks.list()? {
            // A chunk still linked from another generation frees nothing.
            let freed = std::fs::metadata(chunks.path_of(&id)).map(|m| if std::os::unix::fs::MetadataExt::nlink(&m) == 1 { m.len() } else { 0 }).unwrap_or(0);
            if chunks.delete(&id)? {
                out.chunks += 1;
                out.bytes += freed;
            }
        }
        for sub in ["chunks", "manifests"] {
            let d = dir.join(sub);
            if sub == "manifests" {
                out.others += std::fs::read_dir(&d).map(|e| e.count() as u64).unwrap_or(0);
            }
            match std::fs::remove_dir_all(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("delete generation", &d, e)),
            }
        }
        if generation != 0 {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("delete generation", &dir, e)),
            }
        }
        Ok(out)
    }

    fn generations(&self) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        if self.root.join("chunks").exists() || self.root.join("manifests").exists() {
            out.push(0);
        }
        let gen = self.root.join("gen");
        match std::fs::read_dir(&gen) {
            Ok(entries) => {
                for e in entries.flatten() {
                    if let Some(g) = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()).filter(|&g| g > 0) {
                        out.push(g);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("list generations", &gen, e)),
        }
        out.sort_unstable();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(StoreUrl::parse("/srv/t").unwrap(), StoreUrl::Local("/srv/t".into()));
        assert_eq!(StoreUrl::parse("file:/srv/t").unwrap(), StoreUrl::Local("/srv/t".into()));
        assert_eq!(StoreUrl::parse("file:///srv/t").unwrap(), StoreUrl::Local("/srv/t".into()));
        assert_eq!(StoreUrl::parse("rel/dir").unwrap(), StoreUrl::Local("rel/dir".into()));
        assert!(matches!(StoreUrl::parse("s3://bucket/p?region=eu-west-1").unwrap(), StoreUrl::S3(_)));
        for bad in ["", "file:", "gopher://x/y", "s3://B"] {
            assert!(StoreUrl::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(StoreUrl::parse("file:/srv/t").unwrap().to_string(), "file:/srv/t");
    }
}
