//! What a new image shares with an old one: chunks (by digest) and bytes, for the whole
//! image and per file.
//!
//! A chunk of the new image is **shared** when the old image holds a chunk with the same
//! digest anywhere (in any file, at any offset): a cache holding the old image has its bytes
//! and never needs to fetch it (`docs/format.md`, "Updates"). Everything is counted over
//! the new image's *distinct* chunks (identical chunks are stored once), so the new bytes are
//! what an update moves when the old image is wholly cached.

use std::collections::HashSet;

use serde::Serialize;

use super::{ChunkEntry, Digest, FileRef, Image, RangeRead};

/// Chunk and byte counts, for an image or one file of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DiffCounts {
    /// Distinct chunks.
    pub chunks: u64,
    /// Of them, chunks whose digest the old image holds.
    pub shared_chunks: u64,
    /// Uncompressed bytes of the distinct chunks.
    pub raw_bytes: u64,
    /// Of them, the bytes of shared chunks.
    pub shared_raw_bytes: u64,
    /// Stored (compressed) bytes of the distinct chunks: each chunk's share of its frame.
    pub stored_bytes: u64,
    /// Of them, the stored bytes of shared chunks.
    pub shared_stored_bytes: u64,
}

impl DiffCounts {
    /// Chunks the old image lacks.
    pub fn new_chunks(&self) -> u64 {
        self.chunks - self.shared_chunks
    }

    /// Uncompressed bytes of the chunks the old image lacks.
    pub fn new_raw_bytes(&self) -> u64 {
        self.raw_bytes - self.shared_raw_bytes
    }

    /// Stored bytes of the chunks the old image lacks: what an update fetches when the old
    /// image is cached whole.
    pub fn new_stored_bytes(&self) -> u64 {
        self.stored_bytes - self.shared_stored_bytes
    }

    /// Share of the raw bytes that are shared, 0..=1 (1 for an empty image).
    pub fn shared_raw_ratio(&self) -> f64 {
        if self.raw_bytes == 0 {
            1.0
        } else {
            self.shared_raw_bytes as f64 / self.raw_bytes as f64
        }
    }

    fn add(&mut self, e: &ChunkEntry, shared: bool) {
        let raw = u64::from(e.raw_len);
        let stored = e.stored_share();
        self.chunks += 1;
        self.raw_bytes += raw;
        self.stored_bytes += stored;
        if shared {
            self.shared_chunks += 1;
            self.shared_raw_bytes += raw;
            self.shared_stored_bytes += stored;
        }
    }
}

/// How one file of the new image compares with the old image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileDiff {
    /// Path in the new image (lossy UTF-8).
    pub path: String,
    /// How the file relates to the old image's file of the same path.
    pub status: FileStatus,
    /// Its distinct chunks (those an earlier file of the walk did not already count).
    pub counts: DiffCounts,
}

/// A new file against the old image's file of the same path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileStatus {
    /// Same size and the same chunk digests in the same order.
    Same,
    /// The old image has a file of this path with other contents.
    Changed,
    /// The old image has no file of this path.
    Added,
}

/// What [`diff`] found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageDiff {
    /// Root digest of the old image.
    pub old_digest: String,
    /// Root digest of the new image.
    pub new_digest: String,
    /// Chunk size of the old image.
    pub old_chunk_size: u32,
    /// Chunk size of the new image.
    pub new_chunk_size: u32,
    /// The new image's distinct chunks.
    pub total: DiffCounts,
    /// Files of the new image with the same contents at the same path in the old one.
    pub files_same: u64,
    /// Files whose path the old image has with other contents.
    pub files_changed: u64,
    /// Files whose path the old image lacks.
    pub files_added: u64,
    /// Files of the old image whose path the new one lacks.
    pub files_removed: u64,
    /// Every regular file of the new image, in walk order.
    pub files: Vec<FileDiff>,
}

/// The digests of a file's chunks, in order.
fn file_digests<R: RangeRead>(img: &Image<R>, f: &FileRef) -> Vec<Digest> {
    (f.first_chunk..f.first_chunk + f.chunks)
        .filter_map(|s| img.table().get(s).map(|e| e.digest))
        .collect()
}

/// Compares the new image with the old one (both opened and verified).
pub fn diff<A: RangeRead, B: RangeRead>(old: &Image<A>, new: &Image<B>) -> ImageDiff {
    let old_digests: HashSet<Digest> = old.table().entries().iter().map(|e| e.digest).collect();
    let old_files: std::collections::HashMap<Vec<u8>, FileRef> = old
        .files()
        .into_iter()
        .map(|f| (f.path.clone(), f))
        .collect();
    let mut counted: HashSet<Digest> = HashSet::new();
    let mut out = ImageDiff {
        old_digest: old.root_digest().to_hex(),
        new_digest: new.root_digest().to_hex(),
        old_chunk_size: old.manifest().chunk_size,
        new_chunk_size: new.manifest().chunk_size,
        total: DiffCounts::default(),
        files_same: 0,
        files_changed: 0,
        files_added: 0,
        files_removed: 0,
        files: Vec::new(),
    };
    let new_files = new.files();
    let new_paths: HashSet<&[u8]> = new_files.iter().map(|f| f.path.as_slice()).collect();
    out.files_removed = old_files
        .keys()
        .filter(|p| !new_paths.contains(p.as_slice()))
        .count() as u64;
    for f in &new_files {
        let mut counts = DiffCounts::default();
        for slot in f.first_chunk..f.first_chunk + f.chunks {
            let Some(e) = new.table().get(slot) else {
                continue;
            };
            if counted.insert(e.digest) {
                let shared = old_digests.contains(&e.digest);
                counts.add(e, shared);
                out.total.add(e, shared);
            }
        }
        let status = match old_files.get(&f.path) {
            None => FileStatus::Added,
            Some(o) if o.size == f.size && file_digests(old, o) == file_digests(new, f) => {
                FileStatus::Same
            }
            Some(_) => FileStatus::Changed,
        };
        match status {
            FileStatus::Same => out.files_same += 1,
            FileStatus::Changed => out.files_changed += 1,
            FileStatus::Added => out.files_added += 1,
        }
        out.files.push(FileDiff {
            path: f.display_path(),
            status,
            counts,
        });
    }
    out
}
