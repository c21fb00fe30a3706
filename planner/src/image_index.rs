//! The image side of the mapping: path → file → chunk slots → stored bytes.

use std::collections::HashMap;
use std::path::Path;

use incfs_fs::format::{Digest, Image, InodeKind, RangeRead};

use crate::error::PlannerError;

/// One regular file of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedFile {
    /// Path in the image (`/`-separated, no leading `/`), the first name of the inode.
    pub path: String,
    /// Length in bytes.
    pub size: u64,
    /// First chunk slot.
    pub first_slot: u64,
    /// Number of chunks.
    pub chunks: u64,
}

/// What the planner needs to know about an image.
#[derive(Debug, Clone)]
pub struct ImageIndex {
    /// Root digest.
    pub digest: Digest,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Regular files, each inode once.
    pub files: Vec<IndexedFile>,
    /// Every path naming a regular file (hard links included) → index into `files`.
    by_path: HashMap<String, u32>,
    /// Per chunk slot: (stored offset, stored length).
    slots: Vec<(u64, u32)>,
    /// Stored bytes of the whole image, each stored chunk once.
    pub stored_bytes: u64,
    /// Uncompressed bytes of all files.
    pub raw_bytes: u64,
}

impl ImageIndex {
    /// Opens an image file and indexes it, checking its root digest when `expected` is given.
    pub fn open(path: &Path, expected: Option<&Digest>) -> Result<Self, PlannerError> {
        let image = Image::open_path(path, expected).map_err(|error| PlannerError::Image {
            path: path.to_path_buf(),
            error,
        })?;
        Ok(Self::new(&image))
    }

    /// Indexes an open image.
    pub fn new<R: RangeRead>(image: &Image<R>) -> Self {
        let files_ref = image.files();
        let mut inode_to_file = HashMap::new();
        let files: Vec<IndexedFile> = files_ref
            .iter()
            .enumerate()
            .map(|(i, f)| {
                inode_to_file.insert(f.inode, i as u32);
                IndexedFile {
                    path: f.display_path(),
                    size: f.size,
                    first_slot: f.first_chunk,
                    chunks: f.chunks,
                }
            })
            .collect();
        let mut by_path = HashMap::new();
        for (path, inode) in image.walk() {
            if let Some(&i) = inode_to_file.get(&inode)
                && matches!(
                    image.inode(inode).map(|n| &n.kind),
                    Some(InodeKind::File { .. })
                )
            {
                by_path.insert(String::from_utf8_lossy(&path).into_owned(), i);
            }
        }
        let slots: Vec<(u64, u32)> = image
            .table()
            .entries()
            .iter()
            .map(|e| (e.stored_offset, e.stored_len))
            .collect();
        let mut seen = std::collections::HashSet::new();
        let stored_bytes = slots
            .iter()
            .filter(|(off, _)| seen.insert(*off))
            .map(|(_, len)| u64::from(*len))
            .sum();
        ImageIndex {
            digest: image.root_digest(),
            chunk_size: image.manifest().chunk_size,
            raw_bytes: files.iter().map(|f| f.size).sum(),
            files,
            by_path,
            slots,
            stored_bytes,
        }
    }

    /// The file at an image path (leading `/` ignored).
    pub fn lookup(&self, path: &str) -> Option<u32> {
        self.by_path.get(path.trim_start_matches('/')).copied()
    }

    /// Stored location (offset, length) of chunk `chunk` of file `file`.
    pub fn stored(&self, file: u32, chunk: u64) -> Option<(u64, u32)> {
        let f = self.files.get(file as usize)?;
        if chunk >= f.chunks {
            return None;
        }
        self.slots
            .get(usize::try_from(f.first_slot + chunk).ok()?)
            .copied()
    }
}
