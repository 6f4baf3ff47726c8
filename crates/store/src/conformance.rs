//! The shared test suites of the seams: every [`ChunkStore`] backend's
//! tests call [`run`] (and [`run_concurrent`]) on a fresh, empty store,
//! every [`Catalog`]'s call [`run_catalog`] on a fresh, empty catalog, and
//! every [`Control`]'s call [`run_control`].
//! Built for tests only (`cfg(test)` or the `testing` feature).

use std::sync::Arc;

use tessera_chunk::{ChunkId, DataKey, KeyContext, KeyProvider, SealedManifest, WrappedKey};

use crate::{check_name, Catalog, ChunkStore, Control, Error, ImageRef, Put};

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
    let len = a_bytes.len() as u64;
    assert_eq!(committed, crate::Committed { new: vec![(a, len)] }, "present chunks and repeats are not new");
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
    fn wrap(&self, _ctx: &KeyContext, key: &DataKey) -> tessera_chunk::Result<WrappedKey> {
        Ok(WrappedKey(key.as_bytes().to_vec()))
    }
    fn unwrap(&self, _ctx: &KeyContext, wrapped: &WrappedKey) -> tessera_chunk::Result<DataKey> {
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
        salt_epoch: 0,
        dedup_scope: Default::default(),
        imported_at: n,
        chunks: Vec::new(),
    };
    m.seal("t", "suite", &FixedKey).expect("a manifest seals")
}

/// Checks a fresh, empty catalog against the [`Catalog`] contract; panics
/// (as a test does) on the first failure.
pub fn run_catalog(catalog: &dyn Catalog) {
    // Empty.
    assert!(catalog.list().unwrap().images.is_empty());
    assert!(!catalog.has_manifests().unwrap());
    assert!(matches!(catalog.get("none"), Err(Error::NoSuchImage(_))));
    assert!(matches!(catalog.remove("none"), Err(Error::NoSuchImage(_))));
    // Manifests are stored under the hash of their bytes and checked,
    // with their refs.
    let (m1, m2) = (sealed_manifest(1), sealed_manifest(2));
    let refs = [ChunkId::of(b"one"), ChunkId::of(b"two")];
    let id1 = catalog.put_manifest(0, &m1, &refs).unwrap();
    assert_eq!(id1, ChunkId::of(&m1.to_bytes()));
    assert_eq!(catalog.get_manifest(0, &id1.to_hex()).unwrap().to_bytes(), m1.to_bytes());
    assert_eq!(catalog.get_refs(0, &id1.to_hex()).unwrap(), Some(refs.to_vec()));
    assert!(catalog.has_manifests().unwrap());
    assert!(catalog.get_manifest(0, &"00".repeat(32)).is_err());
    assert!(matches!(catalog.get_manifest(0, "../../etc/passwd"), Err(Error::Corrupt { .. })));
    assert!(matches!(catalog.get_refs(0, "../../etc/passwd"), Err(Error::Corrupt { .. })));
    let id2 = catalog.put_manifest(0, &m2, &[]).unwrap();
    // Profiles sit beside their manifest.
    assert!(catalog.get_profile(0, &id1.to_hex()).unwrap().is_none());
    catalog.put_profile(0, &id1.to_hex(), &m2).unwrap();
    assert_eq!(catalog.get_profile(0, &id1.to_hex()).unwrap().unwrap().to_bytes(), m2.to_bytes());
    // Generations are apart; a copy brings manifest, refs and profile.
    assert!(catalog.get_manifest(7, &id1.to_hex()).is_err());
    assert_eq!(catalog.get_refs(7, &id1.to_hex()).unwrap(), None);
    catalog.copy_manifest(&id1.to_hex(), &refs, 0, 7).unwrap();
    assert_eq!(catalog.get_manifest(7, &id1.to_hex()).unwrap().to_bytes(), m1.to_bytes());
    assert_eq!(catalog.get_refs(7, &id1.to_hex()).unwrap(), Some(refs.to_vec()));
    assert_eq!(catalog.get_profile(7, &id1.to_hex()).unwrap().unwrap().to_bytes(), m2.to_bytes());
    catalog.remove_manifest(7, &id1.to_hex()).unwrap();
    assert!(catalog.get_manifest(7, &id1.to_hex()).is_err());
    assert!(catalog.get_manifest(0, &id1.to_hex()).is_ok(), "removing one generation's copy leaves the other");
    // Names point at manifests, are replaced whole, and list sorted.
    let (r1, r2) = (ImageRef::new(id1.to_hex(), "t"), ImageRef::new(id2.to_hex(), "t"));
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
    // A compare-and-swap moves a name only from where it is expected.
    let moved = ImageRef { generation: 7, ..r2.clone() };
    assert!(!catalog.replace("a-image", &r1, &moved).unwrap(), "a-image is not at r1");
    assert!(!catalog.replace("none", &r1, &moved).unwrap());
    assert!(catalog.replace("a-image", &r2, &moved).unwrap());
    assert_eq!(catalog.get("a-image").unwrap(), moved);
    assert!(catalog.replace("a-image", &moved, &r2).unwrap());
    // Releasing keeps what a name uses and removes what none does.
    assert_eq!(catalog.release_manifest(0, &id1.to_hex()).unwrap(), crate::Release::InUse);
    assert_eq!(catalog.remove("b-image").unwrap(), Some(r1));
    assert_eq!(catalog.release_manifest(0, &id1.to_hex()).unwrap(), crate::Release::Removed);
    assert!(catalog.get_manifest(0, &id1.to_hex()).is_err());
    assert!(catalog.get_profile(0, &id1.to_hex()).unwrap().is_none(), "the profile goes with its manifest");
    assert_eq!(catalog.get_refs(0, &id1.to_hex()).unwrap(), None, "and the refs");
    assert_eq!(catalog.remove("a-image").unwrap(), Some(r2));
    assert!(catalog.list().unwrap().images.is_empty());
}

/// Checks a fresh [`Control`] against its contract; panics on the first failure.
pub fn run_control(control: Arc<dyn Control>) {
    assert!(control.read("lifecycle.json").unwrap().is_none());
    assert!(control.list("leases").unwrap().is_empty());
    assert!(control.write("lifecycle.json", b"one", None).unwrap(), "create");
    assert!(!control.write("lifecycle.json", b"two", None).unwrap(), "create only if absent");
    let (bytes, v1) = control.read("lifecycle.json").unwrap().unwrap();
    assert_eq!(&bytes[..], b"one");
    assert!(control.write("lifecycle.json", b"two", Some(&v1)).unwrap(), "swap from the version read");
    assert!(!control.write("lifecycle.json", b"three", Some(&v1)).unwrap(), "not from a version that moved");
    assert_eq!(&control.read("lifecycle.json").unwrap().unwrap().0[..], b"two");
    for k in ["leases/2/b.json", "leases/2/a.json", "leases/3/c.json"] {
        assert!(control.write(k, b"{}", None).unwrap());
    }
    assert_eq!(control.list("leases").unwrap(), vec!["2/a.json", "2/b.json", "3/c.json"]);
    assert_eq!(control.list("leases/2").unwrap(), vec!["a.json", "b.json"]);
    control.remove("leases/2/a.json").unwrap();
    control.remove("leases/2/a.json").unwrap();
    assert_eq!(control.list("leases/2").unwrap(), vec!["b.json"]);
    assert!(control.read("../x").is_err(), "keys stay inside");
    for k in ["lifecycle.json", "leases/2/b.json", "leases/3/c.json"] {
        control.remove(k).unwrap();
    }
}

/// Checks that of writers racing to swap one version, exactly one wins
/// (a server whose conditional writes are atomic; moto's are not).
pub fn run_control_races(control: Arc<dyn Control>) {
    assert!(control.write("raced.json", b"0", None).unwrap());
    let (_, v) = control.read("raced.json").unwrap().unwrap();
    let threads: Vec<_> = (0..8u8)
        .map(|i| {
            let (control, v) = (Arc::clone(&control), v.clone());
            std::thread::spawn(move || control.write("raced.json", &[i], Some(&v)).expect("a racing write answers"))
        })
        .collect();
    let won = threads.into_iter().map(|t| t.join().expect("no panic")).filter(|w| *w).count();
    assert_eq!(won, 1, "one racing swap wins");
    control.remove("raced.json").unwrap();
}

/// Checks that setters racing for one name are each told a distinct
/// previous value: every value set is replaced exactly once, or is last.
pub fn run_catalog_races(catalog: Arc<dyn Catalog>) {
    let threads: Vec<_> = (0..8u8)
        .map(|i| {
            let catalog = Arc::clone(&catalog);
            std::thread::spawn(move || {
                let mine = ImageRef::new(format!("{:02x}", i).repeat(32), "t");
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
