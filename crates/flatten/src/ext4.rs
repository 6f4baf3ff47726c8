//! Encoders for the ext4 structures Tessera writes: inodes, directory
//! blocks, extent trees, extended attributes, the superblock. Where each of
//! them goes is [`crate::layout`]'s business.
//!
//! The filesystem uses 4 KiB blocks, 256-byte inodes, extents, `flex_bg` (so
//! bitmaps and inode tables may sit anywhere) and `sparse_super2` with no
//! backup superblocks (so no group's metadata lands inside a layer region).
//! There is no journal and no checksum feature: the image is written once,
//! checked by `e2fsck -fn`, and its chunks are authenticated by the seal.

use crate::tree::{Kind, Meta, Node, NodeId, Tree};
use crate::{Error, BLOCK_SIZE};

pub(crate) const BS: usize = BLOCK_SIZE as usize;
pub(crate) const INODE_SIZE: usize = 256;
const EXTRA_ISIZE: u16 = 32;
const FIRST_INO: u32 = 11;
const MAX_EXTENT_LEN: u64 = 32768;
const EXTENTS_PER_BLOCK: u64 = ((BS - 12) / 12) as u64;
const XATTR_MAGIC: u32 = 0xEA02_0000;

// Feature flags (see the ext4 disk layout documentation).
const COMPAT_EXT_ATTR: u32 = 0x8;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const RO_COMPAT_LARGE_FILE: u32 = 0x2;
const RO_COMPAT_DIR_NLINK: u32 = 0x20;
const RO_COMPAT_EXTRA_ISIZE: u32 = 0x40;

const EXT4_EXTENTS_FL: u32 = 0x80000;

fn file_type(kind: &Kind) -> u8 {
    match kind {
        Kind::File { .. } => 1,
        Kind::Dir(_) => 2,
        Kind::CharDev { .. } => 3,
        Kind::BlockDev { .. } => 4,
        Kind::Fifo => 5,
        Kind::Symlink(_) => 7,
    }
}

/// Linear directory blocks: `.`, `..`, then children in name order.
pub(crate) fn dir_blocks(tree: &Tree, dir: NodeId, parent: NodeId, ino_of: impl Fn(NodeId) -> u32) -> Result<Vec<u8>, Error> {
    let mut entries: Vec<(u32, u8, &[u8])> = vec![(ino_of(dir), 2, b"."), (ino_of(parent), 2, b"..")];
    for (name, c) in tree.children(dir).expect("a directory") {
        if name.len() > 255 {
            return Err(Error::Format(format!("file name of {} bytes is longer than 255", name.len())));
        }
        entries.push((ino_of(c.node), file_type(&tree.nodes[c.node as usize].kind), name));
    }
    let mut out = vec![0u8; BS];
    let mut block_start = 0usize;
    let mut pos = 0usize;
    let mut last: Option<usize> = None;
    for (ino, ft, name) in entries {
        let len = (8 + name.len()).next_multiple_of(4);
        if pos + len > block_start + BS {
            if let Some(l) = last {
                put_u16(&mut out, l + 4, (block_start + BS - l) as u16);
            }
            block_start += BS;
            pos = block_start;
            out.resize(block_start + BS, 0);
        }
        put_u32(&mut out, pos, ino);
        put_u16(&mut out, pos + 4, len as u16);
        out[pos + 6] = name.len() as u8;
        out[pos + 7] = ft;
        out[pos + 8..pos + 8 + name.len()].copy_from_slice(name);
        last = Some(pos);
        pos += len;
    }
    if let Some(l) = last {
        put_u16(&mut out, l + 4, (block_start + BS - l) as u16);
    }
    Ok(out)
}

/// Splits contiguous runs into extents of at most 32768 blocks: (logical, physical, len).
pub(crate) fn split_extents(runs: &[(u64, u64)]) -> Vec<(u32, u64, u16)> {
    let mut out = Vec::new();
    let mut logical = 0u64;
    for &(phys, len) in runs {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MAX_EXTENT_LEN);
            out.push((logical as u32, phys + done, n as u16));
            logical += n;
            done += n;
        }
    }
    out
}

fn put_extent_header(b: &mut [u8], entries: usize, max: usize, depth: u16) {
    put_u16(b, 0, 0xF30A);
    put_u16(b, 2, entries as u16);
    put_u16(b, 4, max as u16);
    put_u16(b, 6, depth);
}

fn put_extent(b: &mut [u8], (logical, phys, len): (u32, u64, u16)) {
    put_u32(b, 0, logical);
    put_u16(b, 4, len);
    put_u16(b, 6, (phys >> 32) as u16);
    put_u32(b, 8, phys as u32);
}

/// Writes the extent tree root into `iblock` (60 bytes); returns leaf blocks
/// to place at `leaf_start..` when the extents do not fit in the inode.
pub(crate) fn encode_extent_tree(iblock: &mut [u8], extents: &[(u32, u64, u16)], leaf_start: u64) -> Result<Vec<Vec<u8>>, Error> {
    if extents.len() <= 4 {
        put_extent_header(iblock, extents.len(), 4, 0);
        for (i, &e) in extents.iter().enumerate() {
            put_extent(&mut iblock[12 + 12 * i..], e);
        }
        return Ok(Vec::new());
    }
    let leaves: Vec<&[(u32, u64, u16)]> = extents.chunks(EXTENTS_PER_BLOCK as usize).collect();
    if leaves.len() > 4 {
        return Err(Error::Format(format!("a file of {} extents needs a deeper extent tree than supported", extents.len())));
    }
    put_extent_header(iblock, leaves.len(), 4, 1);
    let mut blocks = Vec::new();
    for (i, leaf) in leaves.iter().enumerate() {
        let at = 12 + 12 * i;
        let block = leaf_start + i as u64;
        put_u32(iblock, at, leaf[0].0);
        put_u32(iblock, at + 4, block as u32);
        put_u16(iblock, at + 8, (block >> 32) as u16);
        let mut b = vec![0u8; BS];
        put_extent_header(&mut b, leaf.len(), EXTENTS_PER_BLOCK as usize, 0);
        for (j, &e) in leaf.iter().enumerate() {
            put_extent(&mut b[12 + 12 * j..], e);
        }
        blocks.push(b);
    }
    Ok(blocks)
}

/// Encodes an inode; `dir_size` is a directory's size in bytes, `inline` the
/// in-inode xattr area, `blocks` the 4 KiB blocks it owns.
pub(crate) fn encode_inode(raw: &mut [u8; INODE_SIZE], node: &Node, links: u32, dir_size: u64, inline: Option<&[u8]>, uses_extents: bool, blocks: u64) {
    let m = &node.meta;
    let (type_bits, size) = match &node.kind {
        Kind::File { size, .. } => (0x8000u16, *size),
        Kind::Dir(_) => (0x4000, dir_size),
        Kind::Symlink(t) => (0xA000, t.len() as u64),
        Kind::CharDev { .. } => (0x2000, 0),
        Kind::BlockDev { .. } => (0x6000, 0),
        Kind::Fifo => (0x1000, 0),
    };
    put_u16(raw, 0x0, type_bits | (m.perm & 0o7777));
    put_u16(raw, 0x2, m.uid as u16);
    put_u32(raw, 0x4, size as u32);
    let (secs, extra) = encode_time(m.mtime, m.mtime_nsec);
    for off in [0x8, 0xC, 0x10] {
        put_u32(raw, off, secs);
    }
    put_u16(raw, 0x18, m.gid as u16);
    put_u16(raw, 0x1A, links as u16);
    put_u32(raw, 0x1C, (blocks * (BLOCK_SIZE / 512)) as u32);
    put_u32(raw, 0x20, if uses_extents { EXT4_EXTENTS_FL } else { 0 });
    match &node.kind {
        Kind::Symlink(t) if t.len() < 60 => raw[0x28..0x28 + t.len()].copy_from_slice(t),
        Kind::CharDev { major, minor } | Kind::BlockDev { major, minor } => {
            if *major < 256 && *minor < 256 {
                put_u32(raw, 0x28, (major << 8) | minor);
            } else {
                put_u32(raw, 0x2C, (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12));
            }
        }
        _ => {}
    }
    put_u32(raw, 0x6C, (size >> 32) as u32);
    put_u16(raw, 0x74, ((blocks * (BLOCK_SIZE / 512)) >> 32) as u16);
    put_u16(raw, 0x78, (m.uid >> 16) as u16);
    put_u16(raw, 0x7A, (m.gid >> 16) as u16);
    put_u16(raw, 0x80, EXTRA_ISIZE);
    for off in [0x84, 0x88, 0x8C, 0x94] {
        put_u32(raw, off, extra);
    }
    put_u32(raw, 0x90, secs);
    if let Some(inline) = inline {
        let at = 0x80 + EXTRA_ISIZE as usize;
        raw[at..at + inline.len()].copy_from_slice(inline);
    }
}

/// ext4 time: low 32 bits of the seconds, and (nanoseconds << 2 | epoch bits).
fn encode_time(secs: i64, nsec: u32) -> (u32, u32) {
    let lo = secs as u32;
    let epoch = ((secs - (lo as i32 as i64)) >> 32) as u32 & 3;
    (lo, (nsec.min(999_999_999) << 2) | epoch)
}

/// (name index, name suffix, value) in on-disk form, sorted as ext4 sorts them.
pub(crate) fn xattr_entries(meta: &Meta, warnings: &mut Vec<String>) -> Vec<(u8, Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, value) in &meta.xattrs {
        let (index, suffix, value) = match name.as_slice() {
            b"system.posix_acl_access" => match acl_to_ext4(value) {
                Some(v) => (2, Vec::new(), v),
                None => {
                    warnings.push("skipped a malformed system.posix_acl_access".into());
                    continue;
                }
            },
            b"system.posix_acl_default" => match acl_to_ext4(value) {
                Some(v) => (3, Vec::new(), v),
                None => {
                    warnings.push("skipped a malformed system.posix_acl_default".into());
                    continue;
                }
            },
            n if n.starts_with(b"user.") => (1, n[5..].to_vec(), value.clone()),
            n if n.starts_with(b"trusted.") => (4, n[8..].to_vec(), value.clone()),
            n if n.starts_with(b"security.") => (6, n[9..].to_vec(), value.clone()),
            n => {
                warnings.push(format!("skipped extended attribute {:?} (unknown namespace)", String::from_utf8_lossy(n)));
                continue;
            }
        };
        if suffix.len() > 255 {
            warnings.push("skipped an extended attribute with a name over 255 bytes".into());
            continue;
        }
        out.push((index, suffix, value));
    }
    out.sort_by(|a, b| (a.0, a.1.len(), &a.1).cmp(&(b.0, b.1.len(), &b.1)));
    out
}

/// Converts a POSIX ACL from the kernel's xattr form (version 2, 8-byte
/// entries) to ext4's on-disk form (version 1, short entries for the
/// owner/group/mask/other tags).
fn acl_to_ext4(value: &[u8]) -> Option<Vec<u8>> {
    if value.len() < 4 || !(value.len() - 4).is_multiple_of(8) || u32::from_le_bytes(value[..4].try_into().ok()?) != 2 {
        return None;
    }
    let mut out = 1u32.to_le_bytes().to_vec();
    for e in value[4..].chunks(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        out.extend_from_slice(&e[0..4]);
        match tag {
            0x01 | 0x04 | 0x10 | 0x20 => {}
            0x02 | 0x08 => out.extend_from_slice(&e[4..8]),
            _ => return None,
        }
    }
    Some(out)
}

fn xattr_hash(name: &[u8], value: &[u8]) -> u32 {
    let mut hash = 0u32;
    for &c in name {
        hash = (hash << 5) ^ (hash >> 27) ^ c as u32;
    }
    let mut padded = value.to_vec();
    padded.resize(value.len().next_multiple_of(4), 0);
    for w in padded.chunks(4) {
        hash = (hash << 16) ^ (hash >> 16) ^ u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
    }
    hash
}

/// Lays out xattr entries in an area of `size` bytes whose entries start at
/// `entries_at`; value offsets are relative to `base`.
fn layout_xattrs(entries: &[(u8, Vec<u8>, Vec<u8>)], size: usize, entries_at: usize, base: usize, hashed: bool) -> Option<Vec<u8>> {
    let mut area = vec![0u8; size];
    let mut e = entries_at;
    let mut v_end = size;
    for (index, name, value) in entries {
        let elen = (16 + name.len()).next_multiple_of(4);
        let vlen = value.len().next_multiple_of(4);
        if e + elen + 4 > v_end.checked_sub(vlen)? {
            return None;
        }
        v_end -= vlen;
        area[v_end..v_end + value.len()].copy_from_slice(value);
        area[e] = name.len() as u8;
        area[e + 1] = *index;
        put_u16(&mut area, e + 2, (v_end - base) as u16);
        put_u32(&mut area, e + 8, value.len() as u32);
        put_u32(&mut area, e + 12, if hashed { xattr_hash(name, value) } else { 0 });
        area[e + 16..e + 16 + name.len()].copy_from_slice(name);
        e += elen;
    }
    Some(area)
}

pub(crate) fn encode_xattrs_inline(entries: &[(u8, Vec<u8>, Vec<u8>)]) -> Option<Vec<u8>> {
    let size = INODE_SIZE - 0x80 - EXTRA_ISIZE as usize;
    let mut area = layout_xattrs(entries, size, 4, 4, false)?;
    put_u32(&mut area, 0, XATTR_MAGIC);
    Some(area)
}

pub(crate) fn encode_xattr_block(entries: &[(u8, Vec<u8>, Vec<u8>)]) -> Option<Vec<u8>> {
    let mut block = layout_xattrs(entries, BS, 32, 0, true)?;
    put_u32(&mut block, 0, XATTR_MAGIC);
    put_u32(&mut block, 4, 1); // refcount
    put_u32(&mut block, 8, 1); // blocks
    let mut hash = 0u32;
    for (_, name, value) in entries {
        hash = (hash << 16) ^ (hash >> 16) ^ xattr_hash(name, value);
    }
    put_u32(&mut block, 12, hash);
    Some(block)
}

pub(crate) struct Super<'a> {
    pub total_blocks: u64,
    pub free_blocks_total: u64,
    pub inodes_total: u64,
    pub free_inodes_total: u64,
    pub ipg: u64,
    pub bpg: u64,
    pub seed: &'a [u8; 32],
}

pub(crate) fn encode_superblock(sb: &mut [u8], s: &Super<'_>) {
    put_u32(sb, 0x00, s.inodes_total as u32);
    put_u32(sb, 0x04, s.total_blocks as u32);
    put_u32(sb, 0x0C, s.free_blocks_total as u32);
    put_u32(sb, 0x10, s.free_inodes_total as u32);
    put_u32(sb, 0x14, 0); // first data block
    put_u32(sb, 0x18, 2); // 1024 << 2 = 4096
    put_u32(sb, 0x1C, 2);
    put_u32(sb, 0x20, s.bpg as u32);
    put_u32(sb, 0x24, s.bpg as u32);
    put_u32(sb, 0x28, s.ipg as u32);
    put_u16(sb, 0x36, 0xFFFF); // max mount count: never force a check
    put_u16(sb, 0x38, 0xEF53);
    put_u16(sb, 0x3A, 1); // clean
    put_u16(sb, 0x3C, 1); // on errors: continue
    put_u32(sb, 0x4C, 1); // dynamic revision
    put_u32(sb, 0x54, FIRST_INO);
    put_u16(sb, 0x58, INODE_SIZE as u16);
    put_u32(sb, 0x5C, COMPAT_EXT_ATTR | COMPAT_SPARSE_SUPER2);
    put_u32(sb, 0x60, INCOMPAT_FILETYPE | INCOMPAT_EXTENTS | INCOMPAT_FLEX_BG);
    put_u32(sb, 0x64, RO_COMPAT_LARGE_FILE | RO_COMPAT_DIR_NLINK | RO_COMPAT_EXTRA_ISIZE);
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&s.seed[..16]);
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    sb[0x68..0x78].copy_from_slice(&uuid);
    sb[0x78..0x78 + 7].copy_from_slice(b"tessera");
    sb[0xEC..0xFC].copy_from_slice(&s.seed[16..32]); // directory hash seed
    sb[0xFC] = 1; // half_md4
    put_u32(sb, 0x100, 0x0C); // default mount options: user_xattr, acl
    put_u16(sb, 0x15C, EXTRA_ISIZE);
    put_u16(sb, 0x15E, EXTRA_ISIZE);
    put_u32(sb, 0x160, 1); // signed directory hash
    sb[0x174] = 4; // 16 groups per flex group
                   // s_backup_bgs (0x24C) stay 0: sparse_super2 with no backup superblocks.
}

pub(crate) fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// One bit per block of the disk.
pub(crate) struct Bitmap(Vec<u64>);

impl Bitmap {
    pub fn new(bits: u64) -> Bitmap {
        Bitmap(vec![0; bits.div_ceil(64) as usize])
    }
    pub fn set(&mut self, b: u64) {
        self.0[(b / 64) as usize] |= 1 << (b % 64);
    }
    pub fn set_range(&mut self, start: u64, len: u64) {
        for b in start..start + len {
            self.set(b);
        }
    }
    /// Whether bit `b` is set (bits past the end are clear).
    pub fn get(&self, b: u64) -> bool {
        self.0.get((b / 64) as usize).is_some_and(|w| w & (1 << (b % 64)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_encoding_handles_pre_1970_and_post_2038() {
        assert_eq!(encode_time(0, 5), (0, 20));
        assert_eq!(encode_time(-1, 0), (u32::MAX, 0));
        assert_eq!(encode_time(1 << 32, 0), (0, 1));
    }

    #[test]
    fn acl_conversion_shortens_owner_entries() {
        let mut v = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [(1u16, 7u16, u32::MAX), (2, 5, 1000), (4, 5, u32::MAX), (0x10, 5, u32::MAX), (0x20, 4, u32::MAX)] {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        let out = acl_to_ext4(&v).unwrap();
        assert_eq!(out.len(), 4 + 4 + 8 + 4 + 4 + 4);
        assert!(acl_to_ext4(&v[..7]).is_none());
    }

    #[test]
    fn extents_split_at_32768_blocks() {
        let e = split_extents(&[(1000, 70000)]);
        assert_eq!(e, vec![(0, 1000, 32768), (32768, 33768, 32768), (65536, 66536, 4464)]);
    }
}
