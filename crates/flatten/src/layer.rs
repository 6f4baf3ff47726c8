//! Applies one layer tar to the tree: OCI whiteouts, opaque directories,
//! hard links, and hostile paths neutralised as umoci does (paths are cleaned
//! against the root, parents are resolved through symlinks without leaving
//! the tree).

use std::collections::BTreeMap;
use std::io::Read;

use tar::EntryType;

use crate::tree::{clean_path, Child, Kind, Meta, Node, ResolveError, ROOT};
use crate::{Error, Flattener, SinkFailed};

/// What one layer contained.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Tar entries read.
    pub entries: u64,
    /// Bytes of regular-file data written.
    pub file_bytes: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
}

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

pub(crate) fn apply(f: &mut Flattener<'_>, layer: &str, index: u32, tar: impl Read) -> Result<LayerStats, Error> {
    let tar_err = |source: std::io::Error| Error::Tar { layer: layer.to_owned(), source };
    let mut archive = tar::Archive::new(tar);
    let mut stats = LayerStats::default();
    for entry in archive.entries().map_err(tar_err)? {
        let mut entry = entry.map_err(tar_err)?;
        stats.entries += 1;
        let raw_path = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_path).into_owned();
        let entry_err = |reason: String| Error::Entry { layer: layer.to_owned(), path: shown.clone(), reason };
        let components = clean_path(&raw_path);
        let Some((name, parents)) = components.split_last() else {
            // The root itself: only a directory entry may change it.
            if entry.header().entry_type() == EntryType::Directory {
                let meta = read_meta(&mut entry).map_err(tar_err)?;
                f.tree.nodes[ROOT as usize].meta = meta;
            }
            continue;
        };

        // Whiteouts name what they delete; they are never materialised.
        if is_whiteout(name) {
            stats.whiteouts += 1;
            let dir = match f.tree.walk_dirs(parents, None) {
                Ok(d) => d,
                Err(ResolveError::Missing) => continue,
                Err(e) => return Err(entry_err(resolve_reason(e))),
            };
            if name.as_slice() == OPAQUE_MARKER {
                f.tree.make_opaque(dir, index);
            } else if let Some(children) = f.tree.children_mut(dir) {
                children.remove(&name[WHITEOUT_PREFIX.len()..]);
            }
            continue;
        }

        let parent = f.tree.walk_dirs(parents, Some(index)).map_err(|e| entry_err(resolve_reason(e)))?;
        let kind_of_entry = entry.header().entry_type();
        let meta = read_meta(&mut entry).map_err(tar_err)?;
        let existing = f.tree.children(parent).expect("walk_dirs returns a directory").get(name).copied();
        let node = match kind_of_entry {
            EntryType::Directory => {
                if let Some(c) = existing.filter(|c| f.tree.is_dir(c.node)) {
                    // An existing directory keeps its children.
                    f.tree.nodes[c.node as usize].meta = meta;
                    f.tree.children_mut(parent).expect("a directory").insert(name.clone(), Child { node: c.node, layer: index });
                    continue;
                }
                f.tree.add(Node { meta, kind: Kind::Dir(BTreeMap::new()) })
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let size = entry.size();
                let start_block = f.place_file(components.join(&b'/'), index, &mut entry, size).map_err(|e| sink_or_tar(e, layer, &shown))?;
                stats.file_bytes += size;
                f.tree.add(Node { meta, kind: Kind::File { start_block, size } })
            }
            EntryType::Symlink => {
                let target = entry.link_name_bytes().ok_or_else(|| entry_err("symlink without a target".into()))?;
                f.tree.add(Node { meta, kind: Kind::Symlink(target.into_owned()) })
            }
            EntryType::Link => {
                let target = entry.link_name_bytes().ok_or_else(|| entry_err("hard link without a target".into()))?;
                let target = clean_path(&target);
                let (tname, tparents) = target.split_last().ok_or_else(|| entry_err("hard link to the root directory".into()))?;
                let tdir = f
                    .tree
                    .walk_dirs(tparents, None)
                    .map_err(|e| entry_err(format!("hard link target {:?}: {}", String::from_utf8_lossy(&target.join(&b'/')), resolve_reason(e))))?;
                let linked = f
                    .tree
                    .children(tdir)
                    .and_then(|c| c.get(tname))
                    .map(|c| c.node)
                    .ok_or_else(|| entry_err(format!("hard link target {:?} does not exist", String::from_utf8_lossy(&target.join(&b'/')))))?;
                if f.tree.is_dir(linked) {
                    return Err(entry_err("hard link to a directory".into()));
                }
                linked
            }
            EntryType::Char | EntryType::Block => {
                let h = entry.header();
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                let kind = if kind_of_entry == EntryType::Char { Kind::CharDev { major, minor } } else { Kind::BlockDev { major, minor } };
                f.tree.add(Node { meta, kind })
            }
            EntryType::Fifo => f.tree.add(Node { meta, kind: Kind::Fifo }),
            other => return Err(entry_err(format!("unsupported tar entry type {:?}", other.as_byte() as char))),
        };
        if existing.is_some_and(|c| c.node == node) {
            continue; // a hard link to itself
        }
        f.tree.children_mut(parent).expect("a directory").insert(name.clone(), Child { node, layer: index });
    }
    // Read to the end so the caller's digest covers the whole blob.
    let mut rest = archive.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink()).map_err(tar_err)?;
    Ok(stats)
}

/// Whether a tar entry's name is a whiteout or an opaque marker (never materialised).
pub(crate) fn is_whiteout(name: &[u8]) -> bool {
    name == OPAQUE_MARKER || name.starts_with(WHITEOUT_PREFIX)
}

fn resolve_reason(e: ResolveError) -> String {
    match e {
        ResolveError::NotADirectory(p) => format!("parent {p:?} is not a directory"),
        ResolveError::SymlinkLoop => "too many levels of symbolic links in the parent path".into(),
        ResolveError::Missing => "parent directory does not exist".into(),
    }
}

fn sink_or_tar(e: std::io::Error, layer: &str, path: &str) -> Error {
    if let Some(SinkFailed(index, _)) = e.get_ref().and_then(|inner| inner.downcast_ref::<SinkFailed>()) {
        let index = *index;
        return Error::Sink { index, source: e.into_inner().expect("checked above") };
    }
    Error::Tar { layer: layer.to_owned(), source: std::io::Error::new(e.kind(), format!("{path}: {e}")) }
}

/// Mode, owner, mtime (with PAX sub-second precision) and xattrs of an entry.
fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> std::io::Result<Meta> {
    let h = entry.header();
    let mut meta = Meta {
        perm: (h.mode().unwrap_or(0o644) & 0o7777) as u16,
        uid: h.uid().unwrap_or(0) as u32,
        gid: h.gid().unwrap_or(0) as u32,
        mtime: h.mtime().unwrap_or(0) as i64,
        mtime_nsec: 0,
        xattrs: BTreeMap::new(),
    };
    if let Some(pax) = entry.pax_extensions()? {
        for ext in pax {
            let ext = ext?;
            let key = ext.key_bytes();
            let value = ext.value_bytes();
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                meta.xattrs.insert(name.to_vec(), value.to_vec());
            } else if key == b"mtime" {
                if let Some((s, ns)) = parse_pax_time(value) {
                    meta.mtime = s;
                    meta.mtime_nsec = ns;
                }
            } else if key == b"uid" {
                if let Some(v) = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()) {
                    meta.uid = v;
                }
            } else if key == b"gid" {
                if let Some(v) = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()) {
                    meta.gid = v;
                }
            }
        }
    }
    Ok(meta)
}

/// Parses a PAX time such as `1700000000.123456789` or `-1.5`.
fn parse_pax_time(value: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(value).ok()?;
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = int.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let mut nsec: u32 = if digits.is_empty() { 0 } else { digits.parse().ok()? };
    for _ in digits.len()..9 {
        nsec *= 10;
    }
    if s.starts_with('-') && nsec > 0 {
        // -1.5 means 1.5 s before the epoch: -2 s + 0.5 s.
        return Some((secs - 1, 1_000_000_000 - nsec));
    }
    Some((secs, nsec))
}

#[cfg(test)]
mod tests {
    use super::parse_pax_time;

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time(b"1700000000.5"), Some((1700000000, 500_000_000)));
        assert_eq!(parse_pax_time(b"12"), Some((12, 0)));
        assert_eq!(parse_pax_time(b"-1.5"), Some((-2, 500_000_000)));
        assert_eq!(parse_pax_time(b"x"), None);
    }
}
