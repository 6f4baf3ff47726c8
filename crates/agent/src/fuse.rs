//! An export as a file on a FUSE filesystem, so `mount -o loop` works where
//! there is no nbd kernel module ([`LoopMount`] does that mount).
//!
//! The filesystem holds one file, named after the export, whose bytes are the
//! disk. Requests are answered from a pool of threads, so the kernel can
//! keep many reads in flight (the loop driver does) while chunks are fetched.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crossbeam_channel::{unbounded, Sender};
use fuser::{FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request};

use crate::device::Device;

const ROOT: u64 = 1;
const DISK: u64 = 2;
const TTL: Duration = Duration::from_secs(3600);
/// Threads answering reads and writes.
const WORKERS: usize = 16;

type Job = Box<dyn FnOnce() + Send>;

/// The filesystem: a directory holding the disk file.
pub struct DiskFs {
    name: String,
    device: Arc<dyn Device>,
    mounted_at: SystemTime,
    uid: u32,
    gid: u32,
    jobs: Sender<Job>,
}

impl DiskFs {
    /// A filesystem showing `device` as the file `name`.
    pub fn new(name: &str, device: Arc<dyn Device>) -> DiskFs {
        let (jobs, rx) = unbounded::<Job>();
        for _ in 0..WORKERS {
            let rx = rx.clone();
            std::thread::spawn(move || {
                for job in rx {
                    job();
                }
            });
        }
        // SAFETY: getuid and getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        DiskFs { name: name.to_owned(), device, mounted_at: SystemTime::now(), uid, gid, jobs }
    }

    fn attr(&self, ino: u64) -> FileAttr {
        let (kind, perm, size, nlink) = if ino == ROOT {
            (FileType::Directory, 0o555, 0, 2)
        } else {
            (FileType::RegularFile, if self.device.writable() { 0o644 } else { 0o444 }, self.device.size(), 1)
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
            crtime: self.mounted_at,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn submit(&self, job: impl FnOnce() + Send + 'static) {
        let _ = self.jobs.send(Box::new(job));
    }
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl Filesystem for DiskFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        if parent == ROOT && name == OsStr::new(&self.name) {
            reply.entry(&TTL, &self.attr(DISK), 0);
        } else {
            reply.error(libc::ENOENT);
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match ino {
            ROOT | DISK => reply.attr(&TTL, &self.attr(ino)),
            _ => reply.error(libc::ENOENT),
        }
    }

    fn readdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, offset: i64, mut reply: ReplyDirectory) {
        if ino != ROOT {
            reply.error(libc::ENOTDIR);
            return;
        }
        let entries = [(ROOT, FileType::Directory, "."), (ROOT, FileType::Directory, ".."), (DISK, FileType::RegularFile, self.name.as_str())];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, i as i64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if ino != DISK {
            reply.error(libc::EISDIR);
        } else if flags & libc::O_ACCMODE != libc::O_RDONLY && !self.device.writable() {
            reply.error(libc::EROFS);
        } else {
            reply.opened(0, 0);
        }
    }

    fn read(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, offset: i64, size: u32, _flags: i32, _lock: Option<u64>, reply: ReplyData) {
        if ino != DISK || offset < 0 {
            reply.error(libc::EINVAL);
            return;
        }
        let device = Arc::clone(&self.device);
        self.submit(move || {
            let offset = offset as u64;
            let len = (size as u64).min(device.size().saturating_sub(offset)) as usize;
            let mut buf = vec![0u8; len];
            match device.read(offset, &mut buf) {
                Ok(()) => reply.data(&buf),
                Err(e) => {
                    tracing::error!("fuse: read of {len} bytes at {offset}: {e}");
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyWrite,
    ) {
        if ino != DISK || offset < 0 {
            reply.error(libc::EINVAL);
            return;
        }
        if !self.device.writable() {
            reply.error(libc::EROFS);
            return;
        }
        if offset as u64 + data.len() as u64 > self.device.size() {
            reply.error(libc::ENOSPC);
            return;
        }
        let device = Arc::clone(&self.device);
        let data = data.to_vec();
        self.submit(move || match device.write(offset as u64, &data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn fsync(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        let device = Arc::clone(&self.device);
        self.submit(move || match device.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock: u64, reply: ReplyEmpty) {
        reply.ok();
    }
}

/// Mounts `fs` at `dir` in the background; unmounted when the session drops.
pub fn mount(fs: DiskFs, dir: &Path) -> std::io::Result<fuser::BackgroundSession> {
    let writable = fs.device.writable();
    let mut options = vec![MountOption::FSName("tessera".into()), MountOption::Subtype("tessera".into()), MountOption::NoDev, MountOption::NoSuid];
    options.push(if writable { MountOption::RW } else { MountOption::RO });
    fuser::spawn_mount2(fs, dir, &options)
}

/// The filesystem on a disk file, loop-mounted; unmounted on drop (lazily,
/// if it is busy).
pub struct LoopMount {
    mountpoint: std::path::PathBuf,
}

impl LoopMount {
    /// Loop-mounts the filesystem in `file` on `mountpoint` (read-only
    /// unless `writable`). Needs root.
    pub fn mount(file: &Path, mountpoint: &Path, writable: bool) -> std::io::Result<LoopMount> {
        let opts = if writable { "loop" } else { "loop,ro" };
        let out = std::process::Command::new("mount").args(["-o", opts]).arg(file).arg(mountpoint).output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "loop-mounting {} on {}: {}",
                file.display(),
                mountpoint.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(LoopMount { mountpoint: mountpoint.to_owned() })
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let ok = std::process::Command::new("umount").arg(&self.mountpoint).status().map(|s| s.success()).unwrap_or(false);
        if !ok {
            tracing::warn!("could not unmount {}; unmounting lazily", self.mountpoint.display());
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.mountpoint).status();
        }
    }
}
