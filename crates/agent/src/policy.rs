//! Which exports a client may open, by the subject of its TLS certificate
//! (`tessera serve --exports-policy FILE`).
//!
//! ```json
//! {"clients": [
//!   {"subject": "CN=tenant-a,O=acme", "images": ["app", "web-*"], "labels": ["vm-"]},
//!   {"subject": "CN=ops,O=acme", "images": ["*"], "labels": [""]}
//! ]}
//! ```
//!
//! A client whose certificate's subject (RFC 4514, as `openssl x509
//! -nameopt RFC2253` prints it) is listed may open export `NAME` if an
//! entry of `images` matches it (exactly, or as a prefix ending in `*`), and
//! `NAME@LABEL` if, besides, `LABEL` starts with one of `labels` (none:
//! no writable views; `""`: any label). A client not listed opens nothing.

use std::path::Path;

use rustls::pki_types::CertificateDer;
use serde::Deserialize;

/// The grants of a policy file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportsPolicy {
    clients: Vec<Grant>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Grant {
    subject: String,
    images: Vec<String>,
    #[serde(default)]
    labels: Vec<String>,
}

/// Why a policy file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("exports policy {}: {reason}", path.display())]
pub struct PolicyError {
    path: std::path::PathBuf,
    reason: String,
}

impl ExportsPolicy {
    /// Reads a policy file.
    pub fn load(path: &Path) -> Result<ExportsPolicy, PolicyError> {
        let err = |reason: String| PolicyError { path: path.to_owned(), reason };
        let text = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let policy: ExportsPolicy = serde_json::from_slice(&text).map_err(|e| err(e.to_string()))?;
        for g in &policy.clients {
            if g.subject.trim().is_empty() {
                return Err(err("a client has an empty subject".into()));
            }
        }
        Ok(policy)
    }

    /// Whether the client `identity` (its certificate's subject; `None`
    /// without one) may open `export`.
    pub fn allows(&self, identity: Option<&str>, export: &str) -> bool {
        let Some(identity) = identity else { return false };
        let (name, label) = match export.split_once('@') {
            Some((n, l)) => (n, Some(l)),
            None => (export, None),
        };
        self.clients.iter().filter(|g| g.subject == identity).any(|g| {
            let image = g.images.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => p == name,
            });
            image && label.is_none_or(|l| g.labels.iter().any(|p| l.starts_with(p.as_str())))
        })
    }
}

/// The subject of a certificate, RFC 4514 style (`CN=tenant-a,O=acme`);
/// `None` for a certificate that does not parse.
pub fn subject(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::objects::{oid2abbrev, oid_registry};
    let (_, cert) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let mut rdns: Vec<String> = cert
        .subject()
        .iter()
        .map(|rdn| {
            rdn.iter()
                .map(|atv| {
                    let key = oid2abbrev(atv.attr_type(), oid_registry()).map(str::to_owned).unwrap_or_else(|_| atv.attr_type().to_id_string());
                    format!("{key}={}", escape(atv.as_str().unwrap_or("?")))
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.reverse();
    Some(rdns.join(","))
}

/// RFC 4514 escaping of an attribute value.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for (i, c) in v.chars().enumerate() {
        if matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=') || (i == 0 && (c == '#' || c == ' ')) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants() {
        let p: ExportsPolicy = serde_json::from_str(
            r#"{"clients": [{"subject": "CN=a,O=x", "images": ["app", "web-*"], "labels": ["vm-"]}, {"subject": "CN=ro,O=x", "images": ["*"]}]}"#,
        )
        .unwrap();
        assert!(p.allows(Some("CN=a,O=x"), "app"));
        assert!(p.allows(Some("CN=a,O=x"), "web-1"));
        assert!(p.allows(Some("CN=a,O=x"), "app@vm-7"));
        assert!(!p.allows(Some("CN=a,O=x"), "app@other"));
        assert!(!p.allows(Some("CN=a,O=x"), "db"));
        assert!(!p.allows(Some("CN=b,O=x"), "app"), "an unlisted subject opens nothing");
        assert!(!p.allows(None, "app"), "neither does a client without a certificate");
        assert!(p.allows(Some("CN=ro,O=x"), "anything"));
        assert!(!p.allows(Some("CN=ro,O=x"), "anything@label"), "no labels: no writable views");
        assert!(serde_json::from_str::<ExportsPolicy>(r#"{"clients": [], "extra": 1}"#).is_err());
    }
}
