//! `TESSERA_HOME`: the embedded default store on one machine.

use std::path::{Path, PathBuf};

use tessera_chunk::{LocalKeyring, Manifest};

use crate::{Catalog, ImageRef, LocalDirStore, Result};

/// The layout of `TESSERA_HOME`:
///
/// ```text
/// chunks/ab/abcd…      sealed chunks (LocalDirStore)
/// manifests/ID         sealed manifests
/// images/NAME.json     names → manifest id and tenant
/// keyring.json         salt and tenant master keys (mode 0600)
/// tmp/                 spooled downloads; safe to empty when idle
/// ```
pub struct Home {
    root: PathBuf,
    /// The chunk store.
    pub chunks: LocalDirStore,
    /// Manifests and names.
    pub catalog: Catalog,
}

impl Home {
    /// Opens (creating) a home directory.
    pub fn open(root: &Path) -> Result<Home> {
        Ok(Home { root: root.to_owned(), chunks: LocalDirStore::open(&root.join("chunks"))?, catalog: Catalog::open(root)? })
    }

    /// The home directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where spooled downloads go.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Opens (creating) the keyring.
    pub fn keyring(&self) -> Result<LocalKeyring> {
        Ok(LocalKeyring::open_or_create(&self.root.join("keyring.json"))?)
    }

    /// Looks up `name` and opens its manifest.
    pub fn manifest(&self, name: &str) -> Result<(ImageRef, Manifest)> {
        let r = self.catalog.get(name)?;
        let sealed = self.catalog.get_manifest(&r.manifest)?;
        let m = sealed.open(&self.keyring()?)?;
        Ok((r, m))
    }
}
