//! The vhost-user-blk devices against a front end that is not QEMU: the
//! rust-vmm `Frontend` speaking the protocol, and split rings written by
//! hand in shared memory, so a test can send what no well-behaved VMM
//! would: writes to a read-only disk, sectors past the end, descriptors
//! outside guest memory, a connection dropped mid-request. Each gets an
//! error on its own device; the other devices, and the next front end on
//! the same socket, are served as before.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_agent::device::{Device, ExportError, Exports};
use tessera_agent::vhost::VhostUser;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const DISK: usize = 1 << 20;
const MEM: usize = 1 << 20;
const QSIZE: u16 = 16;
// Where things sit in guest memory.
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HEADERS: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x30000;
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const BLK_F_RO: u64 = 1 << 5;
const IN: u32 = 0;
const OUT: u32 = 1;
const OK: u8 = 0;
const IOERR: u8 = 1;

/// A disk in memory, byte `i` = `i % 251`.
struct Memory {
    bytes: Mutex<Vec<u8>>,
    writable: bool,
}

impl Device for Memory {
    fn size(&self) -> u64 {
        DISK as u64
    }
    fn writable(&self) -> bool {
        self.writable
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.copy_from_slice(&self.bytes.lock().unwrap()[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        self.bytes.lock().unwrap()[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write(offset, &vec![0; len as usize])
    }
    fn allocation(&self, _offset: u64, len: u64) -> Vec<(u64, bool)> {
        vec![(len, false)]
    }
}

struct Two {
    ro: Arc<Memory>,
    rw: Arc<Memory>,
}

impl Exports for Two {
    fn names(&self) -> Vec<String> {
        vec!["ro".into(), "rw@a".into()]
    }
    fn open(&self, name: &str) -> Result<Arc<dyn Device>, ExportError> {
        match name {
            "ro" => Ok(self.ro.clone()),
            "rw@a" => Ok(self.rw.clone()),
            _ => Err(ExportError::BadLabel(name.into())),
        }
    }
}

fn pattern() -> Vec<u8> {
    (0..DISK).map(|i| (i % 251) as u8).collect()
}

/// A front end with one queue over 1 MiB of shared memory.
struct Guest {
    _frontend: Frontend,
    _memfd: OwnedFd,
    base: *mut u8,
    kick: EventFd,
    _call: EventFd,
    next_avail: u16,
    features: u64,
}

impl Guest {
    fn connect(socket: &std::path::Path) -> Guest {
        let mut frontend = Frontend::connect(socket, 1).expect("the device's socket accepts");
        frontend.set_owner().unwrap();
        let offered = frontend.get_features().unwrap();
        let features = offered & (VERSION_1 | PROTOCOL_FEATURES | BLK_F_RO);
        frontend.set_features(features).unwrap();
        let protocol = frontend.get_protocol_features().unwrap();
        frontend.set_protocol_features(protocol & VhostUserProtocolFeatures::CONFIG).unwrap();

        // SAFETY: memfd_create with a NUL-terminated name; the descriptor is owned below.
        let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh descriptor we own.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate and mmap of our own memfd, shared, MEM bytes.
        let base = unsafe {
            assert_eq!(libc::ftruncate(fd, MEM as i64), 0);
            libc::mmap(std::ptr::null_mut(), MEM, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        assert_ne!(base, libc::MAP_FAILED);
        let base = base.cast::<u8>();
        frontend
            .set_mem_table(&[VhostUserMemoryRegionInfo {
                guest_phys_addr: 0,
                memory_size: MEM as u64,
                userspace_addr: base as u64,
                mmap_offset: 0,
                mmap_handle: memfd.as_raw_fd(),
            }])
            .unwrap();
        let (kick, call) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
        frontend.set_vring_num(0, QSIZE).unwrap();
        let at = |gpa: u64| base as u64 + gpa;
        frontend
            .set_vring_addr(
                0,
                &VringConfigData {
                    queue_max_size: QSIZE,
                    queue_size: QSIZE,
                    flags: 0,
                    desc_table_addr: at(DESC),
                    used_ring_addr: at(USED),
                    avail_ring_addr: at(AVAIL),
                    log_addr: None,
                },
            )
            .unwrap();
        frontend.set_vring_base(0, 0).unwrap();
        frontend.set_vring_call(0, &call).unwrap();
        frontend.set_vring_kick(0, &kick).unwrap();
        frontend.set_vring_enable(0, true).unwrap();
        Guest { _frontend: frontend, _memfd: memfd, base, kick, _call: call, next_avail: 0, features }
    }

    fn put(&self, gpa: u64, bytes: &[u8]) {
        assert!(gpa as usize + bytes.len() <= MEM);
        // SAFETY: inside our mapping (checked above).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(gpa as usize), bytes.len()) }
    }

    fn get(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        // SAFETY: inside our mapping (the callers use fixed offsets below MEM).
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(gpa as usize), out.as_mut_ptr(), len) }
        out
    }

    fn used_idx(&self) -> u16 {
        fence(Ordering::SeqCst);
        u16::from_le_bytes(self.get(USED + 2, 2).try_into().unwrap())
    }

    /// Makes a chain of (guest address, length, device-writable) available
    /// and kicks; returns once the device has used it, with the length it
    /// reported, or None if it did not within 5 s.
    fn submit(&mut self, chain: &[(u64, u32, bool)]) -> Option<u32> {
        let slot = self.next_avail % QSIZE;
        // Each request uses descriptors from 0: requests are one at a time.
        for (i, (addr, len, write)) in chain.iter().enumerate() {
            let mut flags = if *write { VIRTQ_DESC_F_WRITE } else { 0 };
            let next = if i + 1 < chain.len() {
                flags |= VIRTQ_DESC_F_NEXT;
                i as u16 + 1
            } else {
                0
            };
            let mut d = Vec::new();
            d.extend_from_slice(&addr.to_le_bytes());
            d.extend_from_slice(&len.to_le_bytes());
            d.extend_from_slice(&flags.to_le_bytes());
            d.extend_from_slice(&next.to_le_bytes());
            self.put(DESC + 16 * i as u64, &d);
        }
        self.put(AVAIL + 4 + 2 * slot as u64, &0u16.to_le_bytes());
        fence(Ordering::SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.put(AVAIL + 2, &self.next_avail.to_le_bytes());
        fence(Ordering::SeqCst);
        self.kick.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.used_idx() != self.next_avail {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let used_slot = (self.next_avail.wrapping_sub(1) % QSIZE) as u64;
        Some(u32::from_le_bytes(self.get(USED + 4 + 8 * used_slot + 4, 4).try_into().unwrap()))
    }

    /// A read or write request of `len` bytes at `sector`; returns the status.
    fn request(&mut self, kind: u32, sector: u64, len: u32) -> u8 {
        let mut header = Vec::new();
        header.extend_from_slice(&kind.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&sector.to_le_bytes());
        self.put(HEADERS, &header);
        self.put(STATUS, &[0xff]);
        let used = self.submit(&[(HEADERS, 16, false), (DATA, len, kind == IN), (STATUS, 1, true)]).expect("the device answers");
        let status = self.get(STATUS, 1)[0];
        if status == OK && kind == IN {
            assert_eq!(used, len + 1, "a read reports its data and status bytes");
        }
        status
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // SAFETY: our own mapping of MEM bytes.
        unsafe { libc::munmap(self.base.cast(), MEM) };
    }
}

fn served() -> (tempfile::TempDir, VhostUser, Arc<Memory>) {
    let dir = tempfile::tempdir().unwrap();
    let rw = Arc::new(Memory { bytes: Mutex::new(pattern()), writable: true });
    let exports = Arc::new(Two { ro: Arc::new(Memory { bytes: Mutex::new(pattern()), writable: false }), rw: rw.clone() });
    let vhost = VhostUser::new(&dir.path().join("vhost"), exports).unwrap();
    (dir, vhost, rw)
}

#[test]
fn requests_are_checked_and_answered() {
    let (_dir, vhost, rw) = served();
    let ro_socket = vhost.attach("ro").unwrap();
    let rw_socket = vhost.attach("rw@a").unwrap();
    let mut ro = Guest::connect(&ro_socket);
    assert_ne!(ro.features & BLK_F_RO, 0, "the image itself is offered read-only");
    let mut rw_guest = Guest::connect(&rw_socket);
    assert_eq!(rw_guest.features & BLK_F_RO, 0, "an overlay is writable");

    // A read returns the disk's bytes.
    assert_eq!(ro.request(IN, 8, 4096), OK);
    assert_eq!(ro.get(DATA, 4096), pattern()[4096..8192]);
    // A write to the read-only disk, and requests past the end, are refused.
    assert_eq!(ro.request(OUT, 0, 4096), IOERR);
    assert_eq!(ro.request(IN, (DISK / 512) as u64, 512), IOERR);
    assert_eq!(ro.request(IN, (DISK / 512 - 1) as u64, 1024), IOERR, "a read straddling the end");
    assert_eq!(ro.request(IN, u64::MAX / 256, 512), IOERR, "a sector whose offset overflows");
    assert_eq!(ro.request(IN, 0, 100), IOERR, "not a whole sector");
    assert_eq!(ro.request(7, 0, 512), 2, "an unknown request type is unsupported");

    // A writable device writes.
    rw_guest.put(DATA, &[0xab; 512]);
    assert_eq!(rw_guest.request(OUT, 1, 512), OK);
    assert_eq!(rw.bytes.lock().unwrap()[512..1024], [0xab; 512]);

    // Descriptors outside guest memory: used with nothing written, the
    // device carries on.
    let used = ro.submit(&[(MEM as u64 * 4, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(used, Some(0));
    let used = ro.submit(&[(HEADERS, 16, false), (DATA, 512, true), (MEM as u64 - 1, 8, true)]);
    assert_eq!(used, Some(0));
    assert_eq!(ro.request(IN, 0, 512), OK, "the device serves after bad descriptors");
    assert_eq!(ro.get(DATA, 512), pattern()[..512]);
    assert_eq!(rw_guest.request(IN, 1, 512), OK, "the other device is untouched");
    assert_eq!(rw_guest.get(DATA, 512), [0xab; 512]);
    assert!(vhost.stats.errors.load(Ordering::Relaxed) >= 8);
}

#[test]
fn a_dropped_front_end_leaves_the_device_for_the_next() {
    let (_dir, vhost, _rw) = served();
    let socket = vhost.attach("ro").unwrap();
    let other = vhost.attach("rw@a").unwrap();
    let mut steady = Guest::connect(&other);
    for _ in 0..3 {
        let mut g = Guest::connect(&socket);
        assert_eq!(g.request(IN, 0, 4096), OK);
        // Kick a request and go away before it is looked at.
        g.put(AVAIL + 4, &0u16.to_le_bytes());
        g.put(AVAIL + 2, &g.next_avail.wrapping_add(1).to_le_bytes());
        g.kick.write(1).unwrap();
        drop(g);
        assert_eq!(steady.request(IN, 2, 512), OK);
    }
    // A front end that hangs up in the middle of the set-up.
    let half = Frontend::connect(&socket, 1).unwrap();
    half.set_owner().unwrap();
    drop(half);
    let mut g = Guest::connect(&socket);
    assert_eq!(g.request(IN, 16, 512), OK);
    assert_eq!(g.get(DATA, 512), pattern()[8192..8704]);
    // A ring whose available index runs far ahead of what it holds.
    g.put(AVAIL + 2, &(g.next_avail.wrapping_add(1000)).to_le_bytes());
    g.kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    drop(g);
    let mut g = Guest::connect(&socket);
    assert_eq!(g.request(IN, 0, 512), OK, "the next front end is served");
    assert_eq!(steady.request(IN, 0, 512), OK);
    assert!(vhost.detach("ro"));
    assert!(!socket.exists(), "a detached device's socket is removed");
}
