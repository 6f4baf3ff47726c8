//! `tessera bench`: flags to [`tessera_bench`], its results as JSON.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;
use tessera_cache::tier::ReadPolicy;
use tessera_store::Home;

use super::options::{interrupted, threads, tier_options};
use crate::flags::BenchCommand;

/// Every `tessera bench` command but the relay.
pub fn bench(home: &Home, command: BenchCommand) -> Result<ExitCode> {
    let out = match command {
        BenchCommand::Relay { .. } => unreachable!("the relay needs no home"),
        BenchCommand::Tier { name, tier, count, origin_reads, warm, policy, versus, origin_latency, origin_bandwidth } => {
            let options = tier_options(&tier, ReadPolicy::FirstK)?.context("give --cache-nodes")?;
            let bench = tessera_bench::tier::TierBench { count, origin_reads, warm, policy, versus, origin_latency, origin_bandwidth };
            tessera_bench::tier::run(home, &name, &options, &bench)?
        }
        BenchCommand::Lru { capacity, hot_functions, cron_chunks } => serde_json::to_value(tessera_bench::lru::run(capacity, hot_functions, cron_chunks))?,
        BenchCommand::NbdLatency { socket, tcp, tls_ca, tls_cert, tls_key, tls_hostname, export, block, count, span } => {
            let server = match (socket, tcp) {
                (Some(path), None) => tessera_bench::NbdServer::Unix(path),
                (None, Some(addr)) => tessera_bench::NbdServer::Tcp(
                    addr,
                    tls_ca.map(|ca| tessera_bench::TlsClient { ca, identity: tls_cert.zip(tls_key), server_name: tls_hostname }),
                ),
                _ => anyhow::bail!("give --socket PATH or --tcp HOST:PORT"),
            };
            tessera_bench::nbd::latency(&server, &export, block, count, span)?
        }
        BenchCommand::NbdFlood { socket, export, clients, seconds, pid } => {
            serde_json::to_value(tessera_bench::nbd::flood(&socket, &export, clients, seconds.as_secs_f64(), pid)?)?
        }
        BenchCommand::NbdLabels { socket, export, connections, pid } => serde_json::to_value(tessera_bench::nbd::labels(&socket, &export, connections, pid)?)?,
        BenchCommand::Seal { file, threads: t } => {
            let t = if t == 0 { threads() } else { t };
            let r = tessera_bench::seal::run(&file, t).with_context(|| format!("reading {}", file.display()))?;
            let mut v = serde_json::to_value(&r)?;
            v["mib_per_second"] = json!(r.bytes as f64 / (1 << 20) as f64 / r.seconds);
            v
        }
    };
    println!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// `tessera bench relay`.
pub fn relay(listen: &str, target: &str, delay: Duration, ready_file: Option<&Path>) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(tessera_bench::relay::relay(
        listen,
        target,
        delay,
        |bound| {
            crate::ready::announce(&format!("tessera: relaying {bound} to {target}, answers {delay:?} late"), &json!({"listen": bound.to_string()}), ready_file)
                .map_err(|e| tessera_bench::Error::Usage(e.to_string()))
        },
        interrupted(),
    ))?;
    Ok(ExitCode::SUCCESS)
}
