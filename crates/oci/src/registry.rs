//! `docker://HOST[:PORT]/REPO[:TAG|@DIGEST]`: the OCI distribution spec's
//! pull side, with bearer-token and basic auth.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

use crate::spec::{self, Document};
use crate::{assemble, check_document, read_limited, BlobLocation, Digest, Error, Progress, PullOptions, Reference, ResolvedImage, Spool, Target};

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// A registry session for one repository.
struct Client {
    agent: ureq::Agent,
    base: String,
    repo: String,
    creds: Option<(String, String)>,
    /// The `Authorization` header value once a challenge was answered.
    auth: Mutex<Option<String>>,
}

pub(crate) fn resolve(reference: &Reference, options: &PullOptions, spool_dir: &Path, progress: &dyn Progress) -> Result<ResolvedImage, Error> {
    let Reference::Registry { host, repo, target } = reference else { unreachable!("called for registry references") };
    let creds = match &options.creds {
        Some(c) => Some(c.split_once(':').map(|(u, p)| (u.to_owned(), p.to_owned())).ok_or_else(|| Error::Auth("--creds must be USER:PASSWORD".into()))?),
        None => creds_from_config(host),
    };
    let scheme = if options.insecure { "http" } else { "https" };
    let client = Client {
        agent: ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(15)).timeout_read(Duration::from_secs(120)).redirects(0).build(),
        base: format!("{scheme}://{host}/v2/{repo}"),
        repo: repo.clone(),
        creds,
        auth: Mutex::new(None),
    };

    let (mut digest, mut bytes, mut content_type) = match target {
        Target::Digest(d) => {
            let (b, ct) = client.manifest(&d.to_string())?;
            check_document(&b, d, "image manifest")?;
            (d.clone(), b, ct)
        }
        Target::Tag(t) => {
            let (b, ct) = client.manifest(t)?;
            (Digest::sha256(&b), b, ct)
        }
    };
    for _ in 0..4 {
        match Document::parse(&bytes, content_type.as_deref())? {
            Document::Index(index) => {
                let d = spec::pick_platform(&index, &options.platform)?.clone();
                let (b, ct) = client.manifest(&d.digest.to_string())?;
                check_document(&b, &d.digest, "image manifest")?;
                (digest, bytes, content_type) = (d.digest, b, ct);
            }
            Document::Manifest(m) => {
                let config_bytes = read_limited(client.blob(&m.config.digest)?, spec::MAX_CONFIG, "image config")?;
                check_document(&config_bytes, &m.config.digest, "image config")?;
                fs::create_dir_all(spool_dir).map_err(|e| Error::io(spool_dir, e))?;
                let spool = Spool(spool_dir.join(format!("pull-{}-{}", std::process::id(), &digest.hex()[..12])));
                fs::create_dir_all(&spool.0).map_err(|e| Error::io(&spool.0, e))?;
                progress.start("downloading layers", m.layers.iter().map(|l| l.size).sum());
                let mut layers = Vec::new();
                for (i, l) in m.layers.iter().enumerate() {
                    let compression = spec::layer_compression(&l.media_type)?;
                    let what = format!("layer {}/{} {}", i + 1, m.layers.len(), l.digest);
                    let path = client.download(&l.digest, l.size, &spool.0, &what, progress)?;
                    layers.push((l.clone(), compression, BlobLocation::whole(path, l.size)));
                }
                return assemble(reference, digest, m.config.digest.clone(), &config_bytes, layers, Some(spool), false);
            }
        }
    }
    Err(Error::BadDocument("image indexes nested too deeply".into()))
}

impl Client {
    fn manifest(&self, reference: &str) -> Result<(Vec<u8>, Option<String>), Error> {
        let url = format!("{}/manifests/{reference}", self.base);
        let resp = self.get(&url, Some(ACCEPT))?;
        let ct = resp.header("Content-Type").map(str::to_owned);
        let bytes = read_limited(resp.into_reader(), spec::MAX_MANIFEST, "image manifest")?;
        Ok((bytes, ct))
    }

    fn blob(&self, digest: &Digest) -> Result<Box<dyn Read + Send + Sync>, Error> {
        let url = format!("{}/blobs/{digest}", self.base);
        Ok(self.get(&url, None)?.into_reader())
    }

    /// Streams a blob into the spool while hashing it; refuses a mismatch.
    fn download(&self, digest: &Digest, size: u64, spool: &Path, what: &str, progress: &dyn Progress) -> Result<PathBuf, Error> {
        let path = spool.join(digest.hex());
        let mut last_err = None;
        for attempt in 0..3 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(500 << attempt));
            }
            let mut body = match self.blob(digest) {
                Ok(b) => b,
                Err(e @ Error::Network { .. }) => {
                    last_err = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut out = File::create(&path).map_err(|e| Error::io(&path, e))?;
            let mut hasher = digest.hasher();
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0u64;
            let copy: Result<(), std::io::Error> = (|| loop {
                let n = body.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                got += n as u64;
                if got > size {
                    return Err(std::io::Error::other("blob is larger than its descriptor says"));
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n])?;
                progress.advance(n as u64);
            })();
            match copy {
                Ok(()) => {
                    let actual = hasher.finish();
                    if &actual != digest || got != size {
                        let _ = fs::remove_file(&path);
                        return Err(Error::DigestMismatch {
                            what: what.to_owned(),
                            expected: digest.to_string(),
                            actual: format!("{actual} ({got} of {size} bytes)"),
                        });
                    }
                    return Ok(path);
                }
                Err(e) => {
                    let _ = fs::remove_file(&path);
                    last_err = Some(Error::Network { url: format!("{}/blobs/{digest}", self.base), reason: e.to_string() });
                }
            }
        }
        Err(last_err.expect("three attempts ran"))
    }

    /// GET with auth challenges answered and redirects followed (dropping
    /// our credentials when the redirect leaves the registry).
    fn get(&self, url: &str, accept: Option<&str>) -> Result<ureq::Response, Error> {
        let mut url = url.to_owned();
        let mut send_auth = true;
        let mut answered = false;
        for _ in 0..8 {
            let mut req = self.agent.get(&url);
            if let Some(a) = accept {
                req = req.set("Accept", a);
            }
            if send_auth {
                if let Some(h) = self.auth.lock().expect("no panics while holding the lock").as_deref() {
                    req = req.set("Authorization", h);
                }
            }
            match req.call() {
                Ok(resp) if (300..400).contains(&resp.status()) => {
                    let loc = resp.header("Location").ok_or_else(|| Error::Registry {
                        url: url.clone(),
                        status: resp.status(),
                        body: "redirect without a Location".into(),
                    })?;
                    let next = join_url(&url, loc);
                    send_auth = same_origin(&url, &next) && send_auth;
                    url = next;
                }
                Ok(resp) => return Ok(resp),
                Err(ureq::Error::Status(401, resp)) if !answered && send_auth => {
                    let challenge = resp.header("WWW-Authenticate").unwrap_or("").to_owned();
                    let header = self.answer(&challenge, &url)?;
                    *self.auth.lock().expect("no panics while holding the lock") = Some(header);
                    answered = true;
                }
                Err(ureq::Error::Status(401, _)) | Err(ureq::Error::Status(403, _)) => {
                    let who = if self.creds.is_some() { "refused the credentials" } else { "needs credentials (--creds USER:PASS or docker login)" };
                    return Err(Error::Auth(format!("registry {url}: {who}")));
                }
                Err(ureq::Error::Status(404, _)) => {
                    return Err(Error::NotFound(format!("{url}: not found in repository {}", self.repo)));
                }
                Err(ureq::Error::Status(status, resp)) => {
                    let body: String = resp.into_string().unwrap_or_default().chars().take(300).collect();
                    return Err(Error::Registry { url, status, body });
                }
                Err(ureq::Error::Transport(t)) => return Err(Error::Network { url, reason: t.to_string() }),
            }
        }
        Err(Error::Registry { url, status: 310, body: "too many redirects".into() })
    }

    /// Answers a `WWW-Authenticate` challenge: fetches a bearer token, or
    /// sends basic credentials.
    fn answer(&self, challenge: &str, url: &str) -> Result<String, Error> {
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        let params = parse_challenge(params);
        let basic = || self.creds.as_ref().map(|(u, p)| format!("Basic {}", B64.encode(format!("{u}:{p}"))));
        if scheme.eq_ignore_ascii_case("basic") {
            return basic().ok_or_else(|| Error::Auth(format!("registry {url} needs credentials (--creds USER:PASS)")));
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Error::Auth(format!("registry {url}: unsupported auth scheme {scheme:?}")));
        }
        let realm = params
            .iter()
            .find(|(k, _)| k == "realm")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| Error::Auth(format!("registry {url}: bearer challenge without a realm")))?;
        let mut req = self.agent.get(&realm);
        if let Some(service) = params.iter().find(|(k, _)| k == "service") {
            req = req.query("service", &service.1);
        }
        let scope = params.iter().find(|(k, _)| k == "scope").map(|(_, v)| v.clone()).unwrap_or_else(|| format!("repository:{}:pull", self.repo));
        req = req.query("scope", &scope);
        if let Some(b) = basic() {
            req = req.set("Authorization", &b);
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(s, _)) if s == 401 || s == 403 => return Err(Error::Auth(format!("token service {realm} refused the credentials"))),
            Err(e) => return Err(Error::Network { url: realm, reason: e.to_string() }),
        };
        let body = read_limited(resp.into_reader(), 1 << 20, "token response")?;
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| Error::Auth(format!("token response: {e}")))?;
        let token =
            v.get("token").or_else(|| v.get("access_token")).and_then(|t| t.as_str()).ok_or_else(|| Error::Auth("token response has no token".into()))?;
        Ok(format!("Bearer {token}"))
    }
}

/// Parses `k="v",k2="v2"` (values may be quoted and contain commas).
fn parse_challenge(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while let Some((k, after)) = rest.split_once('=') {
        let key = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (q[..end].to_owned(), &q[end + 1..]),
                None => (q.to_owned(), ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (after[..end].trim().to_owned(), &after[end..]),
                None => (after.trim().to_owned(), ""),
            }
        };
        out.push((key, value));
        rest = next.trim_start().trim_start_matches(',');
    }
    out
}

fn origin(url: &str) -> &str {
    let after = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let end = after.find('/').unwrap_or(after.len());
    &url[..url.len() - after.len() + end]
}

fn same_origin(a: &str, b: &str) -> bool {
    origin(a) == origin(b)
}

fn join_url(base: &str, loc: &str) -> String {
    if loc.contains("://") {
        loc.to_owned()
    } else if loc.starts_with('/') {
        format!("{}{loc}", origin(base))
    } else {
        format!("{}/{loc}", base.rsplit_once('/').map(|(b, _)| b).unwrap_or(base))
    }
}

/// Credentials for `host` from `$REGISTRY_AUTH_FILE`, containers'
/// `auth.json`, or the docker config (`$DOCKER_CONFIG/config.json`, `~/.docker/config.json`).
fn creds_from_config(host: &str) -> Option<(String, String)> {
    let mut files: Vec<PathBuf> = Vec::new();
    if let Some(f) = std::env::var_os("REGISTRY_AUTH_FILE") {
        files.push(f.into());
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        files.push(Path::new(&d).join("containers/auth.json"));
    }
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        files.push(Path::new(&d).join("config.json"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        files.push(Path::new(&h).join(".docker/config.json"));
    }
    for f in files {
        let Ok(bytes) = fs::read(&f) else { continue };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else { continue };
        let Some(auths) = v.get("auths").and_then(|a| a.as_object()) else { continue };
        for (key, entry) in auths {
            let key_host = key.trim_start_matches("https://").trim_start_matches("http://").split('/').next().unwrap_or("");
            if key_host != host {
                continue;
            }
            if let Some(auth) = entry.get("auth").and_then(|a| a.as_str()) {
                if let Some((u, p)) =
                    B64.decode(auth).ok().and_then(|d| String::from_utf8(d).ok()).and_then(|s| s.split_once(':').map(|(u, p)| (u.to_owned(), p.to_owned())))
                {
                    return Some((u, p));
                }
            }
            if let (Some(u), Some(p)) = (entry.get("username").and_then(|x| x.as_str()), entry.get("password").and_then(|x| x.as_str())) {
                return Some((u.to_owned(), p.to_owned()));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let p = parse_challenge(r#"realm="https://auth.example/token",service="registry",scope="repository:a/b:pull,push""#);
        assert_eq!(p[0], ("realm".into(), "https://auth.example/token".into()));
        assert_eq!(p[2], ("scope".into(), "repository:a/b:pull,push".into()));
        assert!(parse_challenge("").is_empty());
    }

    #[test]
    fn redirects() {
        assert_eq!(join_url("http://h:5000/v2/a/blobs/x", "/v2/b"), "http://h:5000/v2/b");
        assert!(same_origin("http://h:5000/a", "http://h:5000/b"));
        assert!(!same_origin("http://h:5000/a", "https://s3.example/b"));
    }
}
