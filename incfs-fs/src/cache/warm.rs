//! The files a start opened, read ahead from their backing files at the next start.
//!
//! A start from a warm cache whose page cache was dropped (a reboot, memory pressure) waits
//! on the disk for each backing file it opens, one after the other, as a start from a local
//! tree does. It pays more when the daemon itself reads them: an ordinary user's mount has no
//! passthrough, so each first open of a file reads its local part and pushes it into the page
//! cache before the open is answered ([`crate::fs`]'s push), a disk read inside a round trip.
//!
//! So each mount notes the order in which it first opened its files, and [`ChunkCache::close`]
//! keeps it (`opens` in the image's cache directory: [`MAGIC`], a `u32` count, then that many
//! `u32` entries, little-endian: the inode number, with [`PASSED_THROUGH`] set when the file
//! was opened with passthrough). The next [`ChunkCache::open`] of the image asks the kernel to
//! read the local parts of those files (`POSIX_FADV_WILLNEED`), in that order, from a thread
//! of its own, while the mount starts and the program runs; the opens and reads that follow
//! find them in the page cache. What is asked for is what the opens will read: the whole
//! local part of a file served through incfs (its push reads all of it), and of a file passed
//! through only when it is small ([`WHOLE_IF_PASSED_THROUGH`]): a program reads a small file
//! whole, while of a big library it reads what it faults, which the kernel's own readahead of
//! the backing file serves. It names only chunks that are local (verified when stored),
//! fetches nothing and serves nothing: what a program reads still comes through the usual
//! paths. A missing, short or foreign `opens` is ignored, as is an inode the image lacks.
//!
//! [`ChunkCache::close`]: super::ChunkCache::close
//! [`ChunkCache::open`]: super::ChunkCache::open

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::Shared;

/// The name of the open order in an image's cache directory.
pub const OPENS_FILE: &str = "opens";
/// The first bytes of an `opens` file.
pub const MAGIC: &[u8; 8] = b"INCFSOP1";
/// Files noted per mount at most: more than any start here opens (python's: 759).
pub const MAX_OPENS: usize = 1 << 16;
/// Bytes asked to be read ahead per mount at most: a bound on the page cache this takes when
/// the last start opened a huge app whole.
pub const MAX_WARM_BYTES: u64 = 1 << 30;
/// The flag of an entry whose file was opened with passthrough.
pub const PASSED_THROUGH: u32 = 1 << 31;
/// Largest file opened with passthrough whose local part is read ahead.
pub const WHOLE_IF_PASSED_THROUGH: u64 = 1 << 20;
/// Bytes asked for in one call at most.
const PIECE: u64 = 8 << 20;

/// The files one mount opened, each once, in the order of their first open.
pub(super) struct OpenOrder {
    seen: Vec<AtomicU64>,
    order: Mutex<Vec<u32>>,
}

impl OpenOrder {
    pub(super) fn new(inodes: usize) -> Self {
        OpenOrder {
            seen: (0..inodes.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            order: Mutex::new(Vec::new()),
        }
    }

    /// Notes an open of `inode`; only its first counts.
    pub(super) fn note(&self, inode: u32, passthrough: bool) {
        let Some(w) = self.seen.get(inode as usize / 64) else {
            return;
        };
        let bit = 1u64 << (inode % 64);
        if w.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            let mut order = self.order.lock();
            if order.len() < MAX_OPENS {
                order.push(if passthrough {
                    inode | PASSED_THROUGH
                } else {
                    inode
                });
            }
        }
    }

    pub(super) fn get(&self) -> Vec<u32> {
        self.order.lock().clone()
    }
}

/// Writes `order` to `path` whole or not at all: a temporary file of its own renamed over it,
/// so two mounts of one cache that close together leave one or the other's order.
pub(super) fn write(path: &Path, order: &[u32]) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(12 + 4 * order.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(order.len() as u32).to_le_bytes());
    for i in order {
        bytes.extend_from_slice(&i.to_le_bytes());
    }
    // A hint, not a record: not synced.
    super::offline::write_atomic(path, &bytes, false)
}

/// The order kept at `path`, if it is there and whole.
pub(super) fn read(path: &Path) -> Option<Vec<u32>> {
    let bytes = std::fs::read(path).ok()?;
    let rest = bytes.strip_prefix(MAGIC.as_slice())?;
    let (count, rest) = rest.split_first_chunk::<4>()?;
    let count = u32::from_le_bytes(*count) as usize;
    if count > MAX_OPENS || rest.len() != 4 * count {
        tracing::debug!(path = %path.display(), "ignoring a damaged open order");
        return None;
    }
    Some(
        rest.chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    )
}

impl Shared {
    /// Asks the kernel to read the local chunks of the files of `order`, in that order, from
    /// their backing files; stops at [`MAX_WARM_BYTES`] or when the cache closes.
    pub(super) fn warm(&self, order: &[u32]) {
        let mut asked = 0u64;
        for &entry in order {
            if asked >= MAX_WARM_BYTES || self.stop.load(Ordering::Acquire) {
                break;
            }
            let inode = entry & !PASSED_THROUGH;
            let Some(&k) = self.by_inode.get(&inode) else {
                continue;
            };
            let f = self.files[k];
            if self.file_local[k].load(Ordering::Acquire) == 0
                || (entry & PASSED_THROUGH != 0 && f.size > WHOLE_IF_PASSED_THROUGH)
            {
                continue;
            }
            let Ok(file) = File::open(self.data_path(inode)) else {
                continue;
            };
            let mut slot = f.first_chunk;
            let end = f.first_chunk + f.chunks;
            while slot < end && asked < MAX_WARM_BYTES && !self.stop.load(Ordering::Acquire) {
                if !self.is_local(slot) {
                    slot += 1;
                    continue;
                }
                // A run of local chunks, of at most PIECE: the close is seen between pieces.
                let run = slot;
                while slot < end && self.is_local(slot) && (slot - run) * self.chunk_size < PIECE {
                    slot += 1;
                }
                let offset = (run - f.first_chunk) * self.chunk_size;
                let len = ((slot - run) * self.chunk_size).min(f.size - offset);
                // SAFETY: an advisory call on a descriptor open for the whole block.
                unsafe {
                    libc::posix_fadvise(
                        file.as_raw_fd(),
                        offset as libc::off_t,
                        len as libc::off_t,
                        libc::POSIX_FADV_WILLNEED,
                    );
                }
                asked += len;
                self.warmed_bytes.fetch_add(len, Ordering::Relaxed);
            }
        }
        tracing::debug!(
            files = order.len(),
            bytes = asked,
            "asked for the last start's files from the backing files"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_reads_back_as_written_and_a_damaged_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(OPENS_FILE);
        write(&path, &[7, 3, 11]).unwrap();
        assert_eq!(read(&path), Some(vec![7, 3, 11]));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.pop();
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read(&path), None, "a short file");
        std::fs::write(&path, b"INCFSOP0\x01\0\0\0\x07\0\0\0").unwrap();
        assert_eq!(read(&path), None, "another magic");
        assert_eq!(read(&dir.path().join("missing")), None);
    }

    #[test]
    fn two_mounts_closing_together_leave_one_whole_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(OPENS_FILE);
        let a: Vec<u32> = (0..3000).collect();
        let b: Vec<u32> = (0..2000).rev().collect();
        std::thread::scope(|s| {
            for order in [&a, &b] {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..50 {
                        write(path, order).unwrap();
                    }
                });
            }
        });
        let got = read(&path).expect("a whole order");
        assert!(got == a || got == b);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn each_file_is_noted_once_at_its_first_open() {
        let o = OpenOrder::new(100);
        for (i, pt) in [
            (5, false),
            (9, true),
            (5, true),
            (70, false),
            (9, false),
            (200, false),
        ] {
            o.note(i, pt);
        }
        assert_eq!(
            o.get(),
            vec![5, 9 | PASSED_THROUGH, 70],
            "repeats and unknown inodes are left out"
        );
    }
}
