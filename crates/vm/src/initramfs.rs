//! The initramfs: a gzip'd newc cpio archive holding `/init` (the
//! `tessera-guest` binary and the shared libraries it links), the virtio
//! modules and `/tessera/spec`.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use crate::{Error, Kernel, RunSpec};

struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry_dev(name, mode, data, (0, 0));
    }

    /// An entry; `rdev` (major, minor) for a device node.
    fn entry_dev(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, path: &str) {
        let mut at = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            if self.dirs.insert(at.clone()) {
                self.entry(&at, 0o040755, &[]);
            }
        }
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        let path = path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entry(path, 0o100000 | mode, data);
    }
}

/// The shared libraries `binary` links, by absolute path (from `ldd`).
fn libraries(binary: &Path) -> Result<Vec<String>, Error> {
    let out = Command::new("ldd").arg(binary).output().map_err(|e| Error::Tool { command: "ldd".into(), reason: e.to_string() })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") || !out.status.success() {
        return Ok(Vec::new());
    }
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = l.split("=>").nth(1).unwrap_or(l).split_whitespace().next()?;
            path.starts_with('/').then(|| path.to_owned())
        })
        .collect())
}

/// Builds the initramfs for one run.
pub fn build(guest: &Path, kernel: &Kernel, spec: &RunSpec) -> Result<Vec<u8>, Error> {
    let read = |p: &Path| std::fs::read(p).map_err(Error::io("reading for the initramfs", p));
    let mut c = Cpio { out: Vec::new(), ino: 0, dirs: BTreeSet::new() };
    for d in ["proc", "sys", "dev", "newroot", "tessera", "lib/modules"] {
        c.dir(d);
    }
    // The kernel opens /dev/console for init's stdin, stdout and stderr
    // before devtmpfs is mounted.
    c.entry_dev("dev/console", 0o020600, &[], (5, 1));
    c.file("init", 0o755, &read(guest)?);
    for lib in libraries(guest)? {
        c.file(&lib, 0o755, &read(Path::new(&lib))?);
    }
    let mut text = String::new();
    for m in &kernel.modules {
        let name = format!("/lib/modules/{}", m.file_name().expect("a module file").to_string_lossy());
        c.file(&name, 0o644, &read(m)?);
        text.push_str(&format!("module {}\n", hex::encode(&name)));
    }
    for a in &spec.argv {
        text.push_str(&format!("arg {}\n", hex::encode(a)));
    }
    for e in &spec.env {
        text.push_str(&format!("env {}\n", hex::encode(e)));
    }
    text.push_str(&format!("workdir {}\nuser {}\n", hex::encode(&spec.workdir), hex::encode(&spec.user)));
    if spec.read_only {
        text.push_str("readonly 31\n");
    }
    if kernel.built {
        // Its VM (microvm) talks to the host over virtio-serial ports.
        text.push_str(&format!("ports {}\n", hex::encode("virtio")));
    }
    c.file("tessera/spec", 0o644, text.as_bytes());
    c.entry("TRAILER!!!", 0, &[]);
    if kernel.built {
        // Unpacking a plain cpio is a copy; inflating costs the guest
        // (under TCG) more than reading the larger file costs QEMU.
        return Ok(c.out);
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    // Writing to memory does not fail.
    gz.write_all(&c.out).expect("gzip into memory");
    Ok(gz.finish().expect("gzip into memory"))
}
