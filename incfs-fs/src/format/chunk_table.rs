//! The chunk table: one fixed-size entry per chunk slot, grouped in segments whose digests
//! the manifest holds, so a reader can fetch and verify any part of it on its own.

use super::{Digest, FormatError};

/// Bytes per entry: stored offset u64, stored length u32, raw length u32, digest `[32]`.
pub const CHUNK_ENTRY_LEN: usize = 48;
/// Entries per segment. 1024 entries = 48 KiB, one range request; at 4 KiB chunks a segment
/// covers 4 MiB of file data, and a 1 GiB image has 256 segments (8 KiB of digests in the
/// manifest).
pub const SEGMENT_ENTRIES: usize = 1024;
/// Bytes of a full segment.
pub const SEGMENT_BYTES: u64 = (SEGMENT_ENTRIES * CHUNK_ENTRY_LEN) as u64;

/// Where one chunk is stored and what it must hash to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    /// Offset of the stored bytes, relative to the data section.
    pub stored_offset: u64,
    /// Stored length. Equal to `raw_len` means stored raw; smaller means zstd.
    pub stored_len: u32,
    /// Uncompressed length.
    pub raw_len: u32,
    /// BLAKE3 of the uncompressed bytes.
    pub digest: Digest,
}

impl ChunkEntry {
    /// True when the chunk is stored as a zstd frame.
    pub fn is_compressed(&self) -> bool {
        self.stored_len != self.raw_len
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.stored_offset.to_le_bytes());
        out.extend_from_slice(&self.stored_len.to_le_bytes());
        out.extend_from_slice(&self.raw_len.to_le_bytes());
        out.extend_from_slice(&self.digest.0);
    }

    fn decode(b: &[u8]) -> Self {
        let mut o = [0u8; 8];
        o.copy_from_slice(&b[0..8]);
        let mut s = [0u8; 4];
        s.copy_from_slice(&b[8..12]);
        let mut r = [0u8; 4];
        r.copy_from_slice(&b[12..16]);
        let mut d = [0u8; 32];
        d.copy_from_slice(&b[16..48]);
        ChunkEntry {
            stored_offset: u64::from_le_bytes(o),
            stored_len: u32::from_le_bytes(s),
            raw_len: u32::from_le_bytes(r),
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

    /// Encodes the table; returns its bytes and the digest of each segment.
    pub fn encode(&self) -> (Vec<u8>, Vec<Digest>) {
        let mut out = Vec::with_capacity(self.entries.len() * CHUNK_ENTRY_LEN);
        for e in &self.entries {
            e.encode_into(&mut out);
        }
        let digests = out
            .chunks(SEGMENT_ENTRIES * CHUNK_ENTRY_LEN)
            .map(Digest::of)
            .collect();
        (out, digests)
    }

    /// Decodes a whole table, checking every segment against its digest and every entry
    /// against the chunk size and the data section's length.
    pub fn decode(
        bytes: &[u8],
        segment_digests: &[Digest],
        chunk_size: u32,
        data_len: u64,
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
        let mut entries = Vec::with_capacity(bytes.len() / CHUNK_ENTRY_LEN);
        for (i, (seg, want)) in segments.iter().zip(segment_digests).enumerate() {
            entries.extend(decode_segment(seg, i as u64, want, chunk_size, data_len)?);
        }
        Ok(ChunkTable { entries })
    }
}

/// Decodes segment `index` of a table from its bytes, checking them against the segment's
/// digest (from the manifest) and every entry against the chunk size and the data section's
/// length. A reader that fetches the table piecewise calls this per segment.
pub fn decode_segment(
    bytes: &[u8],
    index: u64,
    digest: &Digest,
    chunk_size: u32,
    data_len: u64,
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
            check_entry(first + k as u64, &e, chunk_size, data_len)?;
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
    if e.stored_len == 0 || e.stored_len > e.raw_len {
        return bad("stored length is 0 or above the raw length");
    }
    match e.stored_offset.checked_add(u64::from(e.stored_len)) {
        Some(end) if end <= data_len => Ok(()),
        _ => bad("stored bytes lie outside the data section"),
    }
}
