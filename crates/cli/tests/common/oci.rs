//! OCI image layouts built by hand, for inputs umoci would never write:
//! zstd layers, several platforms, corrupt and hostile blobs.

use std::io::Write;
use std::path::Path;

use serde_json::json;
use tessera_oci::Digest;

#[derive(Clone, Copy)]
pub enum Comp {
    None,
    Gzip,
    Zstd,
}

/// One layer: the blob as stored, its media type and its diff id.
pub struct Blob {
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub diff_id: String,
}

impl Blob {
    pub fn from_tar(tar: &[u8], comp: Comp) -> Blob {
        let diff_id = Digest::sha256(tar).to_string();
        let (bytes, media_type) = match comp {
            Comp::None => (tar.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
            Comp::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(tar).unwrap();
                (e.finish().unwrap(), "application/vnd.oci.image.layer.v1.tar+gzip")
            }
            Comp::Zstd => (zstd::encode_all(tar, 3).unwrap(), "application/vnd.oci.image.layer.v1.tar+zstd"),
        };
        Blob { bytes, media_type: media_type.into(), diff_id }
    }
}

/// A tar of regular files (and directories for paths ending in '/').
pub fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        if path.ends_with('/') {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
        } else {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
        }
        h.set_mtime(1_700_000_000);
        // Paths such as "../x" must reach the tar unchanged: write the name by hand.
        let name = h.as_old_mut().name.as_mut();
        name.fill(0);
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn put_blob(dir: &Path, bytes: &[u8]) -> (String, u64) {
    let d = Digest::sha256(bytes);
    let p = dir.join("blobs/sha256").join(d.hex());
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
    (d.to_string(), bytes.len() as u64)
}

/// Writes an image manifest (and config) for `layers`; returns its descriptor.
pub fn write_manifest(dir: &Path, layers: &[Blob], entrypoint: &[&str]) -> serde_json::Value {
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": entrypoint, "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
    });
    let (cd, cs) = put_blob(dir, &serde_json::to_vec(&config).unwrap());
    let layer_descs: Vec<_> = layers
        .iter()
        .map(|l| {
            let (d, s) = put_blob(dir, &l.bytes);
            json!({"mediaType": l.media_type, "digest": d, "size": s})
        })
        .collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": layer_descs,
    });
    let (md, ms) = put_blob(dir, &serde_json::to_vec(&manifest).unwrap());
    json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms})
}

/// Writes `oci-layout` and an `index.json` naming `manifests` (descriptor, tag).
pub fn write_index(dir: &Path, manifests: Vec<(serde_json::Value, &str)>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let entries: Vec<_> = manifests
        .into_iter()
        .map(|(mut d, tag)| {
            d["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
            d
        })
        .collect();
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": entries})).unwrap()).unwrap();
}

/// A one-image layout `DIR:TAG` of `layers`.
pub fn layout(dir: &Path, tag: &str, layers: &[Blob]) {
    std::fs::create_dir_all(dir).unwrap();
    let d = write_manifest(dir, layers, &["/bin/app"]);
    write_index(dir, vec![(d, tag)]);
}

/// Puts a nested image index for two platforms under `DIR:TAG`.
pub fn multi_platform(dir: &Path, tag: &str, amd64: &[Blob], arm64: &[Blob]) {
    std::fs::create_dir_all(dir).unwrap();
    let mut a = write_manifest(dir, amd64, &["/amd64"]);
    a["platform"] = json!({"os": "linux", "architecture": "amd64"});
    let mut b = write_manifest(dir, arm64, &["/arm64"]);
    b["platform"] = json!({"os": "linux", "architecture": "arm64"});
    let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [a, b]});
    let (d, s) = put_blob(dir, &serde_json::to_vec(&index).unwrap());
    write_index(dir, vec![(json!({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": d, "size": s}), tag)]);
}
