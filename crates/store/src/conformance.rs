//! The shared test suites of the seams: every [`ChunkStore`] backend's
//! tests call [`run`] (and [`run_concurrent`]) on a fresh, empty store, and
//! every [`Catalog`]'s call [`run_catalog`] on a fresh, empty catalog.
//! Built for tests only (`cfg(test)` or the `testing` feature).

use std::sync::Arc;

use tessera_chunk::{ChunkId, DataKey, KeyProvider, SealedManifest, WrappedKey};

use crate::{check_name, Catalog, ChunkStore, Error, ImageRef, Put};

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
    assert_eq!(&store.get(&id).expect("get after concurrent puts")[..], &bytes[..]);
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
    assert_eq!(&store.get(&id).unwrap()[..], &bytes[..]);
    assert!(store.delete(&id).unwrap());
    assert!(!store.exists(&id).unwrap());
    assert!(!store.delete(&id).unwrap(), "deleting an absent chunk is not an error");
}

fn put_if_absent(store: &dyn ChunkStore) {
    let (id, bytes) = chunk(2);
    assert_eq!(store.put(&id, &bytes).unwrap(), Put::Created);
    // A second put with other bytes must not replace the first.
    assert_eq!(store.put(&id, b"other").unwrap(), Put::AlreadyPresent);
    assert_eq!(&store.get(&id).unwrap()[..], &bytes[..]);
}

fn absent_ids(store: &dyn ChunkStore) {
    let id = ChunkId([0xAB; 32]);
    assert!(matches!(store.get(&id), Err(Error::NotFound(x)) if x == id));
}

fn list_sees_every_put(store: &dyn ChunkStore) {
    let ids: Vec<ChunkId> = (10..30)
        .map(|n| {
            let (id, bytes) = chunk(n);
            store.put(&id, &bytes).unwrap();
            id
        })
        .collect();
    let listed = store.list().unwrap();
    for id in ids {
        assert!(listed.contains(&id), "list is missing {id}");
    }
}

fn large_chunks_round_trip(store: &dyn ChunkStore) {
    let bytes: Vec<u8> = (0..(512 * 1024 + 16) as u32).map(|i| (i ^ (i >> 8)) as u8).collect();
    let id = ChunkId::of(&bytes);
    store.put(&id, &bytes).unwrap();
    assert_eq!(&store.get(&id).unwrap()[..], &bytes[..]);
}

fn batches(store: &dyn ChunkStore) {
    let (present, bytes) = chunk(40);
    store.put(&present, &bytes).unwrap();
    let batch = store.batch();
    batch.put(&present, &bytes).unwrap();
    let (a, a_bytes) = chunk(41);
    batch.put(&a, &a_bytes).unwrap();
    batch.put(&a, &a_bytes).unwrap();
    let committed = batch.commit().unwrap();
    assert_eq!(committed, crate::Committed { new_chunks: 1, new_bytes: a_bytes.len() as u64 }, "present chunks and repeats are not new");
    assert_eq!(&store.get(&a).unwrap()[..], &a_bytes[..]);
    // A batch dropped without commit leaves no partial chunk.
    let (b, b_bytes) = chunk(42);
    let batch = store.batch();
    batch.put(&b, &b_bytes).unwrap();
    drop(batch);
    if store.exists(&b).unwrap() {
        assert_eq!(&store.get(&b).unwrap()[..], &b_bytes[..]);
    }
}

/// A key provider for the suite: one fixed tenant key.
struct FixedKey;

impl KeyProvider for FixedKey {
    fn wrap(&self, _tenant: &str, key: &DataKey) -> tessera_chunk::Result<WrappedKey> {
        Ok(WrappedKey(key.as_bytes().to_vec()))
    }
    fn unwrap(&self, _tenant: &str, wrapped: &WrappedKey) -> tessera_chunk::Result<DataKey> {
        Ok(DataKey::from_bytes(wrapped.0.clone().try_into().expect("32 bytes")))
    }
}

fn sealed_manifest(n: u64) -> SealedManifest {
    let m = tessera_chunk::Manifest {
        format: tessera_chunk::MANIFEST_FORMAT,
        source: Default::default(),
        config: Default::default(),
        geometry: Default::default(),
        salt_id: "suite".into(),
        imported_at: n,
        chunks: Vec::new(),
    };
    m.seal("t", &FixedKey).expect("a manifest seals")
}

/// Checks a fresh, empty catalog against the [`Catalog`] contract; panics
/// (as a test does) on the first failure.
pub fn run_catalog(catalog: &dyn Catalog) {
    // Empty.
    assert!(catalog.list().unwrap().images.is_empty());
    assert!(!catalog.has_manifests().unwrap());
    assert!(matches!(catalog.get("none"), Err(Error::NoSuchImage(_))));
    assert!(matches!(catalog.remove("none"), Err(Error::NoSuchImage(_))));
    // Manifests are stored under the hash of their bytes and checked.
    let (m1, m2) = (sealed_manifest(1), sealed_manifest(2));
    let id1 = catalog.put_manifest(&m1).unwrap();
    assert_eq!(id1, ChunkId::of(&m1.to_bytes()));
    assert_eq!(catalog.get_manifest(&id1.to_hex()).unwrap().to_bytes(), m1.to_bytes());
    assert!(catalog.has_manifests().unwrap());
    assert!(catalog.get_manifest(&"00".repeat(32)).is_err());
    assert!(matches!(catalog.get_manifest("../../etc/passwd"), Err(Error::Corrupt { .. })));
    let id2 = catalog.put_manifest(&m2).unwrap();
    // Profiles sit beside their manifest.
    assert!(catalog.get_profile(&id1.to_hex()).unwrap().is_none());
    catalog.put_profile(&id1.to_hex(), &m2).unwrap();
    assert_eq!(catalog.get_profile(&id1.to_hex()).unwrap().unwrap().to_bytes(), m2.to_bytes());
    // Names point at manifests, are replaced whole, and list sorted.
    let (r1, r2) = (ImageRef { manifest: id1.to_hex(), tenant: "t".into() }, ImageRef { manifest: id2.to_hex(), tenant: "t".into() });
    assert_eq!(catalog.set("b-image", &r1).unwrap(), None);
    assert_eq!(catalog.set("a-image", &r1).unwrap(), None);
    assert_eq!(catalog.get("a-image").unwrap(), r1);
    assert_eq!(catalog.set("a-image", &r2).unwrap(), Some(r1.clone()), "a set says what it replaced");
    assert_eq!(catalog.get("a-image").unwrap(), r2);
    let listing = catalog.list().unwrap();
    assert_eq!(listing.images, vec![("a-image".to_owned(), r2.clone()), ("b-image".to_owned(), r1.clone())]);
    assert!(listing.bad.is_empty());
    for bad in ["../x", "a/b", ""] {
        assert!(check_name(bad).is_err());
        assert!(catalog.set(bad, &r1).is_err(), "{bad:?} is refused as a name");
    }
    // Releasing keeps what a name uses and removes what none does.
    assert_eq!(catalog.release_manifest(&id1.to_hex()).unwrap(), crate::Release::InUse);
    assert_eq!(catalog.remove("b-image").unwrap(), Some(r1));
    assert_eq!(catalog.release_manifest(&id1.to_hex()).unwrap(), crate::Release::Removed);
    assert!(catalog.get_manifest(&id1.to_hex()).is_err());
    assert!(catalog.get_profile(&id1.to_hex()).unwrap().is_none(), "the profile goes with its manifest");
    assert_eq!(catalog.remove("a-image").unwrap(), Some(r2));
    assert!(catalog.list().unwrap().images.is_empty());
}

/// Checks that setters racing for one name are each told a distinct
/// previous value: every value set is replaced exactly once, or is last.
pub fn run_catalog_races(catalog: Arc<dyn Catalog>) {
    let threads: Vec<_> = (0..8u8)
        .map(|i| {
            let catalog = Arc::clone(&catalog);
            std::thread::spawn(move || {
                let mine = ImageRef { manifest: format!("{:02x}", i).repeat(32), tenant: "t".into() };
                let replaced = catalog.set("raced", &mine).expect("a racing set succeeds");
                (mine, replaced)
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().expect("no panic")).collect();
    let last = catalog.get("raced").unwrap();
    let mut replaced: Vec<String> = results.iter().filter_map(|(_, r)| r.as_ref().map(|r| r.manifest.clone())).collect();
    replaced.push(last.manifest.clone());
    replaced.sort();
    let mut set: Vec<String> = results.iter().map(|(m, _)| m.manifest.clone()).collect();
    set.sort();
    assert_eq!(replaced, set, "each value set was replaced exactly once, or is the last");
    assert_eq!(results.iter().filter(|(_, r)| r.is_none()).count(), 1, "exactly one setter found the name new");
    catalog.remove("raced").unwrap();
}
