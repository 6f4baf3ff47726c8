//! What travels between the tier client and the cache nodes.
//!
//! A node keeps at most one stripe of each chunk, as an opaque blob under
//! `/v1/stripes/CHUNK` (`GET` fetches it, `PUT` keeps or replaces it);
//! every request carries `Authorization: Bearer TOKEN` when the node has a
//! token. A stripe is a 12-byte header and its share of the sealed chunk:
//!
//! ```text
//! "TSTR" | version 1 | k | m | index | sealed chunk length (u32, LE) | stripe
//! ```
//!
//! The index lives in the stripe, not in its name: when nodes join or
//! leave and a chunk's nodes change rank, each keeps the stripe it has and
//! a reader still finds `k` distinct ones. The header also lets a client
//! rebuild a chunk without knowing its length in advance, and refuse a
//! stripe written with another code. The node never looks inside.

use tessera_chunk::ChunkId;

/// Where stripes live on a node.
pub const PREFIX: &str = "/v1/stripes/";

/// The URL path of `chunk`'s stripe on a node.
pub fn path(chunk: &ChunkId) -> String {
    format!("{PREFIX}{chunk}")
}

/// The chunk a URL path made by [`path`] names.
pub fn chunk_of(path: &str) -> Option<ChunkId> {
    path.strip_prefix(PREFIX)?.parse().ok()
}

/// Why a stored stripe is not well formed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadStripe(pub String);

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

    /// Bytes of the body a stripe with this header must have.
    pub fn body_len(&self) -> usize {
        (self.chunk_len as usize).div_ceil(self.k.max(1) as usize).max(1)
    }

    /// The header of `stripe` if the stripe is well formed: a valid header
    /// of a code that can exist, and exactly the body that header calls
    /// for. What it cannot check (the bytes themselves) the reader checks
    /// against the chunk id.
    pub fn check(stripe: &[u8]) -> Result<StripeHeader, BadStripe> {
        let h = StripeHeader::parse(stripe).ok_or_else(|| BadStripe("it does not start with a stripe header".into()))?;
        let n = h.k as usize + h.m as usize;
        if h.k == 0 || n > 255 || h.index as usize >= n {
            return Err(BadStripe(format!("its header names stripe {} of a {}+{} code", h.index, h.k, h.m)));
        }
        if h.chunk_len == 0 || h.chunk_len as usize > MAX_STRIPE {
            return Err(BadStripe(format!("its header names a chunk of {} bytes", h.chunk_len)));
        }
        let body = stripe.len() - HEADER_LEN;
        if body != h.body_len() {
            return Err(BadStripe(format!(
                "its body is {body} bytes, but stripe {} of a {}-byte chunk in a {}+{} code is {}",
                h.index,
                h.chunk_len,
                h.k,
                h.m,
                h.body_len()
            )));
        }
        Ok(h)
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
    fn paths_round_trip_and_reject_aliases() {
        let chunk = ChunkId([0xab; 32]);
        assert_eq!(chunk_of(&path(&chunk)), Some(chunk));
        let hex = chunk.to_hex();
        for bad in [format!("{PREFIX}{hex}/0"), PREFIX.to_string(), format!("{PREFIX}zz"), format!("/v2/stripes/{hex}"), format!("{PREFIX}{hex}x")] {
            assert_eq!(chunk_of(&bad), None, "{bad}");
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

    #[test]
    fn only_well_formed_stripes_pass_the_check() {
        let h = StripeHeader { k: 4, m: 1, index: 4, chunk_len: 10 };
        assert_eq!(StripeHeader::check(&h.wrap(b"abc")), Ok(h));
        for bad in [
            Vec::new(),
            b"garbage that is no stripe".to_vec(),
            h.wrap(b"ab"),
            h.wrap(b"abcd"),
            StripeHeader { index: 5, ..h }.wrap(b"abc"),
            StripeHeader { k: 0, ..h }.wrap(b"abc"),
            StripeHeader { chunk_len: 0, ..h }.wrap(b"a"),
        ] {
            assert!(StripeHeader::check(&bad).is_err(), "{bad:?}");
        }
    }
}
