//! The chunk table: one fixed-size entry per chunk slot, grouped in segments whose digests
//! the manifest holds, so a reader can fetch and verify any part of it on its own.

use super::{Digest, FormatError, TableOrder};

/// Bytes per entry: stored offset u64, stored length u32, raw length u32, offset in frame
/// u32, frame raw length u32 (low 24 bits) with the frame's dictionary (high 8 bits), digest
/// `[32]`.
pub const CHUNK_ENTRY_LEN: usize = 56;
/// Entries per segment. 1024 entries = 56 KiB, one range request; at 4 KiB chunks a segment
/// covers 4 MiB of file data, and a 1 GiB image has 256 segments (8 KiB of digests in the
/// manifest).
pub const SEGMENT_ENTRIES: usize = 1024;
/// Bytes of a full segment.
pub const SEGMENT_BYTES: u64 = (SEGMENT_ENTRIES * CHUNK_ENTRY_LEN) as u64;
/// Largest frame (raw bytes) a reader accepts: a frame is decoded whole to serve any of its
/// chunks.
pub const MAX_FRAME_LEN: u32 = 4 << 20;
/// The bits of an entry's frame-length field that hold the length.
const FRAME_LEN_MASK: u32 = (1 << 24) - 1;

/// Where one chunk is stored and what it must hash to.
///
/// Chunks are stored in **frames**: a frame is a zstd frame (or raw bytes) in the data
/// section. `pack` writes one frame per chunk; a hot-first image packs the planned chunks
/// several to a frame, so they compress together (machine code compresses ~20 % better in
/// 256 KiB frames than in 4 KiB ones). Every chunk of a frame has an entry pointing at the
/// whole frame and at its own bytes inside the decoded frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    /// Offset of the frame's stored bytes, relative to the data section.
    pub stored_offset: u64,
    /// Stored length of the frame. Equal to `frame_len` means stored raw; smaller means
    /// zstd.
    pub stored_len: u32,
    /// Uncompressed length of the chunk.
    pub raw_len: u32,
    /// Offset of the chunk's bytes in the decoded frame.
    pub frame_offset: u32,
    /// Uncompressed length of the whole frame (`raw_len` when the frame holds one chunk).
    pub frame_len: u32,
    /// The dictionary the frame was compressed with: 0 for none, `k` for the manifest's
    /// `k`-th ([`super::dictionary`]). Stored in the high byte of the frame length, which a
    /// frame of at most [`MAX_FRAME_LEN`] leaves zero (so images without dictionaries read
    /// the same).
    pub dictionary: u8,
    /// BLAKE3 of the chunk's uncompressed bytes.
    pub digest: Digest,
}

impl ChunkEntry {
    /// True when the frame is stored as a zstd frame.
    pub fn is_compressed(&self) -> bool {
        self.stored_len != self.frame_len
    }

    /// This chunk's share of its frame's stored bytes (all of them for a frame of one
    /// chunk): what fetching the chunk costs, for accounting.
    pub fn stored_share(&self) -> u64 {
        if self.frame_len == self.raw_len {
            u64::from(self.stored_len)
        } else {
            (u64::from(self.stored_len) * u64::from(self.raw_len))
                .div_ceil(u64::from(self.frame_len.max(1)))
        }
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.stored_offset.to_le_bytes());
        out.extend_from_slice(&self.stored_len.to_le_bytes());
        out.extend_from_slice(&self.raw_len.to_le_bytes());
        out.extend_from_slice(&self.frame_offset.to_le_bytes());
        let frame = (self.frame_len & FRAME_LEN_MASK) | (u32::from(self.dictionary) << 24);
        out.extend_from_slice(&frame.to_le_bytes());
        out.extend_from_slice(&self.digest.0);
    }

    fn decode(b: &[u8]) -> Self {
        let u32_at = |i: usize| {
            let mut x = [0u8; 4];
            x.copy_from_slice(&b[i..i + 4]);
            u32::from_le_bytes(x)
        };
        let mut o = [0u8; 8];
        o.copy_from_slice(&b[0..8]);
        let mut d = [0u8; 32];
        d.copy_from_slice(&b[24..56]);
        ChunkEntry {
            stored_offset: u64::from_le_bytes(o),
            stored_len: u32_at(8),
            raw_len: u32_at(12),
            frame_offset: u32_at(16),
            frame_len: u32_at(20) & FRAME_LEN_MASK,
            dictionary: (u32_at(20) >> 24) as u8,
            digest: Digest(d),
        }
    }
}

/// The decoded chunk table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkTable {
    entries: Vec<ChunkEntry>,
}

impl ChunkTable {
    /// A table of these entries.
    pub fn new(entries: Vec<ChunkEntry>) -> Self {
        ChunkTable { entries }
    }

    /// Number of slots.
    pub fn len(&self) -> u64 {
        self.entries.len() as u64
    }

    /// True when the table has no slots.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry of `slot`.
    pub fn get(&self, slot: u64) -> Option<&ChunkEntry> {
        usize::try_from(slot).ok().and_then(|s| self.entries.get(s))
    }

    /// All entries in slot order.
    pub fn entries(&self) -> &[ChunkEntry] {
        &self.entries
    }

    /// Encodes the table with its entries in `order`; returns its bytes and the digest of
    /// each segment.
    pub fn encode(&self, order: &TableOrder) -> (Vec<u8>, Vec<Digest>) {
        let mut out = Vec::with_capacity(self.entries.len() * CHUNK_ENTRY_LEN);
        for pos in 0..self.len() {
            self.entries[order.slot_at(pos) as usize].encode_into(&mut out);
        }
        let digests = out
            .chunks(SEGMENT_ENTRIES * CHUNK_ENTRY_LEN)
            .map(Digest::of)
            .collect();
        (out, digests)
    }

    /// Decodes a whole table whose entries are in `order`, checking every segment against
    /// its digest and every entry against the chunk size and the data section's length.
    pub fn decode(
        bytes: &[u8],
        segment_digests: &[Digest],
        chunk_size: u32,
        data_len: u64,
        order: &TableOrder,
    ) -> Result<Self, FormatError> {
        if !bytes.len().is_multiple_of(CHUNK_ENTRY_LEN) {
            return Err(FormatError::ManifestInvalid(format!(
                "chunk table length {} is not a multiple of {CHUNK_ENTRY_LEN}",
                bytes.len()
            )));
        }
        let segments: Vec<&[u8]> = bytes.chunks(SEGMENT_ENTRIES * CHUNK_ENTRY_LEN).collect();
        if segments.len() != segment_digests.len() {
            return Err(FormatError::ManifestInvalid(format!(
                "chunk table has {} segments, manifest lists {}",
                segments.len(),
                segment_digests.len()
            )));
        }
        let n = bytes.len() / CHUNK_ENTRY_LEN;
        let mut entries = vec![None; n];
        for (i, (seg, want)) in segments.iter().zip(segment_digests).enumerate() {
            let first = (i * SEGMENT_ENTRIES) as u64;
            let decoded = decode_segment(seg, i as u64, want, chunk_size, data_len, order)?;
            for (k, e) in decoded.into_iter().enumerate() {
                let slot = order.slot_at(first + k as u64) as usize;
                if let Some(place) = entries.get_mut(slot) {
                    *place = Some(e);
                }
            }
        }
        let entries = entries
            .into_iter()
            .enumerate()
            .map(|(slot, e)| {
                e.ok_or_else(|| FormatError::EntryInvalid {
                    slot: slot as u64,
                    reason: "no entry in the table".into(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(ChunkTable { entries })
    }
}

/// Decodes segment `index` of a table from its bytes, checking them against the segment's
/// digest (from the manifest) and every entry against the chunk size and the data section's
/// length. The entries come in table order (`order` names their slots in errors). A reader
/// that fetches the table piecewise calls this per segment.
pub fn decode_segment(
    bytes: &[u8],
    index: u64,
    digest: &Digest,
    chunk_size: u32,
    data_len: u64,
    order: &TableOrder,
) -> Result<Vec<ChunkEntry>, FormatError> {
    if Digest::of(bytes) != *digest {
        return Err(FormatError::SegmentDigest { segment: index });
    }
    if bytes.is_empty()
        || bytes.len() > SEGMENT_ENTRIES * CHUNK_ENTRY_LEN
        || !bytes.len().is_multiple_of(CHUNK_ENTRY_LEN)
    {
        return Err(FormatError::ManifestInvalid(format!(
            "chunk table segment {index} is {} bytes long",
            bytes.len()
        )));
    }
    let first = index * SEGMENT_ENTRIES as u64;
    bytes
        .chunks_exact(CHUNK_ENTRY_LEN)
        .enumerate()
        .map(|(k, b)| {
            let e = ChunkEntry::decode(b);
            check_entry(order.slot_at(first + k as u64), &e, chunk_size, data_len)?;
            Ok(e)
        })
        .collect()
}

fn check_entry(
    slot: u64,
    e: &ChunkEntry,
    chunk_size: u32,
    data_len: u64,
) -> Result<(), FormatError> {
    let bad = |reason: &str| {
        Err(FormatError::EntryInvalid {
            slot,
            reason: reason.to_string(),
        })
    };
    if e.raw_len == 0 || e.raw_len > chunk_size {
        return bad("raw length is 0 or above the chunk size");
    }
    if e.frame_len > MAX_FRAME_LEN
        || u64::from(e.frame_offset) + u64::from(e.raw_len) > u64::from(e.frame_len)
    {
        return bad("chunk lies outside its frame, or the frame is too long");
    }
    if e.stored_len == 0 || e.stored_len > e.frame_len {
        return bad("stored length is 0 or above the frame length");
    }
    if e.dictionary != 0 && !e.is_compressed() {
        return bad("a frame stored raw names a dictionary");
    }
    match e.stored_offset.checked_add(u64::from(e.stored_len)) {
        Some(end) if end <= data_len => Ok(()),
        _ => bad("stored bytes lie outside the data section"),
    }
}
