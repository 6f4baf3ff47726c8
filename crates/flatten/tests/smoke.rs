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

/// A sink that hands back buffers full of garbage: the output must not change.
struct DirtySink(Vec<(u64, Vec<u8>)>);

impl tessera_flatten::ChunkSink for DirtySink {
    fn put_chunk(&mut self, index: u64, data: Vec<u8>) -> Result<(), tessera_flatten::SinkError> {
        self.0.push((index, data));
        Ok(())
    }

    fn recycled(&mut self) -> Option<Vec<u8>> {
        Some(vec![0xA5; tessera_flatten::CHUNK_BYTES + 16])
    }
}

#[test]
fn recycled_buffers_do_not_leak_into_the_disk() {
    let layers = [Layer::new().file("a", &[1u8; 5000]).file("b", &[2u8; 700_000]).file("c", b"x").build(), Layer::new().file("d", &[3u8; 10]).build()];
    let run = |dirty: bool| {
        let mut sink: Box<dyn tessera_flatten::ChunkSink> =
            if dirty { Box::new(DirtySink(Vec::new())) } else { Box::new(common::FileSink { file: tempfile::tempfile().unwrap(), seen: Vec::new() }) };
        let mut out = Vec::new();
        {
            struct Tee<'a>(&'a mut dyn tessera_flatten::ChunkSink, &'a mut Vec<(u64, Vec<u8>)>);
            impl tessera_flatten::ChunkSink for Tee<'_> {
                fn put_chunk(&mut self, index: u64, data: Vec<u8>) -> Result<(), tessera_flatten::SinkError> {
                    self.1.push((index, data.clone()));
                    self.0.put_chunk(index, data)
                }
                fn recycled(&mut self) -> Option<Vec<u8>> {
                    self.0.recycled()
                }
            }
            let mut tee = Tee(sink.as_mut(), &mut out);
            let mut f = tessera_flatten::Flattener::new(small(), &mut tee);
            for (i, l) in layers.iter().enumerate() {
                f.apply_layer(&format!("layer {i}"), l.as_slice()).unwrap();
            }
            f.finish().unwrap();
        }
        out.sort_by_key(|c| c.0);
        out
    };
    assert!(run(true) == run(false), "garbage in recycled buffers reached the disk");
}

/// Flattens `layers` with `first` files first; returns the image and the disk file.
fn flatten_first(dir: &std::path::Path, name: &str, layers: &[Vec<u8>], first: &[&str]) -> (tessera_flatten::FlatImage, std::path::PathBuf) {
    let path = dir.join(name);
    let mut sink = common::FileSink { file: std::fs::File::create(&path).unwrap(), seen: Vec::new() };
    let options = tessera_flatten::Options { first: first.iter().map(|p| p.as_bytes().to_vec()).collect(), record_files: true, ..small() };
    let mut f = tessera_flatten::Flattener::new(options, &mut sink);
    for (i, l) in layers.iter().enumerate() {
        f.plan_layer(&format!("layer {i}"), l.as_slice()).unwrap();
        f.apply_layer(&format!("layer {i}"), l.as_slice()).unwrap();
    }
    let img = f.finish().unwrap();
    sink.file.set_len(img.disk_bytes).unwrap();
    (img, path)
}

#[test]
fn files_listed_first_lead_their_layers_regions() {
    let dir = tempfile::tempdir().unwrap();
    let data = |seed: u8| -> Vec<u8> { (0..200_000u32).map(|i| (i as u8) ^ seed).collect() };
    let layers = [
        Layer::new().file("a", &data(1)).file("sub/b", &data(2)).file("c", &data(3)).file("d", &data(4)).file("tiny", b"t").build(),
        Layer::new().file("e", &data(5)).file("sub/c2", &data(6)).build(),
    ];
    let (plain, plain_path) = flatten_first(dir.path(), "plain.img", &layers, &[]);
    let (opt, opt_path) = flatten_first(dir.path(), "opt.img", &layers, &["d", "sub/c2", "tiny", "sub/b", "missing"]);
    let (_, again_path) = flatten_first(dir.path(), "again.img", &layers, &["d", "sub/c2", "tiny", "sub/b", "missing"]);
    assert!(std::fs::read(&opt_path).unwrap() == std::fs::read(&again_path).unwrap(), "not deterministic");

    // The listed files go together, in the order listed, after the layer's
    // other data (which keeps tar order), so its metadata follows them.
    let at = |img: &tessera_flatten::FlatImage, p: &str| img.files.iter().find(|f| f.path == p.as_bytes()).unwrap().first_block;
    let region = |i: usize| opt.layer_regions[i].0 * 128;
    assert_eq!((at(&opt, "a"), at(&opt, "c")), (region(0), region(0) + 49));
    assert_eq!(at(&opt, "d"), region(0) + 98);
    assert_eq!(at(&opt, "tiny"), region(0) + 147);
    assert_eq!(at(&opt, "sub/b"), region(0) + 148);
    assert_eq!((at(&opt, "e"), at(&opt, "sub/c2")), (region(1), region(1) + 49));
    assert_eq!(at(&plain, "a"), region(0));
    assert_eq!(plain.layer_regions, opt.layer_regions, "regions keep their sizes");

    let (code, text) = e2fsck(&opt_path);
    assert_eq!(code, 0, "{text}");
    let read = |path: &std::path::Path| {
        let fs = ext4_view::Ext4::load(Box::new(std::fs::read(path).unwrap())).unwrap();
        ["/a", "/sub/b", "/c", "/d", "/tiny", "/e", "/sub/c2"].map(|p| fs.read(p).unwrap())
    };
    assert_eq!(read(&opt_path), read(&plain_path));
    assert_eq!(read(&opt_path)[3], data(4));
}

#[test]
fn a_layer_that_differs_from_its_planning_read_is_refused() {
    let planned = Layer::new().file("a", &[1u8; 10_000]).file("b", &[2u8; 10_000]).build();
    for applied in
        [Layer::new().file("a", &[1u8; 10_000]).file("b", &[2u8; 10_000]).file("c", &[3u8; 10_000]).build(), Layer::new().file("b", &[2u8; 10_000]).build()]
    {
        let mut sink = common::FileSink { file: tempfile::tempfile().unwrap(), seen: Vec::new() };
        let options = tessera_flatten::Options { first: vec![b"b".to_vec()], ..small() };
        let mut f = tessera_flatten::Flattener::new(options, &mut sink);
        f.plan_layer("layer", planned.as_slice()).unwrap();
        assert!(f.apply_layer("layer", applied.as_slice()).is_err(), "a layer that changed between its reads was taken");
    }
}
