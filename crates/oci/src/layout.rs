//! `oci:DIR[:TAG]`: an OCI image layout directory.

use std::fs;
use std::path::{Path, PathBuf};

use crate::spec::{self, Document};
use crate::{assemble, check_document, BlobLocation, Digest, Error, PullOptions, Reference, ResolvedImage};

const REF_NAME: &str = "org.opencontainers.image.ref.name";

pub(crate) fn resolve(reference: &Reference, dir: &Path, tag: Option<&str>, options: &PullOptions) -> Result<ResolvedImage, Error> {
    let layout_file = dir.join("oci-layout");
    if !layout_file.exists() {
        return Err(Error::NotFound(format!("{}: not an OCI image layout (no oci-layout file)", dir.display())));
    }
    let index_path = dir.join("index.json");
    let index_bytes = fs::read(&index_path).map_err(|e| Error::io(&index_path, e))?;
    let Document::Index(index) = Document::parse(&index_bytes, Some(spec::OCI_INDEX))? else {
        return Err(Error::BadDocument(format!("{}: not an image index", index_path.display())));
    };
    let chosen = match tag {
        Some(t) => index.manifests.iter().find(|d| d.annotations.get(REF_NAME).map(String::as_str) == Some(t)),
        None if index.manifests.len() == 1 => index.manifests.first(),
        None => {
            let tags: Vec<&str> = index.manifests.iter().filter_map(|d| d.annotations.get(REF_NAME)).map(String::as_str).collect();
            return Err(Error::NotFound(format!(
                "{} holds {} images: name one with oci:DIR:TAG (tags: {})",
                dir.display(),
                index.manifests.len(),
                tags.join(", ")
            )));
        }
    }
    .ok_or_else(|| Error::NotFound(format!("{}: no image tagged {:?}", dir.display(), tag.unwrap_or(""))))?
    .clone();

    let mut desc = chosen;
    // Follow nested indexes down to an image manifest.
    for _ in 0..4 {
        let bytes = read_blob(dir, &desc.digest, spec::MAX_MANIFEST)?;
        check_document(&bytes, &desc.digest, "image manifest")?;
        match Document::parse(&bytes, Some(&desc.media_type))? {
            Document::Index(inner) => desc = spec::pick_platform(&inner, &options.platform)?.clone(),
            Document::Manifest(m) => {
                let config_bytes = read_blob(dir, &m.config.digest, spec::MAX_CONFIG)?;
                check_document(&config_bytes, &m.config.digest, "image config")?;
                // Layer digests are checked as the layers are streamed.
                let mut layers = Vec::new();
                for l in &m.layers {
                    let compression = spec::layer_compression(&l.media_type)?;
                    let path = blob_path(dir, &l.digest);
                    let len = fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
                    layers.push((l.clone(), compression, BlobLocation::whole(path, len)));
                }
                return assemble(reference, desc.digest.clone(), m.config.digest.clone(), &config_bytes, layers, None, true);
            }
        }
    }
    Err(Error::BadDocument("image indexes nested too deeply".into()))
}

fn blob_path(dir: &Path, digest: &Digest) -> PathBuf {
    let s = digest.to_string();
    let (alg, hex) = s.split_once(':').expect("a digest has a colon");
    dir.join("blobs").join(alg).join(hex)
}

fn read_blob(dir: &Path, digest: &Digest, limit: u64) -> Result<Vec<u8>, Error> {
    let path = blob_path(dir, digest);
    let f = fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
    crate::read_limited(f, limit, &format!("blob {digest}"))
}
