//! The manifest: every inode of the tree, and the digests that anchor the chunk table.
//!
//! Stored as postcard, compressed with zstd. Its BLAKE3 digest (of the stored bytes) is the
//! image's root digest.

use serde::{Deserialize, Serialize};

use super::{
    Dictionary, Digest, FormatError, MAX_CHUNK_SIZE, MAX_DICTIONARIES, MAX_DICTIONARY_LEN,
    MIN_CHUNK_SIZE, SEGMENT_ENTRIES, SlotRun, TableOrder,
};

/// Index of the root directory in [`Manifest::inodes`].
pub const ROOT_INODE: u32 = 0;

/// Largest decompressed manifest a reader accepts (guards against decompression bombs):
/// 1 GiB, far above the ~100 bytes per inode a real tree needs.
const MAX_MANIFEST_RAW: usize = 1 << 30;

/// The image's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Logical chunk size (repeats the header's, so the root digest covers it).
    pub chunk_size: u32,
    /// Number of chunk slots in the chunk table.
    pub chunk_count: u64,
    /// Stored length of the data section.
    pub data_len: u64,
    /// BLAKE3 of each chunk-table segment of [`SEGMENT_ENTRIES`] entries (the last may be short).
    pub segment_digests: Vec<Digest>,
    /// The order of the chunk table's entries ([`TableOrder`]); empty for slot order.
    pub table_order: Vec<SlotRun>,
    /// All inodes; index [`ROOT_INODE`] is the root directory.
    pub inodes: Vec<Inode>,
    /// The zstd dictionaries chunk entries name ([`super::dictionary`]); entry number `k`
    /// is `dictionaries[k - 1]`. Encoded after the fields above, and only when there are
    /// any, so a manifest without them is a format-2 manifest byte for byte.
    #[serde(skip)]
    pub dictionaries: Vec<Dictionary>,
}

/// One inode: a directory, a regular file or a symlink, with its attributes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    /// What the inode is.
    pub kind: InodeKind,
    /// Permission bits (`mode & 0o7777`).
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime_sec: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// Number of directory entries that name this inode.
    pub nlink: u32,
    /// Extended attributes.
    pub xattrs: Vec<Xattr>,
}

/// An extended attribute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    /// Name, e.g. `user.comment`.
    pub name: Vec<u8>,
    /// Value.
    pub value: Vec<u8>,
}

/// The type-specific part of an inode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InodeKind {
    /// A directory with its entries, sorted by name.
    Dir {
        /// The entries.
        entries: Vec<DirEntry>,
    },
    /// A regular file whose chunks are the slots `first_chunk..first_chunk + n`, with
    /// `n = ceil(size / chunk_size)`.
    File {
        /// Length in bytes.
        size: u64,
        /// First chunk slot.
        first_chunk: u64,
    },
    /// A symbolic link.
    Symlink {
        /// The link's target, as stored (never followed by incfs).
        target: Vec<u8>,
    },
}

/// A directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// File name (any bytes but `/` and NUL; not `.` or `..`).
    pub name: Vec<u8>,
    /// Index of the inode in [`Manifest::inodes`].
    pub inode: u32,
}

impl Manifest {
    /// Number of chunks of a file of `size` bytes.
    pub fn chunks_for(&self, size: u64) -> u64 {
        size.div_ceil(u64::from(self.chunk_size))
    }

    /// Every entry of the tree with its path (components joined by `/`) and inode index:
    /// each directory's entries in name order, then its subdirectories, depth first. The
    /// root itself is not listed. This is also the order `pack` lays files out in.
    pub fn walk(&self) -> Vec<(Vec<u8>, u32)> {
        let mut out = Vec::new();
        let mut stack = vec![(Vec::new(), ROOT_INODE)];
        while let Some((prefix, dir)) = stack.pop() {
            let Some(InodeKind::Dir { entries }) = self.inodes.get(dir as usize).map(|i| &i.kind)
            else {
                continue;
            };
            let mut subdirs = Vec::new();
            for e in entries {
                let mut path = prefix.clone();
                if !path.is_empty() {
                    path.push(b'/');
                }
                path.extend_from_slice(&e.name);
                if let Some(InodeKind::Dir { .. }) =
                    self.inodes.get(e.inode as usize).map(|i| &i.kind)
                {
                    subdirs.push((path.clone(), e.inode));
                }
                out.push((path, e.inode));
            }
            stack.extend(subdirs.into_iter().rev());
        }
        out
    }

    /// Every regular file, each inode once (the first path that names it), in walk order.
    pub fn files(&self) -> Vec<super::FileRef> {
        let mut seen = vec![false; self.inodes.len()];
        let mut out = Vec::new();
        for (path, inode) in self.walk() {
            if let Some(InodeKind::File { size, first_chunk }) =
                self.inodes.get(inode as usize).map(|i| &i.kind)
                && !std::mem::replace(&mut seen[inode as usize], true)
            {
                out.push(super::FileRef {
                    path,
                    inode,
                    size: *size,
                    first_chunk: *first_chunk,
                    chunks: self.chunks_for(*size),
                });
            }
        }
        out
    }

    /// The checked order of the chunk table's entries.
    pub fn order(&self) -> Result<TableOrder, FormatError> {
        TableOrder::new(&self.table_order, self.chunk_count)
    }

    /// Serializes and compresses the manifest; returns the stored bytes.
    pub fn encode(&self, level: i32) -> Result<Vec<u8>, FormatError> {
        let ser =
            |e: postcard::Error| FormatError::ManifestInvalid(format!("cannot serialize: {e}"));
        let mut raw = postcard::to_stdvec(self).map_err(ser)?;
        if !self.dictionaries.is_empty() {
            raw.extend_from_slice(&postcard::to_stdvec(&self.dictionaries).map_err(ser)?);
        }
        let mut out = Vec::with_capacity(raw.len() / 2 + 16);
        out.extend_from_slice(&(raw.len() as u64).to_le_bytes());
        out.extend_from_slice(&zstd::bulk::compress(&raw, level)?);
        Ok(out)
    }

    /// Decodes stored manifest bytes, checking them against `root` first, then every rule
    /// of the format ([`Manifest::validate`]).
    pub fn decode(stored: &[u8], root: &Digest) -> Result<Self, FormatError> {
        let found = Digest::of(stored);
        if found != *root {
            return Err(FormatError::RootDigest {
                expected: *root,
                found,
            });
        }
        if stored.len() < 8 {
            return Err(FormatError::ManifestDecode(
                "shorter than its length prefix".into(),
            ));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&stored[..8]);
        let raw_len = u64::from_le_bytes(len);
        if raw_len > MAX_MANIFEST_RAW as u64 {
            return Err(FormatError::ManifestDecode(format!(
                "declared size {raw_len} exceeds the {MAX_MANIFEST_RAW}-byte limit"
            )));
        }
        let raw = zstd::bulk::decompress(&stored[8..], raw_len as usize)
            .map_err(|e| FormatError::ManifestDecode(format!("zstd: {e}")))?;
        if raw.len() as u64 != raw_len {
            return Err(FormatError::ManifestDecode(
                "decompressed size differs".into(),
            ));
        }
        let postcard = |e: postcard::Error| FormatError::ManifestDecode(format!("postcard: {e}"));
        let (mut m, rest): (Manifest, _) = postcard::take_from_bytes(&raw).map_err(postcard)?;
        if !rest.is_empty() {
            let (dictionaries, rest) = postcard::take_from_bytes(rest).map_err(postcard)?;
            if !rest.is_empty() {
                return Err(FormatError::ManifestDecode(format!(
                    "{} bytes after the dictionaries",
                    rest.len()
                )));
            }
            m.dictionaries = dictionaries;
        }
        m.validate()?;
        Ok(m)
    }

    /// Checks the rules a reader relies on: the root is a directory, every entry points at an
    /// inode that exists, names are single path components, every directory other than the
    /// root is named exactly once and the root never, and every file's chunks lie in the table.
    pub fn validate(&self) -> Result<(), FormatError> {
        let bad = |m: String| Err(FormatError::ManifestInvalid(m));
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size)
            || !self.chunk_size.is_power_of_two()
        {
            return bad(format!("chunk size {} out of range", self.chunk_size));
        }
        let segments = self.chunk_count.div_ceil(SEGMENT_ENTRIES as u64);
        if self.segment_digests.len() as u64 != segments {
            return bad(format!(
                "{} segment digests for {} chunks",
                self.segment_digests.len(),
                self.chunk_count
            ));
        }
        self.order()?;
        if self.dictionaries.len() > MAX_DICTIONARIES {
            return bad(format!(
                "{} dictionaries (at most {MAX_DICTIONARIES})",
                self.dictionaries.len()
            ));
        }
        for (k, d) in self.dictionaries.iter().enumerate() {
            let inside = d
                .offset
                .checked_add(u64::from(d.len))
                .is_some_and(|end| end <= self.data_len);
            if d.len == 0 || d.len > MAX_DICTIONARY_LEN || !inside {
                return bad(format!(
                    "dictionary {}: {} bytes at {} (data section of {}, at most {MAX_DICTIONARY_LEN} each)",
                    k + 1,
                    d.len,
                    d.offset,
                    self.data_len
                ));
            }
        }
        if self.inodes.len() > u32::MAX as usize {
            return bad("too many inodes".into());
        }
        match self.inodes.first() {
            Some(Inode {
                kind: InodeKind::Dir { .. },
                ..
            }) => {}
            _ => return bad("the root inode is not a directory".into()),
        }
        let mut dir_refs = vec![0u32; self.inodes.len()];
        for (i, inode) in self.inodes.iter().enumerate() {
            match &inode.kind {
                InodeKind::Dir { entries } => {
                    for (k, e) in entries.iter().enumerate() {
                        if let Err(why) = check_name(&e.name) {
                            return bad(format!("inode {i}: entry {k}: {why}"));
                        }
                        if k > 0 && entries[k - 1].name >= e.name {
                            return bad(format!("inode {i}: entries not sorted or duplicated"));
                        }
                        let Some(target) = self.inodes.get(e.inode as usize) else {
                            return bad(format!(
                                "inode {i}: entry names missing inode {}",
                                e.inode
                            ));
                        };
                        if matches!(target.kind, InodeKind::Dir { .. }) {
                            dir_refs[e.inode as usize] += 1;
                        }
                    }
                }
                InodeKind::File { size, first_chunk } => {
                    let n = self.chunks_for(*size);
                    match first_chunk.checked_add(n) {
                        Some(end) if end <= self.chunk_count => {}
                        _ => {
                            return bad(format!(
                                "inode {i}: chunks {first_chunk}+{n} lie outside the table"
                            ));
                        }
                    }
                }
                InodeKind::Symlink { target } => {
                    if target.is_empty() || target.contains(&0) {
                        return bad(format!("inode {i}: symlink target empty or has NUL"));
                    }
                }
            }
        }
        for (i, (inode, refs)) in self.inodes.iter().zip(&dir_refs).enumerate() {
            if let InodeKind::Dir { .. } = inode.kind {
                let want = u32::from(i != ROOT_INODE as usize);
                if *refs != want {
                    return bad(format!("directory inode {i} is named {refs} times"));
                }
            }
        }
        Ok(())
    }
}

/// A name is one path component: not empty, not `.` or `..`, no `/` or NUL.
fn check_name(name: &[u8]) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty name");
    }
    if name == b"." || name == b".." {
        return Err("name is . or ..");
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err("name contains / or NUL");
    }
    Ok(())
}
