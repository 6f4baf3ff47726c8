//! Which accelerator a VM gets: KVM where it works, else QEMU's TCG.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::Kernel;

/// How the VM's CPU is provided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation (/dev/kvm).
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl Accel {
    /// `kvm` or `tcg`.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccelChoice {
    /// KVM, whether or not it works.
    Kvm,
    /// TCG.
    Tcg,
    /// KVM if a probe VM boots with it within a few seconds, else TCG.
    Auto,
}

/// The accelerator to use. With [`AccelChoice::Auto`], KVM only when
/// /dev/kvm exists and a probe VM (the kernel alone, which panics and stops
/// at once) exits within 3 s: nested KVM on some hosts opens but hangs. The
/// probe's answer is kept in `memo_dir` for this boot of the host.
pub fn pick(wanted: AccelChoice, kernel: &Kernel, memo_dir: &Path) -> Accel {
    match wanted {
        AccelChoice::Kvm => return Accel::Kvm,
        AccelChoice::Tcg => return Accel::Tcg,
        AccelChoice::Auto if !Path::new("/dev/kvm").exists() => return Accel::Tcg,
        AccelChoice::Auto => {}
    }
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let memo = memo_dir.join("accel-probe");
    if let Some(answer) = std::fs::read_to_string(&memo).ok().and_then(|m| m.strip_prefix(boot.trim()).map(|a| a.trim().to_owned())) {
        return if answer == "kvm" { Accel::Kvm } else { Accel::Tcg };
    }
    let answer = probe_kvm(kernel);
    let _ = std::fs::write(&memo, format!("{} {}\n", boot.trim(), answer.name()));
    answer
}

fn probe_kvm(kernel: &Kernel) -> Accel {
    let child = std::process::Command::new("qemu-system-x86_64")
        .args(["-accel", "kvm", "-M", if kernel.built { "microvm" } else { "q35" }, "-nodefaults", "-no-reboot", "-display", "none", "-m", "128"])
        .arg("-kernel")
        .arg(&kernel.image)
        .args(["-append", "panic=-1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut child) = child else { return Accel::Tcg };
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match child.try_wait() {
            Ok(Some(s)) if s.success() => return Accel::Kvm,
            Ok(Some(_)) => return Accel::Tcg,
            _ if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Accel::Tcg;
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
