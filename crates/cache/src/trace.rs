//! A generated access trace for comparing eviction policies: hot functions
//! whose chunks are read again and again, interleaved with cron jobs that
//! each read a stream of chunks once (DESIGN.md: why LRU-2).

use crate::Lru2;

/// Shape of the generated trace.
#[derive(Clone, Debug)]
pub struct TraceSpec {
    /// Hot functions.
    pub hot_functions: u32,
    /// Chunks each hot function reads per invocation.
    pub hot_chunks: u32,
    /// Invocations of hot functions (each picks one at random).
    pub invocations: u32,
    /// One-shot chunks a cron job reads between two hot invocations.
    pub cron_chunks_between: u32,
    /// Seed of the generator.
    pub seed: u64,
}

impl Default for TraceSpec {
    fn default() -> TraceSpec {
        TraceSpec { hot_functions: 10, hot_chunks: 40, invocations: 3000, cron_chunks_between: 60, seed: 7 }
    }
}

/// The next number of a xorshift64 sequence (`state` must not be 0): a
/// cheap, deterministic stream for traces and benchmarks.
pub fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Chunk numbers in access order. Hot chunks are below 2^32; one-shot
/// chunks above, each used once.
pub fn generate(spec: &TraceSpec) -> Vec<u64> {
    let mut state = spec.seed | 1;
    let mut next = || xorshift(&mut state);
    let mut out = Vec::new();
    let mut one_shot = 1u64 << 32;
    for _ in 0..spec.invocations {
        let f = next() % spec.hot_functions as u64;
        for c in 0..spec.hot_chunks as u64 {
            out.push(f * spec.hot_chunks as u64 + c);
        }
        for _ in 0..spec.cron_chunks_between {
            out.push(one_shot);
            one_shot += 1;
        }
    }
    out
}

/// Hit rate of a cache of `capacity` chunks over `trace`: LRU-2 with the
/// given correlated-reference period, or plain LRU when `lru2` is false.
pub fn hit_rate(trace: &[u64], capacity: u64, lru2: bool) -> f64 {
    // Plain LRU is LRU-2 where every access is correlated and nothing is
    // remembered after eviction: entries never reach the "seen twice" set,
    // and go in order of last access. LRU-2 keeps a history of four times
    // the capacity, as the agent's caches do.
    let mut cache: Lru2<u64, ()> = match lru2 {
        true => Lru2::new(capacity, 4 * capacity as usize, 0),
        false => Lru2::new(capacity, 0, u64::MAX),
    };
    let mut hits = 0u64;
    for &chunk in trace {
        if cache.get(&chunk).is_some() {
            hits += 1;
        } else {
            cache.insert(chunk, (), 1);
        }
    }
    hits as f64 / trace.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru2_beats_lru_on_hot_functions_with_cron_streams() {
        let trace = generate(&TraceSpec::default());
        let capacity = 300; // three quarters of the hot working set of 400 chunks
        let (lru, lru2) = (hit_rate(&trace, capacity, false), hit_rate(&trace, capacity, true));
        assert!(lru2 >= lru + 0.10, "LRU-2 {lru2:.3} vs LRU {lru:.3}");
    }
}
