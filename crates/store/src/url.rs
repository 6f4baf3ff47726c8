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
    /// Opens the store at `url`; writes nothing (and sends nothing yet).
    pub fn open(url: &StoreUrl) -> Result<Store> {
        match url {
            StoreUrl::Local(dir) => Ok(Store::local(dir)),
            StoreUrl::S3(u) => {
                let s3 = crate::s3::S3::open(u)?;
                Ok(Store {
                    chunks: Arc::new(crate::s3::S3ChunkStore(Arc::clone(&s3))),
                    catalog: Arc::new(crate::s3::S3Catalog(s3)),
                    local: None,
                    url: url.clone(),
                })
            }
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
        assert!(matches!(StoreUrl::parse("s3://bucket/p?region=eu-west-1").unwrap(), StoreUrl::S3(_)));
        for bad in ["", "file:", "gopher://x/y", "s3://B"] {
            assert!(StoreUrl::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(StoreUrl::parse("file:/srv/t").unwrap().to_string(), "file:/srv/t");
    }
}
