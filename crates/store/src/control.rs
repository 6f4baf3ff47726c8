//! The [`Control`] seam: a store's small documents — the lifecycle of its
//! generations, import leases, alarms, a key service's wrapped salt — each
//! read whole and replaced whole by compare-and-swap.

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use crate::local_catalog::write_durably;
use crate::{Bytes, Error, Result};

/// What a document was when it was read, to compare-and-swap against
/// (an ETag, or a hash of the content).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version(pub String);

/// Small documents of a store, under keys like `lifecycle.json` or
/// `leases/3/host-pid-n.json` (relative, `/`-separated, no `..`).
///
/// Contract, checked by `conformance::run_control`:
/// - [`Control::write`] with `expected` `None` creates the document only if
///   it is absent, and with `Some(v)` replaces it only if it is still at
///   `v`; it returns whether it wrote; of racing writers with the same
///   expectation exactly one wins;
/// - a reader sees a whole document, never part of one;
/// - [`Control::list`] returns the keys under a directory, sorted;
/// - [`Control::remove`] of an absent key is not an error.
pub trait Control: Send + Sync {
    /// The document at `key` and its version, or `None`.
    fn read(&self, key: &str) -> Result<Option<(Bytes, Version)>>;
    /// Writes `key` if it is still at `expected` (`None`: only if absent).
    fn write(&self, key: &str, bytes: &[u8], expected: Option<&Version>) -> Result<bool>;
    /// Removes `key`.
    fn remove(&self, key: &str) -> Result<()>;
    /// The keys under `dir` (relative to the control root), sorted.
    fn list(&self, dir: &str) -> Result<Vec<String>>;
}

/// Checks a control key: relative, `/`-separated parts of
/// `A-Za-z0-9._-` that do not start with a dot.
pub(crate) fn check_key(key: &str) -> Result<()> {
    let ok =
        !key.is_empty() && key.split('/').all(|p| !p.is_empty() && !p.starts_with('.') && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
    if ok {
        Ok(())
    } else {
        Err(Error::Corrupt { path: key.into(), reason: "not a control document key".into() })
    }
}

/// Control documents as files under a directory; a lock file serialises
/// compare-and-swap across processes.
pub struct LocalControl {
    root: PathBuf,
}

impl LocalControl {
    /// The documents under `root` (written on first write).
    pub fn open(root: &Path) -> LocalControl {
        LocalControl { root: root.to_owned() }
    }

    fn lock(&self) -> Result<File> {
        fs::create_dir_all(&self.root).map_err(|e| Error::io("create directory", &self.root, e))?;
        let path = self.root.join(".control.lock");
        let f = OpenOptions::new().write(true).create(true).truncate(false).open(&path).map_err(|e| Error::io("lock", &path, e))?;
        // SAFETY: flock takes a valid open descriptor owned by `f`.
        if unsafe { libc::flock(std::os::unix::io::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) } != 0 {
            return Err(Error::io("lock", &path, std::io::Error::last_os_error()));
        }
        Ok(f)
    }
}

fn version_of(bytes: &[u8]) -> Version {
    Version(tessera_chunk::ChunkId::of(bytes).to_hex())
}

impl Control for LocalControl {
    fn read(&self, key: &str) -> Result<Option<(Bytes, Version)>> {
        check_key(key)?;
        let path = self.root.join(key);
        match fs::read(&path) {
            Ok(b) => {
                let v = version_of(&b);
                Ok(Some((Bytes::from(b), v)))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read", &path, e)),
        }
    }

    fn write(&self, key: &str, bytes: &[u8], expected: Option<&Version>) -> Result<bool> {
        check_key(key)?;
        let _lock = self.lock()?;
        let current = self.read(key)?.map(|(_, v)| v);
        if current.as_ref() != expected {
            return Ok(false);
        }
        write_durably(&self.root.join(key), bytes)?;
        Ok(true)
    }

    fn remove(&self, key: &str) -> Result<()> {
        check_key(key)?;
        let path = self.root.join(key);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &path, e)),
        }
    }

    fn list(&self, dir: &str) -> Result<Vec<String>> {
        check_key(dir)?;
        let mut out = Vec::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            let path = self.root.join(&d);
            let entries = match fs::read_dir(&path) {
                Ok(e) => e,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("list", &path, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| Error::io("list", &path, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let key = format!("{d}/{name}");
                if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(key);
                } else {
                    out.push(key[dir.len() + 1..].to_owned());
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        crate::conformance::run_control(std::sync::Arc::new(LocalControl::open(dir.path())));
        crate::conformance::run_control_races(std::sync::Arc::new(LocalControl::open(dir.path())));
    }

    #[test]
    fn keys_are_checked() {
        for bad in ["", "../x", "a/../b", "/abs", "a//b", ".hidden", "a b"] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
        assert!(check_key("leases/3/host-1-2.json").is_ok());
    }
}
