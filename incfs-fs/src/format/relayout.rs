//! Rewriting an image's data section in another order: hot chunks first.
//!
//! The manifest's tree is unchanged; only where chunks are stored moves, so the chunk table
//! (and with it the segment digests and the root digest) changes. The table lists the hot
//! slots' entries first as well ([`TableOrder`]), so a mount loads them in a few segments. The hot chunks — those a
//! plan names, in plan order — lead the data section packed several to a **frame**
//! ([`RelayoutOptions::frame_bytes`]) and compressed together at a high level: a start
//! fetches them all anyway, and machine code compresses ~20 % better in 256 KiB frames than
//! in 4 KiB chunks. Every other chunk follows in slot order, framed as the source image
//! frames it (a frame none of whose chunks went hot is copied as stored; what is left of one
//! that lost chunks to the hot part is compressed together again). Each chunk is verified on
//! the way; identical chunks are still stored once.

use std::collections::{HashMap, HashSet};
use std::io::{self, Write};
use std::path::Path;

use rayon::prelude::*;

use super::dictionary::Encoder;
use super::pack::{PackError, parent_dir, write_image};
use super::{
    ChunkEntry, ChunkTable, Digest, FormatError, Image, MAX_FRAME_LEN, Prepared, RangeRead,
    TableOrder, chunk_of_frame, decode_chunk, decode_frame, encode_frame, encode_frame_with,
};

/// How `relayout` stores the hot chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayoutOptions {
    /// Raw bytes of hot chunks per frame; a frame holds at least one chunk. Default 256 KiB:
    /// most of the gain of compressing together (1 MiB frames save only 3 % more on clang's
    /// hot set), while a read that outruns the prefetch waits for at most 256 KiB of it.
    pub frame_bytes: u32,
    /// zstd level of the hot frames. Default 19: they are what a start waits for, and they
    /// are a small part of the image, so the slow level costs seconds at relayout only.
    pub level: i32,
}

impl Default for RelayoutOptions {
    fn default() -> Self {
        RelayoutOptions {
            frame_bytes: 256 * 1024,
            level: 19,
        }
    }
}

/// What `relayout` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayoutSummary {
    /// Distinct chunks placed at the front, in the order asked.
    pub hot_chunks: u64,
    /// Stored bytes of the frames holding them: the hot prefix of the data section.
    pub hot_bytes: u64,
    /// Frames of the hot prefix.
    pub hot_frames: u64,
    /// Distinct chunks in the image.
    pub unique_chunks: u64,
    /// Size of the new image.
    pub image_bytes: u64,
    /// Root digest of the new image.
    pub root_digest: Digest,
}

/// Where a chunk went in the new image.
#[derive(Debug, Clone, Copy)]
struct Placed {
    stored_offset: u64,
    stored_len: u32,
    frame_offset: u32,
    frame_len: u32,
    dictionary: u8,
}

/// Writes to `out` a copy of `img` whose data section holds first the chunks of `hot` (chunk
/// slots, in that order; repeats and identical chunks are placed once) in frames of
/// `opts.frame_bytes`, then every other chunk in slot order, in the source image's frames.
/// Every chunk is verified as it is copied.
pub fn relayout<R: RangeRead>(
    img: &Image<R>,
    hot: &[u64],
    out: &Path,
    opts: &RelayoutOptions,
) -> Result<RelayoutSummary, PackError> {
    relayout_on_base(img, hot, &HashSet::new(), out, opts)
}

/// [`relayout`] for an update of an image whose chunk digests are `base` (an older version
/// a reader may hold cached): a hot frame holds only chunks `base` has or only chunks it
/// lacks, so a reader holding `base` fetches no frame for the chunks it has. The two kinds
/// of frames are each filled in plan order and stored in the order of their first chunk.
/// With `base` empty, the same image as [`relayout`].
pub fn relayout_on_base<R: RangeRead>(
    img: &Image<R>,
    hot: &[u64],
    base: &HashSet<Digest>,
    out: &Path,
    opts: &RelayoutOptions,
) -> Result<RelayoutSummary, PackError> {
    relayout_for_update(img, hot, base, &HashSet::new(), out, opts)
}

/// [`relayout_on_base`] that also keeps the chunks `base` lacks but can rebuild from a delta
/// (`deltas`, [`super::delta`]) in frames of their own: a reader holding `base` takes those
/// as deltas, and a frame it must fetch for another chunk then holds none of them.
pub fn relayout_for_update<R: RangeRead>(
    img: &Image<R>,
    hot: &[u64],
    base: &HashSet<Digest>,
    deltas: &HashSet<Digest>,
    out: &Path,
    opts: &RelayoutOptions,
) -> Result<RelayoutSummary, PackError> {
    let table = img.table();
    if let Some(&bad) = hot.iter().find(|&&s| s >= table.len()) {
        return Err(PackError::Option(format!(
            "slot {bad} is not in the image ({} slots)",
            table.len()
        )));
    }
    if opts.frame_bytes > MAX_FRAME_LEN {
        return Err(PackError::Option(format!(
            "frame size {} is above the largest a reader accepts ({MAX_FRAME_LEN})",
            opts.frame_bytes
        )));
    }
    let werr = |source: io::Error| PackError::Write {
        path: out.to_path_buf(),
        source,
    };
    let reader = FrameReader::new(img);

    // The hot chunks, cut into frames of raw bytes.
    let mut placed: HashMap<Digest, Placed> = HashMap::new();
    // Frames by index, numbered when their first chunk comes, so in the order of their first
    // chunk; `open[k]` is the frame being filled with chunks `base` has (k = 1), lacks but
    // can rebuild from a delta (k = 2), or lacks (k = 0).
    let mut frames: Vec<Vec<u8>> = Vec::new();
    // Per hot chunk: (digest, frame index, offset in frame).
    let mut hot_spots: Vec<(Digest, usize, u32)> = Vec::new();
    let mut seen: HashSet<Digest> = HashSet::new();
    let mut open: [Option<usize>; 3] = [None; 3];
    for &slot in hot {
        let Some(e) = table.get(slot) else { continue };
        if !seen.insert(e.digest) {
            continue;
        }
        let raw = reader.chunk(slot, e)?;
        let kind = if base.contains(&e.digest) {
            1
        } else if deltas.contains(&e.digest) {
            2
        } else {
            0
        };
        let fi = match open[kind] {
            Some(fi) if frames[fi].len() + raw.len() <= opts.frame_bytes as usize => fi,
            _ => {
                frames.push(Vec::new());
                open[kind] = Some(frames.len() - 1);
                frames.len() - 1
            }
        };
        hot_spots.push((e.digest, fi, frames[fi].len() as u32));
        frames[fi].extend_from_slice(&raw);
    }
    let level = opts.level;
    let stored_frames: Vec<Vec<u8>> = frames
        .par_iter()
        .map(|raw| encode_frame(raw, level))
        .collect::<Result<_, _>>()?;

    let mut data = tempfile::tempfile_in(parent_dir(out)).map_err(werr)?;
    let mut data_len = 0u64;
    let mut frame_at = Vec::with_capacity(stored_frames.len());
    for f in &stored_frames {
        frame_at.push(data_len);
        data.write_all(f).map_err(werr)?;
        data_len += f.len() as u64;
    }
    let hot_bytes = data_len;
    for (digest, fi, offset) in &hot_spots {
        placed.insert(
            *digest,
            Placed {
                stored_offset: frame_at[*fi],
                stored_len: stored_frames[*fi].len() as u32,
                frame_offset: *offset,
                frame_len: frames[*fi].len() as u32,
                dictionary: 0,
            },
        );
    }
    drop(frames);

    // The dictionaries the other chunks were compressed with, between the hot frames (which
    // need none) and those chunks, checked on the way.
    let mut manifest = img.manifest().clone();
    let mut encoders = Vec::with_capacity(manifest.dictionaries.len());
    for (k, d) in manifest.dictionaries.iter_mut().enumerate() {
        let bytes = img
            .source()
            .read_range(img.header().data_offset + d.offset, u64::from(d.len))
            .map_err(FormatError::Io)?;
        Prepared::new(k as u8 + 1, d, &bytes)?;
        encoders.push(Encoder::new(&bytes, opts.level));
        data.write_all(&bytes).map_err(werr)?;
        d.offset = data_len;
        data_len += bytes.len() as u64;
    }

    // Every other chunk, in slot order, framed as the source image frames it: a chunk alone
    // in its frame is copied as stored, and so is a frame of several chunks none of which is
    // placed yet (pack's frames of a small file, of an ELF file's loader or late sections:
    // a miss there brings the whole frame, as it did before). What is left of a frame some
    // of whose chunks went hot is compressed together again, with its dictionary.
    let mut members: HashMap<u64, Vec<u64>> = HashMap::new();
    for (slot, e) in table.entries().iter().enumerate() {
        if e.frame_len != e.raw_len {
            members
                .entry(e.stored_offset)
                .or_default()
                .push(slot as u64);
        }
    }
    let mut buf = Vec::new();
    for (slot, e) in table.entries().iter().enumerate() {
        if placed.contains_key(&e.digest) {
            continue;
        }
        let slot = slot as u64;
        if e.frame_len == e.raw_len {
            let (stored, dictionary) = reader.single(slot, e)?;
            placed.insert(
                e.digest,
                Placed {
                    stored_offset: data_len,
                    stored_len: stored.len() as u32,
                    frame_offset: 0,
                    frame_len: e.raw_len,
                    dictionary,
                },
            );
            data_len += stored.len() as u64;
            buf.extend_from_slice(&stored);
        } else {
            // The frame's first member in slot order comes first: place all of it now. Its
            // stored bytes are read and decoded once, and every member is checked.
            let slots = members.get(&e.stored_offset).map_or(&[][..], Vec::as_slice);
            let whole = slots
                .iter()
                .filter_map(|&m| table.get(m))
                .all(|me| !placed.contains_key(&me.digest));
            let stored = reader.stored(e)?;
            let frame = decode_frame(slot, e, &stored, img.dictionary(e.dictionary)?)?;
            // What a frame compressed again holds: its members not placed yet, once each.
            let mut raws: Vec<(Digest, Vec<u8>)> = Vec::new();
            for &m in slots {
                let Some(me) = table.get(m) else { continue };
                let raw = chunk_of_frame(m, me, &frame)?;
                if !whole
                    && !placed.contains_key(&me.digest)
                    && !raws.iter().any(|(d, _)| *d == me.digest)
                {
                    raws.push((me.digest, raw));
                }
            }
            if whole {
                // Copied as stored: every member keeps its place in the frame.
                for &m in slots {
                    let Some(me) = table.get(m) else { continue };
                    placed.entry(me.digest).or_insert(Placed {
                        stored_offset: data_len,
                        stored_len: stored.len() as u32,
                        frame_offset: me.frame_offset,
                        frame_len: me.frame_len,
                        dictionary: me.dictionary,
                    });
                }
                data_len += stored.len() as u64;
                buf.extend_from_slice(&stored);
            } else {
                let raw: Vec<u8> = raws.iter().flat_map(|(_, r)| r.iter().copied()).collect();
                let encoder = usize::from(e.dictionary)
                    .checked_sub(1)
                    .and_then(|k| encoders.get(k));
                let stored = encode_frame_with(&raw, opts.level, encoder)?;
                // Only a compressed frame names its dictionary.
                let dictionary = if stored.len() < raw.len() && encoder.is_some() {
                    e.dictionary
                } else {
                    0
                };
                let mut at = 0u32;
                for (digest, r) in &raws {
                    placed.insert(
                        *digest,
                        Placed {
                            stored_offset: data_len,
                            stored_len: stored.len() as u32,
                            frame_offset: at,
                            frame_len: raw.len() as u32,
                            dictionary,
                        },
                    );
                    at += r.len() as u32;
                }
                data_len += stored.len() as u64;
                buf.extend_from_slice(&stored);
            }
        }
        if buf.len() >= 8 << 20 {
            data.write_all(&buf).map_err(werr)?;
            buf.clear();
        }
    }
    data.write_all(&buf).map_err(werr)?;

    let entries: Vec<ChunkEntry> = table
        .entries()
        .iter()
        .map(|e| {
            let p = placed[&e.digest];
            ChunkEntry {
                stored_offset: p.stored_offset,
                stored_len: p.stored_len,
                raw_len: e.raw_len,
                frame_offset: p.frame_offset,
                frame_len: p.frame_len,
                dictionary: p.dictionary,
                digest: e.digest,
            }
        })
        .collect();
    let unique_chunks = placed.len() as u64;
    // The planned slots' entries lead the chunk table too, so a start loads few segments.
    manifest.table_order = TableOrder::runs_for(hot, table.len());
    let header = write_image(
        out,
        manifest,
        &ChunkTable::new(entries),
        &mut data,
        data_len,
    )?;
    Ok(RelayoutSummary {
        hot_chunks: hot_spots.len() as u64,
        hot_bytes,
        hot_frames: stored_frames.len() as u64,
        unique_chunks,
        image_bytes: header.image_len(),
        root_digest: header.root_digest,
    })
}

/// Reads chunks of the source image, keeping the last decoded frame (a source image may
/// itself hold frames of several chunks).
struct FrameReader<'a, R: RangeRead> {
    img: &'a Image<R>,
    last: std::cell::RefCell<Option<(u64, Vec<u8>)>>,
}

impl<'a, R: RangeRead> FrameReader<'a, R> {
    fn new(img: &'a Image<R>) -> Self {
        FrameReader {
            img,
            last: std::cell::RefCell::new(None),
        }
    }

    fn stored(&self, e: &ChunkEntry) -> Result<Vec<u8>, FormatError> {
        Ok(self.img.source().read_range(
            self.img.header().data_offset + e.stored_offset,
            u64::from(e.stored_len),
        )?)
    }

    /// The verified raw bytes of `slot`.
    fn chunk(&self, slot: u64, e: &ChunkEntry) -> Result<Vec<u8>, FormatError> {
        let mut last = self.last.borrow_mut();
        if last.as_ref().is_none_or(|(at, _)| *at != e.stored_offset) {
            let dict = self.img.dictionary(e.dictionary)?;
            let frame = decode_frame(slot, e, &self.stored(e)?, dict)?;
            *last = Some((e.stored_offset, frame));
        }
        match last.as_ref() {
            Some((_, frame)) => chunk_of_frame(slot, e, frame),
            None => Err(FormatError::ChunkCorrupt {
                slot,
                reason: "frame not read".into(),
            }),
        }
    }

    /// The stored bytes of `slot` as a frame of its own, and the dictionary they need:
    /// copied when it is one already, re-encoded (at zstd level 3, `pack`'s default, without
    /// a dictionary) when it shares a frame. Verified.
    fn single(&self, slot: u64, e: &ChunkEntry) -> Result<(Vec<u8>, u8), FormatError> {
        if e.frame_len == e.raw_len {
            let stored = self.stored(e)?;
            decode_chunk(slot, e, &stored, self.img.dictionary(e.dictionary)?)?;
            Ok((stored, e.dictionary))
        } else {
            Ok((encode_frame(&self.chunk(slot, e)?, 3)?, 0))
        }
    }
}
