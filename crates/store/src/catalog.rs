//! The [`Catalog`] seam: sealed manifests, start-up profiles, and the
//! image names that point at manifests.

use serde::{Deserialize, Serialize};
use tessera_chunk::{ChunkId, SealedManifest};

use crate::{Error, Result};

/// What an image name points at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    /// Id of the sealed manifest (SHA-256 of its stored bytes).
    pub manifest: String,
    /// The tenant whose key opens it.
    pub tenant: String,
    /// The store generation that holds the manifest and its chunks (0, the
    /// default, is the generation of stores made before generations).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ImageRef {
    /// A reference to manifest `manifest` of `tenant` in generation 0.
    pub fn new(manifest: impl Into<String>, tenant: impl Into<String>) -> ImageRef {
        ImageRef { manifest: manifest.into(), tenant: tenant.into(), generation: 0 }
    }
}

/// Names, manifests and profiles, wherever they are kept. Manifests live in
/// a store generation (see [`crate::lifecycle`]); names are global and say
/// which generation holds their manifest.
///
/// Contract, checked by `conformance::run_catalog`:
/// - a manifest is stored under the SHA-256 of its bytes, in one
///   generation, with the list of chunk ids it names (its refs, which the
///   collector reads without any key), and is durable when
///   [`Catalog::put_manifest`] returns; [`Catalog::get_manifest`] checks the
///   bytes against the id and fails with [`Error::Corrupt`] on a mismatch;
/// - [`Catalog::set`] points a name at a manifest atomically (a reader sees
///   the old target or the new one, never a partial name) and returns what
///   it replaced: of two setters racing for one name, each is told what it
///   replaced, so nothing is released twice or never; callers set a name
///   only after its manifest and every chunk it names are durable;
///   [`Catalog::replace`] sets it only if it still points where expected;
/// - [`Catalog::get`] of an absent name is [`Error::NoSuchImage`]; a name
///   that cannot be read is [`Error::Corrupt`] (or I/O), and
///   [`Catalog::scan`] reports it beside the others, never in place of
///   them; a scan holds one name at a time, however many there are;
/// - [`Catalog::remove`] removes a name even when it cannot be read;
/// - nothing is written by reading, listing, or opening.
pub trait Catalog: Send + Sync {
    /// Stores a sealed manifest durably in `generation`, with `refs`, the
    /// ids of the chunks it names; returns its id.
    fn put_manifest(&self, generation: u64, sealed: &SealedManifest, refs: &[ChunkId]) -> Result<ChunkId>;
    /// Reads a sealed manifest by id, checking the bytes against the id.
    fn get_manifest(&self, generation: u64, id: &str) -> Result<SealedManifest>;
    /// The chunk ids manifest `id` names, if they were stored with it
    /// (manifests stored before refs were have none).
    fn get_refs(&self, generation: u64, id: &str) -> Result<Option<Vec<ChunkId>>>;
    /// Deletes a manifest (not the chunks it names), its refs and profile.
    fn remove_manifest(&self, generation: u64, id: &str) -> Result<()>;
    /// Whether any manifest is stored (named or not), in any generation.
    fn has_manifests(&self) -> Result<bool>;
    /// Stores the sealed start-up profile of manifest `id`, replacing any.
    fn put_profile(&self, generation: u64, id: &str, sealed: &SealedManifest) -> Result<()>;
    /// The sealed start-up profile of manifest `id`, if one was recorded.
    fn get_profile(&self, generation: u64, id: &str) -> Result<Option<SealedManifest>>;
    /// Copies manifest `id` with `refs` and its profile from one
    /// generation to another.
    fn copy_manifest(&self, id: &str, refs: &[ChunkId], from: u64, to: u64) -> Result<()> {
        let sealed = self.get_manifest(from, id)?;
        if let Some(profile) = self.get_profile(from, id)? {
            self.put_profile(to, id, &profile)?;
        }
        self.put_manifest(to, &sealed, refs)?;
        Ok(())
    }
    /// Points `name` at a manifest; returns what it pointed at before, if
    /// anything readable.
    fn set(&self, name: &str, r: &ImageRef) -> Result<Option<ImageRef>>;
    /// Points `name` at `new` if it still points at `expected`; returns
    /// whether it did.
    fn replace(&self, name: &str, expected: &ImageRef, new: &ImageRef) -> Result<bool>;
    /// What `name` points at.
    fn get(&self, name: &str) -> Result<ImageRef>;
    /// Removes `name` (even when it cannot be read) and returns what it
    /// pointed at, if that could be read. Its manifest is released by
    /// [`Catalog::release_manifest`], which callers run after this has
    /// succeeded: once the name is gone, the removal has happened.
    fn remove(&self, name: &str) -> Result<Option<ImageRef>>;
    /// Calls `each` with every name (in name order) and what it points at,
    /// or why that cannot be read.
    fn scan(&self, each: &mut dyn FnMut(String, Result<ImageRef>)) -> Result<()>;
    /// Where the catalog is, for messages.
    fn describe(&self) -> String;

    /// Every name, sorted, and the names that cannot be read.
    fn list(&self) -> Result<Listing> {
        let mut out = Listing::default();
        self.scan(&mut |name, r| match r {
            Ok(r) => out.images.push((name, r)),
            Err(e) => out.bad.push((name, e)),
        })?;
        Ok(out)
    }

    /// Removes manifest `id` of `generation` unless a name still uses it,
    /// or a name that cannot be read might.
    fn release_manifest(&self, generation: u64, id: &str) -> Result<Release> {
        let listing = self.list()?;
        if listing.images.iter().any(|(_, r)| r.manifest == id && r.generation == generation) {
            return Ok(Release::InUse);
        }
        if !listing.bad.is_empty() {
            return Ok(Release::Unsure(listing.bad.into_iter().map(|(n, _)| n).collect()));
        }
        self.remove_manifest(generation, id)?;
        Ok(Release::Removed)
    }
}

/// What [`Catalog::release_manifest`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Release {
    /// No name used the manifest: it is gone.
    Removed,
    /// Another name uses it: it stays.
    InUse,
    /// These names could not be read and might use it: it stays.
    Unsure(Vec<String>),
}

/// Every name of the catalog: those that read, and those that did not.
#[derive(Debug, Default)]
pub struct Listing {
    /// Names and what they point at, sorted by name.
    pub images: Vec<(String, ImageRef)>,
    /// Names whose file could not be read or parsed, with why.
    pub bad: Vec<(String, Error)>,
}

impl Listing {
    /// Whether some name (among those that read) points at manifest `id`;
    /// also true when a name could not be read, since it might.
    pub fn may_use(&self, id: &str) -> bool {
        !self.bad.is_empty() || self.images.iter().any(|(_, r)| r.manifest == id)
    }
}

/// The stored form of a manifest's refs: a magic line, the 32-byte ids,
/// and the SHA-256 of what precedes it.
const REFS_MAGIC: &[u8] = b"tessera refs 1\n";

/// Encodes chunk ids as a refs object.
pub(crate) fn encode_refs(refs: &[ChunkId]) -> Vec<u8> {
    let mut out = REFS_MAGIC.to_vec();
    for id in refs {
        out.extend_from_slice(&id.0);
    }
    let sum = ChunkId::of(&out);
    out.extend_from_slice(&sum.0);
    out
}

/// Decodes a refs object; `None` if it is damaged.
pub(crate) fn decode_refs(bytes: &[u8]) -> Option<Vec<ChunkId>> {
    let body = bytes.strip_prefix(REFS_MAGIC)?;
    if body.len() < 32 || !body.len().is_multiple_of(32) {
        return None;
    }
    let (ids, sum) = bytes.split_at(bytes.len() - 32);
    if ChunkId::of(ids).0 != sum {
        return None;
    }
    Some(ids[REFS_MAGIC.len()..].chunks(32).map(|c| ChunkId(c.try_into().expect("32 bytes"))).collect())
}

/// Image names: 1-128 of `A-Za-z0-9._-`, starting with a letter or digit.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(name.to_owned()))
    }
}

/// Whether `id` is the hex of a manifest id.
pub(crate) fn is_manifest_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_round_trip_and_damage_is_caught() {
        let ids = vec![ChunkId::of(b"a"), ChunkId::of(b"b")];
        let bytes = encode_refs(&ids);
        assert_eq!(decode_refs(&bytes), Some(ids));
        assert_eq!(decode_refs(&encode_refs(&[])), Some(vec![]));
        let mut bad = bytes.clone();
        bad[REFS_MAGIC.len() + 3] ^= 1;
        assert_eq!(decode_refs(&bad), None);
        assert_eq!(decode_refs(&bytes[..bytes.len() - 1]), None);
        assert_eq!(decode_refs(b"junk"), None);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("app-v1").is_ok());
        assert!(check_name("py_3.11").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "a@b", "a:b", &"x".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
