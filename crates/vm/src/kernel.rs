//! The guest kernel: one built for the job by `scripts/guest-kernel.sh`
//! (an uncompressed `vmlinux` booted directly on QEMU's `microvm`
//! machine, with its drivers built in) when the cache directory holds one,
//! else Debian's `linux-image-cloud-amd64`, downloaded with `apt-get
//! download` and unpacked with `dpkg-deb -x` into the cache directory,
//! never installed on the host (booted on `q35`, its virtio modules loaded
//! from the initramfs).

use std::fs::{self, File};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Error;

/// The virtio modules the initramfs loads, in this order.
pub const MODULES: [&str; 6] = ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "virtio_blk"];

/// An unpacked guest kernel.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// `boot/vmlinuz-…` (Debian's), or `tessera-…/vmlinux` (built).
    pub image: PathBuf,
    /// The `.ko` files of [`MODULES`], in order (none for a built kernel).
    pub modules: Vec<PathBuf>,
    /// Built by `scripts/guest-kernel.sh`: boots on `microvm`.
    pub built: bool,
}

/// Which guest kernel a run boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelChoice {
    /// The built one if the cache holds it, else Debian's.
    Auto,
    /// The one built by `scripts/guest-kernel.sh` (an error if absent).
    Built,
    /// Debian's.
    Debian,
}

fn run(cmd: &mut Command) -> Result<String, Error> {
    let command = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| Error::Tool { command: command.clone(), reason: e.to_string() })?;
    if !out.status.success() {
        return Err(Error::Tool { command, reason: format!("failed: {}", String::from_utf8_lossy(&out.stderr).trim()) });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Kernel {
    /// The kernel `choice` names, from `dir`.
    pub fn pick(dir: &Path, choice: KernelChoice) -> Result<Kernel, Error> {
        match (choice, Kernel::built_in(dir)) {
            (KernelChoice::Built | KernelChoice::Auto, Some(k)) => Ok(k),
            (KernelChoice::Built, None) => Err(Error::Kernel(format!("{} holds no kernel built for tessera: run scripts/guest-kernel.sh {0}", dir.display()))),
            _ => Kernel::ensure(dir),
        }
    }

    /// The newest `tessera-*/vmlinux` under `dir`.
    fn built_in(dir: &Path) -> Option<Kernel> {
        let mut found: Vec<PathBuf> = fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("tessera-")))
            .map(|p| p.join("vmlinux"))
            .filter(|p| p.is_file())
            .collect();
        found.sort();
        found.pop().map(|image| Kernel { image, modules: Vec::new(), built: true })
    }

    /// Debian's kernel unpacked under `dir`, fetching it the first time (one
    /// process at a time: a lock file guards the download).
    pub fn ensure(dir: &Path) -> Result<Kernel, Error> {
        fs::create_dir_all(dir).map_err(Error::io("creating the kernel directory", dir))?;
        let lock = File::create(dir.join("lock")).map_err(Error::io("locking", dir.join("lock")))?;
        // SAFETY: flock takes a valid open descriptor owned by `lock`.
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        let unpacked = dir.join("kernel");
        if let Ok(k) = Kernel::find(&unpacked) {
            return Ok(k);
        }
        let deps = run(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]))?;
        let package = deps
            .lines()
            .find_map(|l| l.trim().strip_prefix("Depends: ").filter(|p| p.starts_with("linux-image-")))
            .ok_or_else(|| Error::Kernel("apt knows no linux-image-cloud-amd64 (run apt-get update)".into()))?
            .to_owned();
        let download = dir.join("download");
        let _ = fs::remove_dir_all(&download);
        fs::create_dir_all(&download).map_err(Error::io("creating", &download))?;
        run(Command::new("apt-get").arg("download").arg(&package).current_dir(&download))?;
        let deb = fs::read_dir(&download)
            .map_err(Error::io("listing", &download))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or_else(|| Error::Kernel(format!("apt-get download {package} left no .deb")))?;
        let staging = dir.join("kernel.tmp");
        let _ = fs::remove_dir_all(&staging);
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&staging))?;
        Kernel::find(&staging)?;
        let _ = fs::remove_dir_all(&unpacked);
        fs::rename(&staging, &unpacked).map_err(Error::io("renaming into place", &unpacked))?;
        let _ = fs::remove_dir_all(&download);
        Kernel::find(&unpacked)
    }

    fn find(root: &Path) -> Result<Kernel, Error> {
        let missing = || Error::Kernel(format!("{}: no kernel unpacked", root.display()));
        let boot = root.join("boot");
        let vmlinuz = fs::read_dir(&boot)
            .map_err(|_| missing())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
            .ok_or_else(missing)?;
        let version = vmlinuz.file_name().expect("a file").to_string_lossy().trim_start_matches("vmlinuz-").to_owned();
        let base = root.join("lib/modules").join(&version).join("kernel/drivers");
        let modules = MODULES
            .iter()
            .map(|m| {
                let sub = if *m == "virtio_blk" { "block" } else { "virtio" };
                let p = base.join(sub).join(format!("{m}.ko"));
                if p.exists() {
                    Ok(p)
                } else {
                    Err(Error::Kernel(format!("{} is missing", p.display())))
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Kernel { image: vmlinuz, modules, built: false })
    }
}
