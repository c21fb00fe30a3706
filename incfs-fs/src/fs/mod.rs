//! The file system core: what the FUSE adapter ([`fuse`]) asks, answered without a mount.
//!
//! [`IncFs`] serves all metadata (lookup, getattr, readdir, readlink, statfs, xattrs) from
//! the manifest, with no round trip to the source after mount. A read works out which chunk
//! slots it covers, asks the [`Fetcher`] for the missing ones (demand priority, blocking),
//! and then reads the bytes from the backing cache. An open decides between a cached open
//! and FUSE passthrough (see [`IncFs::open`]).
//!
//! Inode numbers: manifest inode `i` is FUSE inode `i + 1` (so the root is 1). The control
//! directory `.incfs` in the root and its files `stats` and `read-log` take the three
//! numbers after the last manifest inode. `stats` is JSON ([`Stats`]); `read-log` is one JSON
//! object per line, `{"ns":…,"path":"rel/path","offset":…,"len":…,"result":"hit"|"miss"}`,
//! one per read that reached the file system (`ns`: nanoseconds since the Unix epoch).

mod cpu_follow;
pub mod fuse;
mod loader_hints;
pub mod push;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use crate::cache::fds::FdPermit;
use crate::cache::offline;
use crate::cache::{CacheError, ChunkCache, RecoveryReport};
use crate::elf;
use crate::fetch::fill::{FillConfig, FillStats, Filler};
use crate::fetch::{Completion, FetchConfig, FetchError, FetchStats, Fetcher, FileRead, ReadAhead};
use crate::format::{
    Digest, FormatError, Header, ImageHead, Inode, InodeKind, Manifest, ROOT_INODE,
    read_head_or_known,
};
use crate::plan::{PlanError, PrefetchPlan};
use crate::prefetch::{PrefetchConfig, PrefetchStats, Prefetcher};
use crate::source::{MetaReaderWithin, Source};
use crate::table::LazyTable;

/// Name of the control directory in the root.
pub const CONTROL_DIR: &str = ".incfs";
/// Name of the stats file in the control directory.
pub const STATS_FILE: &str = "stats";
/// Name of the read log in the control directory.
pub const READ_LOG_FILE: &str = "read-log";
/// Read-log entries kept in memory; older ones are dropped (and counted) beyond this. At
/// ~100 bytes an entry this bounds the log at ~50 MB, far more than a program start needs.
pub const READ_LOG_CAPACITY: usize = 500_000;

/// Keeps the image's first bytes (the first read, when it holds the whole manifest, else the
/// bytes through the manifest, read again) in its cache.
fn keep_head(
    source: &dyn Source,
    cache_dir: &std::path::Path,
    source_name: &str,
    head: &ImageHead,
) -> Result<(), std::io::Error> {
    let end = head.header.chunk_table_offset;
    if head.first.len() as u64 >= end {
        return offline::save_head(
            cache_dir,
            source_name,
            &head.header.root_digest,
            &head.first,
        );
    }
    let prefix = source
        .read_range(0, end, crate::source::RequestKind::Background)
        .map_err(std::io::Error::other)?;
    offline::save_head(cache_dir, source_name, &head.header.root_digest, &prefix)
}

/// Reads of an image's metadata that did not verify before the mount gives up.
const META_VERIFY_ATTEMPTS: u32 = 4;

/// True when reading the metadata again may succeed: transient I/O errors and bytes that
/// did not check out (a flip in transit), but not a source that cannot be used at all (an
/// HTTP 404, a range past the end).
fn retry_meta(error: &FormatError) -> bool {
    match error {
        FormatError::Io(e) => match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<crate::source::SourceError>())
        {
            Some(se) => se.is_retryable(),
            None => true,
        },
        FormatError::BadDigestText(_) => false,
        // Includes a root digest mismatch: a flipped bit in the manifest looks the same as
        // a wrong image, and a wrong image only costs a few retries.
        _ => true,
    }
}

/// Errors of the core; the FUSE adapter maps each to an errno in one place.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// No such inode or name.
    #[error("no such file or directory")]
    NotFound,
    /// The inode is not a directory.
    #[error("not a directory")]
    NotDir,
    /// The inode is a directory.
    #[error("is a directory")]
    IsDir,
    /// The inode is not a symlink.
    #[error("not a symbolic link")]
    NotSymlink,
    /// No such extended attribute.
    #[error("no such extended attribute")]
    NoXattr,
    /// The file handle is unknown.
    #[error("bad file handle {0}")]
    BadHandle(u64),
    /// A passthrough open could not be downgraded because other passthrough opens are live.
    #[error("cannot mix passthrough and cached opens of one file")]
    ModeConflict,
    /// A chunk could not be fetched (after retries) or did not verify.
    #[error("{path}: chunk {chunk_index}: {error}")]
    Fetch {
        /// The file.
        path: String,
        /// The chunk's index in the file.
        chunk_index: u64,
        /// What went wrong.
        error: FetchError,
    },
    /// The backing cache failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The image's metadata could not be read or did not verify.
    #[error("reading the image metadata from {source_name}: {error}")]
    Meta {
        /// The source.
        source_name: String,
        /// What is wrong.
        error: FormatError,
    },
    /// Starting a thread failed.
    #[error("starting the fetch workers: {0}")]
    Thread(std::io::Error),
    /// The prefetch plan does not fit the image.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The file system stopped before the read could be answered.
    #[error("the file system is shutting down")]
    ShuttingDown,
}

/// What kind of node an inode is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link.
    Symlink,
}

/// Attributes of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    /// FUSE inode number.
    pub ino: u64,
    /// Kind.
    pub kind: NodeKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub perm: u16,
    /// Link count.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time.
    pub mtime: SystemTime,
}

/// One directory entry as `readdir` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirItem {
    /// FUSE inode number.
    pub ino: u64,
    /// Offset of the entry after this one (pass it back to continue).
    pub next_offset: u64,
    /// Kind.
    pub kind: NodeKind,
    /// Name.
    pub name: Vec<u8>,
}

/// How an open file is to be served.
#[derive(Debug)]
pub enum OpenMode {
    /// Reads come to [`IncFs::read`]; the page cache is kept across opens.
    Cached,
    /// A control file: reads come to [`IncFs::read`] and bypass the page cache (its size is
    /// not known in advance).
    Direct,
    /// The whole file is local: hand this backing file to the kernel (FUSE passthrough).
    /// If the kernel refuses, call [`IncFs::passthrough_failed`] and serve it cached.
    Passthrough {
        /// The backing file, open read-only.
        file: File,
        /// The backing id's share of the descriptor budget: keep it as long as the kernel
        /// holds the id. `None` when another open of the inode is passed through already
        /// (its backing id, with its permit, is shared).
        permit: Option<FdPermit>,
    },
}

/// Tunables of a mount.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// The cache directory (the image's cache is a subdirectory named by its root digest).
    pub cache_dir: PathBuf,
    /// Refuse the image unless its root digest is this.
    pub expect_digest: Option<Digest>,
    /// The fetch scheduler's tunables.
    pub fetch: FetchConfig,
    /// Offer passthrough for fully local files.
    pub passthrough: bool,
}

impl FsConfig {
    /// Defaults with the given cache directory.
    pub fn new(cache_dir: PathBuf) -> Self {
        FsConfig {
            cache_dir,
            expect_digest: None,
            fetch: FetchConfig::default(),
            passthrough: true,
        }
    }
}

/// The counters of `.incfs/stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    /// The image's root digest.
    pub root_digest: String,
    /// The source, as it describes itself.
    pub source: String,
    /// Process id of the daemon serving the mount.
    pub pid: u32,
    /// Bytes received from the source since mount: chunks and chunk-table segments (the
    /// header and manifest read at mount are not counted).
    pub bytes_fetched: u64,
    /// Range requests sent since mount, for chunks and chunk-table segments (retries
    /// included).
    pub requests: u64,
    /// Of `bytes_fetched`: stored bytes of the fetched chunks that the program read, each
    /// chunk once (a chunk's share of its frame when frames hold several) (the rest is prefetch or read-ahead it did not use, plus table segments).
    /// Reads through a passthrough open are not seen: such an open counts its whole file.
    pub bytes_used: u64,
    /// Of `requests`: requests for chunk-table segments.
    #[serde(default)]
    pub table_requests: u64,
    /// Of `bytes_fetched`: bytes of chunk-table segments.
    #[serde(default)]
    pub table_bytes: u64,
    /// Chunk-table segments loaded (fetched, or with the first read) and verified.
    #[serde(default)]
    pub table_segments_loaded: u64,
    /// Chunk-table segments of the image.
    #[serde(default)]
    pub table_segments_total: u64,
    /// Chunks fetched and verified since mount.
    pub chunks_fetched: u64,
    /// Chunks copied from another image's cache under the same cache directory instead of
    /// fetched (`incfs_fs::cache::siblings`).
    #[serde(default)]
    pub chunks_seeded: u64,
    /// Bytes of file data in those chunks.
    #[serde(default)]
    pub bytes_seeded: u64,
    /// Chunks rebuilt from deltas against an older image the cache holds
    /// (`incfs_fs::fetch::delta`).
    #[serde(default)]
    pub chunks_from_deltas: u64,
    /// Bytes of those deltas (part of `bytes_fetched`).
    #[serde(default)]
    pub delta_bytes: u64,
    /// Chunks the background fill took from the bulk sidecar's frames
    /// (`incfs_fs::fetch::bulk`).
    #[serde(default)]
    pub chunks_from_bulk: u64,
    /// Bytes of those frames (part of `bytes_fetched`).
    #[serde(default)]
    pub bulk_bytes: u64,
    /// Chunk slots local and verified.
    pub chunks_local: u64,
    /// Chunk slots the durable record claims (lags `chunks_local` by at most one flush).
    pub chunks_durable: u64,
    /// Chunk slots of the image.
    pub chunks_total: u64,
    /// Bytes of file data held in the cache.
    #[serde(default)]
    pub bytes_cached: u64,
    /// Bytes of the cache's backing files asked to be read ahead at mount, from the order
    /// the last start opened its files in.
    #[serde(default)]
    pub bytes_warmed: u64,
    /// Reads that found at least one chunk missing.
    pub demand_misses: u64,
    /// Reads that waited for the source.
    pub blocked_reads: u64,
    /// Total time reads waited for the source, in milliseconds.
    pub blocked_ms: u64,
    /// Reads waiting for the source right now (each holds no thread while it waits).
    #[serde(default)]
    pub reads_waiting: u64,
    /// Reads answered with EIO because the source did not deliver within the retry
    /// timeout.
    #[serde(default)]
    pub reads_timed_out: u64,
    /// Failed requests plus chunks that did not verify.
    pub fetch_errors: u64,
    /// Reads that failed with EIO.
    pub read_errors: u64,
    /// Reads served by the file system (passthrough and page-cache hits never arrive).
    pub reads: u64,
    /// Opens served with FUSE passthrough.
    pub passthrough_opens: u64,
    /// Opens served through the file system.
    pub cached_opens: u64,
    /// Names looked up (a listing's entries come with their attributes, READDIRPLUS, and
    /// need none).
    #[serde(default)]
    pub lookups: u64,
    /// OPENDIR requests: one at most, the kernel opens directories itself after the first
    /// is refused ([`fuse`]).
    #[serde(default)]
    pub dir_opens: u64,
    /// Bytes of chunks local at mount pushed into the kernel's page cache at the first
    /// cached open of their file ([`push`]).
    #[serde(default)]
    pub pushed_bytes: u64,
    /// ELF files no plan covered whose loader sections were queued at their first read
    /// ([`crate::elf`]).
    #[serde(default)]
    pub loader_hint_files: u64,
    /// Bytes (file bytes, before compression) of the loader sections queued.
    #[serde(default)]
    pub loader_hint_bytes: u64,
    /// Chunks read back and checked at mount after an unclean stop (those recorded since
    /// the last checkpoint).
    #[serde(default)]
    pub recovered_rechecked: u64,
    /// Chunks re-verified and dropped at mount after an unclean stop.
    pub recovered_dropped: u64,
    /// True when the previous mount of this cache stopped uncleanly.
    pub recovered_unclean: bool,
    /// Read-log entries dropped because the log was full.
    pub read_log_dropped: u64,
    /// True when the mount started without its source (from the cache's copy of the
    /// metadata): chunks not in the cache fail with EIO.
    #[serde(default)]
    pub offline: bool,
    /// The prefetcher's counters (`prefetch_hits` among them), when a plan runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<PrefetchStats>,
    /// The background fill's counters, when it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fill: Option<FillStats>,
}

#[derive(Debug, Clone)]
struct LogEntry {
    ns: u64,
    inode: u32,
    offset: u64,
    len: u64,
    hit: bool,
}

/// One line of `.incfs/read-log`, fields in this order.
#[derive(serde::Serialize)]
struct ReadLogLine<'a> {
    ns: u64,
    path: &'a str,
    offset: u64,
    len: u64,
    result: &'static str,
}

/// What a read is of.
enum ReadTarget {
    /// A control file's bytes, already cut to the read.
    Bytes(Vec<u8>),
    /// A file of the image.
    File {
        idx: u32,
        first_chunk: u64,
        size: u64,
    },
}

/// What a control file open holds: a snapshot taken at open.
enum Handle {
    File {
        inode: u32,
        passthrough: bool,
        /// The read-ahead state of this open.
        ra: ReadAhead,
    },
    Control(Arc<Vec<u8>>),
}

#[derive(Default)]
struct OpenCounts {
    cached: u32,
    passthrough: u32,
}

#[derive(Default)]
struct Counters {
    demand_misses: AtomicU64,
    blocked_reads: AtomicU64,
    blocked_us: AtomicU64,
    read_errors: AtomicU64,
    reads: AtomicU64,
    passthrough_opens: AtomicU64,
    cached_opens: AtomicU64,
    lookups: AtomicU64,
    dir_opens: AtomicU64,
    read_log_dropped: AtomicU64,
    bytes_used: AtomicU64,
    pushed_bytes: AtomicU64,
    loader_hint_files: AtomicU64,
    loader_hint_bytes: AtomicU64,
}

/// The file system core over one image.
pub struct IncFs {
    header: Header,
    manifest: Manifest,
    table: Arc<LazyTable>,
    source_name: String,
    fetcher: Arc<Fetcher>,
    /// The plan walker, when a prefetch plan was given.
    prefetcher: Arc<OnceLock<Prefetcher>>,
    /// A published plan is on its way to a warm start ([`IncFs::start_published_prefetch`]):
    /// the fill waits for it.
    plan_pending: Arc<AtomicBool>,
    /// The background fill, when started.
    filler: OnceLock<Filler>,
    cache: ChunkCache,
    /// Parent of each directory inode (manifest index).
    parents: Vec<u32>,
    /// First path of each inode (lossy UTF-8), for logs and the read log.
    paths: Vec<Arc<str>>,
    passthrough: AtomicBool,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    opens: Mutex<HashMap<u32, OpenCounts>>,
    read_log: Mutex<Vec<LogEntry>>,
    counters: Counters,
    /// Slots the program has read (through the file system or a passthrough open), one bit
    /// each: the chunks among them fetched by this mount count in `bytes_used`.
    used: Vec<AtomicU64>,
    /// Stored chunks (frame offset, offset in frame) counted in `bytes_used`.
    used_stored: Mutex<HashSet<(u64, u32)>>,
    mount_time: SystemTime,
    /// Started without the source.
    offline: bool,
    /// The loader-hint thread's queue, once a first ELF file is seen.
    loader_hints: OnceLock<std::sync::mpsc::Sender<loader_hints::LoaderHint>>,
    /// Files whose loader sections were considered (each once).
    loader_hinted: Mutex<HashSet<u32>>,
    /// Reads waiting for the network, which the pusher keeps away from ([`push`]).
    waiting_reads: push::WaitingReads,
}

impl IncFs {
    /// Reads and verifies the image's metadata from `source`, opens its cache and starts the
    /// fetch workers. Fails when the source is unreachable or the image does not verify.
    pub fn new(source: Arc<dyn Source>, config: &FsConfig) -> Result<Self, FsError> {
        let source_name = source.describe();
        // The metadata is read again if need be, under the mount's retry policy: a reset
        // connection or a flipped bit in transit should not fail a mount. A source that is
        // down fails at the deadline.
        let mut retry = config.fetch.retry().begin();
        let mut offline = false;
        // A cache that holds this source's image needs only its header to know it is the
        // same ([`read_head_or_known`]).
        let mut known = offline::load_head(
            &config.cache_dir,
            &source_name,
            config.expect_digest.as_ref(),
        )
        .ok()
        .flatten();
        let head = loop {
            let reader = MetaReaderWithin {
                source: &*source,
                timeout: retry.timeout(),
            };
            match read_head_or_known(&reader, config.expect_digest.as_ref(), &mut known) {
                Ok(head) => break head,
                Err(error) => {
                    let attempt = retry.attempt();
                    // Bytes that did not verify are read again a few times (a flip in
                    // transit), not for the whole deadline (a wrong image stays wrong).
                    let verify_failed = !matches!(error, FormatError::Io(_));
                    match retry.next_pause() {
                        Some(pause)
                            if retry_meta(&error)
                                && !(verify_failed && attempt >= META_VERIFY_ATTEMPTS) =>
                        {
                            tracing::warn!(source = %source_name, attempt, error = %error, "reading the image metadata failed; retrying");
                            std::thread::sleep(pause);
                        }
                        _ => {
                            // The source is not there (not: it served a wrong image): start
                            // from the cache's verified copy of the metadata, if it has one.
                            if !verify_failed
                                && let Some(head) = known.take().or_else(|| {
                                    offline::load_head(
                                        &config.cache_dir,
                                        &source_name,
                                        config.expect_digest.as_ref(),
                                    )
                                    .ok()
                                    .flatten()
                                })
                            {
                                tracing::warn!(source = %source_name, error = %error, root = %head.header.root_digest, "the source is unreachable: mounting offline from the cache (chunks not in it fail with EIO)");
                                offline = true;
                                break head;
                            }
                            return Err(FsError::Meta {
                                source_name: source_name.clone(),
                                error,
                            });
                        }
                    }
                }
            }
        };
        let table =
            LazyTable::open(Arc::clone(&source), &head, config.fetch.retry()).map_err(|error| {
                FsError::Meta {
                    source_name: source_name.clone(),
                    error,
                }
            })?;
        let table = Arc::new(table);
        // Keep the metadata for a later start without the source (best effort: a cache that
        // cannot keep it still serves this mount).
        let root = head.header.root_digest;
        match offline::TableStore::open(&config.cache_dir, &root, head.header.chunk_table_len) {
            Ok(store) => {
                table.attach_store(store, &head.first);
            }
            Err(error) => {
                tracing::warn!(%error, "cannot keep the chunk table in the cache; an offline start will not find it")
            }
        }
        if !offline && let Err(error) = keep_head(&*source, &config.cache_dir, &source_name, &head)
        {
            tracing::warn!(%error, "cannot keep the image metadata in the cache; an offline start will not find it");
        }
        let ImageHead {
            header, manifest, ..
        } = head;
        let cache = ChunkCache::open(&config.cache_dir, &header.root_digest, &manifest, &table)?;
        let used_words = table.len().div_ceil(64);
        let fetcher = Fetcher::new(
            source,
            header.data_offset,
            &manifest.dictionaries,
            Arc::clone(&table),
            cache.clone(),
            config.fetch.clone(),
        )
        .map_err(FsError::Thread)?;
        let fetcher = Arc::new(fetcher);
        let n = manifest.inodes.len();
        let mut parents = vec![ROOT_INODE; n];
        let mut paths: Vec<Arc<str>> = vec![Arc::from(""); n];
        let mut named = vec![false; n];
        for (path, inode) in manifest.walk() {
            if let Some(InodeKind::Dir { entries }) =
                manifest.inodes.get(inode as usize).map(|i| &i.kind)
            {
                for e in entries {
                    if let Some(p) = parents.get_mut(e.inode as usize) {
                        *p = inode;
                    }
                }
            }
            if !std::mem::replace(&mut named[inode as usize], true) {
                paths[inode as usize] = Arc::from(String::from_utf8_lossy(&path).as_ref());
            }
        }
        if let Some(InodeKind::Dir { entries }) = manifest.inodes.first().map(|i| &i.kind) {
            for e in entries {
                if let (Some(p), Some(InodeKind::Dir { .. })) = (
                    parents.get_mut(e.inode as usize),
                    manifest.inodes.get(e.inode as usize).map(|i| &i.kind),
                ) {
                    *p = ROOT_INODE;
                }
            }
        }
        tracing::info!(
            root = %header.root_digest,
            source = %source_name,
            cache = %cache.dir().display(),
            inodes = n,
            chunks = table.len(),
            local = cache.local_chunks(),
            "image opened"
        );
        Ok(IncFs {
            header,
            manifest,
            table,
            source_name,
            fetcher,
            prefetcher: Arc::new(OnceLock::new()),
            plan_pending: Arc::new(AtomicBool::new(false)),
            filler: OnceLock::new(),
            cache,
            parents,
            paths,
            passthrough: AtomicBool::new(config.passthrough),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            opens: Mutex::new(HashMap::new()),
            read_log: Mutex::new(Vec::new()),
            counters: Counters::default(),
            used: (0..used_words).map(|_| AtomicU64::new(0)).collect(),
            used_stored: Mutex::new(HashSet::new()),
            mount_time: SystemTime::now(),
            offline,
            loader_hints: OnceLock::new(),
            loader_hinted: Mutex::new(HashSet::new()),
            waiting_reads: push::WaitingReads::default(),
        })
    }

    /// Starts walking `plan` (read from `plan_path`, named in errors) ahead of the program.
    /// Refuses a plan made for another image, or one naming files or chunks the image lacks.
    /// Call it once, before mounting, so prefetch starts before the program does.
    pub fn start_prefetch(
        &self,
        plan: &PrefetchPlan,
        plan_path: &std::path::Path,
        config: PrefetchConfig,
    ) -> Result<(), FsError> {
        plan.check_image(plan_path, &self.header.root_digest)?;
        let slots = plan.slots(plan_path, &self.manifest)?;
        let p = Prefetcher::start(
            Arc::clone(&self.fetcher),
            Arc::clone(&self.table),
            &slots,
            config,
        )
        .map_err(FsError::Thread)?;
        self.prefetcher.set(p).map_err(|_| {
            FsError::Plan(PlanError::Invalid {
                path: plan_path.to_path_buf(),
                reason: "a prefetch plan is already running on this mount".into(),
            })
        })?;
        // Started as the unmount began (a plan that arrived late): the unmount may not have
        // seen it to stop it.
        if self.fetcher.is_shut_down()
            && let Some(p) = self.prefetcher.get()
        {
            p.stop();
        }
        Ok(())
    }

    /// Starts the plan published beside the image, fetched by `fetched`
    /// ([`crate::plan::spawn_published`], started before the mount).
    /// Never fails the mount, nor waits for a source the mount found unreachable: a plan
    /// that is absent starts nothing; one that cannot be
    /// fetched, does not parse or is for another image is logged and skipped, and the mount
    /// goes on without a plan. A first start (nothing of the image local yet) waits for the
    /// plan, which should lead it; a start from a cache that holds part of the image does
    /// not — its program starts at once and the plan is walked when it arrives (a plan of
    /// 400 KB is 160 ms at 20 Mbit/s, longer than such a start's own work). True when a plan
    /// runs, or may once it has arrived.
    pub fn start_published_prefetch(
        self: &Arc<Self>,
        fetched: crate::plan::PublishedFetch,
        config: PrefetchConfig,
    ) -> bool {
        if self.offline {
            // Started from the cache with the source unreachable: not waited for.
            return false;
        }
        let pending = Some(Arc::clone(&self.plan_pending));
        self.when_fetched(
            "incfs-plan-start",
            fetched,
            pending,
            move |fs, got| match got {
                Ok(got) => fs.start_published_plan(got, config),
                Err(_) => {
                    tracing::warn!("no prefetch plan: fetching the one beside the image failed");
                    false
                }
            },
        )
    }

    /// Hands what `fetched` (a sidecar's fetch, started before the mount) gives to `then`:
    /// at once, waiting for it, on a first start (nothing of the image local), which the
    /// sidecar should lead; else on a thread of its own, so the program does not wait, and
    /// only while the mount is not going. `pending` is set meanwhile. True when `then` said
    /// so, or is to run.
    fn when_fetched<T: Send + 'static>(
        self: &Arc<Self>,
        name: &str,
        fetched: std::thread::JoinHandle<T>,
        pending: Option<Arc<AtomicBool>>,
        then: impl FnOnce(&IncFs, std::thread::Result<T>) -> bool + Send + 'static,
    ) -> bool {
        if self.cache.local_chunks() == 0 {
            return then(self, fetched.join());
        }
        let fs = Arc::downgrade(self);
        let set = |flag: &Option<Arc<AtomicBool>>, on: bool| {
            if let Some(f) = flag {
                f.store(on, Ordering::Release);
            }
        };
        set(&pending, true);
        let flag = pending.clone();
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let got = fetched.join();
                if let Some(fs) = fs.upgrade().filter(|fs| !fs.fetcher.is_shut_down()) {
                    then(&fs, got);
                }
                set(&flag, false);
            })
            .is_ok();
        if !spawned {
            set(&pending, false);
        }
        spawned
    }

    fn start_published_plan(
        &self,
        got: Result<Option<crate::plan::Published>, crate::source::SourceError>,
        config: PrefetchConfig,
    ) -> bool {
        let (path, bytes) = match got {
            Ok(Some(p)) => p,
            Ok(None) => return false,
            Err(error) => {
                tracing::warn!(%error, "no prefetch plan: the one beside the image cannot be fetched");
                return false;
            }
        };
        let started = PrefetchPlan::parse(&path, &bytes)
            .map_err(FsError::Plan)
            .and_then(|plan| self.start_prefetch(&plan, &path, config));
        match started {
            Ok(()) => {
                tracing::info!(plan = %path.display(), "prefetching the plan published beside the image");
                true
            }
            Err(error) => {
                tracing::warn!(%error, "ignoring the plan published beside the image");
                false
            }
        }
    }

    /// Takes the deltas [`crate::fetch::delta::spawn_fetch`] fetched beside the image, when
    /// they are for this image, so chunks the cached older image can rebuild come as deltas.
    /// Call it before [`IncFs::start_prefetch`], so the plan's chunks use them. A start with
    /// nothing of this image local (an update's first start) waits for them; one whose cache
    /// holds part of the image takes them when they arrive, and its program does not wait
    /// for the sidecar's round trips. True when they are used, or may be once they arrive.
    pub fn use_deltas(self: &Arc<Self>, fetched: crate::fetch::delta::DeltaFetch) -> bool {
        if self.offline {
            return false;
        }
        self.when_fetched("incfs-deltas-use", fetched, None, |fs, got| {
            fs.take_fetched_deltas(got)
        })
    }

    fn take_fetched_deltas(
        &self,
        got: std::thread::Result<
            Result<Option<(crate::fetch::delta::Deltas, Digest)>, crate::source::SourceError>,
        >,
    ) -> bool {
        match got {
            Ok(Ok(Some((deltas, image)))) if image == self.header.root_digest => {
                self.fetcher.use_deltas(deltas);
                true
            }
            Ok(Ok(Some((_, image)))) => {
                tracing::warn!(%image, "ignoring the deltas beside the image: they are for another image");
                false
            }
            Ok(Ok(None)) => false,
            Ok(Err(error)) => {
                tracing::warn!(%error, "no deltas: the sidecar beside the image cannot be used");
                false
            }
            Err(_) => false,
        }
    }

    /// Names the source spec the image was opened from (its path or URL): the background
    /// fill, when it starts with chunks left to fetch, reads the bulk sidecar beside it
    /// (`SPEC.bulk`, [`crate::fetch::bulk`]) and fetches its large frames instead of the
    /// image's own when it is this image's. A cache that holds everything never asks for it.
    pub fn use_bulk(&self, source_spec: &str, retry: &crate::retry::RetryPolicy) {
        if !self.offline {
            self.fetcher
                .expect_bulk(source_spec, retry, self.header.root_digest);
        }
    }

    /// Starts fetching the rest of the image in the background, at the lowest priority:
    /// after the prefetch plan has been fetched when one runs (call [`IncFs::start_prefetch`]
    /// or [`IncFs::start_published_prefetch`] first; a published plan still on its way is
    /// waited for), at once otherwise. Call it once.
    pub fn start_fill(&self, config: FillConfig) -> Result<(), FsError> {
        let fetcher = Arc::clone(&self.fetcher);
        let (pending, prefetcher) = (Arc::clone(&self.plan_pending), Arc::clone(&self.prefetcher));
        let f = Arc::clone(&self.fetcher);
        // A plan still on its way (a warm start's published plan) is waited for too; it
        // comes within the plan's deadline or not at all.
        let ready: Box<dyn Fn() -> bool + Send> = Box::new(move || {
            !pending.load(Ordering::Acquire)
                && prefetcher.get().is_none_or(|p| {
                    p.plan_queued_probe()() && f.idle_at(crate::fetch::Priority::Prefetch)
                })
        });
        let filler = Filler::start(fetcher, config, ready).map_err(FsError::Thread)?;
        if self.filler.set(filler).is_err() {
            tracing::warn!("the background fill was already running");
        }
        Ok(())
    }

    /// The background fill's counters, when it runs.
    pub fn fill_stats(&self) -> Option<FillStats> {
        self.filler.get().map(Filler::stats)
    }

    /// The prefetcher's counters, when a plan is running.
    pub fn prefetch_stats(&self) -> Option<PrefetchStats> {
        self.prefetcher.get().map(Prefetcher::stats)
    }

    /// The image's root digest.
    pub fn root_digest(&self) -> Digest {
        self.header.root_digest
    }

    /// The fetch scheduler (for a prefetcher to [`Fetcher::submit`] to).
    pub fn fetcher(&self) -> &Fetcher {
        &self.fetcher
    }

    /// The backing cache.
    pub fn cache(&self) -> &ChunkCache {
        &self.cache
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Turns passthrough off (the kernel does not offer it, or refuses it to this user).
    /// True when it was on until now.
    pub fn disable_passthrough(&self) -> bool {
        self.passthrough.swap(false, Ordering::Relaxed)
    }

    /// At unmount: stops the prefetcher and the fetch scheduler (requests in flight are
    /// abandoned, blocked reads fail), then records everything in the cache and marks it
    /// cleanly shut down.
    pub fn shutdown(&self) -> Result<(), FsError> {
        if let Some(p) = self.prefetcher.get() {
            p.stop();
        }
        if let Some(f) = self.filler.get() {
            f.stop();
        }
        self.fetcher.shutdown();
        self.cache.close()?;
        Ok(())
    }

    fn control_ino(&self) -> u64 {
        self.manifest.inodes.len() as u64 + 1
    }
    fn stats_ino(&self) -> u64 {
        self.control_ino() + 1
    }
    fn read_log_ino(&self) -> u64 {
        self.control_ino() + 2
    }

    fn inode(&self, ino: u64) -> Result<(u32, &Inode), FsError> {
        let idx = ino
            .checked_sub(1)
            .and_then(|i| u32::try_from(i).ok())
            .ok_or(FsError::NotFound)?;
        self.manifest
            .inodes
            .get(idx as usize)
            .map(|i| (idx, i))
            .ok_or(FsError::NotFound)
    }

    fn control_attr(&self, ino: u64) -> Attr {
        let dir = ino == self.control_ino();
        Attr {
            ino,
            kind: if dir { NodeKind::Dir } else { NodeKind::File },
            size: 0,
            perm: if dir { 0o555 } else { 0o444 },
            nlink: if dir { 2 } else { 1 },
            uid: 0,
            gid: 0,
            mtime: self.mount_time,
        }
    }

    /// Attributes of `ino`.
    pub fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        if (self.control_ino()..=self.read_log_ino()).contains(&ino) {
            return Ok(self.control_attr(ino));
        }
        let (_, inode) = self.inode(ino)?;
        let (kind, size) = match &inode.kind {
            InodeKind::Dir { entries } => (NodeKind::Dir, entries.len() as u64),
            InodeKind::File { size, .. } => (NodeKind::File, *size),
            InodeKind::Symlink { target } => (NodeKind::Symlink, target.len() as u64),
        };
        let mtime = if inode.mtime_sec >= 0 {
            UNIX_EPOCH + Duration::new(inode.mtime_sec as u64, inode.mtime_nsec.min(999_999_999))
        } else {
            UNIX_EPOCH - Duration::from_secs(inode.mtime_sec.unsigned_abs())
        };
        Ok(Attr {
            ino,
            kind,
            size,
            perm: (inode.perm & 0o7777) as u16,
            nlink: inode.nlink.max(1),
            uid: inode.uid,
            gid: inode.gid,
            mtime,
        })
    }

    /// Counts an OPENDIR request ([`Stats::dir_opens`]).
    pub fn count_dir_open(&self) {
        self.counters.dir_opens.fetch_add(1, Ordering::Relaxed);
    }

    /// Looks `name` up in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr, FsError> {
        self.counters.lookups.fetch_add(1, Ordering::Relaxed);
        if parent == self.control_ino() {
            return match name {
                b"stats" => Ok(self.control_attr(self.stats_ino())),
                b"read-log" => Ok(self.control_attr(self.read_log_ino())),
                _ => Err(FsError::NotFound),
            };
        }
        if parent == 1 && name == CONTROL_DIR.as_bytes() {
            return Ok(self.control_attr(self.control_ino()));
        }
        let (_, inode) = self.inode(parent)?;
        let InodeKind::Dir { entries } = &inode.kind else {
            return Err(FsError::NotDir);
        };
        let e = entries
            .binary_search_by(|e| e.name.as_slice().cmp(name))
            .map_err(|_| FsError::NotFound)?;
        self.getattr(u64::from(entries[e].inode) + 1)
    }

    /// Entries of directory `ino` from `offset` (0 to start): `.`, `..`, then the entries
    /// (and `.incfs` in the root).
    pub fn readdir(&self, ino: u64, offset: u64) -> Result<Vec<DirItem>, FsError> {
        let mut all: Vec<(u64, NodeKind, Vec<u8>)> = Vec::new();
        if ino == self.control_ino() {
            all.push((ino, NodeKind::Dir, b".".to_vec()));
            all.push((1, NodeKind::Dir, b"..".to_vec()));
            all.push((self.stats_ino(), NodeKind::File, STATS_FILE.into()));
            all.push((self.read_log_ino(), NodeKind::File, READ_LOG_FILE.into()));
        } else {
            let (idx, inode) = self.inode(ino)?;
            let InodeKind::Dir { entries } = &inode.kind else {
                return Err(FsError::NotDir);
            };
            all.push((ino, NodeKind::Dir, b".".to_vec()));
            all.push((
                u64::from(self.parents[idx as usize]) + 1,
                NodeKind::Dir,
                b"..".to_vec(),
            ));
            if idx == ROOT_INODE {
                all.push((self.control_ino(), NodeKind::Dir, CONTROL_DIR.into()));
            }
            for e in entries {
                let kind = match self.manifest.inodes.get(e.inode as usize).map(|i| &i.kind) {
                    Some(InodeKind::Dir { .. }) => NodeKind::Dir,
                    Some(InodeKind::Symlink { .. }) => NodeKind::Symlink,
                    _ => NodeKind::File,
                };
                all.push((u64::from(e.inode) + 1, kind, e.name.clone()));
            }
        }
        Ok(all
            .into_iter()
            .enumerate()
            .skip(offset as usize)
            .map(|(i, (ino, kind, name))| DirItem {
                ino,
                next_offset: i as u64 + 1,
                kind,
                name,
            })
            .collect())
    }

    /// The target of symlink `ino`.
    pub fn readlink(&self, ino: u64) -> Result<&[u8], FsError> {
        match &self.inode(ino)?.1.kind {
            InodeKind::Symlink { target } => Ok(target),
            _ => Err(FsError::NotSymlink),
        }
    }

    /// The value of extended attribute `name` of `ino`.
    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<&[u8], FsError> {
        if ino > self.manifest.inodes.len() as u64 {
            return Err(FsError::NoXattr);
        }
        let (_, inode) = self.inode(ino)?;
        inode
            .xattrs
            .iter()
            .find(|x| x.name == name)
            .map(|x| x.value.as_slice())
            .ok_or(FsError::NoXattr)
    }

    /// The names of `ino`'s extended attributes, each followed by a NUL.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        if ino > self.manifest.inodes.len() as u64 {
            return Ok(Vec::new());
        }
        let (_, inode) = self.inode(ino)?;
        let mut out = Vec::new();
        for x in &inode.xattrs {
            out.extend_from_slice(&x.name);
            out.push(0);
        }
        Ok(out)
    }

    /// File system totals for statfs: (blocks of 4 KiB holding the file data, inodes).
    pub fn statfs(&self) -> (u64, u64) {
        let bytes: u64 = self
            .manifest
            .inodes
            .iter()
            .map(|i| match i.kind {
                InodeKind::File { size, .. } => size,
                _ => 0,
            })
            .sum();
        (bytes.div_ceil(4096), self.manifest.inodes.len() as u64)
    }

    /// Opens `ino` for reading. Passthrough is chosen only when it is enabled, the whole
    /// file is local and verified, and no cached open of the inode is live (the kernel fails
    /// opens whose io modes disagree); a file already open in passthrough mode stays so.
    /// Returns the file handle and the mode.
    pub fn open(&self, ino: u64) -> Result<(u64, OpenMode), FsError> {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        if ino == self.stats_ino() || ino == self.read_log_ino() {
            let content = if ino == self.stats_ino() {
                let mut s = serde_json::to_vec_pretty(&self.stats()).unwrap_or_default();
                s.push(b'\n');
                s
            } else {
                self.read_log_ndjson()
            };
            self.handles
                .lock()
                .insert(fh, Handle::Control(Arc::new(content)));
            return Ok((fh, OpenMode::Direct));
        }
        let (idx, inode) = self.inode(ino)?;
        match inode.kind {
            InodeKind::File { .. } => {}
            InodeKind::Dir { .. } => return Err(FsError::IsDir),
            InodeKind::Symlink { .. } => return Err(FsError::NotFound),
        }
        let mut opens = self.opens.lock();
        let c = opens.entry(idx).or_default();
        let want_pt = c.passthrough > 0
            || (c.cached == 0
                && self.passthrough.load(Ordering::Relaxed)
                && self.cache.file_complete(idx));
        // A new backing id needs a share of the descriptor budget; a live one is shared.
        let permit = if want_pt && c.passthrough == 0 {
            self.cache.passthrough_permit()
        } else {
            None
        };
        let mode = if want_pt && c.passthrough == 0 && permit.is_none() {
            tracing::debug!(
                inode = idx,
                "the descriptor budget is spent on passthrough; serving the file cached"
            );
            OpenMode::Cached
        } else if want_pt && self.file_size(idx) > 0 {
            match self.cache.open_backing(idx) {
                Ok(file) => OpenMode::Passthrough { file, permit },
                Err(e) if c.passthrough == 0 => {
                    tracing::warn!(error = %e, "passthrough unavailable; serving the file cached");
                    OpenMode::Cached
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            OpenMode::Cached
        };
        let passthrough = matches!(mode, OpenMode::Passthrough { .. });
        self.cache.opened(idx, passthrough);
        if passthrough {
            // Reads through this open bypass the file system: count the whole file as read.
            if let InodeKind::File { size, first_chunk } = inode.kind {
                self.mark_used(first_chunk..first_chunk + self.manifest.chunks_for(size));
            }
            c.passthrough += 1;
            self.counters
                .passthrough_opens
                .fetch_add(1, Ordering::Relaxed);
        } else {
            c.cached += 1;
            self.counters.cached_opens.fetch_add(1, Ordering::Relaxed);
        }
        drop(opens);
        self.handles.lock().insert(
            fh,
            Handle::File {
                inode: idx,
                passthrough,
                ra: ReadAhead::default(),
            },
        );
        Ok((fh, mode))
    }

    /// The kernel refused passthrough for handle `fh`: serve it cached instead, if no other
    /// passthrough open of the inode is live.
    pub fn passthrough_failed(&self, fh: u64) -> Result<(), FsError> {
        let mut handles = self.handles.lock();
        let Some(Handle::File {
            inode, passthrough, ..
        }) = handles.get_mut(&fh)
        else {
            return Err(FsError::BadHandle(fh));
        };
        let mut opens = self.opens.lock();
        let c = opens.entry(*inode).or_default();
        if *passthrough {
            if c.passthrough > 1 {
                return Err(FsError::ModeConflict);
            }
            c.passthrough -= 1;
            c.cached += 1;
            *passthrough = false;
            self.counters
                .passthrough_opens
                .fetch_sub(1, Ordering::Relaxed);
            self.counters.cached_opens.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Closes handle `fh`.
    pub fn release(&self, fh: u64) {
        if let Some(Handle::File {
            inode, passthrough, ..
        }) = self.handles.lock().remove(&fh)
        {
            let mut opens = self.opens.lock();
            if let Some(c) = opens.get_mut(&inode) {
                if passthrough {
                    c.passthrough = c.passthrough.saturating_sub(1);
                } else {
                    c.cached = c.cached.saturating_sub(1);
                }
                if c.passthrough == 0 && c.cached == 0 {
                    opens.remove(&inode);
                }
            }
        }
    }

    fn file_size(&self, idx: u32) -> u64 {
        match self.manifest.inodes.get(idx as usize).map(|i| &i.kind) {
            Some(InodeKind::File { size, .. }) => *size,
            _ => 0,
        }
    }

    /// Reads up to `size` bytes at `offset` of the file open as `fh` (inode `ino`), fetching
    /// and verifying missing chunks first; blocks until they are there. Never returns
    /// unverified bytes. (The FUSE adapter uses [`IncFs::read_then`], which blocks no thread.)
    pub fn read(
        self: &Arc<Self>,
        ino: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, FsError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.read_then(ino, fh, offset, size, move |r| {
            let _ = tx.send(r);
        });
        rx.recv().unwrap_or(Err(FsError::ShuttingDown))
    }

    /// Reads up to `size` bytes at `offset` of the file open as `fh` (inode `ino`) and hands
    /// them to `reply`: at once, on this thread, when the chunks are local; otherwise from
    /// the fetch worker that stored the last of them (or with the error that stopped it).
    /// What to fetch besides the read itself is the scheduler's decision
    /// ([`crate::fetch::readahead`]); this keeps the handle's state and answers.
    pub fn read_then(
        self: &Arc<Self>,
        ino: u64,
        fh: u64,
        offset: u64,
        size: u32,
        reply: impl FnOnce(Result<Vec<u8>, FsError>) + Send + 'static,
    ) {
        let (idx, first_chunk, fsize) = match self.read_target(ino, fh, offset, size) {
            Ok(ReadTarget::File {
                idx,
                first_chunk,
                size,
            }) => (idx, first_chunk, size),
            Ok(ReadTarget::Bytes(b)) => return reply(Ok(b)),
            Err(e) => return reply(Err(e)),
        };
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        if offset >= fsize || size == 0 {
            return reply(Ok(Vec::new()));
        }
        let end = offset.saturating_add(u64::from(size)).min(fsize);
        let cs = u64::from(self.manifest.chunk_size);
        let first = first_chunk + offset / cs;
        let last = first_chunk + (end - 1) / cs;
        let hit = (first..=last).all(|s| self.cache.is_local(s));
        self.log_read(idx, offset, end - offset, hit);
        let planned = match self.prefetcher.get() {
            Some(p) => {
                p.on_read(first_chunk, first - first_chunk, last - first_chunk, hit);
                (first..=last).all(|s| p.is_planned(s))
            }
            None => false,
        };
        let waiting = if hit {
            None
        } else {
            self.counters.demand_misses.fetch_add(1, Ordering::Relaxed);
            self.counters.blocked_reads.fetch_add(1, Ordering::Relaxed);
            Some(self.waiting_reads.begin(ino, offset..end))
        };
        let read = FileRead {
            first_slot: first_chunk,
            chunk_size: cs,
            file_size: fsize,
            range: offset..end,
            amplify: !planned,
        };
        let started = Instant::now();
        let fs = Arc::clone(self);
        let done: Completion = Box::new(move |r: Result<(), FetchError>| {
            if !hit {
                fs.counters
                    .blocked_us
                    .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
            let result = fs.finish_read(idx, first_chunk, first..last + 1, offset..end, r);
            // The ELF header, when this is a file's first bytes and no plan knows the file.
            let head = match &result {
                Ok(b) if offset == 0 && !planned && b.len() >= elf::HEADER_LEN => {
                    let mut h = [0u8; elf::HEADER_LEN];
                    h.copy_from_slice(&b[..elf::HEADER_LEN]);
                    Some(h)
                }
                _ => None,
            };
            reply(result);
            if let Some(token) = waiting {
                fs.waiting_reads.end(ino, token);
            }
            if let Some(h) = head {
                fs.hint_loader(idx, first_chunk, fsize, &h);
            }
        });
        // Taken out for the call: the scheduler may answer at once (all local), and the
        // answer must not find the handles locked.
        let mut ra = match self.handles.lock().get_mut(&fh) {
            Some(Handle::File { ra, .. }) => std::mem::take(ra),
            _ => ReadAhead::default(),
        };
        self.fetcher.read(&read, &mut ra, done);
        if let Some(Handle::File { ra: kept, .. }) = self.handles.lock().get_mut(&fh) {
            *kept = ra;
        }
    }

    /// What a read is of: a control file's snapshot, or a file of the image.
    fn read_target(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<ReadTarget, FsError> {
        let control = match self.handles.lock().get(&fh) {
            Some(Handle::Control(c)) => Some(Arc::clone(c)),
            Some(Handle::File { .. }) => None,
            None if ino == self.stats_ino() || ino == self.read_log_ino() => {
                return Err(FsError::BadHandle(fh));
            }
            None => None,
        };
        if let Some(c) = control {
            let start = (offset as usize).min(c.len());
            let end = start.saturating_add(size as usize).min(c.len());
            return Ok(ReadTarget::Bytes(c[start..end].to_vec()));
        }
        let (idx, inode) = self.inode(ino)?;
        let InodeKind::File {
            size: fsize,
            first_chunk,
        } = inode.kind
        else {
            return Err(FsError::IsDir);
        };
        Ok(ReadTarget::File {
            idx,
            first_chunk,
            size: fsize,
        })
    }

    /// The bytes of a read whose chunks are local (or the error that kept them away).
    fn finish_read(
        &self,
        idx: u32,
        first_chunk: u64,
        slots: std::ops::Range<u64>,
        range: std::ops::Range<u64>,
        fetched: Result<(), FetchError>,
    ) -> Result<Vec<u8>, FsError> {
        if let Err(error) = fetched {
            self.counters.read_errors.fetch_add(1, Ordering::Relaxed);
            let err = FsError::Fetch {
                path: self.paths[idx as usize].to_string(),
                chunk_index: error.slot.saturating_sub(first_chunk),
                error,
            };
            tracing::error!(error = %err, "read failed");
            return Err(err);
        }
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        self.cache.read(idx, range.start, &mut buf)?;
        self.mark_used(slots);
        Ok(buf)
    }

    /// Records that the program read `slots`; those this mount fetched count, once each,
    /// at their stored size in `bytes_used`.
    fn mark_used(&self, slots: std::ops::Range<u64>) {
        for slot in slots {
            let Some(w) = self.used.get((slot / 64) as usize) else {
                return;
            };
            let bit = 1u64 << (slot % 64);
            if w.load(Ordering::Relaxed) & bit != 0 || !self.fetcher.fetched(slot) {
                continue;
            }
            // Identical chunks share stored bytes: count each stored chunk once.
            if w.fetch_or(bit, Ordering::Relaxed) & bit == 0
                && let Some(e) = self.table.get(slot)
                && self
                    .used_stored
                    .lock()
                    .insert((e.stored_offset, e.frame_offset))
            {
                self.counters
                    .bytes_used
                    .fetch_add(e.stored_share(), Ordering::Relaxed);
            }
        }
    }

    fn log_read(&self, inode: u32, offset: u64, len: u64, hit: bool) {
        let ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut log = self.read_log.lock();
        if log.len() >= READ_LOG_CAPACITY {
            self.counters
                .read_log_dropped
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        log.push(LogEntry {
            ns,
            inode,
            offset,
            len,
            hit,
        });
    }

    /// The read log as NDJSON.
    pub fn read_log_ndjson(&self) -> Vec<u8> {
        let log = self.read_log.lock().clone();
        let mut out = Vec::with_capacity(log.len() * 96);
        for e in log {
            let line = ReadLogLine {
                ns: e.ns,
                path: &self.paths[e.inode as usize],
                offset: e.offset,
                len: e.len,
                result: if e.hit { "hit" } else { "miss" },
            };
            if serde_json::to_writer(&mut out, &line).is_ok() {
                out.push(b'\n');
            }
        }
        out
    }

    /// The counters now.
    pub fn stats(&self) -> Stats {
        let f: FetchStats = self.fetcher.stats();
        let t = self.table.stats();
        let c = &self.counters;
        let rec: RecoveryReport = self.cache.recovery();
        Stats {
            root_digest: self.header.root_digest.to_hex(),
            source: self.source_name.clone(),
            pid: std::process::id(),
            bytes_fetched: f.bytes_fetched + t.bytes,
            requests: f.requests + t.requests,
            bytes_used: c.bytes_used.load(Ordering::Relaxed),
            table_requests: t.requests,
            table_bytes: t.bytes,
            table_segments_loaded: t.segments_loaded,
            table_segments_total: t.segments_total,
            chunks_fetched: f.chunks_fetched,
            chunks_seeded: self.cache.seeded().0,
            bytes_seeded: self.cache.seeded().1,
            chunks_from_deltas: f.delta_chunks,
            delta_bytes: f.delta_bytes,
            chunks_from_bulk: f.bulk_chunks,
            bulk_bytes: f.bulk_bytes,
            chunks_local: self.cache.local_chunks(),
            chunks_durable: self.cache.durable_chunks(),
            chunks_total: self.table.len(),
            bytes_cached: self.cache.local_bytes(),
            bytes_warmed: self.cache.warmed_bytes(),
            demand_misses: c.demand_misses.load(Ordering::Relaxed),
            blocked_reads: c.blocked_reads.load(Ordering::Relaxed),
            blocked_ms: c.blocked_us.load(Ordering::Relaxed) / 1000,
            reads_waiting: self.fetcher.waiting() as u64,
            reads_timed_out: f.reads_timed_out,
            fetch_errors: f.fetch_errors,
            read_errors: c.read_errors.load(Ordering::Relaxed),
            reads: c.reads.load(Ordering::Relaxed),
            passthrough_opens: c.passthrough_opens.load(Ordering::Relaxed),
            cached_opens: c.cached_opens.load(Ordering::Relaxed),
            lookups: c.lookups.load(Ordering::Relaxed),
            dir_opens: c.dir_opens.load(Ordering::Relaxed),
            pushed_bytes: c.pushed_bytes.load(Ordering::Relaxed),
            loader_hint_files: c.loader_hint_files.load(Ordering::Relaxed),
            loader_hint_bytes: c.loader_hint_bytes.load(Ordering::Relaxed),
            recovered_rechecked: rec.rechecked,
            recovered_dropped: rec.dropped,
            recovered_unclean: rec.unclean,
            read_log_dropped: c.read_log_dropped.load(Ordering::Relaxed),
            offline: self.offline,
            prefetch: self.prefetch_stats(),
            fill: self.fill_stats(),
        }
    }
}
