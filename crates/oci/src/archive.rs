//! `docker-archive:FILE[:REPO:TAG]`: the tar that `docker save` and
//! `skopeo copy … docker-archive:` write.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use serde::Deserialize;

use crate::spec::{self, Compression, Descriptor};
use crate::{assemble, check_document, read_limited, BlobLocation, Digest, Error, Progress, Reference, ResolvedImage};

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// A member of the outer tar: a region, or a symlink to another member.
enum Member {
    Region(u64, u64),
    Link(String),
}

pub(crate) fn resolve(reference: &Reference, file: &Path, tag: Option<&str>, progress: &dyn Progress) -> Result<ResolvedImage, Error> {
    let members = index_members(file)?;
    let region = |name: &str| -> Result<BlobLocation, Error> {
        let mut name = normalize(name);
        for _ in 0..8 {
            match members.get(&name) {
                Some(Member::Region(offset, len)) => {
                    return Ok(BlobLocation { path: file.to_owned(), offset: *offset, len: *len });
                }
                Some(Member::Link(target)) => {
                    name = match target.strip_prefix('/') {
                        Some(from_root) => normalize(from_root),
                        None => {
                            let base = name.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                            normalize(&format!("{base}/{target}"))
                        }
                    };
                }
                None => break,
            }
        }
        Err(Error::NotFound(format!("{}: no member {name:?}", file.display())))
    };
    let manifest_loc = region("manifest.json")?;
    let manifest_bytes = read_limited(manifest_loc.open()?, spec::MAX_MANIFEST, "manifest.json")?;
    let entries: Vec<ArchiveEntry> =
        serde_json::from_slice(&manifest_bytes).map_err(|e| Error::BadDocument(format!("{}: manifest.json: {e}", file.display())))?;
    let entry = match tag {
        Some(t) => entries.iter().find(|e| e.repo_tags.iter().flatten().any(|rt| rt == t)),
        None if entries.len() == 1 => entries.first(),
        None => return Err(Error::NotFound(format!("{} holds {} images: name one with docker-archive:FILE:REPO:TAG", file.display(), entries.len()))),
    }
    .ok_or_else(|| Error::NotFound(format!("{}: no image tagged {:?}", file.display(), tag.unwrap_or(""))))?;

    let config_loc = region(&entry.config)?;
    let config_bytes = read_limited(config_loc.open()?, spec::MAX_CONFIG, "image config")?;
    let config_digest = Digest::sha256(&config_bytes);
    // The config is named after its digest (`HEX.json` or `blobs/sha256/HEX`).
    let stem = entry.config.rsplit('/').next().unwrap_or("").trim_end_matches(".json");
    if stem.len() == 64 && stem.bytes().all(|b| b.is_ascii_hexdigit()) {
        check_document(&config_bytes, &format!("sha256:{stem}").parse()?, "image config")?;
    }
    let diff_ids: Vec<Digest> = serde_json::from_slice::<spec::ConfigFile>(&config_bytes)
        .map_err(|e| Error::BadDocument(format!("image config {config_digest}: {e}")))?
        .rootfs
        .diff_ids;
    if diff_ids.len() != entry.layers.len() {
        return Err(Error::BadDocument(format!("{} diff ids for {} layers", diff_ids.len(), entry.layers.len())));
    }

    let mut locs = Vec::new();
    for name in &entry.layers {
        locs.push(region(name)?);
    }
    let n = locs.len();
    let mut layers = Vec::new();
    for (i, (loc, diff_id)) in locs.into_iter().zip(&diff_ids).enumerate() {
        let mut head = [0u8; 4];
        let got = loc.open()?.read(&mut head).map_err(|e| Error::io(file, e))?;
        let compression = spec::sniff_compression(&head[..got]);
        let what = format!("layer {}/{n} {}", i + 1, entry.layers[i]);
        let (digest, media_type) = if compression == Compression::None {
            // A plain tar's digest is its diff id, checked while streaming.
            (diff_id.clone(), "application/vnd.oci.image.layer.v1.tar")
        } else {
            // Only the uncompressed digest is declared; the stored digest is
            // computed here for the record, and the diff id checked while streaming.
            progress.start(&what, loc.len);
            let (d, _) = crate::digest_of(loc.open()?, diff_id).map_err(|e| Error::io(file, e))?;
            progress.advance(loc.len);
            let mt =
                if compression == Compression::Gzip { "application/vnd.oci.image.layer.v1.tar+gzip" } else { "application/vnd.oci.image.layer.v1.tar+zstd" };
            (d, mt)
        };
        let size = loc.len;
        layers.push((Descriptor { media_type: media_type.into(), digest, size, platform: None, annotations: Default::default() }, compression, loc));
    }
    assemble(reference, Digest::sha256(&manifest_bytes), config_digest, &config_bytes, layers, None, false)
}

fn normalize(name: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out.join("/")
}

/// Lists the members of the outer tar with their data regions.
fn index_members(file: &Path) -> Result<HashMap<String, Member>, Error> {
    let f = File::open(file).map_err(|e| Error::io(file, e))?;
    let mut head = [0u8; 4];
    let n = (&f).read(&mut head).map_err(|e| Error::io(file, e))?;
    if spec::sniff_compression(&head[..n]) != Compression::None {
        return Err(Error::BadDocument(format!("{}: a compressed docker-archive; decompress it first", file.display())));
    }
    let f = File::open(file).map_err(|e| Error::io(file, e))?;
    let mut archive = tar::Archive::new(f);
    let mut members = HashMap::new();
    let bad = |e: std::io::Error| Error::BadDocument(format!("{}: not a readable tar: {e}", file.display()));
    for entry in archive.entries().map_err(bad)? {
        let entry = entry.map_err(bad)?;
        let name = normalize(&String::from_utf8_lossy(&entry.path_bytes()));
        let member = match entry.header().entry_type() {
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = entry.link_name_bytes().map(|t| String::from_utf8_lossy(&t).into_owned()).unwrap_or_default();
                if entry.header().entry_type() == tar::EntryType::Link {
                    Member::Link(format!("/{target}"))
                } else {
                    Member::Link(target)
                }
            }
            _ => Member::Region(entry.raw_file_position(), entry.size()),
        };
        members.insert(name, member);
    }
    Ok(members)
}
