//! Writes the ext4 metadata for a [`Tree`] whose file data is already laid
//! out, so that nothing here can move a data block.
//!
//! The filesystem uses 4 KiB blocks, 256-byte inodes, extents, `flex_bg` (so
//! bitmaps and inode tables may sit after all the data) and `sparse_super2`
//! with no backup superblocks (so no group's metadata lands inside a layer
//! region). There is no journal and no checksum feature: the image is
//! written once, checked by `e2fsck -fn`, and its chunks are authenticated by
//! the seal.
//!
//! Disk layout, in 4 KiB blocks:
//!
//! ```text
//! 0            superblock (at byte 1024), then the group descriptor table
//! 128          layer 1 file data, then layer 2 at the next 512 KiB boundary, ...
//! data_end     directories, long symlinks, extent leaves, xattr blocks,
//!              block bitmaps, inode bitmaps, inode tables
//! ...          headroom: free blocks for a writable root (holes)
//! ```

use std::collections::BTreeMap;

use crate::tree::{Kind, Meta, Node, NodeId, Tree, ROOT};
use crate::{Error, BLOCK_SIZE, REGION_BLOCKS};

const BS: usize = BLOCK_SIZE as usize;
const BLOCKS_PER_GROUP: u64 = 32768;
const INODE_SIZE: usize = 256;
const EXTRA_ISIZE: u16 = 32;
const FIRST_INO: u32 = 11;
const LOST_FOUND_INO: u32 = 11;
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

/// Metadata blocks and the final geometry of the disk.
pub(crate) struct Built {
    /// Non-zero 4 KiB blocks outside the layer regions, by block number.
    pub blocks: BTreeMap<u64, Vec<u8>>,
    pub total_blocks: u64,
    pub inodes_used: u64,
    pub inodes_total: u64,
    pub warnings: Vec<String>,
}

/// Per-inode facts gathered before block allocation.
struct InodePlan {
    node: NodeId,
    links: u32,
    /// Directory contents, long symlink target, or nothing.
    content: Vec<u8>,
    /// Blocks of extent-tree leaves the file needs.
    extent_leaves: u64,
    /// The xattr block, when the attributes do not fit in the inode.
    xattr_block: Option<Vec<u8>>,
    /// In-inode xattr area, when they fit.
    xattr_inline: Option<Vec<u8>>,
    /// First metadata block allocated to this inode.
    meta_start: u64,
}

pub(crate) fn build(tree: &Tree, data_end: u64, headroom_blocks: u64, seed: &[u8; 32]) -> Result<Built, Error> {
    let mut warnings = Vec::new();
    let (order, ino_of) = number_inodes(tree);
    let inodes_used = (FIRST_INO as u64 - 1) + order.len() as u64 - 1; // root is not in 12..

    // Gather contents and sizes.
    let mut plans: Vec<InodePlan> = Vec::with_capacity(order.len());
    let mut links = vec![0u32; tree.nodes.len()];
    for &node in &order {
        if let Kind::Dir(children) = &tree.nodes[node as usize].kind {
            for c in children.values() {
                links[c.node as usize] += 1;
            }
        }
    }
    let parent_of = parents(tree, &order);
    for &node in &order {
        let n = &tree.nodes[node as usize];
        let (content, nlinks) = match &n.kind {
            Kind::Dir(children) => {
                let subdirs = children.values().filter(|c| tree.is_dir(c.node)).count() as u32;
                let parent = parent_of[node as usize];
                (dir_blocks(tree, node, parent, &ino_of)?, if subdirs + 2 > 65000 { 1 } else { subdirs + 2 })
            }
            Kind::Symlink(t) if t.len() >= 60 => {
                if t.len() >= BS {
                    return Err(Error::Format(format!("symlink target of {} bytes is too long", t.len())));
                }
                let mut b = t.clone();
                b.resize(BS, 0);
                (b, links[node as usize])
            }
            _ => (Vec::new(), links[node as usize]),
        };
        let extent_leaves = match &n.kind {
            Kind::File { size, .. } => {
                let exts = size.div_ceil(BLOCK_SIZE).div_ceil(MAX_EXTENT_LEN);
                let leaves = if exts > 4 { exts.div_ceil(EXTENTS_PER_BLOCK) } else { 0 };
                if leaves > 4 {
                    return Err(Error::Format(format!("a file of {size} bytes needs a deeper extent tree than supported")));
                }
                leaves
            }
            _ => 0,
        };
        let entries = xattr_entries(&n.meta, &mut warnings);
        let (xattr_inline, xattr_block) = if entries.is_empty() {
            (None, None)
        } else if let Some(inline) = encode_xattrs_inline(&entries) {
            (Some(inline), None)
        } else {
            let block = encode_xattr_block(&entries).ok_or_else(|| {
                Error::Format(format!("extended attributes of {} bytes do not fit in one block", entries.iter().map(|e| e.2.len()).sum::<usize>()))
            })?;
            (None, Some(block))
        };
        plans.push(InodePlan { node, links: nlinks, content, extent_leaves, xattr_block, xattr_inline, meta_start: 0 });
    }

    // Metadata that does not depend on the geometry.
    let mut meta_blocks = 0u64;
    for p in &mut plans {
        p.meta_start = data_end + meta_blocks;
        meta_blocks += (p.content.len() / BS) as u64 + p.extent_leaves + p.xattr_block.is_some() as u64;
    }

    // Geometry: the number of groups decides bitmap and inode-table sizes,
    // which decide the size, which decides the number of groups.
    let inodes_wanted = inodes_used + headroom_blocks * BLOCK_SIZE / 16384 + 64;
    let fixed = data_end + meta_blocks + headroom_blocks;
    let mut groups = fixed.div_ceil(BLOCKS_PER_GROUP).max(1);
    let (total_blocks, ipg) = loop {
        let ipg = (inodes_wanted.div_ceil(groups)).next_multiple_of(16).max(16);
        if ipg > BLOCKS_PER_GROUP {
            groups += 1;
            continue;
        }
        let itable = ipg * INODE_SIZE as u64 / BLOCK_SIZE;
        let total = (fixed + groups * (2 + itable)).next_multiple_of(REGION_BLOCKS);
        if total.div_ceil(BLOCKS_PER_GROUP) > groups {
            groups += 1;
            continue;
        }
        let min_total = ((groups - 1) * BLOCKS_PER_GROUP + 1).next_multiple_of(REGION_BLOCKS);
        break (total.max(min_total), ipg);
    };
    let gdt_blocks = (groups * 32).div_ceil(BLOCK_SIZE);
    if 1 + gdt_blocks > REGION_BLOCKS || total_blocks > u32::MAX as u64 {
        return Err(Error::Format(format!("a disk of {total_blocks} blocks is larger than supported (2 TiB)")));
    }
    let itable_blocks = ipg * INODE_SIZE as u64 / BLOCK_SIZE;
    let bbitmap_start = data_end + meta_blocks;
    let ibitmap_start = bbitmap_start + groups;
    let itable_start = ibitmap_start + groups;
    let meta_end = itable_start + groups * itable_blocks;
    let inodes_total = ipg * groups;

    let mut out: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut used = Bitmap::new(total_blocks);
    used.set_range(0, 1 + gdt_blocks);
    used.set_range(data_end, meta_end - data_end);

    // Inodes.
    let mut itable: BTreeMap<u64, Vec<u8>> = BTreeMap::new(); // block -> contents
    let mut dirs_per_group = vec![0u32; groups as usize];
    for (i, p) in plans.iter().enumerate() {
        let ino = ino_of[p.node as usize];
        debug_assert!(i == 0 || ino as usize == FIRST_INO as usize + i - 1);
        let node = &tree.nodes[p.node as usize];
        let mut raw = [0u8; INODE_SIZE];
        let mut next_meta = p.meta_start;
        let mut data_blocks = 0u64;
        let mut tree_blocks = 0u64;
        let mut extents: Vec<(u64, u64)> = Vec::new(); // (physical start, blocks)
        if let Kind::File { start_block, size } = node.kind {
            data_blocks = size.div_ceil(BLOCK_SIZE);
            if data_blocks > 0 {
                used.set_range(start_block, data_blocks);
                extents.push((start_block, data_blocks));
            }
        }
        if !p.content.is_empty() {
            let n = (p.content.len() / BS) as u64;
            for (j, block) in p.content.chunks(BS).enumerate() {
                put_block(&mut out, next_meta + j as u64, block);
            }
            extents.push((next_meta, n));
            data_blocks = n;
            next_meta += n;
        }
        let uses_extents = matches!(node.kind, Kind::File { .. } | Kind::Dir(_)) || !p.content.is_empty();
        if uses_extents {
            let split = split_extents(&extents);
            let leaves = encode_extent_tree(&mut raw[0x28..0x64], &split, next_meta);
            for (j, leaf) in leaves.iter().enumerate() {
                put_block(&mut out, next_meta + j as u64, leaf);
            }
            tree_blocks = leaves.len() as u64;
            debug_assert_eq!(tree_blocks, p.extent_leaves);
            next_meta += tree_blocks;
        }
        let mut xattr_blocks = 0;
        if let Some(block) = &p.xattr_block {
            put_block(&mut out, next_meta, block);
            put_u32(&mut raw, 0x68, next_meta as u32);
            xattr_blocks = 1;
        }
        encode_inode(&mut raw, node, p, uses_extents, data_blocks + tree_blocks + xattr_blocks);
        if matches!(node.kind, Kind::Dir(_)) {
            dirs_per_group[((ino - 1) as u64 / ipg) as usize] += 1;
        }
        let pos = (ino as u64 - 1) * INODE_SIZE as u64;
        let block = itable_start + (ino as u64 - 1) / ipg * itable_blocks + (pos % (ipg * INODE_SIZE as u64)) / BLOCK_SIZE;
        let off = (pos % BLOCK_SIZE) as usize;
        itable.entry(block).or_insert_with(|| vec![0; BS])[off..off + INODE_SIZE].copy_from_slice(&raw);
    }
    for (block, bytes) in itable {
        put_block(&mut out, block, &bytes);
    }

    // Bitmaps and group descriptors.
    let max_ino = FIRST_INO as u64 + plans.len() as u64 - 2;
    let mut gdt = vec![0u8; (gdt_blocks as usize) * BS];
    let mut free_blocks_total = 0u64;
    let mut free_inodes_total = 0u64;
    for g in 0..groups {
        let first = g * BLOCKS_PER_GROUP;
        let in_group = BLOCKS_PER_GROUP.min(total_blocks - first);
        let mut bb = vec![0u8; BS];
        let mut used_count = 0u64;
        for b in 0..BLOCKS_PER_GROUP {
            if b >= in_group || used.get(first + b) {
                bb[(b / 8) as usize] |= 1 << (b % 8);
                if b < in_group {
                    used_count += 1;
                }
            }
        }
        let free_b = in_group - used_count;
        let mut ib = vec![0u8; BS];
        let first_ino = g * ipg + 1;
        let mut used_inodes = 0u64;
        for i in 0..(BS as u64 * 8) {
            if i >= ipg || first_ino + i <= max_ino {
                ib[(i / 8) as usize] |= 1 << (i % 8);
                if i < ipg {
                    used_inodes += 1;
                }
            }
        }
        let free_i = ipg - used_inodes;
        put_block(&mut out, bbitmap_start + g, &bb);
        put_block(&mut out, ibitmap_start + g, &ib);
        let d = &mut gdt[(g * 32) as usize..(g * 32 + 32) as usize];
        put_u32(d, 0x0, (bbitmap_start + g) as u32);
        put_u32(d, 0x4, (ibitmap_start + g) as u32);
        put_u32(d, 0x8, (itable_start + g * itable_blocks) as u32);
        put_u16(d, 0xC, free_b as u16);
        put_u16(d, 0xE, free_i as u16);
        put_u16(d, 0x10, dirs_per_group[g as usize] as u16);
        free_blocks_total += free_b;
        free_inodes_total += free_i;
    }
    let mut head = vec![0u8; BS * (1 + gdt_blocks as usize)];
    encode_superblock(&mut head[1024..2048], &Super { total_blocks, free_blocks_total, inodes_total, free_inodes_total, ipg, seed });
    head[BS..].copy_from_slice(&gdt);
    for (j, block) in head.chunks(BS).enumerate() {
        put_block(&mut out, j as u64, block);
    }
    Ok(Built { blocks: out, total_blocks, inodes_used, inodes_total, warnings })
}

/// Numbers reachable nodes: root 2, `lost+found` 11, the rest from 12 in
/// depth-first order of sorted names (hard links keep their first number).
/// Returns the nodes in inode order (root first) and the node → inode map.
fn number_inodes(tree: &Tree) -> (Vec<NodeId>, Vec<u32>) {
    let mut ino_of = vec![0u32; tree.nodes.len()];
    let lost_found = tree
        .children(ROOT)
        .and_then(|c| c.get(b"lost+found".as_slice()))
        .map(|c| c.node)
        .filter(|&n| tree.is_dir(n))
        .expect("the flattener always adds /lost+found");
    ino_of[ROOT as usize] = 2;
    ino_of[lost_found as usize] = LOST_FOUND_INO;
    let mut order = vec![ROOT, lost_found];
    let mut next = FIRST_INO + 1;
    let mut stack = vec![ROOT];
    while let Some(dir) = stack.pop() {
        let children = tree.children(dir).expect("only directories are stacked");
        let mut subdirs = Vec::new();
        for c in children.values() {
            if ino_of[c.node as usize] == 0 {
                ino_of[c.node as usize] = next;
                next += 1;
                order.push(c.node);
            }
            if tree.is_dir(c.node) {
                subdirs.push(c.node);
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    (order, ino_of)
}

fn parents(tree: &Tree, order: &[NodeId]) -> Vec<NodeId> {
    let mut parent = vec![ROOT; tree.nodes.len()];
    for &n in order {
        if let Some(children) = tree.children(n) {
            for c in children.values() {
                if tree.is_dir(c.node) {
                    parent[c.node as usize] = n;
                }
            }
        }
    }
    parent
}

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
fn dir_blocks(tree: &Tree, dir: NodeId, parent: NodeId, ino_of: &[u32]) -> Result<Vec<u8>, Error> {
    let mut entries: Vec<(u32, u8, &[u8])> = vec![(ino_of[dir as usize], 2, b"."), (ino_of[parent as usize], 2, b"..")];
    for (name, c) in tree.children(dir).expect("a directory") {
        if name.len() > 255 {
            return Err(Error::Format(format!("file name of {} bytes is longer than 255", name.len())));
        }
        entries.push((ino_of[c.node as usize], file_type(&tree.nodes[c.node as usize].kind), name));
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
fn split_extents(runs: &[(u64, u64)]) -> Vec<(u32, u64, u16)> {
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
fn encode_extent_tree(iblock: &mut [u8], extents: &[(u32, u64, u16)], leaf_start: u64) -> Vec<Vec<u8>> {
    if extents.len() <= 4 {
        put_extent_header(iblock, extents.len(), 4, 0);
        for (i, &e) in extents.iter().enumerate() {
            put_extent(&mut iblock[12 + 12 * i..], e);
        }
        return Vec::new();
    }
    let leaves: Vec<&[(u32, u64, u16)]> = extents.chunks(EXTENTS_PER_BLOCK as usize).collect();
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
    blocks
}

fn encode_inode(raw: &mut [u8; INODE_SIZE], node: &Node, plan: &InodePlan, uses_extents: bool, blocks: u64) {
    let m = &node.meta;
    let (type_bits, size) = match &node.kind {
        Kind::File { size, .. } => (0x8000u16, *size),
        Kind::Dir(_) => (0x4000, plan.content.len() as u64),
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
    put_u16(raw, 0x1A, plan.links as u16);
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
    if let Some(inline) = &plan.xattr_inline {
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
fn xattr_entries(meta: &Meta, warnings: &mut Vec<String>) -> Vec<(u8, Vec<u8>, Vec<u8>)> {
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

fn encode_xattrs_inline(entries: &[(u8, Vec<u8>, Vec<u8>)]) -> Option<Vec<u8>> {
    let size = INODE_SIZE - 0x80 - EXTRA_ISIZE as usize;
    let mut area = layout_xattrs(entries, size, 4, 4, false)?;
    put_u32(&mut area, 0, XATTR_MAGIC);
    Some(area)
}

fn encode_xattr_block(entries: &[(u8, Vec<u8>, Vec<u8>)]) -> Option<Vec<u8>> {
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

struct Super<'a> {
    total_blocks: u64,
    free_blocks_total: u64,
    inodes_total: u64,
    free_inodes_total: u64,
    ipg: u64,
    seed: &'a [u8; 32],
}

fn encode_superblock(sb: &mut [u8], s: &Super<'_>) {
    put_u32(sb, 0x00, s.inodes_total as u32);
    put_u32(sb, 0x04, s.total_blocks as u32);
    put_u32(sb, 0x0C, s.free_blocks_total as u32);
    put_u32(sb, 0x10, s.free_inodes_total as u32);
    put_u32(sb, 0x14, 0); // first data block
    put_u32(sb, 0x18, 2); // 1024 << 2 = 4096
    put_u32(sb, 0x1C, 2);
    put_u32(sb, 0x20, BLOCKS_PER_GROUP as u32);
    put_u32(sb, 0x24, BLOCKS_PER_GROUP as u32);
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

fn put_block(out: &mut BTreeMap<u64, Vec<u8>>, block: u64, bytes: &[u8]) {
    debug_assert_eq!(bytes.len(), BS);
    if bytes.iter().any(|&b| b != 0) {
        out.insert(block, bytes.to_vec());
    }
}

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// One bit per block of the disk.
struct Bitmap(Vec<u64>);

impl Bitmap {
    fn new(bits: u64) -> Bitmap {
        Bitmap(vec![0; bits.div_ceil(64) as usize])
    }
    fn set_range(&mut self, start: u64, len: u64) {
        for b in start..start + len {
            self.0[(b / 64) as usize] |= 1 << (b % 64);
        }
    }
    fn get(&self, b: u64) -> bool {
        self.0[(b / 64) as usize] & (1 << (b % 64)) != 0
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
