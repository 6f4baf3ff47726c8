//! NBD servers measured from outside, through one minimal client
//! ([`crate::Client`]) whatever the server: request latency, memory under
//! floods of clients that never read their replies, and descriptors after
//! many short `NAME@LABEL` connections.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::{percentiles, Client, Error};

/// Latency of `count` random reads of `block` bytes (aligned to it), one at
/// a time, within the first `span` bytes of the export; one JSON object.
pub fn latency(server: &crate::nbd_client::Server, export: &str, block: u64, count: usize, span: Option<u64>) -> Result<serde_json::Value, Error> {
    let mut c = Client::open(server, export).map_err(Error::io(format!("connecting to {server:?}")))?;
    let span = span.unwrap_or(c.size).min(c.size);
    let blocks = (span / block).max(1);
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut buf = vec![0u8; block as usize];
    let mut lat = Vec::with_capacity(count);
    let started = Instant::now();
    for _ in 0..count {
        let offset = (tessera_cache::trace::xorshift(&mut state) % blocks) * block;
        let t = Instant::now();
        c.read(offset, &mut buf).map_err(Error::io(format!("reading {export} at {offset}")))?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let total = started.elapsed().as_secs_f64();
    let mut out = percentiles(lat, "us");
    out["block"] = block.into();
    out["iops"] = (count as f64 / total).into();
    Ok(out)
}

/// Resident memory of process `pid`, bytes.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()).unwrap_or(0) * 1024
}

/// Descriptors process `pid` holds open.
pub fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// What [`flood`] measured.
#[derive(Debug, Serialize)]
pub struct FloodReport {
    /// Flooding clients.
    pub clients: usize,
    /// Seconds the flood lasted.
    pub seconds: f64,
    /// The server's RSS before the flood.
    pub rss_idle_bytes: u64,
    /// Its highest RSS during the flood (sampled every 50 ms).
    pub rss_peak_bytes: u64,
    /// Reads of 4 KiB by a well-behaved client during the flood.
    pub honest_reads: usize,
    /// … of which succeeded.
    pub honest_reads_ok: usize,
    /// Their latency.
    pub honest_latency: serde_json::Value,
}

/// `clients` connections to `export` that each send 64 reads of 32 MiB and
/// never read a reply, held for `seconds`, while the RSS of the server
/// (process `pid`) is sampled and one well-behaved client reads 4 KiB at a
/// time.
pub fn flood(socket: &Path, export: &str, clients: usize, seconds: f64, pid: u32) -> Result<FloodReport, Error> {
    let idle = rss(pid);
    let mut flooders = Vec::new();
    for _ in 0..clients {
        let mut c = Client::connect(socket, export).map_err(Error::io("connecting a flooding client"))?;
        for _ in 0..64 {
            if c.send_read(0, 32 << 20).is_err() {
                break;
            }
        }
        flooders.push(c);
    }
    let mut honest = Client::connect(socket, export).map_err(Error::io("connecting the well-behaved client"))?;
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        while stop_rx.recv_timeout(Duration::from_millis(50)).is_err() {
            peak = peak.max(rss(pid));
        }
        peak
    });
    let started = Instant::now();
    let (mut reads, mut ok, mut lat) = (0, 0, Vec::new());
    let mut buf = vec![0u8; 4096];
    while started.elapsed().as_secs_f64() < seconds {
        reads += 1;
        let t = Instant::now();
        if honest.read(4096 * (reads as u64 % 256), &mut buf).is_ok() {
            ok += 1;
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        } else {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = stop_tx.send(());
    let peak = sampler.join().unwrap_or(0);
    drop(flooders);
    Ok(FloodReport {
        clients,
        seconds: started.elapsed().as_secs_f64(),
        rss_idle_bytes: idle,
        rss_peak_bytes: peak,
        honest_reads: reads,
        honest_reads_ok: ok,
        honest_latency: percentiles(lat, "ms"),
    })
}

/// What [`labels`] measured.
#[derive(Debug, Serialize)]
pub struct LabelsReport {
    /// Connections made, each to a label of its own.
    pub connections: usize,
    /// The server's descriptors before.
    pub descriptors_before: usize,
    /// … after every connection closed.
    pub descriptors_after: usize,
    /// The server's RSS before.
    pub rss_before_bytes: u64,
    /// … after.
    pub rss_after_bytes: u64,
    /// Seconds for all the connections.
    pub seconds: f64,
}

/// `connections` connections, one after another, each to `export@labelN`
/// reading 4 KiB and leaving; the server (process `pid`) is measured before
/// and after.
pub fn labels(socket: &Path, export: &str, connections: usize, pid: u32) -> Result<LabelsReport, Error> {
    // Open the image once first, so its disk is in the "before".
    let mut c = Client::connect(socket, export).map_err(Error::io("connecting"))?;
    c.read(0, &mut [0u8; 4096]).map_err(Error::io("reading"))?;
    drop(c);
    std::thread::sleep(Duration::from_millis(200));
    let (fds, mem) = (descriptors(pid), rss(pid));
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    for i in 0..connections {
        let mut c = Client::connect(socket, &format!("{export}@label{i}")).map_err(Error::io(format!("connecting to {export}@label{i}")))?;
        c.read(0, &mut buf).map_err(Error::io(format!("reading {export}@label{i}")))?;
    }
    let seconds = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    Ok(LabelsReport { connections, descriptors_before: fds, descriptors_after: descriptors(pid), rss_before_bytes: mem, rss_after_bytes: rss(pid), seconds })
}
