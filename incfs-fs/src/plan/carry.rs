//! Carrying a prefetch plan over to a new version of its image.
//!
//! A plan names chunks by file path and chunk index. When an app is updated, most of the
//! chunks its start reads survive, often at the same place, sometimes moved (a file renamed
//! with its version, a library relinked so its unchanged code sits at another offset). The
//! carried plan lets the first start of the new version prefetch before any trace of it
//! exists. Each planned chunk of the old image goes, in plan order, to:
//!
//! 1. the same file and index in the new image when the chunk there has the same digest
//!    (**kept**);
//! 2. else the first chunk with that digest in the same file, then anywhere in the new
//!    image (**moved**);
//! 3. else, when the new image has the file and the index, that chunk: the same place with
//!    new contents, which the new start most likely reads too and which a cache holding the
//!    old version cannot supply (**changed**);
//! 4. else nowhere (**dropped**).
//!
//! "The same file" is the file of the same path or, for a file the new image lacks, the
//! file it was renamed to: the new file of a path the old image lacks whose path shares the
//! longest prefix and suffix with the old one, if they make up at least
//! [`RENAME_SIMILARITY`] of the longer path (`numpy-2.2.5.dist-info/RECORD` →
//! `numpy-2.2.6.dist-info/RECORD`, `libopenblas-56d6093b.so` → `libopenblas-6bb31eeb.so`).
//!
//! Each new chunk appears once, at its first place; consecutive chunks of one file that came
//! from one entry of the old plan form one entry, with that entry's time and confidence.

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use super::{PLAN_VERSION, PlanEntry, PlanError, PrefetchPlan};
use crate::format::{Digest, FileRef, Image, RangeRead};

/// Share of the longer of two paths that their common prefix and suffix must cover for a
/// removed file to count as renamed to an added one: 0.7 takes a version or a hash in a name
/// (`-56d6093b.so`: 8 of 32 bytes differ) and leaves unrelated files alone.
pub const RENAME_SIMILARITY: f64 = 0.7;

/// For each file of the old image whose path the new image lacks, the new file (index into
/// `new_files`) it was most likely renamed to ([`RENAME_SIMILARITY`]).
fn renamed_files(
    old_files: &HashMap<Vec<u8>, FileRef>,
    new_files: &[FileRef],
    new_by_path: &HashMap<&[u8], usize>,
) -> HashMap<Vec<u8>, usize> {
    let added: Vec<usize> = (0..new_files.len())
        .filter(|&k| !old_files.contains_key(&new_files[k].path))
        .collect();
    let mut out = HashMap::new();
    for old in old_files
        .keys()
        .filter(|p| !new_by_path.contains_key(p.as_slice()))
    {
        let best = added
            .iter()
            .map(|&k| {
                let new = &new_files[k].path;
                let prefix = old
                    .iter()
                    .zip(new.iter())
                    .take_while(|(a, b)| a == b)
                    .count();
                let suffix = old
                    .iter()
                    .rev()
                    .zip(new.iter().rev())
                    .take_while(|(a, b)| a == b)
                    .count();
                let longer = old.len().max(new.len());
                let common = (prefix + suffix).min(old.len().min(new.len()));
                (common as f64 / longer.max(1) as f64, k)
            })
            .filter(|&(sim, _)| sim >= RENAME_SIMILARITY)
            .max_by(|a, b| a.0.total_cmp(&b.0));
        if let Some((_, k)) = best {
            out.insert(old.clone(), k);
        }
    }
    out
}

/// Each file of `new_files` with its version in the old image: the old file of the same
/// path, or the one renamed to it ([`RENAME_SIMILARITY`]); as (index into `new_files`, old
/// file). Files without an old version are left out.
pub(crate) fn version_pairs(
    old_files: &HashMap<Vec<u8>, FileRef>,
    new_files: &[FileRef],
) -> Vec<(usize, FileRef)> {
    let new_by_path: HashMap<&[u8], usize> = new_files
        .iter()
        .enumerate()
        .map(|(k, f)| (f.path.as_slice(), k))
        .collect();
    let mut pairs: Vec<(usize, FileRef)> = new_files
        .iter()
        .enumerate()
        .filter_map(|(k, f)| old_files.get(&f.path).map(|o| (k, o.clone())))
        .collect();
    for (old, k) in renamed_files(old_files, new_files, &new_by_path) {
        if let Some(o) = old_files.get(&old) {
            pairs.push((k, o.clone()));
        }
    }
    pairs.sort_by_key(|(k, _)| *k);
    pairs
}

/// What [`carry`] did with the old plan's chunks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CarryReport {
    /// Chunks the old plan names (each once).
    pub chunks_in: u64,
    /// Of them, found at the same file and index with the same digest.
    pub kept: u64,
    /// Found with the same digest elsewhere.
    pub moved: u64,
    /// Not found by digest; the chunk at the same file and index was taken.
    pub changed: u64,
    /// Left out: no chunk with the digest, and the file or index is gone.
    pub dropped: u64,
    /// Chunks of the carried plan (after removing repeats).
    pub chunks_out: u64,
    /// Entries of the carried plan.
    pub entries_out: u64,
}

fn digest_at<R: RangeRead>(img: &Image<R>, f: &FileRef, index: u64) -> Option<Digest> {
    (index < f.chunks)
        .then(|| img.table().get(f.first_chunk + index).map(|e| e.digest))
        .flatten()
}

/// The plan `plan` (read from `plan_path`, made for `old`) carried over to `new`.
pub fn carry<A: RangeRead, B: RangeRead>(
    plan: &PrefetchPlan,
    plan_path: &Path,
    old: &Image<A>,
    new: &Image<B>,
) -> Result<(PrefetchPlan, CarryReport), PlanError> {
    plan.check_image(plan_path, &old.root_digest())?;
    let invalid = |reason: String| PlanError::Invalid {
        path: plan_path.to_path_buf(),
        reason,
    };
    let (old_size, new_size) = (old.manifest().chunk_size, new.manifest().chunk_size);
    if old_size != new_size {
        return Err(invalid(format!(
            "the old image has {old_size}-byte chunks and the new one {new_size}-byte chunks: \
             no chunk can carry over (pack the new version with --chunk-size {old_size})"
        )));
    }
    // Checks every entry against the old image (files and chunk ranges).
    plan.slots(plan_path, old.manifest())?;
    let old_files: HashMap<Vec<u8>, FileRef> = old
        .files()
        .into_iter()
        .map(|f| (f.path.clone(), f))
        .collect();
    let new_files = new.files();
    let new_by_path: HashMap<&[u8], usize> = new_files
        .iter()
        .enumerate()
        .map(|(k, f)| (f.path.as_slice(), k))
        .collect();
    let renamed = renamed_files(&old_files, &new_files, &new_by_path);
    // First place of each digest in the new image, in walk order.
    let mut anywhere: HashMap<Digest, (usize, u64)> = HashMap::new();
    for (k, f) in new_files.iter().enumerate() {
        for i in 0..f.chunks {
            if let Some(d) = digest_at(new, f, i) {
                anywhere.entry(d).or_insert((k, i));
            }
        }
    }
    let mut within: HashMap<usize, HashMap<Digest, u64>> = HashMap::new();
    let mut report = CarryReport::default();
    let mut seen_old = std::collections::HashSet::new();
    let mut seen_new = std::collections::HashSet::new();
    // (new file, index, old entry) in plan order.
    let mut picked: Vec<(usize, u64, usize)> = Vec::new();
    for (n, e) in plan.entries.iter().enumerate() {
        let of = old_files
            .get(e.file.as_bytes())
            .ok_or_else(|| invalid(format!("{}: no such file in the old image", e.file)))?;
        for i in e.first_chunk..e.first_chunk + e.chunk_count {
            if !seen_old.insert(of.first_chunk + i) {
                continue;
            }
            report.chunks_in += 1;
            let Some(d) = digest_at(old, of, i) else {
                return Err(invalid(format!("{}: chunk {i} has no table entry", e.file)));
            };
            let same = new_by_path
                .get(e.file.as_bytes())
                .or_else(|| renamed.get(e.file.as_bytes()))
                .copied();
            let place =
                if let Some(k) = same.filter(|&k| digest_at(new, &new_files[k], i) == Some(d)) {
                    report.kept += 1;
                    Some((k, i))
                } else if let Some(j) = same.and_then(|k| {
                    within
                        .entry(k)
                        .or_insert_with(|| {
                            let f = &new_files[k];
                            let mut m = HashMap::new();
                            for j in 0..f.chunks {
                                if let Some(d) = digest_at(new, f, j) {
                                    m.entry(d).or_insert(j);
                                }
                            }
                            m
                        })
                        .get(&d)
                        .map(|&j| (k, j))
                }) {
                    report.moved += 1;
                    Some(j)
                } else if let Some(&p) = anywhere.get(&d) {
                    report.moved += 1;
                    Some(p)
                } else if let Some(k) = same.filter(|&k| i < new_files[k].chunks) {
                    report.changed += 1;
                    Some((k, i))
                } else {
                    report.dropped += 1;
                    None
                };
            if let Some((k, j)) = place
                && seen_new.insert((k, j))
            {
                picked.push((k, j, n));
            }
        }
    }
    report.chunks_out = picked.len() as u64;
    let mut entries: Vec<PlanEntry> = Vec::new();
    let mut last: Option<(usize, usize)> = None;
    for (k, j, n) in picked {
        let f = &new_files[k];
        if let Some(prev) = entries.last_mut()
            && last == Some((k, n))
            && prev.first_chunk + prev.chunk_count == j
        {
            prev.chunk_count += 1;
            continue;
        }
        let from = &plan.entries[n];
        entries.push(PlanEntry {
            file: f.display_path(),
            first_chunk: j,
            chunk_count: 1,
            offset_ms: from.offset_ms,
            confidence: from.confidence,
        });
        last = Some((k, n));
    }
    report.entries_out = entries.len() as u64;
    let mut carried = PrefetchPlan {
        version: PLAN_VERSION,
        image_digest: new.root_digest().to_hex(),
        chunk_size: new_size,
        total_bytes: 0,
        entries,
    };
    // Stored bytes, each stored frame once.
    let mut frames = std::collections::HashSet::new();
    for slot in carried.slots(plan_path, new.manifest())? {
        if let Some(e) = new.table().get(slot)
            && frames.insert(e.stored_offset)
        {
            carried.total_bytes += u64::from(e.stored_len);
        }
    }
    Ok((carried, report))
}
