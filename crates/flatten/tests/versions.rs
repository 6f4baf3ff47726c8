//! Property tests of the version-friendly layout: adding a layer to a stack
//! keeps every chunk of the stack below it, except chunk 0 and the blocks of
//! lower inode tables the new layer changed; and a layer that only adds
//! under a new top-level directory changes nothing below it but chunk 0.

mod common;

use std::collections::BTreeMap;

use common::Layer;
use proptest::prelude::*;
use tessera_flatten::{ChunkSink, FlatImage, Flattener, Options, SinkError, CHUNK_BYTES};

/// Keeps the chunks handed over, by index.
#[derive(Default)]
struct Chunks(BTreeMap<u64, Vec<u8>>);

impl ChunkSink for Chunks {
    fn put_chunk(&mut self, index: u64, data: Vec<u8>) -> Result<(), SinkError> {
        assert!(self.0.insert(index, data).is_none(), "chunk {index} handed over twice");
        Ok(())
    }
}

fn flatten(layers: &[Vec<u8>]) -> (FlatImage, Chunks) {
    let mut sink = Chunks::default();
    let mut f = Flattener::new(Options { headroom_bytes: 8 << 20, seed: [3; 32], ..Options::default() }, &mut sink);
    for (i, l) in layers.iter().enumerate() {
        f.apply_layer(&format!("layer {}", i + 1), l.as_slice()).unwrap();
    }
    let img = f.finish().unwrap();
    (img, sink)
}

fn chunk(c: &Chunks, i: u64) -> &[u8] {
    static ZERO: [u8; CHUNK_BYTES] = [0; CHUNK_BYTES];
    c.0.get(&i).map(Vec::as_slice).unwrap_or(&ZERO)
}

fn u32_at(b: &[u8], at: usize) -> u64 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as u64
}

/// Chunks that hold part of an inode table, from the group descriptors.
fn itable_chunks(c: &Chunks) -> Vec<u64> {
    let c0 = chunk(c, 0);
    let sb = &c0[1024..2048];
    let (blocks, bpg, ipg) = (u32_at(sb, 4), u32_at(sb, 0x20), u32_at(sb, 0x28));
    let per_chunk = CHUNK_BYTES as u64 / 4096;
    let mut out = Vec::new();
    for g in 0..blocks.div_ceil(bpg) as usize {
        let start = u32_at(c0, 4096 + g * 32 + 8);
        let end = start + ipg * 256 / 4096;
        out.extend(start / per_chunk..end.div_ceil(per_chunk));
    }
    out
}

/// A path of 1 to 3 components from a small alphabet (so layers collide).
fn path() -> impl Strategy<Value = String> {
    proptest::collection::vec(prop_oneof!["a", "b", "c", "d"], 1..4).prop_map(|v| v.join("/"))
}

#[derive(Clone, Debug)]
enum Op {
    File(String, u32),
    Dir(String),
    Link(String, String),
    Whiteout(String),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (path(), prop_oneof![0..5000u32, 300_000..700_000u32]).prop_map(|(p, s)| Op::File(p, s)),
        1 => path().prop_map(Op::Dir),
        1 => (path(), path()).prop_map(|(p, t)| Op::Link(p, t)),
        1 => path().prop_map(Op::Whiteout),
    ]
}

/// Builds a layer; entries that would fail (a parent that is a file, a link
/// to nothing) are left out by flattening the layer alone first.
fn layer(ops: &[Op], under: &str, seed: u32) -> Vec<u8> {
    let mut l = Layer::new();
    let mut files: Vec<String> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let at = |p: &str| format!("{under}{p}");
        l = match op {
            Op::File(p, size) if !files.iter().any(|f| at(p).starts_with(&format!("{f}/"))) => {
                files.push(at(p));
                let data: Vec<u8> = (0..*size).map(|j| (j as u8) ^ (i as u8).wrapping_add(seed as u8)).collect();
                l.file(&at(p), &data)
            }
            Op::Dir(p) if !files.iter().any(|f| at(p).starts_with(f.as_str())) => l.dir(&at(p), 0o755),
            Op::Link(p, t) if files.contains(&at(t)) && !files.iter().any(|f| at(p).starts_with(f.as_str())) => {
                files.push(at(p));
                l.hardlink(&at(p), &at(t))
            }
            Op::Whiteout(p) => {
                let p = at(p);
                let (dir, name) = p.rsplit_once('/').unwrap_or(("", &p));
                l.whiteout(dir, name)
            }
            _ => l,
        };
    }
    l.build()
}

fn applies(layers: &[Vec<u8>]) -> bool {
    let mut sink = Chunks::default();
    let mut f = Flattener::new(Options { headroom_bytes: 0, seed: [0; 32], ..Options::default() }, &mut sink);
    layers.iter().all(|l| f.apply_layer("probe", l.as_slice()).is_ok())
}

/// The stack flattened alone and with `top` on it (its paths under `under`),
/// or `None` when either does not apply.
fn below_and_above(stack: &[Vec<Op>], top: &[Op], under: &str) -> Option<((FlatImage, Chunks), (FlatImage, Chunks))> {
    let mut layers: Vec<Vec<u8>> = stack.iter().enumerate().map(|(i, ops)| layer(ops, "", i as u32)).collect();
    let below = applies(&layers).then(|| flatten(&layers))?;
    layers.push(layer(top, under, 99));
    Some((below, applies(&layers).then(|| flatten(&layers))?))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn a_new_layer_changes_only_chunk_0_inode_tables_and_its_own_region(
        stack in proptest::collection::vec(proptest::collection::vec(op(), 1..10), 1..4),
        top in proptest::collection::vec(op(), 1..10),
    ) {
        let flattened = below_and_above(&stack, &top, "");
        prop_assume!(flattened.is_some());
        let ((below, below_chunks), (above, above_chunks)) = flattened.unwrap();

        let start = above.layer_regions.last().unwrap().0;
        prop_assert_eq!(start, below.metadata_chunk, "the new region starts where the stack ended");
        let tables = itable_chunks(&above_chunks);
        for i in 1..start {
            if chunk(&below_chunks, i) != chunk(&above_chunks, i) {
                prop_assert!(tables.contains(&i), "chunk {} changed and holds no inode table", i);
            }
        }
    }

    #[test]
    fn a_layer_under_a_new_directory_changes_nothing_below_it_but_chunk_0(
        stack in proptest::collection::vec(proptest::collection::vec(op(), 1..10), 1..4),
        top in proptest::collection::vec(op(), 1..10),
    ) {
        // Whiteouts and links under a new directory touch nothing below.
        let flattened = below_and_above(&stack, &top, "app/");
        prop_assume!(flattened.is_some());
        let ((below, below_chunks), (_, above_chunks)) = flattened.unwrap();
        for i in 1..below.metadata_chunk {
            prop_assert!(chunk(&below_chunks, i) == chunk(&above_chunks, i), "chunk {} changed", i);
        }
    }
}
