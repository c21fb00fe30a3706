//! Chunks shared across the images of one cache directory.
//!
//! Every image cache under a cache directory (`CACHE_DIR/<root digest>/`) keeps its image's
//! head (header and manifest), the chunk-table segments it loaded (`table`), its record of
//! local chunks (`record`) and the chunks themselves in `data/<inode>` ([`super::offline`],
//! [`super::record`]). From those alone, [`SiblingChunks::scan`] learns, for every local
//! chunk of every *other* image under the directory, its digest and where its bytes lie. A
//! mount of a new version of an app then takes each chunk the old version's cache holds
//! from there instead of from the network ([`super::ChunkCache::seed`]).
//!
//! Nothing of a sibling is trusted: its head is verified against its directory's name (the
//! root digest), its table segments against the manifest, and every chunk's bytes against
//! the digest the *new* image's chunk table gives, after they are read and before they are
//! stored. A sibling that is damaged, being written by its own mount, or removed meanwhile
//! costs a fetch, never a wrong byte.
//!
//! **When.** Chunks are copied lazily, as the scheduler is about to fetch them (a demand
//! miss, the plan, the fill), not all at mount: seeding at mount would need the new image's
//! whole chunk table first (3 MiB for clang-22 at 4 KiB chunks, a quarter second at 100
//! Mbit/s before the first read), while the lazy copy needs only the segments a start loads
//! anyway, and chunks a start never reads are copied by the background fill.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::offline::{self, TABLE_FILE};
use super::record::{RECORD_HEADER_LEN, RecordHeader};
use crate::format::{ChunkEntry, Digest, SEGMENT_BYTES, SEGMENT_ENTRIES, decode_segment};

/// Sibling caches indexed at most, the most recently used first: enough for the versions
/// of an app a user keeps, and it bounds the scan's time and memory (a 4 KiB-chunk image of
/// 1 GiB adds 14 MiB of table to read and ~260,000 entries to the index; a whole clang-22
/// cache, 55,000 chunks, takes ~20–30 ms from a cold disk). The scan runs from the cache's
/// open in the background, but a first miss waits for what is left of it.
pub const MAX_SIBLINGS: usize = 8;
/// Sibling backing files kept open at once (each copy of a chunk reads one).
const OPEN_FILES: usize = 8;

/// Where a chunk's bytes lie in a sibling image's cache.
#[derive(Debug, Clone, Copy)]
struct Location {
    /// Index into [`SiblingChunks::dirs`].
    dir: u32,
    inode: u32,
    offset: u64,
    len: u32,
}

/// The local chunks of the other images under a cache directory, by digest.
#[derive(Default)]
pub struct SiblingChunks {
    /// The data directories of the siblings scanned.
    dirs: Vec<PathBuf>,
    /// Their images' root digests, by the same index.
    roots: Vec<Digest>,
    /// Their local chunks by place: (dir, inode, chunk index in the file).
    local: HashSet<(u32, u32, u64)>,
    /// Their chunk size (the same as this image's, or they are not scanned).
    chunk_size: u32,
    by_digest: HashMap<Digest, Location>,
    open: Mutex<HashMap<(u32, u32), Arc<File>>>,
}

impl std::fmt::Debug for SiblingChunks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiblingChunks")
            .field("siblings", &self.dirs.len())
            .field("chunks", &self.by_digest.len())
            .finish()
    }
}

impl SiblingChunks {
    /// Scans the image caches under `cache_dir` other than the one of `own` (at most
    /// [`MAX_SIBLINGS`], the most recently used first). Caches that cannot be read or do
    /// not verify are skipped (logged at debug).
    pub fn scan(cache_dir: &Path, own: &Digest, chunk_size: u32) -> Self {
        let mut found: Vec<(std::time::SystemTime, Digest)> = Vec::new();
        if let Ok(rd) = fs::read_dir(cache_dir) {
            for e in rd.flatten() {
                let Some(root) = e
                    .file_name()
                    .to_str()
                    .filter(|n| n.len() == 64)
                    .and_then(|n| Digest::from_hex(n).ok())
                else {
                    continue;
                };
                if root == *own {
                    continue;
                }
                if let Ok(m) = fs::metadata(e.path().join("record")) {
                    found.push((m.modified().unwrap_or(std::time::UNIX_EPOCH), root));
                }
            }
        }
        found.sort_by_key(|f| std::cmp::Reverse(f.0));
        let mut out = SiblingChunks::default();
        for (_, root) in found {
            if out.dirs.len() >= MAX_SIBLINGS {
                break;
            }
            if let Err(why) = out.add(cache_dir, &root, chunk_size) {
                tracing::debug!(sibling = %root, why, "not using a sibling image cache");
            }
        }
        tracing::debug!(
            siblings = out.dirs.len(),
            chunks = out.by_digest.len(),
            "sibling image caches scanned"
        );
        out
    }

    fn add(&mut self, cache_dir: &Path, root: &Digest, chunk_size: u32) -> Result<(), String> {
        let head = offline::load_head(cache_dir, "", Some(root))
            .map_err(|e| e.to_string())?
            .ok_or("no head kept")?;
        let dir = super::image_dir(cache_dir, root);
        let m = &head.manifest;
        // Chunks of another size never have the same digests: not worth reading its table.
        if m.chunk_size != chunk_size {
            return Err(format!(
                "chunk size {} (this image's is {chunk_size})",
                m.chunk_size
            ));
        }
        let record = fs::read(dir.join("record")).map_err(|e| e.to_string())?;
        let rh = RecordHeader::decode(&record).ok_or("record header does not decode")?;
        if rh.root != *root || rh.chunk_count != m.chunk_count {
            return Err("record is for another image".into());
        }
        let words: Vec<u64> = record
            .get(RECORD_HEADER_LEN as usize..)
            .unwrap_or_default()
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
            .collect();
        let is_local = |slot: u64| {
            words
                .get((slot / 64) as usize)
                .is_some_and(|w| w & (1 << (slot % 64)) != 0)
        };
        let table = File::open(dir.join(TABLE_FILE)).map_err(|e| e.to_string())?;
        let order = m.order().map_err(|e| e.to_string())?;
        // Slot → (inode, offset in the file) through the files sorted by first slot.
        let mut files: Vec<(u64, u64, u32)> = m
            .files()
            .into_iter()
            .filter(|f| f.chunks > 0)
            .map(|f| (f.first_chunk, f.chunks, f.inode))
            .collect();
        files.sort_unstable();
        let owner = |slot: u64| {
            let k = files.partition_point(|f| f.0 <= slot).checked_sub(1)?;
            let (first, n, inode) = files[k];
            (slot < first + n).then_some((inode, slot - first))
        };
        let index = self.dirs.len() as u32;
        let mut added = 0u64;
        let mut buf = Vec::new();
        for (k, digest) in m.segment_digests.iter().enumerate() {
            let start = k as u64 * SEGMENT_BYTES;
            let len =
                (m.chunk_count * crate::format::CHUNK_ENTRY_LEN as u64 - start).min(SEGMENT_BYTES);
            buf.resize(len as usize, 0);
            if table.read_exact_at(&mut buf, start).is_err() {
                continue;
            }
            // Segments never loaded are zeros: they fail their digest and are skipped.
            let Ok(entries) =
                decode_segment(&buf, k as u64, digest, m.chunk_size, m.data_len, &order)
            else {
                continue;
            };
            for (i, e) in entries.iter().enumerate() {
                let slot = order.slot_at((k * SEGMENT_ENTRIES + i) as u64);
                if !is_local(slot) {
                    continue;
                }
                let Some((inode, chunk)) = owner(slot) else {
                    continue;
                };
                self.local.insert((index, inode, chunk));
                self.by_digest.entry(e.digest).or_insert_with(|| {
                    added += 1;
                    Location {
                        dir: index,
                        inode,
                        offset: chunk * u64::from(m.chunk_size),
                        len: e.raw_len,
                    }
                });
            }
        }
        self.dirs.push(dir.join("data"));
        self.roots.push(*root);
        self.chunk_size = chunk_size;
        tracing::debug!(sibling = %root, chunks = added, "sibling image cache indexed");
        Ok(())
    }

    /// Chunks the siblings hold (distinct digests).
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// True when no sibling holds any chunk.
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// True when a sibling holds a chunk with `entry`'s digest and length (not yet read or
    /// checked: [`SiblingChunks::read`] may still refuse it).
    pub fn holds(&self, entry: &ChunkEntry) -> bool {
        self.by_digest
            .get(&entry.digest)
            .is_some_and(|l| l.len == entry.raw_len)
    }

    /// The bytes of the chunk `entry` describes, from a sibling, checked against
    /// `entry.digest`; `None` when no sibling holds it or its bytes do not match.
    pub fn read(&self, entry: &ChunkEntry) -> Option<Vec<u8>> {
        let loc = *self.by_digest.get(&entry.digest)?;
        if loc.len != entry.raw_len {
            return None;
        }
        let file = self.file(loc.dir, loc.inode)?;
        let mut buf = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut buf, loc.offset).ok()?;
        if Digest::of(&buf) != entry.digest {
            tracing::debug!(digest = %entry.digest, "a sibling's chunk does not match its digest; fetching it");
            return None;
        }
        Some(buf)
    }

    /// Bytes `offset..offset + len` of file `inode` of the image with root digest `root`,
    /// when that image's cache is a sibling holding every chunk of the range; not checked
    /// against anything (a delta decoded against them is checked instead).
    pub fn window(&self, root: &Digest, inode: u32, offset: u64, len: u32) -> Option<Vec<u8>> {
        let file = self.window_file(root, inode, offset, len)?;
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset).ok()?;
        Some(buf)
    }

    /// True when [`SiblingChunks::window`] would find the range; asks the kernel to start
    /// reading it (`POSIX_FADV_WILLNEED`), so a read of it after a round trip finds it in
    /// the page cache.
    pub fn prepare_window(&self, root: &Digest, inode: u32, offset: u64, len: u32) -> bool {
        let Some(file) = self.window_file(root, inode, offset, len) else {
            return false;
        };
        // SAFETY: a plain advisory call on a descriptor this struct keeps open.
        unsafe {
            libc::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&*file),
                offset as libc::off_t,
                libc::off_t::from(len),
                libc::POSIX_FADV_WILLNEED,
            );
        }
        true
    }

    /// The backing file of a window whose chunks are all local.
    fn window_file(&self, root: &Digest, inode: u32, offset: u64, len: u32) -> Option<Arc<File>> {
        let dir = self.roots.iter().position(|r| r == root)? as u32;
        let chunk = u64::from(self.chunk_size.max(1));
        let end = offset.checked_add(u64::from(len))?;
        if len == 0
            || !(offset / chunk..end.div_ceil(chunk)).all(|c| self.local.contains(&(dir, inode, c)))
        {
            return None;
        }
        self.file(dir, inode)
    }

    fn file(&self, dir: u32, inode: u32) -> Option<Arc<File>> {
        let mut open = self.open.lock();
        if let Some(f) = open.get(&(dir, inode)) {
            return Some(Arc::clone(f));
        }
        let f = Arc::new(File::open(self.dirs.get(dir as usize)?.join(inode.to_string())).ok()?);
        if open.len() >= OPEN_FILES {
            open.clear();
        }
        open.insert((dir, inode), Arc::clone(&f));
        Some(f)
    }
}
