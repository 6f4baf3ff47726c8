//! Sealed chunks and image manifests: the unit of storage and the recipe of a disk.
//!
//! A flattened disk image is cut into [`CHUNK_SIZE`] pieces. Each piece that is
//! not all zeros is sealed with convergent encryption ([`seal`]):
//!
//! ```text
//! key        = HMAC-SHA256(salt, plaintext)
//! ciphertext = AES-256-GCM(key, nonce = 0, plaintext)  (tag appended)
//! id         = SHA-256(ciphertext)
//! ```
//!
//! Equal plaintext under one [`Salt`] gives an equal [`ChunkId`], so a chunk
//! store keeps it once, while every stored byte stays encrypted. Anyone can
//! check a stored chunk against its id; only a holder of the [`Manifest`]
//! (which lists each chunk's key) can open it.
//!
//! A [`Manifest`] is sealed as a [`SealedManifest`] under a random per-image
//! data key, which a [`KeyProvider`] wraps with the tenant's master key
//! (envelope encryption). [`LocalKeyring`] is the default provider: a file of
//! mode 0600 that also keeps the store's salt.
//!
//! ```
//! use tessera_chunk::{seal, open, Salt, CHUNK_SIZE};
//! let salt = Salt::from_bytes([7; 32]);
//! let plain = vec![42u8; CHUNK_SIZE];
//! let sealed = seal(&salt, plain.clone());
//! let back = open(&sealed.id, &sealed.key, sealed.ciphertext).unwrap();
//! assert_eq!(back, plain);
//! ```
#![deny(missing_docs)]

mod error;
mod keys;
mod manifest;
mod seal;

pub use error::{Error, Result};
pub use keys::{DataKey, KeyContext, KeyProvider, Keyring, LocalKeyring, WrappedKey};
pub use manifest::{ChunkRef, Geometry, ImageConfig, LayerRegion, LayerSource, Manifest, Profile, SealedManifest, Source, MANIFEST_FORMAT};
pub use seal::{
    check_id, decrypt_in_place, is_zero, open, open_in_place, seal, seal_in_place, ChunkId, ChunkKey, DedupScope, Salt, SealedChunk, CHUNK_SIZE,
    SEALED_CHUNK_SIZE,
};
