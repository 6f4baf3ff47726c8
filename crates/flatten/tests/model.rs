//! Property test: random layer stacks (files, directories, symlinks, hard
//! links, whiteouts, opaque directories) are flattened, and the image reads
//! back (with the independent `ext4-view` reader) as a simple reference
//! model of OCI layer semantics says it should; e2fsck accepts every image.

mod common;

use std::collections::BTreeMap;

use proptest::prelude::*;
use tessera_flatten::{ChunkSink, Flattener, Options, SinkError, CHUNK_BYTES};

#[derive(Clone, Debug)]
enum Op {
    Dir(Vec<u8>),
    File(Vec<u8>, u32, u8),
    Symlink(Vec<u8>, u8),
    Hardlink(Vec<u8>, Vec<u8>),
    Whiteout(Vec<u8>),
    Opaque(Vec<u8>),
}

#[derive(Clone, Debug, PartialEq)]
enum Want {
    Dir,
    File(Vec<u8>),
    Symlink(String),
}

/// The reference model: path → (what, layer that wrote it).
#[derive(Default)]
struct Model(BTreeMap<Vec<String>, (Want, u32)>);

impl Model {
    fn kind(&self, p: &[String]) -> Option<&Want> {
        self.0.get(p).map(|(w, _)| w)
    }

    /// Every proper prefix is a directory or absent (so no symlink is crossed).
    fn parents_ok(&self, p: &[String]) -> bool {
        (1..p.len()).all(|i| matches!(self.kind(&p[..i]), None | Some(Want::Dir)))
    }

    fn remove_tree(&mut self, p: &[String]) {
        self.0.retain(|k, _| !k.starts_with(p));
    }

    fn put(&mut self, p: &[String], want: Want, layer: u32) {
        for i in 1..p.len() {
            self.0.entry(p[..i].to_vec()).or_insert((Want::Dir, layer));
        }
        match (self.kind(p), &want) {
            (Some(Want::Dir), Want::Dir) => {}
            (Some(_), _) => self.remove_tree(p),
            _ => {}
        }
        match self.0.get_mut(p) {
            Some(e) if want == Want::Dir && e.0 == Want::Dir => e.1 = layer,
            _ => {
                self.0.insert(p.to_vec(), (want, layer));
            }
        }
    }

    fn opaque(&mut self, d: &[String], layer: u32) {
        let doomed: Vec<Vec<String>> = self
            .0
            .keys()
            .filter(|k| k.len() > d.len() && k.starts_with(d))
            .filter(|k| (d.len() + 1..=k.len()).any(|i| self.0[&k[..i]].1 != layer))
            .cloned()
            .collect();
        for k in doomed {
            self.0.remove(&k);
        }
    }
}

fn split(p: &[u8]) -> Vec<String> {
    String::from_utf8(p.to_vec()).unwrap().split('/').map(str::to_owned).collect()
}

fn content(size: u32, seed: u8) -> Vec<u8> {
    (0..size).map(|i| (i as u8).wrapping_mul(seed | 1).wrapping_add(seed)).collect()
}

fn path() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(prop_oneof!["a", "b", "c", "long-name-for-a-directory-entry"], 1..4).prop_map(|v| v.join("/").into_bytes())
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        path().prop_map(Op::Dir),
        (path(), prop_oneof![Just(0u32), 1..5000u32, 500_000..600_000u32], any::<u8>()).prop_map(|(p, s, c)| Op::File(p, s, c)),
        (path(), any::<u8>()).prop_map(|(p, t)| Op::Symlink(p, t)),
        (path(), path()).prop_map(|(p, t)| Op::Hardlink(p, t)),
        path().prop_map(Op::Whiteout),
        path().prop_map(Op::Opaque),
    ]
}

/// Applies ops to the model, keeping only those it accepts, and builds the tar.
fn layer_tar(model: &mut Model, ops: &[Op], layer: u32) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_000_000 + layer as u64);
        h
    };
    for op in ops {
        match op {
            Op::Dir(p) | Op::File(p, ..) | Op::Symlink(p, _) | Op::Hardlink(p, _) => {
                let sp = split(p);
                if !model.parents_ok(&sp) {
                    continue;
                }
                match op {
                    Op::Dir(_) => {
                        b.append_data(&mut header(tar::EntryType::Directory, 0o755, 0), std::str::from_utf8(p).unwrap(), std::io::empty()).unwrap();
                        model.put(&sp, Want::Dir, layer);
                    }
                    Op::File(_, size, seed) => {
                        let data = content(*size, *seed);
                        b.append_data(&mut header(tar::EntryType::Regular, 0o640, data.len() as u64), std::str::from_utf8(p).unwrap(), data.as_slice())
                            .unwrap();
                        model.put(&sp, Want::File(data), layer);
                    }
                    Op::Symlink(_, t) => {
                        let target = format!("target-{t}");
                        b.append_link(&mut header(tar::EntryType::Symlink, 0o777, 0), std::str::from_utf8(p).unwrap(), &target).unwrap();
                        model.put(&sp, Want::Symlink(target), layer);
                    }
                    Op::Hardlink(_, t) => {
                        let st = split(t);
                        let Some(Want::File(data)) = model.kind(&st).cloned() else { continue };
                        if st == sp || !model.parents_ok(&st) {
                            continue;
                        }
                        b.append_link(&mut header(tar::EntryType::Link, 0o640, 0), std::str::from_utf8(p).unwrap(), std::str::from_utf8(t).unwrap()).unwrap();
                        model.put(&sp, Want::File(data), layer);
                    }
                    _ => unreachable!(),
                }
            }
            Op::Whiteout(p) => {
                let sp = split(p);
                let (name, parent) = sp.split_last().unwrap();
                if !model.parents_ok(&sp) {
                    continue;
                }
                let wh = if parent.is_empty() { format!(".wh.{name}") } else { format!("{}/.wh.{name}", parent.join("/")) };
                b.append_data(&mut header(tar::EntryType::Regular, 0o644, 0), wh, std::io::empty()).unwrap();
                if parent.is_empty() || model.kind(parent) == Some(&Want::Dir) {
                    model.remove_tree(&sp);
                }
            }
            Op::Opaque(p) => {
                let sp = split(p);
                if model.kind(&sp) != Some(&Want::Dir) || !model.parents_ok(&sp) {
                    continue;
                }
                b.append_data(&mut header(tar::EntryType::Regular, 0o644, 0), format!("{}/.wh..wh..opq", sp.join("/")), std::io::empty()).unwrap();
                model.opaque(&sp, layer);
            }
        }
    }
    b.into_inner().unwrap()
}

struct VecSink(Vec<u8>);

impl ChunkSink for VecSink {
    fn put_chunk(&mut self, index: u64, data: Vec<u8>) -> Result<(), SinkError> {
        let at = index as usize * CHUNK_BYTES;
        if self.0.len() < at + CHUNK_BYTES {
            self.0.resize(at + CHUNK_BYTES, 0);
        }
        self.0[at..at + CHUNK_BYTES].copy_from_slice(&data);
        Ok(())
    }
}

fn read_back(fs: &ext4_view::Ext4, dir: &str, out: &mut BTreeMap<Vec<String>, Want>) {
    for entry in fs.read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().as_str().unwrap().to_owned();
        if name == "." || name == ".." || (dir == "/" && name == "lost+found") {
            continue;
        }
        let path = if dir == "/" { format!("/{name}") } else { format!("{dir}/{name}") };
        let key: Vec<String> = path[1..].split('/').map(str::to_owned).collect();
        let ft = entry.file_type().unwrap();
        if ft.is_dir() {
            out.insert(key, Want::Dir);
            read_back(fs, &path, out);
        } else if ft.is_symlink() {
            out.insert(key, Want::Symlink(fs.read_link(path.as_str()).unwrap().to_str().unwrap().to_owned()));
        } else {
            out.insert(key, Want::File(fs.read(path.as_str()).unwrap()));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn flattened_layers_read_back_as_the_model_says(layers in proptest::collection::vec(proptest::collection::vec(op(), 0..12), 1..4)) {
        let mut model = Model::default();
        let tars: Vec<Vec<u8>> = layers.iter().enumerate().map(|(i, ops)| layer_tar(&mut model, ops, i as u32 + 1)).collect();
        let mut sink = VecSink(Vec::new());
        let mut f = Flattener::new(Options { headroom_bytes: 0, seed: [1; 32], ..Options::default() }, &mut sink);
        for (i, t) in tars.iter().enumerate() {
            f.apply_layer(&format!("layer {}", i + 1), t.as_slice()).unwrap();
        }
        let img = f.finish().unwrap();
        sink.0.resize(img.disk_bytes as usize, 0);

        let want: BTreeMap<Vec<String>, Want> = model.0.into_iter().map(|(k, (w, _))| (k, w)).collect();
        let fs = ext4_view::Ext4::load(Box::new(sink.0.clone())).unwrap();
        let mut got = BTreeMap::new();
        read_back(&fs, "/", &mut got);
        prop_assert_eq!(got, want);

        if std::process::Command::new("e2fsck").arg("-V").output().is_ok() {
            let file = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(file.path(), &sink.0).unwrap();
            let (code, text) = common::e2fsck(file.path());
            prop_assert_eq!(code, 0, "{}", text);
        }
    }
}
