//! Choosing a store by URL.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::{Catalog, ChunkStore, Error, LocalCatalog, LocalDirStore, Result};

/// Where a store lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// `file:DIR` (or a bare path): chunks in `DIR/chunks`, the catalog in
    /// `DIR/manifests` and `DIR/images`.
    Local(PathBuf),
}

impl StoreUrl {
    /// Parses `file:DIR`, `file:///DIR` or a bare path.
    pub fn parse(url: &str) -> Result<StoreUrl> {
        let bad = |why: &str| Error::BadStoreUrl { url: url.to_owned(), reason: why.to_owned() };
        if let Some(rest) = url.strip_prefix("file:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(bad("file: needs a directory"));
            }
            return Ok(StoreUrl::Local(PathBuf::from(path)));
        }
        if let Some((scheme, _)) = url.split_once("://") {
            return Err(bad(&format!("{scheme}:// stores are not supported (use file:DIR)")));
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
        }
    }
}

/// A chunk store and a catalog that belong together.
#[derive(Clone)]
pub struct Store {
    /// Sealed chunks.
    pub chunks: Arc<dyn ChunkStore>,
    /// Manifests, profiles and names.
    pub catalog: Arc<dyn Catalog>,
    /// The local chunk directory, when the store is one (for upkeep only
    /// a local directory needs).
    pub local: Option<Arc<LocalDirStore>>,
    url: StoreUrl,
}

impl Store {
    /// Opens the store at `url`; writes nothing.
    pub fn open(url: &StoreUrl) -> Result<Store> {
        match url {
            StoreUrl::Local(dir) => Ok(Store::local(dir)),
        }
    }

    /// The local store in `dir`.
    pub fn local(dir: &Path) -> Store {
        let chunks = Arc::new(LocalDirStore::open(&dir.join("chunks")));
        Store { chunks: chunks.clone(), catalog: Arc::new(LocalCatalog::open(dir)), local: Some(chunks), url: StoreUrl::Local(dir.to_owned()) }
    }

    /// Where the store is.
    pub fn url(&self) -> &StoreUrl {
        &self.url
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
        for bad in ["", "file:", "gopher://x/y"] {
            assert!(StoreUrl::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(StoreUrl::parse("file:/srv/t").unwrap().to_string(), "file:/srv/t");
    }
}
