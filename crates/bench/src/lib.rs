//! The measurements behind `docs/BENCHMARKS.md`, run by `tessera bench`:
//! each prints what it measured against a baseline measured in the same run.
//!
//! - [`seal`]: sealing (and opening) chunks on all cores with no store, the
//!   baseline of import and cold-read throughput;
//! - [`lru`]: LRU-2 against plain LRU on a generated trace;
//! - [`nbd`]: request latency of any NBD server through one minimal client,
//!   floods of clients that never read their replies, and label churn;
//! - [`tier`]: chunk reads from the shared cache tier against the origin;
//! - [`relay`]: a TCP relay that delays what a server sends back, for
//!   kernels without `sch_netem`.
#![deny(missing_docs)]

pub mod lru;
pub mod nbd;
mod nbd_client;
pub mod relay;
pub mod seal;
pub mod tier;

pub use nbd_client::{Client, Server as NbdServer, TlsClient};

/// Errors of a benchmark.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// I/O with what was being done.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] tessera_store::Error),
    /// The cache tier could not be set up.
    #[error(transparent)]
    Tier(#[from] tessera_cache::tier::TierError),
    /// A chunk read failed.
    #[error(transparent)]
    Fetch(#[from] tessera_cache::Error),
    /// The benchmark cannot run as asked.
    #[error("{0}")]
    Usage(String),
}

impl Error {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

/// Percentiles of a sample of latencies (any unit).
pub(crate) fn percentiles(mut v: Vec<f64>, unit: &str) -> serde_json::Value {
    if v.is_empty() {
        return serde_json::json!({"reads": 0});
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    let mut out = serde_json::Map::new();
    out.insert("reads".into(), v.len().into());
    for (name, p) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)] {
        out.insert(format!("{name}_{unit}"), pct(p).into());
    }
    out.insert(format!("mean_{unit}"), (v.iter().sum::<f64>() / v.len() as f64).into());
    serde_json::Value::Object(out)
}
