//! Starting QEMU on the agent's lazy disk.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::Error;

use crate::Accel;

/// Where the VM's root disk comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootDisk {
    /// An NBD export on a unix socket.
    Nbd {
        /// The agent's socket.
        socket: PathBuf,
        /// The export (`NAME@LABEL`).
        export: String,
    },
    /// A vhost-user-blk device: the agent serves the guest's memory
    /// directly. QEMU reconnects (every second) if the agent goes away.
    VhostUser {
        /// The device's socket.
        socket: PathBuf,
        /// Request queues.
        queues: u32,
    },
}

impl RootDisk {
    /// QEMU's arguments for it: a PCI device on `q35`, an MMIO one on `microvm`.
    fn args(&self, microvm: bool) -> Vec<String> {
        let bus = if microvm { "device" } else { "pci" };
        match self {
            RootDisk::Nbd { socket, export } => vec![
                "-drive".into(),
                format!("file=nbd+unix:///{export}?socket={},format=raw,if=none,id=root,cache=none", socket.display()),
                "-device".into(),
                format!("virtio-blk-{bus},drive=root"),
            ],
            RootDisk::VhostUser { socket, queues } => vec![
                "-chardev".into(),
                format!("socket,id=root,path={},reconnect=1", socket.display()),
                "-device".into(),
                format!("vhost-user-blk{},chardev=root,num-queues={queues}", if microvm { "" } else { "-pci" }),
            ],
        }
    }

    /// Whether the guest's memory must be shared with the device's back end.
    fn shares_memory(&self) -> bool {
        matches!(self, RootDisk::VhostUser { .. })
    }
}

/// A VM to start.
pub struct Launch<'a> {
    /// Guest kernel.
    pub kernel: &'a Path,
    /// Boot on `microvm` (a kernel with its drivers built in, booted
    /// directly: no firmware, PCI or ACPI) rather than `q35`.
    pub microvm: bool,
    /// Initramfs file.
    pub initrd: &'a Path,
    /// The root disk.
    pub root: RootDisk,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Guest CPUs.
    pub cpus: u32,
    /// CPU provider.
    pub accel: Accel,
    /// Where the program's stdout, stderr and the guest's control channel
    /// listen (unix sockets QEMU creates and waits on): serial ports
    /// ttyS1..ttyS3 on `q35`, virtio-serial ports vport0p1..3 on `microvm`.
    pub sockets: [PathBuf; 3],
    /// Console log file (QEMU's own messages go beside it, `.qemu`);
    /// `None` sends both to our stderr.
    pub console: Option<&'a Path>,
}

impl Launch<'_> {
    /// Spawns QEMU; it waits for a client on each serial socket before booting.
    pub fn spawn(&self) -> Result<Child, Error> {
        let mut cmd = Command::new("qemu-system-x86_64");
        let mut machine = if self.microvm {
            // No option ROMs or ACPI; the PIT and PIC the kernel's timer
            // set-up wants, the CMOS clock it reads at boot (without one it
            // waits a second for it); one ISA serial port for the console.
            "microvm,x-option-roms=off,pit=on,pic=on,rtc=on,isa-serial=on,acpi=off".to_owned()
        } else {
            "q35".to_owned()
        };
        if self.root.shares_memory() {
            // vhost-user: guest memory in a memfd the back end maps.
            cmd.arg("-object").arg(format!("memory-backend-memfd,id=mem,size={}M,share=on", self.memory_mib));
            machine.push_str(",memory-backend=mem");
        }
        // reboot=t: the guest's last act is a reboot (a triple fault, which
        // needs no ACPI), which -no-reboot turns into QEMU's exit.
        let cmdline = if self.microvm {
            "console=ttyS0 panic=-1 quiet reboot=t tsc=reliable no_timer_check nowatchdog noapictimer"
        } else {
            "console=ttyS0 panic=-1 quiet reboot=t"
        };
        cmd.args(["-accel", self.accel.name(), "-M", &machine, "-nodefaults", "-no-reboot", "-nographic"])
            .args(["-m", &self.memory_mib.to_string(), "-smp", &self.cpus.to_string()])
            .arg("-kernel")
            .arg(self.kernel)
            .arg("-initrd")
            .arg(self.initrd)
            .args(["-append", cmdline])
            .args(self.root.args(self.microvm));
        if self.microvm {
            cmd.args(["-global", "virtio-mmio.force-legacy=false"]);
        }
        match self.console {
            Some(log) => cmd.arg("-serial").arg(format!("file:{}", log.display())),
            None => cmd.args(["-serial", "stdio"]),
        };
        if self.microvm {
            cmd.args(["-device", "virtio-serial-device,max_ports=4"]);
        }
        for (i, s) in self.sockets.iter().enumerate() {
            cmd.arg("-chardev").arg(format!("socket,id=s{i},path={},server=on,wait=on", s.display()));
            if self.microvm {
                cmd.arg("-device").arg(format!("virtserialport,chardev=s{i},nr={}", i + 1));
            } else {
                cmd.arg("-serial").arg(format!("chardev:s{i}"));
            }
        }
        cmd.stdin(Stdio::null());
        match self.console {
            Some(log) => {
                let qemu_log = std::fs::File::create(log.with_extension("qemu")).map_err(Error::io("creating", log.with_extension("qemu")))?;
                cmd.stdout(Stdio::null()).stderr(qemu_log);
            }
            // The console goes to our stderr: the program's stdout stays clean.
            None => {
                cmd.stdout(std::io::stderr());
            }
        }
        cmd.spawn().map_err(|e| Error::Qemu(format!("cannot start qemu-system-x86_64 (apt-get install qemu-system-x86): {e}")))
    }
}
