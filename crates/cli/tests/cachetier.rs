//! The shared cache tier end to end: real `tessera cachenode` processes on
//! loopback, real agents (`tessera serve --cache-nodes`) read by nbdcopy.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Cache nodes, each with its own directory; killed on drop.
struct Nodes {
    children: Vec<Option<Child>>,
    addrs: Vec<String>,
    metrics: Vec<String>,
    dirs: Vec<PathBuf>,
    extra: Vec<String>,
    /// Network namespace of each node (none: loopback).
    netns: Vec<Option<String>>,
    /// Where each node listens (its address, unless a relay stands there).
    listen: Vec<String>,
    /// Flags every agent of these nodes gets (a token).
    client: Vec<String>,
}

impl Nodes {
    /// `n` nodes on loopback, each on a port the system picks.
    fn start(env: &Env, n: usize, extra: &[&str]) -> Nodes {
        let mut nodes = Nodes::empty(extra);
        for i in 0..n {
            nodes.addrs.push("127.0.0.1:0".into());
            nodes.metrics.push("127.0.0.1:0".into());
            nodes.dirs.push(env.path(&format!("node{i}")));
            nodes.children.push(None);
            nodes.netns.push(None);
        }
        nodes.listen = nodes.addrs.clone();
        for i in 0..n {
            nodes.restart(i);
        }
        nodes
    }

    fn empty(extra: &[&str]) -> Nodes {
        Nodes {
            children: Vec::new(),
            addrs: Vec::new(),
            metrics: Vec::new(),
            dirs: Vec::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            netns: Vec::new(),
            listen: Vec::new(),
            client: Vec::new(),
        }
    }

    /// `tessera ARGS`, inside node `i`'s namespace if it has one.
    fn command(&self, i: usize, program: &str) -> Command {
        match &self.netns[i] {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }

    /// Starts node `i` (again) on its directory. A loopback node gets a
    /// port the system picks each time (so `addrs` changes: with as many
    /// nodes as stripes, every node holds a stripe of every chunk whatever
    /// the addresses); a node in a namespace of its own keeps its address.
    fn restart(&mut self, i: usize) {
        let loopback = self.netns[i].is_none();
        let (listen, metrics) = if loopback { ("127.0.0.1:0".to_owned(), "127.0.0.1:0".to_owned()) } else { (self.listen[i].clone(), self.metrics[i].clone()) };
        let ready = self.dirs[i].with_extension("ready");
        let _ = std::fs::remove_file(&ready);
        let mut child = self
            .command(i, env!("CARGO_BIN_EXE_tessera"))
            .args(["cachenode", "--listen", &listen, "--metrics", &metrics, "--mem", "64MiB", "--disk", "256MiB", "--ready-file"])
            .arg(&ready)
            .arg("--dir")
            .arg(&self.dirs[i])
            .args(&self.extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("tessera cachenode starts");
        let bound = wait_ready(&ready, &mut child, "tessera cachenode");
        if loopback {
            self.addrs[i] = bound["listen"].as_str().unwrap().to_owned();
            self.listen[i] = self.addrs[i].clone();
            self.metrics[i] = bound["metrics"].as_str().unwrap().to_owned();
        }
        self.children[i] = Some(child);
    }

    /// Stops node `i` with SIGTERM.
    fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            stop_child(&mut c, Duration::from_secs(10));
        }
    }

    /// Kills node `i` outright.
    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn list(&self) -> String {
        self.addrs.join(",")
    }

    fn metric(&self, i: usize, series: &str) -> f64 {
        metric(&self.metrics[i], series)
    }

    /// Every stripe file node `i` keeps on disk.
    fn stripe_files(&self, i: usize) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for sub in std::fs::read_dir(self.dirs[i].join("stripes")).unwrap() {
            let sub = sub.unwrap().path();
            if !sub.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(sub).unwrap() {
                files.push(f.unwrap().path());
            }
        }
        files
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }
}

/// A busybox image with 12 MiB of incompressible data, imported; its bytes
/// as `tessera export` writes them; its distinct stored chunks.
fn imported() -> (Env, Vec<u8>, f64) {
    let env = Env::new();
    let layout = env.path("layout");
    busybox_layout(&layout, "bb");
    add_layer(&layout, "bb", "data", &[("data/blob", &pseudo_random(12 << 20, 11))]);
    let report = env.import(&format!("oci:{}:data", layout.display()), "bb", &[]);
    let raw = env.path("bb.raw");
    env.ok(&["export", "bb", raw.to_str().unwrap()]);
    // Distinct stored chunks: a fresh home stores each once.
    let chunks = report["new_chunks"].as_f64().unwrap();
    (env, std::fs::read(&raw).unwrap(), chunks)
}

/// An agent of the tier with a cache directory of its own (so it starts cold).
fn agent(env: &Env, name: &str, nodes: &Nodes, extra: &[&str]) -> Served {
    let cache = env.path(&format!("cache-{name}"));
    let mut args = vec!["--cache-dir", cache.to_str().unwrap(), "--cache-nodes"];
    let list = nodes.list();
    args.push(&list);
    args.extend(nodes.client.iter().map(String::as_str));
    args.extend_from_slice(extra);
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Served::start_at(env, &format!("{name}.sock"), &args)
}

fn read_all(env: &Env, agent: &Served, out: &str) -> Vec<u8> {
    let out = env.path(out);
    run(Command::new("nbdcopy").arg(agent.uri("bb")).arg(&out));
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(out).unwrap();
    bytes
}

/// Waits until the agent has stored every chunk it offered to the tier.
fn settled(agent: &Served) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent.metric("tessera_cache_tier_pending") > 0.0 {
        assert!(Instant::now() < deadline, "the agent's stores to the tier did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An agent reads the whole image through the tier, which keeps it.
fn warm(env: &Env, nodes: &Nodes, want: &[u8]) {
    let a = agent(env, "warm", nodes, &[]);
    assert!(read_all(env, &a, "warm.raw") == want);
    settled(&a);
    a.stop();
}

fn reads(agent: &Served, source: &str) -> f64 {
    agent.metric(&format!("tessera_chunk_reads_total{{source=\"{source}\"}}"))
}

#[test]
fn a_warm_tier_serves_cold_agents_through_node_losses() {
    if !have_nbd_tools() {
        return;
    }
    let (env, want, chunks) = imported();
    let mut nodes = Nodes::start(&env, 5, &[]);

    // Agent 1 finds the tier cold: everything from the origin, then stored.
    let a1 = agent(&env, "a1", &nodes, &[]);
    assert!(read_all(&env, &a1, "a1.raw") == want);
    assert_eq!(reads(&a1, "origin"), chunks);
    settled(&a1);
    assert_eq!(a1.metric("tessera_cache_tier_stored_total"), chunks);
    assert_eq!(a1.metric("tessera_cache_tier_stripes_stored_total"), chunks * 5.0);
    a1.stop();
    // 4+1: each node holds one stripe of every chunk (a quarter of it).
    for i in 0..5 {
        assert_eq!(nodes.metric(i, "tessera_cachenode_stripes{cache=\"disk\"}"), chunks);
    }

    // Agent 2, empty caches: the whole image from the tier, none from the origin.
    let a2 = agent(&env, "a2", &nodes, &[]);
    assert!(read_all(&env, &a2, "a2.raw") == want);
    assert_eq!(reads(&a2, "origin"), 0.0);
    assert_eq!(reads(&a2, "cache"), chunks);
    a2.stop();

    // Agent 3 reads part of the image, a node dies, it reads the rest:
    // no read fails and none goes to the origin.
    let a3 = agent(&env, "a3", &nodes, &[]);
    let out = Command::new("qemu-io").args(["-f", "raw", "-r", &a3.uri("bb"), "-c", "read 0 6M"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let before = reads(&a3, "cache");
    assert!(before > 0.0);
    nodes.kill(0);
    assert!(read_all(&env, &a3, "a3.raw") == want);
    assert_eq!(reads(&a3, "origin"), 0.0);
    assert!(reads(&a3, "cache") > before);
    assert!(a3.metric(&format!("tessera_cache_tier_node_errors_total{{node=\"{}\"}}", nodes.addrs[0])) > 0.0);
    a3.stop();

    // Two nodes down: fewer than 4 stripes of any chunk are left, so every
    // chunk comes from the origin, and the bytes are still right.
    nodes.kill(1);
    let a4 = agent(&env, "a4", &nodes, &[]);
    assert!(read_all(&env, &a4, "a4.raw") == want);
    assert_eq!(reads(&a4, "origin"), chunks);
    assert_eq!(reads(&a4, "cache"), 0.0);
    a4.stop();

    // The two nodes restart on their directories: their stripes are still
    // there, and the tier serves everything again.
    nodes.restart(0);
    nodes.restart(1);
    assert_eq!(nodes.metric(0, "tessera_cachenode_stripes{cache=\"disk\"}"), chunks);
    let a5 = agent(&env, "a5", &nodes, &[]);
    assert!(read_all(&env, &a5, "a5.raw") == want);
    assert_eq!(reads(&a5, "origin"), 0.0);
    assert!(nodes.metric(0, "tessera_cachenode_hits_total{cache=\"disk\"}") > 0.0);
}

/// Rewrites a stripe file as a node that lies would: a flipped byte under a
/// checksum that matches it.
fn corrupt_consistently(file: &Path) {
    let mut bytes = std::fs::read(file).unwrap();
    // Inside the stripe's data (small stripes: compressed chunks).
    let at = if bytes.len() > 132 { bytes.len() - 100 } else { bytes.len() - 1 };
    bytes[at] ^= 0x55;
    let sum = Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().and_then(|mut c| {
        use std::io::Write;
        c.stdin.take().unwrap().write_all(&bytes[32..])?;
        c.wait_with_output()
    });
    let hex = String::from_utf8(sum.unwrap().stdout).unwrap();
    let digest: Vec<u8> = (0..32).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect();
    bytes[..32].copy_from_slice(&digest);
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn nodes_joining_and_leaving_keep_the_tier_warm() {
    if !have_nbd_tools() {
        return;
    }
    let (env, want, chunks) = imported();
    let mut nodes = Nodes::start(&env, 6, &[]);
    let addrs = nodes.addrs.clone();
    let list = |idx: &[usize]| idx.iter().map(|&i| addrs[i].clone()).collect::<Vec<_>>().join(",");
    let agent_on = |name: &str, members: &str| {
        let cache = env.path(&format!("cache-{name}"));
        Served::start_at(&env, &format!("{name}.sock"), &["--cache-dir", cache.to_str().unwrap(), "--cache-nodes", members])
    };
    // Nodes 0-4 hold the image.
    let a1 = agent_on("a1", &list(&[0, 1, 2, 3, 4]));
    assert!(read_all(&env, &a1, "a1.raw") == want);
    settled(&a1);
    a1.stop();
    // Node 5 joins: for most chunks it now ranks among the five, and the
    // others change rank; the stripes they hold still rebuild every chunk.
    let a2 = agent_on("a2", &list(&[0, 1, 2, 3, 4, 5]));
    assert!(read_all(&env, &a2, "a2.raw") == want);
    assert_eq!(reads(&a2, "origin"), 0.0);
    settled(&a2);
    a2.stop();
    // Node 0 leaves: four of each chunk's stripes are still on nodes 1-4.
    nodes.kill(0);
    let a3 = agent_on("a3", &list(&[1, 2, 3, 4, 5]));
    assert!(read_all(&env, &a3, "a3.raw") == want);
    assert_eq!(reads(&a3, "origin"), 0.0);
    assert_eq!(reads(&a3, "cache"), chunks);
}

#[test]
fn corrupt_stripes_are_caught_and_the_chunks_rebuilt_from_the_others() {
    if !have_nbd_tools() {
        return;
    }
    let (env, want, chunks) = imported();
    let mut nodes = Nodes::start(&env, 5, &[]);
    warm(&env, &nodes, &want);

    // A node that serves wrong bytes under a good checksum: the rebuilt
    // chunk does not match its id, the client tries every 4 of the 5
    // stripes, and serves the right chunk without the origin.
    nodes.stop(0);
    let files = nodes.stripe_files(0);
    assert!(!files.is_empty());
    for f in &files {
        corrupt_consistently(f);
    }
    nodes.restart(0);
    // Its stripes into its memory, so it answers as fast as the others and
    // its stripes are among the first four as often as theirs.
    for f in &files {
        let chunk = f.file_name().unwrap().to_str().unwrap();
        assert!(http_get(&nodes.addrs[0], &format!("/v1/stripes/{chunk}"), "").starts_with("HTTP/1.1 200"));
    }
    let a2 = agent(&env, "a2", &nodes, &[]);
    assert!(read_all(&env, &a2, "a2.raw") == want);
    assert_eq!(reads(&a2, "origin"), 0.0);
    let caught = a2.metric("tessera_cache_tier_corrupt_total");
    assert!(caught > 0.0, "no corrupt stripe was caught");
    // The liar is blamed, and only its stripes are rewritten.
    assert!(a2.metric(&format!("tessera_cache_tier_node_corrupt_total{{node=\"{}\"}}", nodes.addrs[0])) > 0.0);
    assert_eq!(a2.metric(&format!("tessera_cache_tier_node_corrupt_total{{node=\"{}\"}}", nodes.addrs[1])), 0.0);
    assert!(a2.metric("tessera_cache_tier_stripes_repaired_total") > 0.0, "the bad stripes were rewritten");
    // The chunks it caught were stored again with good stripes; only those
    // whose bad stripe came fifth (and was cancelled) can still be caught.
    settled(&a2);
    a2.stop();
    let a3 = agent(&env, "a3", &nodes, &[]);
    assert!(read_all(&env, &a3, "a3.raw") == want);
    assert_eq!(reads(&a3, "origin"), 0.0);
    let again = a3.metric("tessera_cache_tier_corrupt_total");
    assert!(again <= chunks - caught, "{again} chunks caught again, {caught} of {chunks} were repaired");
    settled(&a3);
    a3.stop();

    // Bit rot on node 0's disk: its own checksum catches it and the stripe
    // is a miss; the four other stripes rebuild each chunk.
    nodes.stop(0);
    for f in nodes.stripe_files(0) {
        let mut b = std::fs::read(&f).unwrap();
        let at = b.len() / 2;
        b[at] ^= 1;
        std::fs::write(&f, b).unwrap();
    }
    nodes.restart(0);
    let a4 = agent(&env, "a4", &nodes, &[]);
    assert!(read_all(&env, &a4, "a4.raw") == want);
    assert_eq!(reads(&a4, "origin"), 0.0);
    assert!(nodes.metric(0, "tessera_cachenode_corrupt_total") > 0.0);
}

#[test]
fn a_wrong_token_is_refused_and_replication_works_with_the_right_one() {
    if !have_nbd_tools() {
        return;
    }
    let (env, want, chunks) = imported();
    let (good, bad) = (env.path("token"), env.path("wrong-token"));
    std::fs::write(&good, "s3cret-token\n").unwrap();
    std::fs::write(&bad, "guess").unwrap();
    let nodes = Nodes::start(&env, 3, &["--token-file", good.to_str().unwrap()]);

    // By hand: no token and a wrong token are refused, the right one is not.
    let path = format!("/v1/stripes/{}", "ab".repeat(32));
    assert!(http_get(&nodes.addrs[0], &path, "").starts_with("HTTP/1.1 401"));
    assert!(http_get(&nodes.addrs[0], &path, "Authorization: Bearer guess\r\n").starts_with("HTTP/1.1 401"));
    assert!(http_get(&nodes.addrs[0], &path, "Authorization: Bearer s3cret-token\r\n").starts_with("HTTP/1.1 404"));
    assert_eq!(nodes.metric(0, "tessera_cachenode_unauthorized_total"), 2.0);

    // An agent with the wrong token reads correctly, from the origin.
    let a1 = agent(&env, "a1", &nodes, &["--ec", "1+2", "--token-file", bad.to_str().unwrap()]);
    assert!(read_all(&env, &a1, "a1.raw") == want);
    assert_eq!(reads(&a1, "origin"), chunks);
    assert_eq!(a1.metric("tessera_cache_tier_stripes_stored_total"), 0.0);
    a1.stop();
    assert!(nodes.metric(0, "tessera_cachenode_unauthorized_total") > 2.0);

    // With the right token, 1+2 is plain replication on three nodes.
    let a2 = agent(&env, "a2", &nodes, &["--ec", "1+2", "--token-file", good.to_str().unwrap()]);
    assert!(read_all(&env, &a2, "a2.raw") == want);
    settled(&a2);
    assert_eq!(a2.metric("tessera_cache_tier_stripes_stored_total"), chunks * 3.0);
    a2.stop();
    let a3 = agent(&env, "a3", &nodes, &["--ec", "1+2", "--token-file", good.to_str().unwrap()]);
    assert!(read_all(&env, &a3, "a3.raw") == want);
    assert_eq!(reads(&a3, "origin"), 0.0);

    // Bad options are clear errors.
    let out = env.tessera(&["serve", "--cache-nodes", &nodes.list(), "--ec", "4+1"]);
    assert!(!out.status.success() && text(&out).contains("--ec 4+1 needs at least 5 cache nodes"), "{}", text(&out));
    let out = env.tessera(&["serve", "--cache-nodes", "nowhere", "--ec", "1+0"]);
    assert!(!out.status.success() && text(&out).contains("not HOST:PORT"), "{}", text(&out));
}

#[test]
fn thirty_two_cold_readers_never_push_the_origin_past_its_bound() {
    if !have_nbd_tools() {
        return;
    }
    let (env, want, chunks) = imported();
    let nodes = Nodes::start(&env, 5, &[]);
    let a = agent(&env, "a", &nodes, &["--origin-concurrency", "4", "--origin-latency", "20ms"]);
    let children: Vec<_> = (0..32)
        .map(|i| {
            let out = env.path(&format!("c{i}.raw"));
            (Command::new("nbdcopy").arg(a.uri(&format!("bb@c{i}"))).arg(&out).spawn().unwrap(), out)
        })
        .collect();
    for (mut child, out) in children {
        assert!(child.wait().unwrap().success());
        assert!(std::fs::read(&out).unwrap() == want);
        std::fs::remove_file(out).unwrap();
    }
    let peak = a.metric("tessera_origin_requests_in_flight_peak");
    assert!((1.0..=4.0).contains(&peak), "origin in flight peaked at {peak}, bound 4");
    // Each chunk was fetched from the origin once, however many readers wanted it.
    assert_eq!(a.metric("tessera_origin_requests_total"), chunks);
    assert_eq!(a.metric("tessera_origin_requests_shed_total"), 0.0);
}

/// A network namespace per node, joined to the host by a veth pair
/// (host 10.78.I.1, node 10.78.I.2); deleted on drop.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn create(n: usize) -> Namespaces {
        let tag = std::process::id() % 10_000;
        let mut made = Namespaces(Vec::new());
        for i in 0..n {
            let (ns, veth) = (format!("tst{tag}n{i}"), format!("tsv{tag}n{i}"));
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
            run(Command::new("ip").args(["netns", "add", &ns]));
            made.0.push(ns.clone());
            run(Command::new("ip").args(["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns]));
            run(Command::new("ip").args(["addr", "add", &format!("10.78.{i}.1/24"), "dev", &veth]));
            run(Command::new("ip").args(["link", "set", &veth, "up"]));
            run(Command::new("ip").args(["-n", &ns, "addr", "add", &format!("10.78.{i}.2/24"), "dev", "eth0"]));
            run(Command::new("ip").args(["-n", &ns, "link", "set", "eth0", "up"]));
            run(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]));
        }
        made
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth pair, and so both.
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// `tessera bench relay` in front of a node, answering late (this kernel
/// has no sch_netem).
struct Relay(Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_node_late_beyond_the_timeout_in_its_own_namespace_is_never_waited_for() {
    if !have_nbd_tools() || !require("ip", "iproute2") {
        return;
    }
    if !is_root() {
        eprintln!("skipping: network namespaces need root");
        return;
    }
    let (env, want, chunks) = imported();
    let spaces = Namespaces::create(5);
    // Off loopback, a node needs a token, and TLS to keep it secret.
    let token = env.path("token");
    std::fs::write(&token, "netns-token\n").unwrap();
    let sans: Vec<String> = (0..5).map(|i| format!("IP:10.78.{i}.2")).collect();
    let certs = common::tls::Certs::make(&env.path("certs"), &sans.join(","));
    let (cert, key, ca) = (certs.file("server-cert.pem"), certs.file("server-key.pem"), certs.file("ca-cert.pem"));
    let mut nodes = Nodes::empty(&["--token-file", token.to_str().unwrap(), "--tls-cert", &cert, "--tls-key", &key]);
    nodes.client = vec!["--token-file".into(), token.to_str().unwrap().into(), "--cache-tls-ca".into(), ca.clone()];
    for i in 0..5 {
        nodes.addrs.push(format!("10.78.{i}.2:7070"));
        nodes.metrics.push(format!("10.78.{i}.2:7071"));
        nodes.dirs.push(env.path(&format!("node{i}")));
        nodes.children.push(None);
        nodes.netns.push(Some(spaces.0[i].clone()));
        // Node 4 listens behind a relay that answers 1.5 s late (reads give a
        // node 1 s).
        nodes.listen.push(if i == 4 { "10.78.4.2:7072".into() } else { nodes.addrs[i].clone() });
    }
    for i in 0..5 {
        nodes.restart(i);
    }
    let relay = nodes
        .command(4, env!("CARGO_BIN_EXE_tessera"))
        .args(["bench", "relay", "--listen", "10.78.4.2:7070", "--target", "10.78.4.2:7072", "--delay", "1500ms"])
        .spawn()
        .map(Relay)
        .expect("the relay starts");
    wait_listening("10.78.4.2:7070", "the relay");

    // Warm the tier (node 4 takes its stripes late, in the background).
    warm(&env, &nodes, &want);
    assert_eq!(nodes.metric(4, "tessera_cachenode_stripes{cache=\"disk\"}"), chunks);

    // A cold agent reads everything from the first four stripes of each
    // chunk: node 4's are cancelled, never awaited (waiting would time out
    // after 1 s and count as an error of node 4).
    let a2 = agent(&env, "a2", &nodes, &[]);
    assert!(read_all(&env, &a2, "a2.raw") == want);
    assert_eq!(reads(&a2, "origin"), 0.0);
    assert_eq!(reads(&a2, "cache"), chunks);
    assert_eq!(a2.metric("tessera_cache_tier_node_errors_total{node=\"10.78.4.2:7070\"}"), 0.0);
    assert!(a2.metric("tessera_cache_tier_stripes_cancelled_total") >= chunks);
    a2.stop();
    drop(relay);
    drop(nodes);
}

#[test]
fn a_cold_tier_and_a_full_origin_queue_shed_reads_with_a_clear_error() {
    if !have_nbd_tools() {
        return;
    }
    let (env, _, _) = imported();
    let nodes = Nodes::start(&env, 5, &[]);
    let log = env.path("agent.log");
    let cache = env.path("cache-shed");
    let socket = env.path("shed.sock");
    let ready = env.path("shed.ready");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["serve", "--nbd", &format!("unix:{}", socket.display()), "--metrics", "127.0.0.1:0", "--cache-dir", cache.to_str().unwrap()])
        .arg("--ready-file")
        .arg(&ready)
        .args(["--cache-nodes", &nodes.list(), "--origin-concurrency", "1", "--origin-queue", "2", "--origin-latency", "300ms"])
        .env("TESSERA_HOME", env.home())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let metrics_addr = wait_ready(&ready, &mut child, "tessera serve")["metrics"].as_str().unwrap().to_owned();
    // 16 readers of different parts of the disk at once: one origin request
    // runs, two wait, the rest are refused at once.
    let readers: Vec<Child> = (0..16)
        .map(|i| {
            Command::new("qemu-io")
                .args(["-f", "raw", "-r", &format!("nbd+unix:///bb?socket={}", socket.display()), "-c", &format!("read {}M 512k", i / 2)])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let failed = readers.into_iter().map(|c| c.wait_with_output().unwrap()).filter(|o| !o.status.success()).count();
    assert!(failed > 0, "every read succeeded, none was shed");
    let shed = metric(&metrics_addr, "tessera_origin_requests_shed_total");
    let peak = metric(&metrics_addr, "tessera_origin_requests_in_flight_peak");
    stop_child(&mut child, Duration::from_secs(10));
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(peak <= 1.0, "origin in flight peaked at {peak}");
    assert!(shed > 0.0, "nothing was shed:\n{log}");
    assert!(log.contains("origin overloaded"), "no clear error in the agent's log:\n{log}");
}

#[test]
fn tessera_run_boots_from_the_tier() {
    if !have_nbd_tools() || !require("qemu-system-x86_64", "qemu-system-x86") || !require("apt-get", "apt") {
        return;
    }
    let (env, _, _) = imported();
    let nodes = Nodes::start(&env, 5, &[]);
    let run = |cache: &str| -> serde_json::Value {
        let cache = env.path(cache);
        let out = tessera_run(
            &env.home(),
            &["bb", "--accel", "tcg", "--json", "--no-profile", "--cache-nodes", &nodes.list(), "--cache-dir", cache.to_str().unwrap()],
        )
        .output()
        .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(stdout.starts_with("hello from tessera\n"), "{}", text(&out));
        serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
    };
    // The first run fills the tier from the origin; a run on another
    // worker (an empty cache directory) boots from the tier alone.
    let first = run("cache-1");
    assert!(first["chunks_fetched"]["origin"].as_u64().unwrap() > 0, "{first}");
    let second = run("cache-2");
    assert_eq!(second["chunks_fetched"]["origin"], 0, "{second}");
    assert!(second["chunks_fetched"]["cache"].as_u64().unwrap() > 0, "{second}");
}
