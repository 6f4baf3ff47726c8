//! `tessera treemgr`: the function-tree manager as agents see it, over
//! HTTP, with a token, a state file across a restart, and the idle timeout;
//! and `tessera sim`, the fleet simulator on the same tree code.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Manager {
    child: Child,
    addr: String,
    metrics: String,
}

impl Manager {
    fn start(dir: &Path, extra: &[&str]) -> Manager {
        let ready = dir.join("treemgr.ready");
        let _ = std::fs::remove_file(&ready);
        let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["treemgr", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--ready-file"])
            .arg(&ready)
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("tessera treemgr starts");
        let bound = wait_ready(&ready, &mut child, "tessera treemgr");
        Manager { child, addr: bound["listen"].as_str().unwrap().to_owned(), metrics: bound["metrics"].as_str().unwrap().to_owned() }
    }

    /// `METHOD PATH` with a JSON body (POST) and the token; the status and
    /// the JSON answer (Null if it is not JSON).
    fn call(&self, method: &str, path: &str, token: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let body = if method == "POST" { serde_json::to_vec(&body).unwrap() } else { Vec::new() };
        let mut s = std::net::TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&body).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        let status = answer.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let json = answer.split("\r\n\r\n").nth(1).and_then(|b| serde_json::from_str(b).ok()).unwrap_or(serde_json::Value::Null);
        (status, json)
    }

    fn parent(&self, token: &str, function: &str, node: &str) -> serde_json::Value {
        self.call("GET", &format!("/v1/parent?function={function}&node={node}"), token, serde_json::Value::Null).1["parent"].clone()
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(10));
    }
}

#[test]
fn agents_learn_their_parents_and_the_trees_outlive_a_restart() {
    let env = Env::new();
    std::fs::create_dir_all(env.dir.path()).unwrap();
    let token_file = env.path("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let state = env.path("trees.json");
    let args = ["--token-file", token_file.to_str().unwrap(), "--state", state.to_str().unwrap(), "--idle-timeout", "3600s"];
    let m = Manager::start(env.dir.path(), &args);
    let tok = "s3cret-token";
    let node = |i: u32| format!("10.0.0.{i}:7001");

    // A wrong token, or none, is refused; a malformed request is answered 400.
    let (status, _) = m.call("POST", "/v1/join", "wrong", serde_json::json!({"function": "app", "node": node(0)}));
    assert_eq!(status, 401);
    let (status, _) = m.call("POST", "/v1/join", tok, serde_json::json!({"function": "app"}));
    assert_eq!(status, 400);

    // Seven agents join: the first is the root, the others fill the tree
    // breadth-first; each learns its parent and its ancestors.
    for i in 0..7 {
        let (status, placement) = m.call("POST", "/v1/join", tok, serde_json::json!({"function": "app", "node": node(i)}));
        assert_eq!(status, 200, "{placement}");
        let want = if i == 0 { serde_json::Value::Null } else { node((i - 1) / 2).into() };
        assert_eq!(placement["parent"], want, "agent {i}");
        assert_eq!(placement["root"], node(0));
    }
    let (_, placement) = m.call("GET", &format!("/v1/parent?function=app&node={}", node(6)), tok, serde_json::Value::Null);
    assert_eq!(placement["ancestors"], serde_json::json!([node(2), node(0)]));

    // An interior agent fails; its child asks again and has a new parent.
    let (status, moved) = m.call("POST", "/v1/failed", tok, serde_json::json!({"node": node(1)}));
    assert_eq!(status, 200);
    assert!(!moved["moved"].as_array().unwrap().is_empty());
    let p3 = m.parent(tok, "app", &node(3));
    assert!(p3 != serde_json::Value::Null && p3 != node(1), "agent 3 has a live parent: {p3}");
    assert!(metric(&m.metrics, "tessera_treemgr_moved_total") >= 2.0);
    assert_eq!(metric(&m.metrics, "tessera_treemgr_unauthorized_total"), 1.0);

    // A restart keeps every tree, in the same shape.
    let (_, before) = m.call("GET", "/v1/trees", tok, serde_json::Value::Null);
    assert_eq!(before["app"].as_array().unwrap().len(), 6);
    drop(m);
    let m = Manager::start(env.dir.path(), &args);
    let (_, after) = m.call("GET", "/v1/trees", tok, serde_json::Value::Null);
    assert_eq!(after, before);
    assert_eq!(m.parent(tok, "app", &node(3)), p3);
}

#[test]
fn silent_agents_leave_their_trees() {
    let env = Env::new();
    std::fs::create_dir_all(env.dir.path()).unwrap();
    let m = Manager::start(env.dir.path(), &["--idle-timeout", "1s"]);
    for n in ["a:1", "b:1", "c:1"] {
        assert_eq!(m.call("POST", "/v1/join", "", serde_json::json!({"function": "f", "node": n})).0, 200);
    }
    // "a" keeps reporting; the others fall silent.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert_eq!(m.call("POST", "/v1/heartbeat", "", serde_json::json!({"node": "a:1"})).1["known"], true);
        let (_, trees) = m.call("GET", "/v1/trees", "", serde_json::Value::Null);
        if trees == serde_json::json!({"f": ["a:1"]}) {
            break;
        }
        assert!(Instant::now() < deadline, "the silent agents are still there: {trees}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(metric(&m.metrics, "tessera_treemgr_expired_total") >= 2.0);
    // Off loopback, a manager needs a token.
    let out = Command::new(env!("CARGO_BIN_EXE_tessera")).args(["treemgr", "--listen", "0.0.0.0:0"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--token-file"), "{}", text(&out));
}

/// `tessera sim`: the JSON keys scripts read, a plot, and clear refusals.
#[test]
fn the_simulator_prints_its_keys_and_draws_its_plot() {
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("fleet.svg");
    let out = run(Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["sim", "--system", "faasnet,tessera,baseline,on-demand,kraken", "--vms", "15", "--invocations", "30", "--image-mb", "32", "--json", "--plot"])
        .arg(&plot));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 5);
    let keys = [
        "system",
        "vms",
        "invocations",
        "seconds_first_running",
        "seconds_all_running",
        "origin_bytes",
        "peer_bytes",
        "max_origin_gbps",
        "p50_seconds",
        "p99_seconds",
    ];
    for o in &lines {
        for k in keys {
            assert!(o.get(k).is_some(), "{k} missing in {o}");
        }
        assert_eq!(o["invocations"], 30, "{o}");
    }
    let all = |system: &str| lines.iter().find(|o| o["system"] == system).unwrap()["seconds_all_running"].as_f64().unwrap();
    assert!(all("tessera") < all("faasnet") && all("faasnet") < all("baseline"), "{lines:?}");
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>") && svg.contains("kraken"));

    for bad in [&["--fetch-fraction", "2"][..], &["--vms", "0"], &["--system", "bittorrent"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_tessera")).arg("sim").args(bad).output().unwrap();
        assert!(!out.status.success(), "{bad:?} was accepted");
        assert!(!out.stderr.is_empty(), "{bad:?}: no message");
    }
}
