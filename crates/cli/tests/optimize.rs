//! `tessera optimize` and `tessera import --optimize-with` on a real image
//! and real runs under TCG: the start's files are placed first, the tree is
//! unchanged, the result is the same every time, and the start reads fewer
//! chunks.

mod common;

use std::process::Output;

use common::*;

/// The start reads 8 of 64 files of 96 KiB, scattered over the layer.
const READS: &str = "cat /data/f03 /data/f60 /data/f17 /data/f41 /data/f09 /data/f33 /data/f52 /data/f26 >/dev/null; echo started";

fn report(o: &Output) -> serde_json::Value {
    assert_eq!(o.status.code(), Some(0), "{}", text(o));
    serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap()
}

/// Runs the start with an empty cache and no prefetch (recording the
/// profile where none is); returns the run report.
fn start(env: &Env, name: &str, cache: &str) -> serde_json::Value {
    let cache = env.path(cache);
    let profiled = env.tessera(&["profile", name, "--json"]).status.success();
    let mut args = vec![name, "--accel", "tcg", "--json", "--cache-dir", cache.to_str().unwrap()];
    if profiled {
        args.push("--no-profile");
    }
    args.extend(["--", "-c", READS]);
    let o = tessera_run(&env.home(), &args).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("started"), "{}", text(&o));
    report(&o)
}

/// Chunks the run read from the store.
fn fetched(run: &serde_json::Value) -> u64 {
    run["chunks_fetched"]["origin"].as_u64().unwrap()
}

fn data_files() -> Vec<(String, Vec<u8>)> {
    (0..64).map(|i| (format!("data/f{i:02}"), pseudo_random(96 * 1024, i))).collect()
}

#[test]
fn optimize_places_the_start_first_and_keeps_the_tree() {
    if !have_vm_tools() || !have_image_tools() {
        return;
    }
    let env = Env::new();
    let layout = env.path("layout");
    busybox_layout(&layout, "bb");
    let files = data_files();
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(p, d)| (p.as_str(), d.as_slice())).collect();
    add_layer(&layout, "bb", "app", &refs);
    env.import(&format!("oci:{}:app", layout.display()), "app", &[]);

    // Without a profile there is nothing to go by.
    let o = env.tessera(&["optimize", "app"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("no start-up profile"), "{}", text(&o));

    let before = start(&env, "app", "cache-1"); // records the profile
    let opt: serde_json::Value = serde_json::from_str(&env.ok(&["optimize", "app", "--as", "opt", "--json"])).unwrap();
    for key in ["name", "manifest", "start_chunks_before", "start_chunks_after", "start_bytes_before", "start_bytes_after", "new_chunks"] {
        assert!(opt.get(key).is_some(), "{key} missing: {opt}");
    }
    assert_eq!(opt["name"], "opt");
    assert!(opt["start_chunks_after"].as_u64() < opt["start_chunks_before"].as_u64(), "{opt}");
    assert!(opt["start_bytes_after"].as_u64() < opt["start_bytes_before"].as_u64(), "{opt}");

    // Same image and profile, same bytes.
    env.ok(&["optimize", "app", "--as", "opt-again"]);
    let (a, b, orig) = (env.path("opt.img"), env.path("opt-again.img"), env.path("app.img"));
    env.ok(&["export", "opt", a.to_str().unwrap()]);
    env.ok(&["export", "opt-again", b.to_str().unwrap()]);
    env.ok(&["export", "app", orig.to_str().unwrap()]);
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "optimize is not deterministic");
    let fsck = std::process::Command::new("e2fsck").arg("-fn").arg(&a).output().unwrap();
    assert_eq!(fsck.status.code(), Some(0), "{}", text(&fsck));
    if is_root() {
        let (ma, mo) = (env.path("mnt-opt"), env.path("mnt-app"));
        for (img, mnt) in [(&a, &ma), (&orig, &mo)] {
            std::fs::create_dir_all(mnt).unwrap();
            run(std::process::Command::new("mount").args(["-o", "loop,ro"]).arg(img).arg(mnt));
        }
        let same = tree::snapshot(&ma, &[]) == tree::snapshot(&mo, &[]);
        for mnt in [&ma, &mo] {
            run(std::process::Command::new("umount").arg(mnt));
        }
        assert!(same, "the optimized image's tree differs");
    }

    // The optimized image's start reads fewer chunks, and its profile moved with it.
    let shown: serde_json::Value = serde_json::from_str(&env.ok(&["profile", "opt", "--json"])).unwrap();
    assert_eq!(shown["chunks"].as_array().unwrap().len() as u64, opt["start_chunks_after"].as_u64().unwrap());
    let after = start(&env, "opt", "cache-2");
    assert!(fetched(&after) < fetched(&before), "before {before}, after {after}");

    // Optimizing the optimized image maps its moved profile through its own
    // layout: nothing left to gain, the same disk.
    let again: serde_json::Value = serde_json::from_str(&env.ok(&["optimize", "opt", "--as", "opt-twice", "--json"])).unwrap();
    assert_eq!(again["start_chunks_after"], again["start_chunks_before"], "{again}");
    let twice = env.path("opt-twice.img");
    env.ok(&["export", "opt-twice", twice.to_str().unwrap()]);
    assert!(std::fs::read(&twice).unwrap() == std::fs::read(&a).unwrap(), "re-optimizing changed the disk");

    // A new version imported with the old version's profile starts optimized too.
    let mut v2 = data_files();
    v2[5].1 = pseudo_random(96 * 1024, 1000);
    let refs: Vec<(&str, &[u8])> = v2.iter().map(|(p, d)| (p.as_str(), d.as_slice())).collect();
    add_layer(&layout, "bb", "app-v2", &refs);
    env.ok(&["import", &format!("oci:{}:app-v2", layout.display()), "--name", "app-v2", "--optimize-with", "app"]);
    env.ok(&["import", &format!("oci:{}:app-v2", layout.display()), "--name", "app-v2-plain"]);
    let optimized = start(&env, "app-v2", "cache-3");
    let plain = start(&env, "app-v2-plain", "cache-4");
    assert!(fetched(&optimized) < fetched(&plain), "optimized {optimized}, plain {plain}");
}
