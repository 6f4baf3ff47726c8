//! What travels between the tier client and the cache nodes.
//!
//! A node stores opaque stripes under `/v1/stripes/CHUNK/INDEX` (`GET`
//! fetches one, `PUT` keeps one); every request carries
//! `Authorization: Bearer TOKEN` when the node has a token. A stripe is a
//! 12-byte header and its share of the sealed chunk:
//!
//! ```text
//! "TSTR" | version 1 | k | m | index | sealed chunk length (u32, LE) | stripe
//! ```
//!
//! The header lets a client rebuild a chunk from any `k` stripes without
//! knowing the chunk's length in advance, and refuse a stripe written with
//! another code. The node never looks inside.

use std::fmt;
use std::str::FromStr;

use tessera_chunk::ChunkId;

use crate::disk::DiskKey;

/// Where one stripe of one chunk is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StripeKey {
    /// The chunk.
    pub chunk: ChunkId,
    /// Which of its `k + m` stripes.
    pub index: u8,
}

impl StripeKey {
    /// The URL path of the stripe on a node.
    pub fn path(&self) -> String {
        format!("{PREFIX}{}/{}", self.chunk, self.index)
    }

    /// Parses a URL path made by [`StripeKey::path`].
    pub fn from_path(path: &str) -> Option<StripeKey> {
        let (chunk, index) = path.strip_prefix(PREFIX)?.split_once('/')?;
        Some(StripeKey { chunk: chunk.parse().ok()?, index: parse_index(index)? })
    }
}

/// Where stripes live on a node.
pub const PREFIX: &str = "/v1/stripes/";

fn parse_index(s: &str) -> Option<u8> {
    // Canonical decimal only, so one stripe has one name.
    if s.is_empty() || s.len() > 3 || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.parse().ok()
}

/// The file name in a node's disk cache: `CHUNK.INDEX`.
impl fmt::Display for StripeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.chunk, self.index)
    }
}

impl FromStr for StripeKey {
    type Err = ();
    fn from_str(s: &str) -> Result<StripeKey, ()> {
        let (chunk, index) = s.split_once('.').ok_or(())?;
        Ok(StripeKey { chunk: chunk.parse().map_err(|_| ())?, index: parse_index(index).ok_or(())? })
    }
}

impl DiskKey for StripeKey {
    fn chunk(&self) -> ChunkId {
        self.chunk
    }
}

/// The header of a stripe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StripeHeader {
    /// Data stripes of the code.
    pub k: u8,
    /// Parity stripes of the code.
    pub m: u8,
    /// This stripe's index.
    pub index: u8,
    /// Length of the sealed chunk the stripes rebuild.
    pub chunk_len: u32,
}

const MAGIC: &[u8; 4] = b"TSTR";
const VERSION: u8 = 1;

/// Bytes of a stripe's header.
pub const HEADER_LEN: usize = 12;

/// The largest stripe either side accepts (a whole sealed chunk as one
/// stripe, with room to spare).
pub const MAX_STRIPE: usize = 4 << 20;

impl StripeHeader {
    /// A stripe: this header followed by `body`.
    pub fn wrap(&self, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[VERSION, self.k, self.m, self.index]);
        out.extend_from_slice(&self.chunk_len.to_le_bytes());
        out.extend_from_slice(body);
        out
    }

    /// The header of `stripe`, if it has a valid one.
    pub fn parse(stripe: &[u8]) -> Option<StripeHeader> {
        let h = stripe.get(..HEADER_LEN)?;
        if &h[..4] != MAGIC || h[4] != VERSION {
            return None;
        }
        Some(StripeHeader { k: h[5], m: h[6], index: h[7], chunk_len: u32::from_le_bytes(h[8..12].try_into().expect("4 bytes")) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_reject_aliases() {
        let key = StripeKey { chunk: ChunkId([0xab; 32]), index: 4 };
        assert_eq!(StripeKey::from_path(&key.path()), Some(key));
        assert_eq!(key.to_string().parse::<StripeKey>(), Ok(key));
        let hex = key.chunk.to_hex();
        for bad in [format!("{PREFIX}{hex}/04"), format!("{PREFIX}{hex}/256"), format!("{PREFIX}{hex}/"), format!("{PREFIX}{hex}"), format!("{PREFIX}zz/1"), format!("{PREFIX}{hex}/1/2")] {
            assert_eq!(StripeKey::from_path(&bad), None, "{bad}");
        }
    }

    #[test]
    fn headers_round_trip() {
        let h = StripeHeader { k: 4, m: 1, index: 3, chunk_len: 524_304 };
        let s = h.wrap(b"body");
        assert_eq!(StripeHeader::parse(&s), Some(h));
        assert_eq!(&s[HEADER_LEN..], b"body");
        assert_eq!(StripeHeader::parse(&s[..11]), None);
        assert_eq!(StripeHeader::parse(b"XSTR\x01\x04\x01\x00\x00\x00\x00\x00"), None);
    }
}
