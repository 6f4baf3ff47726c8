//! The tar/layer reader: any bytes as a layer, applied twice, then finished.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_flatten::{ChunkSink, Flattener, Options, SinkError};

struct Discard;

impl ChunkSink for Discard {
    fn put_chunk(&mut self, _index: u64, _data: Vec<u8>) -> Result<(), SinkError> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut sink = Discard;
    let mut f = Flattener::new(Options { headroom_bytes: 0, seed: [0; 32] }, &mut sink);
    if f.apply_layer("layer 1", data).is_ok() && f.apply_layer("layer 2", data).is_ok() {
        let _ = f.finish();
    }
});
