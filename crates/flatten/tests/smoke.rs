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
