//! Function trees end to end: a real `tessera treemgr` and real agents
//! (`tessera serve --tree-manager --peer-listen`) sharing one store behind
//! the origin throttle, the cache tier off, read at once by nbdcopy. On
//! loopback, and with seven agents each in a network namespace of its own
//! (TLS and a token between them), one of them killed mid-read.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::tls::Certs;
use common::*;

const TOKEN: &str = "tree-secret";
/// Origin throttle of every agent: slow enough that children ask while
/// the root is still fetching.
const ORIGIN: [&str; 6] = ["--origin-latency", "20ms", "--origin-concurrency", "4", "--origin-bandwidth", "64MiB"];

/// busybox plus `mib` MiB of incompressible data, imported as `app`; the
/// image's bytes and its chunks that are not holes.
fn image(env: &Env, mib: usize) -> (Vec<u8>, usize) {
    let layout = env.path("layout");
    busybox_layout(&layout, "bb");
    add_layer(&layout, "bb", "app", &[("data/blob", &pseudo_random(mib << 20, 14))]);
    env.import(&format!("oci:{}:app", layout.display()), "app", &[]);
    let raw = env.path("app.raw");
    env.ok(&["export", "app", raw.to_str().unwrap()]);
    let bytes = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    let chunks = bytes.chunks(512 << 10).filter(|c| c.iter().any(|&b| b != 0)).count();
    (bytes, chunks)
}

/// Network namespaces on one bridge: the bridge and the host's own leg
/// (10.79.0.254) in the host's namespace, agent `i` at 10.79.0.(10 + i).
/// Deleted on drop.
struct Lan {
    namespaces: Vec<String>,
    bridge: String,
}

impl Lan {
    fn new(n: usize) -> Lan {
        let tag = std::process::id() % 10_000;
        let bridge = format!("tbr{tag}");
        let _ = Command::new("ip").args(["link", "del", &bridge]).status();
        run(Command::new("ip").args(["link", "add", &bridge, "type", "bridge"]));
        let mut lan = Lan { namespaces: Vec::new(), bridge: bridge.clone() };
        run(Command::new("ip").args(["addr", "add", "10.79.0.254/24", "dev", &bridge]));
        run(Command::new("ip").args(["link", "set", &bridge, "up"]));
        for i in 0..n {
            let (ns, veth) = (format!("tpn{tag}a{i}"), format!("tpv{tag}a{i}"));
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
            run(Command::new("ip").args(["netns", "add", &ns]));
            lan.namespaces.push(ns.clone());
            run(Command::new("ip").args(["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns]));
            run(Command::new("ip").args(["link", "set", &veth, "master", &bridge]));
            run(Command::new("ip").args(["link", "set", &veth, "up"]));
            run(Command::new("ip").args(["-n", &ns, "addr", "add", &format!("{}/24", Lan::ip(i)), "dev", "eth0"]));
            run(Command::new("ip").args(["-n", &ns, "link", "set", "eth0", "up"]));
            run(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]));
        }
        lan
    }

    fn ip(i: usize) -> String {
        format!("10.79.0.{}", 10 + i)
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth pair, and so both.
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).status();
    }
}

/// A tree manager, and agents on one home (one store), each with a cache,
/// a socket and metrics of its own.
struct Fleet {
    manager: Child,
    manager_addr: String,
    agents: Vec<Option<Child>>,
    sockets: Vec<PathBuf>,
    metrics: Vec<String>,
    peers: Vec<String>,
}

impl Fleet {
    /// `n` agents, on loopback or (with `lan`) agent `i` in namespace `i`.
    fn start(env: &Env, n: usize, lan: Option<(&Lan, &Certs)>) -> Fleet {
        let token = env.path("token");
        std::fs::write(&token, TOKEN).unwrap();
        let ready = env.path("treemgr.ready");
        let mut manager = Command::new(env!("CARGO_BIN_EXE_tessera"));
        manager.args(["treemgr", "--ready-file"]).arg(&ready).arg("--token-file").arg(&token).stdin(Stdio::null());
        match lan {
            Some((_, certs)) => {
                manager.args(["--listen", "10.79.0.254:0", "--tls-cert", &certs.file("server-cert.pem"), "--tls-key", &certs.file("server-key.pem")])
            }
            None => manager.args(["--listen", "127.0.0.1:0"]),
        };
        let mut manager = manager.spawn().expect("tessera treemgr starts");
        let manager_addr = wait_ready(&ready, &mut manager, "tessera treemgr")["listen"].as_str().unwrap().to_owned();
        let mut fleet = Fleet { manager, manager_addr, agents: Vec::new(), sockets: Vec::new(), metrics: Vec::new(), peers: Vec::new() };
        for i in 0..n {
            let ready = env.path(&format!("agent{i}.ready"));
            let mut child = fleet.agent(env, i, lan, &ready).spawn().expect("tessera serve starts");
            let bound = wait_ready(&ready, &mut child, "tessera serve");
            fleet.metrics.push(bound["metrics"].as_str().unwrap().to_owned());
            fleet.peers.push(bound["peer"].as_str().expect("the ready file names the peer address").to_owned());
            fleet.sockets.push(env.path(&format!("agent{i}.sock")));
            fleet.agents.push(Some(child));
        }
        fleet
    }

    /// Agent `i`'s `tessera serve`, announcing itself in `ready`.
    fn agent(&self, env: &Env, i: usize, lan: Option<(&Lan, &Certs)>, ready: &Path) -> Command {
        let (socket, token) = (env.path(&format!("agent{i}.sock")), env.path("token"));
        let mut c = match lan {
            Some((lan, _)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &lan.namespaces[i], env!("CARGO_BIN_EXE_tessera")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_tessera")),
        };
        let host = if lan.is_some() { Lan::ip(i) } else { "127.0.0.1".into() };
        c.args(["serve", "--nbd", &format!("unix:{}", socket.display()), "--ready-file"])
            .arg(ready)
            .args(["--metrics", &format!("{host}:0"), "--peer-listen", &format!("{host}:0"), "--tree-manager", &self.manager_addr])
            .arg("--tree-token-file")
            .arg(&token)
            .arg("--cache-dir")
            .arg(env.path(&format!("cache{i}")))
            .arg("--control")
            .arg(env.path(&format!("control{i}.sock")))
            .arg("--vhost-user")
            .arg(env.path(&format!("vhost{i}")))
            .args(ORIGIN)
            .env("TESSERA_HOME", env.home())
            .stdin(Stdio::null());
        if let Some((_, certs)) = lan {
            c.args([
                "--tree-tls-ca",
                &certs.file("ca-cert.pem"),
                "--peer-tls-cert",
                &certs.file("server-cert.pem"),
                "--peer-tls-key",
                &certs.file("server-key.pem"),
            ]);
        }
        c
    }

    /// Agent `i` is upgraded in place (`serve --takeover`, on loopback):
    /// the old one hands its listeners over and exits; the new one's
    /// name in the trees.
    fn take_over(&mut self, env: &Env, i: usize) -> String {
        let ready = env.path(&format!("agent{i}.next.ready"));
        let mut child = self.agent(env, i, None, &ready).arg("--takeover").spawn().expect("tessera serve starts");
        let bound = wait_ready(&ready, &mut child, "tessera serve --takeover");
        let mut old = self.agents[i].replace(child).unwrap();
        let exited = old.wait().unwrap();
        assert!(exited.success(), "the old agent: {exited}");
        self.metrics[i] = bound["metrics"].as_str().unwrap().to_owned();
        bound["peer"].as_str().unwrap().to_owned()
    }

    fn uri(&self, i: usize) -> String {
        format!("nbd+unix:///app?socket={}", self.sockets[i].display())
    }

    /// Agents join the tree in order (0 the root, then breadth-first), each
    /// by reading the image's first block.
    fn join_in_order(&self) {
        for i in 0..self.agents.len() {
            run(Command::new("qemu-io").args(["-r", "-f", "raw", &self.uri(i), "-c", "read 0 4096"]));
        }
    }

    fn metric(&self, i: usize, series: &str) -> f64 {
        metric(&self.metrics[i], series)
    }

    fn reads(&self, i: usize, tier: &str) -> f64 {
        self.metric(i, &format!("tessera_chunk_reads_total{{source=\"{tier}\"}}"))
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.agents[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in self.agents.iter_mut().flatten() {
            stop_child(c, Duration::from_secs(10));
        }
        stop_child(&mut self.manager, Duration::from_secs(10));
    }
}

fn can_make_namespaces() -> bool {
    have_nbd_tools() && is_root() && require("ip", "iproute2") && require("openssl", "openssl")
}

/// Seven agents, each in a namespace of its own, with TLS and a token
/// between them, joined to the tree in order; the fleet goes before the
/// namespaces it runs in.
fn seven_in_namespaces(env: &Env) -> (Fleet, Lan) {
    let lan = Lan::new(7);
    let sans: Vec<String> = std::iter::once("IP:10.79.0.254".to_owned()).chain((0..7).map(|i| format!("IP:{}", Lan::ip(i)))).collect();
    let certs = Certs::make(&env.path("certs"), &sans.join(","));
    let fleet = Fleet::start(env, 7, Some((&lan, &certs)));
    fleet.join_in_order();
    (fleet, lan)
}

/// nbdcopy of agent `i`'s export into `out`, started now.
fn copy(fleet: &Fleet, i: usize, out: &Path) -> Child {
    Command::new("nbdcopy").arg(fleet.uri(i)).arg(out).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("nbdcopy runs")
}

/// nbdcopy of every agent's export at once, each into a file of its own.
fn copy_all(env: &Env, fleet: &Fleet) -> Vec<(PathBuf, Child)> {
    (0..fleet.agents.len())
        .map(|i| {
            let out = env.path(&format!("copy{i}.raw"));
            let child = copy(fleet, i, &out);
            (out, child)
        })
        .collect()
}

/// Each copy but `except`'s succeeded with the image's bytes.
fn check_copies(copies: Vec<(PathBuf, Child)>, expected: &[u8], except: Option<usize>) {
    for (i, (out, child)) in copies.into_iter().enumerate() {
        let done = child.wait_with_output().unwrap();
        if Some(i) == except {
            continue;
        }
        assert!(done.status.success(), "agent {i}: nbdcopy failed: {}", String::from_utf8_lossy(&done.stderr));
        assert!(std::fs::read(&out).unwrap() == expected, "agent {i} served other bytes");
    }
}

#[test]
fn children_read_from_their_parents_and_only_the_root_from_the_origin() {
    if !have_nbd_tools() {
        return;
    }
    let env = Env::new();
    let (expected, chunks) = image(&env, 24);
    let fleet = Fleet::start(&env, 3, None);
    fleet.join_in_order();
    check_copies(copy_all(&env, &fleet), &expected, None);
    let origin: Vec<f64> = (0..3).map(|i| fleet.reads(i, "origin")).collect();
    let peer: Vec<f64> = (0..3).map(|i| fleet.reads(i, "peer")).collect();
    // Each chunk once from the origin, by the root (a hole is read from no tier).
    assert_eq!(origin[0], chunks as f64, "root origin reads {origin:?} of {chunks} chunks");
    assert!(origin[1] + origin[2] <= 2.0, "children read the origin: {origin:?}");
    assert!(peer[1] + origin[1] >= chunks as f64 && peer[2] + origin[2] >= chunks as f64, "children's peer reads {peer:?} of {chunks} chunks");
    assert_eq!(peer[0], 0.0, "the root has no parent");
    assert!(fleet.metric(0, "tessera_peer_chunks_served_total") > 0.0);

    // A wrong token (or none) is refused by the manager and by the agents' peer servers.
    let some_chunk = format!("/v1/chunks/{}", "ab".repeat(32));
    for headers in ["Authorization: Bearer wrong\r\n", ""] {
        let answer = http_get(&fleet.peers[0], &some_chunk, headers);
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        let answer = http_get(&fleet.manager_addr, "/v1/trees", headers);
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    }
    let answer = http_get(&fleet.peers[0], &some_chunk, &format!("Authorization: Bearer {TOKEN}\r\nx-tessera-image: app\r\nx-tessera-via: 127.0.0.1:1\r\n"));
    assert!(answer.starts_with("HTTP/1.1 404"), "a chunk in no tier: {answer}");
    let answer = http_get(&fleet.peers[0], &some_chunk, &format!("Authorization: Bearer {TOKEN}\r\n"));
    assert!(answer.starts_with("HTTP/1.1 400"), "a request for no image: {answer}");
}

/// `serve --takeover` of an agent in a tree: its successor gets its
/// children's listener with the NBD ones, keeps its name and place in the
/// tree, and goes on reading from its parent.
#[test]
fn an_agent_upgraded_in_place_keeps_its_place_in_the_tree() {
    if !have_nbd_tools() {
        return;
    }
    let env = Env::new();
    let (expected, chunks) = image(&env, 8);
    let mut fleet = Fleet::start(&env, 2, None);
    fleet.join_in_order();
    let name = fleet.take_over(&env, 1);
    assert_eq!(name, fleet.peers[1], "the successor serves children under the same name");
    let trees = http_get(&fleet.manager_addr, "/v1/trees", &format!("Authorization: Bearer {TOKEN}\r\n"));
    let body = trees.split("\r\n\r\n").nth(1).unwrap();
    let trees: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(trees["app"], serde_json::json!([fleet.peers[0], fleet.peers[1]]), "the old agent did not leave the tree");
    let out = env.path("copy.raw");
    let done = copy(&fleet, 1, &out).wait_with_output().unwrap();
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    assert!(std::fs::read(&out).unwrap() == expected);
    // The successor read from its parent; the first block the old one had
    // is in the disk cache both share.
    assert!(fleet.reads(1, "peer") >= chunks as f64 - 2.0, "{} of {chunks}", fleet.reads(1, "peer"));
    assert_eq!(fleet.reads(1, "origin"), 0.0);
}

/// `tessera run --tree-manager`: the run's own agent joins the function's
/// tree under an agent that has the image, and its VM starts from its parent.
#[test]
fn a_run_in_a_tree_reads_from_its_parent() {
    if !have_nbd_tools() || !have_vm_tools() {
        return;
    }
    let env = Env::new();
    image(&env, 8);
    let fleet = Fleet::start(&env, 1, None);
    fleet.join_in_order();
    let warm = copy(&fleet, 0, Path::new("null:")).wait_with_output().unwrap();
    assert!(warm.status.success());
    let token = env.path("token");
    let o = tessera_run(
        &env.home(),
        &["app", "--accel", "tcg", "--json", "--function", "app", "--tree-manager", &fleet.manager_addr, "--peer-listen", "127.0.0.1:0"],
    )
    .arg("--tree-token-file")
    .arg(&token)
    .args(["--", "-c", "cat /data/blob | wc -c"])
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let mut lines = out.lines();
    assert_eq!(lines.next().map(str::trim), Some("8388608"), "{out}");
    let report: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    let fetched = &report["chunks_fetched"];
    assert!(fetched["peer"].as_u64().unwrap_or(0) > 16, "the blob came from the parent: {report}");
    assert_eq!(fetched["origin"].as_u64().unwrap_or(0), 0, "nothing from the origin: {report}");
}

#[test]
fn seven_agents_in_their_own_namespaces_survive_an_interior_one_killed() {
    if !can_make_namespaces() {
        return;
    }
    let env = Env::new();
    let (expected, chunks) = image(&env, 48);
    // Breadth-first: 0 is the root, 1 the parent of 3 and 4.
    let (mut fleet, _lan) = seven_in_namespaces(&env);

    let copies = copy_all(&env, &fleet);
    std::thread::sleep(Duration::from_millis(400));
    fleet.kill(1);
    // The killed agent's own reader fails; every other finishes whole.
    check_copies(copies, &expected, Some(1));
    let alive = [0, 2, 3, 4, 5, 6];
    let origin: f64 = alive.iter().map(|&i| fleet.reads(i, "origin")).sum();
    let peer: Vec<f64> = alive.iter().map(|&i| fleet.reads(i, "peer")).collect();
    eprintln!("{chunks} chunks; origin reads {origin}; peer reads of agents {alive:?}: {peer:?}");
    // Each chunk once, and a handful of races around the kill.
    assert!(origin <= chunks as f64 + 8.0, "{origin} origin reads for {chunks} chunks");
    for i in [2, 3, 4, 5, 6] {
        assert!(fleet.reads(i, "peer") > 0.0, "agent {i} read nothing from a parent");
    }
    // The orphans found their parent gone and told the manager.
    let failures: f64 = [3, 4].iter().map(|&i| fleet.metric(i, "tessera_peer_requests_total{result=\"parent_failed\"}")).sum();
    assert!(failures >= 1.0, "no child of the killed agent reported it");
}

/// The simulator against the real thing, at small scale: seven agents in
/// their own namespaces read a 96 MiB image at once (no container start),
/// timed; then `tessera sim` on the same parameters (the origin throttle,
/// the image, the agents' bound). A benchmark (`scripts/bench-tree.sh`),
/// not a check: it prints both.
#[test]
#[ignore = "a benchmark: scripts/bench-tree.sh runs it"]
fn bench_seven_agents_against_the_simulator() {
    if !can_make_namespaces() {
        return;
    }
    let env = Env::new();
    let (_, chunks) = image(&env, 96);
    let (fleet, _lan) = seven_in_namespaces(&env);
    let started = std::time::Instant::now();
    // Read into nothing: the readers' disk writes are not the agents' work.
    let null = Path::new("null:");
    let mut copies: Vec<Option<Child>> = (0..7).map(|i| Some(copy(&fleet, i, null))).collect();
    let mut done = [0.0; 7];
    while copies.iter().any(Option::is_some) {
        for (i, c) in copies.iter_mut().enumerate() {
            if let Some(status) = c.as_mut().and_then(|c| c.try_wait().unwrap()) {
                assert!(status.success(), "agent {i}: nbdcopy failed");
                done[i] = started.elapsed().as_secs_f64();
                *c = None;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    done.sort_by(f64::total_cmp);
    let origin: f64 = (0..7).map(|i| fleet.reads(i, "origin")).sum();
    let peer: f64 = (0..7).map(|i| fleet.reads(i, "peer")).sum();
    let measured = serde_json::json!({
        "system": "measured", "vms": 7, "chunks": chunks, "seconds_first_running": done[0], "seconds_all_running": done[6],
        "p50_seconds": done[3], "origin_chunks": origin, "peer_chunks": peer,
    });
    println!("{measured}");
    // The same on the simulator: the origin throttle (ORIGIN), the image's
    // chunks (all read, incompressible), no start cost; the NIC is the
    // veth pair's, measured by scripts/bench-tree.sh (TESSERA_BENCH_NIC_GBPS).
    let nic = std::env::var("TESSERA_BENCH_NIC_GBPS").unwrap_or_else(|_| "10".into());
    let image_mb = format!("{}", (chunks * (512 << 10)) as f64 / 1e6);
    let registry_gbps = format!("{}", 64.0 * (1 << 20) as f64 * 8.0 / 1e9);
    let out = run(Command::new(env!("CARGO_BIN_EXE_tessera")).args([
        "sim",
        "--system",
        "tessera",
        "--vms",
        "7",
        "--invocations",
        "7",
        "--image-mb",
        &image_mb,
        "--fetch-fraction",
        "1",
        "--registry-gbps",
        &registry_gbps,
        "--registry-latency",
        "20ms",
        "--origin-concurrency",
        "4",
        "--compression",
        "1",
        "--start-cpu",
        "0",
        "--nic-gbps",
        &nic,
        "--json",
    ]));
    print!("{}", String::from_utf8_lossy(&out.stdout));
}
