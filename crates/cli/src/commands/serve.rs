//! The long-running commands: `serve`, `mount` and `cachenode`.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use serde_json::json;
use tessera_agent::device::Exports;
use tessera_agent::{fuse, Agent, Frontend, Listen};
use tessera_cachenode::{CacheNode, NodeOptions};
use tessera_store::Home;

use super::options::{agent_options, bound_allocator, interrupted, read_token};
use crate::flags::{CachenodeArgs, LimitArgs, MountArgs, ServeArgs, ServerArgs, TreemgrArgs};

/// `tessera serve`.
pub fn serve(home: Home, a: ServeArgs) -> Result<ExitCode> {
    bound_allocator();
    let nbd =
        if a.nbd.is_empty() { vec![Listen::Unix(home.root().join("nbd.sock"))] } else { a.nbd.iter().map(|s| Listen::parse(s)).collect::<Result<_, _>>()? };
    let mut options = agent_options(&home, a.limits, a.cache)?;
    options.frontends = nbd.into_iter().map(Frontend::Nbd).collect();
    options.metrics = a.metrics;
    options.prefetch = a.prefetch;
    options.allow_plaintext_nbd = a.allow_plaintext_nbd;
    options.tls = match (a.tls_cert, a.tls_key) {
        (Some(cert), Some(key)) => Some(tessera_agent::NbdTls { cert, key, client_ca: a.tls_client_ca, policy: a.exports_policy }),
        _ => None,
    };
    let default_control = home.root().join("agent.sock");
    let control = a.control.clone().unwrap_or_else(|| default_control.clone());
    // Several agents may serve one home: only the first takes the default
    // control socket (an explicit --control that is taken is an error).
    let taken = !a.takeover && a.control.is_none() && std::os::unix::net::UnixStream::connect(&default_control).is_ok();
    if taken {
        eprintln!("tessera: warning: another agent answers on {}; this one has no control socket", default_control.display());
    }
    options.control = (!taken).then(|| control.clone());
    options.vhost_user = Some(a.vhost_user.unwrap_or_else(|| home.root().join("vhost-user")));
    // Everything that can fail before the listeners are asked for: a
    // successor that cannot start leaves the running agent serving.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().max_blocking_threads(128).build()?;
    let agent = Arc::new(Agent::new(home, options).context("starting the agent")?);
    if a.takeover {
        agent.inherit(tessera_agent::take_over(&control).with_context(|| format!("taking over from the agent at {}", control.display()))?);
    }
    let ready_file = a.ready_file;
    // A ready file that cannot be written stops the agent: whoever waits for it would wait forever.
    let (failed_tx, mut failed_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
    let mut failure = None;
    runtime.block_on(agent.clone().run(
        |bound| {
            let line = format!(
                "tessera: serving NBD on {}{}{}{}",
                bound.nbd.join(", "),
                bound.peer.as_deref().map(|p| format!("; children in function trees on {p}")).unwrap_or_default(),
                bound.metrics.as_deref().map(|m| format!("; metrics on http://{m}/metrics")).unwrap_or_default(),
                if taken { String::new() } else { format!("; control socket {}", control.display()) }
            );
            let ready =
                json!({"nbd": bound.nbd, "metrics": bound.metrics, "peer": bound.peer, "control": (!taken).then_some(&control), "pid": std::process::id()});
            if let Err(e) = crate::ready::announce(&line, &ready, ready_file.as_deref()) {
                let _ = failed_tx.send(e);
            }
        },
        async {
            tokio::select! {
                () = interrupted() => {}
                Ok(e) = &mut failed_rx => failure = Some(e),
            }
        },
    ))?;
    if let Some(e) = failure {
        return Err(e);
    }
    eprintln!("tessera: stopped");
    Ok(ExitCode::SUCCESS)
}

/// `tessera mount`.
pub fn mount(home: Home, a: MountArgs) -> Result<ExitCode> {
    bound_allocator();
    if a.cache.tree.tree_manager.is_some() {
        anyhow::bail!("function trees need an agent that serves its children: give --tree-manager to tessera serve or tessera run");
    }
    let options = agent_options(&home, LimitArgs::default(), a.cache)?;
    let agent = Agent::new(home, options).context("starting the agent")?;
    let device = agent.exports.open(&a.name).with_context(|| format!("opening {}", a.name))?;
    let writable = device.writable();
    let session = fuse::mount(fuse::DiskFs::new(&a.name, device), &a.dir)
        .with_context(|| format!("mounting FUSE on {} (is fuse3 installed and /dev/fuse there?)", a.dir.display()))?;
    let file = a.dir.join(&a.name);
    let loop_mount = match &a.loop_mount {
        Some(mp) => {
            let m = fuse::LoopMount::mount(&file, mp, writable)?;
            eprintln!("tessera: {} is {}; its filesystem is mounted on {}", file.display(), a.name, mp.display());
            Some(m)
        }
        None => {
            eprintln!("tessera: {} is {}", file.display(), a.name);
            None
        }
    };
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(interrupted());
    drop(loop_mount);
    drop(session);
    agent.exports.flush_all();
    Ok(ExitCode::SUCCESS)
}

/// `tessera cachenode`.
pub fn cachenode(a: CachenodeArgs) -> Result<ExitCode> {
    let token = a.server.token_file.as_deref().map(read_token).transpose()?;
    let options = NodeOptions { memory_bytes: a.mem, disk_bytes: a.disk, token };
    let authenticated = options.token.is_some();
    let tls = server_tls(&a.server)?;
    let node = Arc::new(CacheNode::open(&a.dir, options)?);
    let detail = format!(" ({} on disk from an earlier run)", node.disk_stripes());
    let render = {
        let node = Arc::clone(&node);
        move || node.render_metrics()
    };
    // Off loopback, without a token anyone who reaches the node could
    // poison it or push every agent to the origin.
    run_beside("cachenode", "a node", &a.server, authenticated, tls, "serving stripes on", detail, render, |listener, tls| {
        tessera_cachenode::serve(node, listener, tls, interrupted())
    })
}

/// `tessera treemgr`.
pub fn treemgr(a: TreemgrArgs) -> Result<ExitCode> {
    let token = a.server.token_file.as_deref().map(read_token).transpose()?;
    let authenticated = token.is_some();
    let options = tessera_treemgr::Options { token, idle_timeout: a.idle_timeout, state: a.state.clone() };
    let tls = server_tls(&a.server)?;
    let manager = Arc::new(tessera_treemgr::Manager::open(options)?);
    let trees = manager.trees();
    let detail = format!(" ({} trees, {} agents from its state)", trees.len(), trees.values().map(Vec::len).sum::<usize>());
    let render = {
        let manager = Arc::clone(&manager);
        move || manager.render_metrics()
    };
    // Off loopback, without a token anyone who reaches it could rearrange the trees.
    run_beside("treemgr", "a manager", &a.server, authenticated, tls, "serving on", detail, render, |listener, tls| {
        tessera_treemgr::serve(manager, listener, tls, interrupted())
    })
}

/// Runs a server beside the agents (`tessera NAME`: a cache node, the tree
/// manager) until it is interrupted: binds `--listen`, refusing an address
/// off loopback without a token and TLS (`who` names the server in the
/// error: without TLS the token crosses the network in clear); binds
/// `--metrics` and serves `render` there; announces itself (`serving` then
/// the address, how it is protected, `detail`) on stderr and in the ready
/// file; then runs `serve` on the listener.
#[allow(clippy::too_many_arguments)]
fn run_beside<F: std::future::Future<Output = ()>>(
    name: &str,
    who: &str,
    a: &ServerArgs,
    authenticated: bool,
    tls: Option<Arc<rustls::ServerConfig>>,
    serving: &str,
    detail: String,
    render: impl Fn() -> String + Send + Sync + 'static,
    serve: impl FnOnce(tokio::net::TcpListener, Option<Arc<rustls::ServerConfig>>) -> F,
) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&a.listen).await.with_context(|| format!("listening on {}", a.listen))?;
        let bound = listener.local_addr()?;
        if !bound.ip().is_loopback() && (!authenticated || tls.is_none()) {
            anyhow::bail!(
                "{bound} is not a loopback address: give --token-file and --tls-cert/--tls-key ({who} off this host needs a token, and TLS to keep it secret)"
            );
        }
        let metrics = bind_metrics(a.metrics.as_deref()).await?;
        let metrics_addr = metrics.as_ref().map(|m| m.local_addr()).transpose()?;
        let line = format!(
            "tessera {name}: {serving} {bound}{}{detail}{}",
            match (authenticated, tls.is_some()) {
                (true, true) => " over TLS, with a bearer token",
                (true, false) => " with a bearer token (loopback only)",
                (false, true) => " over TLS, without a token (loopback only)",
                (false, false) => " without a token (loopback only)",
            },
            metrics_addr.map(|m| format!("; metrics on http://{m}/metrics")).unwrap_or_default()
        );
        crate::ready::announce(&line, &json!({"listen": bound.to_string(), "metrics": metrics_addr.map(|m| m.to_string())}), a.ready_file.as_deref())?;
        let metrics = serve_metrics(metrics, render);
        serve(listener, tls).await;
        if let Some(m) = metrics {
            m.abort();
        }
        anyhow::Ok(())
    })?;
    eprintln!("tessera {name}: stopped");
    Ok(ExitCode::SUCCESS)
}

/// The TLS of an HTTP server (HTTP/2 or HTTP/1.1) with `--tls-cert` and `--tls-key`.
pub fn server_tls(a: &ServerArgs) -> Result<Option<Arc<rustls::ServerConfig>>> {
    match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => Ok(Some(tessera_cache::tls::server_config(cert, key, None, &[b"h2", b"http/1.1"])?)),
        (None, None) => Ok(None),
        _ => anyhow::bail!("give both --tls-cert and --tls-key"),
    }
}

/// The `--metrics` listener of a server, if it was given one.
async fn bind_metrics(addr: Option<&str>) -> Result<Option<tokio::net::TcpListener>> {
    match addr {
        Some(m) => Ok(Some(tokio::net::TcpListener::bind(m).await.with_context(|| format!("metrics listener {m}"))?)),
        None => Ok(None),
    }
}

/// Serves `render` at `/metrics` on `listener` until the task is aborted.
fn serve_metrics(listener: Option<tokio::net::TcpListener>, render: impl Fn() -> String + Send + Sync + 'static) -> Option<tokio::task::JoinHandle<()>> {
    listener.map(|l| tokio::spawn(tessera_cache::metrics::serve(l, Arc::new(render))))
}
