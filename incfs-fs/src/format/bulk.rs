//! The image's chunks again, in large frames, for the background fill: the sidecar
//! `IMG.bulk`.
//!
//! An image keeps most chunks in frames of their own, so a random page fault or a plan
//! fetches only what it names. The fill, though, moves the whole image, and 4 KiB frames
//! compressed alone cost it bytes: clang-22's image is 68 MB where its chunks in 256 KiB
//! frames are 57 MB. A start without a plan ends about when the fill has moved the image, so
//! those bytes are its time. The sidecar holds every chunk once more, in stored order, in
//! frames of [`DEFAULT_FRAME_BYTES`] compressed at level 19 with the image's dictionaries;
//! the fill asks for these frames, demand misses and plans keep the image's small ones.
//!
//! The sidecar needs no trust: each chunk taken out of a decoded frame is checked against
//! its digest in the image's verified table before it is stored, and a frame that fails
//! (a damaged or foreign sidecar) is dropped and its chunks fetched from the image.
//!
//! Layout (integers little-endian): [`BULK_MAGIC`] (8 bytes), the image's root digest (32),
//! the index's length (u64), the index (postcard, `Vec<BulkFrame>`), then the frames, each a
//! zstd frame or, when that is not smaller, raw bytes.

use std::io::Write;
use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::dictionary::{Encoder, Prepared, decompress_with};
use super::{
    ChunkEntry, Digest, FormatError, Image, RangeRead, SlotRun, chunk_of_frame, encode_frame_with,
};

/// First bytes of a bulk sidecar.
pub const BULK_MAGIC: &[u8; 8] = b"INCFSBK1";
/// Bytes before the index.
pub const BULK_HEADER_LEN: u64 = 8 + 32 + 8;
/// What a sidecar is called: the image's path or URL with this added.
pub const BULK_SUFFIX: &str = ".bulk";
/// Largest index read (clang-22's is ~40 KB).
pub const MAX_INDEX_BYTES: u64 = 64 << 20;
/// Largest frame, in raw bytes, a reader accepts.
pub const MAX_FRAME_BYTES: u32 = 4 << 20;
/// Raw bytes per frame. 256 KiB, chosen by measurement (BENCHMARKS.md, "The fill's own
/// frames").
pub const DEFAULT_FRAME_BYTES: u32 = 256 * 1024;
/// zstd level of the frames.
pub const DEFAULT_LEVEL: i32 = 19;

/// One frame of the sidecar: the raw bytes of the slots its runs name, laid end to end in
/// that order (each as long as its entry's raw length).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkFrame {
    /// Offset of its stored bytes after the index, and their length.
    pub offset: u64,
    pub len: u32,
    /// Its raw length.
    pub raw_len: u32,
    /// The image's dictionary it is compressed with (0: none).
    pub dictionary: u8,
    /// The slots it holds.
    pub slots: Vec<SlotRun>,
}

impl BulkFrame {
    /// The slots it holds, in order.
    pub fn slots(&self) -> impl Iterator<Item = u64> + '_ {
        self.slots.iter().flat_map(|r| r.first..r.first + r.count)
    }

    /// True when stored as zstd (`len < raw_len`).
    pub fn is_compressed(&self) -> bool {
        self.len < self.raw_len
    }
}

/// How [`write_bulk`] cuts and compresses.
#[derive(Debug, Clone, Copy)]
pub struct BulkOptions {
    /// Raw bytes per frame (at most [`MAX_FRAME_BYTES`]).
    pub frame_bytes: u32,
    /// zstd level.
    pub level: i32,
}

impl Default for BulkOptions {
    fn default() -> Self {
        BulkOptions {
            frame_bytes: DEFAULT_FRAME_BYTES,
            level: DEFAULT_LEVEL,
        }
    }
}

/// What [`write_bulk`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BulkSummary {
    pub frames: u64,
    /// Bytes of the sidecar.
    pub bytes: u64,
}

/// Writes the sidecar of `image` to `out`: every slot, in stored order, in frames of about
/// `opts.frame_bytes` raw bytes. A frame holds chunks of one dictionary (chunks the image
/// stores raw join any). Every chunk is checked against its digest as it is read.
pub fn write_bulk<R: RangeRead + Sync>(
    image: &Image<R>,
    out: &Path,
    opts: &BulkOptions,
) -> Result<BulkSummary, FormatError> {
    let frame_bytes = opts.frame_bytes.clamp(1, MAX_FRAME_BYTES);
    let table = image.table();
    let mut order: Vec<u64> = (0..table.len()).collect();
    order.sort_by_key(|&s| {
        let e = &table.entries()[s as usize];
        (e.stored_offset, e.frame_offset, s)
    });
    // (dictionary, slots) per frame.
    let mut plans: Vec<(u8, Vec<u64>)> = Vec::new();
    let mut raw = 0u64;
    for slot in order {
        let e = &table.entries()[slot as usize];
        let fits = plans.last().is_some_and(|(d, slots)| {
            !slots.is_empty()
                && raw + u64::from(e.raw_len) <= u64::from(frame_bytes)
                && (e.dictionary == 0 || *d == 0 || *d == e.dictionary)
        });
        if !fits {
            plans.push((0, Vec::new()));
            raw = 0;
        }
        if let Some((d, slots)) = plans.last_mut() {
            if *d == 0 {
                *d = e.dictionary;
            }
            slots.push(slot);
        }
        raw += u64::from(e.raw_len);
    }
    let mut encoders: Vec<Encoder> = Vec::new();
    for (k, d) in image.manifest().dictionaries.iter().enumerate() {
        let bytes = image
            .source()
            .read_range(image.header().data_offset + d.offset, u64::from(d.len))?;
        if Digest::of(&bytes) != d.digest {
            return Err(FormatError::DictionaryCorrupt {
                number: (k + 1) as u8,
                reason: "digest mismatch".into(),
            });
        }
        encoders.push(Encoder::new(&bytes, opts.level));
    }
    let frames: Vec<(BulkFrame, Vec<u8>)> = plans
        .par_iter()
        .map(|(dict, slots)| {
            let mut raw = Vec::with_capacity(frame_bytes as usize);
            // The image frame last decoded: (stored offset, raw bytes).
            let mut last: Option<(u64, Vec<u8>)> = None;
            for &slot in slots {
                let e = table.get(slot).ok_or_else(|| FormatError::EntryInvalid {
                    slot,
                    reason: "no such slot".into(),
                })?;
                if last.as_ref().is_none_or(|(o, _)| *o != e.stored_offset) {
                    last = Some((e.stored_offset, image.read_frame(slot)?));
                }
                if let Some((_, f)) = &last {
                    raw.extend_from_slice(&chunk_of_frame(slot, e, f)?);
                }
            }
            let encoder = usize::from(*dict)
                .checked_sub(1)
                .and_then(|k| encoders.get(k));
            let stored = encode_frame_with(&raw, opts.level, encoder)?;
            // Only a compressed frame names its dictionary.
            let dictionary = if stored.len() < raw.len() && encoder.is_some() {
                *dict
            } else {
                0
            };
            let frame = BulkFrame {
                offset: 0,
                len: stored.len() as u32,
                raw_len: raw.len() as u32,
                dictionary,
                slots: runs_of(slots),
            };
            Ok((frame, stored))
        })
        .collect::<Result<_, FormatError>>()?;
    let mut index: Vec<BulkFrame> = Vec::with_capacity(frames.len());
    let mut at = 0u64;
    for (f, stored) in &frames {
        index.push(BulkFrame {
            offset: at,
            ..f.clone()
        });
        at += stored.len() as u64;
    }
    let index_bytes = postcard::to_allocvec(&index)
        .map_err(|e| FormatError::BulkInvalid(format!("index does not encode: {e}")))?;
    let tmp = out.with_extension("bulk.tmp");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    w.write_all(BULK_MAGIC)?;
    w.write_all(&image.root_digest().0)?;
    w.write_all(&(index_bytes.len() as u64).to_le_bytes())?;
    w.write_all(&index_bytes)?;
    for (_, stored) in &frames {
        w.write_all(stored)?;
    }
    w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, out)?;
    Ok(BulkSummary {
        frames: index.len() as u64,
        bytes: BULK_HEADER_LEN + index_bytes.len() as u64 + at,
    })
}

/// Where the sidecar of the image at `image` lies: `IMAGE.bulk`.
pub fn path_beside(image: &Path) -> std::path::PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(BULK_SUFFIX);
    p.into()
}

/// Writes the sidecar of the image file at `image` beside it ([`path_beside`]); returns
/// where and what.
pub fn write_beside(
    image: &Path,
    opts: &BulkOptions,
) -> Result<(std::path::PathBuf, BulkSummary), FormatError> {
    let img = Image::open_path(image, None)?;
    let out = path_beside(image);
    let summary = write_bulk(&img, &out, opts)?;
    // Readable by whoever may read the image.
    std::fs::set_permissions(&out, std::fs::metadata(image)?.permissions())?;
    Ok((out, summary))
}

/// Removes the sidecar beside `image`, if there is one (an image written without one must
/// not keep an older image's).
pub fn remove_beside(image: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path_beside(image)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// `slots` as runs of consecutive slots.
fn runs_of(slots: &[u64]) -> Vec<SlotRun> {
    let mut runs: Vec<SlotRun> = Vec::new();
    for &s in slots {
        match runs.last_mut() {
            Some(r) if r.first + r.count == s => r.count += 1,
            _ => runs.push(SlotRun { first: s, count: 1 }),
        }
    }
    runs
}

/// Parses a sidecar's header: the root digest of the image it is for and the index's
/// length.
pub fn parse_header(b: &[u8]) -> Result<(Digest, u64), FormatError> {
    let bad = |why: &str| FormatError::BulkInvalid(why.to_string());
    if b.len() < BULK_HEADER_LEN as usize || &b[..8] != BULK_MAGIC {
        return Err(bad("not a bulk sidecar (no INCFSBK1 magic)"));
    }
    let root = <[u8; 32]>::try_from(&b[8..40]).map_err(|_| bad("short header"))?;
    let len = u64::from_le_bytes(b[40..48].try_into().map_err(|_| bad("short header"))?);
    if len > MAX_INDEX_BYTES {
        return Err(bad(&format!(
            "an index of {len} bytes is larger than the {} MiB allowed",
            MAX_INDEX_BYTES >> 20
        )));
    }
    Ok((Digest(root), len))
}

/// Parses an index of `len` bytes (the header's) for an image of `slots` chunk slots.
/// Frames must lie end to end from offset 0 and name slots of the image, each slot at most
/// once, and none may be larger than [`MAX_FRAME_BYTES`] raw.
pub fn parse_index(index: &[u8], len: u64, slots: u64) -> Result<Vec<BulkFrame>, FormatError> {
    let bad = |why: String| FormatError::BulkInvalid(why);
    if index.len() as u64 != len {
        return Err(bad(format!(
            "index of {} bytes, the header says {len}",
            index.len()
        )));
    }
    let frames: Vec<BulkFrame> =
        postcard::from_bytes(index).map_err(|e| bad(format!("index does not decode: {e}")))?;
    let mut at = 0u64;
    let mut seen = vec![false; usize::try_from(slots).unwrap_or(0)];
    for (k, f) in frames.iter().enumerate() {
        if f.offset != at || f.len == 0 || f.raw_len > MAX_FRAME_BYTES || f.len > f.raw_len {
            return Err(bad(format!(
                "frame {k} at {} of {} stored / {} raw bytes does not follow the one before \
                 (at {at}) or is out of bounds",
                f.offset, f.len, f.raw_len
            )));
        }
        at += u64::from(f.len);
        for r in &f.slots {
            let end = r.first.checked_add(r.count).filter(|&e| e <= slots);
            let Some(end) = end else {
                return Err(bad(format!(
                    "frame {k} names slots {}..+{} of an image of {slots}",
                    r.first, r.count
                )));
            };
            for s in r.first..end {
                if std::mem::replace(&mut seen[s as usize], true) {
                    return Err(bad(format!("slot {s} is in two frames")));
                }
            }
        }
    }
    Ok(frames)
}

/// What [`verify_bulk`] found in a sidecar.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BulkReport {
    /// Frames in the sidecar, and their stored bytes.
    pub frames: u64,
    pub stored_bytes: u64,
    /// Chunks the frames hold, all checked.
    pub chunks: u64,
    /// Slots of the image no frame holds (the fill fetches them from the image).
    pub missing_slots: u64,
    /// Frames that do not decode or hold a chunk that does not match its digest, each with
    /// why.
    pub failures: Vec<BulkFailure>,
}

/// A frame of a sidecar that is not usable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BulkFailure {
    /// The frame's number and where its stored bytes start in the sidecar file.
    pub frame: u64,
    pub file_offset: u64,
    pub reason: String,
}

/// Checks the sidecar at `path` against `image`: the header names the image's root digest,
/// the index is sound, and every frame decodes into chunks that each match their digest in
/// the image's verified table. `progress` gets the raw bytes of each frame checked. A header
/// or index that is wrong (the fill would refuse the whole sidecar) is an error; bad frames
/// (the fill would fetch their chunks from the image) are listed in the report.
pub fn verify_bulk<R: RangeRead + Sync>(
    image: &Image<R>,
    path: &Path,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<BulkReport, FormatError> {
    use std::os::unix::fs::FileExt;
    let named = |e: FormatError| FormatError::BulkInvalid(format!("{}: {e}", path.display()));
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let read = |offset: u64, n: u64| -> Result<Vec<u8>, FormatError> {
        if offset.checked_add(n).is_none_or(|end| end > len) {
            return Err(FormatError::BulkInvalid(format!(
                "{}: {n} bytes at {offset} lie past its end ({len} bytes)",
                path.display()
            )));
        }
        let mut buf = vec![0u8; usize::try_from(n).unwrap_or(usize::MAX)];
        file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    };
    let (root, index_len) = parse_header(&read(0, BULK_HEADER_LEN.min(len))?).map_err(named)?;
    if root != image.root_digest() {
        return Err(FormatError::BulkInvalid(format!(
            "{} is the sidecar of image {root}, not of this one ({})",
            path.display(),
            image.root_digest()
        )));
    }
    let table = image.table();
    let frames =
        parse_index(&read(BULK_HEADER_LEN, index_len)?, index_len, table.len()).map_err(named)?;
    let data_start = BULK_HEADER_LEN + index_len;
    let stored_bytes: u64 = frames.iter().map(|f| u64::from(f.len)).sum();
    if data_start + stored_bytes != len {
        return Err(FormatError::BulkInvalid(format!(
            "{}: the index names {stored_bytes} bytes of frames, the file holds {}",
            path.display(),
            len.saturating_sub(data_start)
        )));
    }
    let check = |f: &BulkFrame| -> Result<u64, String> {
        let stored = read(data_start + f.offset, u64::from(f.len)).map_err(|e| e.to_string())?;
        let dict = image.dictionary(f.dictionary).map_err(|e| e.to_string())?;
        let raw = decode_bulk_frame(f, &stored, dict)?;
        for (s, e, bytes) in frame_chunks(f, &raw, |s| table.get(s).copied())? {
            if Digest::of(bytes) != e.digest {
                return Err(format!("slot {s} does not match its digest"));
            }
        }
        progress(raw.len() as u64);
        Ok(f.slots().count() as u64)
    };
    let results: Vec<Result<u64, String>> = frames.par_iter().map(check).collect();
    let mut report = BulkReport {
        frames: frames.len() as u64,
        stored_bytes,
        ..BulkReport::default()
    };
    for (k, (f, r)) in frames.iter().zip(results).enumerate() {
        match r {
            Ok(n) => report.chunks += n,
            Err(reason) => report.failures.push(BulkFailure {
                frame: k as u64,
                file_offset: data_start + f.offset,
                reason,
            }),
        }
    }
    let held: u64 = frames.iter().map(|f| f.slots().count() as u64).sum();
    report.missing_slots = table.len().saturating_sub(held);
    Ok(report)
}

/// A chunk of a decoded frame: its slot, its table entry, its raw bytes.
pub(crate) type FrameChunk<'a> = (u64, ChunkEntry, &'a [u8]);

/// Cuts a frame's decoded bytes into its chunks, in order, as (slot, table entry, raw
/// bytes), by the raw lengths the table gives (`entry` looks a slot up). An error when a
/// slot is not in the table or the chunks and the frame's bytes do not add up. The caller
/// checks each chunk's digest.
pub(crate) fn frame_chunks<'a>(
    frame: &BulkFrame,
    raw: &'a [u8],
    entry: impl Fn(u64) -> Option<ChunkEntry>,
) -> Result<Vec<FrameChunk<'a>>, String> {
    let mut chunks = Vec::new();
    let mut at = 0usize;
    for s in frame.slots() {
        let e = entry(s).ok_or_else(|| format!("slot {s}: no such slot"))?;
        let end = at + e.raw_len as usize;
        let bytes = raw
            .get(at..end)
            .ok_or_else(|| format!("slot {s} runs past the frame's {} raw bytes", raw.len()))?;
        chunks.push((s, e, bytes));
        at = end;
    }
    if at != raw.len() {
        return Err(format!(
            "its chunks are {at} bytes, the frame decodes to {}",
            raw.len()
        ));
    }
    Ok(chunks)
}

/// Decodes a frame's stored bytes into its raw bytes (checked for length only: the caller
/// checks each chunk against its digest). `dict` is the dictionary the frame names.
pub fn decode_bulk_frame(
    frame: &BulkFrame,
    stored: &[u8],
    dict: Option<&Prepared>,
) -> Result<Vec<u8>, String> {
    if stored.len() != frame.len as usize {
        return Err(format!(
            "got {} stored bytes, expected {}",
            stored.len(),
            frame.len
        ));
    }
    let raw = if !frame.is_compressed() {
        stored.to_vec()
    } else {
        let capacity = frame.raw_len as usize;
        match (frame.dictionary, dict) {
            (0, _) => zstd::bulk::decompress(stored, capacity),
            (_, Some(d)) => decompress_with(stored, capacity, d),
            (k, None) => return Err(format!("dictionary {k} is not available")),
        }
        .map_err(|e| format!("zstd: {e}"))?
    };
    if raw.len() != frame.raw_len as usize {
        return Err(format!(
            "decoded {} bytes, expected {}",
            raw.len(),
            frame.raw_len
        ));
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(offset: u64, len: u32, first: u64, count: u64) -> BulkFrame {
        BulkFrame {
            offset,
            len,
            raw_len: 4096,
            dictionary: 0,
            slots: vec![SlotRun { first, count }],
        }
    }

    fn encode(frames: &[BulkFrame]) -> Vec<u8> {
        postcard::to_allocvec(frames).unwrap()
    }

    #[test]
    fn a_frame_is_cut_into_its_chunks_or_refused_when_they_do_not_fit() {
        let entry = |raw_len: u32| ChunkEntry {
            stored_offset: 0,
            stored_len: raw_len,
            raw_len,
            frame_offset: 0,
            frame_len: raw_len,
            dictionary: 0,
            digest: Digest::of(b""),
        };
        let lens = [3u32, 5, 2];
        let table = |s: u64| lens.get(s as usize).map(|&n| entry(n));
        let raw: Vec<u8> = (0u8..10).collect();
        let f = frame(0, 10, 0, 3);
        let cut: Vec<(u64, &[u8])> = frame_chunks(&f, &raw, table)
            .unwrap()
            .into_iter()
            .map(|(s, _, b)| (s, b))
            .collect();
        assert_eq!(
            cut,
            vec![(0, &raw[0..3]), (1, &raw[3..8]), (2, &raw[8..10])]
        );
        let short = frame_chunks(&f, &raw[..9], table).unwrap_err();
        assert!(short.contains("slot 2 runs past"), "{short}");
        let long = frame_chunks(&frame(0, 10, 0, 2), &raw, table).unwrap_err();
        assert!(long.contains("8 bytes, the frame decodes to 10"), "{long}");
        let foreign = frame_chunks(&frame(0, 10, 2, 2), &raw, table).unwrap_err();
        assert!(foreign.contains("slot 3: no such slot"), "{foreign}");
    }

    #[test]
    fn an_index_parses_back() {
        let frames = vec![frame(0, 100, 0, 2), frame(100, 50, 2, 1)];
        let b = encode(&frames);
        assert_eq!(parse_index(&b, b.len() as u64, 3).unwrap(), frames);
    }

    #[test]
    fn bad_indexes_are_refused_with_why() {
        let cases: Vec<(Vec<BulkFrame>, &str)> = vec![
            (vec![frame(0, 100, 0, 2), frame(90, 50, 2, 1)], "follow"),
            (
                vec![frame(0, 100, 0, 2), frame(100, 50, 1, 1)],
                "two frames",
            ),
            (vec![frame(0, 100, 2, 5)], "of an image of 3"),
            (vec![frame(0, 100, u64::MAX, 2)], "of an image of 3"),
            (
                vec![BulkFrame {
                    raw_len: MAX_FRAME_BYTES + 1,
                    ..frame(0, 100, 0, 1)
                }],
                "out of bounds",
            ),
        ];
        for (frames, why) in cases {
            let b = encode(&frames);
            let err = parse_index(&b, b.len() as u64, 3).unwrap_err().to_string();
            assert!(err.contains(why), "{err} should say {why}");
        }
        let b = encode(&[frame(0, 100, 0, 1)]);
        assert!(parse_index(&b, b.len() as u64 + 1, 3).is_err());
        assert!(parse_index(&b[..b.len() - 1], b.len() as u64 - 1, 3).is_err());
    }

    #[test]
    fn a_header_names_its_image_and_a_bad_one_is_refused() {
        let mut h = BULK_MAGIC.to_vec();
        h.extend_from_slice(&[7u8; 32]);
        h.extend_from_slice(&40u64.to_le_bytes());
        assert_eq!(parse_header(&h).unwrap(), (Digest([7u8; 32]), 40));
        let mut wrong = h.clone();
        wrong[0] = b'X';
        assert!(
            parse_header(&wrong)
                .unwrap_err()
                .to_string()
                .contains("magic")
        );
        let mut huge = h.clone();
        huge[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(
            parse_header(&huge)
                .unwrap_err()
                .to_string()
                .contains("larger")
        );
        assert!(parse_header(&h[..20]).is_err());
    }

    #[test]
    fn a_frame_of_the_wrong_length_does_not_decode() {
        let raw = vec![5u8; 4096];
        let packed = zstd::bulk::compress(&raw, 3).unwrap();
        let f = BulkFrame {
            len: packed.len() as u32,
            ..frame(0, 0, 0, 1)
        };
        assert_eq!(decode_bulk_frame(&f, &packed, None).unwrap(), raw);
        assert!(decode_bulk_frame(&f, &packed[1..], None).is_err());
        let short = BulkFrame {
            raw_len: 4000,
            ..f.clone()
        };
        assert!(decode_bulk_frame(&short, &packed, None).is_err());
    }
}
