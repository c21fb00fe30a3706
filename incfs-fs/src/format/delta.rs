//! Deltas of a new image's chunks against an older image: the sidecar `IMG.delta`.
//!
//! A rebuilt native library shifts nearly every 4 KiB chunk, so a cache holding the old
//! version shares few chunks with the new one (issue 19: 13 % of numpy's
//! `_multiarray_umath.so`). Most of each changed chunk is still in the old file, a few KiB
//! away. For each chunk of the new image whose digest the old image lacks, [`write_deltas`]
//! finds where in the old version of its file (same path, or the file it was renamed to) its
//! content most likely came from (by voting over 24-byte anchors), and compresses the chunk
//! with zstd against that window of the old file as a reference prefix. A reader whose cache
//! holds the old image and that window fetches the delta instead of the chunk: numpy 2.2.5 →
//! 2.2.6's changed chunks are 0.10× (`_multiarray_umath`) and 0.22× (OpenBLAS) of their own
//! compressed size this way.
//!
//! The sidecar is not part of the image and needs no trust: a decoded delta is checked
//! against the chunk's digest in the new image's verified table like any fetched chunk, and
//! one that does not match (a wrong window, a damaged or foreign sidecar) is dropped and the
//! chunk fetched as usual.
//!
//! Layout (integers little-endian): [`DELTA_MAGIC`] (8 bytes), the base image's root digest
//! (32), the new image's root digest (32), the index's length (u64), the index (postcard,
//! `Vec<DeltaEntry>`), then the deltas, each a zstd frame.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{Digest, FileRef, FormatError, Image, RangeRead};

/// First bytes of a delta sidecar.
pub const DELTA_MAGIC: &[u8; 8] = b"INCFSDL1";
/// Bytes before the index.
pub const DELTA_HEADER_LEN: u64 = 8 + 32 + 32 + 8;
/// What a sidecar is called: the image's path or URL with this added.
pub const DELTA_SUFFIX: &str = ".delta";
/// Largest index read (numpy's is ~0.1 MB; a bound on what a server can make a start read).
pub const MAX_INDEX_BYTES: u64 = 64 << 20;
/// Bytes of the old file on either side of a chunk's most likely origin used as the window:
/// 32 KiB (the window is 68 KiB); wider windows gained nothing for numpy (±64 KiB: 0.10× →
/// 0.10×, 0.22× → 0.22×), and a window must be local for the delta to be used.
pub const WINDOW_MARGIN: u64 = 32 * 1024;
/// Largest window a sidecar may name.
pub const MAX_WINDOW: u32 = 1 << 20;
/// zstd level of the deltas.
const DELTA_LEVEL: i32 = 9;
/// Anchor length and the stride of anchors indexed in the old file.
const ANCHOR: usize = 24;
const ANCHOR_STRIDE: usize = 16;

/// One chunk of the new image as a delta against a window of a file of the base image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaEntry {
    /// The chunk's slot in the new image.
    pub slot: u64,
    /// The inode (manifest index) of the base image's file the window is taken from.
    pub base_inode: u32,
    /// The window: first byte in that file, and length.
    pub window_offset: u64,
    pub window_len: u32,
    /// The delta: offset after the index, and length.
    pub data_offset: u64,
    pub data_len: u32,
}

/// The changed chunks of one file that have a delta worth it (data offsets still 0), and
/// how many changed chunks it has.
type FileDeltas = (u64, Vec<(DeltaEntry, Vec<u8>)>);

/// What [`write_deltas`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DeltaSummary {
    /// Chunks of the new image the base lacks, in files the base has a version of.
    pub candidates: u64,
    /// Of them, written as deltas (those at most half the chunk compressed alone).
    pub deltas: u64,
    /// Stored bytes of those chunks in the new image.
    pub stored_bytes: u64,
    /// Bytes of their deltas.
    pub delta_bytes: u64,
    /// Bytes of the sidecar.
    pub file_bytes: u64,
}

/// Parses a sidecar's first [`DELTA_HEADER_LEN`] bytes: base root, image root, index length.
pub fn parse_header(b: &[u8]) -> Result<(Digest, Digest, u64), FormatError> {
    let bad = |why: &str| FormatError::DeltaInvalid(why.to_string());
    if b.len() < DELTA_HEADER_LEN as usize || &b[..8] != DELTA_MAGIC {
        return Err(bad("not a delta sidecar (no INCFSDL1 magic)"));
    }
    let digest = |r: std::ops::Range<usize>| {
        <[u8; 32]>::try_from(&b[r])
            .map(Digest)
            .map_err(|_| bad("short header"))
    };
    let len = u64::from_le_bytes(b[72..80].try_into().map_err(|_| bad("short header"))?);
    if len > MAX_INDEX_BYTES {
        return Err(bad(&format!(
            "an index of {len} bytes is larger than the {} MiB allowed",
            MAX_INDEX_BYTES >> 20
        )));
    }
    Ok((digest(8..40)?, digest(40..72)?, len))
}

/// Parses an index whose header ([`parse_header`]) gave its length `len`; the entries are in
/// the order of their data, which starts at `DELTA_HEADER_LEN + len`. Entries that name
/// windows larger than [`MAX_WINDOW`] or deltas beyond 64 KiB are refused.
pub fn parse_index(index: &[u8], len: u64) -> Result<Vec<DeltaEntry>, FormatError> {
    if index.len() as u64 != len {
        return Err(FormatError::DeltaInvalid(format!(
            "index of {} bytes, the header says {len}",
            index.len()
        )));
    }
    let entries: Vec<DeltaEntry> = postcard::from_bytes(index)
        .map_err(|e| FormatError::DeltaInvalid(format!("index does not decode: {e}")))?;
    // Offsets beyond 2^48 (256 TiB) are no sidecar's: refused, so no sum of them overflows.
    let far = |o: u64| o > 1 << 48;
    if let Some(e) = entries.iter().find(|e| {
        e.window_len > MAX_WINDOW
            || e.data_len > 64 * 1024
            || e.data_len == 0
            || far(e.data_offset)
            || far(e.window_offset)
    }) {
        return Err(FormatError::DeltaInvalid(format!(
            "entry of slot {} names a {}-byte window and a {}-byte delta",
            e.slot, e.window_len, e.data_len
        )));
    }
    Ok(entries)
}

/// Decodes a delta against its window into at most `raw_len` bytes (not checked against any
/// digest: the caller does that).
pub fn decode_delta(delta: &[u8], window: &[u8], raw_len: u32) -> Result<Vec<u8>, String> {
    let mut d = zstd::zstd_safe::DCtx::create();
    d.ref_prefix(window).map_err(zstd_error)?;
    let mut out = vec![0u8; raw_len as usize];
    let n = d.decompress(&mut out[..], delta).map_err(zstd_error)?;
    out.truncate(n);
    Ok(out)
}

fn zstd_error(code: usize) -> String {
    zstd::zstd_safe::get_error_name(code).to_string()
}

/// Compresses `chunk` against `window` as a reference prefix.
fn encode_delta(chunk: &[u8], window: &[u8]) -> Option<Vec<u8>> {
    let mut c = zstd::zstd_safe::CCtx::create();
    c.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(DELTA_LEVEL))
        .ok()?;
    c.ref_prefix(window).ok()?;
    let mut out = vec![0u8; zstd::zstd_safe::compress_bound(chunk.len())];
    let n = c.compress2(&mut out[..], chunk).ok()?;
    out.truncate(n);
    Some(out)
}

/// FNV-1a of an anchor.
fn anchor_hash(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &c| {
        (h ^ u64::from(c)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Where in `old` the chunk at `at` of the new file most likely came from: the offset most
/// of its anchors vote for (in 1 KiB steps), else where the previous chunk's came from plus
/// a chunk, else the same relative position.
fn origin(anchors: &HashMap<u64, u64>, chunk: &[u8], previous: Option<u64>, relative: u64) -> u64 {
    let mut votes: HashMap<i64, u32> = HashMap::new();
    for q in 0..chunk.len().saturating_sub(ANCHOR - 1) {
        if let Some(&o) = anchors.get(&anchor_hash(&chunk[q..q + ANCHOR])) {
            *votes
                .entry((o as i64 - q as i64).div_euclid(1024))
                .or_default() += 1;
        }
    }
    votes
        .into_iter()
        .max_by_key(|&(k, v)| (v, std::cmp::Reverse(k)))
        .map(|(k, _)| (k * 1024).max(0) as u64)
        .or(previous)
        .unwrap_or(relative)
}

/// The deltas of one new file's changed chunks against `old`; each with its entry (the data
/// offset still 0).
fn file_deltas<B: RangeRead>(
    new: &Image<B>,
    f: &FileRef,
    base_inode: u32,
    old: &[u8],
    base_digests: &HashSet<Digest>,
) -> Result<FileDeltas, FormatError> {
    let chunk_size = u64::from(new.manifest().chunk_size);
    let changed: Vec<u64> = (0..f.chunks)
        .filter(|&i| {
            new.table()
                .get(f.first_chunk + i)
                .is_some_and(|e| !base_digests.contains(&e.digest))
        })
        .collect();
    if changed.is_empty() || old.is_empty() {
        return Ok((changed.len() as u64, Vec::new()));
    }
    let data = new.read_file(f.inode)?;
    let mut anchors: HashMap<u64, u64> = HashMap::new();
    let mut p = 0usize;
    while p + ANCHOR <= old.len() {
        anchors
            .entry(anchor_hash(&old[p..p + ANCHOR]))
            .or_insert(p as u64);
        p += ANCHOR_STRIDE;
    }
    let mut out = Vec::new();
    let mut previous: Option<u64> = None;
    for i in changed.iter().copied() {
        let slot = f.first_chunk + i;
        let Some(e) = new.table().get(slot) else {
            continue;
        };
        let start = (i * chunk_size) as usize;
        let chunk = &data[start..(start + e.raw_len as usize).min(data.len())];
        let relative = (start as u128 * old.len() as u128 / data.len().max(1) as u128) as u64;
        let at = origin(&anchors, chunk, previous.map(|p| p + chunk_size), relative)
            .min(old.len() as u64);
        previous = Some(at);
        let lo = at.saturating_sub(WINDOW_MARGIN);
        let hi = (at + chunk.len() as u64 + WINDOW_MARGIN).min(old.len() as u64);
        let window = &old[lo as usize..hi as usize];
        let Some(delta) = encode_delta(chunk, window) else {
            continue;
        };
        // Worth it when at most half the chunk compressed alone: a measure that does not
        // depend on the layout, so the chunks chosen before a relayout
        // ([`delta_digests`]) are the ones written after it.
        let alone = super::encode_frame(chunk, DELTA_LEVEL)?.len() as u64;
        if (delta.len() as u64) * 2 > alone {
            continue;
        }
        out.push((
            DeltaEntry {
                slot,
                base_inode,
                window_offset: lo,
                window_len: (hi - lo) as u32,
                data_offset: 0,
                data_len: delta.len() as u32,
            },
            delta,
        ));
    }
    Ok((changed.len() as u64, out))
}

/// The deltas of an image's changed chunks against a base image, computed once: their
/// digests lay out a relayout ([`super::relayout_for_update`] keeps them in frames of their
/// own), and [`ChunkDeltas::write`] writes them for the relaid-out image, whose slots are the
/// same.
pub struct ChunkDeltas {
    base_root: Digest,
    candidates: u64,
    /// Each delta with the digest of the chunk it rebuilds.
    deltas: Vec<(DeltaEntry, Digest, Vec<u8>)>,
}

impl ChunkDeltas {
    /// For every file of `new` whose path `base` has too (or that a file of `base` was
    /// renamed to, as [`crate::plan::carry`] matches them), each chunk whose digest `base`
    /// lacks, when its delta is at most half the chunk compressed alone.
    pub fn compute<A: RangeRead + Sync, B: RangeRead + Sync>(
        base: &Image<A>,
        new: &Image<B>,
    ) -> Result<Self, FormatError> {
        let base_digests: HashSet<Digest> =
            base.table().entries().iter().map(|e| e.digest).collect();
        let base_files: HashMap<Vec<u8>, FileRef> = base
            .files()
            .into_iter()
            .map(|f| (f.path.clone(), f))
            .collect();
        let new_files = new.files();
        let pairs = crate::plan::carry::version_pairs(&base_files, &new_files);
        let results: Vec<Result<FileDeltas, FormatError>> = pairs
            .par_iter()
            .map(|(k, old)| {
                let old_bytes = base.read_file(old.inode)?;
                file_deltas(new, &new_files[*k], old.inode, &old_bytes, &base_digests)
            })
            .collect();
        let mut candidates = 0;
        let mut deltas = Vec::new();
        for r in results {
            let (c, file) = r?;
            candidates += c;
            deltas.extend(
                file.into_iter()
                    .filter_map(|(e, d)| new.table().get(e.slot).map(|c| (e, c.digest, d))),
            );
        }
        Ok(ChunkDeltas {
            base_root: base.root_digest(),
            candidates,
            deltas,
        })
    }

    /// The digests of the chunks that have a delta.
    pub fn digests(&self) -> HashSet<Digest> {
        self.deltas.iter().map(|(_, d, _)| *d).collect()
    }

    /// Writes the sidecar for `image` (the image the deltas were computed for, or a relayout
    /// of it) to `out`, the deltas in `image`'s stored order, so the changed chunks of one
    /// request have adjacent deltas. A delta whose slot holds another chunk in `image` is
    /// left out.
    pub fn write<R: RangeRead>(
        mut self,
        image: &Image<R>,
        out: &Path,
    ) -> Result<DeltaSummary, FormatError> {
        let table = image.table();
        self.deltas
            .retain(|(e, digest, _)| table.get(e.slot).is_some_and(|c| c.digest == *digest));
        self.deltas.sort_by_key(|(e, _, _)| {
            (
                table.get(e.slot).map_or(u64::MAX, |c| c.stored_offset),
                e.slot,
            )
        });
        let mut summary = DeltaSummary {
            candidates: self.candidates,
            ..DeltaSummary::default()
        };
        let mut at = 0u64;
        for (e, _, d) in &mut self.deltas {
            e.data_offset = at;
            at += d.len() as u64;
            summary.deltas += 1;
            summary.delta_bytes += d.len() as u64;
            if let Some(c) = table.get(e.slot) {
                summary.stored_bytes +=
                    u64::from(c.stored_len) * u64::from(c.raw_len) / u64::from(c.frame_len.max(1));
            }
        }
        let entries: Vec<DeltaEntry> = self.deltas.iter().map(|(e, _, _)| *e).collect();
        let index = postcard::to_allocvec(&entries)
            .map_err(|e| FormatError::DeltaInvalid(format!("index does not encode: {e}")))?;
        let io = |error: std::io::Error| FormatError::Write {
            what: format!("writing {}", out.display()),
            error,
        };
        let dir = out
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
        {
            let w = tmp.as_file_mut();
            w.write_all(DELTA_MAGIC).map_err(io)?;
            w.write_all(&self.base_root.0).map_err(io)?;
            w.write_all(&image.root_digest().0).map_err(io)?;
            w.write_all(&(index.len() as u64).to_le_bytes())
                .map_err(io)?;
            w.write_all(&index).map_err(io)?;
            for (_, _, d) in &self.deltas {
                w.write_all(d).map_err(io)?;
            }
            w.sync_all().map_err(io)?;
        }
        summary.file_bytes = DELTA_HEADER_LEN + index.len() as u64 + at;
        tmp.persist(out).map_err(|e| io(e.error))?;
        Ok(summary)
    }
}

/// Writes the sidecar of `new`'s chunks as deltas against `base` to `out`
/// ([`ChunkDeltas::compute`], then [`ChunkDeltas::write`]).
pub fn write_deltas<A: RangeRead + Sync, B: RangeRead + Sync>(
    base: &Image<A>,
    new: &Image<B>,
    out: &Path,
) -> Result<DeltaSummary, FormatError> {
    ChunkDeltas::compute(base, new)?.write(new, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delta_round_trips_against_its_window_and_not_another() {
        let old: Vec<u8> = (0..70_000u32)
            .flat_map(|i| (i * 7919).to_le_bytes())
            .collect();
        let mut chunk = old[100_000..104_096].to_vec();
        chunk[10] ^= 0xff;
        let window = &old[60_000..140_000];
        let d = encode_delta(&chunk, window).unwrap();
        assert!(d.len() < 200, "delta of {} bytes", d.len());
        assert_eq!(decode_delta(&d, window, 4096).unwrap(), chunk);
        // Against another window it decodes to other bytes or fails: never the chunk.
        let other = &old[0..80_000];
        assert!(decode_delta(&d, other, 4096).map_or(true, |b| b != chunk));
    }

    #[test]
    fn headers_and_indexes_are_checked() {
        assert!(parse_header(b"INCFSDL0").is_err());
        let mut h = DELTA_MAGIC.to_vec();
        h.extend([0u8; 64]);
        h.extend((MAX_INDEX_BYTES + 1).to_le_bytes());
        assert!(parse_header(&h).unwrap_err().to_string().contains("larger"));
        assert!(parse_index(b"abcd", 3).is_err());
        let bad = postcard::to_allocvec(&vec![DeltaEntry {
            slot: 1,
            base_inode: 0,
            window_offset: 0,
            window_len: MAX_WINDOW + 1,
            data_offset: 0,
            data_len: 10,
        }])
        .unwrap();
        assert!(parse_index(&bad, bad.len() as u64).is_err());
        let far = postcard::to_allocvec(&vec![DeltaEntry {
            slot: 1,
            base_inode: 0,
            window_offset: 0,
            window_len: 100,
            data_offset: u64::MAX - 5,
            data_len: 10,
        }])
        .unwrap();
        assert!(parse_index(&far, far.len() as u64).is_err());
    }
}
