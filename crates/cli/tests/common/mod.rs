//! Fixtures shared by the integration tests: the real `tessera` binary, real
//! images built with umoci or by hand, a real `docker-registry` on loopback.

#![allow(dead_code)]

pub mod nbd;
pub mod oci;
pub mod s3;
pub mod tls;
pub mod tree;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Is `tool` on PATH? Under CI a missing tool fails the test, naming the package.
pub fn require(tool: &str, package: &str) -> bool {
    let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().map(|o| o.status.success()).unwrap_or(false);
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{tool} is missing: apt-get install {package}");
        }
        eprintln!("skipping: {tool} is missing (apt-get install {package})");
    }
    found
}

/// The tools [`busybox_layout`] needs to build a test image.
pub fn have_image_tools() -> bool {
    require("umoci", "umoci") && require("busybox", "busybox-static") && require("setfattr", "attr")
}

/// The tools a test that reads an image over NBD needs.
pub fn have_nbd_tools() -> bool {
    have_image_tools() && require("nbdcopy", "libnbd-bin") && require("qemu-io", "qemu-utils")
}

/// The tools a test that boots a VM needs (the kernel comes with apt).
pub fn have_vm_tools() -> bool {
    have_image_tools() && require("qemu-system-x86_64", "qemu-system-x86") && require("apt-get", "apt")
}

/// `tessera run ARGS` on `home`, with the guest kernel cache the tests share.
pub fn tessera_run(home: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tessera"));
    c.arg("run").args(args).env("TESSERA_HOME", home).env("TESSERA_KERNEL_DIR", concat!(env!("CARGO_TARGET_TMPDIR"), "/kernel")).stdin(Stdio::null());
    c
}

/// True when running as root (loop mounts, tmpfs, docker-registry ports are fine).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A scratch TESSERA_HOME plus a work directory, removed on drop.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        Env { dir: tempfile::tempdir().expect("a temp dir") }
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Runs `tessera ARGS` against this home.
    pub fn tessera(&self, args: &[&str]) -> Output {
        tessera_with_home(&self.home(), args)
    }

    /// Runs `tessera ARGS`, asserting success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.tessera(args);
        assert!(out.status.success(), "tessera {args:?} failed:\n{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `tessera import ... --json`, parsed.
    pub fn import(&self, source: &str, name: &str, extra: &[&str]) -> serde_json::Value {
        let mut args = vec!["import", source, "--name", name, "--json", "--headroom", "64MiB"];
        args.extend_from_slice(extra);
        serde_json::from_str(&self.ok(&args)).expect("import --json prints JSON")
    }

    pub fn image_names(&self) -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(&self.ok(&["images", "--json"])).unwrap();
        v.as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap().to_owned()).collect()
    }
}

pub fn tessera_with_home(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera")).args(args).env("TESSERA_HOME", home).stdin(Stdio::null()).output().expect("the tessera binary runs")
}

/// stdout and stderr of a finished command, for assertion messages.
pub fn text(out: &Output) -> String {
    format!("status {:?}\nstdout:\n{}\nstderr:\n{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Runs a command, asserting success.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}", text(&out));
    out
}

/// A busybox image built with umoci: `DIR:TAG` with /bin/busybox, a few
/// applets, a file with content, a hard link, a symlink, an xattr and a
/// set-uid bit.
pub fn busybox_layout(dir: &Path, tag: &str) {
    run(Command::new("umoci").args(["init", "--layout"]).arg(dir));
    let image = format!("{}:{tag}", dir.display());
    run(Command::new("umoci").args(["new", "--image", &image]));
    let bundle = dir.with_extension("bundle");
    run(Command::new("umoci").args(["unpack", "--image", &image]).arg(&bundle));
    let root = bundle.join("rootfs");
    for d in ["bin", "etc", "tmp", "var/empty"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static provides /bin/busybox");
    for applet in ["sh", "cat", "ls", "echo", "true", "false"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("etc/greeting"), "hello from tessera\n").unwrap();
    std::fs::hard_link(root.join("etc/greeting"), root.join("etc/greeting.hard")).unwrap();
    std::fs::write(root.join("bin/suid"), "#!/bin/sh\n").unwrap();
    run(Command::new("chmod").args(["4755"]).arg(root.join("bin/suid")));
    run(Command::new("chmod").args(["1777"]).arg(root.join("tmp")));
    run(Command::new("chown").args(["1000:1000"]).arg(root.join("var/empty")));
    run(Command::new("setfattr").args(["-n", "user.tessera", "-v", "xattr-value"]).arg(root.join("etc/greeting")));
    run(Command::new("umoci").args(["repack", "--image", &image]).arg(&bundle));
    run(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--config.entrypoint",
        "/bin/sh",
        "--config.cmd",
        "-c",
        "--config.cmd",
        "cat /etc/greeting",
        "--config.env",
        "GREETING=hello",
        "--config.workingdir",
        "/etc",
        "--config.user",
        "1000:1000",
    ]));
    std::fs::remove_dir_all(&bundle).unwrap();
}

/// Adds a layer with `files` (path → content) on top of `DIR:TAG`, as `DIR:NEWTAG`.
pub fn add_layer(dir: &Path, tag: &str, new_tag: &str, files: &[(&str, &[u8])]) {
    let image = format!("{}:{tag}", dir.display());
    let new_image = format!("{}:{new_tag}", dir.display());
    let bundle = dir.with_extension(format!("bundle-{new_tag}"));
    run(Command::new("umoci").args(["unpack", "--image", &image]).arg(&bundle));
    for (path, data) in files {
        let p = bundle.join("rootfs").join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    run(Command::new("umoci").args(["repack", "--image", &new_image]).arg(&bundle));
    std::fs::remove_dir_all(&bundle).unwrap();
}

/// How a test registry authenticates.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// Anyone may pull and push.
    None,
    /// HTTP basic auth (htpasswd): user `tessera`, password `s3cret`.
    Basic,
    /// Bearer tokens from a token issuer (`fixtures/token_server.py`) that
    /// takes the same user and password.
    Token,
}

/// A `docker-registry` on a free loopback port, stopped on drop.
pub struct Registry {
    child: Child,
    issuer: Option<Child>,
    pub addr: String,
    pub dir: tempfile::TempDir,
}

/// Waits for a server started with `--ready-file FILE` to write it, and
/// returns what it wrote; fails if the server exits first.
pub fn wait_ready(file: &Path, child: &mut Child, what: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(file) {
            if let Ok(v) = serde_json::from_str(&text) {
                return v;
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{what} exited ({status}) before it was ready");
        }
        assert!(Instant::now() < deadline, "{what} did not write {}", file.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for a line `listening on ADDR` in `log` (written by `child`), and
/// returns ADDR: how servers we did not write report the port they got.
pub fn wait_logged_address(log: &Path, child: &mut Child, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(rest) = text.split("listening on ").nth(1) {
            let addr: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || ".:[]".contains(*c)).collect();
            if addr.rsplit(':').next().is_some_and(|p| p.parse::<u16>().is_ok_and(|p| p != 0)) {
                return addr;
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{what} exited ({status}) before it listened:\n{text}");
        }
        assert!(Instant::now() < deadline, "{what} did not say where it listens:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn wait_listening(addr: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Registry {
    pub fn start(auth: Auth) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        // Port 0: the registry picks a free port and logs it.
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:0\n",
            dir.path().join("data").display()
        );
        let mut issuer = None;
        match auth {
            Auth::None => {}
            Auth::Basic => {
                let htpasswd = dir.path().join("htpasswd");
                let hash = Command::new("python3")
                    .args(["-c", "import crypt; print(crypt.crypt('s3cret', crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=32)))"])
                    .output()
                    .unwrap();
                let hash = String::from_utf8_lossy(&hash.stdout).trim().to_owned();
                assert!(hash.starts_with("$2b$"), "python3 crypt made a bcrypt hash: {hash:?}");
                std::fs::write(&htpasswd, format!("tessera:{hash}\n")).unwrap();
                config.push_str(&format!("auth:\n  htpasswd:\n    realm: tessera-test\n    path: {}\n", htpasswd.display()));
            }
            Auth::Token => {
                let (key, cert) = (dir.path().join("key.pem"), dir.path().join("cert.pem"));
                run(Command::new("openssl")
                    .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=tessera-test-issuer", "-keyout"])
                    .arg(&key)
                    .arg("-out")
                    .arg(&cert)
                    .stderr(Stdio::null()));
                let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/token_server.py");
                let issuer_log = dir.path().join("issuer.log");
                let mut child = Command::new("python3")
                    .arg(script)
                    .arg("0")
                    .arg(&key)
                    .arg(&cert)
                    .args(["tessera-test-issuer", "tessera-test", "tessera", "s3cret"])
                    .stdout(std::fs::File::create(&issuer_log).unwrap())
                    .spawn()
                    .expect("python3 runs the token issuer");
                let token_addr = wait_logged_address(&issuer_log, &mut child, "the token issuer");
                issuer = Some(child);
                config.push_str(&format!(
                    "auth:\n  token:\n    realm: http://{token_addr}/token\n    service: tessera-test\n    issuer: tessera-test-issuer\n    rootcertbundle: {}\n",
                    cert.display()
                ));
            }
        }
        let cfg = dir.path().join("config.yml");
        std::fs::write(&cfg, config).unwrap();
        let log = dir.path().join("registry.log");
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("docker-registry starts");
        let addr = wait_logged_address(&log, &mut child, "docker-registry");
        wait_listening(&addr, "docker-registry");
        Registry { child, issuer, addr, dir }
    }

    /// Pushes `oci:LAYOUT:TAG` as `REPO:TAG` with skopeo.
    pub fn push(&self, layout: &Path, tag: &str, repo: &str, creds: Option<&str>) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if let Some(c) = creds {
            cmd.args(["--dest-creds", c]);
        }
        cmd.arg(format!("oci:{}:{tag}", layout.display())).arg(format!("docker://{}/{repo}:{tag}", self.addr));
        run(&mut cmd);
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        for c in std::iter::once(&mut self.child).chain(self.issuer.as_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Loop-mounts `image` read-only at a fresh directory; unmounts on drop.
pub struct LoopMount {
    pub dir: tempfile::TempDir,
}

impl LoopMount {
    pub fn new(image: &Path) -> LoopMount {
        let dir = tempfile::tempdir().unwrap();
        run(Command::new("mount").args(["-o", "loop,ro"]).arg(image).arg(dir.path()));
        LoopMount { dir }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Writes `bytes` to `path`.
pub fn write(path: &Path, bytes: &[u8]) {
    std::fs::File::create(path).unwrap().write_all(bytes).unwrap();
}

/// A running `tessera serve` on a unix socket, with metrics; stopped (SIGTERM) on drop.
pub struct Served {
    child: Child,
    pub socket: PathBuf,
    pub metrics_addr: String,
    /// Every NBD listener, as bound.
    pub nbd: Vec<String>,
}

impl Served {
    pub fn start(env: &Env, extra: &[&str]) -> Served {
        Served::start_at(env, "nbd.sock", extra)
    }

    /// An agent on socket `ENV/SOCKET` (several may run on one home).
    pub fn start_at(env: &Env, socket: &str, extra: &[&str]) -> Served {
        let socket = env.path(socket);
        let ready = env.path(&format!("{}.ready", socket.file_name().unwrap().to_string_lossy()));
        let _ = std::fs::remove_file(&ready);
        let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["serve", "--nbd", &format!("unix:{}", socket.display()), "--metrics", "127.0.0.1:0", "--ready-file"])
            .arg(&ready)
            .args(extra)
            .env("TESSERA_HOME", env.home())
            .stdin(Stdio::null())
            .spawn()
            .expect("tessera serve starts");
        let bound = wait_ready(&ready, &mut child, "tessera serve");
        let metrics_addr = bound["metrics"].as_str().expect("the ready file names the metrics address").to_owned();
        let nbd = bound["nbd"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()).collect();
        Served { child, socket, metrics_addr, nbd }
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the agent has exited (reaped if so).
    pub fn has_exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    /// Resident memory of the agent, bytes.
    pub fn rss(&self) -> u64 {
        rss(self.pid())
    }

    /// Descriptors the agent holds open.
    pub fn descriptors(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map(|d| d.count()).unwrap_or(0)
    }

    /// `nbd+unix:///EXPORT?socket=…`
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// The value of one metric series, e.g. `tessera_chunk_reads_total{source="disk"}`.
    pub fn metric(&self, series: &str) -> f64 {
        metric(&self.metrics_addr, series)
    }

    /// Stops the agent with SIGTERM and waits for it.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(20));
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.terminate();
        }
    }
}

/// A running `tessera mount`; stopped with SIGTERM on drop.
pub struct Mounted {
    child: Child,
    pub dir: PathBuf,
    pub mountpoint: PathBuf,
}

impl Mounted {
    /// `tessera mount EXPORT DIR --loop MOUNTPOINT`, waiting for the loop mount.
    pub fn start(env: &Env, export: &str, tag: &str) -> Mounted {
        let dir = env.path(&format!("fuse-{tag}"));
        let mountpoint = env.path(&format!("root-{tag}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&mountpoint).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["mount", export])
            .arg(&dir)
            .arg("--loop")
            .arg(&mountpoint)
            .env("TESSERA_HOME", env.home())
            .stdin(Stdio::null())
            .spawn()
            .expect("tessera mount starts");
        let mut m = Mounted { child, dir, mountpoint };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !m.mountpoint.join("lost+found").exists() {
            assert!(m.child.try_wait().unwrap().is_none(), "tessera mount exited early");
            assert!(Instant::now() < deadline, "the loop mount did not appear");
            std::thread::sleep(Duration::from_millis(50));
        }
        m
    }

    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        if !stop_child(&mut self.child, Duration::from_secs(30)) {
            let _ = Command::new("umount").arg("-l").arg(&self.mountpoint).status();
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.terminate();
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), for junk and incompressible data.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// The response to `GET PATH` over HTTP/1.1 (with the given extra header
/// lines), status line and all.
pub fn http_get(addr: &str, path: &str, headers: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n").as_bytes()).unwrap();
    let mut body = Vec::new();
    s.read_to_end(&mut body).unwrap();
    String::from_utf8_lossy(&body).into_owned()
}

/// `METHOD PATH` with `body` over HTTP/1.1; the status code.
pub fn http_send(addr: &str, method: &str, path: &str, headers: &str, body: &[u8]) -> u16 {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n{headers}\r\n", body.len()).as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// The body of `GET PATH` if it answers 200.
pub fn http_get_body(addr: &str, path: &str) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    let end = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    answer.starts_with(b"HTTP/1.1 200").then(|| answer[end + 4..].to_vec())
}

/// Resident memory of process `pid`, bytes.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()).unwrap_or(0) * 1024
}

/// The value of one series at `http://ADDR/metrics`.
pub fn metric(addr: &str, series: &str) -> f64 {
    let body = http_get(addr, "/metrics", "");
    body.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok())).unwrap_or_else(|| panic!("no metric {series} in:\n{body}"))
}

/// Sends SIGTERM and waits up to `grace`; then kills.
pub fn stop_child(child: &mut Child, grace: Duration) -> bool {
    // SAFETY: kill takes a pid and a signal number.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}
