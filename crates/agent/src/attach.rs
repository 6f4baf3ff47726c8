//! Disks attached to VMs: what `tessera run` asks of an agent, shared or
//! its own, and what an agent hands to the one that takes over from it.
//!
//! An attachment serves one export to one VM (vhost-user-blk, or NBD on
//! the agent's unix socket), counts the chunks that VM read by tier, and
//! prefetches or records the image's start-up profile. The vhost-user
//! attachments of an agent with a control socket are listed in
//! `VHOST_DIR/attached.json`, so an agent started after one that died
//! (`kill -9`) listens on the same sockets again and the VMs reconnect.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::{Attached, Detached, DiskKind, Handover, ProfileMode, Status};
use crate::profile::{Prefetcher, PREFETCH_THREADS};
use crate::vdisk::VirtualDisk;
use crate::{Agent, Error, Frontend, Listen};

/// One export served to a VM.
pub(crate) struct Attachment {
    disk: DiskKind,
    /// The process the VM's life hangs on, if known.
    owner: Option<u32>,
    started: Instant,
    prefetcher: Option<Prefetcher>,
    recording: Option<Arc<VirtualDisk>>,
}

impl Attachment {
    /// A disk served from now on to a VM whose life hangs on `owner`.
    fn new(disk: DiskKind, owner: Option<u32>) -> Attachment {
        Attachment { disk, owner, started: Instant::now(), prefetcher: None, recording: None }
    }
}

/// An entry of `attached.json`: an export and the process its VM's life
/// hangs on (lists written before owners were kept name exports only).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum Listed {
    Owned { export: String, owner: Option<u32> },
    Export(String),
}

/// Whether process `pid` runs (in this agent's PID namespace).
pub(crate) fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Listeners handed over by the agent this one takes over from.
#[derive(Default)]
pub struct Inherited {
    /// The control socket's listener.
    pub control: Option<std::os::unix::net::UnixListener>,
    /// NBD listeners by listen address (`unix:PATH`, `HOST:PORT`).
    pub nbd: HashMap<String, OwnedFd>,
    /// The vhost-user listeners of attached exports.
    pub vhost: Vec<(String, std::os::unix::net::UnixListener)>,
}

impl std::fmt::Debug for Inherited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Inherited({} NBD, {} vhost-user)", self.nbd.len(), self.vhost.len())
    }
}

/// Checks an export named by a client: `NAME` or `NAME@LABEL`, each a
/// valid name (no path can be made of it); returns `NAME`.
fn check_export(export: &str) -> Result<&str, Error> {
    let (name, label) = match export.split_once('@') {
        Some((n, l)) => (n, Some(l)),
        None => (export, None),
    };
    let valid = tessera_store::check_name(name).is_ok() && label.is_none_or(|l| tessera_store::check_name(l).is_ok());
    if valid {
        Ok(name)
    } else {
        Err(Error::Attach(format!("{export:?} is not an export: NAME or NAME@LABEL, each 1-128 of A-Z a-z 0-9 . _ - starting with a letter or digit")))
    }
}

/// Takes over from the agent whose control socket is `control`: it hands
/// its listeners over, quiesces its VMs' disks and stops.
pub fn take_over(control: &Path) -> Result<Inherited, Error> {
    let fail = |e: std::io::Error| Error::Listen { addr: format!("taking over from the agent at {}", control.display()), source: e };
    let client = crate::control::Client::connect(control).map_err(fail)?;
    let (what, fds) = client.handover().map_err(fail)?;
    let mut fds = fds.into_iter();
    let mut inherited = Inherited::default();
    for l in what.listeners {
        let fd = fds.next().expect("counted by the client");
        if l == "control" {
            inherited.control = Some(std::os::unix::net::UnixListener::from(fd));
        } else {
            inherited.nbd.insert(l, fd);
        }
    }
    for export in what.attached {
        inherited.vhost.push((export, std::os::unix::net::UnixListener::from(fds.next().expect("counted by the client"))));
    }
    Ok(inherited)
}

impl Agent {
    /// Serves `export` (`NAME` or `NAME@LABEL`) to a VM: over vhost-user-blk
    /// (a socket of its own) or NBD (the agent's unix socket); with
    /// `profile`, prefetches the image's start-up profile or records one.
    pub fn attach(&self, export: &str, disk: DiskKind, profile: ProfileMode) -> Result<Attached, Error> {
        self.attach_for(export, disk, profile, None)
    }

    /// [`Agent::attach`] for a VM whose life hangs on process `owner` (the
    /// `tessera run` that asked): an agent restarted after this one died
    /// does not serve the disk again once that process is gone.
    pub fn attach_for(&self, export: &str, disk: DiskKind, profile: ProfileMode, owner: Option<u32>) -> Result<Attached, Error> {
        let name = check_export(export)?;
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) || self.handing_over.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::Attach(format!("{export}: this agent is handing over to a successor; attach there")));
        }
        // Reserved first, so two attaches of one export cannot both go on.
        {
            let mut attachments = self.attachments.lock().expect("no panics while holding the lock");
            if attachments.contains_key(export) {
                return Err(Error::Attach(format!("{export} is already attached to a VM (one VM per export; a NAME@LABEL overlay gives each VM its own)")));
            }
            attachments.insert(export.to_owned(), Attachment::new(disk, owner));
        }
        let attached = self.attach_reserved(export, name, disk, profile, owner);
        if attached.is_err() {
            self.attachments.lock().expect("no panics while holding the lock").remove(export);
        }
        attached
    }

    /// [`Agent::attach`] once `export` is reserved.
    fn attach_reserved(&self, export: &str, name: &str, disk: DiskKind, profile: ProfileMode, owner: Option<u32>) -> Result<Attached, Error> {
        let counts;
        let socket = match disk {
            DiskKind::VhostUser => {
                let vhost = self.vhost.as_ref().ok_or_else(|| Error::Attach(format!("{export}: this agent serves no vhost-user devices")))?;
                counts = self.exports.track(export);
                match vhost.attach(export) {
                    Ok(p) => p,
                    Err(e) => {
                        self.exports.untrack(export);
                        return Err(Error::Attach(format!("{export}: {e}")));
                    }
                }
            }
            DiskKind::Nbd => {
                let socket = self.options.frontends.iter().find_map(|f| match f {
                    Frontend::Nbd(Listen::Unix(p)) => Some(p.clone()),
                    _ => None,
                });
                let socket = socket.ok_or_else(|| Error::Attach(format!("{export}: this agent has no NBD unix socket")))?;
                // Opened by the VMM over NBD; check it opens now, to say why not.
                counts = self.exports.track(export);
                if let Err(e) = crate::device::Exports::open(self.exports.as_ref(), export) {
                    self.exports.untrack(export);
                    return Err(Error::Attach(format!("{export}: {e}")));
                }
                socket
            }
        };
        let mut attachment = Attachment::new(disk, owner);
        let (mut prefetching, mut profile_chunks) = (false, 0);
        if profile == ProfileMode::Auto {
            match self.exports.disk(name) {
                Ok(vdisk) => match self
                    .exports
                    .home()
                    .catalog
                    .get(name)
                    .map_err(|e| e.to_string())
                    .and_then(|r| crate::profile::load(self.exports.home(), &r).map_err(|e| e.to_string()))
                {
                    Ok(Some(p)) => {
                        prefetching = true;
                        profile_chunks = p.chunks.len();
                        attachment.prefetcher = Some(Prefetcher::start(vdisk, p.chunks, PREFETCH_THREADS, Some(counts)));
                    }
                    // One VM of the image records (the first).
                    Ok(None) => {
                        if vdisk.start_recording() {
                            attachment.recording = Some(vdisk);
                        }
                    }
                    Err(e) => tracing::warn!("{name}: cannot read its start-up profile: {e}"),
                },
                Err(e) => tracing::warn!("{name}: {e}"),
            }
        }
        let unreserved = match self.attachments.lock().expect("no panics while holding the lock").get_mut(export) {
            Some(reserved) => {
                *reserved = attachment;
                None
            }
            None => Some(attachment),
        };
        if let Some(attachment) = unreserved {
            // Detached while it was being attached.
            if let Some(p) = attachment.prefetcher {
                p.stop();
            }
            if let Some(v) = &self.vhost {
                v.detach(export);
            }
            self.exports.untrack(export);
            return Err(Error::Attach(format!("{export} was detached while it was being attached")));
        }
        self.save_attached();
        Ok(Attached { socket, export: export.to_owned(), disk, prefetching, profile_chunks })
    }

    /// Stops serving `export` to its VM; records the profile read up to
    /// `record_until` after the attach (if one was being recorded); with
    /// `discard`, removes its overlay.
    pub fn detach(&self, export: &str, record_until: Option<Duration>, discard: bool) -> Result<Detached, Error> {
        check_export(export)?;
        let attachment = self.attachments.lock().expect("no panics while holding the lock").remove(export);
        if let Some(vhost) = &self.vhost {
            vhost.detach(export);
        }
        self.save_attached();
        let counts = self.exports.untrack(export);
        let mut out = Detached { chunks_fetched: counts.map(|c| c.by_tier()).unwrap_or_default(), profile_recorded: 0 };
        if let Some(a) = attachment {
            if let Some(p) = a.prefetcher {
                p.stop();
            }
            if let Some(vdisk) = a.recording {
                let until = a.started + record_until.unwrap_or(Duration::from_secs(60)).min(Duration::from_secs(60));
                let recorded = vdisk.stop_recording(until);
                out.profile_recorded = recorded.chunks.len();
                let name = export.split('@').next().unwrap_or(export);
                let saved = self.exports.home().catalog.get(name).map_err(|e| e.to_string()).and_then(|r| {
                    crate::profile::save(self.exports.home(), name, &r, recorded, until.duration_since(a.started).as_secs_f64()).map_err(|e| e.to_string())
                });
                if let Err(e) = saved {
                    tracing::warn!("{name}: the start-up profile was not saved: {e}");
                    out.profile_recorded = 0;
                }
            }
        } else if !discard {
            return Err(Error::Attach(format!("{export} is not attached")));
        }
        if discard && export.contains('@') {
            // The overlay closes with its last device; a VMM still connected
            // over NBD keeps it open a moment longer.
            let dir = self.exports.overlay_dir(export);
            for _ in 0..50 {
                if !self.exports.is_overlay_open(export) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if self.exports.is_overlay_open(export) {
                tracing::warn!("{export}: its overlay is still open (a client still connected); it is kept, not removed");
            } else {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        Ok(out)
    }

    /// What the agent serves.
    pub fn status(&self) -> Status {
        Status {
            pid: std::process::id(),
            attached: self.attachments.lock().expect("no panics while holding the lock").keys().cloned().collect(),
            nbd: self
                .options
                .frontends
                .iter()
                .map(|f| match f {
                    Frontend::Nbd(l) => l.to_string(),
                })
                .collect(),
            vhost_user: self.vhost.as_ref().map(|v| v.dir().to_owned()),
        }
    }

    /// Where the vhost-user attachments are listed, if they are kept.
    fn attached_file(&self) -> Option<PathBuf> {
        self.options.control.as_ref()?;
        self.vhost.as_ref().map(|v| v.dir().join("attached.json"))
    }

    /// Lists the vhost-user attachments (for an agent that restarts after
    /// this one dies).
    fn save_attached(&self) {
        let Some(file) = self.attached_file() else { return };
        // Written under the lock: the file is always the latest list.
        let attachments = self.attachments.lock().expect("no panics while holding the lock");
        let list: Vec<Listed> =
            attachments.iter().filter(|(_, a)| a.disk == DiskKind::VhostUser).map(|(k, a)| Listed::Owned { export: k.clone(), owner: a.owner }).collect();
        let tmp = file.with_extension(format!("tmp-{}", std::process::id()));
        let written = std::fs::write(&tmp, serde_json::to_vec(&list).expect("names serialise")).and_then(|()| std::fs::rename(&tmp, &file));
        if let Err(e) = written {
            tracing::warn!("cannot keep the list of attached disks in {}: {e}", file.display());
        }
    }

    /// Serves again the vhost-user attachments of the agent before this one
    /// (handed over, or listed by one that died), so their VMs reconnect.
    pub(crate) fn restore_attached(&self, handed: Vec<(String, std::os::unix::net::UnixListener)>) {
        let Some(vhost) = &self.vhost else { return };
        let mut restore: Vec<(String, Option<std::os::unix::net::UnixListener>, Option<u32>)> = handed.into_iter().map(|(e, l)| (e, Some(l), None)).collect();
        // Disks whose run is gone: served again only to be detached.
        let mut orphans = Vec::new();
        if let Some(file) = self.attached_file() {
            if let Ok(bytes) = std::fs::read(&file) {
                let listed = serde_json::from_slice::<Vec<Listed>>(&bytes).unwrap_or_else(|e| {
                    tracing::error!("{}: {e}; the disks it listed are not served again", file.display());
                    Vec::new()
                });
                for l in listed {
                    let (export, owner) = match l {
                        Listed::Export(e) => (e, None),
                        Listed::Owned { export, owner } => (export, owner),
                    };
                    match restore.iter_mut().find(|(x, _, _)| *x == export) {
                        Some(handed) => handed.2 = owner,
                        None => {
                            if owner.is_some_and(|pid| !crate::attach::alive(pid)) {
                                orphans.push((export.clone(), owner));
                            }
                            restore.push((export, None, owner));
                        }
                    }
                }
            }
        }
        for (export, listener, owner) in restore {
            self.exports.track(&export);
            match vhost.attach_with(&export, listener) {
                Ok(p) => {
                    tracing::info!("serving {export} again on {} for the VM attached before", p.display());
                    self.attachments.lock().expect("no panics while holding the lock").insert(export, Attachment::new(DiskKind::VhostUser, owner));
                }
                Err(e) => {
                    self.exports.untrack(&export);
                    tracing::error!("cannot serve {export} again: {e}");
                }
            }
        }
        self.save_attached();
        for (export, owner) in orphans {
            tracing::warn!("{export}: the run that attached it (pid {}) is gone; detaching it and dropping its overlay", owner.unwrap_or(0));
            if let Err(e) = self.detach(&export, None, true) {
                tracing::error!("{export}: {e}");
            }
        }
    }

    /// The listeners to hand over: the NBD ones (by address) and the
    /// vhost-user ones (by export).
    /// Copies of the descriptors, so none is closed before it is sent.
    pub(crate) fn handover_fds(&self) -> (Handover, Vec<OwnedFd>) {
        let mut what = Handover::default();
        let mut fds = Vec::new();
        for (addr, fd) in self.listener_fds.lock().expect("no panics while holding the lock").iter() {
            // SAFETY: the listeners listed are open for the agent's life.
            match unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) }.try_clone_to_owned() {
                Ok(fd) => {
                    what.listeners.push(addr.clone());
                    fds.push(fd);
                }
                Err(e) => tracing::error!("cannot hand {addr} over: {e}"),
            }
        }
        if let Some(v) = &self.vhost {
            for (export, fd) in v.listeners() {
                what.attached.push(export);
                fds.push(fd);
            }
        }
        (what, fds)
    }
}
