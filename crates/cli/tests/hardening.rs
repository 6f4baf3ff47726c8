//! An operator's mistakes and hostile clients, against the real binary:
//! nothing may lose data, and nothing a client does may take the agent down.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::nbd::RawClient;
use common::oci::{layout, tar_of, Blob, Comp};
use common::*;

fn have_tools() -> bool {
    have_image_tools() && require("nbdcopy", "libnbd-bin")
}

/// A busybox image `bb` (a 64 MiB disk, mostly holes) in a fresh home.
fn imported() -> Env {
    let env = Env::new();
    let layout = env.path("layout");
    busybox_layout(&layout, "bb");
    env.import(&format!("oci:{}:bb", layout.display()), "bb", &[]);
    env
}

/// Stored chunk files (and temporaries) under the store.
fn chunk_files(home: &Path) -> usize {
    let Ok(dirs) = std::fs::read_dir(home.join("chunks")) else { return 0 };
    dirs.flatten().filter(|d| d.path().is_dir()).map(|d| std::fs::read_dir(d.path()).unwrap().count()).sum()
}

/// `tessera ARGS` that must fail within 30 s; its output.
fn fails(env: &Env, args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .env("TESSERA_HOME", env.home())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tessera {args:?} kept running instead of failing");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2), "tessera {args:?} should fail:\n{}", text(&out));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_cache_dir_that_shares_the_store_is_refused_and_the_store_is_kept() {
    if !have_tools() {
        return;
    }
    let env = imported();
    let home = env.home();
    let before = chunk_files(&home);
    assert!(before > 0);
    for dir in [home.clone(), home.join("chunks"), home.join("chunks/.."), env.dir.path().to_path_buf()] {
        let err =
            fails(&env, &["serve", "--nbd", &format!("unix:{}", env.path("x.sock").display()), "--cache-dir", dir.to_str().unwrap(), "--cache-disk", "4MiB"]);
        assert!(err.contains("store") && err.contains("--cache-dir"), "{err}");
    }
    // A directory of someone else's files is refused too, and left alone.
    let other = env.path("other");
    std::fs::create_dir_all(other.join("chunks/ab")).unwrap();
    std::fs::write(other.join("chunks/ab").join("ab".repeat(32)), b"not yours").unwrap();
    let err = fails(&env, &["serve", "--nbd", &format!("unix:{}", env.path("y.sock").display()), "--cache-dir", other.to_str().unwrap(), "--cache-disk", "1"]);
    assert!(err.contains("is not a tessera disk cache"), "{err}");
    assert!(other.join("chunks/ab").join("ab".repeat(32)).exists());
    assert_eq!(chunk_files(&home), before, "not one chunk of the store was deleted");
    env.ok(&["verify", "bb"]);
}

/// Sends 64 reads of 32 MiB on `export` and never reads a reply.
fn flood(socket: &Path, export: &str) -> RawClient {
    let mut c = RawClient::go(socket, export).expect("the export opens");
    let _ = c.0.set_write_timeout(Some(Duration::from_secs(5)));
    for _ in 0..64 {
        if c.0.write_all(&read_request(0, 32 << 20)).is_err() {
            break;
        }
    }
    c
}

fn read_request(offset: u64, len: u32) -> Vec<u8> {
    let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&9u64.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m
}

#[test]
fn flooding_clients_get_back_pressure_not_memory_and_are_dropped_when_they_stall() {
    if !have_tools() {
        return;
    }
    let env = imported();
    let agent = Served::start(&env, &["--cache-mem", "64MiB", "--buffer-memory", "128MiB", "--client-timeout", "2s"]);
    let idle = agent.rss();
    let flooders: Vec<RawClient> = (0..4).map(|_| flood(&agent.socket, "bb")).collect();
    // Everything 4 x 64 x 32 MiB asks for would be 8 GiB; the server holds
    // at most its buffer bound, plus the caches and itself.
    let bound = (64 << 20) + (128 << 20) + (64 << 20);
    let mut peak = 0;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        peak = peak.max(agent.rss());
        assert!(agent.metric("tessera_nbd_buffer_bytes") <= (128 << 20) as f64);
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("4 flooding clients: RSS idle {} MiB, peak {} MiB", idle >> 20, peak >> 20);
    assert!(peak <= bound, "RSS peaked at {} MiB (idle {} MiB), bound {} MiB", peak >> 20, idle >> 20, bound >> 20);
    // The stalled clients are dropped, one timeout after another, and an
    // honest client is then served.
    let deadline = Instant::now() + Duration::from_secs(60);
    while agent.metric("tessera_nbd_clients_timed_out_total") < 4.0 {
        assert!(Instant::now() < deadline, "the stalled clients were never dropped");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = env.path("after.raw");
    run(Command::new("nbdcopy").arg(agent.uri("bb")).arg(&out));
    let raw = env.path("bb.raw");
    env.ok(&["export", "bb", raw.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&raw).unwrap());
    drop(flooders);
}

#[test]
fn connections_past_the_limit_are_closed_and_counted() {
    if !have_tools() {
        return;
    }
    let env = imported();
    let agent = Served::start(&env, &["--max-connections", "4"]);
    let held: Vec<RawClient> = (0..4).map(|_| RawClient::go(&agent.socket, "bb").unwrap()).collect();
    let mut fifth = RawClient::connect_raw(&agent.socket);
    assert!(fifth.closed(), "the fifth connection is closed at once");
    assert_eq!(agent.metric("tessera_nbd_connections_refused_total"), 1.0);
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.metric("tessera_nbd_connections") > 0.0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(RawClient::go(&agent.socket, "bb").is_some(), "room again once they left");
    // A client that never finishes its handshake is dropped after the timeout.
    let agent = Served::start_at(&env, "slow.sock", &["--client-timeout", "1s"]);
    let mut silent = RawClient::connect(&agent.socket);
    assert!(silent.closed());
    assert_eq!(agent.metric("tessera_nbd_clients_timed_out_total"), 1.0);
}

#[test]
fn label_connections_leave_no_descriptors_and_probes_write_nothing() {
    if !have_tools() {
        return;
    }
    let env = imported();
    let agent = Served::start(&env, &[]);
    let overlays = env.home().join("cache/overlays");
    // Warm up: the first connection opens the image's disk for good.
    let mut c = RawClient::go(&agent.socket, "bb").unwrap();
    c.request(0, 0, 4096);
    assert_eq!(c.read_reply(4096), 0);
    drop(c);
    std::thread::sleep(Duration::from_millis(200));
    let idle = agent.descriptors();
    for i in 0..600 {
        let mut c = RawClient::go(&agent.socket, &format!("bb@probe{i}")).expect("a label opens");
        c.request(0, 4096 * i, 4096);
        assert_eq!(c.read_reply(4096), 0);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.metric("tessera_nbd_connections") > 0.0 || agent.metric("tessera_overlays_open") > 0.0 {
        assert!(Instant::now() < deadline, "connections or overlays stayed open");
        std::thread::sleep(Duration::from_millis(20));
    }
    settle_descriptors(&agent, idle, "600 label connections");
    assert!(std::fs::read_dir(&overlays).map(|d| d.count()).unwrap_or(0) == 0, "reading a label made an overlay on disk");

    // A write makes the overlay; it closes with its connection and keeps the write.
    let mut c = RawClient::go(&agent.socket, "bb@kept").unwrap();
    c.request(1, 0, 4096);
    c.0.write_all(&[0x5a; 4096]).unwrap();
    assert_eq!(c.simple_error(), 0);
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.metric("tessera_overlays_open") > 0.0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    settle_descriptors(&agent, idle, "a write to a label");
    assert!(overlays.join("bb@kept/map").exists(), "the overlay was made and its map saved on close");
    let mut c = RawClient::go(&agent.socket, "bb@kept").unwrap();
    c.request(0, 0, 4096);
    assert_eq!(c.read_reply_data(4096), vec![0x5a; 4096]);
}

/// Waits (up to 5 s) for the agent's descriptors to come back to `idle`:
/// a socket of a metrics request just answered may still be closing.
fn settle_descriptors(agent: &Served, idle: usize, after: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while agent.descriptors() > idle {
        assert!(Instant::now() < deadline, "{} descriptors after {after}, {idle} before", agent.descriptors());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_damaged_overlay_map_is_refused_not_read_as_zeros() {
    if !have_tools() || !require("qemu-io", "qemu-utils") {
        return;
    }
    let env = imported();
    let agent = Served::start(&env, &[]);
    run(Command::new("qemu-io").args(["-f", "raw", &agent.uri("bb@m"), "-c", "write -P 0x77 0 8192", "-c", "flush"]));
    agent.stop();
    let map = env.home().join("cache/overlays/bb@m/map");
    let mut bytes = std::fs::read(&map).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x10;
    std::fs::write(&map, bytes).unwrap();
    let agent = Served::start(&env, &[]);
    assert!(RawClient::go(&agent.socket, "bb@m").is_none(), "a label whose map is damaged does not open");
    assert!(RawClient::go(&agent.socket, "bb").is_some(), "the image and other labels still do");
    assert!(RawClient::go(&agent.socket, "bb@other").is_some());
}

#[test]
fn a_missing_keyring_is_a_clear_error_and_no_command_makes_one() {
    if !have_tools() {
        return;
    }
    let env = imported();
    let keyring = env.home().join("keyring.json");
    let backup = env.path("keyring.backup");
    std::fs::rename(&keyring, &backup).unwrap();
    let layout = env.path("layout");
    let out_file = env.path("out.img");
    let sock = format!("unix:{}", env.path("k.sock").display());
    for args in [
        vec!["images"],
        vec!["inspect", "bb"],
        vec!["verify", "bb"],
        vec!["export", "bb", out_file.to_str().unwrap()],
        vec!["profile", "bb"],
        vec!["serve", "--nbd", &sock],
        vec!["import", &format!("oci:{}:bb", layout.display()), "--name", "again"],
    ] {
        let err = fails(&env, &args);
        assert!(err.contains("keyring") && err.contains(keyring.to_str().unwrap()) && err.contains("missing"), "{args:?}: {err}");
        assert!(!keyring.exists(), "tessera {args:?} made a keyring");
    }
    // An explicit init makes one; a second is refused; the backup, restored, opens everything.
    env.ok(&["keyring", "init"]);
    let err = fails(&env, &["keyring", "init"]);
    assert!(err.contains("never replaced"), "{err}");
    std::fs::rename(&backup, &keyring).unwrap();
    env.ok(&["verify", "bb"]);
    // A fresh store: read-only commands write nothing at all.
    let fresh = Env::new();
    fresh.ok(&["images"]);
    assert!(!fresh.home().exists(), "tessera images wrote to an empty home");
}

#[test]
fn a_corrupt_name_file_is_skipped_with_a_warning() {
    if !have_tools() {
        return;
    }
    let env = imported();
    let src = format!("oci:{}:bb", env.path("layout").display());
    env.import(&src, "second", &[]);
    std::fs::write(env.home().join("images/second.json"), b"{ broken").unwrap();
    let out = env.tessera(&["images", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("second"), "the bad entry is named:\n{}", text(&out));
    assert_eq!(env.image_names(), vec!["bb"]);
    // The agent exports the good image and names the bad one.
    let agent = Served::start(&env, &[]);
    let list = run(Command::new("nbdinfo").args(["--list", "--json", &agent.uri("")]));
    assert!(String::from_utf8_lossy(&list.stdout).contains("\"bb\""));
    agent.stop();
    // Re-importing over a name succeeds while another name is broken (its
    // old manifest is kept rather than risked).
    let report = env.import(&src, "bb", &[]);
    assert!(report["warnings"].as_array().unwrap().iter().any(|w| w.as_str().unwrap().contains("was kept")), "{report}");
    // rm of the broken name works and says what it left.
    let out = env.tessera(&["rm", "second"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("could not be read"), "{}", text(&out));
    let out = env.tessera(&["rm", "second", "bb"]);
    assert_eq!(out.status.code(), Some(2), "a name that was not there fails");
    assert!(env.image_names().is_empty(), "the other name was removed all the same");
}

/// An image with a large incompressible layer, so an import takes a while.
fn big_layout(env: &Env) -> String {
    let data = pseudo_random(256 << 20, 0x9E37_79B9_7F4A_7C15);
    let dir = env.path("big");
    layout(&dir, "t", &[Blob::from_tar(&tar_of(&[("data.bin", &data)]), Comp::None)]);
    format!("oci:{}:t", dir.display())
}

fn staged(home: &Path) -> usize {
    std::fs::read_dir(home.join("chunks/.staging")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn an_interrupted_import_or_export_leaves_no_temporaries() {
    let env = Env::new();
    let src = big_layout(&env);
    for (signal, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["import", &src, "--name", "big"])
            .env("TESSERA_HOME", env.home())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while staged(&env.home()) < 8 {
            assert!(Instant::now() < deadline, "the import never staged chunks");
            assert!(child.try_wait().unwrap().is_none(), "the import finished before it could be interrupted");
            std::thread::sleep(Duration::from_millis(5));
        }
        // SAFETY: kill takes a pid and a signal number.
        unsafe { libc::kill(child.id() as i32, signal) };
        assert_eq!(child.wait().unwrap().code(), Some(code));
        assert_eq!(staged(&env.home()), 0, "the interrupted import removed its temporaries");
        assert!(env.image_names().is_empty());
    }
    // kill -9 cannot clean up: the next command does.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["import", &src, "--name", "big"])
        .env("TESSERA_HOME", env.home())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while staged(&env.home()) < 8 {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(staged(&env.home()) > 0);
    env.ok(&["images"]);
    assert_eq!(staged(&env.home()), 0, "the next command removed what the killed one left");

    // An export interrupted mid-way leaves no file.
    env.import(&src, "big", &[]);
    let out = env.path("big.raw");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["export", "big", out.to_str().unwrap()])
        .env("TESSERA_HOME", env.home())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let partial = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).filter(|p| p.to_string_lossy().contains(".big.raw.tmp")).collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while partial(env.dir.path()).is_empty() {
        assert!(Instant::now() < deadline && child.try_wait().unwrap().is_none(), "the export never started");
        std::thread::sleep(Duration::from_millis(2));
    }
    // SAFETY: kill takes a pid and a signal number.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    if status.code() == Some(130) {
        assert!(partial(env.dir.path()).is_empty() && !out.exists(), "the interrupted export left a file");
    }
}

/// Five cache nodes and a cold agent; the image's stripes in the tier.
#[test]
fn cache_nodes_refuse_malformed_stripes_and_repair_poisoned_ones_without_benching() {
    if !have_tools() {
        return;
    }
    let env = Env::new();
    let layout = env.path("layout");
    busybox_layout(&layout, "bb");
    add_layer(&layout, "bb", "data", &[("data/blob", &pseudo_random(12 << 20, 5))]);
    env.import(&format!("oci:{}:data", layout.display()), "bb", &[]);
    let want = {
        let raw = env.path("bb.raw");
        env.ok(&["export", "bb", raw.to_str().unwrap()]);
        std::fs::read(raw).unwrap()
    };
    let mut nodes = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..5 {
        let ready = env.path(&format!("node{i}.ready"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["cachenode", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--ready-file", ready.to_str().unwrap(), "--dir"])
            .arg(env.path(&format!("node{i}")))
            .spawn()
            .unwrap();
        let bound = wait_ready(&ready, &mut child, "tessera cachenode");
        addrs.push(bound["listen"].as_str().unwrap().to_owned());
        nodes.push(KillOnDrop(child));
    }
    let node0 = addrs[0].clone();
    let path = format!("/v1/stripes/{}", "cd".repeat(32));
    // Malformed stripes are refused and not kept.
    assert_eq!(http_send(&node0, "PUT", &path, "", b""), 400);
    assert_eq!(http_send(&node0, "PUT", &path, "", b"TSTR garbage that is no stripe"), 400);
    assert!(http_get_body(&node0, &path).is_none());

    let list = addrs.join(",");
    let cache = |n: &str| env.path(&format!("cache-{n}")).to_str().unwrap().to_owned();
    let warm = Served::start_at(&env, "warm.sock", &["--cache-dir", &cache("warm"), "--cache-nodes", &list]);
    run(Command::new("nbdcopy").arg(warm.uri("bb")).arg(env.path("warm.raw")));
    let deadline = Instant::now() + Duration::from_secs(30);
    while warm.metric("tessera_cache_tier_pending") > 0.0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    warm.stop();

    // Poison 12 of node 0's stripes: well formed, wrong bytes.
    let stripes: Vec<PathBuf> = std::fs::read_dir(env.path("node0/stripes"))
        .unwrap()
        .flatten()
        .filter(|d| d.path().is_dir())
        .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten().map(|f| f.path()))
        .collect();
    assert!(stripes.len() >= 12);
    let mut poisoned = Vec::new();
    for f in stripes.iter().take(12) {
        let chunk = f.file_name().unwrap().to_str().unwrap().to_owned();
        let p = format!("/v1/stripes/{chunk}");
        let mut s = http_get_body(&node0, &p).expect("node 0 has the stripe");
        let at = s.len() - 7;
        s[at] ^= 0x5a;
        assert_eq!(http_send(&node0, "PUT", &p, "", &s), 204);
        s[at] ^= 0x5a;
        poisoned.push((p, s));
    }
    let reader = Served::start_at(&env, "cold.sock", &["--cache-dir", &cache("cold"), "--cache-nodes", &list]);
    let out = env.path("cold.raw");
    run(Command::new("nbdcopy").arg(reader.uri("bb")).arg(&out));
    assert!(std::fs::read(&out).unwrap() == want);
    assert_eq!(reader.metric("tessera_chunk_reads_total{source=\"origin\"}"), 0.0);
    let caught = reader.metric(&format!("tessera_cache_tier_node_corrupt_total{{node=\"{node0}\"}}"));
    assert!(caught > 0.0, "no poisoned stripe was caught");
    // One bad stripe is repaired; it does not bench the node.
    assert_eq!(reader.metric(&format!("tessera_cache_tier_node_up{{node=\"{node0}\"}}")), 1.0);
    assert_eq!(reader.metric(&format!("tessera_cache_tier_node_errors_total{{node=\"{node0}\"}}")), 0.0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while reader.metric("tessera_cache_tier_pending") > 0.0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(reader.metric("tessera_cache_tier_stripes_repaired_total") >= caught);
    let repaired = poisoned.iter().filter(|(p, good)| http_get_body(&node0, p).as_ref() == Some(good)).count();
    assert!(repaired as f64 >= caught, "{repaired} stripes repaired, {caught} caught");

    // A node that cannot keep a stripe on disk says so and does not serve it.
    if is_root() {
        let small = env.path("small");
        std::fs::create_dir_all(&small).unwrap();
        run(Command::new("mount").args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"]).arg(&small));
        let ready = env.path("small.ready");
        let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["cachenode", "--listen", "127.0.0.1:0", "--ready-file", ready.to_str().unwrap(), "--dir"])
            .arg(small.join("node"))
            .spawn()
            .unwrap();
        let addr = wait_ready(&ready, &mut child, "tessera cachenode")["listen"].as_str().unwrap().to_owned();
        let _node = KillOnDrop(child);
        let mut full = None;
        for (i, (_, good)) in poisoned.iter().enumerate() {
            let p = format!("/v1/stripes/{}", format!("{i:02x}").repeat(32));
            match http_send(&addr, "PUT", &p, "", good) {
                204 => {}
                507 => {
                    full = Some(p);
                    break;
                }
                other => panic!("PUT answered {other}"),
            }
        }
        let full = full.expect("a 256 KiB disk fills up");
        assert!(http_get_body(&addr, &full).is_none(), "a stripe refused with 507 is not served either");
        drop(_node);
        let _ = Command::new("umount").arg(&small).status();
    }

    // Off loopback, a node needs a token.
    let out = Command::new(env!("CARGO_BIN_EXE_tessera")).args(["cachenode", "--listen", "0.0.0.0:0", "--dir"]).arg(env.path("open-node")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--token-file"), "{}", text(&out));
    drop(nodes);
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Mixed clients against one agent for `TESSERA_SOAK_SECONDS` (default 30
/// minutes): readers, writers to labels, connects and disconnects, one
/// flooding client; RSS and descriptors are sampled and must stay bounded.
/// Opt-in: `sh scripts/test.sh --soak`.
#[test]
#[ignore = "a 30-minute soak; run with scripts/test.sh --soak"]
fn soak() {
    assert!(have_tools(), "the soak needs its tools");
    let seconds: u64 = std::env::var("TESSERA_SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(1800);
    let env = imported();
    let agent = Served::start(&env, &["--cache-mem", "64MiB", "--buffer-memory", "64MiB", "--client-timeout", "5s"]);
    let socket = agent.socket.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let errors = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..6u64 {
        let (socket, stop, errors) = (socket.clone(), stop.clone(), errors.clone());
        workers.push(std::thread::spawn(move || {
            let mut state = 0x1234_5678 + w;
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let ok = match w {
                    // Readers of the image.
                    0 | 1 => RawClient::go(&socket, "bb").map(|mut c| {
                        c.request(0, (state % 4096) * 4096, 65536);
                        c.read_reply(65536) == 0
                    }),
                    // Writers to a few labels.
                    2 | 3 => RawClient::go(&socket, &format!("bb@soak{}", state % 8)).map(|mut c| {
                        c.request(1, (state % 1024) * 4096, 4096);
                        c.0.write_all(&[w as u8; 4096]).is_ok() && c.simple_error() == 0
                    }),
                    // Connect, probe a fresh label, go.
                    4 => RawClient::go(&socket, &format!("bb@probe{n}")).map(|_| true),
                    // A flooding client, over and over.
                    _ => {
                        let c = flood(&socket, "bb");
                        std::thread::sleep(Duration::from_secs(1));
                        drop(c);
                        Some(true)
                    }
                };
                if ok != Some(true) {
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    let started = Instant::now();
    let (mut peak_rss, mut peak_fds) = (0, 0);
    while started.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_secs(1));
        peak_rss = peak_rss.max(agent.rss());
        peak_fds = peak_fds.max(agent.descriptors());
        assert!(peak_rss <= (64 + 64 + 128) << 20, "RSS reached {} MiB", peak_rss >> 20);
        assert!(peak_fds <= 200, "{peak_fds} descriptors open");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    eprintln!(
        "soak: {seconds} s, peak RSS {} MiB, peak descriptors {peak_fds}, client errors {}",
        peak_rss >> 20,
        errors.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(RawClient::go(&socket, "bb").is_some(), "the agent still serves");
}
