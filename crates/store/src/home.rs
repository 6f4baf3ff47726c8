//! `TESSERA_HOME`: the embedded default store on one machine.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tessera_chunk::{LocalKeyring, Manifest};

use crate::{Catalog, ChunkStore, Error, ImageRef, Result, Store};

/// `TESSERA_HOME`: a host's local state, and the store it uses (by
/// default the embedded one, in the same directory):
///
/// ```text
/// chunks/ab/abcd…      sealed chunks (LocalDirStore)
/// chunks/.staging/     chunks being written (PID-…; removed if PID is gone)
/// manifests/ID         sealed manifests (ID.profile: start-up profiles)
/// images/NAME.json     names → manifest id and tenant
/// keyring.json         salt and tenant master keys (mode 0600)
/// tmp/                 spooled downloads (pull-PID-…)
/// ```
#[derive(Clone)]
pub struct Home {
    root: PathBuf,
    keyring: PathBuf,
    store: Store,
    /// The chunk store.
    pub chunks: Arc<dyn ChunkStore>,
    /// Manifests and names.
    pub catalog: Arc<dyn Catalog>,
}

impl Home {
    /// Opens a home directory with its embedded store; it need not exist
    /// yet: nothing is written until something is stored. Removes what
    /// processes that died mid-import left (staged chunks, download spools).
    pub fn open(root: &Path) -> Result<Home> {
        Home::with_store(root, Store::local(root))
    }

    /// Opens a home directory that uses `store`.
    pub fn with_store(root: &Path, store: Store) -> Result<Home> {
        let home = Home { root: root.to_owned(), keyring: root.join("keyring.json"), chunks: store.chunks.clone(), catalog: store.catalog.clone(), store };
        // Best effort: a store this process may not write is left as it is.
        let _ = home.remove_stale_temporaries();
        Ok(home)
    }

    /// The home directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Where spooled downloads go.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// The keyring kept at `path` instead of `keyring.json` in the home.
    pub fn with_keyring(mut self, path: PathBuf) -> Home {
        self.keyring = path;
        self
    }

    /// Where the keyring lives.
    pub fn keyring_path(&self) -> PathBuf {
        self.keyring.clone()
    }

    /// Opens the keyring; never creates one. Missing, it is an error that
    /// says where it was expected and whether images need it.
    pub fn keyring(&self) -> Result<LocalKeyring> {
        match LocalKeyring::open(&self.keyring_path()) {
            Err(tessera_chunk::Error::KeyringMissing { .. }) => Err(Error::KeyringMissing { path: self.keyring_path(), needed: self.catalog.has_manifests()? }),
            other => Ok(other?),
        }
    }

    /// The keyring an import seals with: the store's, or a new one when the
    /// store holds no manifest at all. A store that holds manifests but no
    /// keyring is an error: a new keyring would not open them.
    pub fn keyring_for_import(&self) -> Result<LocalKeyring> {
        match self.keyring() {
            Err(Error::KeyringMissing { needed: false, .. }) => Ok(LocalKeyring::create(&self.keyring_path()).or_else(|e| match e {
                // Another import made it meanwhile.
                tessera_chunk::Error::Keyring { .. } if self.keyring_path().exists() => LocalKeyring::open(&self.keyring_path()),
                e => Err(e),
            })?),
            other => other,
        }
    }

    /// Makes a new keyring where none is (`tessera keyring init`).
    pub fn init_keyring(&self) -> Result<LocalKeyring> {
        Ok(LocalKeyring::create(&self.keyring_path())?)
    }

    /// Removes what imports killed mid-way left behind: chunk temporaries
    /// and download spools of processes that no longer run.
    pub fn remove_stale_temporaries(&self) -> Result<usize> {
        let mut n = self.chunks.tidy()?;
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

    /// Registers the removal of this process's download spools should it be
    /// interrupted ([`crate::interrupt`]).
    pub fn clean_spools_on_interrupt(&self) -> crate::interrupt::Registration {
        let tmp = self.tmp_dir();
        crate::interrupt::on_interrupt(move || {
            let prefix = format!("pull-{}-", std::process::id());
            if let Ok(entries) = std::fs::read_dir(&tmp) {
                for entry in entries.flatten() {
                    if entry.file_name().to_string_lossy().starts_with(&prefix) {
                        let _ = std::fs::remove_dir_all(entry.path());
                    }
                }
            }
        })
    }

    /// Looks up `name` and opens its manifest.
    pub fn manifest(&self, name: &str) -> Result<(ImageRef, Manifest)> {
        let r = self.catalog.get(name)?;
        let sealed = self.catalog.get_manifest(&r.manifest)?;
        let m = sealed.open(&self.keyring()?)?;
        Ok((r, m))
    }
}
