//! `TESSERA_HOME`: the embedded default store on one machine.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tessera_chunk::{DedupScope, Keyring, LocalKeyring, Manifest};

use crate::kms::{KmsKeyring, KmsUrl};
use crate::{Catalog, ChunkStore, Error, ImageRef, Result, Store};

/// Where a host's keys are.
#[derive(Clone, Debug)]
pub enum KeyringAt {
    /// A local keyring file.
    File(PathBuf),
    /// A key service (the salt kept wrapped in the store).
    Kms(KmsUrl),
}

impl KeyringAt {
    /// `kms://…` or a file path.
    pub fn parse(s: &str) -> Result<KeyringAt> {
        match KmsUrl::parse(s) {
            Some(u) => Ok(KeyringAt::Kms(u?)),
            None => Ok(KeyringAt::File(PathBuf::from(s))),
        }
    }
}

/// `TESSERA_HOME`: a host's local state, and the store it uses (by
/// default the embedded one, in the same directory):
///
/// ```text
/// chunks/ab/abcd…      sealed chunks (LocalDirStore)
/// chunks/.staging/     chunks being written (PID-…; removed if PID is gone)
/// manifests/ID         sealed manifests (ID.profile: start-up profiles)
/// images/NAME.json     names → manifest id and tenant
/// gen/G/chunks/, gen/G/manifests/   generation G (see `lifecycle`)
/// lifecycle.json       the store's generations
/// leases/, alarms/     imports' leases, reads of expired generations
/// keyring.json         salt and tenant master keys (mode 0600)
/// tmp/                 spooled downloads (pull-PID-…)
/// ```
#[derive(Clone)]
pub struct Home {
    root: PathBuf,
    keyring: KeyringAt,
    store: Store,
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
        let home = Home { root: root.to_owned(), keyring: KeyringAt::File(root.join("keyring.json")), catalog: store.catalog.clone(), store };
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

    /// The keys at `at` instead of `keyring.json` in the home.
    pub fn with_keyring(mut self, at: KeyringAt) -> Home {
        self.keyring = at;
        self
    }

    /// Where the keys are.
    pub fn keyring_at(&self) -> &KeyringAt {
        &self.keyring
    }

    /// The chunk store holding image `r`.
    pub fn chunks_of(&self, r: &ImageRef) -> Arc<dyn ChunkStore> {
        self.store.chunks_of(r)
    }

    /// Opens the keys; never creates any. A missing keyring file is an
    /// error that says where it was expected and whether images need it.
    pub fn keyring(&self) -> Result<Box<dyn Keyring>> {
        match &self.keyring {
            KeyringAt::File(path) => match LocalKeyring::open(path) {
                Err(tessera_chunk::Error::KeyringMissing { .. }) => Err(Error::KeyringMissing { path: path.clone(), needed: self.catalog.has_manifests()? }),
                other => Ok(Box::new(other?)),
            },
            KeyringAt::Kms(u) => Ok(Box::new(KmsKeyring::open(u, self.store.control.clone()))),
        }
    }

    /// The keys an import seals with: the store's, or (for a keyring file)
    /// a new one when the store holds no manifest at all. A store that
    /// holds manifests but no keyring is an error: a new keyring would not
    /// open them.
    pub fn keyring_for_import(&self) -> Result<Box<dyn Keyring>> {
        match (self.keyring(), &self.keyring) {
            (Err(Error::KeyringMissing { needed: false, .. }), KeyringAt::File(path)) => Ok(Box::new(LocalKeyring::create(path).or_else(|e| match e {
                // Another import made it meanwhile.
                tessera_chunk::Error::Keyring { .. } if path.exists() => LocalKeyring::open(path),
                e => Err(e),
            })?)),
            (other, _) => other,
        }
    }

    /// Makes new keys where none are (`tessera keyring init`); says what
    /// it made.
    pub fn init_keyring(&self, scope: DedupScope) -> Result<String> {
        match &self.keyring {
            KeyringAt::File(path) => {
                let k = LocalKeyring::create_scoped(path, scope)?;
                Ok(format!("created the keyring {} (salt {}, dedup scope {scope})", path.display(), k.salt().id()))
            }
            KeyringAt::Kms(u) => {
                let k = KmsKeyring::init(u, self.store.control.clone(), scope)?;
                Ok(format!("created the store's salt with {} (dedup scope {scope})", k.describe()))
            }
        }
    }

    /// Removes what imports killed mid-way left behind: chunk temporaries
    /// and download spools of processes that no longer run.
    pub fn remove_stale_temporaries(&self) -> Result<usize> {
        let mut n = self.store.tidy()?;
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
        let sealed = self.catalog.get_manifest(r.generation, &r.manifest)?;
        let m = sealed.open(self.keyring()?.as_ref())?;
        Ok((r, m))
    }
}
