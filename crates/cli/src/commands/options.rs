//! Shared flags turned into library options.

use std::path::Path;

use anyhow::{Context, Result};
use tessera_agent::AgentOptions;
use tessera_cache::tier::{ReadPolicy, TierOptions};
use tessera_store::Home;

use crate::flags::{CacheArgs, LimitArgs, TierArgs, TreeArgs};

/// Threads for work spread over all cores.
pub fn threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
}

/// Fewer allocator arenas: the agent's many I/O threads would otherwise
/// each keep chunk-sized free buffers of their own. And a fixed mmap
/// threshold: glibc otherwise raises it to the largest buffer freed, after
/// which NBD reply buffers (up to 32 MiB) come from the heap and their
/// memory is kept after they are freed.
pub fn bound_allocator() {
    // SAFETY: mallopt only tunes glibc's allocator; it is called before any
    // thread of ours starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn interrupted() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The agent options of the cache and limit flags (no frontends).
pub fn agent_options(home: &Home, limits: LimitArgs, c: CacheArgs) -> Result<AgentOptions> {
    let mut o = AgentOptions::new(c.cache_dir.unwrap_or_else(|| home.root().join("cache")));
    o.cache_mem = c.cache_mem;
    o.cache_disk = c.cache_disk;
    o.origin_concurrency = c.origin_concurrency;
    o.origin_queue = c.origin_queue;
    o.origin_latency = c.origin_latency;
    o.origin_bandwidth = c.origin_bandwidth;
    o.tier = tier_options(&c.tier, ReadPolicy::FirstK)?;
    o.tree = tree_options(&c.tree)?;
    o.limits =
        tessera_agent::nbd::Limits { max_connections: limits.max_connections, buffer_bytes: limits.buffer_memory, client_timeout: limits.client_timeout };
    o.max_overlays = limits.max_overlays;
    Ok(o)
}

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

/// The function-tree options of `--tree-manager` and its flags; `None` without it.
pub fn tree_options(t: &TreeArgs) -> Result<Option<tessera_agent::TreeOptions>> {
    let (Some(manager), Some(listen)) = (&t.tree_manager, &t.peer_listen) else { return Ok(None) };
    Ok(Some(tessera_agent::TreeOptions {
        manager: manager.clone(),
        listen: listen.clone(),
        advertise: t.advertise.clone(),
        token: t.tree_token_file.as_deref().map(read_token).transpose()?,
        tls_ca: t.tree_tls_ca.clone(),
        tls_cert: t.peer_tls_cert.clone().zip(t.peer_tls_key.clone()),
    }))
}

/// The tier options of `--cache-nodes`, `--ec` and `--token-file`; `None`
/// without cache nodes.
pub fn tier_options(t: &TierArgs, policy: ReadPolicy) -> Result<Option<TierOptions>> {
    if t.cache_nodes.is_empty() {
        if t.token_file.is_some() || t.cache_tls_ca.is_some() {
            anyhow::bail!("--token-file and --cache-tls-ca are for the cache nodes: give --cache-nodes too");
        }
        return Ok(None);
    }
    let (k, m) = TierOptions::parse_code(&t.ec).context("--ec")?;
    for n in &t.cache_nodes {
        TierOptions::check_address(n).context("--cache-nodes")?;
    }
    if t.cache_nodes.len() < k + m {
        anyhow::bail!("--ec {k}+{m} needs at least {} cache nodes; --cache-nodes lists {}", k + m, t.cache_nodes.len());
    }
    let token = t.token_file.as_deref().map(read_token).transpose()?;
    Ok(Some(TierOptions { nodes: t.cache_nodes.clone(), k, m, token, policy, tls_ca: t.cache_tls_ca.clone() }))
}
