//! The worker agent with real NBD clients: nbdinfo, nbdcopy, qemu-img, qemu-io.

mod common;

use std::io::Write;
use std::process::Command;

use common::nbd::RawClient;
use common::*;

fn have_tools() -> bool {
    have_image_tools()
        && require("nbdcopy", "libnbd-bin")
        && require("nbdinfo", "libnbd-bin")
        && require("qemu-img", "qemu-utils")
        && require("qemu-io", "qemu-utils")
}

/// An image imported into a fresh home, and its `tessera export`.
fn imported() -> (Env, Vec<u8>) {
    let env = Env::new();
    let layout = env.path("layout");
    busybox_layout(&layout, "bb");
    env.import(&format!("oci:{}:bb", layout.display()), "bb", &[]);
    let raw = env.path("bb.raw");
    env.ok(&["export", "bb", raw.to_str().unwrap()]);
    let bytes = std::fs::read(&raw).unwrap();
    (env, bytes)
}

fn nbdcopy(uri: &str, out: &std::path::Path) -> Vec<u8> {
    run(Command::new("nbdcopy").arg(uri).arg(out));
    std::fs::read(out).unwrap()
}

#[test]
fn exports_read_as_the_exported_image() {
    if !have_tools() {
        return;
    }
    let (env, want) = imported();
    let agent = Served::start(&env, &[]);
    let list = run(Command::new("nbdinfo").arg("--list").arg(agent.uri("")));
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(list.contains("export=\"bb\""), "{list}");
    assert!(list.contains("base:allocation"), "{list}");
    assert!(list.contains("is_read_only: true"), "{list}");

    assert!(nbdcopy(&agent.uri("bb"), &env.path("copy.raw")) == want, "nbdcopy differs from tessera export");
    let q = env.path("qemu.raw");
    run(Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(agent.uri("bb")).arg(&q));
    assert!(std::fs::read(&q).unwrap() == want, "qemu-img convert differs from tessera export");
    assert!(agent.metric("tessera_chunk_reads_total{source=\"origin\"}") > 0.0);

    // Block status: holes are reported as holes (nbdinfo --map uses base:allocation).
    let map = run(Command::new("nbdinfo").arg("--map").arg(agent.uri("bb")));
    let map = String::from_utf8_lossy(&map.stdout);
    assert!(map.contains("hole,zero") && map.contains("data"), "{map}");

    // An image imported while the agent runs is exported at once.
    let layout = env.path("layout");
    env.import(&format!("oci:{}:bb", layout.display()), "late", &[]);
    assert!(nbdcopy(&agent.uri("late"), &env.path("late.raw")) == want);

    // Reads of a read-only export succeed; writes are refused.
    let out = Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x11 0 4096"]).arg(agent.uri("bb")).output().unwrap();
    assert!(
        !out.status.success() || String::from_utf8_lossy(&out.stderr).contains("ermission") || String::from_utf8_lossy(&out.stdout).contains("ermission"),
        "{}",
        text(&out)
    );
}

fn qemu_io(uri: &str, cmds: &[&str]) -> std::process::Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    let out = c.output().unwrap();
    let all = text(&out);
    assert!(out.status.success() && !all.contains("Pattern verification failed") && !all.contains("error"), "qemu-io {cmds:?}:\n{all}");
    out
}

#[test]
fn tcp_listeners_serve_too() {
    if !have_tools() {
        return;
    }
    let (env, want) = imported();
    let agent = Served::start(&env, &["--nbd", "127.0.0.1:0"]);
    let addr = agent.nbd.iter().find(|a| !a.starts_with("unix:")).expect("the TCP listener is reported").clone();
    assert!(nbdcopy(&format!("nbd://{addr}/bb"), &env.path("tcp.raw")) == want);
    qemu_io(&format!("nbd://{addr}/bb@tcp"), &["write -P 0x5a 0 4096", "read -P 0x5a 0 4096"]);
}

#[test]
fn labels_are_private_copy_on_write_views() {
    if !have_tools() {
        return;
    }
    let (env, want) = imported();
    let agent = Served::start(&env, &[]);
    qemu_io(&agent.uri("bb@a"), &["write -P 0xab 0 65536", "write -P 0xcd 70000 3000", "flush"]);
    qemu_io(&agent.uri("bb@a"), &["read -P 0xab 0 65536", "read -P 0xcd 70000 3000"]);
    // Bytes around the unaligned write are the image's.
    let mut view = vec![0u8; 80_000];
    let out = env.path("a.raw");
    let a = nbdcopy(&agent.uri("bb@a"), &out);
    view.copy_from_slice(&a[..80_000]);
    assert!(view[..65536].iter().all(|&b| b == 0xab));
    assert_eq!(&view[65536..70000], &want[65536..70000]);
    assert!(view[70000..73000].iter().all(|&b| b == 0xcd));
    assert_eq!(&view[73000..80000], &want[73000..80000]);
    assert_eq!(&a[80_000..], &want[80_000..]);

    // The image and another label are untouched.
    assert!(nbdcopy(&agent.uri("bb"), &env.path("bb.copy")) == want);
    assert!(nbdcopy(&agent.uri("bb@b"), &env.path("b.copy")) == want);

    // Zeroing and trimming land in the overlay too.
    qemu_io(&agent.uri("bb@b"), &["write -z 4096 8192", "discard 16384 4096", "read -P 0 4096 8192", "flush"]);

    // The overlay outlives reconnects and a restart of the agent.
    agent.stop();
    let agent = Served::start(&env, &[]);
    qemu_io(&agent.uri("bb@a"), &["read -P 0xab 0 65536", "read -P 0xcd 70000 3000"]);
    env.ok(&["verify", "bb"]);
}

#[test]
fn a_restarted_agent_serves_from_its_disk_cache_and_drops_corrupt_copies() {
    if !have_tools() {
        return;
    }
    let (env, want) = imported();
    let agent = Served::start(&env, &[]);
    assert!(nbdcopy(&agent.uri("bb"), &env.path("1.raw")) == want);
    let from_origin = agent.metric("tessera_chunk_reads_total{source=\"origin\"}");
    assert!(from_origin > 0.0);
    agent.stop();

    let agent = Served::start(&env, &[]);
    assert!(nbdcopy(&agent.uri("bb"), &env.path("2.raw")) == want);
    assert_eq!(agent.metric("tessera_chunk_reads_total{source=\"origin\"}"), 0.0, "a restarted agent reads its disk cache, not the origin");
    assert!(agent.metric("tessera_chunk_reads_total{source=\"disk\"}") > 0.0);
    agent.stop();

    // Corrupt one cached chunk: it is detected, dropped and fetched again.
    let cache = env.home().join("cache/chunks");
    let victim = std::fs::read_dir(&cache).unwrap().flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap()).map(|e| e.unwrap().path()).next().unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&victim, bytes).unwrap();
    let agent = Served::start(&env, &[]);
    assert!(nbdcopy(&agent.uri("bb"), &env.path("3.raw")) == want, "corrupt cached bytes were served");
    assert_eq!(agent.metric("tessera_cache_corrupt_total"), 1.0);
    assert_eq!(agent.metric("tessera_chunk_reads_total{source=\"origin\"}"), 1.0);
}

#[test]
fn thirty_two_clients_at_once() {
    if !have_tools() {
        return;
    }
    let (env, want) = imported();
    let agent = Served::start(&env, &["--origin-concurrency", "4"]);
    let children: Vec<_> = (0..32)
        .map(|i| {
            let out = env.path(&format!("c{i}.raw"));
            let export = if i % 2 == 0 { "bb".to_string() } else { format!("bb@c{i}") };
            (Command::new("nbdcopy").arg(agent.uri(&export)).arg(&out).spawn().unwrap(), out)
        })
        .collect();
    for (mut child, out) in children {
        assert!(child.wait().unwrap().success());
        assert!(std::fs::read(&out).unwrap() == want);
        std::fs::remove_file(out).unwrap();
    }
    assert!(agent.metric("tessera_nbd_connections_total") >= 32.0);
    assert_eq!(agent.metric("tessera_origin_requests_shed_total"), 0.0);
}

#[test]
fn malformed_requests_close_only_their_connection() {
    if !have_tools() {
        return;
    }
    let (env, want) = imported();
    let agent = Served::start(&env, &[]);
    let size = want.len() as u64;

    let mut c = RawClient::open(&agent.socket, "bb");
    c.request(0, size - 10, 100);
    assert_eq!(c.simple_error(), 22, "a read past the end is EINVAL");
    c.request(1, 0, 4);
    c.0.write_all(b"abcd").unwrap();
    assert_eq!(c.simple_error(), 1, "a write to a read-only export is EPERM");
    c.request(42, 0, 0);
    assert_eq!(c.simple_error(), 22, "an unknown command is EINVAL");
    c.0.write_all(&[0xde; 28]).unwrap();
    assert!(c.closed(), "a bad request magic closes the connection");

    let mut c = RawClient::open(&agent.socket, "bb@x");
    c.request(1, 0, 1 << 30);
    assert!(c.closed(), "a 1 GiB write payload closes the connection");

    let mut c = RawClient::connect(&agent.socket);
    c.option(7, &[0, 0, 0, 200, b'x']);
    assert!(c.closed(), "a GO whose name runs past its payload closes the connection");

    let mut c = RawClient::connect(&agent.socket);
    c.0.write_all(&[0xff; 16]).unwrap();
    assert!(c.closed(), "an option without the magic closes the connection");

    let mut c = RawClient::connect(&agent.socket);
    c.option(1, b"no-such-image");
    assert!(c.closed());

    // Random bytes after the handshake, on many connections.
    for seed in 0..16 {
        let mut c = RawClient::open(&agent.socket, "bb");
        let _ = c.0.write_all(&pseudo_random(4096, seed));
        assert!(c.closed());
    }

    // The server and other clients carry on.
    assert!(nbdcopy(&agent.uri("bb"), &env.path("after.raw")) == want);
    assert!(agent.metric("tessera_nbd_protocol_errors_total") >= 4.0);
}

#[test]
fn fuse_file_loop_mounts_as_the_image_tree() {
    if !have_tools() || !is_root() || !std::path::Path::new("/dev/fuse").exists() || !require("fusermount3", "fuse3") {
        return;
    }
    let (env, _) = imported();
    let mounted = Mounted::start(&env, "bb", "ro");
    assert_eq!(std::fs::metadata(mounted.dir.join("bb")).unwrap().len(), std::fs::metadata(env.path("bb.raw")).unwrap().len());
    let bundle = env.path("unpacked");
    run(Command::new("umoci").args(["unpack", "--image", &format!("{}:bb", env.path("layout").display())]).arg(&bundle));
    let ours = tree::snapshot(&mounted.mountpoint, &["lost+found"]);
    let theirs = tree::snapshot(&bundle.join("rootfs"), &[]);
    assert_eq!(ours, theirs, "the loop-mounted FUSE file differs from umoci unpack");
    mounted.stop();
    assert!(!env.path("root-ro").join("lost+found").exists(), "the loop mount is gone after stop");

    // A label is writable through FUSE too, and keeps its writes.
    let rw = Mounted::start(&env, "bb@w", "rw");
    std::fs::write(rw.mountpoint.join("tmp/hello"), "written through fuse\n").unwrap();
    rw.stop();
    let again = Mounted::start(&env, "bb@w", "rw2");
    assert_eq!(std::fs::read_to_string(again.mountpoint.join("tmp/hello")).unwrap(), "written through fuse\n");
    again.stop();
    env.ok(&["verify", "bb"]);
}
