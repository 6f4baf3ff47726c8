//! The shared test suite of the [`ChunkStore`] contract. Every backend's
//! tests call [`run`] on a fresh, empty store.

use std::sync::Arc;

use tessera_chunk::ChunkId;

use crate::{ChunkStore, Error, Put};

/// Runs every check; panics (as a test does) on the first failure.
pub fn run(store: &dyn ChunkStore) {
    put_get_exists_delete(store);
    put_if_absent(store);
    absent_ids(store);
    list_sees_every_put(store);
    large_chunks_round_trip(store);
    batches(store);
    store.sync().expect("sync succeeds");
}

/// Runs the concurrency check; needs an owned, shareable store.
pub fn run_concurrent(store: Arc<dyn ChunkStore>) {
    let bytes: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
    let id = ChunkId::of(&bytes);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let store = Arc::clone(&store);
            let bytes = bytes.clone();
            std::thread::spawn(move || store.put(&id, &bytes).expect("concurrent put succeeds"))
        })
        .collect();
    let created = threads.into_iter().map(|t| t.join().expect("no panic")).filter(|p| *p == Put::Created).count();
    assert!(created >= 1, "at least one concurrent put reports Created");
    assert_eq!(store.get(&id).expect("get after concurrent puts"), bytes);
}

fn chunk(n: u32) -> (ChunkId, Vec<u8>) {
    let bytes = format!("chunk number {n}").into_bytes();
    (ChunkId::of(&bytes), bytes)
}

fn put_get_exists_delete(store: &dyn ChunkStore) {
    let (id, bytes) = chunk(1);
    assert!(!store.exists(&id).unwrap());
    assert_eq!(store.put(&id, &bytes).unwrap(), Put::Created);
    assert!(store.exists(&id).unwrap());
    assert_eq!(store.get(&id).unwrap(), bytes);
    assert!(store.delete(&id).unwrap());
    assert!(!store.exists(&id).unwrap());
    assert!(!store.delete(&id).unwrap(), "deleting an absent chunk is not an error");
}

fn put_if_absent(store: &dyn ChunkStore) {
    let (id, bytes) = chunk(2);
    assert_eq!(store.put(&id, &bytes).unwrap(), Put::Created);
    // A second put with other bytes must not replace the first.
    assert_eq!(store.put(&id, b"other").unwrap(), Put::AlreadyPresent);
    assert_eq!(store.get(&id).unwrap(), bytes);
}

fn absent_ids(store: &dyn ChunkStore) {
    let id = ChunkId([0xAB; 32]);
    assert!(matches!(store.get(&id), Err(Error::NotFound(x)) if x == id));
}

fn list_sees_every_put(store: &dyn ChunkStore) {
    let ids: Vec<ChunkId> = (10..30).map(|n| {
        let (id, bytes) = chunk(n);
        store.put(&id, &bytes).unwrap();
        id
    }).collect();
    let listed = store.list().unwrap();
    for id in ids {
        assert!(listed.contains(&id), "list is missing {id}");
    }
}

fn large_chunks_round_trip(store: &dyn ChunkStore) {
    let bytes: Vec<u8> = (0..(512 * 1024 + 16) as u32).map(|i| (i ^ (i >> 8)) as u8).collect();
    let id = ChunkId::of(&bytes);
    store.put(&id, &bytes).unwrap();
    assert_eq!(store.get(&id).unwrap(), bytes);
}

fn batches(store: &dyn ChunkStore) {
    let (present, bytes) = chunk(40);
    store.put(&present, &bytes).unwrap();
    let batch = store.batch();
    assert_eq!(batch.put(&present, &bytes).unwrap(), Put::AlreadyPresent);
    let (a, a_bytes) = chunk(41);
    assert_eq!(batch.put(&a, &a_bytes).unwrap(), Put::Created);
    assert_eq!(batch.put(&a, &a_bytes).unwrap(), Put::AlreadyPresent, "a batch knows its own puts");
    batch.commit().unwrap();
    assert_eq!(store.get(&a).unwrap(), a_bytes);
    // A batch dropped without commit leaves no partial chunk.
    let (b, b_bytes) = chunk(42);
    let batch = store.batch();
    batch.put(&b, &b_bytes).unwrap();
    drop(batch);
    if store.exists(&b).unwrap() {
        assert_eq!(store.get(&b).unwrap(), b_bytes);
    }
}
