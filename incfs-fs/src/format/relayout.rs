//! Rewriting an image's data section in another order: hot chunks first.
//!
//! The manifest's tree is unchanged; only stored offsets move, so the chunk table (and with
//! it the segment digests and the root digest) changes. Chunks are copied as stored, not
//! recompressed, and each is verified on the way.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::Path;

use super::pack::{PackError, parent_dir, write_image};
use super::{ChunkEntry, ChunkTable, Digest, FormatError, Image, RangeRead, decode_chunk};

/// What `relayout` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayoutSummary {
    /// Distinct stored chunks placed at the front, in the order asked.
    pub hot_chunks: u64,
    /// Stored bytes of those chunks: the hot prefix of the data section.
    pub hot_bytes: u64,
    /// Distinct stored chunks in the image.
    pub unique_chunks: u64,
    /// Size of the new image.
    pub image_bytes: u64,
    /// Root digest of the new image.
    pub root_digest: Digest,
}

/// Writes to `out` a copy of `img` whose data section holds first the chunks of `hot` (chunk
/// slots, in that order; repeats and slots sharing a stored chunk are placed once), then
/// every other chunk in slot order. Every chunk is verified as it is copied.
pub fn relayout<R: RangeRead>(
    img: &Image<R>,
    hot: &[u64],
    out: &Path,
) -> Result<RelayoutSummary, PackError> {
    let table = img.table();
    if let Some(&bad) = hot.iter().find(|&&s| s >= table.len()) {
        return Err(PackError::Option(format!(
            "slot {bad} is not in the image ({} slots)",
            table.len()
        )));
    }
    let werr = |source: io::Error| PackError::Write {
        path: out.to_path_buf(),
        source,
    };
    let mut data = tempfile::tempfile_in(parent_dir(out)).map_err(werr)?;
    // Old stored offset → new stored offset, for chunks already placed.
    let mut placed: HashMap<u64, u64> = HashMap::new();
    let mut data_len = 0u64;
    let mut hot_chunks = 0u64;
    let mut hot_bytes = 0u64;
    let mut buf = Vec::new();
    let data_offset = img.header().data_offset;
    let order = hot.iter().copied().chain(0..table.len());
    for (i, slot) in order.enumerate() {
        let Some(e) = table.get(slot) else { continue };
        if placed.contains_key(&e.stored_offset) {
            continue;
        }
        let stored = img
            .source()
            .read_range(data_offset + e.stored_offset, u64::from(e.stored_len))
            .map_err(FormatError::Io)?;
        decode_chunk(slot, e, &stored)?;
        placed.insert(e.stored_offset, data_len);
        data_len += stored.len() as u64;
        if i < hot.len() {
            hot_chunks += 1;
            hot_bytes += stored.len() as u64;
        }
        buf.extend_from_slice(&stored);
        if buf.len() >= 8 << 20 {
            data.write_all(&buf).map_err(werr)?;
            buf.clear();
        }
    }
    data.write_all(&buf).map_err(werr)?;
    let entries: Vec<ChunkEntry> = table
        .entries()
        .iter()
        .map(|e| ChunkEntry {
            stored_offset: placed[&e.stored_offset],
            ..*e
        })
        .collect();
    let unique_chunks = placed.len() as u64;
    let header = write_image(
        out,
        img.manifest().clone(),
        &ChunkTable::new(entries),
        &mut data,
        data_len,
    )?;
    Ok(RelayoutSummary {
        hot_chunks,
        hot_bytes,
        unique_chunks,
        image_bytes: header.image_len(),
        root_digest: header.root_digest,
    })
}
