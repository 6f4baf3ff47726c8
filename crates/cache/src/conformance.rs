//! The shared suite of the [`ChunkSource`] contract. Each implementation's
//! tests give it a [`Fixture`]: a fresh source and the hooks to fill it, to
//! damage what it holds, and (where it can be) to make it slow. Built for
//! tests only (`cfg(test)` or the `testing` feature).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_chunk::{check_id, ChunkId};

use crate::{Bytes, ChunkSource, FetchContext};

/// A source under test, and how to act on it from outside.
pub trait Fixture {
    /// The source (one instance for the whole run).
    fn source(&self) -> Arc<dyn ChunkSource>;
    /// Makes the source hold `sealed` under `id`, as its backend would.
    fn hold(&self, id: &ChunkId, sealed: &[u8]);
    /// Damages the copy of `id` the source holds (bit rot, a lying node);
    /// false if this source cannot be damaged from outside. A source may
    /// outvote the damage and still serve the good chunk.
    fn damage(&self, id: &ChunkId) -> bool;
    /// Whether the source keeps what it is offered.
    fn keeps_offers(&self) -> bool;
    /// A second source over the same contents whose every fetch takes
    /// `delay`, if the backend can be slowed.
    fn slow(&self, _delay: Duration) -> Option<Arc<dyn ChunkSource>> {
        None
    }
}

/// Sealed-chunk-sized blobs, distinct per `seed`, named by their hash.
fn chunks(seed: u8, n: usize) -> Vec<(ChunkId, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let b: Vec<u8> = (0..tessera_chunk::SEALED_CHUNK_SIZE as u32).map(|j| (j as u8) ^ seed ^ (i as u8).wrapping_mul(31) ^ (j >> 9) as u8).collect();
            (ChunkId::of(&b), b)
        })
        .collect()
}

/// Runs every check; panics (as a test does) on the first failure.
pub fn run(f: &dyn Fixture) {
    let source = f.source();
    let ctx = FetchContext::image("conformance");
    let what = format!("{:?}", source.tier());

    // Present and absent.
    let held = chunks(1, 6);
    for (id, b) in &held {
        f.hold(id, b);
    }
    for (id, b) in &held {
        let got = source.fetch(id, &ctx).expect("a fetch succeeds");
        assert!(got.as_deref() == Some(&b[..]), "{what}: returns exactly what it holds (got {:?} bytes)", got.map(|g| g.len()));
    }
    assert!(source.fetch(&ChunkId([0xEE; 32]), &ctx).expect("a fetch of an absent chunk is not an error").is_none(), "{what}: absent is None");

    // Many threads at once, on the same and on different chunks.
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let (source, ctx) = (Arc::clone(&source), ctx.clone());
            let (id, b) = held[i % 3].clone();
            std::thread::spawn(move || assert!(source.fetch(&id, &ctx).unwrap().as_deref() == Some(&b[..])))
        })
        .collect();
    for t in threads {
        t.join().expect("no panic");
    }

    // Offers: a caching source keeps them.
    let offered = chunks(2, 2);
    for (id, b) in &offered {
        source.offer(id, &Bytes::copy_from_slice(b), &ctx);
    }
    source.drain();
    if f.keeps_offers() {
        for (id, b) in &offered {
            assert!(source.fetch(id, &ctx).unwrap().as_deref() == Some(&b[..]), "{what}: keeps what it is offered");
        }
    }

    // A damaged copy is never passed off as good: the source returns
    // nothing, or bytes that fail the id check; once told to forget it, a
    // caching source does not return the damaged copy again (the origin
    // has nothing else to give).
    let (victim, good) = &held[4];
    if f.damage(victim) {
        match source.fetch(victim, &ctx) {
            // A source that can outvote the damage (the tier) serves the
            // good chunk; any other returns the damage, for the caller.
            Ok(Some(b)) if b[..] == good[..] => {}
            Ok(Some(b)) => {
                assert!(check_id(victim, &b).is_err(), "{what}: a damaged copy is returned as stored, for the caller to catch");
                source.forget(victim);
                let again = source.fetch(victim, &ctx).expect("a fetch after forget succeeds");
                if let (Some(again), true) = (again, f.keeps_offers()) {
                    assert!(check_id(victim, &again).is_ok(), "{what}: forgot the damaged copy or found a good one");
                }
            }
            Ok(None) => {}
            Err(e) => panic!("{what}: a damaged copy is not a source error: {e}"),
        }
    }

    // One slow fetch does not hold the others up.
    let delay = Duration::from_millis(200);
    if let Some(slow) = f.slow(delay) {
        let started = Instant::now();
        let threads: Vec<_> = held[..4]
            .iter()
            .cloned()
            .map(|(id, b)| {
                let (slow, ctx) = (Arc::clone(&slow), ctx.clone());
                std::thread::spawn(move || assert!(slow.fetch(&id, &ctx).unwrap().as_deref() == Some(&b[..])))
            })
            .collect();
        for t in threads {
            t.join().expect("no panic");
        }
        let took = started.elapsed();
        assert!(took >= delay, "{what}: the slow source was slow");
        assert!(took < delay * 3, "{what}: 4 slow fetches at once took {took:?}, as if one after another");
    }
}
