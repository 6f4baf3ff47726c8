//! One function per subcommand: each parses nothing and decides nothing a
//! library can, it calls the library and prints the result. Serving
//! (`serve`, `mount`, `cachenode`), running and benchmarks have modules of
//! their own; `options` turns shared flags into library options.

mod bench;
mod optimize;
mod options;
mod run;
mod serve;

use options::threads;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use serde_json::json;
use tessera_chunk::Manifest;
use tessera_import::ImportOptions;
use tessera_oci::PullOptions;
use tessera_store::{readback, Home, ImageRef, Store, StoreUrl};

use crate::flags::{BenchCommand, Cli, Command, GcArgs, ImportArgs, KeyringCommand};
use crate::progress::{human, Bars};

pub fn run(cli: Cli) -> Result<ExitCode> {
    // A cache node, the tree manager and the relay keep no images: they need no TESSERA_HOME.
    let command = match cli.command {
        Command::Cachenode(args) => return serve::cachenode(args),
        Command::Treemgr(args) => return serve::treemgr(args),
        Command::Sim(args) => return sim(args),
        Command::Bench(BenchCommand::Relay { listen, target, delay, ready_file }) => return bench::relay(&listen, &target, delay, ready_file.as_deref()),
        other => other,
    };
    let home_dir = match cli.home {
        Some(h) => h,
        None => default_home()?,
    };
    // An empty TESSERA_STORE means the default, as an unset one.
    let url = match cli.store.as_deref().filter(|u| !u.is_empty()) {
        Some(u) => StoreUrl::parse(u)?,
        None => StoreUrl::Local(home_dir.clone()),
    };
    let store = Store::open(&url).with_context(|| format!("opening the store {url}"))?;
    let mut home = Home::with_store(&home_dir, store).with_context(|| format!("opening TESSERA_HOME {}", home_dir.display()))?;
    if let Some(k) = cli.keyring.as_deref().filter(|k| !k.is_empty()) {
        home = home.with_keyring(tessera_store::KeyringAt::parse(k)?);
    }
    match command {
        Command::Serve(args) => serve::serve(home, args),
        Command::Mount(args) => serve::mount(home, args),
        Command::Run(args) => run::run(home, args),
        Command::Profile { name, json } => profile(&home, &name, json),
        Command::Import(args) => import(&home, args),
        Command::Optimize(args) => optimize::optimize(&home, args),
        Command::Images { json } => images(&home, json),
        Command::Inspect { name, json } => inspect(&home, &name, json),
        Command::Export { name, file } => export(&home, &name, &file),
        Command::Verify { name, json } => verify(&home, &name, json),
        Command::Rm { names } => rm(&home, &names),
        Command::Keyring(command) => keyring(&home, command),
        Command::Gc(args) => gc(&home, args),
        Command::Bench(b) => bench::bench(&home, b),
        Command::Cachenode(_) | Command::Treemgr(_) | Command::Sim(_) => unreachable!("handled above"),
    }
}

/// `tessera sim`.
fn sim(a: crate::flags::SimArgs) -> Result<ExitCode> {
    let positive = |x: f64| x > 0.0 && x.is_finite();
    if a.vms == 0 || a.invocations == 0 || !positive(a.image_mb) || !positive(a.fetch_fraction) || a.fetch_fraction > 1.0 {
        anyhow::bail!("give at least one VM and one invocation, an image of more than 0 MB and a --fetch-fraction in (0, 1]");
    }
    if ![a.nic_gbps, a.registry_gbps, a.origin_rps, a.compression].into_iter().all(positive) {
        anyhow::bail!("--nic-gbps, --registry-gbps, --origin-rps and --compression must be more than 0");
    }
    let params = tessera_sim::Params {
        vms: a.vms,
        invocations: a.invocations,
        image_mb: a.image_mb,
        fetch_fraction: a.fetch_fraction,
        nic_gbps: a.nic_gbps,
        registry_gbps: a.registry_gbps,
        registry_latency: a.registry_latency.as_secs_f64(),
        tessera_origin_rps: a.origin_rps,
        tessera_in_flight: a.origin_concurrency.max(1),
        tessera_compression: a.compression,
        start_seconds: a.start_cpu.as_secs_f64(),
        seed: a.seed,
        ..Default::default()
    };
    let outcomes: Vec<tessera_sim::Outcome> = a.system.iter().map(|s| tessera_sim::simulate(&params, *s)).collect();
    for o in &outcomes {
        if a.json {
            println!("{}", serde_json::to_string(o)?);
        } else {
            println!(
                "{:<10} {} containers on {} VMs: first running {:.2} s, all {:.2} s (p50 {:.2} s, p99 {:.2} s); origin {} (busiest second {:.2} Gbit/s, {} requests), peers {}",
                o.system,
                o.invocations,
                o.vms,
                o.seconds_first_running,
                o.seconds_all_running,
                o.p50_seconds,
                o.p99_seconds,
                human(o.origin_bytes),
                o.max_origin_gbps,
                o.max_origin_requests_per_second,
                human(o.peer_bytes)
            );
        }
    }
    if let Some(path) = &a.plot {
        let title = format!("{} containers on {} VMs, {} MB image", a.invocations, a.vms.min(a.invocations), a.image_mb);
        crate::ready::write_whole(path, tessera_sim::plot::svg(&title, &outcomes).as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn default_home() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("tessera"));
    }
    let home = std::env::var_os("HOME").context("neither TESSERA_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".local/share/tessera"))
}

fn import(home: &Home, a: ImportArgs) -> Result<ExitCode> {
    let bars = Bars::new(a.json);
    let pull = PullOptions { platform: a.platform, insecure: a.insecure, creds: a.creds };
    let first = match &a.optimize_with {
        Some(earlier) => {
            optimize::start_files(home, earlier, &pull, &bars).inspect_err(|_| bars.done()).with_context(|| format!("--optimize-with {earlier}"))?.paths
        }
        None => Vec::new(),
    };
    let options = ImportOptions {
        name: a.name,
        tenant: a.tenant,
        pull,
        headroom_bytes: a.headroom,
        threads: a.threads,
        dedup_scope: a.dedup_scope,
        lease: a.lease,
        first,
        record_files: false,
        expect_digest: None,
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
            "imported {} ({} layer{}): {} disk in {} chunks ({} holes); {} new chunks ({}), {} of them metadata ({}); {:.2} s",
            report.name,
            report.layers,
            if report.layers == 1 { "" } else { "s" },
            human(report.disk_bytes),
            report.chunks,
            report.holes,
            report.new_chunks,
            human(report.new_bytes),
            report.new_metadata_chunks,
            human(report.new_metadata_bytes),
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

/// Lists the images as the catalog hands them on, one at a time (a store
/// of any size is never held in memory), as a table or a JSON array.
fn images(home: &Home, json: bool) -> Result<ExitCode> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // An empty store needs no keyring (and none is made).
    let mut keyring = None;
    let mut first = true;
    let mut failure = None;
    if !json {
        writeln!(out, "{:<32} {:>10} {:>8} {:>8}  SOURCE", "NAME", "DISK", "CHUNKS", "STORED")?;
    }
    home.catalog.scan(&mut |name, r| {
        let r = match r {
            Ok(r) => r,
            Err(e) => return eprintln!("tessera: warning: skipping image {name}: {e}"),
        };
        if keyring.is_none() {
            match home.keyring() {
                Ok(k) => keyring = Some(k),
                Err(e) => {
                    failure.get_or_insert(e);
                    return;
                }
            }
        }
        let keyring: &dyn tessera_chunk::Keyring = keyring.as_deref().expect("opened above");
        let row = match home.catalog.get_manifest(r.generation, &r.manifest).and_then(|s| Ok(s.open(keyring)?)) {
            Ok(m) => summary(&name, &r, &m),
            Err(e) => return eprintln!("tessera: warning: {name}: {e}"),
        };
        let written = if json {
            let element = serde_json::to_string_pretty(&row).expect("a row serialises").replace('\n', "\n  ");
            write!(out, "{}\n  {element}", if first { "[" } else { "," })
        } else {
            writeln!(
                out,
                "{:<32} {:>10} {:>8} {:>8}  {}",
                name,
                human(row["disk_bytes"].as_u64().unwrap_or(0)),
                row["chunks"].as_u64().unwrap_or(0),
                row["stored_chunks"].as_u64().unwrap_or(0),
                row["source"].as_str().unwrap_or("")
            )
        };
        first = false;
        let _ = written;
    })?;
    if let Some(e) = failure {
        return Err(e.into());
    }
    if json {
        writeln!(out, "{}", if first { "[]" } else { "\n]" })?;
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
    v["salt_epoch"] = json!(m.salt_epoch);
    v["dedup_scope"] = json!(m.dedup_scope);
    v["generation"] = json!(r.generation);
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
    println!("disk:        {} in {} chunks: {} stored, {} holes", human(g.disk_bytes), m.chunks.len(), m.stored_chunks(), m.chunks.len() - m.stored_chunks());
    println!(
        "layers:      {} (data in chunks {})",
        g.layers.len(),
        g.layers.iter().map(|l| format!("{}+{}", l.first_chunk, l.chunks)).collect::<Vec<_>>().join(", ")
    );
    println!("metadata:    from chunk {}; headroom {}", g.metadata_chunk, human(g.headroom_bytes));
    println!("inodes:      {} of {}", g.inodes_used, g.inodes_total);
    println!("manifest:    {} (tenant {}, store generation {})", r.manifest, r.tenant, r.generation);
    println!("sealed:      salt {} of generation {}, dedup scope {}", m.salt_id, m.salt_epoch, m.dedup_scope);
    Ok(ExitCode::SUCCESS)
}

fn export(home: &Home, name: &str, file: &std::path::Path) -> Result<ExitCode> {
    let (r, m) = home.manifest(name)?;
    tessera_store::lifecycle::Watch::new(home.store()).note_read(r.generation, name);
    let bars = Bars::new(false);
    tessera_oci::Progress::start(&bars, "exporting", m.stored_chunks() as u64 * tessera_chunk::CHUNK_SIZE as u64);
    let result = readback::export(&m, home.chunks_of(&r).as_ref(), file, threads(), &|n| tessera_oci::Progress::advance(&bars, n));
    bars.done();
    result.with_context(|| format!("exporting {name}"))?;
    println!("exported {name} to {} ({})", file.display(), human(m.geometry.disk_bytes));
    Ok(ExitCode::SUCCESS)
}

fn verify(home: &Home, name: &str, json: bool) -> Result<ExitCode> {
    let (r, m) = home.manifest(name)?;
    tessera_store::lifecycle::Watch::new(home.store()).note_read(r.generation, name);
    let bars = Bars::new(json);
    tessera_oci::Progress::start(&bars, "verifying", m.stored_chunks() as u64 * tessera_chunk::CHUNK_SIZE as u64);
    let bad = readback::verify(&m, home.chunks_of(&r).as_ref(), threads(), &|n| tessera_oci::Progress::advance(&bars, n));
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
                    Some(r) => match home.catalog.release_manifest(r.generation, &r.manifest) {
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
        KeyringCommand::Init { dedup_scope } => {
            println!("{}", home.init_keyring(dedup_scope)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn gc(home: &Home, a: GcArgs) -> Result<ExitCode> {
    // Keys are needed only for images imported before manifests listed
    // their chunks; a collector without a keyring does without.
    let keys = home.keyring().ok();
    let options = tessera_store::lifecycle::GcOptions { grace: a.grace, lease: a.lease, rotate_after: a.rotate_after };
    let report = tessera_store::lifecycle::step(home.store(), keys.as_deref().map(|k| k as &dyn tessera_chunk::KeyProvider), &options)?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let list = |v: &[u64]| if v.is_empty() { "none".to_owned() } else { v.iter().map(u64::to_string).collect::<Vec<_>>().join(", ") };
    match report.step.as_str() {
        "rotated" => println!("rotated: generation {} is active; {} retired", report.active, list(&report.retired)),
        "migrated" => println!(
            "moved {} images ({} chunks) into generation {}; expired: {}",
            report.migrated_images,
            report.copied_chunks,
            report.active,
            list(&report.expired)
        ),
        "deleted" => println!("deleted generations {}: {} chunks ({})", list(&report.deleted), report.deleted_chunks, human(report.deleted_bytes)),
        "reinstated" => println!("generations {} were read after they expired (a bug): retired again, and kept", list(&report.reinstated)),
        _ => {}
    }
    if let Some(w) = &report.waiting {
        println!("waiting: {w}");
    }
    println!("active {}; retired {}; expired {}; {} live images", report.active, list(&report.retired), list(&report.expired), report.live_images);
    Ok(ExitCode::SUCCESS)
}

fn profile(home: &Home, name: &str, json: bool) -> Result<ExitCode> {
    let (r, m) = home.manifest(name)?;
    let Some(p) = tessera_agent::profile::load(home, &r)? else {
        anyhow::bail!("{name} has no start-up profile yet: `tessera run {name}` records one");
    };
    let bytes = p.chunks.len() as u64 * tessera_chunk::CHUNK_SIZE as u64;
    if json {
        println!(
            "{}",
            json!({"name": name, "manifest": p.manifest, "chunks": p.chunks, "bytes": bytes, "blocks": p.blocks.iter().map(|r| r[1]).sum::<u64>(), "block_runs": p.blocks, "disk_bytes": m.geometry.disk_bytes, "recorded_at": p.recorded_at, "seconds": p.seconds})
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
