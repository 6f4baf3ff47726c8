//! `tessera optimize` and `tessera import --optimize-with`: the blocks a
//! recorded start read, mapped to the files that hold them (by flattening the
//! image's source again, as the import did), and those files placed
//! together, in first-touch order, at the end of each layer's data, right
//! before the layer's metadata.

use std::collections::HashSet;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde_json::json;
use tessera_agent::vdisk::Recorded;
use tessera_chunk::{Manifest, Profile};
use tessera_import::ImportOptions;
use tessera_import::PlacedFile;
use tessera_oci::{Progress, PullOptions};
use tessera_store::{Home, ImageRef};

use crate::flags::OptimizeArgs;
use crate::progress::{human, Bars};

/// Blocks per chunk.
const CHUNK_BLOCKS: u64 = (tessera_chunk::CHUNK_SIZE / 4096) as u64;

/// What an image's recorded start read, as files.
pub struct StartFiles {
    /// Paths of the files read, in first-touch order.
    pub paths: Vec<Vec<u8>>,
    /// The profile.
    pub profile: Profile,
    /// Where the image's files are (as its import placed them).
    pub placed: Vec<PlacedFile>,
}

/// The files `name`'s recorded start read. Re-reads the image's source.
pub fn start_files(home: &Home, name: &str, pull: &PullOptions, progress: &dyn Progress) -> Result<StartFiles> {
    let (r, m) = home.manifest(name)?;
    let profile = tessera_agent::profile::load(home, &r)?.with_context(|| format!("{name} has no start-up profile: run it once (`tessera run {name}`)"))?;
    if profile.blocks.is_empty() {
        bail!("{name}'s start-up profile was recorded before profiles kept blocks: run it again (`tessera run {name}`)");
    }
    // The image's own layout: with the files an earlier optimize placed first.
    let first = m.geometry.first_files.iter().map(|p| p.as_bytes().to_vec()).collect();
    let (image, flat) = tessera_import::place_files(home, &m.source.reference, pull, m.geometry.headroom_bytes, first, progress)
        .with_context(|| format!("re-reading {name}'s source {} (optimizing needs it)", m.source.reference))?;
    if image.manifest_digest.to_string() != m.source.manifest_digest {
        bail!("{} now holds another image ({}) than {name} was imported from ({})", m.source.reference, image.manifest_digest, m.source.manifest_digest);
    }
    let regions: Vec<(u64, u64)> = m.geometry.layers.iter().map(|l| (l.first_chunk, l.chunks)).collect();
    if flat.layer_regions != regions || flat.disk_bytes != m.geometry.disk_bytes {
        bail!("{name} was imported with an older disk layout: import it again, run it once, then optimize");
    }
    let paths = rank(&Holders::new(&flat.files), &profile.blocks).into_iter().map(|i| flat.files[i].path.clone()).collect();
    Ok(StartFiles { paths, profile, placed: flat.files })
}

/// Finds which file's data holds a block.
struct Holders<'a> {
    files: &'a [PlacedFile],
    /// Indices of the files with data, by first block.
    by_start: Vec<usize>,
}

impl<'a> Holders<'a> {
    fn new(files: &'a [PlacedFile]) -> Holders<'a> {
        let mut by_start: Vec<usize> = (0..files.len()).filter(|&i| files[i].blocks > 0).collect();
        by_start.sort_by_key(|&i| files[i].first_block);
        Holders { files, by_start }
    }

    /// The index of the file whose data holds block `b`.
    fn of(&self, b: u64) -> Option<usize> {
        let at = self.by_start.partition_point(|&i| self.files[i].first_block <= b).checked_sub(1)?;
        let i = self.by_start[at];
        (b < self.files[i].first_block + self.files[i].blocks).then_some(i)
    }
}

/// Indices of the files holding `blocks` (runs, in first-touch order), in
/// the order their first block was read.
fn rank(holders: &Holders<'_>, blocks: &[[u64; 2]]) -> Vec<usize> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for &[first, count] in blocks {
        for b in first..first + count {
            if let Some(i) = holders.of(b) {
                if seen.insert(i) {
                    out.push(i);
                }
            }
        }
    }
    out
}

/// `tessera optimize`.
pub fn optimize(home: &Home, a: OptimizeArgs) -> Result<ExitCode> {
    let bars = Bars::new(a.json);
    let (r, m) = home.manifest(&a.name)?;
    let pull = PullOptions {
        platform: if m.source.platform.is_empty() { PullOptions::default().platform } else { m.source.platform.clone() },
        insecure: a.insecure,
        creds: a.creds,
    };
    let start = start_files(home, &a.name, &pull, &bars).inspect_err(|_| bars.done())?;
    let new_name = a.as_name.clone().unwrap_or_else(|| a.name.clone());
    let options = ImportOptions {
        name: Some(new_name.clone()),
        tenant: r.tenant.clone(),
        pull,
        headroom_bytes: m.geometry.headroom_bytes, // what was asked: the same geometry
        dedup_scope: Some(m.dedup_scope),
        first: start.paths.clone(),
        record_files: true,
        expect_digest: Some(m.source.manifest_digest.clone()),
        ..ImportOptions::default()
    };
    let report = tessera_import::import(home, &m.source.reference, &options, &bars);
    bars.done();
    let report = report?;

    // The profile, moved with the files: a block of a file goes where the
    // file went (the same tar, its digest checked, gives the same files in
    // the same order, so the same index), any other block (metadata) stays,
    // as every region keeps its size.
    if report.files.len() != start.placed.len() || report.files.iter().zip(&start.placed).any(|(a, b)| a.path != b.path || a.blocks != b.blocks) {
        bail!("the source gave other files on the second read than on the first");
    }
    let holders = Holders::new(&start.placed);
    let mut recorded = Recorded::default();
    let mut seen_chunks = HashSet::new();
    for &[first, count] in &start.profile.blocks {
        for b in first..first + count {
            let moved = match holders.of(b) {
                Some(i) => report.files[i].first_block + (b - start.placed[i].first_block),
                None => b,
            };
            recorded.push_block(moved);
            let chunk = moved / CHUNK_BLOCKS;
            if report.manifest_doc.chunks.get(chunk as usize).is_some_and(|c| c.is_some()) && seen_chunks.insert(chunk) {
                recorded.chunks.push(chunk);
            }
        }
    }
    let new_ref = home.catalog.get(&new_name)?;
    let after_chunks = recorded.chunks.clone();
    tessera_agent::profile::save(home, &new_name, &new_ref, recorded, start.profile.seconds)?;

    let before_bytes = stored_bytes(home, &r, &m, &start.profile.chunks)?;
    let after_bytes = stored_bytes(home, &new_ref, &report.manifest_doc, &after_chunks)?;
    if a.json {
        println!(
            "{}",
            json!({
                "name": new_name,
                "manifest": report.manifest,
                "start_chunks_before": start.profile.chunks.len(),
                "start_chunks_after": after_chunks.len(),
                "start_bytes_before": before_bytes,
                "start_bytes_after": after_bytes,
                "new_chunks": report.new_chunks,
                "start_files": start.paths.len(),
            })
        );
    } else {
        println!(
            "optimized {} as {new_name}: its start reads {} chunks ({}) instead of {} ({}); {} files placed together; {} new chunks ({})",
            a.name,
            after_chunks.len(),
            human(after_bytes),
            start.profile.chunks.len(),
            human(before_bytes),
            start.paths.len(),
            report.new_chunks,
            human(report.new_bytes)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Bytes the store holds for `chunks` of `m` (sealed and compressed, as fetched).
fn stored_bytes(home: &Home, r: &ImageRef, m: &Manifest, chunks: &[u64]) -> Result<u64> {
    let store = home.chunks_of(r);
    let mut total = 0;
    for &i in chunks {
        if let Some(Some(c)) = m.chunks.get(i as usize) {
            total += store.get(&c.id).with_context(|| format!("reading chunk {i}"))?.len() as u64;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, first_block: u64, blocks: u64) -> PlacedFile {
        PlacedFile { path: path.as_bytes().to_vec(), layer: 1, first_block, blocks }
    }

    #[test]
    fn blocks_map_to_files_in_first_touch_order() {
        let files = [file("a", 128, 10), file("b", 138, 1), file("empty", 139, 0), file("c", 300, 200)];
        // Block 5 is metadata; c is read before a; b twice.
        let holders = Holders::new(&files);
        let order = rank(&holders, &[[5, 1], [350, 2], [130, 1], [138, 1], [131, 1], [138, 1]]);
        assert_eq!(order, vec![3, 0, 1]);
        assert_eq!(holders.of(139), None);
        assert_eq!(holders.of(499), Some(3));
        assert_eq!(holders.of(500), None);
    }
}
