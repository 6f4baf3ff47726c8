//! Bad input and faults: every one is a clear error naming the image, layer
//! or chunk, and nothing half-written becomes visible.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::oci::{layout, tar_of, Blob, Comp};
use common::*;

/// Imports `oci:DIR:t` and expects failure whose message contains every `needle`.
fn import_fails(env: &Env, dir: &std::path::Path, needles: &[&str]) {
    let out = env.tessera(&["import", &format!("oci:{}:t", dir.display()), "--name", "bad"]);
    assert!(!out.status.success(), "import should fail:\n{}", text(&out));
    assert_eq!(chunk_files(env), 0, "a failed import leaves nothing in the store");
    let msg = String::from_utf8_lossy(&out.stderr);
    for n in needles {
        assert!(msg.contains(n), "error {msg:?} should mention {n:?}");
    }
    assert!(!env.image_names().contains(&"bad".to_string()), "a failed import must not be listed");
}

/// Files in the chunk store, temporaries included.
fn chunk_files(env: &Env) -> usize {
    let Ok(dirs) = std::fs::read_dir(env.home().join("chunks")) else { return 0 };
    dirs.map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().count()).sum()
}

fn good_tar() -> Vec<u8> {
    let big: Vec<u8> = (0..2_000_000u32).map(|i| (i % 239) as u8).collect();
    tar_of(&[("etc/", b""), ("etc/hostname", b"box\n"), ("big.bin", &big)])
}

#[test]
fn corrupt_and_truncated_tars() {
    let env = Env::new();
    // A header whose checksum is wrong.
    let mut corrupt = good_tar();
    corrupt[100] ^= 0xff;
    corrupt[148] ^= 0x11;
    let dir = env.path("corrupt");
    layout(&dir, "t", &[Blob::from_tar(&corrupt, Comp::Gzip)]);
    import_fails(&env, &dir, &["layer 1/1"]);

    // Cut in the middle of a file's data.
    let mut truncated = good_tar();
    truncated.truncate(1_000_000);
    let dir = env.path("truncated");
    layout(&dir, "t", &[Blob::from_tar(&truncated, Comp::None)]);
    import_fails(&env, &dir, &["layer 1/1", "big.bin"]);
}

#[test]
fn bad_compression() {
    let env = Env::new();
    for (comp, media) in [(Comp::Gzip, "gzip"), (Comp::Zstd, "zstd")] {
        let mut blob = Blob::from_tar(&good_tar(), comp);
        let n = blob.bytes.len();
        for b in &mut blob.bytes[n / 3..n / 3 + 64] {
            *b = !*b;
        }
        let dir = env.path(media);
        layout(&dir, "t", &[blob]);
        import_fails(&env, &dir, &["layer 1/1"]);
    }
}

#[test]
fn digest_mismatches_are_refused_before_anything_is_stored() {
    let env = Env::new();
    let dir = env.path("tampered");
    let blob = Blob::from_tar(&good_tar(), Comp::Gzip);
    let digest = tessera_oci::Digest::sha256(&blob.bytes);
    layout(&dir, "t", &[blob]);
    // Same length, other bytes.
    let path = dir.join("blobs/sha256").join(digest.hex());
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    import_fails(&env, &dir, &["layer 1/1", "digest mismatch"]);
    assert_eq!(chunk_files(&env), 0, "no chunk (nor temporary) was left in the store");

    // A wrong diff id in the config.
    let dir = env.path("diffid");
    let mut blob = Blob::from_tar(&good_tar(), Comp::None);
    blob.diff_id = tessera_oci::Digest::sha256(b"something else").to_string();
    layout(&dir, "t", &[blob]);
    import_fails(&env, &dir, &["layer 1/1", "digest mismatch"]);
}

#[test]
fn unknown_media_type() {
    let env = Env::new();
    let dir = env.path("lz4");
    let mut blob = Blob::from_tar(&good_tar(), Comp::None);
    blob.media_type = "application/vnd.oci.image.layer.v1.tar+lz4".into();
    layout(&dir, "t", &[blob]);
    import_fails(&env, &dir, &["unsupported layer media type", "lz4"]);
}

#[test]
fn hostile_paths_are_neutralised_or_refused() {
    if !require("debugfs", "e2fsprogs") {
        return;
    }
    let env = Env::new();
    // `..` is resolved against the root, and a symlinked parent is followed
    // inside the image, never outside it.
    let mut l1 = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    l1.append_link(&mut h, "evil", "../../../../tmp").unwrap();
    let l1 = l1.into_inner().unwrap();
    let l2 = tar_of(&[("../../escape", b"dots"), ("evil/through-link", b"link")]);
    let dir = env.path("hostile");
    layout(&dir, "t", &[Blob::from_tar(&l1, Comp::None), Blob::from_tar(&l2, Comp::None)]);
    env.ok(&["import", &format!("oci:{}:t", dir.display()), "--name", "hostile"]);
    let img = env.path("hostile.img");
    env.ok(&["export", "hostile", img.to_str().unwrap()]);
    let cat = |p: &str| {
        let out = Command::new("debugfs").arg("-R").arg(format!("cat {p}")).arg(&img).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(cat("/escape"), "dots");
    assert_eq!(cat("/tmp/through-link"), "link");
    assert!(!std::path::Path::new("/escape").exists());

    // A hard link to nothing is refused, naming the layer and the path.
    let env = Env::new();
    let mut t = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    h.set_mode(0o644);
    t.append_link(&mut h, "etc/passwd-link", "../../etc/shadow").unwrap();
    let dir = env.path("badlink");
    layout(&dir, "t", &[Blob::from_tar(&t.into_inner().unwrap(), Comp::None)]);
    import_fails(&env, &dir, &["layer 1/1", "etc/passwd-link", "does not exist"]);
}

fn busybox_env() -> Option<(Env, String)> {
    if !have_image_tools() {
        return None;
    }
    let env = Env::new();
    let dir = env.path("layout");
    busybox_layout(&dir, "bb");
    let src = format!("oci:{}:bb", dir.display());
    Some((env, src))
}

#[test]
fn a_flipped_byte_in_a_stored_chunk_is_named() {
    let Some((env, src)) = busybox_env() else { return };
    env.import(&src, "bb", &[]);
    // Flip one byte of one stored chunk.
    let chunks = env.home().join("chunks");
    let victim = std::fs::read_dir(&chunks)
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .next()
        .expect("a stored chunk");
    let id = victim.file_name().unwrap().to_string_lossy().into_owned();
    let mut bytes = std::fs::read(&victim).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(&victim, bytes).unwrap();

    let out = env.tessera(&["verify", "bb"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id), "verify names the bad chunk:\n{}", text(&out));

    let img = env.path("bb.img");
    let out = env.tessera(&["export", "bb", img.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&id), "{}", text(&out));
    assert!(!img.exists(), "a failed export leaves no file");
    assert_eq!(std::fs::read_dir(env.dir.path()).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains("tmp")).count(), 0);

    // A missing chunk is named too.
    std::fs::remove_file(&victim).unwrap();
    let out = env.tessera(&["verify", "bb", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["bad"][0]["id"], id.as_str());
}

#[test]
fn a_full_disk_fails_cleanly() {
    if !is_root() {
        return;
    }
    let Some((env, src)) = busybox_env() else { return };
    let small = env.path("small");
    std::fs::create_dir_all(&small).unwrap();
    run(Command::new("mount").args(["-t", "tmpfs", "-o", "size=400k", "tmpfs"]).arg(&small));
    let home = small.join("home");
    let out = tessera_with_home(&home, &["import", &src, "--name", "bb"]);
    let listed = tessera_with_home(&home, &["images", "--json"]);
    let _ = Command::new("umount").arg(&small).status();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no space left"), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(v, serde_json::json!([]), "nothing is listed after a failed import");
}

#[test]
fn kill_9_mid_import_leaves_nothing_visible() {
    let env = Env::new();
    // An incompressible 256 MiB layer keeps the import busy for a while.
    let data = pseudo_random(256 << 20, 0x2545F4914F6CDD1D);
    let dir = env.path("big");
    layout(&dir, "t", &[Blob::from_tar(&tar_of(&[("data.bin", &data)]), Comp::None)]);
    drop(data);
    let src = format!("oci:{}:t", dir.display());
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["import", &src, "--name", "big"])
        .env("TESSERA_HOME", env.home())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until chunks are being written, then kill.
    let deadline = Instant::now() + Duration::from_secs(60);
    let chunks = env.home().join("chunks");
    let staging = chunks.join(".staging");
    while std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0) < 8 {
        assert!(Instant::now() < deadline, "the import never started writing chunks");
        assert!(child.try_wait().unwrap().is_none(), "the import finished before it could be killed");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(env.image_names().is_empty(), "a killed import is not listed");

    // The store is still good: the same import completes, verifies, and
    // clears what the killed one left.
    let report = env.import(&src, "big", &[]);
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0, "stale temporaries are removed");
    assert!(report["chunks"].as_u64().unwrap() > 512);
    env.ok(&["verify", "big"]);
}
