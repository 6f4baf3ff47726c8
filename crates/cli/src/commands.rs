//! One function per subcommand.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use serde_json::json;
use tessera_chunk::Manifest;
use tessera_import::ImportOptions;
use tessera_oci::PullOptions;
use tessera_store::{readback, Home, ImageRef};

use crate::flags::{BenchCommand, CacheArgs, Cli, Command, ImportArgs, KeyringCommand, LimitArgs, MountArgs, ServeArgs};
use crate::progress::{human, Bars};

pub fn run(cli: Cli) -> Result<ExitCode> {
    // A cache node keeps no images: it needs no TESSERA_HOME.
    let command = match cli.command {
        Command::Cachenode(args) => return crate::tier::cachenode(args),
        other => other,
    };
    let home_dir = match cli.home {
        Some(h) => h,
        None => default_home()?,
    };
    let home = Home::open(&home_dir).with_context(|| format!("opening TESSERA_HOME {}", home_dir.display()))?;
    match command {
        Command::Serve(args) => serve(home, args),
        Command::Mount(args) => mount(home, args),
        Command::Run(args) => crate::run::run(home, args),
        Command::Profile { name, json } => profile(&home, &name, json),
        Command::Import(args) => import(&home, args),
        Command::Images { json } => images(&home, json),
        Command::Inspect { name, json } => inspect(&home, &name, json),
        Command::Export { name, file } => export(&home, &name, &file),
        Command::Verify { name, json } => verify(&home, &name, json),
        Command::Rm { names } => rm(&home, &names),
        Command::Keyring(command) => keyring(&home, command),
        Command::Cachenode(_) => unreachable!("handled above"),
        Command::Bench(BenchCommand::Relay { listen, target, delay, ready_file }) => crate::tier::relay(&listen, &target, delay, ready_file.as_deref()),
        Command::Bench(BenchCommand::Tier { name, tier, count, origin_reads, warm, policy, versus, origin_latency, origin_bandwidth }) => {
            let bench = crate::tier::TierBench { count, origin_reads, warm, policy, versus, origin_latency, origin_bandwidth };
            crate::tier::bench(&home, &name, &tier, &bench)
        }
        Command::Bench(BenchCommand::Lru { capacity, hot_functions, cron_chunks }) => {
            use tessera_cache::trace::{generate, hit_rate, TraceSpec};
            let spec = TraceSpec { hot_functions, cron_chunks_between: cron_chunks, ..TraceSpec::default() };
            let trace = generate(&spec);
            let (lru, lru2) = (hit_rate(&trace, capacity, false), hit_rate(&trace, capacity, true));
            println!(
                "{}",
                json!({"accesses": trace.len(), "capacity": capacity, "hot_working_set": spec.hot_functions * spec.hot_chunks,
                       "lru_hit_rate": lru, "lru2_hit_rate": lru2, "points": 100.0 * (lru2 - lru)})
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::NbdLatency { socket, export, block, count, span }) => nbd_latency(&socket, &export, block, count, span),
        Command::Bench(BenchCommand::Seal { file, threads: t }) => {
            let t = if t == 0 { threads() } else { t };
            let r = tessera_import::seal_file(&file, t).with_context(|| format!("reading {}", file.display()))?;
            let mut v = serde_json::to_value(&r)?;
            v["mib_per_second"] = json!(r.bytes as f64 / (1 << 20) as f64 / r.seconds);
            println!("{v}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn default_home() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("tessera"));
    }
    let home = std::env::var_os("HOME").context("neither TESSERA_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".local/share/tessera"))
}

fn threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
}

fn import(home: &Home, a: ImportArgs) -> Result<ExitCode> {
    let bars = Bars::new(a.json);
    let options = ImportOptions {
        name: a.name,
        tenant: a.tenant,
        pull: PullOptions { platform: a.platform, insecure: a.insecure, creds: a.creds },
        headroom_bytes: a.headroom,
        threads: a.threads,
    };
    let report = tessera_import::import(home, &a.source, &options, &bars);
    bars.done();
    let report = report?;
    for w in &report.warnings {
        eprintln!("tessera: warning: {w}");
    }
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "imported {} ({} layers): {} disk in {} chunks ({} holes); {} new chunks ({}); {:.2} s",
            report.name,
            report.layers,
            human(report.disk_bytes),
            report.chunks,
            report.holes,
            report.new_chunks,
            human(report.new_bytes),
            report.seconds
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn summary(name: &str, r: &ImageRef, m: &Manifest) -> serde_json::Value {
    let stored = m.stored_chunks() as u64;
    json!({
        "name": name,
        "manifest": r.manifest,
        "tenant": r.tenant,
        "disk_bytes": m.geometry.disk_bytes,
        "chunks": m.chunks.len(),
        "stored_chunks": stored,
        "holes": m.chunks.len() as u64 - stored,
        "source": m.source.reference,
        "source_digest": m.source.manifest_digest,
        "imported_at": m.imported_at,
    })
}

fn images(home: &Home, json: bool) -> Result<ExitCode> {
    let listing = home.catalog.list()?;
    for (name, e) in &listing.bad {
        eprintln!("tessera: warning: skipping image {name}: {e}");
    }
    // An empty store needs no keyring (and none is made).
    let keyring = if listing.images.is_empty() { None } else { Some(home.keyring()?) };
    let mut rows = Vec::new();
    for (name, r) in listing.images {
        let keyring = keyring.as_ref().expect("opened when there are images");
        let m = home.catalog.get_manifest(&r.manifest).and_then(|s| Ok(s.open(keyring)?));
        match m {
            Ok(m) => rows.push(summary(&name, &r, &m)),
            Err(e) => eprintln!("tessera: warning: {name}: {e}"),
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<32} {:>10} {:>8} {:>8}  SOURCE", "NAME", "DISK", "CHUNKS", "STORED");
    for r in rows {
        println!(
            "{:<32} {:>10} {:>8} {:>8}  {}",
            r["name"].as_str().unwrap_or(""),
            human(r["disk_bytes"].as_u64().unwrap_or(0)),
            r["chunks"].as_u64().unwrap_or(0),
            r["stored_chunks"].as_u64().unwrap_or(0),
            r["source"].as_str().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn inspect(home: &Home, name: &str, json: bool) -> Result<ExitCode> {
    let (r, m) = home.manifest(name)?;
    let mut v = summary(name, &r, &m);
    v["config"] = serde_json::to_value(&m.config)?;
    v["geometry"] = serde_json::to_value(&m.geometry)?;
    v["source_layers"] = serde_json::to_value(&m.source.layers)?;
    v["config_digest"] = json!(m.source.config_digest);
    v["platform"] = json!(m.source.platform);
    v["salt_id"] = json!(m.salt_id);
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let c = &m.config;
    let g = &m.geometry;
    println!("name:        {name}");
    println!("source:      {} ({})", m.source.reference, m.source.manifest_digest);
    println!("config:      {} {}", m.source.config_digest, m.source.platform);
    println!("entrypoint:  {:?}", c.entrypoint);
    println!("cmd:         {:?}", c.cmd);
    println!("env:         {:?}", c.env);
    println!("workdir:     {:?}", c.working_dir);
    println!("user:        {:?}", c.user);
    println!(
        "disk:        {} in {} chunks: {} stored, {} holes",
        human(g.disk_bytes),
        m.chunks.len(),
        m.stored_chunks(),
        m.chunks.len() - m.stored_chunks()
    );
    println!("layers:      {} (data in chunks {})", g.layers.len(), g.layers.iter().map(|l| format!("{}+{}", l.first_chunk, l.chunks)).collect::<Vec<_>>().join(", "));
    println!("metadata:    from chunk {}; headroom {}", g.metadata_chunk, human(g.headroom_bytes));
    println!("inodes:      {} of {}", g.inodes_used, g.inodes_total);
    println!("manifest:    {} (tenant {})", r.manifest, r.tenant);
    Ok(ExitCode::SUCCESS)
}

fn export(home: &Home, name: &str, file: &std::path::Path) -> Result<ExitCode> {
    let (_, m) = home.manifest(name)?;
    let bars = Bars::new(false);
    tessera_oci::Progress::start(&bars, "exporting", m.stored_chunks() as u64 * tessera_chunk::CHUNK_SIZE as u64);
    let result = readback::export(&m, &home.chunks, file, threads(), &|n| tessera_oci::Progress::advance(&bars, n));
    bars.done();
    result.with_context(|| format!("exporting {name}"))?;
    println!("exported {name} to {} ({})", file.display(), human(m.geometry.disk_bytes));
    Ok(ExitCode::SUCCESS)
}

fn verify(home: &Home, name: &str, json: bool) -> Result<ExitCode> {
    let (_, m) = home.manifest(name)?;
    let bars = Bars::new(json);
    tessera_oci::Progress::start(&bars, "verifying", m.stored_chunks() as u64 * tessera_chunk::CHUNK_SIZE as u64);
    let bad = readback::verify(&m, &home.chunks, threads(), &|n| tessera_oci::Progress::advance(&bars, n));
    bars.done();
    let bad = bad.with_context(|| format!("verifying {name}"))?;
    if json {
        let list: Vec<_> = bad.iter().map(|b| json!({"index": b.index, "id": b.id.to_hex(), "error": b.error.to_string()})).collect();
        println!("{}", json!({"name": name, "chunks": m.stored_chunks(), "bad": list}));
    } else if bad.is_empty() {
        println!("{name}: all {} stored chunks present, matching their ids and opening", m.stored_chunks());
    } else {
        for b in &bad {
            println!("{name}: bad chunk {} ({}): {}", b.index, b.id, b.error);
        }
        println!("{name}: {} of {} stored chunks are bad", bad.len(), m.stored_chunks());
    }
    Ok(if bad.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Removes each name; a failure is reported for a name that was not
/// removed, and only a warning for tidying up after one that was.
fn rm(home: &Home, names: &[String]) -> Result<ExitCode> {
    let mut failed = 0;
    for name in names {
        match home.catalog.remove(name) {
            Err(e) => {
                eprintln!("tessera: error: {name}: {e}");
                failed += 1;
            }
            Ok(r) => {
                println!("removed {name}");
                match r {
                    None => eprintln!("tessera: warning: {name}: its name file could not be read, so its manifest stays in the store"),
                    Some(r) => match home.catalog.release_manifest(&r.manifest) {
                        Ok(tessera_store::Release::Removed | tessera_store::Release::InUse) => {}
                        Ok(tessera_store::Release::Unsure(bad)) => eprintln!(
                            "tessera: warning: {name}: its manifest {} stays in the store: the name files of {} cannot be read, and might use it",
                            r.manifest,
                            bad.join(", ")
                        ),
                        Err(e) => eprintln!("tessera: warning: {name}: its manifest {} stays in the store: {e}", r.manifest),
                    },
                }
            }
        }
    }
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(2) })
}

fn keyring(home: &Home, command: KeyringCommand) -> Result<ExitCode> {
    match command {
        KeyringCommand::Init => {
            let k = home.init_keyring()?;
            println!("created the keyring {} (salt {})", k.path().display(), k.salt().id());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Fewer allocator arenas: the agent's many I/O threads would otherwise
/// each keep chunk-sized free buffers of their own. And a fixed mmap
/// threshold: glibc otherwise raises it to the largest buffer freed, after
/// which NBD reply buffers (up to 32 MiB) come from the heap and their
/// memory is kept after they are freed.
pub(crate) fn bound_allocator() {
    // SAFETY: mallopt only tunes glibc's allocator; it is called before any
    // thread of ours starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

pub(crate) fn agent_options(
    home: &Home,
    nbd: Vec<tessera_agent::Listen>,
    metrics: Option<String>,
    limits: LimitArgs,
    c: CacheArgs,
) -> Result<tessera_agent::AgentOptions> {
    let tier = crate::tier::tier_options(&c.tier, tessera_cache::tier::ReadPolicy::FirstK)?;
    Ok(tessera_agent::AgentOptions {
        nbd,
        metrics,
        cache_dir: c.cache_dir.unwrap_or_else(|| home.root().join("cache")),
        cache_mem: c.cache_mem,
        cache_disk: c.cache_disk,
        origin_concurrency: c.origin_concurrency,
        origin_queue: c.origin_queue,
        origin_latency: c.origin_latency,
        origin_bandwidth: c.origin_bandwidth,
        tier,
        limits: tessera_agent::nbd::Limits {
            max_connections: limits.max_connections,
            buffer_bytes: limits.buffer_memory,
            client_timeout: limits.client_timeout,
        },
        max_overlays: limits.max_overlays,
    })
}

fn serve(home: Home, a: ServeArgs) -> Result<ExitCode> {
    use tessera_agent::{Agent, Listen};
    bound_allocator();
    // Say at once what cannot be served, rather than at each client's LIST.
    let listing = home.catalog.list()?;
    for (name, e) in &listing.bad {
        eprintln!("tessera: warning: not exporting image {name}: {e}");
    }
    if !listing.images.is_empty() {
        home.keyring()?;
    }
    let nbd = if a.nbd.is_empty() {
        vec![Listen::Unix(home.root().join("nbd.sock"))]
    } else {
        a.nbd.iter().map(|s| Listen::parse(s).map_err(anyhow::Error::msg)).collect::<Result<_>>()?
    };
    let options = agent_options(&home, nbd, a.metrics.clone(), a.limits, a.cache)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().max_blocking_threads(128).build()?;
    let agent = std::sync::Arc::new(Agent::new(home, options).context("starting the agent")?);
    let ready_file = a.ready_file;
    // A ready file that cannot be written stops the agent: whoever waits for it would wait forever.
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
    let failure = runtime.block_on(async {
        let mut failed_rx = failed_rx;
        let mut failure = None;
        let served = agent
            .clone()
            .run(
                |bound| {
                    let line = format!(
                        "tessera: serving NBD on {}{}",
                        bound.nbd.join(", "),
                        bound.metrics.as_deref().map(|m| format!("; metrics on http://{m}/metrics")).unwrap_or_default()
                    );
                    if let Err(e) = crate::ready::announce(&line, &json!({"nbd": bound.nbd, "metrics": bound.metrics}), ready_file.as_deref()) {
                        let _ = failed_tx.send(e);
                    }
                },
                async {
                    tokio::select! {
                        () = interrupted() => {}
                        Ok(e) = &mut failed_rx => failure = Some(e),
                    }
                },
            )
            .await;
        served.map(|()| failure)
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    eprintln!("tessera: stopped");
    Ok(ExitCode::SUCCESS)
}

/// Completes on SIGINT or SIGTERM.
pub(crate) async fn interrupted() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn mount(home: Home, a: MountArgs) -> Result<ExitCode> {
    use tessera_agent::nbd::Exports;
    use tessera_agent::{fuse, Agent};
    bound_allocator();
    let options = agent_options(&home, Vec::new(), None, LimitArgs::default(), a.cache)?;
    let agent = Agent::new(home, options).context("starting the agent")?;
    let device = agent.exports.open(&a.name).map_err(anyhow::Error::msg).with_context(|| format!("opening {}", a.name))?;
    let writable = device.writable();
    let session = fuse::mount(fuse::DiskFs::new(&a.name, device), &a.dir)
        .with_context(|| format!("mounting FUSE on {} (is fuse3 installed and /dev/fuse there?)", a.dir.display()))?;
    let file = a.dir.join(&a.name);
    if let Some(mp) = &a.loop_mount {
        let opts = if writable { "loop" } else { "loop,ro" };
        let out = std::process::Command::new("mount").args(["-o", opts]).arg(&file).arg(mp).output().context("running mount")?;
        if !out.status.success() {
            drop(session);
            anyhow::bail!("loop-mounting {} on {}: {}", file.display(), mp.display(), String::from_utf8_lossy(&out.stderr).trim());
        }
        eprintln!("tessera: {} is {}; its filesystem is mounted on {}", file.display(), a.name, mp.display());
    } else {
        eprintln!("tessera: {} is {}", file.display(), a.name);
    }
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(interrupted());
    if let Some(mp) = &a.loop_mount {
        let ok = std::process::Command::new("umount").arg(mp).status().map(|s| s.success()).unwrap_or(false);
        if !ok {
            eprintln!("tessera: could not unmount {}; unmounting lazily", mp.display());
            let _ = std::process::Command::new("umount").arg("-l").arg(mp).status();
        }
    }
    drop(session);
    agent.exports.flush_all();
    Ok(ExitCode::SUCCESS)
}

fn nbd_latency(socket: &std::path::Path, export: &str, block: u64, count: usize, span: Option<u64>) -> Result<ExitCode> {
    let mut c = tessera_agent::client::Client::connect(socket, export).with_context(|| format!("connecting to {}", socket.display()))?;
    let span = span.unwrap_or(c.size).min(c.size);
    let blocks = (span / block).max(1);
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut buf = vec![0u8; block as usize];
    let mut lat = Vec::with_capacity(count);
    let started = std::time::Instant::now();
    for _ in 0..count {
        let offset = (tessera_cache::trace::xorshift(&mut state) % blocks) * block;
        let t = std::time::Instant::now();
        c.read(offset, &mut buf)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let total = started.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
    println!("{}", json!({"reads": count, "block": block, "p50_us": pct(0.5), "p99_us": pct(0.99), "mean_us": lat.iter().sum::<f64>() / count as f64, "iops": count as f64 / total}));
    Ok(ExitCode::SUCCESS)
}

fn profile(home: &Home, name: &str, json: bool) -> Result<ExitCode> {
    let (r, m) = home.manifest(name)?;
    let Some(sealed) = home.catalog.get_profile(&r.manifest)? else {
        anyhow::bail!("{name} has no start-up profile yet: `tessera run {name}` records one");
    };
    let p = sealed.open_profile(&home.keyring()?)?;
    let bytes = p.chunks.len() as u64 * tessera_chunk::CHUNK_SIZE as u64;
    if json {
        println!(
            "{}",
            json!({"name": name, "manifest": p.manifest, "chunks": p.chunks, "bytes": bytes, "disk_bytes": m.geometry.disk_bytes, "recorded_at": p.recorded_at, "seconds": p.seconds})
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{name}: {} chunks ({}, {:.2}% of the {} disk) read in the first {:.2} s of a run",
        p.chunks.len(),
        human(bytes),
        100.0 * bytes as f64 / m.geometry.disk_bytes as f64,
        human(m.geometry.disk_bytes),
        p.seconds
    );
    let shown: Vec<String> = p.chunks.iter().take(32).map(|c| c.to_string()).collect();
    println!("order: {}{}", shown.join(" "), if p.chunks.len() > 32 { " …" } else { "" });
    Ok(ExitCode::SUCCESS)
}
