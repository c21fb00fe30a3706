//! Encoding and decoding of one chunk.

use std::cell::RefCell;

use super::dictionary::{Encoder, Prepared, compress_with, decompress_with};
use super::{ChunkEntry, Digest, FormatError};

thread_local! {
    /// One zstd compression context per thread and level: creating one per chunk costs more
    /// than compressing a 4 KiB chunk.
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    /// One zstd decompression context per thread, for the same reason.
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

fn compress(raw: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        match c.as_mut() {
            Some((_, comp)) => comp.compress(raw),
            None => zstd::bulk::compress(raw, level),
        }
    })
}

fn decompress(stored: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        match d.as_mut() {
            Some(dec) => dec.decompress(stored, capacity),
            None => zstd::bulk::decompress(stored, capacity),
        }
    })
}

/// Compresses `raw` at `level`; returns the bytes to store (zstd when strictly smaller, else
/// `raw` itself) and the digest of `raw`.
pub fn encode_chunk(raw: &[u8], level: i32) -> Result<(Vec<u8>, Digest), FormatError> {
    Ok((encode_frame(raw, level)?, Digest::of(raw)))
}

/// Compresses a frame's raw bytes (one chunk, or several laid end to end) at `level`:
/// zstd when strictly smaller, else the raw bytes themselves.
pub fn encode_frame(raw: &[u8], level: i32) -> Result<Vec<u8>, FormatError> {
    encode_frame_with(raw, level, None)
}

/// [`encode_frame`] with a dictionary (which fixes the level). The frame's entries must name
/// the dictionary only when the result is smaller than `raw` (compressed).
pub fn encode_frame_with(
    raw: &[u8],
    level: i32,
    dict: Option<&Encoder>,
) -> Result<Vec<u8>, FormatError> {
    let packed = match dict {
        Some(d) => compress_with(raw, d)?,
        None => compress(raw, level)?,
    };
    Ok(if packed.len() < raw.len() {
        packed
    } else {
        raw.to_vec()
    })
}

/// Decodes the stored bytes of the frame that holds `slot` (as its entry describes it) into
/// the frame's raw bytes, checking only their length: take chunks out of it with
/// [`chunk_of_frame`], which checks each against its digest. `dict` is the dictionary the
/// entry names (`None` when it names none).
pub fn decode_frame(
    slot: u64,
    entry: &ChunkEntry,
    stored: &[u8],
    dict: Option<&Prepared>,
) -> Result<Vec<u8>, FormatError> {
    let corrupt = |reason: String| FormatError::ChunkCorrupt { slot, reason };
    if stored.len() != entry.stored_len as usize {
        return Err(corrupt(format!(
            "got {} stored bytes, expected {}",
            stored.len(),
            entry.stored_len
        )));
    }
    let raw = if entry.is_compressed() {
        let capacity = entry.frame_len as usize;
        match (entry.dictionary, dict) {
            (0, _) => decompress(stored, capacity),
            (_, Some(d)) => decompress_with(stored, capacity, d),
            (k, None) => return Err(corrupt(format!("dictionary {k} is not available"))),
        }
        .map_err(|e| corrupt(format!("zstd: {e}")))?
    } else {
        stored.to_vec()
    };
    if raw.len() != entry.frame_len as usize {
        return Err(corrupt(format!(
            "decoded {} bytes, expected {}",
            raw.len(),
            entry.frame_len
        )));
    }
    Ok(raw)
}

/// The bytes of `slot` in its decoded frame, checked against the entry's digest. Never
/// returns bytes that do not match.
pub fn chunk_of_frame(slot: u64, entry: &ChunkEntry, frame: &[u8]) -> Result<Vec<u8>, FormatError> {
    let start = entry.frame_offset as usize;
    let raw = start
        .checked_add(entry.raw_len as usize)
        .and_then(|end| frame.get(start..end))
        .ok_or_else(|| FormatError::ChunkCorrupt {
            slot,
            reason: format!("frame of {} bytes does not hold the chunk", frame.len()),
        })?;
    if Digest::of(raw) != entry.digest {
        return Err(FormatError::ChunkCorrupt {
            slot,
            reason: "digest mismatch".into(),
        });
    }
    Ok(raw.to_vec())
}

/// Decodes the stored bytes of `slot`'s frame and checks the chunk against the entry's
/// digest. Never returns bytes that do not match.
pub fn decode_chunk(
    slot: u64,
    entry: &ChunkEntry,
    stored: &[u8],
    dict: Option<&Prepared>,
) -> Result<Vec<u8>, FormatError> {
    chunk_of_frame(slot, entry, &decode_frame(slot, entry, stored, dict)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(stored: &[u8], raw: &[u8], digest: Digest) -> ChunkEntry {
        ChunkEntry {
            stored_offset: 0,
            stored_len: stored.len() as u32,
            raw_len: raw.len() as u32,
            frame_offset: 0,
            frame_len: raw.len() as u32,
            dictionary: 0,
            digest,
        }
    }

    #[test]
    fn compressible_and_random_round_trip() {
        let text = b"hello hello hello hello hello hello hello".repeat(100);
        let (stored, d) = encode_chunk(&text, 3).unwrap();
        assert!(stored.len() < text.len());
        assert_eq!(
            decode_chunk(0, &entry(&stored, &text, d), &stored, None).unwrap(),
            text
        );

        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let (stored, d) = encode_chunk(&noise, 3).unwrap();
        assert!(stored.len() <= noise.len());
        assert_eq!(
            decode_chunk(0, &entry(&stored, &noise, d), &stored, None).unwrap(),
            noise
        );
    }

    #[test]
    fn a_flipped_bit_never_yields_other_bytes() {
        let text = b"abcdefgh".repeat(512);
        let (stored, d) = encode_chunk(&text, 3).unwrap();
        let e = entry(&stored, &text, d);
        let mut errors = 0;
        for i in 0..stored.len() * 8 {
            let mut s = stored.clone();
            s[i / 8] ^= 1 << (i % 8);
            // Some bits of a zstd frame header do not change what it decodes to; every
            // other flip must be an error.
            match decode_chunk(3, &e, &s, None) {
                Ok(raw) => assert_eq!(raw, text, "flip of bit {i} gave other bytes"),
                Err(_) => errors += 1,
            }
        }
        assert!(
            errors > stored.len() * 8 / 2,
            "only {errors} flips were caught"
        );
    }
}
