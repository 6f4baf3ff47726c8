//! Transport security with real clients: NBD over TLS (`NBD_OPT_STARTTLS`)
//! read by libnbd (`nbds://`) and QEMU (`tls-creds-x509`), mutual TLS and
//! an exports policy, plaintext refused off loopback, and the cache tier
//! over HTTP/2 with TLS. Certificates are made with openssl in each test.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::tls::Certs;
use common::*;

fn have_tools() -> bool {
    have_image_tools()
        && require("nbdcopy", "libnbd-bin")
        && require("nbdinfo", "libnbd-bin")
        && require("qemu-img", "qemu-utils")
        && require("qemu-io", "qemu-utils")
        && require("openssl", "openssl")
}

fn imported() -> (Env, Vec<u8>) {
    let env = Env::new();
    let layout = env.path("layout");
    busybox_layout(&layout, "bb");
    // Data, not holes: replies larger than the socket's buffers, which TLS
    // must flush whole.
    add_layer(&layout, "bb", "data", &[("data/blob", &pseudo_random(24 << 20, 17))]);
    env.import(&format!("oci:{}:data", layout.display()), "bb", &[]);
    env.import(&format!("oci:{}:bb", layout.display()), "other", &[]);
    let raw = env.path("bb.raw");
    env.ok(&["export", "bb", raw.to_str().unwrap()]);
    (env, std::fs::read(raw).unwrap())
}

/// An agent with a TLS TCP listener on a port it picks; its address.
fn tls_agent(env: &Env, certs: &Certs, extra: &[&str]) -> (Served, String) {
    let (cert, key, ca) = (certs.file("server-cert.pem"), certs.file("server-key.pem"), certs.file("ca-cert.pem"));
    let mut args = vec!["--nbd", "127.0.0.1:0", "--tls-cert", &cert, "--tls-key", &key, "--tls-client-ca", &ca];
    args.extend_from_slice(extra);
    let served = Served::start(env, &args);
    let addr = served.nbd.iter().find(|a| !a.starts_with("unix:")).unwrap().clone();
    (served, addr)
}

fn nbds(addr: &str, export: &str, certs: &str) -> String {
    format!("nbds://{addr}/{export}?tls-certificates={certs}")
}

#[test]
fn nbd_over_tls_serves_libnbd_and_qemu_and_refuses_plaintext_and_strangers() {
    if !have_tools() {
        return;
    }
    let (env, want) = imported();
    let certs = Certs::make(&env.path("certs"), "DNS:localhost,IP:127.0.0.1");
    let (agent, addr) = tls_agent(&env, &certs, &[]);
    // libnbd.
    let out = env.path("libnbd.raw");
    run(Command::new("nbdcopy").arg(nbds(&addr, "bb", &certs.client("tenant-a"))).arg(&out));
    assert!(std::fs::read(&out).unwrap() == want, "nbdcopy over TLS reads the image");
    let info = run(Command::new("nbdinfo").arg("--size").arg(nbds(&addr, "bb", &certs.client("tenant-a"))));
    assert_eq!(String::from_utf8_lossy(&info.stdout).trim(), want.len().to_string());
    // QEMU.
    let (host, port) = addr.rsplit_once(':').unwrap();
    let out = env.path("qemu.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw", "--object", &format!("tls-creds-x509,id=tls0,dir={},endpoint=client", certs.client("tenant-a")), "--image-opts"])
        .arg(format!("driver=nbd,host={host},port={port},export=bb,tls-creds=tls0,tls-hostname=localhost"))
        .arg(&out));
    assert!(std::fs::read(&out).unwrap() == want, "qemu-img over TLS reads the image");
    // A plaintext client is told TLS is required.
    let plain = Command::new("nbdinfo").arg(format!("nbd://{addr}/bb")).output().unwrap();
    assert!(!plain.status.success());
    assert!(text(&plain).contains("TLS"), "{}", text(&plain));
    // A client with a certificate from another CA is refused.
    let stranger = Command::new("nbdinfo").arg(nbds(&addr, "bb", &certs.client("intruder"))).output().unwrap();
    assert!(!stranger.status.success(), "{}", text(&stranger));
    // So is one with no certificate at all.
    let anonymous = env.path("anonymous");
    std::fs::create_dir_all(&anonymous).unwrap();
    std::fs::copy(certs.dir.join("ca-cert.pem"), anonymous.join("ca-cert.pem")).unwrap();
    let none = Command::new("nbdinfo").arg(nbds(&addr, "bb", anonymous.to_str().unwrap())).output().unwrap();
    assert!(!none.status.success(), "{}", text(&none));
    // The server carries on.
    let again = env.path("again.raw");
    run(Command::new("nbdcopy").arg(nbds(&addr, "bb", &certs.client("tenant-a"))).arg(&again));
    assert!(std::fs::read(&again).unwrap() == want);
    agent.stop();
}

#[test]
fn an_exports_policy_limits_each_client_to_its_images_and_labels() {
    if !have_tools() {
        return;
    }
    let (env, want) = imported();
    let certs = Certs::make(&env.path("certs"), "DNS:localhost,IP:127.0.0.1");
    let policy = env.path("policy.json");
    std::fs::write(
        &policy,
        r#"{"clients": [
            {"subject": "CN=tenant-a,O=acme", "images": ["bb"], "labels": ["a-"]},
            {"subject": "CN=tenant-b,O=acme", "images": ["oth*"]}
        ]}"#,
    )
    .unwrap();
    let (_agent, addr) = tls_agent(&env, &certs, &["--exports-policy", policy.to_str().unwrap()]);
    let (a, b) = (certs.client("tenant-a"), certs.client("tenant-b"));
    let out = env.path("a.raw");
    run(Command::new("nbdcopy").arg(nbds(&addr, "bb", &a)).arg(&out));
    assert!(std::fs::read(&out).unwrap() == want);
    // tenant-b may not open bb; tenant-a may not open other.
    let denied = Command::new("nbdinfo").arg(nbds(&addr, "bb", &b)).output().unwrap();
    assert!(!denied.status.success(), "{}", text(&denied));
    assert!(!Command::new("nbdinfo").arg(nbds(&addr, "other", &a)).output().unwrap().status.success());
    run(Command::new("nbdinfo").arg(nbds(&addr, "other", &b)));
    // Listing shows each client its own.
    let list = run(Command::new("nbdinfo").arg("--list").arg("--json").arg(nbds(&addr, "", &b)));
    let listed = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(listed.contains("\"other\"") && !listed.contains("\"bb\""), "{listed}");
    // Labels: only those with the granted prefix.
    let (host, port) = addr.rsplit_once(':').unwrap();
    let qemu_io = |label: &str| {
        Command::new("qemu-io")
            .args(["--object", &format!("tls-creds-x509,id=tls0,dir={a},endpoint=client"), "--image-opts"])
            .arg(format!("driver=nbd,host={host},port={port},export=bb@{label},tls-creds=tls0,tls-hostname=localhost"))
            .args(["-c", "write -P 0x61 0 4096", "-c", "read -P 0x61 0 4096"])
            .output()
            .unwrap()
    };
    let ok = qemu_io("a-1");
    assert!(ok.status.success() && !String::from_utf8_lossy(&ok.stdout).contains("failed"), "{}", text(&ok));
    let refused = qemu_io("b-1");
    assert!(!refused.status.success(), "{}", text(&refused));
}

#[test]
fn plaintext_nbd_off_loopback_is_refused_unless_asked_for() {
    if !have_tools() {
        return;
    }
    let (env, _) = imported();
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["serve", "--nbd", "0.0.0.0:0", "--nbd", &format!("unix:{}", env.path("p.sock").display())])
        .env("TESSERA_HOME", env.home())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("refusing to serve NBD in clear") && text(&out).contains("--tls-cert"), "{}", text(&out));
    let agent = Served::start(&env, &["--nbd", "0.0.0.0:0", "--allow-plaintext-nbd"]);
    assert!(agent.nbd.iter().any(|a| a.starts_with("0.0.0.0:")));
}

/// Reads the server's greeting and the reply to STARTTLS, in clear.
fn start_tls_by_hand(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec();
    opt.extend_from_slice(&5u32.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&opt).unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_be_bytes(reply[12..16].try_into().unwrap()), 1, "STARTTLS is acknowledged");
    s
}

/// Whether the server closes the connection (after whatever it sends last,
/// a TLS alert say) within the read timeout.
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
        }
    }
}

#[test]
fn hostile_clients_of_the_tls_server_lose_only_their_connection() {
    if !have_tools() {
        return;
    }
    let (env, want) = imported();
    let certs = Certs::make(&env.path("certs"), "DNS:localhost,IP:127.0.0.1");
    let (agent, addr) = tls_agent(&env, &certs, &["--client-timeout", "1s"]);
    // An option in clear is answered TLS_REQD.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec();
    opt.extend_from_slice(&3u32.to_be_bytes()); // LIST
    opt.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&opt).unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_be_bytes(reply[12..16].try_into().unwrap()), (1 << 31) + 5, "NBD_REP_ERR_TLS_REQD");
    // A client that stops after STARTTLS is dropped after the timeout.
    let started = Instant::now();
    let mut silent = start_tls_by_hand(&addr);
    assert!(closed(&mut silent));
    assert!(started.elapsed() < Duration::from_secs(8));
    // Garbage instead of a TLS handshake closes that connection.
    let mut garbage = start_tls_by_hand(&addr);
    garbage.write_all(&pseudo_random(4096, 9)).unwrap();
    assert!(closed(&mut garbage));
    // EXPORT_NAME before STARTTLS cannot be refused with an error: closed.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.read_exact(&mut hello).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec();
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(&2u32.to_be_bytes());
    opt.extend_from_slice(b"bb");
    s.write_all(&opt).unwrap();
    assert!(closed(&mut s));
    // Others carry on.
    let out = env.path("after.raw");
    run(Command::new("nbdcopy").arg(nbds(&addr, "bb", &certs.client("tenant-a"))).arg(&out));
    assert!(std::fs::read(&out).unwrap() == want);
    assert!(agent.metric("tessera_nbd_clients_timed_out_total") >= 1.0);
}

#[test]
fn the_cache_tier_over_tls_serves_cold_agents_and_refuses_a_wrong_ca() {
    if !have_tools() {
        return;
    }
    let (env, want) = imported();
    let certs = Certs::make(&env.path("certs"), "DNS:localhost,IP:127.0.0.1");
    let token = env.path("token");
    std::fs::write(&token, "tls-token\n").unwrap();
    let mut nodes = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..5 {
        let ready = env.path(&format!("node{i}.ready"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["cachenode", "--listen", "127.0.0.1:0", "--ready-file", ready.to_str().unwrap(), "--token-file", token.to_str().unwrap()])
            .args(["--tls-cert", &certs.file("server-cert.pem"), "--tls-key", &certs.file("server-key.pem"), "--dir"])
            .arg(env.path(&format!("node{i}")))
            .spawn()
            .unwrap();
        let bound = wait_ready(&ready, &mut child, "tessera cachenode");
        addrs.push(bound["listen"].as_str().unwrap().to_owned());
        nodes.push(Killed(child));
    }
    let list = addrs.join(",");
    let agent = |name: &str, ca: &str| {
        let cache = env.path(&format!("cache-{name}"));
        Served::start_at(
            &env,
            &format!("{name}.sock"),
            &["--cache-dir", cache.to_str().unwrap(), "--cache-nodes", &list, "--token-file", token.to_str().unwrap(), "--cache-tls-ca", ca],
        )
    };
    let read = |a: &Served, out: &str| {
        let out = env.path(out);
        run(Command::new("nbdcopy").arg(a.uri("bb")).arg(&out));
        std::fs::read(&out).unwrap()
    };
    let reads = |a: &Served, source: &str| a.metric(&format!("tessera_chunk_reads_total{{source=\"{source}\"}}"));
    let warm = agent("warm", &certs.file("ca-cert.pem"));
    assert!(read(&warm, "warm.raw") == want);
    let stored = reads(&warm, "origin");
    let deadline = Instant::now() + Duration::from_secs(30);
    while warm.metric("tessera_cache_tier_pending") > 0.0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(warm.metric("tessera_cache_tier_stored_total"), stored);
    warm.stop();
    let cold = agent("cold", &certs.file("ca-cert.pem"));
    assert!(read(&cold, "cold.raw") == want);
    assert_eq!(reads(&cold, "origin"), 0.0, "everything from the tier, over TLS");
    assert_eq!(reads(&cold, "cache"), stored);
    cold.stop();
    // An agent that trusts another CA cannot talk to the nodes: it reads
    // everything from the origin, and says why.
    let wrong = agent("wrong", &certs.file("other-ca-cert.pem"));
    assert!(read(&wrong, "wrong.raw") == want);
    assert_eq!(reads(&wrong, "cache"), 0.0);
    assert!(wrong.metric(&format!("tessera_cache_tier_node_errors_total{{node=\"{}\"}}", addrs[0])) > 0.0);
    drop(nodes);
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
