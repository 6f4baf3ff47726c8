//! The shared suite of the [`ChunkSource`] contract.

use std::sync::Arc;

use tessera_chunk::ChunkId;

use crate::ChunkSource;

/// Checks `source`, which must hold `present` (sealed bytes under their id)
/// and not hold `absent`.
pub fn run(source: Arc<dyn ChunkSource>, present: &[(ChunkId, Vec<u8>)], absent: ChunkId) {
    for (id, bytes) in present {
        assert_eq!(source.fetch(id).expect("fetch succeeds").as_deref(), Some(bytes.as_slice()), "{:?} returns what was stored", source.tier());
    }
    assert!(source.fetch(&absent).expect("fetch of an absent chunk is not an error").is_none());
    // Many threads at once.
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let source = Arc::clone(&source);
            let (id, bytes) = present[i % present.len()].clone();
            std::thread::spawn(move || assert_eq!(source.fetch(&id).unwrap(), Some(bytes)))
        })
        .collect();
    for t in threads {
        t.join().expect("no panic");
    }
}
