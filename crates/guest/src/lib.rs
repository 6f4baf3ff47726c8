//! The init (PID 1) of a microVM started by `tessera run`: the
//! `tessera-guest` binary (built with the `tessera` binary) calls [`main`].
//!
//! It reads `/tessera/spec` from the initramfs, loads the virtio modules,
//! mounts `/dev/vda` (the image, served lazily over NBD by the host) as the
//! root, and runs the entrypoint there with the image's environment, working
//! directory and user. The program's stdout and stderr go to ports 1 and 2
//! (virtio-serial `vport0p1`, `vport0p2` on `microvm`; serial `ttyS1`,
//! `ttyS2` on `q35`); port 3 carries `start` when the program is about to
//! run and `exit N` when it has ended. Then the VM reboots, which QEMU
//! (`-no-reboot`) takes as the end.
//!
//! The spec is one line per item, `KEY HEX` with the value hex-encoded:
//! `module` (a `.ko` path, in load order), `arg`, `env`, `workdir`, `user`,
//! `readonly` (`1`: mount the root read-only, a tmpfs on `/tmp`), `ports`
//! (`virtio`: wait for the virtio-serial ports).

use std::ffi::{CStr, CString};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::io::{AsRawFd, IntoRawFd};
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Spec {
    modules: Vec<String>,
    argv: Vec<Vec<u8>>,
    env: Vec<Vec<u8>>,
    workdir: Vec<u8>,
    user: String,
    read_only: bool,
    /// The host's ports are virtio-serial (`microvm`), not serial ports.
    virtio_ports: bool,
}

/// Runs as the VM's init: never returns (powers the VM off).
pub fn main() {
    let mut control = None;
    let code = match run(&mut control) {
        Ok(code) => code,
        Err(msg) => {
            let line = format!("tessera-guest: {msg}\n");
            let _ = std::fs::OpenOptions::new().write(true).open(port(2)).and_then(|mut f| f.write_all(line.as_bytes()));
            let _ = std::io::stderr().write_all(line.as_bytes());
            // And the kernel log, which reaches the console whatever the ports.
            let _ = std::fs::OpenOptions::new().write(true).open("/dev/kmsg").and_then(|mut f| f.write_all(line.as_bytes()));
            125
        }
    };
    if let Some(c) = control.as_mut() {
        let _ = writeln!(c, "exit {code}");
    }
    // SAFETY: sync and reboot take no pointers; as PID 1 we may reboot.
    // A reboot needs no ACPI (microvm has none): QEMU exits on it.
    unsafe {
        libc::sync();
        libc::reboot(libc::LINUX_REBOOT_CMD_RESTART);
    }
}

fn cstr(s: &[u8]) -> CString {
    CString::new(s.to_vec()).unwrap_or_else(|_| CString::new("?").expect("no NUL"))
}

fn mount(src: &str, target: &str, fstype: &str) -> Result<(), String> {
    mount_with(src, target, fstype, 0)
}

fn mount_with(src: &str, target: &str, fstype: &str, flags: libc::c_ulong) -> Result<(), String> {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f) = (cstr(src.as_bytes()), cstr(target.as_bytes()), cstr(fstype.as_bytes()));
    // SAFETY: all pointers are valid NUL-terminated strings; data may be null.
    let r = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, std::ptr::null()) };
    if r != 0 {
        return Err(format!("mount {src} on {target}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn read_spec() -> Result<Spec, String> {
    let text = std::fs::read_to_string("/tessera/spec").map_err(|e| format!("/tessera/spec: {e}"))?;
    let mut spec = Spec::default();
    for line in text.lines() {
        let (key, hex) = line.split_once(' ').ok_or("malformed spec line")?;
        let value = decode_hex(hex).ok_or("malformed hex in spec")?;
        match key {
            "module" => spec.modules.push(String::from_utf8_lossy(&value).into_owned()),
            "arg" => spec.argv.push(value),
            "env" => spec.env.push(value),
            "workdir" => spec.workdir = value,
            "user" => spec.user = String::from_utf8_lossy(&value).into_owned(),
            "readonly" => spec.read_only = value == b"1",
            "ports" => spec.virtio_ports = value == b"virtio",
            _ => {}
        }
    }
    if spec.argv.is_empty() {
        return Err("the image has no entrypoint or command to run".into());
    }
    Ok(spec)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Opens a serial port for writing, in raw mode (no newline translation).
/// Port `n` to the host: virtio-serial (`/dev/vportDpN`, D the virtio
/// device's index) where the VM has it, else a serial port.
fn port(n: u8) -> String {
    let suffix = format!("p{n}");
    let virtio = std::fs::read_dir("/dev").ok().and_then(|dir| {
        dir.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned())).find(|name| {
            name.strip_prefix("vport").and_then(|rest| rest.strip_suffix(&suffix)).is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        })
    });
    match virtio {
        Some(name) => format!("/dev/{name}"),
        None => format!("/dev/ttyS{n}"),
    }
}

fn serial(path: &str) -> Result<File, String> {
    let f = OpenOptions::new().read(true).write(true).open(path).map_err(|e| format!("{path}: {e}"))?;
    // SAFETY: termios is plain data; the descriptor is valid for `f`'s lifetime.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(f.as_raw_fd(), &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(f.as_raw_fd(), libc::TCSANOW, &t);
        }
    }
    Ok(f)
}

fn run(control: &mut Option<File>) -> Result<i32, String> {
    mount("proc", "/proc", "proc")?;
    mount("sysfs", "/sys", "sysfs")?;
    mount("devtmpfs", "/dev", "devtmpfs")?;
    let spec = read_spec()?;
    if spec.virtio_ports {
        // The host adds virtio-serial ports once the driver is up: wait.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !port(3).starts_with("/dev/vport") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    *control = Some(serial(&port(3))?);
    for m in &spec.modules {
        let f = File::open(m).map_err(|e| format!("{m}: {e}"))?;
        let empty = cstr(b"");
        // SAFETY: finit_module takes a valid descriptor and a NUL-terminated parameter string.
        let r = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), empty.as_ptr(), 0) };
        if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
            return Err(format!("loading {m}: {}", std::io::Error::last_os_error()));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !Path::new("/dev/vda").exists() {
        if Instant::now() > deadline {
            return Err("no root disk (/dev/vda) appeared".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if spec.read_only {
        mount_with("/dev/vda", "/newroot", "ext4", libc::MS_RDONLY)?;
        if Path::new("/newroot/tmp").is_dir() {
            mount("tmpfs", "/newroot/tmp", "tmpfs")?;
        }
    } else {
        mount("/dev/vda", "/newroot", "ext4")?;
    }
    for (src, dir, fs) in [("proc", "/newroot/proc", "proc"), ("sysfs", "/newroot/sys", "sysfs"), ("devtmpfs", "/newroot/dev", "devtmpfs")] {
        // A read-only root that lacks the mount point goes without.
        if !spec.read_only || Path::new(dir).is_dir() {
            mount(src, dir, fs)?;
        }
    }
    let (uid, gid) = resolve_user(&spec.user)?;
    let stdout = serial(&port(1))?;
    let stderr = serial(&port(2))?;
    if let Some(c) = control.as_mut() {
        let _ = writeln!(c, "start");
    }
    let status = spawn(&spec, uid, gid, stdout.into_raw_fd(), stderr.into_raw_fd())?;
    Ok(status)
}

/// `USER`, `UID`, `USER:GROUP` or `UID:GID`, names looked up in the image.
fn resolve_user(user: &str) -> Result<(u32, u32), String> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let lookup = |file: &str, name: &str| -> Option<(u32, u32)> {
        let text = std::fs::read_to_string(file).ok()?;
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&name)).then(|| Some((f.get(2)?.parse().ok()?, f.get(3).and_then(|g| g.parse().ok()).unwrap_or(0))))?
        })
    };
    let (uid, default_gid) = match u.parse::<u32>() {
        Ok(n) => (n, lookup_uid_gid(n).unwrap_or(n)),
        Err(_) => lookup("/newroot/etc/passwd", u).ok_or_else(|| format!("user {u:?} is not in the image's /etc/passwd"))?,
    };
    let gid = match g {
        None => default_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => lookup("/newroot/etc/group", g).map(|(gid, _)| gid).ok_or_else(|| format!("group {g:?} is not in the image's /etc/group"))?,
        },
    };
    Ok((uid, gid))
}

fn lookup_uid_gid(uid: u32) -> Option<u32> {
    let text = std::fs::read_to_string("/newroot/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.get(2)?.parse::<u32>().ok()? == uid).then(|| f.get(3)?.parse().ok())?
    })
}

/// Forks the program inside the new root; returns its exit code (128 + signal if killed).
fn spawn(spec: &Spec, uid: u32, gid: u32, out: i32, err: i32) -> Result<i32, String> {
    let argv: Vec<CString> = spec.argv.iter().map(|a| cstr(a)).collect();
    let mut env: Vec<CString> = spec.env.iter().map(|e| cstr(e)).collect();
    let path_var = match spec.env.iter().find_map(|e| e.strip_prefix(b"PATH=")) {
        Some(p) => p.to_vec(),
        None => {
            // As docker does, an image without PATH gets the default one, in
            // the program's environment too (python, for one, finds its
            // prefix, and so its packages, through it).
            let default = b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
            env.push(cstr(&[b"PATH=".as_slice(), default].concat()));
            default.to_vec()
        }
    };
    let workdir = if spec.workdir.is_empty() { cstr(b"/") } else { cstr(&spec.workdir) };
    // Candidates for the program, resolved the way execvp does, inside the root.
    let program = &spec.argv[0];
    let candidates: Vec<CString> = if program.contains(&b'/') {
        vec![cstr(program)]
    } else {
        path_var.split(|&b| b == b':').filter(|d| !d.is_empty()).map(|d| cstr(&[d, b"/", program].concat())).collect()
    };
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());
    let root = cstr(b"/newroot");
    let devnull = cstr(b"/dev/null");
    // SAFETY: fork in a single-threaded PID 1; the child only makes
    // async-signal-safe calls on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: see above; every pointer is valid and NUL-terminated.
        unsafe {
            let fail = |msg: &[u8], code: i32| -> ! {
                libc::write(err, msg.as_ptr().cast(), msg.len());
                libc::_exit(code)
            };
            if libc::chroot(root.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                fail(b"tessera-guest: cannot enter the image root\n", 125);
            }
            if libc::chdir(workdir.as_ptr()) != 0 {
                fail(b"tessera-guest: the working directory does not exist in the image\n", 126);
            }
            let null = libc::open(devnull.as_ptr(), libc::O_RDONLY);
            libc::dup2(null, 0);
            libc::dup2(out, 1);
            libc::dup2(err, 2);
            if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                fail(b"tessera-guest: cannot switch to the image's user\n", 125);
            }
            let mut last = libc::ENOENT;
            for c in &candidates {
                libc::execve(c.as_ptr(), argv_ptrs.as_ptr(), env_ptrs.as_ptr());
                let e = *libc::__errno_location();
                if e != libc::ENOENT {
                    last = e;
                }
            }
            let msg: &[u8] = if last == libc::ENOENT { b": not found in the image\n" } else { b": cannot be executed\n" };
            libc::write(2, b"tessera-guest: ".as_ptr().cast(), 15);
            libc::write(2, argv_ptrs[0].cast(), CStr::from_ptr(argv_ptrs[0]).to_bytes().len());
            fail(msg, if last == libc::ENOENT { 127 } else { 126 });
        }
    }
    // As PID 1, reap every child until ours ends.
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out-pointer.
        let r = unsafe { libc::waitpid(-1, &mut status, 0) };
        if r == pid {
            return Ok(if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) });
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            return Err("the program vanished".into());
        }
    }
}
