//! The backing cache: verified, decompressed chunks on a local file system.
//!
//! Like Android incfs's backing file, every regular file of the image gets one sparse file
//! (`data/<inode>`) holding its decompressed bytes at their own offsets, so a file whose
//! chunks are all local can be handed to the kernel for FUSE passthrough as it is. Beside the
//! data, a persistent record (`record`, see [`record`]) has one bit per chunk slot.
//!
//! The cache of one image lives in `CACHE_DIR/<root digest>/`, so two images never mix.
//!
//! **Ordering.** [`ChunkCache::store`] writes a verified chunk into its backing file and marks
//! it local in memory at once (the bytes are in the page cache, so reads may use them). The
//! record catches up in batches ([`ChunkCache::flush`], run by a background thread): first
//! the touched backing files (and the `data/` directory when files were created) are
//! fdatasync'ed, only then are the record's bits written and synced. So the record never
//! claims a chunk whose bytes are not durable.
//!
//! **Crash recovery.** The record's header carries a clean-shutdown flag, cleared when a mount
//! opens the cache and set by [`ChunkCache::close`]. When a mount finds it cleared, the
//! previous one stopped uncleanly, and the chunks recorded since the last checkpoint
//! (`checkpoint`: the record's bitmap as of the last clean shutdown or recovery) are read back
//! and checked against their digests before use; chunks that fail are forgotten (and fetched
//! again when needed).
//!
//! **Sharing.** Several mounts may use one image cache at once (two `incfs run`s of the same
//! image, a `mount` and a `run`): they write the same verified bytes to the same backing
//! files, and each flush merges its bits into the record under a lock, learning the chunks
//! the others recorded ([`record::Record::merge`]), so none loses another's work and each
//! serves what the others fetched. The locks ([`lock`]) tell an opening mount whether it is
//! the only user: only then does it re-check chunks after an unclean stop (with others
//! running, the record is theirs and sound: a bit is set only after its bytes are durable,
//! and a process that dies loses nothing the page cache holds; a machine that stops stops
//! every user, and the next opener is alone). Only the last user to close marks the record
//! clean and writes the checkpoint. `incfs cache gc` never removes a cache in use.
//!
//! **Descriptors.** Backing files are opened on first use and kept open, at most
//! [`FdBudget::open_files`] of them: beyond that the least recently used is closed (and
//! reopened when needed again), so a tree of any size is served under a small
//! `RLIMIT_NOFILE` ([`fds`]). A file closed with chunks not yet durable is synced through a
//! fresh descriptor at the next flush: `fsync` acts on the inode, and a write-back error not
//! yet seen by anyone is reported to a descriptor opened after it (the kernel's `errseq`).

pub mod fds;
pub mod gc;
pub mod lock;
pub mod offline;
pub mod record;
pub mod root;
pub mod siblings;
mod warm;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};

use crate::format::{ChunkEntry, Digest, InodeKind, Manifest};
use crate::source::RequestKind;
use crate::table::LazyTable;

use fds::{FdBudget, FdPermit};
use record::Record;
use siblings::SiblingChunks;
pub use warm::OPENS_FILE;

/// How long stored chunks may wait before the background flush makes them durable and
/// records them: short enough that a crash loses little, long enough to batch fdatasyncs.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// Pending chunks that trigger a flush before [`FLUSH_INTERVAL`] has passed.
const FLUSH_BATCH: usize = 512;
/// Threads that sync a flush's backing files at most; the transient descriptors they open
/// come out of [`fds::RESERVED_FDS`].
const SYNC_THREADS: usize = 8;
/// How often a mount with nothing to record reads the record for the chunks other mounts
/// of the same image recorded (one read of the bitmap: 16 KiB for a 8 GiB image of 64 KiB
/// chunks).
const REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// Times an opener retries when gc removed the cache directory while it waited for it.
const OPEN_ATTEMPTS: usize = 8;

/// Errors of the backing cache. Each names the file and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A file operation failed.
    #[error("{what}: {}: {error}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        error: io::Error,
    },
    /// A mount uses this image's cache (so it was not removed).
    #[error("{}: the cache is in use by an incfs mount (unmount it first)", path.display())]
    InUse {
        /// The image cache directory.
        path: PathBuf,
    },
    /// The chunk-table entries needed to re-check chunks after an unclean stop did not load.
    #[error("re-checking the cache after an unclean stop: {0}")]
    Table(#[from] crate::table::TableError),
    /// A chunk slot that belongs to no file.
    #[error("chunk slot {slot} belongs to no file of the image")]
    NoOwner {
        /// The slot.
        slot: u64,
    },
}

/// One regular file of the image, as the cache sees it.
#[derive(Debug, Clone, Copy)]
struct FileSlots {
    inode: u32,
    size: u64,
    first_chunk: u64,
    chunks: u64,
}

struct Pending {
    slots: Vec<u64>,
    files: HashSet<u32>,
    created: bool,
}

/// What the record holds durably, plus the batch not yet recorded.
struct Durable {
    record: Record,
    words: Vec<u64>,
    pending: Pending,
}

struct Shared {
    root: Digest,
    checkpoint_path: PathBuf,
    dir: PathBuf,
    data_dir: PathBuf,
    chunk_size: u64,
    /// Chunk slots of the image.
    chunk_count: u64,
    /// Files sorted by first chunk slot.
    files: Vec<FileSlots>,
    /// Index into `files` by inode.
    by_inode: HashMap<u32, usize>,
    /// Verified and written (readable), one bit per slot.
    local: Vec<AtomicU64>,
    /// The files this mount opened, kept at close for the next mount ([`warm`]).
    opens: warm::OpenOrder,
    /// Bytes of backing files asked to be read ahead from the last start's order.
    warmed_bytes: AtomicU64,
    /// Local chunks per entry of `files`.
    file_local: Vec<AtomicU64>,
    local_chunks: AtomicU64,
    local_bytes: AtomicU64,
    durable_chunks: AtomicU64,
    handles: Mutex<OpenFiles>,
    budget: Arc<FdBudget>,
    durable: Mutex<Durable>,
    wake: Condvar,
    stop: AtomicBool,
    closed: AtomicBool,
    recovered: RecoveryReport,
    /// The cache directory this image's cache lies in, and the other images' chunks found
    /// there (scanned at the first [`ChunkCache::seed`]).
    cache_dir: PathBuf,
    siblings: OnceLock<SiblingChunks>,
    seeded_chunks: AtomicU64,
    seeded_bytes: AtomicU64,
    /// The users' lock, held shared while the cache is open ([`lock`]).
    users_lock: File,
}

/// The backing files open now, each with the tick of its last use.
#[derive(Default)]
struct OpenFiles {
    files: HashMap<u32, (Arc<File>, u64)>,
    tick: u64,
}

impl OpenFiles {
    fn get(&mut self, inode: u32) -> Option<Arc<File>> {
        self.tick += 1;
        let tick = self.tick;
        self.files.get_mut(&inode).map(|(f, used)| {
            *used = tick;
            Arc::clone(f)
        })
    }

    /// Adds `file`, first closing the least recently used ones so that at most `max` stay
    /// open. (A file closed here stays open while a caller still holds it.)
    fn insert(&mut self, inode: u32, file: Arc<File>, max: usize) {
        while self.files.len() >= max.max(1) {
            let Some(oldest) = self
                .files
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k)
            else {
                break;
            };
            self.files.remove(&oldest);
        }
        self.tick += 1;
        self.files.insert(inode, (file, self.tick));
    }
}

/// What opening the cache found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// True when the previous user did not shut down cleanly.
    pub unclean: bool,
    /// Chunks the record claimed.
    pub recorded: u64,
    /// Recorded chunks read back and checked (those recorded since the last checkpoint).
    pub rechecked: u64,
    /// Recorded chunks whose bytes no longer matched their digest (forgotten).
    pub dropped: u64,
    /// Other mounts were using the cache when this one opened it (so it re-checked nothing).
    pub shared: bool,
}

/// The verified-chunk cache of one image. Cheap to clone; shared by the fetch workers and
/// the file system.
#[derive(Clone)]
pub struct ChunkCache {
    shared: Arc<Shared>,
    flusher: Arc<Mutex<Option<JoinHandle<()>>>>,
}

/// The directory that holds the cache of the image with root digest `root`.
pub fn image_dir(cache_dir: &Path, root: &Digest) -> PathBuf {
    cache_dir.join(root.to_hex())
}

impl ChunkCache {
    /// Opens (creating if needed) the cache of the image with `root`, `manifest` and `table`
    /// under `cache_dir`, recovering after an unclean stop, and starts the background flush.
    pub fn open(
        cache_dir: &Path,
        root: &Digest,
        manifest: &Manifest,
        table: &LazyTable,
    ) -> Result<Self, CacheError> {
        let dir = image_dir(cache_dir, root);
        let data_dir = dir.join("data");
        let io_err = |path: &Path, what: &'static str| {
            let path = path.to_path_buf();
            move |error| CacheError::Io { path, what, error }
        };
        let OpenLocks {
            open: _opening,
            users: users_lock,
            alone,
        } = lock_for_open(&dir, &data_dir)?;

        let mut files: Vec<FileSlots> = manifest
            .inodes
            .iter()
            .enumerate()
            .filter_map(|(i, ino)| match ino.kind {
                InodeKind::File { size, first_chunk } if size > 0 => Some(FileSlots {
                    inode: i as u32,
                    size,
                    first_chunk,
                    chunks: manifest.chunks_for(size),
                }),
                _ => None,
            })
            .collect();
        files.sort_by_key(|f| f.first_chunk);
        let by_inode = files
            .iter()
            .enumerate()
            .map(|(k, f)| (f.inode, k))
            .collect();

        let chunk_count = table.len();
        let (mut record, mut words) = Record::open(&dir.join("record"), chunk_count, *root)?;
        let recorded = words.iter().map(|w| u64::from(w.count_ones())).sum();
        let mut report = RecoveryReport {
            unclean: alone && !record.header().clean && recorded > 0,
            recorded,
            rechecked: 0,
            dropped: 0,
            shared: !alone,
        };

        let data_path = |inode: u32| data_dir.join(inode.to_string());
        // After an unclean stop, check the chunks recorded since the last checkpoint (clean
        // shutdown or recovery); forget the ones that fail.
        let checkpoint_path = dir.join("checkpoint");
        let checked = record::read_checkpoint(&checkpoint_path, chunk_count, root);
        if report.unclean && report.recorded > 0 {
            // The digests of the chunks to re-check, from their chunk-table segments.
            let unchecked: Vec<u64> = words
                .iter()
                .enumerate()
                .flat_map(|(wi, word)| {
                    let bits = *word & !checked.get(wi).copied().unwrap_or(0);
                    (0..64u64)
                        .filter(move |b| bits & (1 << b) != 0)
                        .map(move |b| wi as u64 * 64 + b)
                })
                .collect();
            table.load(&unchecked, RequestKind::Demand)?;
            for (wi, word) in words.iter_mut().enumerate() {
                let mut bits = *word & !checked.get(wi).copied().unwrap_or(0);
                report.rechecked += u64::from(bits.count_ones());
                while bits != 0 {
                    let b = bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    let slot = wi as u64 * 64 + b;
                    if !check_stored(
                        &files,
                        table,
                        u64::from(manifest.chunk_size),
                        &data_path,
                        slot,
                    ) {
                        *word &= !(1u64 << b);
                        report.dropped += 1;
                    }
                }
            }
            if report.dropped > 0 {
                for (wi, word) in words.iter().enumerate() {
                    record.write_word(wi, *word)?;
                }
                record.sync()?;
                tracing::warn!(
                    dir = %dir.display(),
                    dropped = report.dropped,
                    "recorded chunks did not match their digests after an unclean stop; they will be fetched again"
                );
            }
        }
        if alone && (report.unclean || checked != words) {
            // Everything recorded now is known good: the next recovery starts from here.
            record::write_checkpoint(&checkpoint_path, chunk_count, root, &words)?;
        }
        if record.header().clean {
            record.set_clean(false)?;
        }
        if alone {
            // Recovered: others may join now (a conversion, safe while `lock.open` is held).
            lock::flock(&users_lock, lock::Mode::Shared)
                .map_err(io_err(&dir, "locking the cache for sharing"))?;
        }
        touch(&users_lock);

        let shared = Shared {
            root: *root,
            checkpoint_path,
            dir: dir.clone(),
            data_dir: data_dir.clone(),
            chunk_size: u64::from(manifest.chunk_size),
            chunk_count,
            file_local: files.iter().map(|_| AtomicU64::new(0)).collect(),
            files,
            by_inode,
            opens: warm::OpenOrder::new(manifest.inodes.len()),
            warmed_bytes: AtomicU64::new(0),
            local: (0..record::words_for(chunk_count))
                .map(|_| AtomicU64::new(0))
                .collect(),
            local_chunks: AtomicU64::new(0),
            local_bytes: AtomicU64::new(0),
            durable_chunks: AtomicU64::new(0),
            handles: Mutex::new(OpenFiles::default()),
            budget: Arc::new(FdBudget::for_limit(fds::nofile_soft_limit())),
            durable: Mutex::new(Durable {
                record,
                words: words.clone(),
                pending: Pending {
                    slots: Vec::new(),
                    files: HashSet::new(),
                    created: false,
                },
            }),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            recovered: report,
            cache_dir: cache_dir.to_path_buf(),
            siblings: OnceLock::new(),
            seeded_chunks: AtomicU64::new(0),
            seeded_bytes: AtomicU64::new(0),
            users_lock,
        };
        for (wi, word) in words.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                shared.mark_local(wi as u64 * 64 + b);
            }
        }
        shared.durable_chunks.store(
            shared.local_chunks.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        let shared = Arc::new(shared);
        let bg = Arc::clone(&shared);
        let flusher = std::thread::Builder::new()
            .name("incfs-flush".into())
            .spawn(move || bg.flush_loop())
            .map_err(io_err(&dir, "starting the cache flush thread"))?;
        // The siblings' index is built in the background from now, so a start's first miss
        // does not wait for all of it (it waits only for what is left, in `seed`). Not
        // needed by an image that is whole already; if the thread cannot start, the first
        // `seed` builds it.
        if shared.local_chunks.load(Ordering::Relaxed) < shared.chunk_count {
            let bg = Arc::clone(&shared);
            let _ = std::thread::Builder::new()
                .name("incfs-siblings".into())
                .spawn(move || {
                    bg.siblings();
                });
        }
        // The last start's files, read ahead from the backing files from now ([`warm`]).
        if shared.local_chunks.load(Ordering::Relaxed) > 0 {
            let bg = Arc::clone(&shared);
            let _ = std::thread::Builder::new()
                .name("incfs-warm".into())
                .spawn(move || {
                    if let Some(order) = warm::read(&bg.dir.join(OPENS_FILE)) {
                        bg.warm(&order);
                    }
                });
        }
        Ok(ChunkCache {
            shared,
            flusher: Arc::new(Mutex::new(Some(flusher))),
        })
    }

    /// What opening found (unclean stop, chunks dropped by re-verification).
    pub fn recovery(&self) -> RecoveryReport {
        self.shared.recovered
    }

    /// The directory of this image's cache.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// True when `slot` is verified and readable from its backing file.
    pub fn is_local(&self, slot: u64) -> bool {
        self.shared.is_local(slot)
    }

    /// True when every chunk of the file `inode` is local (empty files always are).
    pub fn file_complete(&self, inode: u32) -> bool {
        match self.shared.by_inode.get(&inode) {
            Some(&k) => {
                self.shared.file_local[k].load(Ordering::Acquire) == self.shared.files[k].chunks
            }
            None => true,
        }
    }

    /// Chunks local now.
    pub fn local_chunks(&self) -> u64 {
        self.shared.local_chunks.load(Ordering::Relaxed)
    }

    /// Chunks the durable record claims.
    pub fn durable_chunks(&self) -> u64 {
        self.shared.durable_chunks.load(Ordering::Relaxed)
    }

    /// Bytes of file data held locally.
    pub fn local_bytes(&self) -> u64 {
        self.shared.local_bytes.load(Ordering::Relaxed)
    }

    /// Stores the verified, decompressed bytes of `slot` in its backing file and marks the
    /// chunk local. The caller has checked `data` against the chunk's digest.
    pub fn store(&self, slot: u64, data: &[u8]) -> Result<(), CacheError> {
        let sh = &self.shared;
        if sh.is_local(slot) {
            return Ok(());
        }
        let k = sh.owner(slot).ok_or(CacheError::NoOwner { slot })?;
        let f = sh.files[k];
        let (file, created) = sh.handle(f.inode, f.size)?;
        let offset = (slot - f.first_chunk) * sh.chunk_size;
        file.write_all_at(data, offset)
            .map_err(|error| CacheError::Io {
                path: sh.data_path(f.inode),
                what: "writing a chunk to the backing file",
                error,
            })?;
        if sh.mark_local(slot) {
            let mut d = sh.durable.lock();
            d.pending.slots.push(slot);
            d.pending.files.insert(f.inode);
            d.pending.created |= created;
            if d.pending.slots.len() >= FLUSH_BATCH {
                sh.wake.notify_one();
            }
        }
        Ok(())
    }

    /// Stores `slot` from another image's cache under the same cache directory when one
    /// holds a chunk with the digest `entry` (the slot's verified chunk-table entry) names,
    /// its bytes checked against that digest first ([`siblings`]). True when the chunk is
    /// local now; false when it must be fetched.
    pub fn seed(&self, slot: u64, entry: &ChunkEntry) -> bool {
        let sh = &self.shared;
        if sh.is_local(slot) {
            return true;
        }
        let Some(data) = sh.siblings().read(entry) else {
            return false;
        };
        match self.store(slot, &data) {
            Ok(()) => {
                sh.seeded_chunks.fetch_add(1, Ordering::Relaxed);
                sh.seeded_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                true
            }
            Err(error) => {
                tracing::warn!(slot, %error, "storing a chunk copied from a sibling image cache failed");
                false
            }
        }
    }

    /// True when a sibling image cache holds the chunk `entry` describes (as far as the
    /// index built at the first [`ChunkCache::seed`] knows; false before it). No I/O.
    pub fn sibling_holds(&self, entry: &ChunkEntry) -> bool {
        self.shared.siblings.get().is_some_and(|s| s.holds(entry))
    }

    /// Bytes of a file of another image under the same cache directory
    /// ([`SiblingChunks::window`]): the window a delta of this image's chunk is decoded
    /// against. Builds the siblings' index first if it is not there yet.
    pub fn sibling_window(
        &self,
        root: &Digest,
        inode: u32,
        offset: u64,
        len: u32,
    ) -> Option<Vec<u8>> {
        self.shared.siblings().window(root, inode, offset, len)
    }

    /// [`SiblingChunks::prepare_window`] of a sibling image's file.
    pub fn prepare_sibling_window(&self, root: &Digest, inode: u32, offset: u64, len: u32) -> bool {
        self.shared
            .siblings()
            .prepare_window(root, inode, offset, len)
    }

    /// Chunks and bytes [`ChunkCache::seed`] took from sibling image caches.
    pub fn seeded(&self) -> (u64, u64) {
        (
            self.shared.seeded_chunks.load(Ordering::Relaxed),
            self.shared.seeded_bytes.load(Ordering::Relaxed),
        )
    }

    /// Reads `buf.len()` bytes of file `inode` at `offset` from its backing file. The caller
    /// makes sure the chunks under the range are local.
    pub fn read(&self, inode: u32, offset: u64, buf: &mut [u8]) -> Result<(), CacheError> {
        let sh = &self.shared;
        let k = *sh
            .by_inode
            .get(&inode)
            .ok_or(CacheError::NoOwner { slot: u64::MAX })?;
        let (file, _) = sh.handle(inode, sh.files[k].size)?;
        file.read_exact_at(buf, offset)
            .map_err(|error| CacheError::Io {
                path: sh.data_path(inode),
                what: "reading the backing file",
                error,
            })
    }

    /// Notes that the program opened file `inode`, with passthrough or not (its first open
    /// counts), for the next mount's read-ahead of the backing files ([`warm`]).
    pub fn opened(&self, inode: u32, passthrough: bool) {
        self.shared.opens.note(inode, passthrough);
    }

    /// Bytes of backing files this mount asked the kernel to read ahead, from the order the
    /// last start opened its files in ([`warm`]).
    pub fn warmed_bytes(&self) -> u64 {
        self.shared.warmed_bytes.load(Ordering::Relaxed)
    }

    /// A share of the descriptor budget for one more passthrough backing id, or `None` when
    /// passthrough already holds all it may (serve the file cached then).
    pub fn passthrough_permit(&self) -> Option<FdPermit> {
        self.shared.budget.try_passthrough()
    }

    /// The descriptor budget of this cache.
    pub fn fd_budget(&self) -> &FdBudget {
        &self.shared.budget
    }

    /// Backing files open now.
    pub fn open_files(&self) -> usize {
        self.shared.handles.lock().files.len()
    }

    /// Opens the backing file of `inode` read-only, for passthrough.
    pub fn open_backing(&self, inode: u32) -> Result<File, CacheError> {
        let path = self.shared.data_path(inode);
        File::open(&path).map_err(|error| CacheError::Io {
            path,
            what: "opening the backing file for passthrough",
            error,
        })
    }

    /// Makes every stored chunk durable and recorded now, and learns the chunks other
    /// mounts of the image recorded.
    pub fn flush(&self) -> Result<(), CacheError> {
        self.shared.flush(true)
    }

    /// Stops the background flush, records everything and lets go of the cache; the last
    /// of the mounts sharing it marks the record clean. Called on unmount; a cache that is
    /// dropped without it counts as stopped uncleanly.
    pub fn close(&self) -> Result<(), CacheError> {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_all();
        let order = self.shared.opens.get();
        if !order.is_empty() {
            let path = self.shared.dir.join(OPENS_FILE);
            if let Err(error) = warm::write(&path, &order) {
                tracing::warn!(path = %path.display(), %error, "could not keep the order of this start's opens");
            }
        }
        if let Some(h) = self.flusher.lock().take() {
            let _ = h.join();
        }
        let sh = &self.shared;
        sh.flush(false)?;
        let io_err = |what: &'static str| {
            let path = sh.dir.clone();
            move |error| CacheError::Io { path, what, error }
        };
        let open_path = sh.dir.join(lock::OPEN_LOCK);
        let opening = lock::open(&open_path).map_err(io_err("opening the cache lock"))?;
        lock::flock(&opening, lock::Mode::Exclusive).map_err(io_err("locking the cache"))?;
        touch(&sh.users_lock);
        // The last user (no one else holds the users' lock) marks the record clean, with
        // everything every user recorded in the checkpoint.
        let last = lock::flock(&sh.users_lock, lock::Mode::TryExclusive)
            .map_err(io_err("locking the cache"))?;
        let result = if last {
            sh.flush(true).and_then(|()| {
                let mut d = sh.durable.lock();
                record::write_checkpoint(&sh.checkpoint_path, sh.chunk_count, &sh.root, &d.words)?;
                d.record.set_clean(true)
            })
        } else {
            Ok(())
        };
        let _ = lock::unlock(&sh.users_lock);
        result
    }
}

impl Shared {
    /// The index of the chunks other images' caches under this cache directory hold, built
    /// at the first call.
    fn siblings(&self) -> &SiblingChunks {
        self.siblings.get_or_init(|| {
            SiblingChunks::scan(&self.cache_dir, &self.root, self.chunk_size as u32)
        })
    }

    fn is_local(&self, slot: u64) -> bool {
        self.local
            .get((slot / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (slot % 64)) != 0)
    }

    /// Sets the local bit; true when it was not set before.
    fn mark_local(&self, slot: u64) -> bool {
        let Some(w) = self.local.get((slot / 64) as usize) else {
            return false;
        };
        let bit = 1u64 << (slot % 64);
        if w.fetch_or(bit, Ordering::AcqRel) & bit != 0 {
            return false;
        }
        self.local_chunks.fetch_add(1, Ordering::Relaxed);
        if let Some(k) = self.owner(slot) {
            self.file_local[k].fetch_add(1, Ordering::AcqRel);
            let f = &self.files[k];
            let raw = (f.size - (slot - f.first_chunk) * self.chunk_size).min(self.chunk_size);
            self.local_bytes.fetch_add(raw, Ordering::Relaxed);
        }
        true
    }

    fn owner(&self, slot: u64) -> Option<usize> {
        let k = self
            .files
            .partition_point(|f| f.first_chunk <= slot)
            .checked_sub(1)?;
        let f = &self.files[k];
        (slot < f.first_chunk + f.chunks).then_some(k)
    }

    fn data_path(&self, inode: u32) -> PathBuf {
        self.data_dir.join(inode.to_string())
    }

    /// The open backing file of `inode`, created (sparse, full length) on first use.
    fn handle(&self, inode: u32, size: u64) -> Result<(Arc<File>, bool), CacheError> {
        let mut h = self.handles.lock();
        if let Some(f) = h.get(inode) {
            return Ok((f, false));
        }
        let path = self.data_path(inode);
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .and_then(|f| {
                if f.metadata()?.len() != size {
                    f.set_len(size)?;
                }
                Ok(f)
            })
            .map_err(|error| CacheError::Io {
                path: path.clone(),
                what: "opening the backing file",
                error,
            })?;
        let file = Arc::new(file);
        h.insert(inode, Arc::clone(&file), self.budget.open_files());
        Ok((file, !existed))
    }

    fn flush_loop(&self) {
        let mut refreshed = Instant::now();
        loop {
            {
                let mut d = self.durable.lock();
                if !self.stop.load(Ordering::Acquire) && d.pending.slots.len() < FLUSH_BATCH {
                    self.wake.wait_for(&mut d, FLUSH_INTERVAL);
                }
            }
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            let refresh = refreshed.elapsed() >= REFRESH_INTERVAL;
            if refresh {
                refreshed = Instant::now();
            }
            if let Err(e) = self.flush(refresh) {
                tracing::error!(error = %e, "flushing the chunk cache failed; will retry");
            }
        }
    }

    /// Makes the pending chunks durable and records them; with `refresh`, reads the record
    /// for other mounts' chunks even when nothing is pending.
    fn flush(&self, refresh: bool) -> Result<(), CacheError> {
        let (slots, files, created) = {
            let mut d = self.durable.lock();
            if d.pending.slots.is_empty() && !refresh {
                return Ok(());
            }
            let p = std::mem::replace(
                &mut d.pending,
                Pending {
                    slots: Vec::new(),
                    files: HashSet::new(),
                    created: false,
                },
            );
            (p.slots, p.files, p.created)
        };
        let result = self.make_durable(&files, created);
        let mut d = self.durable.lock();
        if let Err(e) = result {
            // Put the batch back: it is recorded by a later flush or never.
            d.pending.slots.extend(slots);
            d.pending.files.extend(files);
            d.pending.created |= created;
            return Err(e);
        }
        let mut words = d.words.clone();
        for slot in &slots {
            if let Some(w) = words.get_mut((*slot / 64) as usize) {
                *w |= 1 << (slot % 64);
            }
        }
        if let Err(e) = d.record.merge(&mut words) {
            d.pending.slots.extend(slots);
            d.pending.files.extend(files);
            d.pending.created |= created;
            return Err(e);
        }
        // What other mounts recorded is durable in the same backing files: local here too.
        for (wi, w) in words.iter().enumerate() {
            let mut learned = *w & !self.local[wi].load(Ordering::Acquire);
            while learned != 0 {
                let b = learned.trailing_zeros() as u64;
                learned &= learned - 1;
                self.mark_local(wi as u64 * 64 + b);
            }
        }
        let durable = words.iter().map(|w| u64::from(w.count_ones())).sum();
        d.words = words;
        self.durable_chunks.store(durable, Ordering::Relaxed);
        Ok(())
    }

    fn make_durable(&self, files: &HashSet<u32>, created: bool) -> Result<(), CacheError> {
        let files: Vec<u32> = files.iter().copied().collect();
        if files.len() <= SYNC_THREADS {
            files
                .iter()
                .try_for_each(|&inode| self.sync_backing(inode))?;
        } else {
            // Side by side: the file system commits concurrent syncs together, where one
            // after the other each waits for a commit of its own (a fill that brought 4,500
            // files: 1.2-1.6 s serial, 0.4 s on 8 threads, on this machine's ext4).
            let per = files.len().div_ceil(SYNC_THREADS);
            std::thread::scope(|s| {
                let parts: Vec<_> = files
                    .chunks(per)
                    .map(|part| {
                        s.spawn(move || part.iter().try_for_each(|&inode| self.sync_backing(inode)))
                    })
                    .collect();
                parts.into_iter().try_for_each(|p| {
                    p.join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
            })?;
        }
        if created {
            record::sync_dir(&self.data_dir)?;
        }
        Ok(())
    }

    /// Makes the written bytes of the backing file of `inode` durable.
    fn sync_backing(&self, inode: u32) -> Result<(), CacheError> {
        let open = self
            .handles
            .lock()
            .files
            .get(&inode)
            .map(|(f, _)| Arc::clone(f));
        // A file closed since its chunks were written is synced through a new descriptor
        // (see the module docs), without taking a place among the open ones.
        let synced = match open {
            Some(f) => f.sync_data(),
            None => File::open(self.data_path(inode)).and_then(|f| f.sync_data()),
        };
        synced.map_err(|error| CacheError::Io {
            path: self.data_path(inode),
            what: "syncing the backing file",
            error,
        })
    }
}

/// Reads back a recorded chunk and checks its digest.
fn check_stored(
    files: &[FileSlots],
    table: &LazyTable,
    chunk_size: u64,
    data_path: &dyn Fn(u32) -> PathBuf,
    slot: u64,
) -> bool {
    let Some(k) = files
        .partition_point(|f| f.first_chunk <= slot)
        .checked_sub(1)
    else {
        return false;
    };
    let f = files[k];
    let Some(entry) = table.get(slot) else {
        return false;
    };
    if slot >= f.first_chunk + f.chunks {
        return false;
    }
    let Ok(file) = File::open(data_path(f.inode)) else {
        return false;
    };
    let mut buf = vec![0u8; entry.raw_len as usize];
    file.read_exact_at(&mut buf, (slot - f.first_chunk) * chunk_size)
        .is_ok()
        && Digest::of(&buf) == entry.digest
}

/// The locks an opening mount holds ([`lock`]).
struct OpenLocks {
    /// `lock.open`, exclusively, until the open is done.
    open: File,
    /// `lock`: exclusively when `alone`, else shared.
    users: File,
    /// No other mount uses the cache.
    alone: bool,
}

/// Creates the image cache directory (again, if gc removed it meanwhile) and takes its locks
/// for opening.
fn lock_for_open(dir: &Path, data_dir: &Path) -> Result<OpenLocks, CacheError> {
    let io_err = |path: &Path, what: &'static str| {
        let path = path.to_path_buf();
        move |error| CacheError::Io { path, what, error }
    };
    for _ in 0..OPEN_ATTEMPTS {
        fs::create_dir_all(data_dir).map_err(io_err(data_dir, "creating the cache directory"))?;
        let open_path = dir.join(lock::OPEN_LOCK);
        let open = lock::open(&open_path).map_err(io_err(&open_path, "opening the cache lock"))?;
        lock::flock(&open, lock::Mode::Exclusive)
            .map_err(io_err(&open_path, "locking the cache"))?;
        if !lock::still_at(&open, &open_path) {
            // gc removed the cache while this mount waited for the lock: make it again.
            continue;
        }
        let users_path = dir.join(lock::USERS_LOCK);
        let users =
            lock::open(&users_path).map_err(io_err(&users_path, "opening the cache lock"))?;
        // Anyone else holds `lock` only shared while we hold `lock.open`: no wait here.
        let alone = lock::flock(&users, lock::Mode::TryExclusive)
            .map_err(io_err(&users_path, "locking the cache"))?;
        if !alone {
            lock::flock(&users, lock::Mode::Shared)
                .map_err(io_err(&users_path, "locking the cache"))?;
        }
        return Ok(OpenLocks { open, users, alone });
    }
    Err(CacheError::Io {
        path: dir.to_path_buf(),
        what: "opening the cache",
        error: io::Error::other("the directory was removed again and again while opening it"),
    })
}

/// Notes now as the cache's last use (the users' lock's mtime; gc evicts the least
/// recently used first).
fn touch(users_lock: &File) {
    if let Err(error) = users_lock.set_modified(SystemTime::now()) {
        tracing::debug!(%error, "cannot note the cache's last use");
    }
}

/// One image cache found under a cache directory.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CacheInfo {
    /// Its directory.
    pub dir: PathBuf,
    /// The root digest it is keyed by (the directory name).
    pub root: String,
    /// Chunk slots of the image, from the record (0 when the record is unreadable).
    pub chunks_total: u64,
    /// Chunks the record claims.
    pub chunks_recorded: u64,
    /// Bytes the cache occupies on disk.
    pub bytes_on_disk: u64,
    /// True when the last mount shut down cleanly.
    pub clean: bool,
    /// True when a mount holds it now.
    pub in_use: bool,
    /// When a mount last opened or closed it (milliseconds since the epoch; 0 when
    /// unknown).
    pub last_used_ms: u64,
}

/// Lists the image caches under `cache_dir`.
pub fn stat_dir(cache_dir: &Path) -> Result<Vec<CacheInfo>, CacheError> {
    let io_err = |error| CacheError::Io {
        path: cache_dir.to_path_buf(),
        what: "listing the cache directory",
        error,
    };
    let mut out = Vec::new();
    for e in fs::read_dir(cache_dir).map_err(io_err)? {
        let e = e.map_err(io_err)?;
        let dir = e.path();
        let rec = dir.join("record");
        if !rec.is_file() {
            continue;
        }
        let bytes = fs::read(&rec).unwrap_or_default();
        let header = record::RecordHeader::decode(&bytes);
        let recorded = bytes
            .get(record::RECORD_HEADER_LEN as usize..)
            .unwrap_or_default()
            .chunks_exact(8)
            .map(|w| w.iter().map(|b| b.count_ones() as u64).sum::<u64>())
            .sum();
        let in_use = lock::in_use(&dir);
        let last_used_ms = fs::metadata(dir.join(lock::USERS_LOCK))
            .or_else(|_| fs::metadata(&rec))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        out.push(CacheInfo {
            last_used_ms,
            root: e.file_name().to_string_lossy().into_owned(),
            chunks_total: header.map_or(0, |h| h.chunk_count),
            chunks_recorded: recorded,
            bytes_on_disk: disk_usage(&dir),
            clean: header.is_some_and(|h| h.clean),
            in_use,
            dir,
        });
    }
    out.sort_by(|a, b| a.root.cmp(&b.root));
    Ok(out)
}

/// Removes every image cache under `cache_dir` that no mount is using; returns the removed
/// directories. Caches in use are left alone and reported as an error after the rest are
/// removed.
pub fn clear_dir(cache_dir: &Path) -> Result<Vec<PathBuf>, CacheError> {
    let mut removed = Vec::new();
    let mut busy = None;
    for info in stat_dir(cache_dir)? {
        if gc::remove_unused(cache_dir, &info.dir)? {
            removed.push(info.dir);
        } else {
            busy = Some(info.dir);
        }
    }
    match busy {
        Some(path) => Err(CacheError::InUse { path }),
        None => Ok(removed),
    }
}

fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

impl Drop for ChunkCache {
    /// The last handle stops the background flush and records what is durable, but leaves
    /// the record marked unclean unless [`ChunkCache::close`] ran.
    fn drop(&mut self) {
        if Arc::strong_count(&self.flusher) != 1 {
            return;
        }
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_all();
        if let Some(h) = self.flusher.lock().take() {
            let _ = h.join();
        }
        if let Err(e) = self.shared.flush(false) {
            tracing::error!(error = %e, "flushing the chunk cache on drop failed");
        }
    }
}
