//! The image manifest: everything needed to rebuild a disk from the chunk store.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::keys::{aead_open, aead_seal};
use crate::{ChunkId, ChunkKey, DedupScope, Error, KeyContext, KeyProvider, Result, WrappedKey, CHUNK_SIZE};

/// The manifest format this build writes. Format 2: chunks may be
/// zstd-compressed inside their sealing (a sealed chunk shorter than
/// [`crate::SEALED_CHUNK_SIZE`]); format 1: every chunk is stored whole.
/// This build reads both; a build that reads only format 1 refuses format 2.
pub const MANIFEST_FORMAT: u32 = 2;
/// The oldest manifest format this build reads.
pub const OLDEST_MANIFEST_FORMAT: u32 = 1;
/// The format of the sealed envelope around a manifest or profile. It is
/// part of the stored bytes, and so of the manifest's id: it never follows
/// [`MANIFEST_FORMAT`].
const ENVELOPE_FORMAT: u32 = 1;

/// The recipe of one imported image (plaintext; stored only sealed).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// Where the image came from, with every digest that was verified.
    pub source: Source,
    /// The runtime part of the OCI config.
    pub config: ImageConfig,
    /// Size and layout of the disk.
    pub geometry: Geometry,
    /// Public id of the salt that sealed the chunks.
    pub salt_id: String,
    /// The store generation whose salt sealed the chunks (0 before
    /// generations; a migrated image keeps the epoch it was sealed in).
    #[serde(default)]
    pub salt_epoch: u64,
    /// Which images could share this one's chunks.
    #[serde(default)]
    pub dedup_scope: DedupScope,
    /// Seconds since the epoch when the import finished.
    pub imported_at: u64,
    /// One entry per chunk of the disk: its id and key, or `None` for a hole.
    pub chunks: Vec<Option<ChunkRef>>,
}

/// Where an image came from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Source {
    /// The reference as given, e.g. `docker://127.0.0.1:5000/app:v1`.
    pub reference: String,
    /// Digest of the image manifest.
    pub manifest_digest: String,
    /// Digest of the image config.
    pub config_digest: String,
    /// `os/arch[/variant]` of the image.
    pub platform: String,
    /// The layers, lowest first.
    pub layers: Vec<LayerSource>,
}

/// One verified layer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct LayerSource {
    /// Digest of the blob as stored (compressed).
    pub digest: String,
    /// Digest of the uncompressed tar (the config's diff id).
    pub diff_id: String,
    /// Media type of the blob.
    pub media_type: String,
    /// Bytes of the blob.
    pub size: u64,
}

/// The runtime part of an OCI image config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ImageConfig {
    /// `Entrypoint`.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    #[serde(default)]
    pub cmd: Vec<String>,
    /// `Env`, as `KEY=VALUE`.
    #[serde(default)]
    pub env: Vec<String>,
    /// `WorkingDir`.
    #[serde(default)]
    pub working_dir: String,
    /// `User`.
    #[serde(default)]
    pub user: String,
    /// `Labels`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `ExposedPorts`.
    #[serde(default)]
    pub exposed_ports: Vec<String>,
    /// `StopSignal`.
    #[serde(default)]
    pub stop_signal: String,
}

/// Size and layout of the flattened disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Geometry {
    /// Bytes of the disk (a whole number of chunks).
    pub disk_bytes: u64,
    /// Bytes per chunk ([`CHUNK_SIZE`]).
    pub chunk_size: u64,
    /// Filesystem block size.
    pub block_size: u64,
    /// The chunk range holding each layer's file data, lowest layer first.
    pub layers: Vec<LayerRegion>,
    /// First chunk after every layer's region (each holds its layer's data,
    /// then its metadata).
    pub metadata_chunk: u64,
    /// Bytes of free space asked for a writable root (the disk may have a
    /// little more).
    pub headroom_bytes: u64,
    /// Files placed together in their layers' regions (`tessera optimize`), in
    /// order; importing the same source with the same list gives the same disk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub first_files: Vec<String>,
    /// Inodes in use.
    pub inodes_used: u64,
    /// Inodes in the filesystem.
    pub inodes_total: u64,
}

/// The chunks that hold one layer's file data.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
pub struct LayerRegion {
    /// First chunk index.
    pub first_chunk: u64,
    /// Number of chunks.
    pub chunks: u64,
}

/// The id and key of one stored chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// Content address.
    pub id: ChunkId,
    /// Opening key.
    pub key: ChunkKey,
}

// A chunk reference is written as "ID:KEY" in hex: compact and easy to read.
impl Serialize for ChunkRef {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}:{}", self.id.to_hex(), self.key.to_hex()))
    }
}

impl<'de> Deserialize<'de> for ChunkRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let (id, key) = s.split_once(':').ok_or_else(|| serde::de::Error::custom("chunk ref is not ID:KEY"))?;
        Ok(ChunkRef { id: id.parse().map_err(serde::de::Error::custom)?, key: key.parse().map_err(serde::de::Error::custom)? })
    }
}

impl Manifest {
    /// Number of chunks that are stored (not holes).
    pub fn stored_chunks(&self) -> usize {
        self.chunks.iter().filter(|c| c.is_some()).count()
    }

    /// Checks the invariants a reader relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::MalformedManifest(m));
        if !(OLDEST_MANIFEST_FORMAT..=MANIFEST_FORMAT).contains(&self.format) {
            return bad(format!("format {} (this build reads {OLDEST_MANIFEST_FORMAT} to {MANIFEST_FORMAT})", self.format));
        }
        let g = &self.geometry;
        if g.chunk_size != CHUNK_SIZE as u64 {
            return bad(format!("chunk size {} (expected {CHUNK_SIZE})", g.chunk_size));
        }
        if !g.disk_bytes.is_multiple_of(g.chunk_size) || g.disk_bytes / g.chunk_size != self.chunks.len() as u64 {
            return bad(format!("{} chunk entries for a disk of {} bytes", self.chunks.len(), g.disk_bytes));
        }
        Ok(())
    }

    /// Seals this manifest for `tenant` under a fresh data key, bound to
    /// the image's name.
    pub fn seal(&self, tenant: &str, image: &str, keys: &dyn KeyProvider) -> Result<SealedManifest> {
        SealedManifest::seal_json(&serde_json::to_vec(self).expect("manifest serialises"), KeyContext { tenant, image }, keys)
    }
}

/// The start-up profile of an image: the chunks a run read, in order, until
/// its entrypoint's first output. Stored beside the manifest, sealed the same
/// way (it reveals which chunks form the image).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Profile {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// Id of the manifest it was recorded on.
    pub manifest: String,
    /// Chunk indices, in the order they were first read.
    pub chunks: Vec<u64>,
    /// The 4 KiB blocks read, in the order first read, as runs of
    /// `[first block, count]` (empty in profiles recorded before blocks were).
    /// `tessera optimize` maps them to files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<[u64; 2]>,
    /// Seconds since the epoch when it was recorded.
    pub recorded_at: u64,
    /// Seconds from the start of the recording run to its cut-off.
    pub seconds: f64,
}

impl Profile {
    /// Seals this profile under a fresh data key, for the context of the
    /// manifest it belongs to.
    pub fn seal(&self, ctx: KeyContext, keys: &dyn KeyProvider) -> Result<SealedManifest> {
        SealedManifest::seal_json(&serde_json::to_vec(self).expect("profile serialises"), ctx, keys)
    }
}

/// A manifest as stored: sealed under a data key that the tenant's master
/// key wraps. Its id is the SHA-256 of [`SealedManifest::to_bytes`].
#[derive(Debug, Clone, PartialEq)]
pub struct SealedManifest {
    /// The tenant whose key wraps the data key.
    pub tenant: String,
    /// The image name the data key is bound to (empty in manifests sealed
    /// before names were bound).
    pub image: String,
    /// The wrapped data key.
    pub wrapped_key: WrappedKey,
    /// nonce || ciphertext || tag of the manifest JSON.
    pub sealed: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    format: u32,
    tenant: String,
    // Absent in envelopes written before it, which keep their bytes (and
    // so their ids).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    image: String,
    wrapped_key: String,
    sealed: String,
}

impl SealedManifest {
    /// The stored form (a small JSON envelope).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&Envelope {
            format: ENVELOPE_FORMAT,
            tenant: self.tenant.clone(),
            image: self.image.clone(),
            wrapped_key: B64.encode(&self.wrapped_key.0),
            sealed: B64.encode(&self.sealed),
        })
        .expect("envelope serialises")
    }

    /// The content address of the stored form.
    pub fn id(&self) -> ChunkId {
        ChunkId::of(&self.to_bytes())
    }

    /// Parses the stored form; never panics on any input.
    pub fn from_bytes(bytes: &[u8]) -> Result<SealedManifest> {
        let env: Envelope = serde_json::from_slice(bytes).map_err(|e| Error::MalformedManifest(e.to_string()))?;
        if env.format != ENVELOPE_FORMAT {
            return Err(Error::MalformedManifest(format!("envelope format {}", env.format)));
        }
        let b64 = |s: &str, what: &str| B64.decode(s).map_err(|e| Error::MalformedManifest(format!("{what}: {e}")));
        Ok(SealedManifest {
            wrapped_key: WrappedKey(b64(&env.wrapped_key, "wrapped_key")?),
            sealed: b64(&env.sealed, "sealed")?,
            tenant: env.tenant,
            image: env.image,
        })
    }

    /// The context its data key was wrapped for.
    pub fn context(&self) -> KeyContext<'_> {
        KeyContext { tenant: &self.tenant, image: &self.image }
    }

    fn seal_json(plain: &[u8], ctx: KeyContext, keys: &dyn KeyProvider) -> Result<SealedManifest> {
        let (data_key, wrapped_key) = keys.new_key(&ctx)?;
        let sealed = aead_seal(&data_key.0, ctx.tenant.as_bytes(), plain);
        Ok(SealedManifest { tenant: ctx.tenant.to_owned(), image: ctx.image.to_owned(), wrapped_key, sealed })
    }

    fn open_json(&self, keys: &dyn KeyProvider) -> Result<Vec<u8>> {
        let data_key = keys.unwrap(&self.context(), &self.wrapped_key)?;
        aead_open(&data_key.0, self.tenant.as_bytes(), &self.sealed).ok_or_else(|| Error::ManifestOpen { tenant: self.tenant.clone() })
    }

    /// Unwraps the data key through `keys` and opens the manifest.
    pub fn open(&self, keys: &dyn KeyProvider) -> Result<Manifest> {
        let m: Manifest = serde_json::from_slice(&self.open_json(keys)?).map_err(|e| Error::MalformedManifest(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    /// Opens a sealed start-up profile.
    pub fn open_profile(&self, keys: &dyn KeyProvider) -> Result<Profile> {
        serde_json::from_slice(&self.open_json(keys)?).map_err(|e| Error::MalformedManifest(format!("profile: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{seal, LocalKeyring, Salt};

    pub(crate) fn sample(salt: &Salt) -> Manifest {
        let c = seal(salt, vec![5u8; CHUNK_SIZE]);
        Manifest {
            format: MANIFEST_FORMAT,
            source: Source { reference: "oci:x:y".into(), ..Default::default() },
            config: ImageConfig { entrypoint: vec!["/bin/sh".into()], ..Default::default() },
            geometry: Geometry { disk_bytes: 2 * CHUNK_SIZE as u64, chunk_size: CHUNK_SIZE as u64, block_size: 4096, ..Default::default() },
            salt_id: salt.id().into(),
            salt_epoch: 0,
            dedup_scope: DedupScope::Global,
            imported_at: 0,
            chunks: vec![Some(ChunkRef { id: c.id, key: c.key }), None],
        }
    }

    #[test]
    fn manifests_of_whole_chunks_still_read_and_newer_formats_do_not() {
        let salt = Salt::from_bytes([2; 32]);
        let mut m = sample(&salt);
        m.format = 1;
        assert!(m.validate().is_ok(), "images imported before compression keep reading");
        m.format = MANIFEST_FORMAT + 1;
        assert!(m.validate().unwrap_err().to_string().contains("reads 1 to 2"));
        m.format = 0;
        assert!(m.validate().is_err());
    }

    #[test]
    fn seal_and_open_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut ring = LocalKeyring::create(&dir.path().join("k")).unwrap();
        ring.ensure_tenant("t").unwrap();
        let m = sample(ring.salt());
        let sealed = m.seal("t", "app", &ring).unwrap();
        let bytes = sealed.to_bytes();
        // Nothing of the chunk table is visible in the stored form.
        let id_hex = m.chunks[0].unwrap().id.to_hex();
        assert!(!String::from_utf8_lossy(&bytes).contains(&id_hex));
        let back = SealedManifest::from_bytes(&bytes).unwrap().open(&ring).unwrap();
        assert_eq!(back, m);
        // The envelope's format is pinned: stored manifests (and their ids)
        // from every earlier build keep opening.
        let env: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(env["format"], 1);
    }

    #[test]
    fn tampered_envelope_does_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut ring = LocalKeyring::create(&dir.path().join("k")).unwrap();
        ring.ensure_tenant("t").unwrap();
        let mut sealed = sample(ring.salt()).seal("t", "app", &ring).unwrap();
        let n = sealed.sealed.len();
        sealed.sealed[n / 2] ^= 0x40;
        assert!(matches!(sealed.open(&ring), Err(Error::ManifestOpen { .. })));
    }

    proptest::proptest! {
        #[test]
        fn envelope_parser_never_panics(bytes in proptest::collection::vec(proptest::arbitrary::any::<u8>(), 0..512)) {
            let _ = SealedManifest::from_bytes(&bytes);
        }
    }
}
