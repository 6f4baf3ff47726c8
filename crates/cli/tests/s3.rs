//! The origin on S3: a real S3-compatible server on loopback (moto), an
//! importer on one "host" (a TESSERA_HOME) and workers on others, sharing
//! one bucket and a copy of the keyring; and the server paused mid-import
//! and mid-read.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::oci::{layout, tar_of, Blob, Comp};
use common::s3::{use_store, Moto};
use common::*;

/// Host A imports busybox with 4 MiB of data into the bucket; returns A's
/// env, the source, and the image as `tessera export` writes it.
fn imported(url: &str) -> (Env, String, Vec<u8>) {
    use_store(url);
    let a = Env::new();
    let dir = a.path("layout");
    busybox_layout(&dir, "bb");
    add_layer(&dir, "bb", "data", &[("data/blob", &pseudo_random(4 << 20, 3))]);
    let src = format!("oci:{}:data", dir.display());
    a.import(&src, "bb", &[]);
    let raw = a.path("bb.raw");
    a.ok(&["export", "bb", raw.to_str().unwrap()]);
    let want = std::fs::read(&raw).unwrap();
    (a, src, want)
}

/// Another host: its own TESSERA_HOME, a copy of the keyring.
fn host_b(a: &Env) -> Env {
    let b = Env::new();
    std::fs::create_dir_all(b.home()).unwrap();
    std::fs::copy(a.home().join("keyring.json"), b.home().join("keyring.json")).unwrap();
    b
}

#[test]
fn an_importer_and_a_worker_on_other_hosts_share_one_bucket() {
    let Some(moto) = Moto::start() else { return };
    if !have_nbd_tools() {
        return;
    }
    let url = moto.bucket("shared", "");
    let (a, _, want) = imported(&url);
    assert!(!a.home().join("chunks").exists() && !a.home().join("images").exists(), "host A keeps no store of its own");
    let b = host_b(&a);
    assert_eq!(b.image_names(), vec!["bb"]);
    b.ok(&["verify", "bb"]);
    let served = Served::start(&b, &[]);
    let out = b.path("b.raw");
    run(Command::new("nbdcopy").arg(served.uri("bb")).arg(&out));
    assert!(std::fs::read(&out).unwrap() == want, "host B serves what host A imported");
    let stored = moto.keys("shared", "tessera/chunks/").len() as f64;
    assert_eq!(served.metric("tessera_chunk_reads_total{source=\"origin\"}"), stored);
    assert_eq!(served.metric("tessera_s3_requests_total{op=\"get\",object=\"chunk\"}"), stored, "one GET per chunk");
    served.stop();
    // Without the keyring, host C cannot open the images, and says why.
    let c = Env::new();
    let out = c.tessera(&["verify", "bb"]);
    assert!(!out.status.success() && text(&out).contains("keyring"), "{}", text(&out));
    // rm on host B removes the name for everyone.
    b.ok(&["rm", "bb"]);
    assert!(a.image_names().is_empty());
    assert!(moto.keys("shared", "tessera/manifests/").is_empty(), "the manifest went with its only name");
}

#[test]
fn a_worker_on_another_host_runs_the_entrypoint() {
    let Some(moto) = Moto::start() else { return };
    if !have_nbd_tools() || !require("qemu-system-x86_64", "qemu-system-x86") || !require("apt-get", "apt") {
        return;
    }
    let url = moto.bucket("runs", "");
    let (a, _, _) = imported(&url);
    let b = host_b(&a);
    let out = tessera_run(&b.home(), &["bb", "--accel", "tcg", "--json", "--no-profile"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("hello from tessera\n"), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert!(report["chunks_fetched"]["origin"].as_u64().unwrap() > 0, "{report}");
}

#[test]
fn a_server_paused_mid_import_fails_it_cleanly_and_a_rerun_dedups() {
    let Some(moto) = Moto::start() else { return };
    let url = moto.bucket("paused", "&timeout=2s");
    use_store(&url);
    let env = Env::new();
    let data = pseudo_random(48 << 20, 0x5EED);
    let dir = env.path("big");
    layout(&dir, "t", &[Blob::from_tar(&tar_of(&[("data.bin", &data)]), Comp::None)]);
    let src = format!("oci:{}:t", dir.display());
    let log = env.path("import.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["import", &src, "--name", "big", "--json"])
        .env("TESSERA_HOME", env.home())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while moto.requests("PUT /paused/tessera/chunks/") < 8 {
        assert!(Instant::now() < deadline, "the import never stored a chunk");
        assert!(child.try_wait().unwrap().is_none(), "the import finished before the pause");
        std::thread::sleep(Duration::from_millis(10));
    }
    moto.pause();
    let status = child.wait().unwrap();
    moto.resume();
    let err = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains(&moto.addr) && err.contains("s3://paused/tessera/"), "the error names the server and the object:\n{err}");
    assert!(env.image_names().is_empty(), "nothing half-written is visible");
    assert!(moto.keys("paused", "tessera/images/").is_empty());
    // Again, with the server back: it completes, and what was stored is a dedup hit.
    let report = env.import(&src, "big", &[]);
    assert!(report["new_chunks"].as_u64().unwrap() < report["chunks"].as_u64().unwrap() - report["holes"].as_u64().unwrap(), "{report}");
    env.ok(&["verify", "big"]);
}

#[test]
fn a_server_paused_mid_read_fails_reads_with_eio_and_they_resume() {
    let Some(moto) = Moto::start() else { return };
    if !have_nbd_tools() {
        return;
    }
    let url = moto.bucket("reads", "&timeout=1s");
    let (a, _, want) = imported(&url);
    let served = Served::start(&a, &[]);
    // A client connected before the server pauses, as a running VM is.
    let mut client = common::nbd::RawClient::go(&served.socket, "bb").expect("the export opens");
    client.request(0, 0, 4096);
    assert_eq!(client.read_reply(4096), 0);
    moto.pause();
    let started = Instant::now();
    // A chunk with data that nothing has read yet: the last one.
    let chunk = 512 << 10;
    let offset = (1..want.len() / chunk).rev().find(|i| want[i * chunk..(i + 1) * chunk].iter().any(|&b| b != 0)).unwrap() as u64 * chunk as u64;
    client.request(0, offset, 65536);
    assert_eq!(client.read_reply(65536), 5, "a read with the origin gone is EIO, never wrong bytes");
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    assert!(served.metric("tessera_origin_request_errors_total{kind=\"unavailable\"}") > 0.0);
    // A new connection meanwhile still opens the image (its name cannot
    // be looked up, but the version open is served).
    assert!(common::nbd::RawClient::go(&served.socket, "bb").is_some());
    moto.resume();
    // The server is back: the same read succeeds, and every byte is right.
    client.request(0, offset, 65536);
    assert_eq!(client.read_reply_data(65536)[..], want[offset as usize..offset as usize + 65536]);
    let copy = a.path("after.raw");
    run(Command::new("nbdcopy").arg(served.uri("bb")).arg(&copy));
    assert!(std::fs::read(&copy).unwrap() == want);
}

#[test]
fn two_importers_of_one_image_at_once_leave_one_good_name_and_one_manifest() {
    let Some(moto) = Moto::start() else { return };
    if !have_nbd_tools() {
        return;
    }
    let url = moto.bucket("racing", "");
    let (a, src, _) = imported(&url);
    let b = host_b(&a);
    let children: Vec<_> = [&a, &b]
        .iter()
        .map(|env| {
            Command::new(env!("CARGO_BIN_EXE_tessera"))
                .args(["import", &src, "--name", "bb", "--headroom", "64MiB"])
                .env("TESSERA_HOME", env.home())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    a.ok(&["verify", "bb"]);
    b.ok(&["verify", "bb"]);
    // On S3, a name's compare-and-swap is atomic and each replaced manifest
    // is released once (one is left). moto checks If-Match before it
    // writes, without a lock, so two racing updates can both succeed there
    // and leave the other importer's manifest behind, unnamed: never a name
    // pointing at a partial image, as the verifies above show.
    let left = moto.keys("racing", "tessera/manifests/").len();
    assert!((1..=2).contains(&left), "{left} manifests left");
}

#[test]
fn thirty_two_cold_readers_keep_s3_requests_at_the_bound() {
    let Some(moto) = Moto::start() else { return };
    if !have_nbd_tools() {
        return;
    }
    let url = moto.bucket("bound", "");
    let (a, _, want) = imported(&url);
    let served = Served::start(&a, &["--origin-concurrency", "4"]);
    let children: Vec<_> = (0..32)
        .map(|i| {
            let out = a.path(&format!("c{i}.raw"));
            (Command::new("nbdcopy").arg(served.uri(&format!("bb@c{i}"))).arg(&out).spawn().unwrap(), out)
        })
        .collect();
    for (mut child, out) in children {
        assert!(child.wait().unwrap().success());
        assert!(std::fs::read(&out).unwrap() == want);
    }
    let peak = served.metric("tessera_origin_requests_in_flight_peak");
    assert!((1.0..=4.0).contains(&peak), "S3 requests in flight peaked at {peak}, bound 4");
    let stored = moto.keys("bound", "tessera/chunks/").len() as f64;
    assert_eq!(served.metric("tessera_s3_requests_total{op=\"get\",object=\"chunk\"}"), stored, "each chunk was fetched once");
}

#[test]
fn wrong_credentials_a_missing_bucket_and_a_failing_server_are_clear_errors() {
    // IAM on: the first request (making the bucket) is free, then every
    // request must be signed by a key moto knows.
    let Some(moto) = Moto::start_with(&[("INITIAL_NO_AUTH_ACTION_COUNT", "1")]) else { return };
    let url = moto.bucket("locked", "");
    use_store(&url);
    let env = Env::new();
    let out = env.tessera(&["images"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("access denied"), "{}", text(&out));
    // A bucket that is not there.
    let Some(open) = Moto::start() else { return };
    use_store(&format!("s3://nowhere?endpoint=http://{}&region=us-east-1", open.addr));
    let out = env.tessera(&["inspect", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("no such bucket"), "{}", text(&out));
    // A server that answers 503 to everything: bounded retries, one clear error.
    let stub = env.path("stub.py");
    std::fs::write(
        &stub,
        "import http.server\nclass H(http.server.BaseHTTPRequestHandler):\n    def do_GET(self):\n        self.send_response(503); self.send_header('Content-Length','0'); self.end_headers()\n    do_PUT = do_HEAD = do_GET\n    def log_message(self, *a): pass\ns = http.server.HTTPServer(('127.0.0.1', 0), H)\nprint('listening on 127.0.0.1:%d' % s.server_address[1], flush=True)\ns.serve_forever()\n",
    )
    .unwrap();
    let stub_log = env.path("stub.log");
    let mut child = Command::new("python3").arg(&stub).stdout(std::fs::File::create(&stub_log).unwrap()).spawn().unwrap();
    let addr = wait_logged_address(&stub_log, &mut child, "the 503 server");
    use_store(&format!("s3://busy?endpoint=http://{addr}&region=us-east-1&timeout=2s"));
    let started = Instant::now();
    let out = env.tessera(&["images"]);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains(&addr) && text(&out).contains("503"), "{}", text(&out));
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
}

#[test]
fn gc_on_s3_reclaims_what_no_image_uses_by_server_side_copies() {
    let Some(moto) = Moto::start() else { return };
    if !have_nbd_tools() {
        return;
    }
    let url = moto.bucket("collected", "");
    use_store(&url);
    let env = Env::new();
    let dir = env.path("layout");
    busybox_layout(&dir, "base");
    for (i, tag) in ["a", "b"].iter().enumerate() {
        add_layer(&dir, "base", tag, &[(&format!("data/{tag}"), &pseudo_random(3 << 20, 20 + i as u64))]);
    }
    env.import(&format!("oci:{}:a", dir.display()), "a", &[]);
    env.import(&format!("oci:{}:b", dir.display()), "b", &[]);
    let want = env.path("b.raw");
    env.ok(&["export", "b", want.to_str().unwrap()]);
    let store = tessera_store::Store::open(&tessera_store::StoreUrl::parse(&url).unwrap()).unwrap();
    let refs = |name: &str| {
        let r = store.catalog.get(name).unwrap();
        let ids: std::collections::BTreeSet<String> =
            store.catalog.get_refs(r.generation, &r.manifest).unwrap().unwrap().iter().map(|id| id.to_hex()).collect();
        ids
    };
    let (a, b) = (refs("a"), refs("b"));
    assert!(!a.is_disjoint(&b));
    let chunk_gets = moto.requests("GET /collected/tessera/chunks/");

    env.ok(&["rm", "a"]);
    let steps: Vec<serde_json::Value> =
        (0..3).map(|_| serde_json::from_str(&env.ok(&["gc", "--json", "--grace", "0s", "--lease", "0s", "--rotate-after", "0s"])).unwrap()).collect();
    let kinds: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["rotated", "migrated", "deleted"], "{steps:#?}");
    assert_eq!(steps[2]["deleted_chunks"].as_u64().unwrap() as usize, a.union(&b).count());

    // The bucket holds exactly b's chunks, all in generation 1, copied by
    // the server: no chunk passed through the collector.
    let chunk_keys: Vec<String> = moto.keys("collected", "tessera/").into_iter().filter(|k| k.contains("/chunks/")).collect();
    assert!(chunk_keys.iter().all(|k| k.starts_with("tessera/gen/1/chunks/")), "{chunk_keys:?}");
    let left: std::collections::BTreeSet<String> = chunk_keys.iter().map(|k| k.rsplit('/').next().unwrap().to_owned()).collect();
    assert_eq!(left, b);
    assert_eq!(moto.requests("GET /collected/tessera/chunks/"), chunk_gets, "the collector read no chunk");
    assert_eq!(moto.requests("PUT /collected/tessera/gen/1/chunks/"), b.len(), "one server-side copy per live chunk");
    env.ok(&["verify", "b"]);
    let out = env.path("b-after.raw");
    env.ok(&["export", "b", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&want).unwrap());
}
