//! TLS for every network transport (NBD, the cache tier, peers): PEM files
//! to rustls configurations, on the `ring` provider.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Why a TLS configuration cannot be made, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {reason}", path.display())]
pub struct TlsError {
    /// What the file was to be.
    pub what: &'static str,
    /// The file.
    pub path: std::path::PathBuf,
    /// Why it cannot be used.
    pub reason: String,
}

fn err(what: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError { what, path: path.to_owned(), reason: reason.to_string() }
}

fn ring() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates in a PEM file (a chain: the leaf first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err("certificate file", path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err("certificate file", path, e))?;
    if certs.is_empty() {
        return Err(err("certificate file", path, "holds no CERTIFICATE"));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| err("key file", path, e))
}

/// The CA certificates in a PEM file, as trust roots.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path)? {
        roots.add(c).map_err(|e| err("CA file", path, e))?;
    }
    Ok(roots)
}

/// A server's TLS: its certificate and key, and, with `client_ca`,
/// mandatory client certificates signed by that CA. `alpn`: protocols to
/// offer (empty for NBD).
pub fn server_config(cert: &Path, key: &Path, client_ca: Option<&Path>, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(ring()).with_safe_default_protocol_versions().map_err(|e| err("TLS setup for", cert, e))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(Arc::new(load_roots(ca)?), ring()).build().map_err(|e| err("client CA file", ca, e))?,
        ),
    };
    let mut config = builder.with_single_cert(load_certs(cert)?, load_key(key)?).map_err(|e| err("certificate and key", cert, e))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A client's TLS: servers must present a certificate signed by `ca`;
/// `identity` (certificate, key) is presented to servers that ask.
pub fn client_config(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(ring()).with_safe_default_protocol_versions().map_err(|e| err("TLS setup for", ca, e))?;
    let builder = builder.with_root_certificates(load_roots(ca)?);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?).map_err(|e| err("certificate and key", cert, e)),
    }
}

/// The connector of an HTTP/2 client of our servers (cache nodes, the tree
/// manager, parents): TLS (ALPN `h2`) trusting `ca`, else cleartext HTTP/2
/// (prior knowledge); connections with TCP_NODELAY, made within `connect_timeout`.
pub fn h2_connector(
    ca: Option<&Path>,
    connect_timeout: std::time::Duration,
) -> Result<hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>, TlsError> {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.enforce_http(false);
    let tls = match ca {
        Some(ca) => client_config(ca, None)?,
        None => ClientConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth(),
    };
    Ok(hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http2().wrap_connector(connector))
}
