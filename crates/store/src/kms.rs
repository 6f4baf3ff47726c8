//! Envelope keys from a key management service (the AWS KMS API): a
//! [`Keyring`] in which no master key ever leaves the service.
//!
//! - A manifest's data key comes from `GenerateDataKey` with the encryption
//!   context `{"tessera:tenant": T, "tessera:image": NAME}`; a reader gets
//!   it back from `Decrypt` with the same context, which the service checks
//!   (and which an IAM condition can tie to the caller: see
//!   `docs/policies/`).
//! - The store's base salt is a data key too, made once by `tessera keyring
//!   init` (context `{"tessera:purpose": "salt"}`) and kept wrapped in the
//!   store (`keyring.kms.json`): only a role allowed to decrypt it (the
//!   importer) can seal chunks.
//! - A worker configured for one tenant (`kms://KEY?tenant=A`) asks every
//!   `Decrypt` for that tenant, so the service refuses other tenants' keys.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tessera_chunk::{DataKey, DedupScope, KeyContext, KeyProvider, Keyring, Salt, WrappedKey};

use crate::control::Control;
use crate::{Error, Result};

/// Where a key service's keyring is: `kms://KEY_ID[?endpoint=URL&region=R&tenant=T]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KmsUrl {
    /// Key id, ARN or `alias/NAME`.
    pub key_id: String,
    /// Endpoint, overriding `AWS_ENDPOINT_URL_KMS` and `AWS_ENDPOINT_URL`.
    pub endpoint: Option<String>,
    /// Region, overriding `AWS_REGION`.
    pub region: Option<String>,
    /// The one tenant this host reads for, if it is a worker of one tenant.
    pub tenant: Option<String>,
}

impl KmsUrl {
    /// Parses `kms://…`; `None` if `url` is not a `kms://` URL.
    pub fn parse(url: &str) -> Option<Result<KmsUrl>> {
        let rest = url.strip_prefix("kms://")?;
        let bad = |why: String| Error::BadStoreUrl { url: url.to_owned(), reason: why };
        let (key, query) = rest.split_once('?').unwrap_or((rest, ""));
        if key.is_empty() {
            return Some(Err(bad("kms:// needs a key id, ARN or alias/NAME".into())));
        }
        let mut out = KmsUrl { key_id: key.to_owned(), endpoint: None, region: None, tenant: None };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "endpoint" => out.endpoint = Some(v.to_owned()),
                "region" => out.region = Some(v.to_owned()),
                "tenant" => out.tenant = Some(v.to_owned()),
                other => return Some(Err(bad(format!("unknown parameter {other:?} (use endpoint, region, tenant)")))),
            }
        }
        Some(Ok(out))
    }
}

/// The store document that keeps the wrapped salt.
const KEYRING_KEY: &str = "keyring.kms.json";

#[derive(Serialize, Deserialize)]
struct KeyringDoc {
    format: u32,
    key_id: String,
    salt: String,
    #[serde(default)]
    dedup_scope: DedupScope,
}

/// A client of the KMS JSON API.
struct Client {
    agent: ureq::Agent,
    endpoint: String,
    host: String,
    region: String,
    key_id: String,
}

impl Client {
    fn new(url: &KmsUrl) -> Client {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let region = url.region.clone().unwrap_or_else(crate::aws::region);
        let endpoint = url
            .endpoint
            .clone()
            .or_else(|| env("AWS_ENDPOINT_URL_KMS"))
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .unwrap_or_else(|| format!("https://kms.{region}.amazonaws.com"));
        let endpoint = endpoint.trim_end_matches('/').to_owned();
        let host = endpoint.split_once("://").map(|(_, h)| h).unwrap_or(&endpoint).split('/').next().unwrap_or_default().to_owned();
        let agent = ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(3)).timeout(Duration::from_secs(10)).redirects(0).build();
        Client { agent, endpoint, host, region, key_id: url.key_id.clone() }
    }

    fn fail(&self, op: &'static str, reason: String) -> tessera_chunk::Error {
        tessera_chunk::Error::KeyService(format!("KMS {op} (key {}, at {}): {reason}", self.key_id, self.endpoint))
    }

    /// Calls `TrentService.OP` with `body`; the answer's JSON.
    fn call(&self, op: &'static str, body: serde_json::Value) -> tessera_chunk::Result<serde_json::Value> {
        let creds = crate::aws::credentials()
            .ok_or_else(|| self.fail(op, "no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)".into()))?;
        let body = body.to_string();
        let target = format!("TrentService.{op}");
        let headers = crate::aws::sign_post(
            &creds,
            "kms",
            &self.region,
            &self.host,
            &[("content-type", "application/x-amz-json-1.1"), ("x-amz-target", &target)],
            body.as_bytes(),
            crate::lifecycle::unix_now(),
        );
        let mut req = self.agent.post(&format!("{}/", self.endpoint));
        for (k, v) in &headers {
            req = req.set(k, v);
        }
        match req.send_string(&body) {
            Ok(resp) => {
                let text = resp.into_string().map_err(|e| self.fail(op, format!("unreadable answer: {e}")))?;
                serde_json::from_str(&text).map_err(|e| self.fail(op, format!("unreadable answer: {e}")))
            }
            Err(ureq::Error::Status(code, resp)) => {
                let text = resp.into_string().unwrap_or_default();
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                let kind = v["__type"].as_str().unwrap_or("error").rsplit('#').next().unwrap_or("error").to_owned();
                let message = v["message"].as_str().or(v["Message"].as_str()).unwrap_or(&text).to_owned();
                let hint = match kind.as_str() {
                    "AccessDeniedException" | "AccessDenied" => " (this host's credentials may not use this key for this)",
                    "InvalidCiphertextException" => " (the key was wrapped for another tenant, image or key: the service refuses to unwrap it here)",
                    _ => "",
                };
                Err(self.fail(op, format!("{code} {kind}: {message}{hint}")))
            }
            Err(e) => Err(self.fail(op, e.to_string())),
        }
    }

    fn bytes(&self, op: &'static str, v: &serde_json::Value, field: &str) -> tessera_chunk::Result<Vec<u8>> {
        v[field].as_str().and_then(|s| B64.decode(s).ok()).ok_or_else(|| self.fail(op, format!("the answer has no {field}")))
    }

    fn generate(&self, context: serde_json::Value) -> tessera_chunk::Result<([u8; 32], Vec<u8>)> {
        let v = self.call("GenerateDataKey", json!({ "KeyId": self.key_id, "KeySpec": "AES_256", "EncryptionContext": context }))?;
        let plain: [u8; 32] =
            self.bytes("GenerateDataKey", &v, "Plaintext")?.try_into().map_err(|_| self.fail("GenerateDataKey", "not a 256-bit key".into()))?;
        Ok((plain, self.bytes("GenerateDataKey", &v, "CiphertextBlob")?))
    }

    fn decrypt(&self, blob: &[u8], context: serde_json::Value) -> tessera_chunk::Result<[u8; 32]> {
        let v = self.call("Decrypt", json!({ "KeyId": self.key_id, "CiphertextBlob": B64.encode(blob), "EncryptionContext": context }))?;
        self.bytes("Decrypt", &v, "Plaintext")?.try_into().map_err(|_| self.fail("Decrypt", "not a 256-bit key".into()))
    }
}

fn context(tenant: &str, image: &str) -> serde_json::Value {
    json!({ "tessera:tenant": tenant, "tessera:image": image })
}

/// Keys from a key service.
pub struct KmsKeyring {
    url: KmsUrl,
    client: Client,
    control: Arc<dyn Control>,
    salt: OnceLock<Salt>,
}

impl KmsKeyring {
    /// The keyring of `url` for the store whose documents are `control`.
    /// Sends nothing yet.
    pub fn open(url: &KmsUrl, control: Arc<dyn Control>) -> KmsKeyring {
        KmsKeyring { url: url.clone(), client: Client::new(url), control, salt: OnceLock::new() }
    }

    /// Makes the store's salt with the key service and keeps it wrapped in
    /// the store; fails if the store has one already.
    pub fn init(url: &KmsUrl, control: Arc<dyn Control>, scope: DedupScope) -> Result<KmsKeyring> {
        let k = KmsKeyring::open(url, control);
        let (_, blob) = k.client.generate(json!({ "tessera:purpose": "salt" }))?;
        let doc = KeyringDoc { format: 1, key_id: url.key_id.clone(), salt: B64.encode(blob), dedup_scope: scope };
        if !k.control.write(KEYRING_KEY, &serde_json::to_vec_pretty(&doc).expect("the keyring serialises"), None)? {
            return Err(tessera_chunk::Error::Keyring {
                path: KEYRING_KEY.into(),
                reason: "the store has a key-service keyring already; it is never replaced".into(),
            }
            .into());
        }
        Ok(k)
    }

    fn doc(&self) -> tessera_chunk::Result<Option<KeyringDoc>> {
        let kerr = |reason: String| tessera_chunk::Error::Keyring { path: format!("{KEYRING_KEY} in the store"), reason };
        match self.control.read(KEYRING_KEY).map_err(|e| kerr(e.to_string()))? {
            None => Ok(None),
            Some((bytes, _)) => serde_json::from_slice(&bytes).map(Some).map_err(|e| kerr(e.to_string())),
        }
    }
}

impl KeyProvider for KmsKeyring {
    fn new_key(&self, ctx: &KeyContext) -> tessera_chunk::Result<(DataKey, WrappedKey)> {
        let (plain, blob) = self.client.generate(context(ctx.tenant, ctx.image))?;
        Ok((DataKey::from_bytes(plain), WrappedKey(blob)))
    }

    fn wrap(&self, ctx: &KeyContext, key: &DataKey) -> tessera_chunk::Result<WrappedKey> {
        let v = self.client.call(
            "Encrypt",
            json!({ "KeyId": self.url.key_id, "Plaintext": B64.encode(key.as_bytes()), "EncryptionContext": context(ctx.tenant, ctx.image) }),
        )?;
        Ok(WrappedKey(self.client.bytes("Encrypt", &v, "CiphertextBlob")?))
    }

    fn unwrap(&self, ctx: &KeyContext, wrapped: &WrappedKey) -> tessera_chunk::Result<DataKey> {
        // A worker of one tenant asks as that tenant, whatever the image says.
        let tenant = self.url.tenant.as_deref().unwrap_or(ctx.tenant);
        let plain = self.client.decrypt(&wrapped.0, context(tenant, ctx.image)).map_err(|e| match &self.url.tenant {
            Some(mine) if mine != ctx.tenant => tessera_chunk::Error::KeyService(format!(
                "image {:?} belongs to tenant {:?}, and this host reads for tenant {mine:?} only: {e}",
                ctx.image, ctx.tenant
            )),
            _ => e,
        })?;
        Ok(DataKey::from_bytes(plain))
    }
}

impl Keyring for KmsKeyring {
    fn base_salt(&self) -> tessera_chunk::Result<Salt> {
        if let Some(s) = self.salt.get() {
            return Ok(s.clone());
        }
        let doc =
            self.doc()?.ok_or_else(|| tessera_chunk::Error::KeyringMissing { path: format!("{KEYRING_KEY} in the store (run `tessera keyring init`)") })?;
        let blob = B64.decode(&doc.salt).map_err(|e| tessera_chunk::Error::Keyring { path: KEYRING_KEY.into(), reason: e.to_string() })?;
        let salt = Salt::from_bytes(self.client.decrypt(&blob, json!({ "tessera:purpose": "salt" }))?);
        Ok(self.salt.get_or_init(|| salt).clone())
    }

    fn dedup_scope(&self) -> DedupScope {
        self.doc().ok().flatten().map(|d| d.dedup_scope).unwrap_or_default()
    }

    fn ensure_tenant(&mut self, _tenant: &str) -> tessera_chunk::Result<()> {
        Ok(())
    }

    fn describe(&self) -> String {
        format!("kms://{} at {}", self.url.key_id, self.client.endpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = KmsUrl::parse("kms://alias/tessera?endpoint=http://127.0.0.1:1&region=eu-west-1&tenant=acme").unwrap().unwrap();
        assert_eq!(u.key_id, "alias/tessera");
        assert_eq!(u.endpoint.as_deref(), Some("http://127.0.0.1:1"));
        assert_eq!(u.tenant.as_deref(), Some("acme"));
        assert!(KmsUrl::parse("/etc/keyring.json").is_none());
        assert!(KmsUrl::parse("kms://").unwrap().is_err());
        assert!(KmsUrl::parse("kms://k?colour=red").unwrap().is_err());
    }
}
