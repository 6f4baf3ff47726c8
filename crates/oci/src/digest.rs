//! Content digests (`sha256:…`, `sha512:…`) and readers that check them.

use std::fmt;
use std::io::{self, Read};
use std::str::FromStr;

use ring::digest::{Context, SHA256, SHA512};

use crate::Error;

/// A content digest as OCI spells it: `ALGORITHM:HEX`.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Algorithm {
    Sha256,
    Sha512,
}

impl Digest {
    /// The SHA-256 digest of `bytes`.
    pub fn sha256(bytes: &[u8]) -> Digest {
        let mut h = Hasher::new_sha256();
        h.update(bytes);
        h.finish()
    }

    /// The hex part.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// A hasher of the same algorithm.
    pub fn hasher(&self) -> Hasher {
        Hasher {
            ctx: Context::new(match self.algorithm {
                Algorithm::Sha256 => &SHA256,
                Algorithm::Sha512 => &SHA512,
            }),
            algorithm: self.algorithm,
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let alg = match self.algorithm {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        };
        write!(f, "{alg}:{}", self.hex)
    }
}

impl FromStr for Digest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Digest, Error> {
        let bad = || Error::BadDigest(s.chars().take(100).collect());
        let (alg, hex) = s.split_once(':').ok_or_else(bad)?;
        let (algorithm, len) = match alg {
            "sha256" => (Algorithm::Sha256, 64),
            "sha512" => (Algorithm::Sha512, 128),
            _ => return Err(bad()),
        };
        if hex.len() != len || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad());
        }
        Ok(Digest { algorithm, hex: hex.to_owned() })
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// An incremental digest.
pub struct Hasher {
    ctx: Context,
    algorithm: Algorithm,
}

impl Hasher {
    /// A SHA-256 hasher.
    pub fn new_sha256() -> Hasher {
        Hasher { ctx: Context::new(&SHA256), algorithm: Algorithm::Sha256 }
    }

    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.ctx.update(bytes);
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        Digest { algorithm: self.algorithm, hex: hex::encode(self.ctx.finish().as_ref()) }
    }
}

/// Hashes everything read through it; at the end of the stream, fails with
/// `InvalidData` unless the digest matches `expected`.
pub struct VerifyingReader<R> {
    inner: R,
    hasher: Option<Hasher>,
    expected: Digest,
    what: String,
}

impl<R: Read> VerifyingReader<R> {
    /// Wraps `inner`; `what` names the blob in the error.
    pub fn new(inner: R, expected: Digest, what: String) -> Self {
        VerifyingReader { inner, hasher: Some(expected.hasher()), expected, what }
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            if let Some(h) = self.hasher.as_mut() {
                h.update(&buf[..n]);
            }
        } else if !buf.is_empty() {
            if let Some(h) = self.hasher.take() {
                let got = h.finish();
                if got != self.expected {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{}: digest mismatch: expected {}, got {got}", self.what, self.expected)));
                }
            }
        }
        Ok(n)
    }
}

/// Hashes a whole stream.
pub fn digest_of(mut r: impl Read, like: &Digest) -> io::Result<(Digest, u64)> {
    let mut h = like.hasher();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok((h.finish(), total));
        }
        total += n as u64;
        h.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        let d = Digest::sha256(b"abc");
        assert_eq!(d.to_string(), "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        for bad in ["sha256:xyz", "md5:00", "sha256", "sha256:BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD"] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
    }

    #[test]
    fn verifying_reader_refuses_a_mismatch() {
        let mut ok = VerifyingReader::new(&b"abc"[..], Digest::sha256(b"abc"), "blob".into());
        std::io::copy(&mut ok, &mut std::io::sink()).unwrap();
        let mut bad = VerifyingReader::new(&b"abd"[..], Digest::sha256(b"abc"), "blob".into());
        let err = std::io::copy(&mut bad, &mut std::io::sink()).unwrap_err();
        assert!(err.to_string().contains("digest mismatch"));
    }
}
