//! Shared helpers: build layer tars in memory and flatten them into a file.

#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tessera_flatten::{ChunkSink, FlatImage, Flattener, Options, SinkError, CHUNK_BYTES};

/// Writes chunks at their offsets in a sparse file.
pub struct FileSink {
    pub file: File,
    pub seen: Vec<u64>,
}

impl ChunkSink for FileSink {
    fn put_chunk(&mut self, index: u64, data: Vec<u8>) -> Result<(), SinkError> {
        assert_eq!(data.len(), CHUNK_BYTES);
        assert!(!self.seen.contains(&index), "chunk {index} handed over twice");
        self.seen.push(index);
        self.file.write_all_at(&data, index * CHUNK_BYTES as u64)?;
        Ok(())
    }
}

/// Flattens `layers` (uncompressed tars) into `out`.
pub fn flatten_to(out: &Path, layers: &[Vec<u8>], options: Options) -> FlatImage {
    let file = File::create(out).unwrap();
    let mut sink = FileSink { file, seen: Vec::new() };
    let mut f = Flattener::new(options, &mut sink);
    for (i, l) in layers.iter().enumerate() {
        f.apply_layer(&format!("layer {}", i + 1), l.as_slice()).unwrap();
    }
    let img = f.finish().unwrap();
    sink.file.set_len(img.disk_bytes).unwrap();
    sink.file.flush().unwrap();
    img
}

/// Small options for tests: 4 MiB of headroom.
pub fn small() -> Options {
    Options { headroom_bytes: 4 << 20, seed: [9; 32], ..Options::default() }
}

/// A layer tar built entry by entry.
pub struct Layer(tar::Builder<Vec<u8>>);

impl Default for Layer {
    fn default() -> Layer {
        Layer::new()
    }
}

impl Layer {
    pub fn new() -> Layer {
        Layer(tar::Builder::new(Vec::new()))
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h
    }

    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        self.0.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    pub fn file(mut self, path: &str, data: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, 0o644, data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }

    pub fn file_owned(mut self, path: &str, data: &[u8], mode: u32, uid: u64, gid: u64) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn whiteout(self, dir: &str, name: &str) -> Self {
        let p = if dir.is_empty() { format!(".wh.{name}") } else { format!("{dir}/.wh.{name}") };
        self.file(&p, b"")
    }

    pub fn opaque(self, dir: &str) -> Self {
        self.file(&format!("{dir}/.wh..wh..opq"), b"")
    }

    pub fn fifo(mut self, path: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Fifo, 0o600, 0);
        self.0.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    pub fn chardev(mut self, path: &str, major: u32, minor: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Char, 0o600, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.0.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    pub fn xattr_file(mut self, path: &str, data: &[u8], xattrs: &[(&str, &[u8])]) -> Self {
        let pax: Vec<(String, Vec<u8>)> = xattrs.iter().map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.to_vec())).collect();
        self.0.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice()))).unwrap();
        self.file(path, data)
    }

    pub fn build(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// Runs `e2fsck -fn` and returns (exit code, output).
pub fn e2fsck(image: &Path) -> (i32, String) {
    let out = std::process::Command::new("e2fsck").args(["-fn"]).arg(image).output().expect("e2fsck runs (apt-get install e2fsprogs)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}
