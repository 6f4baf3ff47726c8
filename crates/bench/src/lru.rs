//! LRU-2 against plain LRU at equal capacity, on a generated trace: hot
//! functions read again and again, cron jobs reading chunks once between.

use serde::Serialize;
use tessera_cache::trace::{generate, hit_rate, TraceSpec};

/// What [`run`] measured.
#[derive(Debug, Serialize)]
pub struct LruReport {
    /// Accesses in the trace.
    pub accesses: usize,
    /// Cache capacity in chunks.
    pub capacity: u64,
    /// Chunks the hot functions read.
    pub hot_working_set: u32,
    /// Hit rate of plain LRU.
    pub lru_hit_rate: f64,
    /// Hit rate of LRU-2.
    pub lru2_hit_rate: f64,
    /// The difference, in percentage points.
    pub points: f64,
}

/// Hit rates at `capacity` chunks with `hot_functions` hot functions and
/// `cron_chunks` one-shot chunks between two hot invocations.
pub fn run(capacity: u64, hot_functions: u32, cron_chunks: u32) -> LruReport {
    let spec = TraceSpec { hot_functions, cron_chunks_between: cron_chunks, ..TraceSpec::default() };
    let trace = generate(&spec);
    let (lru, lru2) = (hit_rate(&trace, capacity, false), hit_rate(&trace, capacity, true));
    LruReport {
        accesses: trace.len(),
        capacity,
        hot_working_set: spec.hot_functions * spec.hot_chunks,
        lru_hit_rate: lru,
        lru2_hit_rate: lru2,
        points: 100.0 * (lru2 - lru),
    }
}
