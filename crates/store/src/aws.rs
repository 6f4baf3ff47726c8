//! What the AWS services share: credentials and region from the standard
//! variables and shared files, and Signature Version 4.

use std::collections::HashMap;
use std::path::PathBuf;

use ring::{digest, hmac};

/// Static credentials.
#[derive(Clone)]
pub(crate) struct Credentials {
    pub key_id: String,
    pub secret: String,
    pub token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({})", self.key_id)
    }
}

fn profile() -> String {
    std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into())
}

fn shared_file(var: &str, default: &str) -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| home.join(default))
}

/// The `[profile]` keys of the shared credentials file, then of the config file.
pub(crate) fn profile_keys() -> (HashMap<String, String>, HashMap<String, String>) {
    let p = profile();
    let creds = ini_section(shared_file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials"), &p);
    let config = ini_section(shared_file("AWS_CONFIG_FILE", ".aws/config"), &if p == "default" { p.clone() } else { format!("profile {p}") });
    (creds, config)
}

/// Credentials from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (and
/// `AWS_SESSION_TOKEN`), else from the shared files of `AWS_PROFILE`.
pub(crate) fn credentials() -> Option<Credentials> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let (Some(key_id), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        return Some(Credentials { key_id, secret, token: env("AWS_SESSION_TOKEN") });
    }
    let (creds, config) = profile_keys();
    let get = |k: &str| creds.get(k).or_else(|| config.get(k)).cloned();
    Some(Credentials { key_id: get("aws_access_key_id")?, secret: get("aws_secret_access_key")?, token: get("aws_session_token") })
}

/// The region from `AWS_REGION`, `AWS_DEFAULT_REGION` or the profile; else `us-east-1`.
pub(crate) fn region() -> String {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION")).or_else(|| profile_keys().1.get("region").cloned()).unwrap_or_else(|| "us-east-1".into())
}

/// The keys of `[section]` of an INI file (lower-cased), if any.
pub(crate) fn ini_section(path: PathBuf, section: &str) -> HashMap<String, String> {
    let Ok(text) = std::fs::read_to_string(path) else { return HashMap::new() };
    let (mut current, mut out) = (String::new(), HashMap::new());
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = s.split_whitespace().collect::<Vec<_>>().join(" ");
        } else if current == section {
            if let Some((k, v)) = line.split_once('=') {
                out.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
    }
    out
}

/// `YYYYMMDDTHHMMSSZ` for `secs` since the epoch.
pub(crate) fn amz_date(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, bytes))
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data).as_ref().to_vec()
}

/// Signs a POST of `body` to `/` on `host` for `service` in `region`
/// (Signature Version 4); returns the headers to send, `Authorization`
/// included. `headers` are the other headers to sign (lower-case names).
pub(crate) fn sign_post(
    creds: &Credentials,
    service: &str,
    region: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    now: u64,
) -> Vec<(String, String)> {
    let date = amz_date(now);
    let mut signed: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_owned())).collect();
    signed.push(("host".into(), host.to_owned()));
    signed.push(("x-amz-date".into(), date.clone()));
    if let Some(t) = &creds.token {
        signed.push(("x-amz-security-token".into(), t.clone()));
    }
    signed.sort();
    let names = signed.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(";");
    let canonical_headers: String = signed.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let request = format!("POST\n/\n\n{canonical_headers}\n{names}\n{}", sha256_hex(body));
    let scope = format!("{}/{region}/{service}/aws4_request", &date[..8]);
    let to_sign = format!("AWS4-HMAC-SHA256\n{date}\n{scope}\n{}", sha256_hex(request.as_bytes()));
    let mut key = hmac(format!("AWS4{}", creds.secret).as_bytes(), &date.as_bytes()[..8]);
    for part in [region, service, "aws4_request"] {
        key = hmac(&key, part.as_bytes());
    }
    let signature = hex::encode(hmac(&key, to_sign.as_bytes()));
    let mut out: Vec<(String, String)> = signed.into_iter().filter(|(k, _)| k != "host").collect();
    out.push(("authorization".into(), format!("AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={names}, Signature={signature}", creds.key_id)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(amz_date(0), "19700101T000000Z");
        assert_eq!(amz_date(1_440_938_160), "20150830T123600Z");
        assert_eq!(amz_date(951_782_400), "20000229T000000Z");
    }

    // The example of AWS's Signature Version 4 documentation (an IAM
    // ListUsers request is a GET; this checks the key derivation, the part
    // shared by every request).
    #[test]
    fn signing_key_matches_the_documented_example() {
        let mut key = hmac(b"AWS4wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", b"20150830");
        for part in ["us-east-1", "iam", "aws4_request"] {
            key = hmac(&key, part.as_bytes());
        }
        assert_eq!(hex::encode(&key), "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9");
        let to_sign =
            "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/iam/aws4_request\nf536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59";
        assert_eq!(hex::encode(hmac(&key, to_sign.as_bytes())), "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7");
    }

    #[test]
    fn profiles_are_read_from_the_shared_files() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("credentials");
        std::fs::write(&creds, "[default]\naws_access_key_id = A\naws_secret_access_key = B\n[work]\naws_access_key_id=W\naws_secret_access_key = X\n")
            .unwrap();
        let s = ini_section(creds.clone(), "work");
        assert_eq!(s.get("aws_access_key_id").map(String::as_str), Some("W"));
        assert_eq!(ini_section(creds, "none").len(), 0);
    }
}
