//! The embedded default [`Catalog`]: files under `TESSERA_HOME`.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use tessera_chunk::{ChunkId, SealedManifest};

use crate::catalog::is_manifest_id;
use crate::{check_name, Catalog, Error, ImageRef, Result};

/// Manifests (`HOME/manifests/ID` in generation 0, `HOME/gen/G/manifests/ID`
/// in generation G; refs and profiles beside them as `ID.refs` and
/// `ID.profile`) and names (`HOME/images/NAME.json`).
///
/// Every file is written to a temporary, flushed and renamed into place,
/// and its directory synced, so a name never points at a partial manifest.
/// Opening writes nothing: the directories are made by the first write.
pub struct LocalCatalog {
    root: PathBuf,
    images: PathBuf,
}

impl LocalCatalog {
    /// The catalog under `home`.
    pub fn open(home: &Path) -> LocalCatalog {
        LocalCatalog { root: home.to_owned(), images: home.join("images") }
    }

    fn ref_path(&self, name: &str) -> PathBuf {
        self.images.join(format!("{name}.json"))
    }

    fn manifests(&self, generation: u64) -> PathBuf {
        crate::url::local_generation_dir(&self.root, generation).join("manifests")
    }
}

impl Catalog for LocalCatalog {
    fn put_manifest(&self, generation: u64, sealed: &SealedManifest, refs: &[ChunkId]) -> Result<ChunkId> {
        let bytes = sealed.to_bytes();
        let id = ChunkId::of(&bytes);
        let dir = self.manifests(generation);
        // Refs first: a manifest is never without them.
        write_durably(&dir.join(format!("{}.refs", id.to_hex())), &crate::catalog::encode_refs(refs))?;
        write_durably(&dir.join(id.to_hex()), &bytes)?;
        Ok(id)
    }

    fn get_manifest(&self, generation: u64, id: &str) -> Result<SealedManifest> {
        let path = self.manifests(generation).join(id);
        if !is_manifest_id(id) {
            return Err(Error::Corrupt { path, reason: "not a manifest id".into() });
        }
        let bytes = fs::read(&path).map_err(|e| Error::io("read manifest", &path, e))?;
        if ChunkId::of(&bytes).to_hex() != id {
            return Err(Error::Corrupt { path, reason: "manifest bytes do not match its id".into() });
        }
        Ok(SealedManifest::from_bytes(&bytes)?)
    }

    fn get_refs(&self, generation: u64, id: &str) -> Result<Option<Vec<ChunkId>>> {
        let path = self.manifests(generation).join(format!("{id}.refs"));
        if !is_manifest_id(id) {
            return Err(Error::Corrupt { path, reason: "not a manifest id".into() });
        }
        match fs::read(&path) {
            Ok(bytes) => crate::catalog::decode_refs(&bytes).map(Some).ok_or_else(|| Error::Corrupt { path, reason: "damaged refs".into() }),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read refs", &path, e)),
        }
    }

    fn remove_manifest(&self, generation: u64, id: &str) -> Result<()> {
        let dir = self.manifests(generation);
        for path in [dir.join(id), dir.join(format!("{id}.profile")), dir.join(format!("{id}.refs"))] {
            if let Err(e) = fs::remove_file(&path) {
                if e.kind() != ErrorKind::NotFound {
                    return Err(Error::io("remove manifest", &path, e));
                }
            }
        }
        Ok(())
    }

    fn has_manifests(&self) -> Result<bool> {
        let mut dirs = vec![self.manifests(0)];
        if let Ok(entries) = fs::read_dir(self.root.join("gen")) {
            dirs.extend(entries.flatten().map(|e| e.path().join("manifests")));
        }
        for dir in dirs {
            match fs::read_dir(&dir) {
                Ok(mut entries) => {
                    if entries.any(|e| e.is_ok_and(|e| e.file_name().to_str().is_some_and(is_manifest_id))) {
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("list manifests", &dir, e)),
            }
        }
        Ok(false)
    }

    fn put_profile(&self, generation: u64, id: &str, sealed: &SealedManifest) -> Result<()> {
        write_durably(&self.manifests(generation).join(format!("{id}.profile")), &sealed.to_bytes())
    }

    fn get_profile(&self, generation: u64, id: &str) -> Result<Option<SealedManifest>> {
        let path = self.manifests(generation).join(format!("{id}.profile"));
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(SealedManifest::from_bytes(&bytes)?)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read profile", &path, e)),
        }
    }

    fn set(&self, name: &str, r: &ImageRef) -> Result<Option<ImageRef>> {
        check_name(name)?;
        // One setter at a time, across processes, so each learns what it replaced.
        let _lock = NamesLock::take(&self.images)?;
        let previous = self.get(name).ok();
        write_durably(&self.ref_path(name), &serde_json::to_vec_pretty(r).expect("ref serialises"))?;
        Ok(previous)
    }

    fn replace(&self, name: &str, expected: &ImageRef, new: &ImageRef) -> Result<bool> {
        check_name(name)?;
        let _lock = NamesLock::take(&self.images)?;
        match self.get(name) {
            Ok(current) if current == *expected => {}
            Ok(_) | Err(Error::NoSuchImage(_)) => return Ok(false),
            Err(e) => return Err(e),
        }
        write_durably(&self.ref_path(name), &serde_json::to_vec_pretty(new).expect("ref serialises"))?;
        Ok(true)
    }

    fn get(&self, name: &str) -> Result<ImageRef> {
        check_name(name)?;
        let path = self.ref_path(name);
        let bytes = fs::read(&path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => Error::NoSuchImage(name.to_owned()),
            _ => Error::io("read image", &path, e),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt { path, reason: e.to_string() })
    }

    fn remove(&self, name: &str) -> Result<Option<ImageRef>> {
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

    fn scan(&self, each: &mut dyn FnMut(String, Result<ImageRef>)) -> Result<()> {
        let entries = match fs::read_dir(&self.images) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("list images", &self.images, e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list images", &self.images, e))?;
            let file = entry.file_name().to_string_lossy().into_owned();
            if let Some(name) = file.strip_suffix(".json") {
                if check_name(name).is_ok() {
                    names.push(name.to_owned());
                }
            }
        }
        names.sort();
        for name in names {
            match self.get(&name) {
                // Removed since the directory was read.
                Err(Error::NoSuchImage(_)) => {}
                r => each(name, r),
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.images.parent().map(|p| p.display().to_string()).unwrap_or_default()
    }
}

/// An exclusive lock on the names (`images/.lock`), held while one is set.
struct NamesLock {
    _file: File,
}

impl NamesLock {
    fn take(images: &Path) -> Result<NamesLock> {
        fs::create_dir_all(images).map_err(|e| Error::io("create directory", images, e))?;
        let path = images.join(".lock");
        let f = OpenOptions::new().write(true).create(true).truncate(false).open(&path).map_err(|e| Error::io("lock", &path, e))?;
        // SAFETY: flock takes a valid open descriptor owned by `f`.
        if unsafe { libc::flock(std::os::unix::io::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) } != 0 {
            return Err(Error::io("lock", &path, std::io::Error::last_os_error()));
        }
        Ok(NamesLock { _file: f })
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
    use crate::Release;

    #[test]
    fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        crate::conformance::run_catalog(&LocalCatalog::open(dir.path()));
        crate::conformance::run_catalog_races(std::sync::Arc::new(LocalCatalog::open(dir.path())));
    }

    #[test]
    fn a_corrupt_name_is_reported_beside_the_others_and_can_be_removed() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = LocalCatalog::open(dir.path());
        assert!(catalog.list().unwrap().images.is_empty(), "an empty catalog lists nothing");
        assert!(!dir.path().join("images").exists(), "and writes nothing");
        let r = ImageRef::new("ab".repeat(32), "default");
        catalog.set("good", &r).unwrap();
        catalog.set("bad", &r).unwrap();
        fs::write(dir.path().join("images/bad.json"), b"{ not json").unwrap();
        let listing = catalog.list().unwrap();
        assert_eq!(listing.images, vec![("good".to_owned(), r.clone())]);
        assert_eq!(listing.bad.len(), 1);
        assert!(listing.may_use("cd".repeat(32).as_str()), "an unreadable name might use any manifest");
        assert_eq!(catalog.release_manifest(0, &"cd".repeat(32)).unwrap(), Release::Unsure(vec!["bad".into()]));
        assert_eq!(catalog.remove("bad").unwrap(), None);
        assert!(catalog.list().unwrap().bad.is_empty());
        assert!(!catalog.list().unwrap().may_use(&"cd".repeat(32)));
        assert_eq!(catalog.release_manifest(0, &"ab".repeat(32)).unwrap(), Release::InUse);
        assert!(matches!(catalog.remove("bad"), Err(Error::NoSuchImage(_))));
    }
}
