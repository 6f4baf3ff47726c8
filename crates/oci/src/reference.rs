//! Image references, spelled as skopeo spells its transports.

use std::fmt;
use std::path::PathBuf;

use crate::{Digest, Error};

/// Where to read an image from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    /// `oci:DIR[:TAG]`: an OCI image layout directory.
    Layout {
        /// The layout directory.
        dir: PathBuf,
        /// `org.opencontainers.image.ref.name` to pick; `None` takes the only image.
        tag: Option<String>,
    },
    /// `docker-archive:FILE[:REPO:TAG]`: a `docker save` style tar.
    Archive {
        /// The tar file.
        file: PathBuf,
        /// A `RepoTags` entry to pick; `None` takes the only image.
        tag: Option<String>,
    },
    /// `docker://HOST[:PORT]/REPO[:TAG|@DIGEST]`: a distribution-spec registry.
    Registry {
        /// `host[:port]`.
        host: String,
        /// Repository path, e.g. `team/app`.
        repo: String,
        /// Tag or digest.
        target: Target,
    },
}

/// A registry image is named by tag or by digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A mutable tag.
    Tag(String),
    /// An immutable manifest digest.
    Digest(Digest),
}

impl Reference {
    /// Parses `oci:…`, `docker-archive:…` or `docker://…`.
    pub fn parse(s: &str) -> Result<Reference, Error> {
        let bad = |why: &str| Error::BadReference { reference: s.to_owned(), reason: why.to_owned() };
        if let Some(rest) = s.strip_prefix("docker://") {
            return parse_registry(rest).map_err(|why| bad(&why));
        }
        // As skopeo does: the path ends at the first colon.
        let split = |rest: &str| match rest.split_once(':') {
            Some((p, t)) if !t.is_empty() => (PathBuf::from(p), Some(t.to_owned())),
            Some((p, _)) => (PathBuf::from(p), None),
            None => (PathBuf::from(rest), None),
        };
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, tag) = split(rest);
            if dir.as_os_str().is_empty() {
                return Err(bad("missing the layout directory"));
            }
            return Ok(Reference::Layout { dir, tag });
        }
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            let (file, tag) = split(rest);
            if file.as_os_str().is_empty() {
                return Err(bad("missing the archive file"));
            }
            return Ok(Reference::Archive { file, tag });
        }
        Err(bad("use oci:DIR[:TAG], docker-archive:FILE or docker://HOST[:PORT]/REPO[:TAG|@sha256:…]"))
    }

    /// A name for the image when the user gives none: the last path
    /// component of the repository or directory, plus the tag.
    pub fn default_name(&self) -> String {
        let (base, tag) = match self {
            Reference::Layout { dir, tag } | Reference::Archive { file: dir, tag } => {
                (dir.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into()), tag.clone())
            }
            Reference::Registry { repo, target, .. } => (
                repo.rsplit('/').next().unwrap_or(repo).to_owned(),
                match target {
                    Target::Tag(t) => Some(t.clone()),
                    Target::Digest(d) => Some(d.hex()[..12].to_owned()),
                },
            ),
        };
        let raw = match tag {
            Some(t) => format!("{base}-{}", t.rsplit(':').next().unwrap_or(&t)),
            None => base,
        };
        let cleaned: String = raw.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '-' }).collect();
        cleaned.trim_start_matches(['.', '_', '-']).chars().take(128).collect()
    }
}

fn parse_registry(rest: &str) -> Result<Reference, String> {
    let (name, digest) = match rest.split_once('@') {
        Some((n, d)) => (n, Some(d.parse::<Digest>().map_err(|e| e.to_string())?)),
        None => (rest, None),
    };
    let (host, path) = name.split_once('/').ok_or("expected HOST[:PORT]/REPO: spell the registry host")?;
    if !(host.contains('.') || host.contains(':') || host == "localhost") {
        return Err(format!("{host:?} is not a registry host: spell the host, e.g. docker://127.0.0.1:5000/{name}"));
    }
    let (repo, tag) = match path.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => (r, Some(t)),
        _ => (path, None),
    };
    let repo_ok =
        !repo.is_empty() && repo.split('/').all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)));
    if !repo_ok {
        return Err(format!("invalid repository name {repo:?} (lower-case letters, digits, . _ - and /)"));
    }
    let target = match (tag, digest) {
        (_, Some(d)) => Target::Digest(d),
        (Some(t), None) => {
            if t.is_empty() || t.len() > 128 || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
                return Err(format!("invalid tag {t:?}"));
            }
            Target::Tag(t.to_owned())
        }
        (None, None) => Target::Tag("latest".into()),
    };
    Ok(Reference::Registry { host: host.to_owned(), repo: repo.to_owned(), target })
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Layout { dir, tag: Some(t) } => write!(f, "oci:{}:{t}", dir.display()),
            Reference::Layout { dir, tag: None } => write!(f, "oci:{}", dir.display()),
            Reference::Archive { file, tag: Some(t) } => write!(f, "docker-archive:{}:{t}", file.display()),
            Reference::Archive { file, tag: None } => write!(f, "docker-archive:{}", file.display()),
            Reference::Registry { host, repo, target: Target::Tag(t) } => write!(f, "docker://{host}/{repo}:{t}"),
            Reference::Registry { host, repo, target: Target::Digest(d) } => write!(f, "docker://{host}/{repo}@{d}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports() {
        assert_eq!(Reference::parse("oci:./layout:py").unwrap(), Reference::Layout { dir: "./layout".into(), tag: Some("py".into()) });
        assert_eq!(Reference::parse("oci:/x").unwrap(), Reference::Layout { dir: "/x".into(), tag: None });
        assert_eq!(Reference::parse("docker-archive:img.tar").unwrap(), Reference::Archive { file: "img.tar".into(), tag: None });
        let r = Reference::parse("docker://127.0.0.1:5000/team/app:v1").unwrap();
        assert_eq!(r, Reference::Registry { host: "127.0.0.1:5000".into(), repo: "team/app".into(), target: Target::Tag("v1".into()) });
        assert_eq!(r.default_name(), "app-v1");
        assert_eq!(r.to_string(), "docker://127.0.0.1:5000/team/app:v1");
        let d = format!("docker://localhost/app@{}", Digest::sha256(b"x"));
        assert!(matches!(Reference::parse(&d).unwrap(), Reference::Registry { target: Target::Digest(_), .. }));
        assert!(matches!(
            Reference::parse("docker://localhost:5000/app").unwrap(),
            Reference::Registry { target: Target::Tag(t), .. } if t == "latest"
        ));
    }

    #[test]
    fn refusals() {
        for bad in ["app:v1", "docker://app:v1", "docker://h.io/UPPER", "oci:", "docker://h.io/a@sha256:zz", "http://x"] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }
}
