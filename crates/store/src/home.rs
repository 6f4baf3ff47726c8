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

    /// Removes what imports killed mid-way left behind: chunk temporaries
    /// and download spools of processes that no longer run.
    pub fn remove_stale_temporaries(&self) -> Result<usize> {
        let mut n = self.chunks.remove_stale_temporaries()?;
        if let Ok(entries) = std::fs::read_dir(self.tmp_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                // pull-PID-DIGEST
                let pid = name.strip_prefix("pull-").and_then(|r| r.split('-').next()).and_then(|p| p.parse::<u32>().ok());
                if pid.is_some_and(|p| !crate::pid_alive(p)) && std::fs::remove_dir_all(entry.path()).is_ok() {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Looks up `name` and opens its manifest.
    pub fn manifest(&self, name: &str) -> Result<(ImageRef, Manifest)> {
        let r = self.catalog.get(name)?;
        let sealed = self.catalog.get_manifest(&r.manifest)?;
        let m = sealed.open(&self.keyring()?)?;
        Ok((r, m))
    }
}
