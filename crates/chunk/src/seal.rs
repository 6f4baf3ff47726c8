//! Convergent sealing of one chunk.

use std::fmt;
use std::str::FromStr;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::{digest, hmac};

use crate::{Error, Result};

/// Bytes of plaintext in one chunk (512 KiB).
pub const CHUNK_SIZE: usize = 512 * 1024;
/// Bytes of a sealed chunk at most: the ciphertext plus the 16-byte GCM
/// tag. A compressed chunk is shorter.
pub const SEALED_CHUNK_SIZE: usize = CHUNK_SIZE + 16;
/// The zstd level chunks are compressed at. With the zstd library pinned
/// (Cargo.lock), the same plaintext always compresses to the same bytes, so
/// convergent dedup holds.
pub const ZSTD_LEVEL: i32 = 3;
/// A chunk is stored compressed only if that saves at least this much.
const MIN_SAVING: usize = 4096;
/// Every zstd frame starts with these bytes.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

thread_local! {
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> = const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { std::cell::RefCell::new(None) };
}

/// The content address of a sealed chunk: SHA-256 of its ciphertext.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

/// The key that opens one chunk: HMAC-SHA256(salt, plaintext).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ChunkKey(pub [u8; 32]);

/// The convergence salt: chunks dedup only under the same salt.
///
/// It is a store setting kept in the keyring; rotating it or scoping it per
/// tenant trades dedup for isolation, so it is always passed in, never a
/// constant.
#[derive(Clone)]
pub struct Salt {
    key: hmac::Key,
    id: String,
}

/// A chunk after [`seal`]: its id, its key and the bytes to store.
pub struct SealedChunk {
    /// SHA-256 of `ciphertext`.
    pub id: ChunkId,
    /// Key that opens it.
    pub key: ChunkKey,
    /// Ciphertext with the GCM tag appended ([`SEALED_CHUNK_SIZE`] bytes for a full chunk).
    pub ciphertext: Vec<u8>,
}

impl Salt {
    /// A salt from its 32 secret bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Salt {
        let id = hex::encode(&digest::digest(&digest::SHA256, &bytes).as_ref()[..8]);
        Salt { key: hmac::Key::new(hmac::HMAC_SHA256, &bytes), id }
    }

    /// A public name of this salt (a hash prefix), recorded in manifests so a
    /// later rotation knows which salt sealed an image.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The salt of generation `epoch` and dedup `scope` (with `tenant`,
    /// for a tenant scope), derived from this base salt: a new generation
    /// of the store seals with a new salt, so chunks stop being shared
    /// across a rotation, and tenants of a tenant scope never share one.
    /// Epoch 0 of the global scope is the base salt itself (stores made
    /// before generations keep their chunks' ids).
    pub fn derive(&self, epoch: u64, scope: DedupScope, tenant: &str) -> Salt {
        if epoch == 0 && scope == DedupScope::Global {
            return self.clone();
        }
        let mut label = b"tessera salt v1\0".to_vec();
        label.extend_from_slice(&epoch.to_be_bytes());
        match scope {
            DedupScope::Global => label.extend_from_slice(b"global"),
            DedupScope::Tenant => {
                label.extend_from_slice(b"tenant\0");
                label.extend_from_slice(tenant.as_bytes());
            }
        }
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(hmac::sign(&self.key, &label).as_ref());
        Salt::from_bytes(bytes)
    }
}

/// Which images may share chunks: all of a generation's (`global`), or
/// only one tenant's (`tenant`). Recorded in each manifest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupScope {
    /// Every tenant's images share chunks.
    #[default]
    Global,
    /// Only one tenant's images share chunks.
    Tenant,
}

impl FromStr for DedupScope {
    type Err = Error;
    fn from_str(s: &str) -> Result<DedupScope> {
        match s {
            "global" => Ok(DedupScope::Global),
            "tenant" => Ok(DedupScope::Tenant),
            _ => Err(Error::Parse { what: "dedup scope (global or tenant)", value: s.to_owned() }),
        }
    }
}

impl fmt::Display for DedupScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DedupScope::Global => "global",
            DedupScope::Tenant => "tenant",
        })
    }
}

impl fmt::Debug for Salt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Salt({})", self.id)
    }
}

/// True when every byte is zero: such a chunk is a hole and is stored nowhere.
pub fn is_zero(data: &[u8]) -> bool {
    let (prefix, words, suffix) = {
        // SAFETY: every bit pattern is a valid u64, and align_to only
        // reinterprets the aligned middle part of the slice.
        unsafe { data.align_to::<u64>() }
    };
    prefix.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && suffix.iter().all(|&b| b == 0)
}

/// Seals one chunk of plaintext, reusing its buffer for the ciphertext.
pub fn seal(salt: &Salt, plaintext: Vec<u8>) -> SealedChunk {
    let mut buf = plaintext;
    let (id, key) = seal_in_place(salt, &mut buf);
    SealedChunk { id, key, ciphertext: buf }
}

/// Seals `buf` in place: on return it holds ciphertext and tag. A whole
/// chunk is compressed first (zstd, [`ZSTD_LEVEL`]) where that pays; the
/// key is taken from the plaintext either way.
pub fn seal_in_place(salt: &Salt, buf: &mut Vec<u8>) -> (ChunkId, ChunkKey) {
    let mut key = [0u8; 32];
    key.copy_from_slice(hmac::sign(&salt.key, buf).as_ref());
    compress_in_place(buf);
    let aead = aead_key(&key);
    // The key is unique per plaintext (it is derived from it), so a fixed
    // nonce never encrypts two different messages under one key.
    aead.seal_in_place_append_tag(Nonce::assume_unique_for_key([0; 12]), Aad::empty(), buf).expect("AES-GCM sealing only fails for inputs over 64 GiB");
    (ChunkId::of(buf), ChunkKey(key))
}

/// Checks a stored chunk against its id, then opens it with its key.
pub fn open(id: &ChunkId, key: &ChunkKey, ciphertext: Vec<u8>) -> Result<Vec<u8>> {
    let mut buf = ciphertext;
    open_in_place(id, key, &mut buf)?;
    Ok(buf)
}

/// Like [`open`], in place: on success `buf` holds the plaintext.
pub fn open_in_place(id: &ChunkId, key: &ChunkKey, buf: &mut Vec<u8>) -> Result<()> {
    check_id(id, buf)?;
    decrypt_in_place(id, key, buf)
}

/// Checks that `buf` is a whole sealed chunk (at most
/// [`SEALED_CHUNK_SIZE`] bytes, more than a tag) whose SHA-256 is `id`.
pub fn check_id(id: &ChunkId, buf: &[u8]) -> Result<()> {
    if buf.len() > SEALED_CHUNK_SIZE || buf.len() <= 16 {
        return Err(Error::BadLength { id: *id, len: buf.len(), expected: SEALED_CHUNK_SIZE });
    }
    if ChunkId::of(buf) != *id {
        return Err(Error::IdMismatch { id: *id });
    }
    Ok(())
}

/// Opens a chunk whose id [`check_id`] already checked (the GCM tag is
/// still checked): on success `buf` holds the plaintext.
pub fn decrypt_in_place(id: &ChunkId, key: &ChunkKey, buf: &mut Vec<u8>) -> Result<()> {
    let aead = aead_key(&key.0);
    let plain_len = aead.open_in_place(Nonce::assume_unique_for_key([0; 12]), Aad::empty(), buf).map_err(|_| Error::OpenFailed { id: *id })?.len();
    buf.truncate(plain_len);
    decompress_in_place(id, buf)
}

/// Replaces a whole chunk by its zstd frame if that is [`MIN_SAVING`]
/// shorter; leaves anything else as it is.
fn compress_in_place(buf: &mut Vec<u8>) {
    if buf.len() != CHUNK_SIZE {
        return;
    }
    let mut out = vec![0u8; CHUNK_SIZE - MIN_SAVING];
    let compressed = COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        // Too small a buffer (it would not pay) is an error: stored as is.
        c.as_mut().and_then(|c| c.compress_to_buffer(buf.as_slice(), out.as_mut_slice()).ok())
    });
    if let Some(n) = compressed {
        out.truncate(n);
        *buf = out;
    }
}

/// Undoes [`compress_in_place`]: a whole chunk opens as it was stored; a
/// zstd frame must inflate to exactly one chunk, no more (bounded), else
/// the chunk is corrupt.
fn decompress_in_place(id: &ChunkId, buf: &mut Vec<u8>) -> Result<()> {
    if buf.len() == CHUNK_SIZE || !buf.starts_with(&ZSTD_MAGIC) {
        return Ok(());
    }
    let mut out = vec![0u8; CHUNK_SIZE];
    let inflated = DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = zstd::bulk::Decompressor::new().ok();
        }
        match d.as_mut() {
            Some(d) => d.decompress_to_buffer(buf.as_slice(), out.as_mut_slice()).map_err(|e| e.to_string()),
            None => Err("no zstd context".to_owned()),
        }
    });
    match inflated {
        Ok(CHUNK_SIZE) => {
            *buf = out;
            Ok(())
        }
        Ok(n) => Err(Error::BadCompression { id: *id, reason: format!("inflates to {n} bytes, not {CHUNK_SIZE}") }),
        Err(e) => Err(Error::BadCompression { id: *id, reason: format!("does not inflate to one chunk: {e}") }),
    }
}

fn aead_key(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("AES-256 takes a 32-byte key"))
}

impl ChunkId {
    /// SHA-256 of the given (sealed) bytes.
    pub fn of(bytes: &[u8]) -> ChunkId {
        let mut id = [0u8; 32];
        id.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
        ChunkId(id)
    }

    /// Lower-case hex, the form used in paths and manifests.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.to_hex())
    }
}

impl FromStr for ChunkId {
    type Err = Error;
    fn from_str(s: &str) -> Result<ChunkId> {
        parse_hex32(s, "chunk id").map(ChunkId)
    }
}

impl fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChunkKey(..)")
    }
}

impl ChunkKey {
    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for ChunkKey {
    type Err = Error;
    fn from_str(s: &str) -> Result<ChunkKey> {
        parse_hex32(s, "chunk key").map(ChunkKey)
    }
}

pub(crate) fn parse_hex32(s: &str, what: &'static str) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).map_err(|_| Error::Parse { what, value: s.chars().take(80).collect() })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(byte: u8) -> Vec<u8> {
        let mut v = vec![byte; CHUNK_SIZE];
        v[17] = byte.wrapping_add(1);
        v
    }

    #[test]
    fn equal_plaintext_equal_id_under_one_salt() {
        let salt = Salt::from_bytes([1; 32]);
        let a = seal(&salt, chunk(3));
        let b = seal(&salt, chunk(3));
        assert_eq!(a.id, b.id);
        assert_eq!(a.ciphertext, b.ciphertext);
        assert!(a.ciphertext.len() < 4096, "compressed: {}", a.ciphertext.len());
        let r = random_chunk(5);
        let c = seal(&salt, r.clone());
        assert_eq!(c.ciphertext.len(), SEALED_CHUNK_SIZE, "stored whole: it does not compress");
        assert_ne!(&c.ciphertext[..CHUNK_SIZE], &r[..]);
    }

    fn random_chunk(seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..CHUNK_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn compressed_and_whole_chunks_open_to_their_plaintext() {
        let salt = Salt::from_bytes([7; 32]);
        let mut half = random_chunk(9);
        half[CHUNK_SIZE / 2..].fill(b'a');
        for plain in [chunk(3), random_chunk(4), half] {
            let s = seal(&salt, plain.clone());
            assert_eq!(open(&s.id, &s.key, s.ciphertext.clone()).unwrap(), plain);
            // The key is the plaintext's, compressed or not.
            assert_eq!(s.key.0.as_ref(), hmac::sign(&salt.key, &plain).as_ref());
        }
    }

    /// Seals `payload` as it is (no compression) under `key`.
    fn sealed_as_is(key: [u8; 32], payload: Vec<u8>) -> (ChunkId, Vec<u8>) {
        let mut buf = payload;
        aead_key(&key).seal_in_place_append_tag(Nonce::assume_unique_for_key([0; 12]), Aad::empty(), &mut buf).unwrap();
        (ChunkId::of(&buf), buf)
    }

    #[test]
    fn a_compressed_chunk_that_is_not_one_chunk_is_corrupt_and_named() {
        let key = [9; 32];
        let too_far = zstd::bulk::compress(&vec![0; 2 * CHUNK_SIZE], ZSTD_LEVEL).unwrap();
        let too_short = zstd::bulk::compress(&vec![1; 1000], ZSTD_LEVEL).unwrap();
        let mut garbled = zstd::bulk::compress(&chunk(4), ZSTD_LEVEL).unwrap();
        let n = garbled.len();
        garbled[n / 2..].fill(0xff);
        for payload in [too_far, too_short, garbled] {
            let (id, ct) = sealed_as_is(key, payload);
            match open(&id, &ChunkKey(key), ct) {
                Err(e @ Error::BadCompression { .. }) => assert!(e.to_string().contains(&id.to_hex()), "{e}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn other_salt_other_id() {
        let a = seal(&Salt::from_bytes([1; 32]), chunk(3));
        let b = seal(&Salt::from_bytes([2; 32]), chunk(3));
        assert_ne!(a.id, b.id);
    }

    #[test]
    fn derived_salts_split_epochs_and_tenants() {
        let base = Salt::from_bytes([1; 32]);
        let id = |s: &Salt| seal(s, chunk(3)).id;
        assert_eq!(id(&base.derive(0, DedupScope::Global, "a")), id(&base), "epoch 0, global: the base salt");
        assert_eq!(id(&base.derive(0, DedupScope::Global, "a")), id(&base.derive(0, DedupScope::Global, "b")));
        assert_ne!(id(&base.derive(1, DedupScope::Global, "a")), id(&base));
        assert_ne!(id(&base.derive(1, DedupScope::Global, "a")), id(&base.derive(2, DedupScope::Global, "a")));
        assert_ne!(id(&base.derive(0, DedupScope::Tenant, "a")), id(&base.derive(0, DedupScope::Tenant, "b")));
        assert_ne!(id(&base.derive(0, DedupScope::Tenant, "a")), id(&base));
        assert_eq!(base.derive(3, DedupScope::Tenant, "a").id(), base.derive(3, DedupScope::Tenant, "a").id(), "deterministic");
        assert_eq!("tenant".parse::<DedupScope>().unwrap(), DedupScope::Tenant);
        assert!("everyone".parse::<DedupScope>().is_err());
    }

    #[test]
    fn flipped_byte_is_caught_by_id() {
        let s = seal(&Salt::from_bytes([1; 32]), chunk(9));
        let mut ct = s.ciphertext.clone();
        let middle = ct.len() / 2;
        ct[middle] ^= 1;
        assert!(matches!(open(&s.id, &s.key, ct), Err(Error::IdMismatch { .. })));
    }

    #[test]
    fn wrong_key_does_not_open() {
        let s = seal(&Salt::from_bytes([1; 32]), chunk(9));
        let other = seal(&Salt::from_bytes([1; 32]), chunk(10));
        assert!(matches!(open(&s.id, &other.key, s.ciphertext), Err(Error::OpenFailed { .. })));
    }

    #[test]
    fn truncated_chunk_is_an_error() {
        let s = seal(&Salt::from_bytes([1; 32]), random_chunk(9));
        let mut ct = s.ciphertext;
        ct.truncate(100);
        assert!(matches!(open(&s.id, &s.key, ct.clone()), Err(Error::IdMismatch { .. })));
        ct.truncate(10);
        assert!(matches!(open(&s.id, &s.key, ct), Err(Error::BadLength { .. })));
    }

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; CHUNK_SIZE];
        assert!(is_zero(&v));
        assert!(is_zero(&v[3..]));
        v[CHUNK_SIZE - 1] = 1;
        assert!(!is_zero(&v));
        assert!(!is_zero(&v[5..]));
    }

    #[test]
    fn id_round_trips_through_hex() {
        let id = ChunkId::of(b"x");
        assert_eq!(id.to_hex().parse::<ChunkId>().unwrap(), id);
        assert!("zz".parse::<ChunkId>().is_err());
    }
}
