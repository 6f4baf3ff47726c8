//! Sealed manifests and the image names that point at them.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tessera_chunk::{ChunkId, SealedManifest};

use crate::{Error, Result};

/// What an image name points at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    /// Id of the sealed manifest (SHA-256 of its stored bytes).
    pub manifest: String,
    /// The tenant whose key opens it.
    pub tenant: String,
}

/// Manifests (`HOME/manifests/ID`) and names (`HOME/images/NAME.json`).
///
/// A name is written only after its manifest is durable, and both with a
/// temporary file, `fsync` and rename, so a name never points at a partial
/// manifest. A name file that cannot be read is reported beside the others
/// ([`Listing::bad`]), never in place of them.
pub struct Catalog {
    manifests: PathBuf,
    images: PathBuf,
}

/// What [`Catalog::release_manifest`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Release {
    /// No name used the manifest: it is gone.
    Removed,
    /// Another name uses it: it stays.
    InUse,
    /// These names could not be read and might use it: it stays.
    Unsure(Vec<String>),
}

/// Every name of the catalog: those that read, and those that did not.
#[derive(Debug, Default)]
pub struct Listing {
    /// Names and what they point at, sorted by name.
    pub images: Vec<(String, ImageRef)>,
    /// Names whose file could not be read or parsed, with why.
    pub bad: Vec<(String, Error)>,
}

impl Listing {
    /// Whether some name (among those that read) points at manifest `id`;
    /// also true when a name could not be read, since it might.
    pub fn may_use(&self, id: &str) -> bool {
        !self.bad.is_empty() || self.images.iter().any(|(_, r)| r.manifest == id)
    }
}

impl Catalog {
    /// Opens the catalog under `home`; writes nothing (the directories are
    /// made by the first write).
    pub fn open(home: &Path) -> Result<Catalog> {
        Ok(Catalog { manifests: home.join("manifests"), images: home.join("images") })
    }

    /// How many manifests are stored (names or not).
    pub fn manifest_count(&self) -> Result<usize> {
        match fs::read_dir(&self.manifests) {
            Ok(entries) => Ok(entries
                .flatten()
                .filter(|e| e.file_name().to_str().is_some_and(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit())))
                .count()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
            Err(e) => Err(Error::io("list manifests", &self.manifests, e)),
        }
    }

    /// Stores a sealed manifest durably; returns its id.
    pub fn put_manifest(&self, sealed: &SealedManifest) -> Result<ChunkId> {
        let bytes = sealed.to_bytes();
        let id = ChunkId::of(&bytes);
        write_durably(&self.manifests.join(id.to_hex()), &bytes)?;
        Ok(id)
    }

    /// Reads a sealed manifest by id, checking the bytes against the id.
    pub fn get_manifest(&self, id: &str) -> Result<SealedManifest> {
        let path = self.manifests.join(id);
        if !(id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())) {
            return Err(Error::Corrupt { path, reason: "not a manifest id".into() });
        }
        let bytes = fs::read(&path).map_err(|e| Error::io("read manifest", &path, e))?;
        if ChunkId::of(&bytes).to_hex() != id {
            return Err(Error::Corrupt { path, reason: "manifest bytes do not match its id".into() });
        }
        Ok(SealedManifest::from_bytes(&bytes)?)
    }

    /// Deletes a manifest (not the chunks it names) and its profile.
    pub fn remove_manifest(&self, id: &str) -> Result<()> {
        for path in [self.manifests.join(id), self.manifests.join(format!("{id}.profile"))] {
            if let Err(e) = fs::remove_file(&path) {
                if e.kind() != ErrorKind::NotFound {
                    return Err(Error::io("remove manifest", &path, e));
                }
            }
        }
        Ok(())
    }

    /// Stores the sealed start-up profile of manifest `id`, replacing any.
    pub fn put_profile(&self, id: &str, sealed: &SealedManifest) -> Result<()> {
        write_durably(&self.manifests.join(format!("{id}.profile")), &sealed.to_bytes())
    }

    /// The sealed start-up profile of manifest `id`, if one was recorded.
    pub fn get_profile(&self, id: &str) -> Result<Option<SealedManifest>> {
        let path = self.manifests.join(format!("{id}.profile"));
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(SealedManifest::from_bytes(&bytes)?)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read profile", &path, e)),
        }
    }

    /// Points `name` at a manifest (replacing what it pointed at).
    pub fn set(&self, name: &str, r: &ImageRef) -> Result<()> {
        check_name(name)?;
        write_durably(&self.ref_path(name), &serde_json::to_vec_pretty(r).expect("ref serialises"))
    }

    /// What `name` points at.
    pub fn get(&self, name: &str) -> Result<ImageRef> {
        check_name(name)?;
        let path = self.ref_path(name);
        let bytes = fs::read(&path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => Error::NoSuchImage(name.to_owned()),
            _ => Error::io("read image", &path, e),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt { path, reason: e.to_string() })
    }

    /// Removes `name` (even when its file is unreadable) and returns what it
    /// pointed at, if that could be read. Its manifest is removed by
    /// [`Catalog::release_manifest`], which callers run after this has
    /// succeeded: once the name is gone the removal has happened.
    pub fn remove(&self, name: &str) -> Result<Option<ImageRef>> {
        let r = match self.get(name) {
            Ok(r) => Some(r),
            Err(Error::Corrupt { .. } | Error::Io { .. }) => None,
            Err(e) => return Err(e),
        };
        let path = self.ref_path(name);
        fs::remove_file(&path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => Error::NoSuchImage(name.to_owned()),
            _ => Error::io("remove image", &path, e),
        })?;
        sync_dir(&self.images)?;
        Ok(r)
    }

    /// Removes manifest `id` unless a name still uses it, or a name that
    /// cannot be read might.
    pub fn release_manifest(&self, id: &str) -> Result<Release> {
        let listing = self.list()?;
        if listing.images.iter().any(|(_, r)| r.manifest == id) {
            return Ok(Release::InUse);
        }
        if !listing.bad.is_empty() {
            return Ok(Release::Unsure(listing.bad.into_iter().map(|(n, _)| n).collect()));
        }
        self.remove_manifest(id)?;
        Ok(Release::Removed)
    }

    /// Every name, sorted, and the names whose files are bad.
    pub fn list(&self) -> Result<Listing> {
        let mut out = Listing::default();
        let entries = match fs::read_dir(&self.images) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io("list images", &self.images, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list images", &self.images, e))?;
            let file = entry.file_name().to_string_lossy().into_owned();
            if let Some(name) = file.strip_suffix(".json") {
                if check_name(name).is_ok() {
                    match self.get(name) {
                        Ok(r) => out.images.push((name.to_owned(), r)),
                        // Removed since the directory was read.
                        Err(Error::NoSuchImage(_)) => {}
                        Err(e) => out.bad.push((name.to_owned(), e)),
                    }
                }
            }
        }
        out.images.sort_by(|a, b| a.0.cmp(&b.0));
        out.bad.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn ref_path(&self, name: &str) -> PathBuf {
        self.images.join(format!("{name}.json"))
    }
}

/// Image names: 1-128 of `A-Za-z0-9._-`, starting with a letter or digit.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(name.to_owned()))
    }
}

/// Writes `bytes` to a temporary name, syncs, renames into place, syncs the
/// directory (made if missing).
pub(crate) fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().expect("catalog paths have a parent");
    fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
    let tmp = dir.join(format!(".tmp-{}-{}", std::process::id(), path.file_name().expect("a file name").to_string_lossy()));
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io("write", path, e));
    }
    fs::rename(&tmp, path).map_err(|e| Error::io("rename into place", path, e))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("sync directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("app-v1").is_ok());
        assert!(check_name("py_3.11").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "a@b", "a:b", &"x".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn a_corrupt_name_is_reported_beside_the_others_and_can_be_removed() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(dir.path()).unwrap();
        assert!(catalog.list().unwrap().images.is_empty(), "an empty catalog lists nothing");
        assert!(!dir.path().join("images").exists(), "and writes nothing");
        let r = ImageRef { manifest: "ab".repeat(32), tenant: "default".into() };
        catalog.set("good", &r).unwrap();
        catalog.set("bad", &r).unwrap();
        fs::write(dir.path().join("images/bad.json"), b"{ not json").unwrap();
        let listing = catalog.list().unwrap();
        assert_eq!(listing.images, vec![("good".to_owned(), r.clone())]);
        assert_eq!(listing.bad.len(), 1);
        assert!(listing.may_use("cd".repeat(32).as_str()), "an unreadable name might use any manifest");
        assert_eq!(catalog.remove("bad").unwrap(), None);
        assert!(catalog.list().unwrap().bad.is_empty());
        assert!(!catalog.list().unwrap().may_use(&"cd".repeat(32)));
        assert_eq!(catalog.release_manifest(&"ab".repeat(32)).unwrap(), Release::InUse);
        assert!(matches!(catalog.remove("bad"), Err(Error::NoSuchImage(_))));
    }
}
