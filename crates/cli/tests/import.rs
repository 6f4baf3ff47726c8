//! Import end to end with real peers: umoci-built images, a local
//! docker-registry fed by skopeo, docker-archive tars, e2fsck and loop mounts.

mod common;

use std::process::Command;

use common::*;

fn have_tools() -> bool {
    have_image_tools() && require("e2fsck", "e2fsprogs")
}

#[test]
fn oci_layout_import_matches_umoci_unpack() {
    if !have_tools() || !is_root() {
        return;
    }
    let env = Env::new();
    let layout = env.path("layout");
    busybox_layout(&layout, "bb");
    let report = env.import(&format!("oci:{}:bb", layout.display()), "bb", &[]);
    for key in ["name", "manifest", "disk_bytes", "chunks", "holes", "new_chunks", "new_bytes", "seconds"] {
        assert!(report.get(key).is_some(), "import --json lacks {key}: {report}");
    }
    assert_eq!(report["name"], "bb");
    assert!(report["new_chunks"].as_u64().unwrap() > 0);
    assert_eq!(env.image_names(), vec!["bb"]);

    // The image verifies and exports to a filesystem e2fsck accepts.
    assert!(env.ok(&["verify", "bb"]).contains("all"));
    let img = env.path("bb.img");
    env.ok(&["export", "bb", img.to_str().unwrap()]);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), report["disk_bytes"].as_u64().unwrap());
    let fsck = Command::new("e2fsck").arg("-fn").arg(&img).output().unwrap();
    assert!(fsck.status.success(), "e2fsck -fn complained:\n{}", text(&fsck));

    // The mounted tree equals what umoci unpacks.
    let bundle = env.path("unpacked");
    run(Command::new("umoci").args(["unpack", "--image", &format!("{}:bb", layout.display())]).arg(&bundle));
    let mount = LoopMount::new(&img);
    let ours = tree::snapshot(mount.dir.path(), &["lost+found"]);
    let theirs = tree::snapshot(&bundle.join("rootfs"), &[]);
    assert_eq!(ours.hard_links, theirs.hard_links);
    assert!(!ours.hard_links.is_empty(), "the fixture has a hard link");
    for (path, want) in &theirs.entries {
        let got = ours.entries.get(path).unwrap_or_else(|| panic!("{path} missing from the flattened image"));
        assert_eq!(got, want, "{path} differs");
    }
    assert_eq!(ours.entries.len(), theirs.entries.len(), "extra entries in the flattened image");
    assert_eq!(ours.entries["bin/suid"].mode & 0o7777, 0o4755);
    assert_eq!(ours.entries["var/empty"].uid, 1000);
    assert_eq!(ours.entries["etc/greeting"].xattrs.get("user.tessera").map(Vec::as_slice), Some(&b"xattr-value"[..]));

    // The OCI config made it into the manifest.
    let inspect: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "bb", "--json"])).unwrap();
    assert_eq!(inspect["config"]["entrypoint"], serde_json::json!(["/bin/sh"]));
    assert_eq!(inspect["config"]["cmd"], serde_json::json!(["-c", "cat /etc/greeting"]));
    assert_eq!(inspect["config"]["working_dir"], "/etc");
    assert_eq!(inspect["config"]["user"], "1000:1000");
    assert!(inspect["config"]["env"].as_array().unwrap().iter().any(|e| e == "GREETING=hello"));
    assert!(inspect["source_digest"].as_str().unwrap().starts_with("sha256:"));

    // The image loop-mounts read-write too.
    drop(mount);
    let rw = tempfile::tempdir().unwrap();
    run(Command::new("mount").args(["-o", "loop"]).arg(&img).arg(rw.path()));
    let wrote = std::fs::write(rw.path().join("tmp/new-file"), vec![7u8; 1 << 20]);
    let _ = Command::new("umount").arg(rw.path()).status();
    wrote.expect("the root is writable");
    let fsck = Command::new("e2fsck").arg("-fn").arg(&img).output().unwrap();
    assert!(fsck.status.success(), "e2fsck after a write:\n{}", text(&fsck));
}

#[test]
fn same_image_same_bytes_and_no_new_chunks() {
    if !have_tools() {
        return;
    }
    let env = Env::new();
    let layout = env.path("layout");
    busybox_layout(&layout, "bb");
    let src = format!("oci:{}:bb", layout.display());
    let first = env.import(&src, "one", &["--threads", "1"]);
    let second = env.import(&src, "two", &["--threads", "2"]);
    assert_eq!(second["new_chunks"], 0, "re-importing an unchanged image adds no chunks");
    assert_eq!(second["new_bytes"], 0);
    assert_ne!(first["manifest"], second["manifest"], "each manifest is sealed under its own data key");
    let (a, b) = (env.path("one.img"), env.path("two.img"));
    env.ok(&["export", "one", a.to_str().unwrap()]);
    env.ok(&["export", "two", b.to_str().unwrap()]);
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "byte-identical across runs and thread counts");

    // A second store (another machine) gets the same bytes too.
    let other = Env::new();
    other.import(&src, "three", &[]);
    let c = other.path("three.img");
    other.ok(&["export", "three", c.to_str().unwrap()]);
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&c).unwrap());
}

#[test]
fn an_added_layer_costs_little_more_than_itself() {
    if !have_tools() {
        return;
    }
    let env = Env::new();
    let layout = env.path("layout");
    busybox_layout(&layout, "base");
    let s: usize = 300_000;
    let payload: Vec<u8> = (0..s).map(|i| (i * 31 % 253) as u8).collect();
    add_layer(&layout, "base", "plus", &[("opt/app/data.bin", &payload)]);
    let base = env.import(&format!("oci:{}:base", layout.display()), "base", &[]);
    let plus = env.import(&format!("oci:{}:plus", layout.display()), "plus", &[]);
    let chunk = 512 * 1024u64;
    let new = plus["new_chunks"].as_u64().unwrap();
    let disk = plus["disk_bytes"].as_u64().unwrap();
    let layer_chunks = (s as u64).div_ceil(chunk);
    let allowance = (disk / 50).div_ceil(chunk);
    assert!(new <= layer_chunks + allowance, "added {new} chunks for a {s}-byte layer (allowed {layer_chunks} + {allowance}); base had {}", base["new_chunks"]);
}

#[test]
fn registry_and_docker_archive() {
    if !have_tools() || !require("skopeo", "skopeo") || !require("docker-registry", "docker-registry") {
        return;
    }
    let env = Env::new();
    let layout = env.path("layout");
    busybox_layout(&layout, "bb");
    let reg = Registry::start(Auth::None);
    reg.push(&layout, "bb", "team/app", None);
    let via_registry = env.import(&format!("docker://{}/team/app:bb", reg.addr), "reg", &["--insecure"]);
    assert_eq!(via_registry["name"], "reg");
    // By digest as well.
    let digest = env.ok(&["inspect", "reg", "--json"]);
    let digest: serde_json::Value = serde_json::from_str(&digest).unwrap();
    let by_digest = format!("docker://{}/team/app@{}", reg.addr, digest["source_digest"].as_str().unwrap());
    let again = env.import(&by_digest, "reg2", &["--insecure"]);
    assert_eq!(again["new_chunks"], 0);

    // docker-archive, written by skopeo.
    let archive = env.path("bb.tar");
    run(Command::new("skopeo")
        .args(["copy", "--quiet"])
        .arg(format!("oci:{}:bb", layout.display()))
        .arg(format!("docker-archive:{}:team/app:bb", archive.display())));
    let from_archive = env.import(&format!("docker-archive:{}", archive.display()), "arch", &[]);
    assert_eq!(from_archive["new_chunks"], 0, "the same layers give the same chunks whatever the transport");
    let (a, b) = (env.path("reg.img"), env.path("arch.img"));
    env.ok(&["export", "reg", a.to_str().unwrap()]);
    env.ok(&["export", "arch", b.to_str().unwrap()]);
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());

    // A missing tag is a clear error, and nothing is listed.
    let out = env.tessera(&["import", &format!("docker://{}/team/app:nope", reg.addr), "--insecure", "--name", "nope"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("not found"), "{}", text(&out));
    assert!(!env.image_names().contains(&"nope".to_string()));
}

#[test]
fn registry_with_basic_auth() {
    registry_with_auth(Auth::Basic);
}

#[test]
fn registry_with_token_auth() {
    registry_with_auth(Auth::Token);
}

fn registry_with_auth(auth: Auth) {
    if !have_tools() || !require("skopeo", "skopeo") || !require("docker-registry", "docker-registry") || !require("openssl", "openssl") {
        return;
    }
    let env = Env::new();
    let layout = env.path("layout");
    busybox_layout(&layout, "bb");
    let reg = Registry::start(auth);
    reg.push(&layout, "bb", "private/app", Some("tessera:s3cret"));
    let src = format!("docker://{}/private/app:bb", reg.addr);

    let out = env.tessera(&["import", &src, "--insecure"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("credentials"), "{}", text(&out));
    let out = env.tessera(&["import", &src, "--insecure", "--creds", "tessera:wrong"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("refused"), "{}", text(&out));

    env.import(&src, "with-flag", &["--insecure", "--creds", "tessera:s3cret"]);

    // Credentials from the docker config file.
    let docker = env.path("docker");
    std::fs::create_dir_all(&docker).unwrap();
    let auth = base64_encode(b"tessera:s3cret");
    std::fs::write(docker.join("config.json"), format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.addr)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["import", &src, "--insecure", "--name", "from-config", "--json"])
        .env("TESSERA_HOME", env.home())
        .env("DOCKER_CONFIG", &docker)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

fn base64_encode(b: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[test]
fn debian_minbase_with_python() {
    // The larger real image: Debian minbase with python3 from debootstrap.
    if !have_tools() || !require("debootstrap", "debootstrap") || !is_root() {
        return;
    }
    let env = Env::new();
    let layout = env.path("minbase");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/minbase-image.sh");
    run(Command::new("sh").arg(script).arg(&layout).arg("python3-minimal"));
    let report = env.import(&format!("oci:{}:minbase", layout.display()), "deb", &[]);
    assert!(report["disk_bytes"].as_u64().unwrap() > 100 << 20);
    let img = env.path("deb.img");
    env.ok(&["export", "deb", img.to_str().unwrap()]);
    let fsck = Command::new("e2fsck").arg("-fn").arg(&img).output().unwrap();
    assert!(fsck.status.success(), "e2fsck -fn:\n{}", text(&fsck));
    let bundle = env.path("unpacked");
    run(Command::new("umoci").args(["unpack", "--image", &format!("{}:minbase", layout.display())]).arg(&bundle));
    let mount = LoopMount::new(&img);
    let ours = tree::snapshot(mount.dir.path(), &["lost+found"]);
    let theirs = tree::snapshot(&bundle.join("rootfs"), &[]);
    assert_eq!(ours.entries.len(), theirs.entries.len());
    for (path, want) in &theirs.entries {
        assert_eq!(ours.entries.get(path), Some(want), "{path} differs");
    }
    assert_eq!(ours.hard_links, theirs.hard_links);
    assert!(ours.entries.contains_key("usr/bin/python3"));
    drop(mount);

    // And it boots: a python entrypoint in a microVM, reading a little of the disk.
    if require("qemu-system-x86_64", "qemu-system-x86") {
        let image = format!("{}:minbase", layout.display());
        run(Command::new("umoci").args([
            "config",
            "--image",
            &image,
            "--tag",
            "py",
            "--config.entrypoint",
            "python3",
            "--config.cmd",
            "-c",
            "--config.cmd",
            "import sys; print(sum(range(10))); sys.exit(4)",
        ]));
        env.import(&format!("oci:{}:py", layout.display()), "py", &[]);
        let out = tessera_run(&env.home(), &["py", "--accel", "tcg", "--json"]).output().unwrap();
        assert_eq!(out.status.code(), Some(4), "{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut lines = stdout.lines();
        assert_eq!(lines.next(), Some("45"));
        let report: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
        assert!(report["bytes_fetched"].as_u64().unwrap() * 10 < report["disk_bytes"].as_u64().unwrap(), "{report}");
    }
}
