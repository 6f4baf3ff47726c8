mod common;
use common::*;

#[test]
fn small_tree_passes_e2fsck() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let l1 = Layer::new()
        .dir("etc", 0o755)
        .file("etc/hostname", b"tessera\n")
        .file("big.bin", &big)
        .symlink("etc/link", "hostname")
        .symlink("long", &"x".repeat(100))
        .hardlink("etc/hard", "etc/hostname")
        .fifo("fifo")
        .chardev("null", 1, 3)
        .xattr_file("cap", b"bin", &[("security.capability", &[1, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])])
        .build();
    let l2 = Layer::new().whiteout("etc", "link").file("etc/new", b"new").build();
    let out = flatten_to(&img, &[l1, l2], small());
    let (code, text) = e2fsck(&img);
    assert_eq!(code, 0, "{text}");
    assert_eq!(out.layer_regions.len(), 2);
}

#[test]
#[ignore]
fn keep_image_for_inspection() {
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let l1 = Layer::new()
        .dir("etc", 0o755)
        .file("etc/hostname", b"tessera\n")
        .file("big.bin", &big)
        .symlink("etc/link", "hostname")
        .symlink("long", &"x".repeat(100))
        .hardlink("etc/hard", "etc/hostname")
        .fifo("fifo")
        .chardev("null", 1, 3)
        .xattr_file("cap", b"bin", &[("security.capability", &[1, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), ("user.long", &[7u8; 300])])
        .build();
    let l2 = Layer::new().whiteout("etc", "link").file("etc/new", b"new").build();
    flatten_to(std::path::Path::new("/tmp/smoke.img"), &[l1, l2], small());
}
