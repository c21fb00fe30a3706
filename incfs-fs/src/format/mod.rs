//! The incfs image format, version 2 (see `docs/format.md`).
//!
//! An image is four sections, laid out so that a remote reader needs few round trips:
//!
//! ```text
//! offset 0                header (128 bytes, fixed)      magic, version, section offsets,
//!                                                        root digest, header checksum
//! manifest_offset         manifest (postcard, zstd)      inodes, dirs, files, symlinks,
//!                                                        xattrs, chunk-table segment digests
//! chunk_table_offset      chunk table (56-byte entries)  per chunk slot: its frame's offset
//!                                                        and lengths, its place in the
//!                                                        frame, its length and digest
//! data_offset             data                           frames of one or more chunks,
//!                                                        each zstd or raw
//! ```
//!
//! The **root digest** is the BLAKE3 digest of the manifest's stored bytes. The manifest holds
//! the digest of every chunk-table segment, and every chunk-table entry holds the digest of its
//! chunk's uncompressed bytes, so a reader that trusts the root digest can verify any byte it
//! reads, from any section, without reading the rest.

pub mod bulk;
mod chunk;
mod chunk_table;
pub mod delta;
mod dictionary;
mod diff;
mod grouping;
mod header;
mod image;
mod layout;
mod manifest;
mod pack;
mod relayout;
mod table_order;

pub use chunk::{
    chunk_of_frame, decode_chunk, decode_frame, encode_chunk, encode_frame, encode_frame_with,
};
pub use chunk_table::{
    CHUNK_ENTRY_LEN, ChunkEntry, ChunkTable, MAX_FRAME_LEN, SEGMENT_BYTES, SEGMENT_ENTRIES,
    decode_segment,
};
pub use dictionary::{Dictionaries, Dictionary, MAX_DICTIONARIES, MAX_DICTIONARY_LEN, Prepared};
pub use diff::{DiffCounts, FileDiff, FileStatus, ImageDiff, diff};
pub use header::{HEADER_LEN, Header, MAGIC, VERSION};
pub use image::{
    FileRef, INITIAL_READ, Image, ImageHead, RangeRead, VerifyFailure, VerifyReport, read_head,
    read_head_or_known, read_meta,
};
pub use manifest::{DirEntry, Inode, InodeKind, Manifest, ROOT_INODE, Xattr};
pub use pack::{PackError, PackOptions, PackProgress, PackSummary, pack_dir};
pub use relayout::{
    RelayoutOptions, RelayoutSummary, relayout, relayout_for_update, relayout_on_base,
};
pub use table_order::{SlotRun, TableOrder};

use std::fmt;

/// Smallest chunk size `pack` accepts (one page).
pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;
/// Largest chunk size `pack` accepts.
pub const MAX_CHUNK_SIZE: u32 = 1024 * 1024;
/// Default chunk size: 4 KiB, one page, chosen by the start-time benchmark (BENCHMARKS.md,
/// "Chunk size and layout"): with a plan and a hot-first image, clang-22 started fastest and
/// moved the fewest bytes at 4 KiB, at both links measured. The costs of fine chunks are
/// paid where they do not delay a start: a larger image (+16 % over 64 KiB for clang) and
/// chunk table (56 bytes a chunk), which a mount loads a segment at a time and a hot-first
/// image orders so that a start's entries come first.
pub const DEFAULT_CHUNK_SIZE: u32 = 4 * 1024;

/// A BLAKE3 digest: of a chunk's uncompressed bytes, of a chunk-table segment, or of the
/// manifest (the image's root digest).
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Digest(*blake3::hash(data).as_bytes())
    }

    /// Lowercase hex, as printed by `pack` and accepted by `--expect-digest`.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, FormatError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out)
            .map_err(|_| FormatError::BadDigestText(s.to_string()))?;
        Ok(Digest(out))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// What can be wrong with an image's bytes.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The first bytes are not an incfs image.
    #[error("not an incfs image (bad magic {0:02x?})")]
    BadMagic([u8; 8]),
    /// A version this build cannot read.
    #[error("unsupported image format version {found} (this incfs reads versions 2 and {VERSION})")]
    UnsupportedVersion {
        /// The version in the header.
        found: u32,
    },
    /// The header's checksum does not match its bytes.
    #[error("image header is corrupt (checksum mismatch)")]
    HeaderChecksum,
    /// A header field is out of range.
    #[error("image header is invalid: {0}")]
    HeaderInvalid(String),
    /// A section ends past the end of the image.
    #[error("image is truncated: {what} needs bytes up to offset {needed}, image has {have}")]
    Truncated {
        /// Which section.
        what: &'static str,
        /// End offset the section needs.
        needed: u64,
        /// Bytes the image has.
        have: u64,
    },
    /// The manifest's digest is not the expected root digest.
    #[error("root digest mismatch: expected {expected}, image has {found}")]
    RootDigest {
        /// The digest asked for (header or `--expect-digest`).
        expected: Digest,
        /// The digest of the manifest bytes read.
        found: Digest,
    },
    /// The manifest could not be decompressed or decoded.
    #[error("manifest cannot be decoded: {0}")]
    ManifestDecode(String),
    /// The manifest decoded but breaks a rule of the format.
    #[error("manifest is invalid: {0}")]
    ManifestInvalid(String),
    /// A chunk-table segment does not match its digest in the manifest.
    #[error("chunk table segment {segment} does not match its digest")]
    SegmentDigest {
        /// Segment index.
        segment: u64,
    },
    /// A chunk-table entry is out of range.
    #[error("chunk table entry {slot} is invalid: {reason}")]
    EntryInvalid {
        /// Chunk slot.
        slot: u64,
        /// What is wrong.
        reason: String,
    },
    /// A chunk's bytes did not decode or did not match its digest.
    #[error("chunk {slot} is corrupt: {reason}")]
    ChunkCorrupt {
        /// Chunk slot.
        slot: u64,
        /// What is wrong.
        reason: String,
    },
    /// A zstd dictionary's bytes are not the ones the manifest names, or an entry names one
    /// the image lacks.
    #[error("dictionary {number} is corrupt: {reason}")]
    DictionaryCorrupt {
        /// The dictionary's number, as entries name it (1-based).
        number: u8,
        /// What is wrong.
        reason: String,
    },
    /// A digest given as text is not 64 hex digits.
    #[error("not a digest (want 64 hex digits): {0:?}")]
    BadDigestText(String),
    /// Reading the image failed.
    #[error("reading the image failed: {0}")]
    Io(#[from] std::io::Error),
    /// A delta sidecar ([`delta`]) is not usable.
    #[error("delta sidecar is invalid: {0}")]
    DeltaInvalid(String),
    /// A bulk sidecar ([`bulk`]) is not usable.
    #[error("bulk sidecar is invalid: {0}")]
    BulkInvalid(String),
    /// Writing a delta sidecar failed.
    #[error("{what}: {error}")]
    Write {
        /// What was being written.
        what: String,
        /// Why it failed.
        error: std::io::Error,
    },
}

impl FormatError {
    /// True when the error means the bytes read were wrong (as opposed to an I/O failure),
    /// so that a reader over an unreliable source may fetch them again.
    pub fn is_corruption(&self) -> bool {
        !matches!(self, FormatError::Io(_))
    }
}
