//! Layer compressions and image indexes.

mod common;

use common::oci::{layout, multi_platform, tar_of, Blob, Comp};
use common::*;

#[test]
fn gzip_zstd_and_plain_layers_give_the_same_disk() {
    let env = Env::new();
    let base = tar_of(&[("etc/", b""), ("etc/os-release", b"ID=tessera\n")]);
    let top = tar_of(&[("app/", b""), ("app/run", &vec![3u8; 700_000])]);
    let mut images = Vec::new();
    for (i, comp) in [Comp::None, Comp::Gzip, Comp::Zstd].into_iter().enumerate() {
        let dir = env.path(&format!("l{i}"));
        layout(&dir, "t", &[Blob::from_tar(&base, comp), Blob::from_tar(&top, comp)]);
        let name = format!("img{i}");
        let r = env.import(&format!("oci:{}:t", dir.display()), &name, &[]);
        if i > 0 {
            assert_eq!(r["new_chunks"], 0, "compression does not change the disk");
        }
        let out = env.path(&format!("{name}.raw"));
        env.ok(&["export", &name, out.to_str().unwrap()]);
        images.push(std::fs::read(out).unwrap());
    }
    assert!(images[0] == images[1] && images[1] == images[2]);
}

#[test]
fn platform_is_picked_from_an_index() {
    let env = Env::new();
    let dir = env.path("multi");
    let amd = [Blob::from_tar(&tar_of(&[("which", b"amd64")]), Comp::Gzip)];
    let arm = [Blob::from_tar(&tar_of(&[("which", b"arm64")]), Comp::Gzip)];
    multi_platform(&dir, "t", &amd, &arm);
    let src = format!("oci:{}:t", dir.display());
    env.import(&src, "amd", &[]);
    env.import(&src, "arm", &["--platform", "linux/arm64"]);
    let inspect = |n: &str| -> serde_json::Value { serde_json::from_str(&env.ok(&["inspect", n, "--json"])).unwrap() };
    assert_eq!(inspect("amd")["config"]["entrypoint"][0], "/amd64");
    assert_eq!(inspect("arm")["config"]["entrypoint"][0], "/arm64");
    let out = env.tessera(&["import", &src, "--platform", "linux/s390x"]);
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("linux/s390x") && msg.contains("linux/arm64"), "{msg}");
}

#[test]
fn cli_errors_are_clear() {
    let env = Env::new();
    for (args, needle) in [
        (vec!["inspect", "nope"], "no image named"),
        (vec!["import", "ubuntu:22.04"], "oci:DIR"),
        (vec!["import", "oci:/does/not/exist"], "not an OCI image layout"),
        (vec!["import", "docker://app:v1"], "registry host"),
        (vec!["import", "docker://app/x:v1"], "registry host"),
        (vec!["rm", "nope"], "no image named"),
        (vec!["import", "oci:/x", "--name", "../evil"], "invalid image name"),
    ] {
        let out = env.tessera(&args);
        assert!(!out.status.success(), "{args:?}");
        let msg = String::from_utf8_lossy(&out.stderr);
        assert!(msg.contains(needle), "{args:?}: {msg:?} lacks {needle:?}");
        assert!(!msg.contains("panicked"), "{msg}");
    }
}

/// `import --json` tells the new chunks of file data from those of
/// filesystem metadata.
#[test]
fn new_chunks_are_split_into_data_and_metadata() {
    let env = Env::new();
    let base = tar_of(&[("etc/", b""), ("etc/os-release", b"ID=tessera\n")]);
    let app = tar_of(&[("app/", b""), ("app/run", &pseudo_random(2 << 20, 3))]);
    let (one, two) = (env.path("one"), env.path("two"));
    layout(&one, "t", &[Blob::from_tar(&base, Comp::Gzip)]);
    layout(&two, "t", &[Blob::from_tar(&base, Comp::Gzip), Blob::from_tar(&app, Comp::Gzip)]);
    let first = env.import(&format!("oci:{}:t", one.display()), "base", &[]);
    let second = env.import(&format!("oci:{}:t", two.display()), "app", &[]);
    let n = |r: &serde_json::Value, k: &str| r[k].as_u64().unwrap();
    for r in [&first, &second] {
        assert!(n(r, "new_metadata_chunks") >= 1 && n(r, "new_metadata_chunks") <= n(r, "new_chunks"), "{r}");
        assert!(n(r, "new_metadata_bytes") <= n(r, "new_bytes"), "{r}");
    }
    // The app layer's 2 MiB of random data: at least 4 new data chunks.
    assert!(n(&second, "new_chunks") - n(&second, "new_metadata_chunks") >= 4, "{second}");
    let again = env.import(&format!("oci:{}:t", two.display()), "app2", &[]);
    assert_eq!((n(&again, "new_chunks"), n(&again, "new_metadata_chunks"), n(&again, "new_metadata_bytes")), (0, 0, 0), "{again}");
}
