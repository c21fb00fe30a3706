//! The fixed 128-byte header at offset 0.

use super::{Digest, FormatError, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

/// The first eight bytes of every image.
pub const MAGIC: [u8; 8] = *b"INCFSIMG";
/// The format version this build writes. Version 3 added zstd dictionaries (a manifest
/// lists them after its other fields, an entry names one in its frame length's high byte);
/// a version-2 image is a version-3 image without any, so this build reads both.
pub const VERSION: u32 = 3;
/// The oldest format version this build reads.
const OLDEST_VERSION: u32 = 2;
/// Header length in bytes; the manifest starts right after it.
pub const HEADER_LEN: usize = 128;
/// Bytes of the header covered by its checksum (all but the checksum itself).
const CHECKED_LEN: usize = 120;

/// The decoded header: where each section lies, and the root digest.
///
/// Layout (little-endian): magic `[8]` @0, version u32 @8, flags u32 @12, header length u32
/// @16, chunk size u32 @20, manifest offset u64 @24, manifest length u64 @32, chunk-table
/// offset u64 @40, chunk-table length u64 @48, data offset u64 @56, data length u64 @64, root
/// digest `[32]` @72, reserved zeros `[16]` @104, checksum (first 8 bytes of BLAKE3 over bytes
/// 0..120) @120.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Logical chunk size in bytes.
    pub chunk_size: u32,
    /// Offset of the stored (zstd) manifest.
    pub manifest_offset: u64,
    /// Length of the stored manifest.
    pub manifest_len: u64,
    /// Offset of the chunk table.
    pub chunk_table_offset: u64,
    /// Length of the chunk table.
    pub chunk_table_len: u64,
    /// Offset of the data section.
    pub data_offset: u64,
    /// Length of the data section.
    pub data_len: u64,
    /// BLAKE3 of the stored manifest bytes: the image's root digest.
    pub root_digest: Digest,
}

impl Header {
    /// Total image length the header describes.
    pub fn image_len(&self) -> u64 {
        self.data_offset.saturating_add(self.data_len)
    }

    /// Encodes the header into its 128 bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&0u32.to_le_bytes());
        b[16..20].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[20..24].copy_from_slice(&self.chunk_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.manifest_offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.manifest_len.to_le_bytes());
        b[40..48].copy_from_slice(&self.chunk_table_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.chunk_table_len.to_le_bytes());
        b[56..64].copy_from_slice(&self.data_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.data_len.to_le_bytes());
        b[72..104].copy_from_slice(&self.root_digest.0);
        let sum = blake3::hash(&b[..CHECKED_LEN]);
        b[CHECKED_LEN..].copy_from_slice(&sum.as_bytes()[..8]);
        b
    }

    /// Decodes and checks a header from the first bytes of an image.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        if bytes.len() < HEADER_LEN {
            if bytes.len() >= 8 && bytes[..8] != MAGIC {
                return Err(FormatError::BadMagic(arr8(&bytes[..8])));
            }
            return Err(FormatError::Truncated {
                what: "header",
                needed: HEADER_LEN as u64,
                have: bytes.len() as u64,
            });
        }
        let b = &bytes[..HEADER_LEN];
        if b[..8] != MAGIC {
            return Err(FormatError::BadMagic(arr8(&b[..8])));
        }
        let version = u32le(b, 8);
        if !(OLDEST_VERSION..=VERSION).contains(&version) {
            return Err(FormatError::UnsupportedVersion { found: version });
        }
        let sum = blake3::hash(&b[..CHECKED_LEN]);
        if b[CHECKED_LEN..] != sum.as_bytes()[..8] {
            return Err(FormatError::HeaderChecksum);
        }
        let flags = u32le(b, 12);
        if flags != 0 {
            return Err(FormatError::HeaderInvalid(format!(
                "unknown flags {flags:#x}"
            )));
        }
        if u32le(b, 16) as usize != HEADER_LEN {
            return Err(FormatError::HeaderInvalid(
                "header length is not 128".into(),
            ));
        }
        let mut root = [0u8; 32];
        root.copy_from_slice(&b[72..104]);
        let h = Header {
            chunk_size: u32le(b, 20),
            manifest_offset: u64le(b, 24),
            manifest_len: u64le(b, 32),
            chunk_table_offset: u64le(b, 40),
            chunk_table_len: u64le(b, 48),
            data_offset: u64le(b, 56),
            data_len: u64le(b, 64),
            root_digest: Digest(root),
        };
        h.check()?;
        Ok(h)
    }

    fn check(&self) -> Result<(), FormatError> {
        let bad = |m: &str| Err(FormatError::HeaderInvalid(m.to_string()));
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size)
            || !self.chunk_size.is_power_of_two()
        {
            return bad("chunk size is not a power of two between 4 KiB and 1 MiB");
        }
        if self.manifest_offset != HEADER_LEN as u64 {
            return bad("manifest does not follow the header");
        }
        // The lengths come from bytes no digest has checked yet: cap them before anything
        // is allocated for them.
        if self.manifest_len > MAX_MANIFEST_LEN {
            return bad(&format!(
                "manifest of {} bytes is larger than the {} MiB allowed",
                self.manifest_len,
                MAX_MANIFEST_LEN >> 20
            ));
        }
        if self.chunk_table_len > MAX_CHUNK_TABLE_LEN {
            return bad(&format!(
                "chunk table of {} bytes is larger than the {} GiB allowed",
                self.chunk_table_len,
                MAX_CHUNK_TABLE_LEN >> 30
            ));
        }
        let end = |o: u64, l: u64| o.checked_add(l);
        match end(self.manifest_offset, self.manifest_len) {
            Some(e) if e == self.chunk_table_offset => {}
            _ => return bad("chunk table does not follow the manifest"),
        }
        match end(self.chunk_table_offset, self.chunk_table_len) {
            Some(e) if e == self.data_offset => {}
            _ => return bad("data does not follow the chunk table"),
        }
        if end(self.data_offset, self.data_len).is_none() {
            return bad("data section overflows");
        }
        Ok(())
    }
}

/// Largest manifest an image may declare: 512 MiB. A manifest holds ~100 bytes per inode
/// plus names and one 32-byte digest per 56 KiB table segment: millions of files fit.
pub const MAX_MANIFEST_LEN: u64 = 512 << 20;
/// Largest chunk table an image may declare: 16 GiB, 2^28 chunks of 56 bytes (1 TiB of files
/// at 4 KiB chunks). A mount reads it a segment at a time; `verify` and `inspect` whole.
pub const MAX_CHUNK_TABLE_LEN: u64 = 16 << 30;

fn arr8(b: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    a
}

fn u32le(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64le(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            chunk_size: 65536,
            manifest_offset: 128,
            manifest_len: 100,
            chunk_table_offset: 228,
            chunk_table_len: 48,
            data_offset: 276,
            data_len: 1000,
            root_digest: Digest([7; 32]),
        }
    }

    #[test]
    fn lengths_past_the_caps_are_refused_before_anything_is_allocated() {
        let mut h = sample();
        h.manifest_len = MAX_MANIFEST_LEN + 1;
        h.chunk_table_offset = h.manifest_offset + h.manifest_len;
        h.data_offset = h.chunk_table_offset + h.chunk_table_len;
        let err = Header::decode(&h.encode()).unwrap_err().to_string();
        assert!(err.contains("larger than the 512 MiB allowed"), "{err}");
        let mut h = sample();
        h.chunk_table_len = MAX_CHUNK_TABLE_LEN + 56;
        h.data_offset = h.chunk_table_offset + h.chunk_table_len;
        let err = Header::decode(&h.encode()).unwrap_err().to_string();
        assert!(err.contains("larger than the 16 GiB allowed"), "{err}");
    }

    #[test]
    fn round_trip() {
        let h = sample();
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn every_bit_flip_is_caught() {
        let bytes = sample().encode();
        for i in 0..HEADER_LEN * 8 {
            let mut b = bytes;
            b[i / 8] ^= 1 << (i % 8);
            assert!(
                Header::decode(&b).is_err(),
                "flip of bit {i} went unnoticed"
            );
        }
    }

    #[test]
    fn wrong_magic_and_version_are_named() {
        let mut b = sample().encode();
        b[0] = b'X';
        assert!(matches!(Header::decode(&b), Err(FormatError::BadMagic(_))));
        let mut b = sample().encode();
        b[8] = 9;
        assert!(matches!(
            Header::decode(&b),
            Err(FormatError::UnsupportedVersion { found: 9 })
        ));
        assert!(matches!(
            Header::decode(&b"INCFSIMG"[..]),
            Err(FormatError::Truncated { .. })
        ));
    }
}
