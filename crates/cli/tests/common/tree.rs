//! A comparable snapshot of a directory tree: types, modes, owners, sizes,
//! content hashes, symlink targets, mtimes, xattrs and hard-link groups.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

#[derive(Debug, PartialEq, Eq, Clone)]
pub struct Entry {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, i64),
    pub content: Option<String>,
    pub link: Option<String>,
    pub rdev: u64,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub entries: BTreeMap<String, Entry>,
    pub hard_links: BTreeSet<BTreeSet<String>>,
}

/// Walks `root` (without following symlinks). `skip` names top-level entries to ignore.
pub fn snapshot(root: &Path, skip: &[&str]) -> Snapshot {
    let mut entries = BTreeMap::new();
    let mut by_inode: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    walk(root, root, skip, &mut entries, &mut by_inode);
    let hard_links = by_inode.into_values().filter(|s| s.len() > 1).collect();
    Snapshot { entries, hard_links }
}

fn walk(root: &Path, dir: &Path, skip: &[&str], out: &mut BTreeMap<String, Entry>, inodes: &mut BTreeMap<u64, BTreeSet<String>>) {
    let mut names: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    for path in names {
        let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        if dir == root && skip.contains(&rel.as_str()) {
            continue;
        }
        let md = std::fs::symlink_metadata(&path).unwrap();
        let ft = md.file_type();
        let content = ft.is_file().then(|| {
            let bytes = std::fs::read(&path).unwrap();
            format!("{:x}", md5ish(&bytes))
        });
        let link = ft.is_symlink().then(|| std::fs::read_link(&path).unwrap().to_string_lossy().into_owned());
        if !ft.is_dir() && md.nlink() > 1 {
            inodes.entry(md.ino()).or_default().insert(rel.clone());
        }
        out.insert(
            rel,
            Entry {
                mode: md.mode(),
                uid: md.uid(),
                gid: md.gid(),
                size: if ft.is_dir() { 0 } else { md.size() },
                mtime: if ft.is_symlink() { (0, 0) } else { (md.mtime(), md.mtime_nsec()) },
                content,
                link,
                rdev: md.rdev(),
                xattrs: xattrs(&path),
            },
        );
        if ft.is_dir() {
            walk(root, &path, skip, out, inodes);
        }
    }
}

/// A 128-bit FNV-style hash: enough to compare contents in tests.
fn md5ish(bytes: &[u8]) -> u128 {
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for &b in bytes {
        h ^= b as u128;
        h = h.wrapping_mul(0x0000000001000000000000000000013B);
    }
    h
}

fn xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    // SAFETY: c is a valid C string and names a writable buffer of the given length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    let mut out = BTreeMap::new();
    if n <= 0 {
        return out;
    }
    for name in names[..n as usize].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).unwrap();
        let mut value = vec![0u8; 65536];
        // SAFETY: valid C strings and a writable buffer of the given length.
        let len = unsafe { libc::lgetxattr(c.as_ptr(), cname.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        if len >= 0 {
            value.truncate(len as usize);
            out.insert(String::from_utf8_lossy(name).into_owned(), value);
        }
    }
    out
}
