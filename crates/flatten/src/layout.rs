//! Where the ext4 metadata goes, layer by layer, so that a new image version
//! costs only its new bytes.
//!
//! Each layer's region holds the layer's file data *and* the metadata the
//! layer introduces: the inodes of its new files (in inode groups of its
//! own), the blocks of the directories whose entries it changed, its extent
//! leaves, xattr and long-symlink blocks, and new copies of the bitmaps its
//! changes touched. A region is written once, when its layer ends, from the
//! tree as it stands then; nothing above it ever moves a block of it. So the
//! disk of layers 1..n is the disk of layers 1..n-1 plus:
//!
//! - chunk 0, rewritten every time: superblock, group descriptors, the
//!   bitmaps that depend on the disk's final size, and inode group 0 (root,
//!   `lost+found`, and the first directories, shallowest first);
//! - in place, the inode-table blocks of lower inodes the layer changed (a
//!   directory whose entries changed, a file it deleted or hard-linked);
//! - the new layer's region.
//!
//! Bitmaps and directory blocks are never rewritten in place: a changed one
//! gets a new copy in the current region and the old copy becomes free
//! space. Inode tables cannot move (a group's table is one run of blocks),
//! so directories get their inode numbers first in each layer, packed
//! together, and a later change to them touches few table blocks.
//!
//! Disk layout, in 4 KiB blocks:
//!
//! ```text
//! 0            superblock (at byte 1024), group descriptors, floating bitmaps
//! 64           inode table of group 0
//! 128          layer 1: file data, then its metadata; then layer 2 at the next
//!              512 KiB boundary, ...
//! data_end     tail: bitmaps and inode tables of the groups no layer owns
//!              (all zeros, so holes)
//! ...          headroom: free blocks for a writable root (holes)
//! ```
//!
//! The disk is a whole number of 32 MiB block groups.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::ext4::{self, Bitmap, BS, INODE_SIZE};
use crate::tree::{Kind, NodeId, Tree, ROOT};
use crate::{Error, BLOCK_SIZE, REGION_BLOCKS};

/// Blocks per group (32 MiB).
pub(crate) const BPG: u64 = 8192;
/// Inodes per group.
pub(crate) const IPG: u64 = 1024;
/// Blocks of one group's inode table.
const ITABLE_BLOCKS: u64 = IPG * INODE_SIZE as u64 / BLOCK_SIZE;
/// Group 0's inode table fills the second half of chunk 0.
const HEADER_ITABLE: u64 = REGION_BLOCKS - ITABLE_BLOCKS;
const ROOT_INO: u32 = 2;
const LOST_FOUND_INO: u32 = 11;
/// Group descriptors per block.
const DESCS_PER_BLOCK: u64 = BLOCK_SIZE / 32;

type Digest = [u8; 32];

fn digest(bytes: &[u8]) -> Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// A run of blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Run {
    pub start: u64,
    pub len: u64,
}

/// Where one node's metadata lives.
#[derive(Clone, Debug, Default)]
struct Placed {
    /// 0 until the node is numbered.
    ino: u32,
    /// Directory blocks or a long symlink's block, and a digest of them.
    content: Run,
    content_digest: Option<Digest>,
    /// Extent-tree leaves of a large file.
    leaves: Run,
    /// The xattr block, when the attributes do not fit in the inode.
    xattr: Option<(u64, Digest)>,
}

/// The current copy of a bitmap block.
#[derive(Clone, Copy, Debug)]
struct Copy {
    block: u64,
    digest: Digest,
}

/// One layer's metadata, ready to be merged with the layer's data chunk.
pub(crate) struct Region {
    /// Non-zero metadata blocks, by block number (all at or after the start).
    pub blocks: BTreeMap<u64, Vec<u8>>,
    /// First block after the region (a chunk boundary).
    pub end: u64,
    /// The inode tables in the region: their chunks wait for [`Layout::finish`].
    pub itables: Run,
}

/// What [`Layout::finish`] hands back.
pub(crate) struct Finished {
    /// Chunks to hand over: chunk 0, the chunks holding inode tables, and any
    /// non-zero chunk of the tail.
    pub chunks: BTreeMap<u64, Vec<u8>>,
    pub total_blocks: u64,
    pub inodes_used: u64,
    pub inodes_total: u64,
}

/// The tree walked breadth-first in name order from the root.
struct Walk {
    /// Every reachable node once, in the order first reached.
    order: Vec<NodeId>,
    /// The parent of each reachable directory (the root is its own).
    parent: Vec<NodeId>,
    /// Names that refer to each node (directories: subdirectories + 2).
    links: Vec<u32>,
    reachable: Vec<bool>,
}

fn walk(tree: &Tree) -> Walk {
    let n = tree.nodes.len();
    let mut w = Walk { order: vec![ROOT], parent: vec![ROOT; n], links: vec![0; n], reachable: vec![false; n] };
    w.reachable[ROOT as usize] = true;
    let mut queue = VecDeque::from([ROOT]);
    while let Some(dir) = queue.pop_front() {
        let children = tree.children(dir).expect("only directories are queued");
        let mut subdirs = 0u32;
        for c in children.values() {
            let node = c.node as usize;
            w.links[node] += 1;
            if tree.is_dir(c.node) {
                subdirs += 1;
                w.parent[node] = dir;
            }
            if !w.reachable[node] {
                w.reachable[node] = true;
                w.order.push(c.node);
                if tree.is_dir(c.node) {
                    queue.push_back(c.node);
                }
            }
        }
        w.links[dir as usize] = if subdirs + 2 > 65000 { 1 } else { subdirs + 2 };
    }
    w
}

/// Metadata placement carried from layer to layer.
pub(crate) struct Layout {
    placed: Vec<Placed>,
    /// Nodes holding an inode number.
    numbered: Vec<NodeId>,
    /// Next free slot of group 0 for a directory.
    next_header_ino: u32,
    /// Inode groups handed out so far (group 0 is the header's).
    groups_owned: u64,
    /// First block of each owned group's inode table (index = group).
    itables: Vec<u64>,
    ibitmaps: Vec<Option<Copy>>,
    bbitmaps: Vec<Option<Copy>>,
    /// Chunks that hold inode tables, written last.
    held: BTreeMap<u64, Vec<u8>>,
}

impl Layout {
    pub fn new() -> Layout {
        let mut placed = vec![Placed::default()];
        placed[ROOT as usize].ino = ROOT_INO;
        Layout {
            placed,
            numbered: vec![ROOT],
            next_header_ino: LOST_FOUND_INO + 1,
            groups_owned: 1,
            itables: vec![HEADER_ITABLE],
            ibitmaps: vec![None],
            bbitmaps: Vec::new(),
            held: BTreeMap::new(),
        }
    }

    /// Keeps a chunk that holds inode tables until [`Layout::finish`].
    pub fn hold(&mut self, index: u64, data: Vec<u8>) {
        self.held.insert(index, data);
    }

    /// Lays out the metadata of the layer that just ended, from `start` on.
    pub fn close_region(&mut self, tree: &Tree, start: u64, warnings: &mut Vec<String>) -> Result<Region, Error> {
        self.placed.resize(tree.nodes.len(), Placed::default());
        let w = walk(tree);

        // Nodes that left the tree give back their inode and blocks.
        let placed = &mut self.placed;
        self.numbered.retain(|&n| {
            let keep = w.reachable[n as usize];
            if !keep {
                placed[n as usize] = Placed::default();
            }
            keep
        });

        // Number the new nodes: directories first (into group 0 while it has
        // room, shallowest first), then the rest, in walk order.
        let lost_found = tree.children(ROOT).and_then(|c| c.get(b"lost+found".as_slice())).map(|c| c.node).expect("the flattener keeps /lost+found");
        if self.placed[lost_found as usize].ino == 0 {
            self.placed[lost_found as usize].ino = LOST_FOUND_INO;
            self.numbered.push(lost_found);
        }
        let fresh: Vec<NodeId> = w.order.iter().copied().filter(|&n| self.placed[n as usize].ino == 0).collect();
        let (dirs, others): (Vec<NodeId>, Vec<NodeId>) = fresh.iter().partition(|&&n| tree.is_dir(n));
        let mut rest = Vec::new();
        for n in dirs {
            if (self.next_header_ino as u64) <= IPG {
                self.placed[n as usize].ino = self.next_header_ino;
                self.next_header_ino += 1;
            } else {
                rest.push(n);
            }
        }
        rest.extend(others);
        let first_group = self.groups_owned;
        let new_groups = (rest.len() as u64).div_ceil(IPG);
        for (i, &n) in rest.iter().enumerate() {
            let ino = first_group * IPG + 1 + i as u64;
            self.placed[n as usize].ino = u32::try_from(ino).map_err(|_| Error::Format("more inodes than ext4 can number".into()))?;
        }
        let mut is_new = vec![false; tree.nodes.len()];
        for &n in &fresh {
            is_new[n as usize] = true;
        }
        self.numbered.extend(&fresh);
        self.groups_owned += new_groups;

        let mut blocks = BTreeMap::new();
        let mut pos = start;
        let mut scratch = Vec::new();

        // Directories whose entries changed (every new one among them).
        for &n in &w.order {
            if !tree.is_dir(n) {
                continue;
            }
            let bytes = ext4::dir_blocks(tree, n, w.parent[n as usize], |c| self.placed[c as usize].ino)?;
            let d = digest(&bytes);
            let p = &mut self.placed[n as usize];
            if p.content_digest != Some(d) {
                p.content = Run { start: pos, len: (bytes.len() / BS) as u64 };
                p.content_digest = Some(d);
                put_run(&mut blocks, pos, &bytes);
                pos += p.content.len;
            }
        }
        // Blocks of new nodes, and xattr blocks that changed (a directory's
        // attributes may be set again by a later layer).
        for &n in &w.order {
            let new = is_new[n as usize];
            let node = &tree.nodes[n as usize];
            if !new && !tree.is_dir(n) {
                continue;
            }
            let p = &mut self.placed[n as usize];
            if new {
                match &node.kind {
                    Kind::Symlink(t) if t.len() >= 60 => {
                        if t.len() >= BS {
                            return Err(Error::Format(format!("symlink target of {} bytes is too long", t.len())));
                        }
                        let mut b = t.clone();
                        b.resize(BS, 0);
                        p.content = Run { start: pos, len: 1 };
                        put_run(&mut blocks, pos, &b);
                        pos += 1;
                    }
                    Kind::File { start_block, size } => {
                        let extents = ext4::split_extents(&[(*start_block, size.div_ceil(BLOCK_SIZE))]);
                        let leaves = ext4::encode_extent_tree(&mut [0u8; 60], &extents, pos)?;
                        p.leaves = Run { start: pos, len: leaves.len() as u64 };
                        for leaf in leaves {
                            put_run(&mut blocks, pos, &leaf);
                            pos += 1;
                        }
                    }
                    _ => {}
                }
            }
            scratch.clear();
            let entries = ext4::xattr_entries(&node.meta, if new { &mut *warnings } else { &mut scratch });
            let block = if entries.is_empty() || ext4::encode_xattrs_inline(&entries).is_some() {
                None
            } else {
                Some(ext4::encode_xattr_block(&entries).ok_or_else(|| {
                    Error::Format(format!("extended attributes of {} bytes do not fit in one block", entries.iter().map(|e| e.2.len()).sum::<usize>()))
                })?)
            };
            p.xattr = match (block, p.xattr) {
                (None, _) => None,
                (Some(b), Some((at, d))) if d == digest(&b) => Some((at, d)),
                (Some(b), _) => {
                    let d = digest(&b);
                    put_run(&mut blocks, pos, &b);
                    pos += 1;
                    Some((pos - 1, d))
                }
            };
        }

        // Bitmaps: new copies of every bitmap whose contents changed (a new
        // inode group's, a block group that is now wholly below the region's
        // end, or one whose blocks or inodes a layer freed), then the new
        // groups' inode tables. Writing a copy frees the old one, which can
        // change another group's bitmap: repeat until nothing more changes.
        self.ibitmaps.resize(self.groups_owned as usize, None);
        let inode_bits = self.inode_bits();
        let mut ib: BTreeSet<u64> = (first_group..self.groups_owned).collect();
        let mut bb: BTreeSet<u64> = BTreeSet::new();
        loop {
            let ib_at = pos;
            let bb_at = ib_at + ib.len() as u64;
            let it_at = bb_at + bb.len() as u64;
            let end = (it_at + new_groups * ITABLE_BLOCKS).next_multiple_of(REGION_BLOCKS);
            let mut itables = self.itables.clone();
            itables.extend((0..new_groups).map(|i| it_at + i * ITABLE_BLOCKS));
            let ib_loc = |g: u64| ib.iter().position(|&x| x == g).map(|i| ib_at + i as u64).or(self.ibitmaps[g as usize].map(|c| c.block));
            let bb_loc =
                |b: u64| bb.iter().position(|&x| x == b).map(|i| bb_at + i as u64).or(self.bbitmaps.get(b as usize).copied().flatten().map(|c| c.block));
            let mut used = self.usage(tree, end);
            for g in 1..self.groups_owned {
                used.set_range(itables[g as usize], ITABLE_BLOCKS);
                if let Some(at) = ib_loc(g) {
                    used.set(at);
                }
            }
            for b in 1..end / BPG {
                if let Some(at) = bb_loc(b) {
                    used.set(at);
                }
            }
            let mut grew = false;
            for g in 1..self.groups_owned {
                let bytes = inode_bitmap(&inode_bits, g);
                if !ib.contains(&g) && self.ibitmaps[g as usize].is_none_or(|c| c.digest != digest(&bytes)) {
                    ib.insert(g);
                    grew = true;
                }
            }
            for b in 1..end / BPG {
                let bytes = block_bitmap(&used, b);
                if !bb.contains(&b) && self.bbitmaps.get(b as usize).copied().flatten().is_none_or(|c| c.digest != digest(&bytes)) {
                    bb.insert(b);
                    grew = true;
                }
            }
            if grew {
                continue;
            }
            for (i, &g) in ib.iter().enumerate() {
                let bytes = inode_bitmap(&inode_bits, g);
                self.ibitmaps[g as usize] = Some(Copy { block: ib_at + i as u64, digest: digest(&bytes) });
                put_run(&mut blocks, ib_at + i as u64, &bytes);
            }
            self.bbitmaps.resize((end / BPG) as usize, None);
            for (i, &b) in bb.iter().enumerate() {
                let bytes = block_bitmap(&used, b);
                self.bbitmaps[b as usize] = Some(Copy { block: bb_at + i as u64, digest: digest(&bytes) });
                put_run(&mut blocks, bb_at + i as u64, &bytes);
            }
            self.itables = itables;
            return Ok(Region { blocks, end, itables: Run { start: it_at, len: new_groups * ITABLE_BLOCKS } });
        }
    }

    /// Blocks below `end` in use by the tree's data and placed metadata (not
    /// counting bitmaps and inode tables, which the caller adds).
    fn usage(&self, tree: &Tree, end: u64) -> Bitmap {
        let mut used = Bitmap::new(end);
        for &n in &self.numbered {
            let p = &self.placed[n as usize];
            if let Kind::File { start_block, size } = tree.nodes[n as usize].kind {
                used.set_range(start_block, size.div_ceil(BLOCK_SIZE));
            }
            used.set_range(p.content.start, p.content.len);
            used.set_range(p.leaves.start, p.leaves.len);
            if let Some((at, _)) = p.xattr {
                used.set(at);
            }
        }
        used
    }

    /// One bit per inode of every owned group: in use or not.
    fn inode_bits(&self) -> Bitmap {
        let mut bits = Bitmap::new(self.groups_owned * IPG);
        bits.set_range(0, LOST_FOUND_INO as u64); // inodes 1..=11 (1..=10 are reserved)
        for &n in &self.numbered {
            bits.set(self.placed[n as usize].ino as u64 - 1);
        }
        bits
    }

    /// Writes what depends on the final size of the disk: the superblock,
    /// the group descriptors, group 0, the groups no layer owns, and every
    /// inode (into the inode tables held back until now).
    pub fn finish(mut self, tree: &Tree, data_end: u64, headroom_blocks: u64, seed: &[u8; 32]) -> Result<Finished, Error> {
        debug_assert!(data_end.is_multiple_of(REGION_BLOCKS));
        let w = walk(tree);
        // Geometry: enough groups for the headroom's inodes and blocks.
        let headroom_inodes = headroom_blocks * BLOCK_SIZE / 32768 + 64;
        let mut groups = self.groups_owned + headroom_inodes.div_ceil(IPG);
        let (gdt_blocks, slots, tail_end) = loop {
            let gdt_blocks = groups.div_ceil(DESCS_PER_BLOCK);
            if 1 + gdt_blocks + 2 > HEADER_ITABLE || groups * BPG > u32::MAX as u64 {
                return Err(Error::Format(format!("a disk of {groups} block groups is larger than supported")));
            }
            // Header slots: group 0's two bitmaps, then the bitmaps of the
            // lowest groups not wholly inside the layer regions.
            let slots = HEADER_ITABLE - 1 - gdt_blocks;
            // Groups from 1 up whose block bitmap was not written in a region.
            let floating = groups.saturating_sub((data_end / BPG).max(1));
            let tail = floating.saturating_sub(slots - 2) + (groups - self.groups_owned) * (1 + ITABLE_BLOCKS);
            let tail_end = data_end + tail;
            let want = ((tail_end + headroom_blocks).div_ceil(BPG)).max(self.groups_owned + headroom_inodes.div_ceil(IPG));
            if want == groups {
                break (gdt_blocks, slots, tail_end);
            }
            groups = want;
        };
        let total_blocks = groups * BPG;

        // Where every bitmap and inode table is.
        let mut bb_at = vec![0u64; groups as usize];
        let mut ib_at = vec![0u64; groups as usize];
        let mut it_at = vec![0u64; groups as usize];
        let mut header_slot = 1 + gdt_blocks;
        let mut tail = data_end;
        let mut take_header = |slots_left: &mut u64| {
            *slots_left -= 1;
            header_slot += 1;
            header_slot - 1
        };
        let mut left = slots;
        bb_at[0] = take_header(&mut left);
        ib_at[0] = take_header(&mut left);
        it_at[0] = HEADER_ITABLE;
        for b in 1..groups {
            bb_at[b as usize] = match self.bbitmaps.get(b as usize).copied().flatten() {
                Some(c) if (b + 1) * BPG <= data_end => c.block,
                _ if left > 0 => take_header(&mut left),
                _ => {
                    tail += 1;
                    tail - 1
                }
            };
        }
        // The groups no layer owns: their bitmaps (only padding, so chunks of
        // them repeat from version to version), then their empty tables.
        for g in 1..groups {
            ib_at[g as usize] = match self.ibitmaps.get(g as usize).copied().flatten() {
                Some(c) => c.block,
                None => {
                    tail += 1;
                    tail - 1
                }
            };
        }
        for g in 1..groups {
            it_at[g as usize] = match self.itables.get(g as usize) {
                Some(&at) => at,
                None => {
                    tail += ITABLE_BLOCKS;
                    tail - ITABLE_BLOCKS
                }
            };
        }
        debug_assert_eq!(tail, tail_end);

        let mut used = self.usage(tree, total_blocks);
        used.set_range(0, 1 + gdt_blocks);
        used.set_range(1 + gdt_blocks, header_slot - 1 - gdt_blocks);
        used.set_range(HEADER_ITABLE, ITABLE_BLOCKS);
        used.set_range(data_end, tail_end - data_end);
        for g in 0..groups as usize {
            used.set(bb_at[g]);
            used.set(ib_at[g]);
            used.set_range(it_at[g], ITABLE_BLOCKS);
        }
        // Regions' metadata that is still current: directory blocks etc. are
        // in `usage`; copies of bitmaps and inode tables are set above.

        let mut out: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut chunk0 = vec![0u8; REGION_BLOCKS as usize * BS];
        let inode_bits = self.inode_bits();

        // Bitmaps that float: group 0's, and those not yet written in a region.
        for b in 0..groups {
            let at = bb_at[b as usize];
            let bytes = block_bitmap(&used, b);
            match self.bbitmaps.get(b as usize).copied().flatten() {
                Some(c) if c.block == at => debug_assert!(c.digest == digest(&bytes), "block bitmap of group {b} went stale"),
                _ => put_block(&mut chunk0, &mut out, at, &bytes),
            }
        }
        let mut dirs_per_group = vec![0u32; groups as usize];
        for &n in &self.numbered {
            if tree.is_dir(n) {
                dirs_per_group[((self.placed[n as usize].ino as u64 - 1) / IPG) as usize] += 1;
            }
        }
        let inodes_in_group = |g: u64| if g < self.groups_owned { (0..IPG).filter(|&i| inode_bits.get(g * IPG + i)).count() as u64 } else { 0 };
        put_block(&mut chunk0, &mut out, ib_at[0], &inode_bitmap(&inode_bits, 0));
        for g in self.groups_owned..groups {
            put_block(&mut chunk0, &mut out, ib_at[g as usize], &inode_bitmap(&inode_bits, g));
        }

        // Inodes, into group 0's table in chunk 0 and the held chunks.
        for &n in &self.numbered {
            let node = &tree.nodes[n as usize];
            let p = &self.placed[n as usize];
            let mut raw = [0u8; INODE_SIZE];
            let mut runs: Vec<(u64, u64)> = Vec::new();
            let mut size = 0u64;
            if let Kind::File { start_block, size: s } = node.kind {
                if s > 0 {
                    runs.push((start_block, s.div_ceil(BLOCK_SIZE)));
                }
            }
            if p.content.len > 0 {
                runs.push((p.content.start, p.content.len));
                size = p.content.len * BLOCK_SIZE;
            }
            let uses_extents = matches!(node.kind, Kind::File { .. } | Kind::Dir(_)) || p.content.len > 0;
            let mut blocks = runs.iter().map(|r| r.1).sum::<u64>();
            if uses_extents {
                let extents = ext4::split_extents(&runs);
                let leaves = ext4::encode_extent_tree(&mut raw[0x28..0x64], &extents, p.leaves.start)?;
                debug_assert_eq!(leaves.len() as u64, p.leaves.len);
                blocks += p.leaves.len;
            }
            let mut scratch = Vec::new();
            let entries = ext4::xattr_entries(&node.meta, &mut scratch);
            let inline = if entries.is_empty() { None } else { ext4::encode_xattrs_inline(&entries) };
            if let Some((at, _)) = p.xattr {
                ext4::put_u32(&mut raw, 0x68, at as u32);
                blocks += 1;
            }
            let links = if tree.is_dir(n) { w.links[n as usize] } else { w.links[n as usize].max(1) };
            ext4::encode_inode(&mut raw, node, links, size, inline.as_deref(), uses_extents, blocks);
            let ino = p.ino as u64;
            let g = (ino - 1) / IPG;
            let at = it_at[g as usize] * BLOCK_SIZE + ((ino - 1) % IPG) * INODE_SIZE as u64;
            let target = if g == 0 { &mut chunk0 } else { self.held.get_mut(&(at / BLOCK_SIZE / REGION_BLOCKS)).expect("inode tables sit in held chunks") };
            let off = (at % (REGION_BLOCKS * BLOCK_SIZE)) as usize;
            target[off..off + INODE_SIZE].copy_from_slice(&raw);
        }

        // Group descriptors and the superblock.
        let mut free_blocks_total = 0u64;
        let mut free_inodes_total = 0u64;
        for g in 0..groups {
            let first = g * BPG;
            let free_b = (first..first + BPG).filter(|&b| !used.get(b)).count() as u64;
            let free_i = IPG - inodes_in_group(g);
            let d = &mut chunk0[BS + (g * 32) as usize..BS + (g * 32 + 32) as usize];
            ext4::put_u32(d, 0x0, bb_at[g as usize] as u32);
            ext4::put_u32(d, 0x4, ib_at[g as usize] as u32);
            ext4::put_u32(d, 0x8, it_at[g as usize] as u32);
            ext4::put_u16(d, 0xC, free_b as u16);
            ext4::put_u16(d, 0xE, free_i as u16);
            ext4::put_u16(d, 0x10, dirs_per_group[g as usize] as u16);
            free_blocks_total += free_b;
            free_inodes_total += free_i;
        }
        let inodes_total = groups * IPG;
        ext4::encode_superblock(
            &mut chunk0[1024..2048],
            &ext4::Super { total_blocks, free_blocks_total, inodes_total, free_inodes_total, ipg: IPG, bpg: BPG, seed },
        );

        let mut chunks = std::mem::take(&mut self.held);
        chunks.insert(0, chunk0);
        for (block, bytes) in out {
            let chunk = chunks.entry(block / REGION_BLOCKS).or_insert_with(|| vec![0u8; REGION_BLOCKS as usize * BS]);
            let off = ((block % REGION_BLOCKS) * BLOCK_SIZE) as usize;
            chunk[off..off + BS].copy_from_slice(&bytes);
        }
        let inodes_used = LOST_FOUND_INO as u64 - 1 + self.numbered.len() as u64 - 1;
        Ok(Finished { chunks, total_blocks, inodes_used, inodes_total })
    }
}

/// Puts a non-zero block into chunk 0 or, past it, into `out`.
fn put_block(chunk0: &mut [u8], out: &mut BTreeMap<u64, Vec<u8>>, block: u64, bytes: &[u8]) {
    if block < REGION_BLOCKS {
        let off = block as usize * BS;
        chunk0[off..off + BS].copy_from_slice(bytes);
    } else if bytes.iter().any(|&b| b != 0) {
        out.insert(block, bytes.to_vec());
    }
}

/// Splits `bytes` into blocks from `at` on, keeping the non-zero ones.
fn put_run(out: &mut BTreeMap<u64, Vec<u8>>, at: u64, bytes: &[u8]) {
    for (i, b) in bytes.chunks(BS).enumerate() {
        if b.iter().any(|&x| x != 0) {
            out.insert(at + i as u64, b.to_vec());
        }
    }
}

/// The block bitmap of group `b`: one bit per block.
fn block_bitmap(used: &Bitmap, b: u64) -> Vec<u8> {
    bitmap_block(used, b, BPG)
}

/// The inode bitmap of group `g` (only padding for a group no layer owns).
fn inode_bitmap(bits: &Bitmap, g: u64) -> Vec<u8> {
    bitmap_block(bits, g, IPG)
}

/// Bits `group * per .. (group + 1) * per` of `bits` as one block, with the
/// padding past them set (as e2fsck wants it).
fn bitmap_block(bits: &Bitmap, group: u64, per: u64) -> Vec<u8> {
    let mut out = vec![0u8; BS];
    out[(per / 8) as usize..].fill(0xFF);
    for i in 0..per {
        if bits.get(group * per + i) {
            out[(i / 8) as usize] |= 1 << (i % 8);
        }
    }
    out
}
