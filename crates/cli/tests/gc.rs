//! Garbage collection by generations on the local store: `tessera rm` then
//! `tessera gc` reclaims exactly what no image uses; imports killed or
//! paused while the collector runs never break a listed image; a read of
//! an expired generation raises the alarm and still succeeds; salts rotate
//! with generations; tenants of a tenant dedup scope share no chunk.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn have_tools() -> bool {
    have_image_tools()
}

/// A layout with `base` (busybox) and three images on it, each with 3 MiB
/// of data of its own: `a`, `b`, `c`.
fn layouts(env: &Env) -> PathBuf {
    let layout = env.path("layout");
    busybox_layout(&layout, "base");
    for (i, tag) in ["a", "b", "c"].iter().enumerate() {
        add_layer(&layout, "base", tag, &[(&format!("data/{tag}"), &pseudo_random(3 << 20, i as u64 + 1))]);
    }
    layout
}

fn source(layout: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", layout.display())
}

/// One `tessera gc --json` step with no waiting.
fn gc(env: &Env) -> serde_json::Value {
    gc_with_grace(env, "0s")
}

fn gc_with_grace(env: &Env, grace: &str) -> serde_json::Value {
    serde_json::from_str(&env.ok(&["gc", "--json", "--grace", grace, "--lease", "0s", "--rotate-after", "0s"])).expect("gc --json prints JSON")
}

/// Steps until a generation was deleted and none is on its way out.
fn gc_to_end(env: &Env) -> Vec<serde_json::Value> {
    let mut steps = Vec::new();
    for _ in 0..6 {
        let r = gc(env);
        let done = r["step"] == "deleted" && r["retired"].as_array().unwrap().is_empty() && r["expired"].as_array().unwrap().is_empty();
        steps.push(r);
        if done {
            return steps;
        }
    }
    panic!("gc did not reach its end state: {steps:#?}");
}

/// Every chunk file of the store (all generations), with its size.
fn chunk_files(home: &Path) -> BTreeMap<String, u64> {
    let mut dirs = vec![home.join("chunks")];
    if let Ok(gens) = std::fs::read_dir(home.join("gen")) {
        dirs.extend(gens.flatten().map(|g| g.path().join("chunks")));
    }
    let mut out = BTreeMap::new();
    for dir in dirs {
        let Ok(fans) = std::fs::read_dir(&dir) else { continue };
        for fan in fans.flatten().filter(|f| f.file_name().len() == 2) {
            for f in std::fs::read_dir(fan.path()).unwrap().flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if name.len() == 64 {
                    out.insert(name, f.metadata().unwrap().len());
                }
            }
        }
    }
    out
}

/// The chunk ids image `name` uses, from its manifest's refs.
fn refs(env: &Env, name: &str) -> BTreeSet<String> {
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(env.home().join(format!("images/{name}.json"))).unwrap()).unwrap();
    let g = r["generation"].as_u64().unwrap_or(0);
    let dir = if g == 0 { env.home() } else { env.home().join(format!("gen/{g}")) };
    let bytes = std::fs::read(dir.join(format!("manifests/{}.refs", r["manifest"].as_str().unwrap()))).unwrap();
    let magic = b"tessera refs 1\n".len();
    bytes[magic..bytes.len() - 32].chunks(32).map(hex).collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn verifies(env: &Env, name: &str) -> bool {
    env.tessera(&["verify", name]).status.success()
}

#[test]
fn rm_then_gc_reclaims_exactly_the_chunks_no_image_uses() {
    if !have_tools() {
        return;
    }
    let env = Env::new();
    let layout = layouts(&env);
    env.import(&source(&layout, "a"), "a", &[]);
    env.import(&source(&layout, "b"), "b", &[]);
    let before = chunk_files(&env.home());
    let (a, b) = (refs(&env, "a"), refs(&env, "b"));
    assert!(!a.is_disjoint(&b), "a and b share their base");
    let b_disk = env.path("b-before.raw");
    env.ok(&["export", "b", b_disk.to_str().unwrap()]);

    env.ok(&["rm", "a"]);
    let steps = gc_to_end(&env);
    let kinds: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["rotated", "migrated", "deleted"], "{steps:#?}");
    assert_eq!(steps[1]["migrated_images"], 1);
    assert_eq!(steps[1]["copied_chunks"].as_u64().unwrap() as usize, b.len());

    // The store holds exactly b's chunks; what only a used is gone, and the
    // bytes freed are exactly theirs.
    let after = chunk_files(&env.home());
    assert_eq!(after.keys().cloned().collect::<BTreeSet<_>>(), b);
    let only_a: Vec<&String> = a.difference(&b).collect();
    assert!(!only_a.is_empty());
    let freed: u64 = only_a.iter().map(|id| before[*id]).sum();
    let last = &steps[2];
    assert_eq!(last["deleted_bytes"].as_u64().unwrap(), freed, "{last}");
    assert_eq!(last["deleted"], serde_json::json!([0]));
    assert_eq!(last["live_images"], 1);
    assert!(!env.home().join("chunks").exists() && !env.home().join("manifests").exists(), "generation 0 is gone whole");

    // b reads as before, and every command sees it in its new generation.
    assert!(verifies(&env, "b"));
    let b_disk_after = env.path("b-after.raw");
    env.ok(&["export", "b", b_disk_after.to_str().unwrap()]);
    assert!(std::fs::read(&b_disk).unwrap() == std::fs::read(&b_disk_after).unwrap(), "b exports the same bytes");
    let inspect: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "b", "--json"])).unwrap();
    assert_eq!(inspect["generation"], 1);
    assert_eq!(env.image_names(), vec!["b"]);

    // An idle store stays at its end: the next rotation waits for its age.
    let r: serde_json::Value = serde_json::from_str(&env.ok(&["gc", "--json"])).unwrap();
    assert_eq!(r["step"], "waiting", "{r}");
    assert_eq!(chunk_files(&env.home()).len(), b.len());

    // b boots after the collection, if QEMU is here.
    if Command::new("sh").args(["-c", "command -v qemu-system-x86_64"]).output().is_ok_and(|o| o.status.success()) {
        let out = tessera_run(&env.home(), &["b", "--accel", "tcg"]).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from tessera\n", "{}", text(&out));
    }
}

/// A tiny deterministic random source for the rounds.
struct Rng(u64);

impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn fifty_rounds_of_gc_steps_and_killed_imports_never_break_a_listed_image() {
    if !have_tools() {
        return;
    }
    let env = Env::new();
    let layout = layouts(&env);
    let tags = ["base", "a", "b", "c"];
    let names = ["n0", "n1", "n2", "n3"];
    let mut rng = Rng(0x7e55e7a);
    let mut log = Vec::new();
    for round in 0..50 {
        let action = rng.next(6);
        let (tag, name) = (tags[rng.next(4) as usize], names[rng.next(4) as usize]);
        match action {
            0 | 1 => {
                let r = gc(&env);
                log.push(format!("{round}: gc {}", r["step"]));
            }
            2 => {
                env.import(&source(&layout, tag), name, &[]);
                log.push(format!("{round}: import {tag} as {name}"));
            }
            3 | 4 => {
                let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
                    .args(["import", &source(&layout, tag), "--name", name, "--headroom", "64MiB"])
                    .env("TESSERA_HOME", env.home())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                let after = rng.next(400);
                std::thread::sleep(Duration::from_millis(after));
                let _ = child.kill();
                let status = child.wait().unwrap();
                log.push(format!("{round}: import {tag} as {name} killed after {after} ms ({status})"));
            }
            _ => {
                let out = env.tessera(&["rm", name]);
                log.push(format!("{round}: rm {name}: {}", out.status));
            }
        }
        for listed in env.image_names() {
            assert!(verifies(&env, &listed), "round {round}: {listed} fails verify after:\n{}", log.join("\n"));
        }
    }
    // And at the end of a collection, the store holds exactly what the
    // listed images use.
    for name in names {
        if !env.image_names().contains(&name.to_owned()) {
            continue;
        }
        assert!(verifies(&env, name));
    }
    gc_to_end(&env);
    let used: BTreeSet<String> = env.image_names().iter().flat_map(|n| refs(&env, n)).collect();
    assert_eq!(chunk_files(&env.home()).keys().cloned().collect::<BTreeSet<_>>(), used, "{}", log.join("\n"));
    for listed in env.image_names() {
        assert!(verifies(&env, &listed), "{listed} after the final collection");
    }
}

#[test]
fn an_import_paused_after_a_dedup_hit_while_gc_runs_still_yields_a_verifying_image() {
    if !have_tools() {
        return;
    }
    let env = Env::new();
    let layout = layouts(&env);
    // v2 is a on top of a large layer of its own: a's chunks are found
    // (dedup hits) well before the import ends.
    add_layer(&layout, "a", "v2", &[("data/large", &pseudo_random(96 << 20, 9))]);
    env.import(&source(&layout, "a"), "v1", &[]);

    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["import", &source(&layout, "v2"), "--name", "v2", "--headroom", "64MiB", "--json", "--threads", "1"])
        .env("TESSERA_HOME", env.home())
        .env("RUST_LOG", "tessera_store=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "the import ended before any dedup hit");
        if line.contains("(dedup)") {
            break;
        }
    }
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    // The signal is delivered asynchronously: wait until the import is stopped.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the import is still running");
        // The state follows the command name, which is in parentheses.
        if stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()) == Some("T") {
            break;
        }
        assert!(Instant::now() < deadline, "the import did not stop: {stat}");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Drain its log meanwhile so it never blocks on a full pipe.
    let drain = std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));

    let r = gc(&env);
    assert_eq!(r["step"], "rotated", "{r}");
    for _ in 0..3 {
        let r = gc(&env);
        assert_eq!(r["step"], "waiting", "the paused import's lease holds the retired generation: {r}");
        assert!(r["waiting"].as_str().unwrap().contains("lease"), "{r}");
    }
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    let out = child.wait_with_output().unwrap();
    drain.join().unwrap().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["generation"], 0, "it imported into the generation it started in");

    gc_to_end(&env);
    for name in ["v1", "v2"] {
        assert!(verifies(&env, name), "{name}");
        let inspect: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", name, "--json"])).unwrap();
        assert_eq!(inspect["generation"], 1);
    }
}

/// Reads 4 KiB at `offset` of an export over NBD.
fn nbd_read(c: &mut nbd::RawClient, offset: u64) -> Vec<u8> {
    c.request(0, offset, 4096);
    c.read_reply_data(4096)
}

#[test]
fn a_read_of_an_expired_generation_raises_the_alarm_and_still_succeeds() {
    if !have_tools() {
        return;
    }
    let env = Env::new();
    let layout = layouts(&env);
    env.import(&source(&layout, "a"), "a", &[]);
    let disk = env.path("a.raw");
    env.ok(&["export", "a", disk.to_str().unwrap()]);
    let disk = std::fs::read(&disk).unwrap();
    let inspect: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "a", "--json"])).unwrap();
    let layer = inspect["geometry"]["layers"].as_array().unwrap().last().unwrap().clone();
    let first = layer["first_chunk"].as_u64().unwrap();
    assert!(layer["chunks"].as_u64().unwrap() >= 6, "{layer}");
    let at = |i: u64| (first + i) * 512 * 1024;

    let log = env.path("serve.log");
    let served = {
        let socket = env.path("nbd.sock");
        let ready = env.path("ready.json");
        let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["serve", "--nbd", &format!("unix:{}", socket.display()), "--metrics", "127.0.0.1:0", "--ready-file"])
            .arg(&ready)
            .env("TESSERA_HOME", env.home())
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let bound = wait_ready(&ready, &mut child, "tessera serve");
        (child, socket, bound["metrics"].as_str().unwrap().to_owned())
    };
    let (mut child, socket, metrics) = served;
    let mut c = nbd::RawClient::go(&socket, "a").expect("a is exported");
    assert_eq!(nbd_read(&mut c, at(0)), disk[at(0) as usize..at(0) as usize + 4096]);

    // The collector moves a to generation 1 and expires generation 0, which
    // the open disk still reads from.
    assert_eq!(gc(&env)["step"], "rotated");
    let r = gc_with_grace(&env, "1h");
    assert_eq!(r["expired"], serde_json::json!([0]), "{r}");
    std::thread::sleep(Duration::from_millis(2100)); // readers trust the lifecycle 2 s
    assert_eq!(nbd_read(&mut c, at(1)), disk[at(1) as usize..at(1) as usize + 4096], "the read succeeds");
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&metrics, "tessera_gc_expired_reads_total") < 1.0 {
        assert!(Instant::now() < deadline, "no expired read was counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("image a read generation 0") && logged.contains("expired"), "{logged}");
    assert_eq!(std::fs::read_dir(env.home().join("alarms")).unwrap().count(), 1, "one alarm per image and generation");

    // The next step puts generation 0 back; nothing is deleted meanwhile.
    let r = gc(&env);
    assert_eq!(r["step"], "reinstated", "{r}");
    assert_eq!(r["retired"], serde_json::json!([0]));
    assert!(env.home().join("chunks").exists());
    assert_eq!(std::fs::read_dir(env.home().join("alarms")).unwrap().count(), 0);

    // Collected for good: the open disk follows a into generation 1.
    gc_to_end(&env);
    assert!(!env.home().join("chunks").exists());
    assert_eq!(nbd_read(&mut c, at(2)), disk[at(2) as usize..at(2) as usize + 4096], "reads follow the image to its new generation");
    assert_eq!(nbd_read(&mut c, at(3)), disk[at(3) as usize..at(3) as usize + 4096]);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("moved from store generation 0 to 1"), "{logged}");
    drop(c);
    stop_child(&mut child, Duration::from_secs(20));
}

#[test]
fn salts_rotate_with_generations_and_tenants_of_a_tenant_scope_share_nothing() {
    if !have_tools() {
        return;
    }
    let env = Env::new();
    let layout = layouts(&env);
    let first = env.import(&source(&layout, "a"), "a1", &[]);
    let stored = first["chunks"].as_u64().unwrap() - first["holes"].as_u64().unwrap();
    assert_eq!(first["new_chunks"].as_u64().unwrap(), stored);
    let again = env.import(&source(&layout, "a"), "a-same", &[]);
    assert_eq!(again["new_chunks"], 0, "one generation, one salt: everything dedups");

    // A rotation: the same image stores all its chunks anew.
    assert_eq!(gc(&env)["step"], "rotated");
    let rotated = env.import(&source(&layout, "a"), "a2", &[]);
    assert_eq!(rotated["generation"], 1);
    assert_eq!(rotated["new_chunks"].as_u64().unwrap(), stored, "no dedup across salt epochs");
    assert!(refs(&env, "a1").is_disjoint(&refs(&env, "a2")));
    for name in ["a1", "a-same", "a2"] {
        assert!(verifies(&env, name), "{name} still reads");
    }
    let inspect: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "a2", "--json"])).unwrap();
    assert_eq!((inspect["salt_epoch"].as_u64(), inspect["dedup_scope"].as_str()), (Some(1), Some("global")));

    // Global scope: tenants share chunks. Tenant scope: they share none.
    let g1 = env.import(&source(&layout, "b"), "g1", &["--tenant", "acme"]);
    let g2 = env.import(&source(&layout, "b"), "g2", &["--tenant", "globex"]);
    assert!(g1["new_chunks"].as_u64().unwrap() > 0);
    assert_eq!(g2["new_chunks"], 0, "{g2}");
    let t1 = env.import(&source(&layout, "b"), "t1", &["--tenant", "acme", "--dedup-scope", "tenant"]);
    let t2 = env.import(&source(&layout, "b"), "t2", &["--tenant", "globex", "--dedup-scope", "tenant"]);
    let b_stored = t1["chunks"].as_u64().unwrap() - t1["holes"].as_u64().unwrap();
    assert_eq!(t1["new_chunks"].as_u64().unwrap(), b_stored);
    assert_eq!(t2["new_chunks"].as_u64().unwrap(), b_stored, "{t2}");
    assert!(refs(&env, "t1").is_disjoint(&refs(&env, "t2")));
    assert!(refs(&env, "t1").is_disjoint(&refs(&env, "g1")));
    let t3 = env.import(&source(&layout, "b"), "t3", &["--tenant", "acme", "--dedup-scope", "tenant"]);
    assert_eq!(t3["new_chunks"], 0, "one tenant still dedups with itself");
    for name in ["g1", "g2", "t1", "t2", "t3"] {
        assert!(verifies(&env, name), "{name}");
    }
}

#[test]
fn an_import_that_outlives_its_lease_names_nothing() {
    if !have_tools() {
        return;
    }
    let env = Env::new();
    let layout = layouts(&env);
    env.import(&source(&layout, "a"), "a", &[]);
    let out = env.tessera(&["import", &source(&layout, "b"), "--name", "b", "--lease", "0s", "--headroom", "64MiB"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("outlived its lease"), "{}", text(&out));
    assert_eq!(env.image_names(), vec!["a"]);
    let out = env.tessera(&["import", &source(&layout, "b"), "--name", "a", "--lease", "0s", "--headroom", "64MiB"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let inspect: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "a", "--json"])).unwrap();
    assert!(inspect["source"].as_str().unwrap().ends_with(":a"), "a still names the first import: {inspect}");
    assert!(std::fs::read_dir(env.home().join("leases/0")).map(|d| d.count()).unwrap_or(0) == 0, "no lease is left behind");
    // What the failed imports stored is garbage the collector reclaims.
    let steps = gc_to_end(&env);
    assert_eq!(steps.last().unwrap()["live_images"], 1);
    assert_eq!(chunk_files(&env.home()).keys().cloned().collect::<BTreeSet<_>>(), refs(&env, "a"));
    assert!(verifies(&env, "a"));
}
