//! The persistent record of verified chunks: a small header and a bitmap, one bit per chunk
//! slot of the image.
//!
//! ```text
//! 0   magic "INCFSREC"
//! 8   version u32 LE (1)
//! 12  clean u32 LE: 1 = written by a clean shutdown, 0 = in use or stopped uncleanly
//! 16  chunk_count u64 LE
//! 24  root digest [32]
//! 56  header checksum: first 8 bytes of BLAKE3 over bytes 0..56
//! 64  bitmap: ceil(chunk_count / 64) u64 LE words; bit s % 64 of word s / 64 is slot s
//! ```
//!
//! A bit is only ever set after the chunk's bytes are durable in its backing file (see
//! [`super::ChunkCache`]), so the record never claims more than the disk holds. The header
//! (64 bytes, one sector) is rewritten in place; a header that does not check out makes the
//! whole record count as empty.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::format::Digest;

use super::CacheError;

/// Magic at the start of every record file.
pub const RECORD_MAGIC: [u8; 8] = *b"INCFSREC";
/// Record format version.
pub const RECORD_VERSION: u32 = 1;
/// Bytes before the bitmap.
pub const RECORD_HEADER_LEN: u64 = 64;

/// The decoded header of a record file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// True when the last writer shut down cleanly.
    pub clean: bool,
    /// Chunk slots of the image.
    pub chunk_count: u64,
    /// The image's root digest.
    pub root: Digest,
}

impl RecordHeader {
    fn encode(&self) -> [u8; RECORD_HEADER_LEN as usize] {
        let mut b = [0u8; RECORD_HEADER_LEN as usize];
        b[0..8].copy_from_slice(&RECORD_MAGIC);
        b[8..12].copy_from_slice(&RECORD_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&u32::from(self.clean).to_le_bytes());
        b[16..24].copy_from_slice(&self.chunk_count.to_le_bytes());
        b[24..56].copy_from_slice(&self.root.0);
        let sum = blake3::hash(&b[0..56]);
        b[56..64].copy_from_slice(&sum.as_bytes()[0..8]);
        b
    }

    /// Decodes a header; `None` when the bytes are not a valid version-1 header.
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < RECORD_HEADER_LEN as usize || b[0..8] != RECORD_MAGIC {
            return None;
        }
        let sum = blake3::hash(&b[0..56]);
        if b[56..64] != sum.as_bytes()[0..8] {
            return None;
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        if u32_at(8) != RECORD_VERSION {
            return None;
        }
        let mut cc = [0u8; 8];
        cc.copy_from_slice(&b[16..24]);
        let mut root = [0u8; 32];
        root.copy_from_slice(&b[24..56]);
        Some(RecordHeader {
            clean: u32_at(12) == 1,
            chunk_count: u64::from_le_bytes(cc),
            root: Digest(root),
        })
    }
}

/// An open record file.
#[derive(Debug)]
pub struct Record {
    path: PathBuf,
    file: File,
    header: RecordHeader,
}

/// Number of bitmap words for `chunks` slots.
pub fn words_for(chunks: u64) -> usize {
    chunks.div_ceil(64) as usize
}

impl Record {
    /// Opens the record at `path` for an image with `chunk_count` slots and root digest
    /// `root`. Returns the record and its bitmap; a missing, foreign or damaged record is
    /// replaced by an empty one (written to a temporary file, then renamed).
    pub fn open(
        path: &Path,
        chunk_count: u64,
        root: Digest,
    ) -> Result<(Self, Vec<u64>), CacheError> {
        let io_err = |what: &'static str| {
            let p = path.to_path_buf();
            move |error: io::Error| CacheError::Io {
                path: p.clone(),
                what,
                error,
            }
        };
        let want_len = RECORD_HEADER_LEN + words_for(chunk_count) as u64 * 8;
        if let Ok(bytes) = std::fs::read(path) {
            let header = RecordHeader::decode(&bytes);
            match header {
                Some(h)
                    if h.chunk_count == chunk_count
                        && h.root == root
                        && bytes.len() as u64 == want_len =>
                {
                    let bitmap = bytes[RECORD_HEADER_LEN as usize..]
                        .chunks_exact(8)
                        .map(|w| {
                            let mut a = [0u8; 8];
                            a.copy_from_slice(w);
                            u64::from_le_bytes(a)
                        })
                        .collect();
                    let file = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(path)
                        .map_err(io_err("opening the chunk record"))?;
                    return Ok((
                        Record {
                            path: path.to_path_buf(),
                            file,
                            header: h,
                        },
                        bitmap,
                    ));
                }
                _ => {
                    tracing::warn!(path = %path.display(), "chunk record is damaged or foreign; starting empty")
                }
            }
        }
        let header = RecordHeader {
            clean: false,
            chunk_count,
            root,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut tmp =
            tempfile::NamedTempFile::new_in(dir).map_err(io_err("creating the chunk record"))?;
        {
            let f = tmp.as_file_mut();
            f.write_all_at(&header.encode(), 0)
                .map_err(io_err("writing the chunk record"))?;
            f.set_len(want_len)
                .map_err(io_err("writing the chunk record"))?;
            f.sync_all().map_err(io_err("syncing the chunk record"))?;
        }
        let file = tmp.persist(path).map_err(|e| CacheError::Io {
            path: path.to_path_buf(),
            what: "renaming the chunk record into place",
            error: e.error,
        })?;
        sync_dir(dir)?;
        Ok((
            Record {
                path: path.to_path_buf(),
                file,
                header,
            },
            vec![0; words_for(chunk_count)],
        ))
    }

    /// The header as read or last written.
    pub fn header(&self) -> RecordHeader {
        self.header
    }

    /// Rewrites the header with `clean` and makes it durable.
    pub fn set_clean(&mut self, clean: bool) -> Result<(), CacheError> {
        self.header.clean = clean;
        self.file
            .write_all_at(&self.header.encode(), 0)
            .and_then(|()| self.file.sync_data())
            .map_err(|error| CacheError::Io {
                path: self.path.clone(),
                what: "writing the chunk record header",
                error,
            })
    }

    /// Writes bitmap word `index` (not synced; see [`Record::sync`]).
    pub fn write_word(&self, index: usize, word: u64) -> Result<(), CacheError> {
        self.file
            .write_all_at(&word.to_le_bytes(), RECORD_HEADER_LEN + index as u64 * 8)
            .map_err(|error| CacheError::Io {
                path: self.path.clone(),
                what: "writing the chunk record",
                error,
            })
    }

    /// Merges `words` with the bitmap on disk, under an exclusive lock of the record file
    /// (mounts sharing the cache merge one at a time): the disk gets the bits of `words` it
    /// lacks, durably, and `words` gets the bits other mounts recorded. A bit is only ever
    /// added, never cleared, so no mount loses another's.
    pub fn merge(&self, words: &mut [u64]) -> Result<(), CacheError> {
        let err = |what: &'static str| {
            let path = self.path.clone();
            move |error| CacheError::Io { path, what, error }
        };
        super::lock::flock(&self.file, super::lock::Mode::Exclusive)
            .map_err(err("locking the chunk record"))?;
        let merged = self.merge_locked(words);
        let unlocked = super::lock::unlock(&self.file).map_err(err("unlocking the chunk record"));
        merged.and(unlocked)
    }

    fn merge_locked(&self, words: &mut [u64]) -> Result<(), CacheError> {
        let mut disk = vec![0u8; words.len() * 8];
        self.file
            .read_exact_at(&mut disk, RECORD_HEADER_LEN)
            .map_err(|error| CacheError::Io {
                path: self.path.clone(),
                what: "reading the chunk record",
                error,
            })?;
        let mut wrote = false;
        for (i, (w, d)) in words.iter_mut().zip(disk.chunks_exact(8)).enumerate() {
            let mut a = [0u8; 8];
            a.copy_from_slice(d);
            let on_disk = u64::from_le_bytes(a);
            if *w & !on_disk != 0 {
                self.write_word(i, *w | on_disk)?;
                wrote = true;
            }
            *w |= on_disk;
        }
        if wrote {
            self.sync()?;
        }
        Ok(())
    }

    /// Makes written words durable.
    pub fn sync(&self) -> Result<(), CacheError> {
        self.file.sync_data().map_err(|error| CacheError::Io {
            path: self.path.clone(),
            what: "syncing the chunk record",
            error,
        })
    }
}

/// Magic at the start of a checkpoint file.
pub const CHECKPOINT_MAGIC: [u8; 8] = *b"INCFSCHK";

/// Reads the checkpoint at `path`: the bitmap of chunks known good at the last clean
/// shutdown or recovery, for the image with `chunk_count` slots and root `root`. A missing,
/// foreign or damaged checkpoint is an empty one (everything recorded gets re-checked).
///
/// Layout: magic, version u32, pad u32, chunk_count u64, root `[32]`, the bitmap words, and
/// BLAKE3 (32 bytes) of everything before it.
pub fn read_checkpoint(path: &Path, chunk_count: u64, root: &Digest) -> Vec<u64> {
    let words = words_for(chunk_count);
    let empty = vec![0; words];
    let Ok(b) = std::fs::read(path) else {
        return empty;
    };
    let body_len = 56 + words * 8;
    if b.len() != body_len + 32
        || b[0..8] != CHECKPOINT_MAGIC
        || b[8..12] != RECORD_VERSION.to_le_bytes()
        || b[16..24] != chunk_count.to_le_bytes()
        || b[24..56] != root.0
        || blake3::hash(&b[..body_len]).as_bytes()[..] != b[body_len..]
    {
        return empty;
    }
    b[56..body_len]
        .chunks_exact(8)
        .map(|w| {
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            u64::from_le_bytes(a)
        })
        .collect()
}

/// Writes the checkpoint (temporary file, fsync, rename, fsync of the directory).
pub fn write_checkpoint(
    path: &Path,
    chunk_count: u64,
    root: &Digest,
    words: &[u64],
) -> Result<(), CacheError> {
    let mut b = Vec::with_capacity(88 + words.len() * 8);
    b.extend_from_slice(&CHECKPOINT_MAGIC);
    b.extend_from_slice(&RECORD_VERSION.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&chunk_count.to_le_bytes());
    b.extend_from_slice(&root.0);
    for w in words {
        b.extend_from_slice(&w.to_le_bytes());
    }
    let sum = blake3::hash(&b);
    b.extend_from_slice(sum.as_bytes());
    let dir = path.parent().unwrap_or(Path::new("."));
    let err = |what: &'static str| {
        let p = path.to_path_buf();
        move |error: io::Error| CacheError::Io {
            path: p.clone(),
            what,
            error,
        }
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(err("creating the checkpoint"))?;
    io::Write::write_all(tmp.as_file_mut(), &b).map_err(err("writing the checkpoint"))?;
    tmp.as_file()
        .sync_all()
        .map_err(err("syncing the checkpoint"))?;
    tmp.persist(path).map_err(|e| CacheError::Io {
        path: path.to_path_buf(),
        what: "renaming the checkpoint into place",
        error: e.error,
    })?;
    sync_dir(dir)
}

/// fsyncs a directory so that the names created in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), CacheError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|error| CacheError::Io {
            path: dir.to_path_buf(),
            what: "syncing the directory",
            error,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_damage() {
        let h = RecordHeader {
            clean: true,
            chunk_count: 77,
            root: Digest([7; 32]),
        };
        let b = h.encode();
        assert_eq!(RecordHeader::decode(&b), Some(h));
        for i in 0..b.len() {
            let mut d = b;
            d[i] ^= 1;
            assert_eq!(RecordHeader::decode(&d), None, "flip at {i}");
        }
    }
}
