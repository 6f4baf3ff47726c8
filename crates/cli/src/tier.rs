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
        // The agent's listen-address parser knows what HOST:PORT is.
        if !matches!(tessera_agent::Listen::parse(n), Ok(tessera_agent::Listen::Tcp(_))) {
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
        // Without a token, anyone who reaches the node could poison it or
        // push every agent to the origin: only loopback may go without.
        let bound = listener.local_addr()?;
        if !authenticated && !bound.ip().is_loopback() {
            anyhow::bail!("{bound} is not a loopback address: give --token-file (a node without a token serves anyone who reaches it)");
        }
        let metrics = match &a.metrics {
            Some(m) => Some(tokio::net::TcpListener::bind(m).await.with_context(|| format!("metrics listener {m}"))?),
            None => None,
        };
        let metrics_addr = metrics.as_ref().map(|m| m.local_addr()).transpose()?;
        let line = format!(
            "tessera cachenode: serving stripes on {}{} ({} on disk from an earlier run){}",
            bound,
            if authenticated { " with a bearer token" } else { " without a token (loopback only)" },
            node.disk_stripes(),
            metrics_addr.map(|m| format!("; metrics on http://{m}/metrics")).unwrap_or_default()
        );
        crate::ready::announce(&line, &json!({"listen": bound.to_string(), "metrics": metrics_addr.map(|m| m.to_string())}), a.ready_file.as_deref())?;
        let metrics = metrics.map(|l| {
            let node = Arc::clone(&node);
            tokio::spawn(tessera_cache::metrics::serve(l, Arc::new(move || node.render_metrics())))
        });
        tessera_cachenode::serve(Arc::clone(&node), listener, interrupted()).await;
        if let Some(m) = metrics {
            m.abort();
        }
        anyhow::Ok(())
    })?;
    eprintln!("tessera cachenode: stopped");
    Ok(ExitCode::SUCCESS)
}

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

/// `tessera bench tier`: latency of chunk reads from the tier, k-of-n or
/// waiting for the data stripes, and from the (throttled) origin.
pub fn bench(home: &Home, name: &str, t: &TierArgs, b: &TierBench) -> Result<ExitCode> {
    let (_, manifest) = home.manifest(name)?;
    let ids: Vec<_> = manifest.chunks.iter().flatten().map(|r| r.id).collect();
    anyhow::ensure!(!ids.is_empty(), "{name} has no stored chunks");
    let options = tier_options(t, ReadPolicy::FirstK)?.context("give --cache-nodes")?;
    let store = LocalDirStore::open(&home.root().join("chunks"))?;
    let mut tiers: Vec<(&str, CacheTier)> = Vec::new();
    for (label, policy) in [("first_k", ReadPolicy::FirstK), ("data_stripes", ReadPolicy::DataStripes)] {
        if b.policy == "both" || b.policy.replace('-', "_") == label {
            tiers.push((label, CacheTier::new(TierOptions { policy, ..options.clone() }).map_err(anyhow::Error::msg)?));
        }
    }
    if !b.versus.is_empty() {
        let versus = TierOptions { nodes: b.versus.clone(), policy: ReadPolicy::FirstK, ..options.clone() };
        tiers.push(("versus", CacheTier::new(versus).map_err(|e| anyhow::anyhow!("--versus: {e}"))?));
    }
    if b.warm {
        let tier = &tiers[0].1;
        for id in &ids {
            while tier.pending() > 128 {
                std::thread::sleep(Duration::from_millis(1));
            }
            tier.offer(id, &store.get(id)?);
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
            match tier.fetch(&id)? {
                Some(_) => lat.push(started.elapsed().as_secs_f64() * 1e3),
                None => misses += 1,
            }
        }
    }
    let origin = ThrottledStore::new(Arc::new(store), b.origin_latency, b.origin_bandwidth);
    let mut from_origin = Vec::with_capacity(b.origin_reads);
    for _ in 0..b.origin_reads {
        let id = next();
        let started = Instant::now();
        origin.get(&id)?;
        from_origin.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let mut out = json!({
        "image": name, "chunks": ids.len(), "reads": b.count, "misses": misses,
        "code": t.ec, "nodes": t.cache_nodes.len(),
        "origin": summary(from_origin), "origin_latency_ms": b.origin_latency.as_secs_f64() * 1e3, "origin_bandwidth": b.origin_bandwidth,
    });
    for ((label, tier), lat) in tiers.iter().zip(latencies) {
        out[*label] = summary(lat);
        let st = tier.stats();
        let load = |v: &std::sync::atomic::AtomicU64| v.load(std::sync::atomic::Ordering::Relaxed);
        out[*label]["corrupt"] = json!(load(&st.corrupt));
        out[*label]["stripes_repaired"] = json!(load(&st.stripes_repaired));
        out[*label]["stripes_cancelled"] = json!(load(&st.stripes_cancelled));
    }
    if let (Some(o), Some(t)) = (out["origin"]["p50_ms"].as_f64(), out[tiers[0].0]["p50_ms"].as_f64()) {
        out["origin_p50_over_tier_p50"] = json!(o / t);
    }
    println!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// `tessera bench relay`: accepts clients on `listen`, connects each to
/// `target`, and passes the target's bytes on `delay` after they arrive
/// (in order; the delay does not add up from one read to the next).
pub fn relay(listen: &str, target: &str, delay: Duration, ready_file: Option<&Path>) -> Result<ExitCode> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
        let bound = listener.local_addr()?;
        crate::ready::announce(&format!("tessera: relaying {bound} to {target}, answers {delay:?} late"), &json!({"listen": bound.to_string()}), ready_file)?;
        let serve = async {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                let target = target.to_owned();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(&target).await else { return };
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let upstream = async move {
                        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                        // The server sees the client leave, and closes its side.
                        let _ = server_write.shutdown().await;
                    };
                    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
                    let downstream_read = async move {
                        let mut buf = vec![0u8; 1 << 20];
                        while let Ok(n @ 1..) = server_read.read(&mut buf).await {
                            if tx.send((tokio::time::Instant::now() + delay, buf[..n].to_vec())).is_err() {
                                break;
                            }
                        }
                    };
                    let downstream_write = async move {
                        while let Some((due, bytes)) = rx.recv().await {
                            tokio::time::sleep_until(due).await;
                            if client_write.write_all(&bytes).await.is_err() {
                                break;
                            }
                        }
                    };
                    let _ = tokio::join!(upstream, downstream_read, downstream_write);
                });
            }
        };
        tokio::select! {
            () = serve => {}
            () = interrupted() => {}
        }
        anyhow::Ok(())
    })?;
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
