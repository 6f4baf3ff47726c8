//! Damaged layer tars are errors, never panics (the fuzz target
//! `fuzz/fuzz_targets/layer_tar.rs` explores the same ground further).

mod common;

use common::Layer;
use proptest::prelude::*;
use tessera_flatten::{ChunkSink, Flattener, Options, SinkError};

struct Discard;

impl ChunkSink for Discard {
    fn put_chunk(&mut self, _index: u64, _data: Vec<u8>) -> Result<(), SinkError> {
        Ok(())
    }
}

fn sample() -> Vec<u8> {
    Layer::new()
        .dir("etc", 0o755)
        .file("etc/a", &[1u8; 3000])
        .symlink("etc/l", "a")
        .hardlink("etc/h", "etc/a")
        .xattr_file("x", b"data", &[("user.k", b"v")])
        .whiteout("etc", "gone")
        .build()
}

fn flatten(bytes: &[u8]) {
    let mut sink = Discard;
    let mut f = Flattener::new(Options { headroom_bytes: 0, seed: [0; 32], ..Options::default() }, &mut sink);
    if f.apply_layer("layer 1", bytes).is_ok() {
        let _ = f.apply_layer("layer 2", bytes);
        let _ = f.finish();
    }
}

proptest! {
    #[test]
    fn mutated_tars_never_panic(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16), cut in any::<prop::sample::Index>()) {
        let mut bytes = sample();
        for (at, v) in flips {
            let i = at.index(bytes.len());
            bytes[i] = v;
        }
        flatten(&bytes);
        let keep = cut.index(bytes.len());
        flatten(&bytes[..keep]);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        flatten(&bytes);
    }
}
