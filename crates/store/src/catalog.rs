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
/// manifest.
pub struct Catalog {
    manifests: PathBuf,
    images: PathBuf,
}

impl Catalog {
    /// Opens (creating) the catalog under `home`.
    pub fn open(home: &Path) -> Result<Catalog> {
        let manifests = home.join("manifests");
        let images = home.join("images");
        for d in [&manifests, &images] {
            fs::create_dir_all(d).map_err(|e| Error::io("create directory", d, e))?;
        }
        Ok(Catalog { manifests, images })
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

    /// Removes `name`; its manifest is removed unless another name uses it.
    pub fn remove(&self, name: &str) -> Result<ImageRef> {
        let r = self.get(name)?;
        let path = self.ref_path(name);
        fs::remove_file(&path).map_err(|e| Error::io("remove image", &path, e))?;
        sync_dir(&self.images)?;
        if !self.list()?.iter().any(|(_, other)| other.manifest == r.manifest) {
            self.remove_manifest(&r.manifest)?;
        }
        Ok(r)
    }

    /// Every name, sorted.
    pub fn list(&self) -> Result<Vec<(String, ImageRef)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.images).map_err(|e| Error::io("list images", &self.images, e))? {
            let entry = entry.map_err(|e| Error::io("list images", &self.images, e))?;
            let file = entry.file_name().to_string_lossy().into_owned();
            if let Some(name) = file.strip_suffix(".json") {
                if check_name(name).is_ok() {
                    out.push((name.to_owned(), self.get(name)?));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
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

/// Writes `bytes` to a temporary name, syncs, renames into place, syncs the directory.
pub(crate) fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().expect("catalog paths have a parent");
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
}
