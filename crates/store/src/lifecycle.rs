//! Garbage collection by roots: the store is split into generations, and
//! disk is reclaimed by deleting whole generations no name uses, never by
//! counting references to chunks or sweeping a live keyspace.
//!
//! ```text
//!  active ──rotate──▶ retired ──(lease waited, no live import lease;
//!                                every name moved to the active one)──▶ expired
//!  expired ──(grace waited, no alarm)──▶ deleted (whole)
//!  expired ──(an alarm: something read it)──▶ retired
//! ```
//!
//! - Imports write chunks and manifests only into the **active**
//!   generation, under a [`Lease`]; a manifest names only chunks of its own
//!   generation, and a name says which generation holds its manifest.
//! - [`step`] (`tessera gc`) advances one safe step per call: rotate (a new
//!   active generation; the old one retired), migrate (each name of a
//!   retired generation, once no import can still commit into it: its
//!   chunks, manifest, refs and profile copied into the active generation
//!   — hard links locally, server-side copies on S3 — and the name moved by
//!   compare-and-swap; then the generation is expired), delete (an expired
//!   generation, whole, after a grace period).
//! - A read of an expired generation means a bug: readers ([`Watch`]) count
//!   it (`tessera_gc_expired_reads_total`), log the image, and drop an
//!   alarm that puts the generation back to retired at the next step.
//!
//! The lifecycle is one small document (`lifecycle.json`) changed only by
//! compare-and-swap, so two collectors never both act on one state.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tessera_chunk::{ChunkId, KeyProvider, Manifest};

use crate::control::{Control, Version};
use crate::{Error, ImageRef, Result, Store};

/// Where the lifecycle document lives among the control documents.
pub const LIFECYCLE_KEY: &str = "lifecycle.json";

/// The store's generations.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Lifecycle {
    /// Format of this document (1).
    pub format: u32,
    /// The generation imports write into.
    pub active: u64,
    /// When it became active (seconds since the epoch); unknown for a
    /// store that never collected.
    #[serde(default)]
    pub active_since: Option<u64>,
    /// Generations that are neither active nor deleted.
    #[serde(default)]
    pub generations: BTreeMap<u64, Generation>,
}

/// A generation on its way out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    /// Where it is.
    pub state: State,
    /// Since when (seconds since the epoch).
    pub since: u64,
}

/// States of a generation that is not the active one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// No new import starts in it; names are still moved out of it.
    Retired,
    /// No name uses it; deleted after the grace period.
    Expired,
}

/// What a reader can know of a generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Imports write into it.
    Active,
    /// Retired or expired.
    Leaving(State),
    /// Deleted (or never made).
    Gone,
}

impl Lifecycle {
    /// Reads the document; a store without one has generation 0 active.
    pub fn load(control: &dyn Control) -> Result<(Lifecycle, Option<Version>)> {
        match control.read(LIFECYCLE_KEY)? {
            None => Ok((Lifecycle { format: 1, ..Default::default() }, None)),
            Some((bytes, v)) => {
                let doc: Lifecycle = serde_json::from_slice(&bytes).map_err(|e| Error::Lifecycle(format!("{LIFECYCLE_KEY} cannot be read: {e}")))?;
                if doc.format != 1 {
                    return Err(Error::Lifecycle(format!("{LIFECYCLE_KEY} has format {}; this build knows 1", doc.format)));
                }
                Ok((doc, Some(v)))
            }
        }
    }

    /// Writes the document if it is still at `version`; an error if another
    /// writer changed it first.
    fn save(&self, control: &dyn Control, version: Option<&Version>) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).expect("the lifecycle serialises");
        if control.write(LIFECYCLE_KEY, &bytes, version)? {
            Ok(())
        } else {
            Err(Error::Lifecycle("another collector changed the lifecycle meanwhile; nothing was done (run again)".into()))
        }
    }

    /// Where generation `g` is.
    pub fn phase(&self, g: u64) -> Phase {
        if g == self.active {
            Phase::Active
        } else if let Some(s) = self.generations.get(&g) {
            Phase::Leaving(s.state)
        } else {
            Phase::Gone
        }
    }

    fn with_state(&self, state: State) -> Vec<u64> {
        self.generations.iter().filter(|(_, s)| s.state == state).map(|(&g, _)| g).collect()
    }
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name: String = String::from_utf8_lossy(&buf[..end]).chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    if name.is_empty() {
        "unknown".into()
    } else {
        name
    }
}

fn nonce() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{t:08x}{}", N.fetch_add(1, Ordering::Relaxed))
}

/// How long an import may hold its lease by default.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(3600);

/// How much later than its expiry a lease of another host is still
/// honoured, for clocks that disagree.
const CLOCK_SKEW: u64 = 60;

/// An import's lease on the active generation: while it is live, the
/// collector moves no name out of that generation and so never expires it.
/// An import checks its lease before naming its image ([`Lease::check`])
/// and again after ([`Lease::confirm`]); the record is removed on drop.
pub struct Lease {
    control: Arc<dyn Control>,
    key: String,
    /// The generation the import writes into.
    pub generation: u64,
    expires: u64,
    seconds: u64,
}

#[derive(Serialize, Deserialize)]
struct LeaseRecord {
    host: String,
    pid: u32,
    started: u64,
    expires: u64,
}

impl Lease {
    /// Takes a lease of `length` on the active generation.
    pub fn take(store: &Store, length: Duration) -> Result<Lease> {
        let control = Arc::clone(&store.control);
        for _ in 0..8 {
            let (doc, _) = Lifecycle::load(control.as_ref())?;
            let g = doc.active;
            let now = unix_now();
            let record = LeaseRecord { host: hostname(), pid: std::process::id(), started: now, expires: now + length.as_secs() };
            let key = format!("leases/{g}/{}-{}-{}.json", record.host, record.pid, nonce());
            control.write(&key, &serde_json::to_vec(&record).expect("a lease serialises"), None)?;
            let lease = Lease { control: Arc::clone(&control), key, generation: g, expires: record.expires, seconds: length.as_secs() };
            // A rotation between the read and the record: take one on the new
            // active generation instead (this one is dropped, so removed).
            if Lifecycle::load(control.as_ref())?.0.active == g {
                return Ok(lease);
            }
        }
        Err(Error::Lifecycle("the active generation kept changing while an import started".into()))
    }

    /// Fails if the lease has run out or its generation is no longer one
    /// an import may name an image in.
    pub fn check(&self) -> Result<()> {
        if unix_now() >= self.expires {
            return Err(Error::LeaseExpired { generation: self.generation, seconds: self.seconds });
        }
        let (doc, _) = Lifecycle::load(self.control.as_ref())?;
        match doc.phase(self.generation) {
            Phase::Active | Phase::Leaving(State::Retired) => Ok(()),
            _ => Err(Error::LeaseExpired { generation: self.generation, seconds: self.seconds }),
        }
    }

    /// After naming: whether the name was set while the lease held (else
    /// the collector may have moved on without it, and the caller takes the
    /// name back).
    pub fn confirm(&self) -> Result<()> {
        self.check()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = self.control.remove(&self.key);
    }
}

/// Whether a lease record still holds: not past its expiry (with slack for
/// other hosts' clocks), and not of a process of this host that is gone.
fn lease_is_live(record: &LeaseRecord, now: u64, this_host: &str) -> bool {
    if record.host == this_host {
        return now < record.expires && crate::pid_alive(record.pid);
    }
    now < record.expires + CLOCK_SKEW
}

/// The live leases on `generation`; records of dead leases are removed.
fn live_leases(control: &dyn Control, generation: u64) -> Result<usize> {
    let dir = format!("leases/{generation}");
    let (now, host) = (unix_now(), hostname());
    let mut live = 0;
    for rel in control.list(&dir)? {
        let key = format!("{dir}/{rel}");
        let Some((bytes, _)) = control.read(&key)? else { continue };
        match serde_json::from_slice::<LeaseRecord>(&bytes) {
            Ok(r) if lease_is_live(&r, now, &host) => live += 1,
            _ => control.remove(&key)?,
        }
    }
    Ok(live)
}

/// What one collector step is allowed to do.
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// How long an expired generation is kept before it is deleted.
    pub grace: Duration,
    /// How long after a rotation names are moved out of the retired
    /// generation: longer than any import's lease.
    pub lease: Duration,
    /// How old the active generation must be before a rotation.
    pub rotate_after: Duration,
}

/// What a collector step did, and where the store stands (`tessera gc --json`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    /// What this step did: `rotated`, `migrated`, `deleted`, `reinstated`, or `waiting`.
    pub step: String,
    /// Why it could go no further, if it could not.
    pub waiting: Option<String>,
    /// The active generation, after the step.
    pub active: u64,
    /// Retired generations, after the step.
    pub retired: Vec<u64>,
    /// Expired generations, after the step.
    pub expired: Vec<u64>,
    /// Generations deleted by this step.
    pub deleted: Vec<u64>,
    /// Chunks deleted by this step.
    pub deleted_chunks: u64,
    /// Bytes this freed.
    pub deleted_bytes: u64,
    /// Names in the store.
    pub live_images: u64,
    /// Names moved into the active generation by this step.
    pub migrated_images: u64,
    /// Chunks copied into the active generation by this step.
    pub copied_chunks: u64,
    /// Expired generations put back to retired because something read them.
    pub reinstated: Vec<u64>,
}

/// Advances the lifecycle of `store` by one safe step. `keys` opens
/// manifests stored before refs were (to learn their chunks); a collector
/// never needs them otherwise.
pub fn step(store: &Store, keys: Option<&dyn KeyProvider>, options: &GcOptions) -> Result<GcReport> {
    let control = store.control.as_ref();
    let (mut doc, version) = Lifecycle::load(control)?;
    let now = unix_now();
    let mut report = GcReport::default();

    // Alarms first: an expired generation something read goes back to retired.
    let alarms = control.list("alarms")?;
    if !alarms.is_empty() {
        for rel in &alarms {
            let Some(g) = rel.split('-').next().and_then(|g| g.parse::<u64>().ok()) else { continue };
            if let Some(s) = doc.generations.get_mut(&g).filter(|s| s.state == State::Expired) {
                *s = Generation { state: State::Retired, since: now };
                if !report.reinstated.contains(&g) {
                    report.reinstated.push(g);
                }
            }
        }
        if !report.reinstated.is_empty() {
            doc.save(control, version.as_ref())?;
        }
        for rel in &alarms {
            control.remove(&format!("alarms/{rel}"))?;
        }
        if !report.reinstated.is_empty() {
            for g in &report.reinstated {
                tracing::error!("generation {g} was read after it expired (a bug): it is retired again, and kept");
            }
            report.step = "reinstated".into();
            return finish(store, &doc, report, None);
        }
    }

    // Delete expired generations whose grace has passed (and what an
    // interrupted delete left of generations the lifecycle no longer has).
    let due: Vec<u64> =
        doc.generations.iter().filter(|(_, s)| s.state == State::Expired && now >= s.since + options.grace.as_secs()).map(|(&g, _)| g).collect();
    let leftovers: Vec<u64> = store.backend().generations()?.into_iter().filter(|&g| g < doc.active && doc.phase(g) == Phase::Gone).collect();
    if !due.is_empty() || !leftovers.is_empty() {
        let listing = store.catalog.list()?;
        let mut deleted = Vec::new();
        for g in due.iter().chain(&leftovers) {
            // A name back in an expired generation would be a bug: keep it.
            if listing.images.iter().any(|(_, r)| r.generation == *g) || !listing.bad.is_empty() {
                doc.generations.insert(*g, Generation { state: State::Retired, since: now });
                report.reinstated.push(*g);
                continue;
            }
            let d = store.backend().delete_generation(*g)?;
            report.deleted_chunks += d.chunks;
            report.deleted_bytes += d.bytes;
            deleted.push(*g);
        }
        for g in &deleted {
            doc.generations.remove(g);
        }
        report.step = if deleted.is_empty() { "reinstated" } else { "deleted" }.into();
        report.deleted = deleted;
        doc.save(control, version.as_ref())?;
        return finish(store, &doc, report, Some(listing.images.len()));
    }

    // Move names out of retired generations no import can still commit into.
    let retired = doc.with_state(State::Retired);
    if !retired.is_empty() {
        let mut ready = Vec::new();
        let mut waits = Vec::new();
        for &g in &retired {
            let since = doc.generations[&g].since;
            let leases = live_leases(control, g)?;
            if now < since + options.lease.as_secs() {
                waits.push(format!("generation {g} retired {} s ago; names move after --lease ({} s)", now - since, options.lease.as_secs()));
            } else if leases > 0 {
                waits.push(format!("generation {g}: {leases} import(s) still hold a lease on it"));
            } else {
                ready.push(g);
            }
        }
        if ready.is_empty() {
            report.step = "waiting".into();
            report.waiting = Some(waits.join("; "));
            return finish(store, &doc, report, None);
        }
        migrate(store, keys, &ready, doc.active, &mut report)?;
        // Expire what no name uses now.
        let listing = store.catalog.list()?;
        let mut still = Vec::new();
        for &g in &ready {
            let users: Vec<&str> = listing.images.iter().filter(|(_, r)| r.generation == g).map(|(n, _)| n.as_str()).collect();
            if users.is_empty() && listing.bad.is_empty() {
                doc.generations.insert(g, Generation { state: State::Expired, since: now });
            } else if !listing.bad.is_empty() {
                still.push(format!(
                    "generation {g} stays retired: the names {} cannot be read",
                    listing.bad.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
                ));
            } else {
                still.push(format!("generation {g} stays retired: {} still use it", users.join(", ")));
            }
        }
        doc.save(control, version.as_ref())?;
        report.step = "migrated".into();
        waits.extend(still);
        if !waits.is_empty() {
            report.waiting = Some(waits.join("; "));
        }
        return finish(store, &doc, report, Some(listing.images.len()));
    }

    // Nothing on its way out: rotate, if the active generation is old enough.
    let old_enough = doc.active_since.is_none_or(|t| now >= t + options.rotate_after.as_secs());
    if !old_enough {
        report.step = "waiting".into();
        report.waiting = Some(format!(
            "generation {} became active {} s ago; the next rotation is after --rotate-after ({} s)",
            doc.active,
            now - doc.active_since.unwrap_or(now),
            options.rotate_after.as_secs()
        ));
        return finish(store, &doc, report, None);
    }
    let next = store.backend().generations()?.into_iter().chain([doc.active]).max().unwrap_or(0) + 1;
    doc.generations.insert(doc.active, Generation { state: State::Retired, since: now });
    doc.active = next;
    doc.active_since = Some(now);
    doc.save(control, version.as_ref())?;
    report.step = "rotated".into();
    finish(store, &doc, report, None)
}

/// Fills in where the store stands; `names`: how many names the step's
/// last listing found, if it made one.
fn finish(store: &Store, doc: &Lifecycle, mut report: GcReport, names: Option<usize>) -> Result<GcReport> {
    report.active = doc.active;
    report.retired = doc.with_state(State::Retired);
    report.expired = doc.with_state(State::Expired);
    report.live_images = match names {
        Some(n) => n as u64,
        None => store.catalog.list()?.images.len() as u64,
    };
    Ok(report)
}

/// Moves every name of the generations `from` into `to`: chunks, then the
/// manifest with its refs and profile, then the name, by compare-and-swap
/// (a name changed meanwhile is left as it is now).
fn migrate(store: &Store, keys: Option<&dyn KeyProvider>, from: &[u64], to: u64, report: &mut GcReport) -> Result<()> {
    let listing = store.catalog.list()?;
    let mut copied: HashSet<ChunkId> = HashSet::new();
    let mut manifests: HashSet<(u64, String)> = HashSet::new();
    for (name, r) in listing.images.iter().filter(|(_, r)| from.contains(&r.generation)) {
        let g = r.generation;
        if manifests.insert((g, r.manifest.clone())) {
            let refs = refs_of(store, keys, name, r)?;
            let fresh: Vec<ChunkId> = refs.iter().copied().filter(|id| copied.insert(*id)).collect();
            store.backend().copy_chunks(&fresh, g, to).map_err(|e| Error::Lifecycle(format!("moving image {name} into generation {to}: {e}")))?;
            report.copied_chunks += fresh.len() as u64;
            store.catalog.copy_manifest(&r.manifest, &refs, g, to)?;
        }
        let moved = ImageRef { generation: to, ..r.clone() };
        if store.catalog.replace(name, r, &moved)? {
            report.migrated_images += 1;
        } else {
            tracing::info!("image {name} changed while it was being moved; left as it is now");
        }
    }
    Ok(())
}

/// The chunk ids of image `r`: its refs, or (for manifests stored before
/// refs were) read from the manifest itself with `keys`.
fn refs_of(store: &Store, keys: Option<&dyn KeyProvider>, name: &str, r: &ImageRef) -> Result<Vec<ChunkId>> {
    if let Some(refs) = store.catalog.get_refs(r.generation, &r.manifest)? {
        return Ok(refs);
    }
    let Some(keys) = keys else {
        return Err(Error::Lifecycle(format!(
            "image {name} was imported before manifests listed their chunks, and no keyring was given to read it (run `tessera gc` with the keyring once)"
        )));
    };
    let m: Manifest = store.catalog.get_manifest(r.generation, &r.manifest)?.open(keys)?;
    let mut seen = HashSet::new();
    Ok(m.chunks.iter().flatten().map(|c| c.id).filter(|id| seen.insert(*id)).collect())
}

/// What readers know of the lifecycle: counts and reports reads of expired
/// generations. Cheap when reads stay in the active generation (the
/// document is read again at most every few seconds, and only by reads).
pub struct Watch {
    control: Arc<dyn Control>,
    state: Mutex<WatchState>,
    expired_reads: AtomicU64,
}

#[derive(Default)]
struct WatchState {
    doc: Option<Lifecycle>,
    read_at: Option<Instant>,
    alarmed: HashSet<(u64, String)>,
}

/// How long a reader trusts the lifecycle it read (it reads it again only
/// when it reads chunks from the origin).
const TRUST: Duration = Duration::from_secs(2);

impl Watch {
    /// A watch over `store`'s lifecycle.
    pub fn new(store: &Store) -> Watch {
        Watch { control: Arc::clone(&store.control), state: Mutex::default(), expired_reads: AtomicU64::new(0) }
    }

    /// Notes a read of `generation` for `image`; a read of an expired
    /// generation is counted, logged (once per image) and alarmed.
    pub fn note_read(&self, generation: u64, image: &str) {
        let mut st = self.state.lock().expect("no panics while holding the lock");
        if st.read_at.is_none_or(|t| t.elapsed() >= TRUST) {
            st.read_at = Some(Instant::now());
            match Lifecycle::load(self.control.as_ref()) {
                Ok((doc, _)) => st.doc = Some(doc),
                Err(e) => tracing::debug!("cannot read the store lifecycle: {e}"),
            }
        }
        let Some(doc) = &st.doc else { return };
        if doc.phase(generation) != Phase::Leaving(State::Expired) {
            return;
        }
        self.expired_reads.fetch_add(1, Ordering::Relaxed);
        if !st.alarmed.insert((generation, image.to_owned())) {
            return;
        }
        drop(st);
        tracing::error!("image {image} read generation {generation} of the store, which the collector expired: a bug; the generation is kept and goes back to retired at the next `tessera gc`");
        let alarm = serde_json::json!({ "generation": generation, "image": image, "at": unix_now(), "host": hostname() });
        let key = format!("alarms/{generation}-{}-{}-{}.json", hostname(), std::process::id(), nonce());
        if let Err(e) = self.control.write(&key, alarm.to_string().as_bytes(), None) {
            tracing::error!("cannot raise the alarm for generation {generation} in the store: {e}");
        }
    }

    /// Reads of expired generations so far.
    pub fn expired_reads(&self) -> u64 {
        self.expired_reads.load(Ordering::Relaxed)
    }

    /// Appends `tessera_gc_expired_reads_total`.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP tessera_gc_expired_reads_total Reads of store generations the collector had expired (a bug: each raises an alarm).");
        let _ = writeln!(out, "# TYPE tessera_gc_expired_reads_total counter");
        let _ = writeln!(out, "tessera_gc_expired_reads_total {}", self.expired_reads());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_of_dead_processes_and_past_expiry_do_not_hold() {
        let host = hostname();
        let now = unix_now();
        let me = LeaseRecord { host: host.clone(), pid: std::process::id(), started: now, expires: now + 10 };
        assert!(lease_is_live(&me, now, &host));
        assert!(!lease_is_live(&LeaseRecord { expires: now, ..me }, now, &host), "past its expiry");
        let gone = LeaseRecord { host: host.clone(), pid: u32::MAX - 1, started: now, expires: now + 10 };
        assert!(!lease_is_live(&gone, now, &host), "its process is gone");
        let other = LeaseRecord { host: "elsewhere".into(), pid: u32::MAX - 1, started: now, expires: now };
        assert!(lease_is_live(&other, now, &host), "another host's clock may be behind");
        assert!(!lease_is_live(&other, now + CLOCK_SKEW, &host));
    }

    #[test]
    fn phases() {
        let mut doc = Lifecycle { format: 1, active: 3, ..Default::default() };
        doc.generations.insert(2, Generation { state: State::Expired, since: 0 });
        doc.generations.insert(1, Generation { state: State::Retired, since: 0 });
        assert_eq!(doc.phase(3), Phase::Active);
        assert_eq!(doc.phase(2), Phase::Leaving(State::Expired));
        assert_eq!(doc.phase(1), Phase::Leaving(State::Retired));
        assert_eq!(doc.phase(0), Phase::Gone);
        let text = serde_json::to_string(&doc).unwrap();
        assert_eq!(serde_json::from_str::<Lifecycle>(&text).unwrap(), doc);
    }
}
