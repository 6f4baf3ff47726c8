//! Chunk reads from the shared cache tier (the first `k` of `n` stripes, or
//! waiting for the `k` data stripes as a naive client does), against the
//! origin through a throttle, in the same run.

use std::time::{Duration, Instant};

use serde_json::json;
use tessera_cache::tier::{CacheTier, ReadPolicy, TierOptions};
use tessera_cache::{ChunkSource, FetchContext};
use tessera_store::{ChunkStore, Home, ThrottledStore};

use crate::{percentiles, Error};

/// What `tessera bench tier` measures.
pub struct TierBench {
    /// Chunk reads to time per policy.
    pub count: usize,
    /// Chunk reads to time from the origin.
    pub origin_reads: usize,
    /// Store the image's chunks in the tier first.
    pub warm: bool,
    /// `first-k`, `data-stripes` or `both`.
    pub policy: String,
    /// Another list of the nodes, read first-k in turn with the others.
    pub versus: Vec<String>,
    /// The origin throttle's latency.
    pub origin_latency: Duration,
    /// The origin throttle's bandwidth, bytes/s.
    pub origin_bandwidth: Option<u64>,
}

/// Latency of chunk reads of image `name` from the tier of `options`
/// (k-of-n, or waiting for the data stripes), and from the (throttled)
/// origin; one JSON object.
pub fn run(home: &Home, name: &str, options: &TierOptions, b: &TierBench) -> Result<serde_json::Value, Error> {
    let (image, manifest) = home.manifest(name)?;
    let ids: Vec<_> = manifest.chunks.iter().flatten().map(|r| r.id).collect();
    if ids.is_empty() {
        return Err(Error::Usage(format!("{name} has no stored chunks")));
    }
    let store = home.chunks_of(&image);
    let ctx = FetchContext::of(name, &image);
    let mut tiers: Vec<(&str, CacheTier)> = Vec::new();
    for (label, policy) in [("first_k", ReadPolicy::FirstK), ("data_stripes", ReadPolicy::DataStripes)] {
        if b.policy == "both" || b.policy.replace('-', "_") == label {
            tiers.push((label, CacheTier::new(TierOptions { policy, ..options.clone() })?));
        }
    }
    if !b.versus.is_empty() {
        let versus = TierOptions { nodes: b.versus.clone(), policy: ReadPolicy::FirstK, ..options.clone() };
        tiers.push(("versus", CacheTier::new(versus)?));
    }
    if b.warm {
        let tier = &tiers[0].1;
        for id in &ids {
            while tier.pending() > 128 {
                std::thread::sleep(Duration::from_millis(1));
            }
            tier.offer(id, &store.get(id)?, &ctx);
        }
        tier.drain();
    }
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || ids[(tessera_cache::trace::xorshift(&mut state) % ids.len() as u64) as usize];
    // Several tiers take turns read by read, so all see the same network and machine.
    let mut latencies = vec![Vec::with_capacity(b.count); tiers.len()];
    let mut misses = 0;
    for _ in 0..b.count {
        let id = next();
        for ((_, tier), lat) in tiers.iter().zip(&mut latencies) {
            let started = Instant::now();
            match tier.fetch(&id, &ctx)? {
                Some(_) => lat.push(started.elapsed().as_secs_f64() * 1e3),
                None => misses += 1,
            }
        }
    }
    let origin = ThrottledStore::new(store, b.origin_latency, b.origin_bandwidth);
    let mut from_origin = Vec::with_capacity(b.origin_reads);
    for _ in 0..b.origin_reads {
        let id = next();
        let started = Instant::now();
        origin.get(&id)?;
        from_origin.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let mut out = json!({
        "image": name, "chunks": ids.len(), "reads": b.count, "misses": misses,
        "code": format!("{}+{}", options.k, options.m), "nodes": options.nodes.len(),
        "origin": percentiles(from_origin, "ms"), "origin_latency_ms": b.origin_latency.as_secs_f64() * 1e3, "origin_bandwidth": b.origin_bandwidth,
    });
    for ((label, tier), lat) in tiers.iter().zip(latencies) {
        out[*label] = percentiles(lat, "ms");
        let st = tier.stats();
        let load = |v: &std::sync::atomic::AtomicU64| v.load(std::sync::atomic::Ordering::Relaxed);
        out[*label]["corrupt"] = json!(load(&st.corrupt));
        out[*label]["stripes_repaired"] = json!(load(&st.stripes_repaired));
        out[*label]["stripes_cancelled"] = json!(load(&st.stripes_cancelled));
    }
    if let (Some(o), Some(t)) = (out["origin"]["p50_ms"].as_f64(), out[tiers[0].0]["p50_ms"].as_f64()) {
        out["origin_p50_over_tier_p50"] = json!(o / t);
    }
    Ok(out)
}
