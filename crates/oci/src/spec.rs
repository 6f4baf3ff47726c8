//! The OCI image-spec and Docker v2 documents Tessera reads.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::{Digest, Error};

pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The largest manifest or index accepted (the distribution spec suggests 4 MiB).
pub(crate) const MAX_MANIFEST: u64 = 4 << 20;
/// The largest image config accepted.
pub(crate) const MAX_CONFIG: u64 = 32 << 20;

#[derive(Deserialize, Debug, Clone)]
pub(crate) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Deserialize, Debug, Clone)]
pub(crate) struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl Platform {
    pub fn spelled(&self) -> String {
        match &self.variant {
            Some(v) if !v.is_empty() => format!("{}/{}/{v}", self.os, self.architecture),
            _ => format!("{}/{}", self.os, self.architecture),
        }
    }
}

#[derive(Deserialize, Debug)]
pub(crate) struct ImageManifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Deserialize, Debug)]
pub(crate) struct ImageIndex {
    pub manifests: Vec<Descriptor>,
}

/// A manifest document: an image manifest or an index of them.
pub(crate) enum Document {
    Manifest(ImageManifest),
    Index(ImageIndex),
}

impl Document {
    /// Parses by the declared media type, or by shape when none is declared.
    pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Document, Error> {
        let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| Error::BadDocument(format!("manifest is not JSON: {e}")))?;
        let declared = v.get("mediaType").and_then(|m| m.as_str()).or(content_type).unwrap_or("");
        let declared = declared.split(';').next().unwrap_or("").trim();
        let is_index = match declared {
            OCI_INDEX | DOCKER_LIST => true,
            OCI_MANIFEST | DOCKER_MANIFEST => false,
            "" | "application/json" => v.get("manifests").is_some(),
            other => return Err(Error::UnsupportedMediaType { what: "manifest".into(), media_type: other.to_owned() }),
        };
        if v.get("schemaVersion").and_then(|s| s.as_u64()) != Some(2) {
            return Err(Error::BadDocument("only schemaVersion 2 manifests are supported".into()));
        }
        if is_index {
            Ok(Document::Index(serde_json::from_value(v).map_err(|e| Error::BadDocument(format!("image index: {e}")))?))
        } else {
            Ok(Document::Manifest(serde_json::from_value(v).map_err(|e| Error::BadDocument(format!("image manifest: {e}")))?))
        }
    }
}

/// Picks the manifest for `want` (`os/arch[/variant]`) from an index.
pub(crate) fn pick_platform<'a>(index: &'a ImageIndex, want: &str) -> Result<&'a Descriptor, Error> {
    let mut parts = want.split('/');
    let (os, arch, variant) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next());
    let candidates: Vec<&Descriptor> = index.manifests.iter().filter(|d| d.media_type != OCI_INDEX && d.media_type != DOCKER_LIST).collect();
    let found = candidates.iter().find(|d| match &d.platform {
        Some(p) => p.os == os && p.architecture == arch && (variant.is_none() || p.variant.as_deref() == variant),
        None => false,
    });
    if let Some(d) = found {
        return Ok(d);
    }
    // An index without platforms and with one image (as umoci writes): take it.
    if candidates.len() == 1 && candidates[0].platform.is_none() {
        return Ok(candidates[0]);
    }
    let have: Vec<String> = candidates.iter().filter_map(|d| d.platform.as_ref().map(|p| p.spelled())).collect();
    Err(Error::NoPlatform { want: want.to_owned(), have: have.join(", ") })
}

#[derive(Deserialize, Debug, Default)]
pub(crate) struct ConfigFile {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
    #[serde(default)]
    pub config: Option<RunConfig>,
    pub rootfs: RootFs,
}

#[derive(Deserialize, Debug, Default)]
pub(crate) struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct RunConfig {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: Option<Vec<String>>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    pub stop_signal: Option<String>,
}

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

/// Maps a layer media type to its compression; unknown types are refused.
pub(crate) fn layer_compression(media_type: &str) -> Result<Compression, Error> {
    let c = match media_type {
        "application/vnd.oci.image.layer.v1.tar" | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Compression::None,
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Compression::Gzip,
        "application/vnd.oci.image.layer.v1.tar+zstd" | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Compression::Zstd,
        other => return Err(Error::UnsupportedMediaType { what: "layer".into(), media_type: other.to_owned() }),
    };
    Ok(c)
}

/// Guesses compression from the first bytes (for docker-archive layers).
pub(crate) fn sniff_compression(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_by_type_and_shape() {
        let d = Digest::sha256(b"x");
        let m = format!(r#"{{"schemaVersion":2,"config":{{"mediaType":"a","digest":"{d}","size":1}},"layers":[]}}"#);
        assert!(matches!(Document::parse(m.as_bytes(), None).unwrap(), Document::Manifest(_)));
        let i = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{d}","size":1,"platform":{{"os":"linux","architecture":"arm64"}}}}]}}"#
        );
        let Document::Index(idx) = Document::parse(i.as_bytes(), None).unwrap() else { panic!("an index") };
        let err = pick_platform(&idx, "linux/amd64").unwrap_err().to_string();
        assert!(err.contains("linux/arm64"), "{err}");
        assert!(pick_platform(&idx, "linux/arm64").is_ok());
        assert!(Document::parse(br#"{"schemaVersion":2,"mediaType":"text/html"}"#, None).is_err());
        assert!(Document::parse(b"<html>", None).is_err());
    }

    #[test]
    fn media_types() {
        assert_eq!(layer_compression("application/vnd.oci.image.layer.v1.tar+zstd").unwrap(), Compression::Zstd);
        assert!(layer_compression("application/vnd.oci.image.layer.v1.tar+lz4").is_err());
    }

    proptest::proptest! {
        #[test]
        fn document_parser_never_panics(bytes in proptest::collection::vec(proptest::arbitrary::any::<u8>(), 0..300)) {
            let _ = Document::parse(&bytes, None);
        }
    }
}
