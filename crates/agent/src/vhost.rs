//! vhost-user-blk: an attached export as a virtio-blk device that a VMM
//! (QEMU, Firecracker, Cloud Hypervisor) drives through a unix socket,
//! with the guest's memory shared, so no byte passes through a kernel
//! block layer or a socket on its way to the guest.
//!
//! Each attached export has a socket `DIR/EXPORT.sock` and a thread that
//! accepts one front end at a time and serves it until it goes away, then
//! waits for the next (a VMM reconnecting after the agent restarted, say).
//! The rust-vmm crates speak the vhost-user protocol and walk the rings;
//! requests are parsed and checked by [`crate::virtio_blk`].
//!
//! **Completion order.** Each queue's requests are completed in the order
//! they were made available, one after another. So after the agent dies,
//! the used index says exactly which requests are done: QEMU (which cannot
//! ask a dead back end where it was) restarts a queue at its used index,
//! and the new agent replays the requests after it. Reads replay
//! harmlessly; a write that was done but not acknowledged is done again
//! with the same bytes. This is why `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`
//! is not needed here: with in-order completion the used ring is the
//! in-flight record. Several queues give a guest parallel requests.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, Reader, Writer};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::device::{Device, ExportError, Exports};
use crate::virtio_blk::{self, status, Disk, Request};

/// Queues a device offers (the guest may use fewer).
pub const NUM_QUEUES: usize = 4;
/// Descriptors per queue, at most (virtio-mmio guests take QEMU's
/// maximum, 1024).
const QUEUE_SIZE: usize = 1024;
/// The longest path a unix socket address holds (`sun_path`, less its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Segments per request.
const SEG_MAX: u32 = 126;

// Feature bits (virtio 1.2).
const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_TOPOLOGY: u64 = 1 << 10;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;

type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

/// Counters of every vhost-user device of an agent.
#[derive(Default, Debug)]
pub struct Stats {
    /// Front ends that connected.
    pub connections: AtomicU64,
    /// Requests served.
    pub requests: AtomicU64,
    /// Requests answered with an error status (or none, when there was no
    /// room for one).
    pub errors: AtomicU64,
}

/// One device: an export served to one front end at a time.
struct BlkBackend {
    name: String,
    device: Arc<dyn Device>,
    memory: RwLock<Option<Memory>>,
    event_idx: AtomicBool,
    /// Set when the device is being handed over: no new request is taken.
    draining: AtomicBool,
    /// Held while a queue is being processed, so stopping a queue waits for
    /// its requests to complete.
    busy: Vec<Mutex<()>>,
    stats: Arc<Stats>,
}

impl BlkBackend {
    fn new(name: &str, device: Arc<dyn Device>, stats: Arc<Stats>) -> BlkBackend {
        BlkBackend {
            name: name.to_owned(),
            device,
            memory: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            busy: (0..NUM_QUEUES).map(|_| Mutex::new(())).collect(),
            stats,
        }
    }

    /// Takes no new request, and waits for those being served to complete:
    /// then the used ring says exactly what is done.
    fn quiesce(&self) {
        self.draining.store(true, Ordering::SeqCst);
        for b in &self.busy {
            drop(b.lock().expect("no panics while holding the lock"));
        }
    }

    /// Serves every request queue `index` has, in order.
    fn process(&self, index: usize, vring: &VringRwLock) -> io::Result<()> {
        let _busy = self.busy[index].lock().expect("no panics while holding the lock");
        if self.draining.load(Ordering::SeqCst) {
            return Ok(());
        }
        let Some(memory) = self.memory.read().expect("no panics while holding the lock").clone() else { return Ok(()) };
        let mem = memory.memory();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            let chains: Vec<_> = vring.get_mut().get_queue_mut().iter(mem.clone()).map_err(io::Error::other)?.collect();
            for chain in chains {
                // Handing over: what is not completed is left for the
                // successor, which starts at the used index.
                if self.draining.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let head = chain.head_index();
                let written = self.serve(&mem, chain);
                vring.add_used(head, written).map_err(io::Error::other)?;
                if !event_idx || vring.needs_notification().map_err(io::Error::other)? {
                    vring.signal_used_queue()?;
                }
            }
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
    }

    /// Serves one request; returns the bytes written into guest memory.
    fn serve<T>(&self, mem: &GuestMemoryMmap, chain: virtio_queue::DescriptorChain<T>) -> u32
    where
        T: std::ops::Deref + Clone,
        T::Target: vm_memory::GuestMemory + Sized,
    {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let (mut reader, mut writer) = match (Reader::new(mem, chain.clone()), Writer::new(mem, chain)) {
            (Ok(r), Ok(w)) => (r, w),
            // Descriptors outside guest memory, loops, too long a chain:
            // nothing can be answered in them.
            _ => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                return 0;
            }
        };
        let mut header = [0u8; virtio_blk::HEADER_LEN];
        let got = read_up_to(&mut reader, &mut header);
        let writable = writer.available_bytes() as u64;
        let disk = Disk { size: self.device.size(), writable: self.device.writable() };
        let parsed = virtio_blk::parse(&header[..got], reader.available_bytes() as u64, writable, disk);
        let Ok(mut status_writer) = writer.split_at(writable.saturating_sub(1) as usize) else {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            return 0;
        };
        let (status, data) = match parsed {
            Err(None) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                return 0;
            }
            Err(Some(s)) => (s, 0),
            Ok(request) => self.execute(request, &mut reader, &mut writer),
        };
        if status != status::OK {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        match status_writer.write_all(&[status]) {
            Ok(()) => data + 1,
            Err(_) => data,
        }
    }

    /// Does a checked request; returns its status and the data bytes
    /// written into guest memory.
    fn execute<B: vm_memory::bitmap::BitmapSlice>(&self, request: Request, reader: &mut Reader<'_, B>, writer: &mut Writer<'_, B>) -> (u8, u32) {
        let io = |r: io::Result<()>, what: &str, at: u64| match r {
            Ok(()) => status::OK,
            Err(e) => {
                tracing::warn!("{}: {what} at {at}: {e}", self.name);
                status::IOERR
            }
        };
        match request {
            Request::Read { offset, len } => {
                let mut buf = vec![0u8; len as usize];
                let s = io(self.device.read(offset, &mut buf), "read", offset);
                if s != status::OK {
                    return (s, 0);
                }
                match writer.write_all(&buf) {
                    Ok(()) => (status::OK, len as u32),
                    Err(_) => (status::IOERR, 0),
                }
            }
            Request::Write { offset, len } => {
                let mut buf = vec![0u8; len as usize];
                if reader.read_exact(&mut buf).is_err() {
                    return (status::IOERR, 0);
                }
                (io(self.device.write(offset, &buf), "write", offset), 0)
            }
            Request::Flush => (io(self.device.flush(), "flush", 0), 0),
            Request::GetId => {
                let id = virtio_blk::id_of(&self.name);
                let n = id.len().min(writer.available_bytes());
                match writer.write_all(&id[..n]) {
                    Ok(()) => (status::OK, n as u32),
                    Err(_) => (status::IOERR, 0),
                }
            }
        }
    }
}

/// Reads as much of `buf` as the readable part holds.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    got
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_BLK_F_SIZE_MAX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_TOPOLOGY
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if !self.device.writable() {
            f |= VIRTIO_BLK_F_RO;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = virtio_blk::config(self.device.size(), SEG_MAX, NUM_QUEUES as u16);
        let start = (offset as usize).min(config.len());
        let end = (offset as usize).saturating_add(size as usize).min(config.len());
        let mut out = config[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *self.memory.write().expect("no panics while holding the lock") = Some(mem);
        Ok(())
    }

    /// One thread per queue: a slow read on one queue never holds up another.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..NUM_QUEUES).map(|q| 1u64 << q).collect()
    }

    /// Each queue thread's way to be told to stop (when its front end goes).
    fn exit_event(&self, _thread: usize) -> Option<(vmm_sys_util::event::EventConsumer, vmm_sys_util::event::EventNotifier)> {
        vmm_sys_util::event::new_event_consumer_and_notifier(vmm_sys_util::event::EventFlag::NONBLOCK).ok()
    }

    fn stop_vring(&self, index: u32) -> io::Result<()> {
        if let Some(b) = self.busy.get(index as usize) {
            drop(b.lock().expect("no panics while holding the lock"));
        }
        Ok(())
    }

    fn handle_event(&self, device_event: u16, evset: EventSet, vrings: &[VringRwLock], _thread: usize) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event {evset:?}")));
        }
        let index = device_event as usize;
        let Some(vring) = vrings.get(index) else { return Err(io::Error::other(format!("no queue {index}"))) };
        self.process(index, vring)
    }
}

/// One attached export: its socket and the thread serving it.
struct Attached {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    listener: RawFd,
    connection: Arc<Mutex<Option<Connection>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The front end being served, and its device.
struct Connection {
    handle: ShutdownHandle,
    backend: Arc<BlkBackend>,
}

/// The vhost-user-blk devices of an agent: one socket per attached export
/// in a directory of its own.
pub struct VhostUser {
    dir: PathBuf,
    exports: Arc<dyn Exports>,
    attached: Mutex<HashMap<String, Attached>>,
    /// Counters.
    pub stats: Arc<Stats>,
}

impl VhostUser {
    /// Devices with sockets in `dir` (made if missing), for `exports`.
    pub fn new(dir: &Path, exports: Arc<dyn Exports>) -> io::Result<VhostUser> {
        std::fs::create_dir_all(dir)?;
        Ok(VhostUser { dir: dir.to_owned(), exports, attached: Mutex::new(HashMap::new()), stats: Arc::default() })
    }

    /// The directory of the sockets.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where export `name`'s socket is.
    /// `DIR/EXPORT.sock`, or `DIR/HASH.sock` (16 hex digits of the
    /// export's SHA-256) where that would not fit in a unix socket address.
    pub fn socket_of(&self, export: &str) -> PathBuf {
        let named = self.dir.join(format!("{export}.sock"));
        if named.as_os_str().len() <= MAX_SOCKET_PATH {
            return named;
        }
        self.dir.join(format!("{}.sock", &tessera_chunk::ChunkId::of(export.as_bytes()).to_hex()[..16]))
    }

    /// Attaches `export` (`NAME`, read-only, or `NAME@LABEL`): opens it and
    /// listens on its socket, once; returns the socket.
    pub fn attach(&self, export: &str) -> Result<PathBuf, ExportError> {
        self.attach_with(export, None)
    }

    /// [`VhostUser::attach`] on a listener handed over by an agent that
    /// served it before, or on a new one.
    pub fn attach_with(&self, export: &str, handed_over: Option<std::os::unix::net::UnixListener>) -> Result<PathBuf, ExportError> {
        let mut attached = self.attached.lock().expect("no panics while holding the lock");
        if let Some(a) = attached.get(export) {
            return Ok(a.path.clone());
        }
        let device = self.exports.open(export)?;
        let path = self.socket_of(export);
        let listener = match handed_over {
            Some(l) => l,
            None => {
                if path.as_os_str().len() > MAX_SOCKET_PATH {
                    return Err(ExportError::Overlay(io::Error::other(format!(
                        "{} is longer than a unix socket address holds ({MAX_SOCKET_PATH} bytes): give the agent a shorter --vhost-user DIR (or TESSERA_HOME)",
                        path.display()
                    ))));
                }
                let _ = std::fs::remove_file(&path);
                std::os::unix::net::UnixListener::bind(&path)
                    .map_err(|e| ExportError::Overlay(io::Error::other(format!("listening on {}: {e}", path.display()))))?
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let connection = Arc::new(Mutex::new(None));
        let fd = listener.as_raw_fd();
        let (name, stats, stop2, conn2) = (export.to_owned(), Arc::clone(&self.stats), Arc::clone(&stop), Arc::clone(&connection));
        let thread = std::thread::Builder::new()
            .name(format!("vhost-{export}"))
            .spawn(move || serve_socket(&name, device, listener, &stats, &stop2, &conn2))
            .map_err(|e| ExportError::Overlay(io::Error::other(e)))?;
        tracing::debug!("vhost-user-blk {export} on {}", path.display());
        attached.insert(export.to_owned(), Attached { path: path.clone(), stop, listener: fd, connection, thread: Some(thread) });
        Ok(path)
    }

    /// The attached exports.
    pub fn list(&self) -> Vec<String> {
        self.attached.lock().expect("no panics while holding the lock").keys().cloned().collect()
    }

    /// The listening descriptor of each attached export, to hand over to an
    /// agent taking over; valid until [`VhostUser::stop_all`].
    pub fn listeners(&self) -> Vec<(String, std::os::fd::OwnedFd)> {
        let attached = self.attached.lock().expect("no panics while holding the lock");
        attached
            .iter()
            .filter_map(|(k, a)| {
                // SAFETY: an attached device's thread keeps its listener open
                // until the device is detached, which takes this lock first.
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(a.listener) };
                fd.try_clone_to_owned().ok().map(|fd| (k.clone(), fd))
            })
            .collect()
    }

    /// Stops serving `export`: no front end is accepted, the one connected
    /// is disconnected, the socket removed, the device flushed and closed.
    pub fn detach(&self, export: &str) -> bool {
        let a = self.attached.lock().expect("no panics while holding the lock").remove(export);
        a.map(|a| stop(a, Stop::Detach)).is_some()
    }

    /// Hands every device over: no new request is taken, those being served
    /// complete, then front ends are disconnected (they reconnect to the
    /// successor, which holds the listeners); sockets stay.
    pub fn hand_over(&self) {
        let all: Vec<Attached> = self.attached.lock().expect("no panics while holding the lock").drain().map(|(_, a)| a).collect();
        for a in all {
            stop(a, Stop::HandOver);
        }
    }

    /// Detaches everything (the agent is stopping).
    pub fn stop_all(&self) {
        let all: Vec<Attached> = self.attached.lock().expect("no panics while holding the lock").drain().map(|(_, a)| a).collect();
        for a in all {
            stop(a, Stop::Detach);
        }
    }
}

#[derive(PartialEq, Eq)]
enum Stop {
    Detach,
    HandOver,
}

fn stop(mut a: Attached, how: Stop) {
    a.stop.store(true, Ordering::SeqCst);
    if let Some(c) = a.connection.lock().expect("no panics while holding the lock").take() {
        if how == Stop::HandOver {
            c.backend.quiesce();
        }
        c.handle.shutdown();
    }
    if let Some(t) = a.thread.take() {
        let _ = t.join();
    }
    if how == Stop::Detach {
        let _ = std::fs::remove_file(&a.path);
    }
}

/// Waits up to 100 ms for a front end to connect.
fn pending(listener: RawFd) -> bool {
    let mut p = libc::pollfd { fd: listener, events: libc::POLLIN, revents: 0 };
    // SAFETY: poll reads and writes one pollfd we own.
    unsafe { libc::poll(&mut p, 1, 100) > 0 && p.revents & libc::POLLIN != 0 }
}

/// Accepts front ends on `listener` one after another until stopped.
fn serve_socket(
    name: &str,
    device: Arc<dyn Device>,
    listener: std::os::unix::net::UnixListener,
    stats: &Arc<Stats>,
    stop: &AtomicBool,
    current: &Mutex<Option<Connection>>,
) {
    let fd = listener.as_raw_fd();
    let mut listener = Listener::from(listener);
    while !stop.load(Ordering::SeqCst) {
        if !pending(fd) {
            continue;
        }
        let backend = Arc::new(BlkBackend::new(name, Arc::clone(&device), Arc::clone(stats)));
        let mut daemon = match VhostUserDaemon::new(name.to_owned(), Arc::clone(&backend), GuestMemoryAtomic::new(GuestMemoryMmap::new())) {
            Ok(d) => d,
            Err(e) => {
                // Out of descriptors, say: keep the socket, try again.
                tracing::error!("vhost-user-blk {name}: {e}");
                std::thread::sleep(std::time::Duration::from_secs(1));
                continue;
            }
        };
        if let Err(e) = daemon.start(&mut listener) {
            tracing::error!("vhost-user-blk {name}: accepting a front end: {e}");
            std::thread::sleep(std::time::Duration::from_millis(100));
            continue;
        }
        stats.connections.fetch_add(1, Ordering::Relaxed);
        if let Some(handle) = daemon.shutdown_handle() {
            let mut connection = current.lock().expect("no panics while holding the lock");
            if stop.load(Ordering::SeqCst) {
                // Stopped while this front end was being accepted: `stop`
                // found no connection to end, so end it here.
                backend.quiesce();
                handle.shutdown();
            } else {
                *connection = Some(Connection { handle, backend });
            }
        }
        tracing::debug!("vhost-user-blk {name}: a front end connected");
        match daemon.wait() {
            Ok(()) | Err(vhost_user_backend::Error::HandleRequest(vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage)) => {
                tracing::debug!("vhost-user-blk {name}: the front end went away")
            }
            Err(e) => tracing::warn!("vhost-user-blk {name}: the front end's connection ended: {e}"),
        }
        current.lock().expect("no panics while holding the lock").take();
        drop(daemon);
        if let Err(e) = device.flush() {
            tracing::error!("vhost-user-blk {name}: flushing after the front end left: {e}");
        }
    }
}
