//! `tessera cachenode`, the cache-tier flags of the agent commands, and
//! `tessera bench tier`.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;
use tessera_cache::tier::{CacheTier, ReadPolicy, TierOptions};
use tessera_cache::ChunkSource;
use tessera_cachenode::{CacheNode, NodeOptions};
use tessera_store::{ChunkStore, Home, LocalDirStore, ThrottledStore};

use crate::commands::interrupted;
use crate::flags::{CachenodeArgs, TierArgs};

/// Reads a bearer token: the file's content without surrounding white space.
pub fn read_token(path: &Path) -> Result<String> {
    let raw = std::fs::read_to_string(path).with_context(|| format!("reading the token file {}", path.display()))?;
    let token = raw.trim();
    if token.is_empty() {
        anyhow::bail!("the token file {} is empty", path.display());
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        anyhow::bail!("the token in {} must be printable ASCII without spaces", path.display());
    }
    Ok(token.to_owned())
}

/// The tier options of `--cache-nodes`, `--ec` and `--token-file`; `None`
/// without cache nodes.
pub fn tier_options(t: &TierArgs, policy: ReadPolicy) -> Result<Option<TierOptions>> {
    if t.cache_nodes.is_empty() {
        if t.token_file.is_some() {
            anyhow::bail!("--token-file is for the cache nodes: give --cache-nodes too");
        }
        return Ok(None);
    }
    let (k, m) = TierOptions::parse_code(&t.ec).map_err(|e| anyhow::anyhow!("--ec: {e}"))?;
    for n in &t.cache_nodes {
        if !matches!(n.rsplit_once(':'), Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok()) {
            anyhow::bail!("--cache-nodes: {n:?} is not HOST:PORT");
        }
    }
    if t.cache_nodes.len() < k + m {
        anyhow::bail!("--ec {k}+{m} needs at least {} cache nodes; --cache-nodes lists {}", k + m, t.cache_nodes.len());
    }
    let token = t.token_file.as_deref().map(read_token).transpose()?;
    Ok(Some(TierOptions { nodes: t.cache_nodes.clone(), k, m, token, policy }))
}

/// `tessera cachenode`.
pub fn cachenode(a: CachenodeArgs) -> Result<ExitCode> {
    let token = a.token_file.as_deref().map(read_token).transpose()?;
    let options = NodeOptions { memory_bytes: a.mem, disk_bytes: a.disk, token };
    let authenticated = options.token.is_some();
    let node = Arc::new(CacheNode::open(&a.dir, options).with_context(|| format!("opening the cache directory {}", a.dir.display()))?);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&a.listen).await.with_context(|| format!("listening on {}", a.listen))?;
        let metrics = match &a.metrics {
            Some(m) => Some(tokio::net::TcpListener::bind(m).await.with_context(|| format!("metrics listener {m}"))?),
            None => None,
        };
        eprintln!(
            "tessera cachenode: serving stripes on {}{} ({} on disk from an earlier run){}",
            listener.local_addr()?,
            if authenticated { " with a bearer token" } else { "" },
            node.disk_stripes(),
            a.metrics.as_deref().map(|m| format!("; metrics on http://{m}/metrics")).unwrap_or_default()
        );
        let (stop, _) = tokio::sync::broadcast::channel::<()>(1);
        let wait = |stop: &tokio::sync::broadcast::Sender<()>| {
            let mut rx = stop.subscribe();
            async move {
                let _ = rx.recv().await;
            }
        };
        let mut tasks = vec![tokio::spawn(tessera_cachenode::serve(Arc::clone(&node), listener, wait(&stop)))];
        if let Some(l) = metrics {
            tasks.push(tokio::spawn(tessera_cachenode::serve_metrics(Arc::clone(&node), l, wait(&stop))));
        }
        interrupted().await;
        let _ = stop.send(());
        for t in tasks {
            let _ = t.await;
        }
        anyhow::Ok(())
    })?;
    eprintln!("tessera cachenode: stopped");
    Ok(ExitCode::SUCCESS)
}

/// `tessera bench tier`: latency of chunk reads from the tier, k-of-n
/// against waiting for the data stripes, and from the (throttled) origin.
pub fn bench(home: &Home, name: &str, t: &TierArgs, count: usize, origin_reads: usize, warm: bool, latency: Duration, bandwidth: Option<u64>) -> Result<ExitCode> {
    let (_, manifest) = home.manifest(name)?;
    let ids: Vec<_> = manifest.chunks.iter().flatten().map(|r| r.id).collect();
    anyhow::ensure!(!ids.is_empty(), "{name} has no stored chunks");
    let options = tier_options(t, ReadPolicy::FirstK)?.context("give --cache-nodes")?;
    let first_k = CacheTier::new(options.clone()).map_err(anyhow::Error::msg)?;
    let data_stripes = CacheTier::new(TierOptions { policy: ReadPolicy::DataStripes, ..options }).map_err(anyhow::Error::msg)?;
    let store = LocalDirStore::open(&home.root().join("chunks"))?;
    if warm {
        for id in &ids {
            while first_k.pending() > 128 {
                std::thread::sleep(Duration::from_millis(1));
            }
            first_k.offer(id, &store.get(id)?);
        }
        first_k.drain();
    }
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ids[(state % ids.len() as u64) as usize]
    };
    // The two policies alternate, so both see the same network.
    let (mut fk, mut ds, mut misses) = (Vec::with_capacity(count), Vec::with_capacity(count), 0);
    for _ in 0..count {
        let id = next();
        for (tier, lat) in [(&first_k, &mut fk), (&data_stripes, &mut ds)] {
            let started = Instant::now();
            match tier.fetch(&id)? {
                Some(_) => lat.push(started.elapsed().as_secs_f64() * 1e3),
                None => misses += 1,
            }
        }
    }
    let origin = ThrottledStore::new(Arc::new(store), latency, bandwidth);
    let mut or = Vec::with_capacity(origin_reads);
    for _ in 0..origin_reads {
        let id = next();
        let started = Instant::now();
        origin.get(&id)?;
        or.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let (fk, ds, or) = (summary(fk), summary(ds), summary(or));
    println!(
        "{}",
        json!({
            "image": name, "chunks": ids.len(), "reads": count, "misses": misses,
            "code": t.ec, "nodes": t.cache_nodes.len(),
            "first_k": fk, "data_stripes": ds,
            "origin": or, "origin_latency_ms": latency.as_secs_f64() * 1e3, "origin_bandwidth": bandwidth,
            "origin_p50_over_tier_p50": or["p50_ms"].as_f64().unwrap_or(0.0) / fk["p50_ms"].as_f64().unwrap_or(1.0),
        })
    );
    Ok(ExitCode::SUCCESS)
}

fn summary(mut ms: Vec<f64>) -> serde_json::Value {
    if ms.is_empty() {
        return json!({"reads": 0});
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    json!({"reads": ms.len(), "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99), "max_ms": pct(1.0), "mean_ms": ms.iter().sum::<f64>() / ms.len() as f64})
}
