//! Reed-Solomon erasure coding over GF(2^8) for the shared cache tier: a
//! chunk becomes `k` data stripes and `m` parity stripes, and any `k` of the
//! `k + m` rebuild it (4 + 1 by default: 25% extra storage instead of 100%).
//!
//! The code is systematic (the data stripes are the chunk itself, cut in
//! `k`) with a Cauchy matrix for the parity rows, so every `k × k` submatrix
//! of the encoding matrix is invertible.

/// GF(2^8) with the polynomial x^8 + x^4 + x^3 + x^2 + 1 (0x11d).
struct Gf {
    exp: [u8; 512],
    log: [u8; 256],
}

impl Gf {
    fn new() -> Gf {
        let mut exp = [0u8; 512];
        let mut log = [0u8; 256];
        let mut x: u16 = 1;
        for (i, e) in exp.iter_mut().take(255).enumerate() {
            *e = x as u8;
            log[x as usize] = i as u8;
            x <<= 1;
            if x & 0x100 != 0 {
                x ^= 0x11d;
            }
        }
        let (low, high) = exp.split_at_mut(255);
        high[..255].copy_from_slice(low);
        high[255] = low[0];
        high[256] = low[1];
        Gf { exp, log }
    }

    fn mul(&self, a: u8, b: u8) -> u8 {
        if a == 0 || b == 0 {
            return 0;
        }
        self.exp[self.log[a as usize] as usize + self.log[b as usize] as usize]
    }

    /// `out[i] ^= c · data[i]` for every byte: 32 bytes per step with
    /// AVX2 (two 16-entry nibble tables and a byte shuffle), else through a
    /// 256-entry table.
    fn mul_add(&self, c: u8, data: &[u8], out: &mut [u8]) {
        match c {
            0 => {}
            1 => out.iter_mut().zip(data).for_each(|(o, &d)| *o ^= d),
            _ => {
                let mut low = [0u8; 16];
                let mut high = [0u8; 16];
                for x in 0..16u8 {
                    low[x as usize] = self.mul(c, x);
                    high[x as usize] = self.mul(c, x << 4);
                }
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2, checked just above.
                    unsafe { mul_add_avx2(&low, &high, data, out) };
                    return;
                }
                mul_add_nibbles(&low, &high, data, out);
            }
        }
    }

    fn inv(&self, a: u8) -> u8 {
        debug_assert!(a != 0);
        self.exp[255 - self.log[a as usize] as usize]
    }
}

/// `out[i] ^= low[d & 15] ^ high[d >> 4]` where `d = data[i]`: the
/// product by a constant, split by nibble (the product is linear over XOR).
fn mul_add_nibbles(low: &[u8; 16], high: &[u8; 16], data: &[u8], out: &mut [u8]) {
    for (o, &d) in out.iter_mut().zip(data) {
        *o ^= low[(d & 15) as usize] ^ high[(d >> 4) as usize];
    }
}

/// [`mul_add_nibbles`], 32 bytes at a time.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn mul_add_avx2(low: &[u8; 16], high: &[u8; 16], data: &[u8], out: &mut [u8]) {
    use std::arch::x86_64::*;
    let n = data.len().min(out.len());
    let whole = n - n % 32;
    // SAFETY: AVX2 is enabled for this function; every load and store is
    // unaligned-tolerant and within `data[..whole]` / `out[..whole]`.
    unsafe {
        let low_v = _mm256_broadcastsi128_si256(_mm_loadu_si128(low.as_ptr().cast()));
        let high_v = _mm256_broadcastsi128_si256(_mm_loadu_si128(high.as_ptr().cast()));
        let mask = _mm256_set1_epi8(0x0f);
        for i in (0..whole).step_by(32) {
            let d = _mm256_loadu_si256(data.as_ptr().add(i).cast());
            let lo = _mm256_shuffle_epi8(low_v, _mm256_and_si256(d, mask));
            let hi = _mm256_shuffle_epi8(high_v, _mm256_and_si256(_mm256_srli_epi64::<4>(d), mask));
            let o = _mm256_loadu_si256(out.as_ptr().add(i).cast());
            _mm256_storeu_si256(out.as_mut_ptr().add(i).cast(), _mm256_xor_si256(o, _mm256_xor_si256(lo, hi)));
        }
    }
    mul_add_nibbles(low, high, &data[whole..n], &mut out[whole..n]);
}

/// Errors of coding.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum EcError {
    /// The parameters are outside what the code supports.
    #[error("unsupported code {k}+{m} (need 1 <= k, k + m <= 255)")]
    Params {
        /// Data stripes.
        k: usize,
        /// Parity stripes.
        m: usize,
    },
    /// Fewer than `k` stripes are present.
    #[error("{have} stripes present, {need} needed")]
    TooFew {
        /// Stripes present.
        have: usize,
        /// Stripes needed.
        need: usize,
    },
    /// Stripes differ in length, or are too short for the data.
    #[error("stripes of different lengths, or too short for the data")]
    Ragged,
}

/// A `k + m` Reed-Solomon code.
pub struct Code {
    k: usize,
    m: usize,
    gf: Gf,
    /// The `(k + m) × k` encoding matrix, row-major.
    matrix: Vec<u8>,
}

impl Code {
    /// A code with `k` data and `m` parity stripes.
    pub fn new(k: usize, m: usize) -> Result<Code, EcError> {
        if k == 0 || k + m > 255 {
            return Err(EcError::Params { k, m });
        }
        let gf = Gf::new();
        let mut matrix = vec![0u8; (k + m) * k];
        for i in 0..k {
            matrix[i * k + i] = 1;
        }
        // Cauchy rows: 1 / (x_i + y_j) with x_i = k + i, y_j = j, all
        // distinct; each scaled so that it starts with 1 (scaling a row
        // keeps every square submatrix invertible), which makes 1+m codes
        // plain copies.
        for i in 0..m {
            let first = gf.inv((k + i) as u8);
            let scale = gf.inv(first);
            for j in 0..k {
                matrix[(k + i) * k + j] = gf.mul(gf.inv(((k + i) as u8) ^ (j as u8)), scale);
            }
        }
        Ok(Code { k, m, gf, matrix })
    }

    /// Data stripes.
    pub fn k(&self) -> usize {
        self.k
    }

    /// All stripes.
    pub fn n(&self) -> usize {
        self.k + self.m
    }

    /// Cuts `data` into `k` stripes (zero-padded) and computes `m` parity stripes.
    pub fn encode(&self, data: &[u8]) -> Vec<Vec<u8>> {
        let len = data.len().div_ceil(self.k).max(1);
        let mut stripes: Vec<Vec<u8>> = (0..self.k)
            .map(|i| {
                let mut s = data.get(i * len..((i + 1) * len).min(data.len())).unwrap_or(&[]).to_vec();
                s.resize(len, 0);
                s
            })
            .collect();
        for p in 0..self.m {
            let row = &self.matrix[(self.k + p) * self.k..(self.k + p + 1) * self.k];
            let mut parity = vec![0u8; len];
            for (j, &c) in row.iter().enumerate() {
                self.gf.mul_add(c, &stripes[j], &mut parity);
            }
            stripes.push(parity);
        }
        stripes
    }

    /// Rebuilds the `len` bytes of data from any `k` stripes (`None` = missing).
    pub fn decode<S: AsRef<[u8]>>(&self, stripes: &[Option<S>], len: usize) -> Result<Vec<u8>, EcError> {
        let present: Vec<usize> = (0..stripes.len().min(self.n())).filter(|&i| stripes[i].is_some()).take(self.k).collect();
        if present.len() < self.k {
            return Err(EcError::TooFew { have: present.len(), need: self.k });
        }
        let stripe = |i: usize| stripes[i].as_ref().expect("present").as_ref();
        let slen = stripe(present[0]).len();
        if present.iter().any(|&i| stripe(i).len() != slen) || slen * self.k < len {
            return Err(EcError::Ragged);
        }
        if slen == 0 {
            return Ok(Vec::new());
        }
        // Every data stripe at hand: the data is their concatenation.
        if present.iter().enumerate().all(|(j, &i)| i == j) {
            let mut out = Vec::with_capacity(len);
            for i in 0..self.k {
                out.extend_from_slice(stripe(i));
            }
            out.truncate(len);
            return Ok(out);
        }
        // Invert the rows of the stripes we have.
        let k = self.k;
        let mut a: Vec<u8> = present.iter().flat_map(|&r| self.matrix[r * k..(r + 1) * k].to_vec()).collect();
        let mut inv = vec![0u8; k * k];
        for i in 0..k {
            inv[i * k + i] = 1;
        }
        for col in 0..k {
            let pivot = (col..k).find(|&r| a[r * k + col] != 0).expect("Cauchy submatrices are invertible");
            for j in 0..k {
                a.swap(col * k + j, pivot * k + j);
                inv.swap(col * k + j, pivot * k + j);
            }
            let f = self.gf.inv(a[col * k + col]);
            for j in 0..k {
                a[col * k + j] = self.gf.mul(a[col * k + j], f);
                inv[col * k + j] = self.gf.mul(inv[col * k + j], f);
            }
            for r in 0..k {
                let c = a[r * k + col];
                if r != col && c != 0 {
                    for j in 0..k {
                        a[r * k + j] ^= self.gf.mul(c, a[col * k + j]);
                        inv[r * k + j] ^= self.gf.mul(c, inv[col * k + j]);
                    }
                }
            }
        }
        let mut out = vec![0u8; k * slen];
        for (i, part) in out.chunks_mut(slen).enumerate() {
            if stripes[i].is_some() {
                // A data stripe at hand needs no arithmetic.
                part.copy_from_slice(stripe(i));
                continue;
            }
            for (j, &r) in present.iter().enumerate() {
                self.gf.mul_add(inv[i * k + j], stripe(r), part);
            }
        }
        out.truncate(len);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_k_stripes_rebuild_the_data(data in proptest::collection::vec(any::<u8>(), 0..3000), k in 1usize..6, m in 0usize..4, lost in any::<u64>()) {
            let code = Code::new(k, m).unwrap();
            let stripes = code.encode(&data);
            prop_assert_eq!(stripes.len(), k + m);
            // Lose up to m stripes, chosen by the bits of `lost`.
            let mut kept: Vec<Option<Vec<u8>>> = stripes.into_iter().map(Some).collect();
            let mut dropped = 0;
            for (i, stripe) in kept.iter_mut().enumerate() {
                if dropped < m && lost >> i & 1 == 1 {
                    *stripe = None;
                    dropped += 1;
                }
            }
            prop_assert_eq!(code.decode(&kept, data.len()).unwrap(), data);
        }
    }

    proptest! {
        #[test]
        fn the_vector_product_matches_the_table(c in any::<u8>(), data in proptest::collection::vec(any::<u8>(), 0..200), seed in any::<u8>()) {
            let gf = Gf::new();
            let mut want: Vec<u8> = data.iter().map(|&d| d ^ seed).collect();
            let mut got = want.clone();
            for (w, &d) in want.iter_mut().zip(&data) {
                *w ^= gf.mul(c, d);
            }
            gf.mul_add(c, &data, &mut got);
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn too_few_stripes_is_an_error() {
        let code = Code::new(4, 1).unwrap();
        let mut s: Vec<Option<Vec<u8>>> = code.encode(b"hello world").into_iter().map(Some).collect();
        s[0] = None;
        s[3] = None;
        assert_eq!(code.decode(&s, 11), Err(EcError::TooFew { have: 3, need: 4 }));
        // Empty stripes (a peer sent headers only) rebuild nothing, and say so.
        let empty: Vec<Option<Vec<u8>>> = vec![Some(vec![]); 5];
        assert_eq!(code.decode(&empty, 0), Ok(vec![]));
        assert_eq!(code.decode(&empty, 3), Err(EcError::Ragged));
        assert!(Code::new(0, 1).is_err());
    }

    #[test]
    fn one_plus_m_is_replication() {
        let code = Code::new(1, 2).unwrap();
        let data = b"replicated".to_vec();
        assert!(code.encode(&data).iter().all(|s| *s == data));
    }

    #[test]
    fn overhead_of_4_plus_1_is_25_percent() {
        let code = Code::new(4, 1).unwrap();
        let stored: usize = code.encode(&vec![7u8; 524_304]).iter().map(Vec::len).sum();
        assert_eq!(stored, 524_304 / 4 * 5);
    }
}
