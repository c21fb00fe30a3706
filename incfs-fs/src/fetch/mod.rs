//! The fetch scheduler: brings chunks from the source into the cache, verified, and decides
//! what to ask for.
//!
//! One scheduler per mount, with three queues in strict priority order: demand (a reader is
//! waiting), prefetch (the plan or a sequential reader's window asked), background (the fill
//! of the rest of the image). Readers do not block a thread while they wait: a read hands
//! [`Fetcher::read`] a completion, which runs on the worker thread that stored the last chunk
//! it needed (or at once, when everything is local), so FUSE replies are sent when the data
//! is there and a slow miss holds no FUSE thread. [`Fetcher::fetch`] is the blocking form.
//!
//! **What is asked for.** The read-ahead policy ([`readahead`]) adds, per open file, the
//! rest of a small file and a window that grows while access stays sequential. A demand
//! miss that no plan covers is widened in stored order over the chunks that follow it, up to
//! [`FetchConfig::miss_amplify_bytes`] (Nydus's `amplify_io`), since a start that faults a
//! page of a library usually faults its neighbours next. A plan on an image that was not
//! laid out for it has hundreds of separate runs of planned chunks: where the source takes
//! several ranges in one request (an HTTP server answering multi-range requests), up to
//! [`FetchConfig::ranges_per_request`] runs and [`FetchConfig::multi_range_bytes`] share
//! one request and its round trip; elsewhere a prefetch request bridges gaps of up to
//! [`FetchConfig::bridge_gap_bytes`] between planned chunks (fetching the gap too), so the
//! plan travels as fewer, longer requests. An ELF file no plan
//! covers has the sections the dynamic loader will read queued at its first read ([`elf`]).
//! The background fill's batches are asked for as the large frames of the bulk sidecar
//! published beside the image, when there is one ([`bulk`]).
//!
//! **Workers.** [`FetchConfig::workers`] threads take the first slot of the highest
//! non-empty queue and extend it with the chunks that follow it in the image's data section,
//! up to [`FetchConfig::max_request_bytes`], so adjacent missing chunks travel as one range
//! request; many requests are in flight at once, so a plan's scattered ranges pay their
//! round trips in parallel. [`FetchConfig::demand_workers`] of them serve only demand, so a
//! miss never waits behind a prefetch; at most [`FetchConfig::background_requests`]
//! background requests are in flight, so the fill never takes the link from a reader.
//! A chunk whose table entry is not loaded yet has its segment loaded by a worker, at the
//! priority of the read that needs it, never on the reader's thread.
//!
//! A slot is queued or in flight at most once: concurrent readers of one chunk cause one
//! fetch. Every chunk is decoded and checked against its digest ([`chunk_of_frame`]) before
//! it is stored; bytes that do not match are never stored or returned. Failed requests and
//! chunks that do not verify are retried under the mount's [`RetryPolicy`] (jittered
//! backoff, each request bounded by the time left before [`FetchConfig::retry_timeout`]);
//! then the slot fails and its waiters get a [`FetchError`]. A waiter is also answered with
//! an error once it has waited [`FetchConfig::retry_timeout`], whatever the source does, and
//! a worker that panics fails its slots instead of leaving them in flight.

pub mod bulk;
pub mod delta;
pub mod fill;
pub mod readahead;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::cache::ChunkCache;
use crate::format::{ChunkEntry, Dictionaries, Dictionary, chunk_of_frame, decode_frame};
use crate::retry::RetryPolicy;
use crate::source::{RequestKind, Source, read_within};
use crate::table::LazyTable;

pub use readahead::{ReadAhead, ReadAheadConfig};

/// How long a failed slot stays failed: requests for it within this time fail at once
/// instead of fetching again. Covers the kernel's own immediate retry of a failed page read,
/// and is short enough that a program trying again a second later reaches the source.
pub const FAILURE_MEMO: Duration = Duration::from_millis(500);

/// Tunables of the scheduler.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Worker threads, so requests in flight at most. Default 16: requests are I/O-bound
    /// (a worker mostly waits for its round trip), and a plan on an image not laid out for
    /// it has hundreds of separate ranges whose round trips should overlap.
    pub workers: usize,
    /// Of `workers`, those that serve demand only (at least 1). Default 4: a start rarely
    /// has more misses outstanding than it has threads.
    pub demand_workers: usize,
    /// Background (fill) requests in flight at most. Default 2: one alone leaves the link
    /// idle for a round trip between requests (clang's lazy start: 10.4 s with one, 7.3 s
    /// with two at 20 ms / 100 Mbit/s); a demand request shares the link with at most two.
    pub background_requests: usize,
    /// Largest range request, in stored bytes. Default 8 MiB: large enough that a request's
    /// fixed cost (one round trip) is small next to its transfer on a 100 Mbit link.
    pub max_request_bytes: u64,
    /// Largest background request, in stored bytes. Default 1 MiB (~80 ms at 100 Mbit/s):
    /// a demand miss that arrives while one is in flight shares the link only that long.
    pub background_request_bytes: u64,
    /// Stored bytes a demand miss that no plan covers is widened by, over the chunks that
    /// follow it in the data section and are not local. Default 256 KiB, chosen by
    /// measurement (BENCHMARKS.md, "Fast without a plan"): clang's lazy start blocks 1.6×
    /// less often than at 128 KiB without the fill, and larger values gain nothing with it.
    pub miss_amplify_bytes: u64,
    /// Largest gap, in stored bytes, between two queued prefetch chunks that one request
    /// bridges (fetching the gap's chunks too), where the source takes one range per
    /// request. Default 16 KiB, chosen by measurement (BENCHMARKS.md, "Fast without a
    /// plan"): clang's plan on the pack layout takes 2.2× fewer requests than without
    /// bridging and moves 1.3× its bytes; wider gaps move more bytes than the round trips
    /// they save. Where the source takes several ranges per request, runs share requests
    /// instead and no gap is bridged (bridging 4 KiB gaps there made the same start 1.07×
    /// slower: BENCHMARKS.md, "Multi-range requests").
    pub bridge_gap_bytes: u64,
    /// Most separate runs of planned chunks asked for in one request, where the source
    /// takes several ranges in one ([`Source::ranges_per_request`]; 1 turns grouping off).
    /// Default 64, chosen by measurement (BENCHMARKS.md, "Multi-range requests").
    pub ranges_per_request: usize,
    /// Stored bytes at which a prefetch request stops taking more runs. Default 256 KiB
    /// (BENCHMARKS.md, "Multi-range requests"): a request's ranges arrive in image order, not
    /// in the plan's, so a request should be short next to the start it feeds.
    pub multi_range_bytes: u64,
    /// The per-file read-ahead policy.
    pub readahead: ReadAheadConfig,
    /// When a file no plan covers turns out to be an ELF library or executable at its
    /// first read, queue the sections the dynamic loader reads ([`elf`]) at prefetch
    /// priority. Default on.
    pub loader_hints: bool,
    /// Attempts per request before its chunks fail. Default 20 ([`RetryPolicy`]).
    pub max_attempts: u32,
    /// Wait before the first retry; doubles each time, jittered. Default 50 ms.
    pub initial_backoff: Duration,
    /// Longest wait between retries. Default 1 s.
    pub max_backoff: Duration,
    /// Longest time spent on one request's chunks, every attempt and pause included, before
    /// they fail (restarted when an attempt stores some of them), and longest time a reader
    /// waits before it gets an error. Default 10 s ([`crate::retry::DEFAULT_DEADLINE`],
    /// which explains the choice).
    pub retry_timeout: Duration,
}

impl FetchConfig {
    /// The mount's one retry policy (for the scheduler, chunk-table segments and the
    /// metadata at mount): `retry_timeout` is its deadline.
    pub fn retry(&self) -> RetryPolicy {
        RetryPolicy {
            deadline: self.retry_timeout,
            max_attempts: self.max_attempts,
            initial_backoff: self.initial_backoff,
            max_backoff: self.max_backoff,
        }
    }
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            workers: 16,
            demand_workers: 4,
            background_requests: 2,
            max_request_bytes: 8 * 1024 * 1024,
            background_request_bytes: 1024 * 1024,
            miss_amplify_bytes: 256 * 1024,
            bridge_gap_bytes: 16 * 1024,
            ranges_per_request: 64,
            multi_range_bytes: 256 * 1024,
            readahead: ReadAheadConfig::default(),
            loader_hints: true,
            max_attempts: RetryPolicy::default().max_attempts,
            initial_backoff: RetryPolicy::default().initial_backoff,
            max_backoff: RetryPolicy::default().max_backoff,
            retry_timeout: RetryPolicy::default().deadline,
        }
    }
}

/// Why a chunk is wanted, highest priority first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// A reader is blocked on it.
    Demand = 0,
    /// The prefetch plan or a sequential reader's window names it.
    Prefetch = 1,
    /// Anything else (background fill).
    Background = 2,
}

impl Priority {
    fn kind(self) -> RequestKind {
        match self {
            Priority::Demand => RequestKind::Demand,
            Priority::Prefetch => RequestKind::Prefetch,
            Priority::Background => RequestKind::Background,
        }
    }
}

/// A chunk could not be brought in.
#[derive(Debug, Clone, thiserror::Error)]
#[error("chunk slot {slot}: {reason}")]
pub struct FetchError {
    /// The slot.
    pub slot: u64,
    /// The last error seen.
    pub reason: Arc<str>,
}

/// What runs when a read's chunks are local (`Ok`) or cannot be had (`Err`).
pub type Completion = Box<dyn FnOnce(Result<(), FetchError>) + Send>;

/// A read of one file, as the scheduler needs to know it.
#[derive(Debug, Clone)]
pub struct FileRead {
    /// The file's first chunk slot.
    pub first_slot: u64,
    /// The image's chunk size.
    pub chunk_size: u64,
    /// The file's size.
    pub file_size: u64,
    /// The bytes read (within the file).
    pub range: Range<u64>,
    /// Widen a miss over the chunks that follow it (no plan covers this read).
    pub amplify: bool,
}

impl FileRead {
    /// The slots holding file bytes `range`.
    fn slots(&self, range: &Range<u64>) -> Range<u64> {
        let end = range.end.min(self.file_size);
        if range.start >= end || self.chunk_size == 0 {
            return self.first_slot..self.first_slot;
        }
        self.first_slot + range.start / self.chunk_size
            ..self.first_slot + (end - 1) / self.chunk_size + 1
    }
}

/// Counters of the scheduler.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct FetchStats {
    /// Bytes received from the source.
    pub bytes_fetched: u64,
    /// Range requests sent (retries included).
    pub requests: u64,
    /// Chunks fetched, verified and stored.
    pub chunks_fetched: u64,
    /// Failed requests plus chunks that did not verify.
    pub fetch_errors: u64,
    /// Chunks given up on after retries.
    pub chunks_failed: u64,
    /// Reads answered with an error because they waited longer than the retry timeout.
    pub reads_timed_out: u64,
    /// Chunks rebuilt from deltas against an image the cache holds ([`delta`]).
    pub delta_chunks: u64,
    /// Bytes of those deltas (counted in `bytes_fetched` too).
    pub delta_bytes: u64,
    /// Chunks the fill took from the bulk sidecar's frames ([`bulk`]).
    pub bulk_chunks: u64,
    /// Bytes of those frames (counted in `bytes_fetched` too).
    pub bulk_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    /// Waiting for its chunk-table entry, at this priority.
    NeedsEntry(Priority),
    /// Queued at this priority (`true`: a demand miss that may be widened).
    Queued(Priority, bool),
    InFlight,
}

/// A reader waiting for slots.
struct Waiter {
    /// The first slot it waits for (named in a timeout's error).
    first: u64,
    /// Slots not local yet.
    remaining: usize,
    deadline: Instant,
    done: Completion,
}

/// What a worker does next.
enum Job {
    /// Load the table entries of these slots, then queue them at the priority.
    Entries(Vec<u64>, Priority),
    /// Fetch this batch of stored-adjacent slots.
    Chunks(Vec<u64>, Priority),
}

#[derive(Default)]
struct State {
    slots: HashMap<u64, SlotState>,
    queues: [VecDeque<u64>; 3],
    entry_queues: [VecDeque<u64>; 3],
    /// Slots that failed, with why and when: a new request for one within
    /// [`FAILURE_MEMO`] fails at once.
    failed: HashMap<u64, (Arc<str>, Instant)>,
    /// Requests in flight by priority.
    in_flight: [usize; 3],
    waiters: HashMap<u64, Waiter>,
    /// Waiter ids by the slot they wait for.
    slot_waiters: HashMap<u64, Vec<u64>>,
    deadlines: BTreeSet<(Instant, u64)>,
    next_waiter: u64,
}

struct Inner {
    source: Arc<dyn Source>,
    data_offset: u64,
    table: Arc<LazyTable>,
    cache: ChunkCache,
    config: FetchConfig,
    state: Mutex<State>,
    /// Wakes workers when work is queued.
    work: Condvar,
    /// Wakes the deadline thread when a waiter is added.
    timer: Condvar,
    shutdown: AtomicBool,
    bytes_fetched: AtomicU64,
    requests: AtomicU64,
    chunks_fetched: AtomicU64,
    fetch_errors: AtomicU64,
    chunks_failed: AtomicU64,
    reads_timed_out: AtomicU64,
    /// Slots fetched and stored by this scheduler, one bit each.
    fetched: Vec<AtomicU64>,
    /// Stored offset of the latest demand request, plus one (0: none yet): where the
    /// program reads now, which the background fill follows.
    last_demand: AtomicU64,
    /// The image's zstd dictionaries, each fetched once before the first frame that needs
    /// it is decoded.
    dictionaries: Dictionaries,
    /// Deltas against an image the cache holds, once fetched ([`delta`]).
    deltas: std::sync::OnceLock<delta::Deltas>,
    delta_chunks: AtomicU64,
    delta_bytes: AtomicU64,
    /// Where the bulk sidecar is, with the image's root digest ([`Fetcher::expect_bulk`]),
    /// until the fill takes it up; then the sidecar.
    bulk_spec: Mutex<Option<(String, RetryPolicy, crate::format::Digest)>>,
    bulk: std::sync::OnceLock<bulk::Bulk>,
    /// Bulk requests that failed in a row; at [`MAX_BULK_FAILURES`] the sidecar is dropped.
    bulk_failures: AtomicU32,
    bulk_chunks: AtomicU64,
    bulk_bytes: AtomicU64,
}

/// Failed bulk requests in a row after which the fill fetches the image's own frames only:
/// a sidecar that vanished or keeps failing must not cost every batch a timeout.
const MAX_BULK_FAILURES: u32 = 3;

/// The scheduler. Dropping it stops the workers and answers every waiter.
pub struct Fetcher {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
}

impl Fetcher {
    /// Starts a scheduler that reads chunks of `table` (whose data section starts at
    /// `data_offset`, and whose frames may name the zstd `dictionaries` the manifest lists)
    /// from `source` into `cache`.
    pub fn new(
        source: Arc<dyn Source>,
        data_offset: u64,
        dictionaries: &[Dictionary],
        table: Arc<LazyTable>,
        cache: ChunkCache,
        config: FetchConfig,
    ) -> std::io::Result<Self> {
        let n = config.workers.max(2);
        let demand = config.demand_workers.clamp(1, n - 1);
        let words = table.len().div_ceil(64);
        let inner = Arc::new(Inner {
            source,
            data_offset,
            table,
            cache,
            config,
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            timer: Condvar::new(),
            shutdown: AtomicBool::new(false),
            bytes_fetched: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            chunks_fetched: AtomicU64::new(0),
            fetch_errors: AtomicU64::new(0),
            chunks_failed: AtomicU64::new(0),
            reads_timed_out: AtomicU64::new(0),
            fetched: (0..words).map(|_| AtomicU64::new(0)).collect(),
            last_demand: AtomicU64::new(0),
            dictionaries: Dictionaries::new(dictionaries),
            deltas: std::sync::OnceLock::new(),
            delta_chunks: AtomicU64::new(0),
            delta_bytes: AtomicU64::new(0),
            bulk_spec: Mutex::new(None),
            bulk: std::sync::OnceLock::new(),
            bulk_failures: AtomicU32::new(0),
            bulk_chunks: AtomicU64::new(0),
            bulk_bytes: AtomicU64::new(0),
        });
        let mut threads = Vec::with_capacity(n + 1);
        for i in 0..n {
            let inner = Arc::clone(&inner);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("incfs-fetch-{i}"))
                    .spawn(move || inner.worker(i < demand))?,
            );
        }
        let timer = Arc::clone(&inner);
        threads.push(
            std::thread::Builder::new()
                .name("incfs-fetch-deadlines".into())
                .spawn(move || timer.deadlines())?,
        );
        Ok(Fetcher { inner, threads })
    }

    /// Fetches the dictionaries the frames of `slots` name that are not loaded yet, at
    /// background priority, retrying like a chunk: the fill does so before its first batch.
    pub fn load_dictionaries(&self, slots: &[u64]) -> Result<(), String> {
        let mut policy = self.inner.config.retry().begin();
        loop {
            match self
                .inner
                .load_dictionaries(slots, Priority::Background, policy.timeout())
            {
                Ok(()) => return Ok(()),
                Err((_, why)) => match policy.next_pause() {
                    Some(p) if !self.is_shut_down() => std::thread::sleep(p),
                    _ => return Err(why),
                },
            }
        }
    }

    /// Queues the slots that are not local at `priority` (raising the priority of slots
    /// already queued lower). Returns once their chunk-table entries are loaded: slots
    /// whose entries could not be loaded are left out (and logged). For threads that may
    /// block (the prefetcher, the fill); a reader uses [`Fetcher::read`].
    pub fn submit(&self, slots: &[u64], priority: Priority) {
        // Nothing more is queued, nor copied into the cache, once the mount is going.
        if self.is_shut_down() {
            return;
        }
        if let Err(e) = self.inner.table.load(slots, priority.kind()) {
            tracing::warn!(error = %e, "not queueing chunks whose table entries did not load");
        }
        // Chunks another image's cache holds are copied here, before they are queued, so a
        // plan's requests are not cut into pieces around them in a worker.
        let slots = self.inner.seed(slots.to_vec());
        let mut st = self.inner.state.lock();
        if self.inner.queue(&mut st, &slots, priority, false) {
            self.inner.work.notify_all();
        }
    }

    /// A read of `file`: queues its missing chunks at demand priority and what the
    /// read-ahead policy (state `ra` of the reader's open file) adds, and calls `done` once
    /// the read's own chunks are local — at once, on this thread, when they already are.
    pub fn read(&self, file: &FileRead, ra: &mut ReadAhead, done: Completion) {
        let inner = &self.inner;
        let own = file.slots(&file.range);
        let hit = own.clone().all(|s| inner.cache.is_local(s));
        let ahead = ra.on_read(
            &inner.config.readahead,
            file.range.clone(),
            file.file_size,
            hit,
        );
        let ahead_slots = file.slots(&ahead);
        // The rest of a small file rides in the miss's request; a sequential window is a
        // request of its own (it is wanted later, not now).
        let small_file_rest = ahead.start == file.range.end.min(file.file_size)
            && ahead.end == file.file_size
            && file.file_size <= inner.config.readahead.small_file;
        let ahead_priority = if small_file_rest {
            Priority::Demand
        } else {
            Priority::Prefetch
        };
        let own: Vec<u64> = own.collect();
        let ahead: Vec<u64> = ahead_slots.filter(|s| !own.contains(s)).collect();
        self.wait_for(
            &own,
            Priority::Demand,
            file.amplify,
            &ahead,
            ahead_priority,
            done,
        );
    }

    /// Takes `slots` off the queue where they wait at `priority` (not those a reader has
    /// asked for since, nor those in flight): the prefetcher's window moved past them.
    pub fn unqueue(&self, slots: &[u64], priority: Priority) {
        let mut st = self.inner.state.lock();
        for slot in slots {
            if matches!(st.slots.get(slot), Some(SlotState::Queued(p, _)) if *p == priority)
                && !st.slot_waiters.contains_key(slot)
            {
                // Its queue entry goes stale and is skipped.
                st.slots.remove(slot);
            }
        }
    }

    /// Fetches the slots that are not local at `priority` and blocks until all are local,
    /// or returns the first failure.
    pub fn fetch(&self, slots: &[u64], priority: Priority) -> Result<(), FetchError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.wait_for(
            slots,
            priority,
            false,
            &[],
            priority,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv().unwrap_or_else(|_| {
            Err(FetchError {
                slot: slots.first().copied().unwrap_or(0),
                reason: "the file system is shutting down".into(),
            })
        })
    }

    /// Queues `slots` (and `ahead`, not waited for) and calls `done` when `slots` are local.
    fn wait_for(
        &self,
        slots: &[u64],
        priority: Priority,
        amplify: bool,
        ahead: &[u64],
        ahead_priority: Priority,
        done: Completion,
    ) {
        let inner = &self.inner;
        let mut st = inner.state.lock();
        let a = inner.queue(&mut st, slots, priority, amplify);
        let b = inner.queue(&mut st, ahead, ahead_priority, false);
        if a || b {
            inner.work.notify_all();
        }
        if inner.shutdown.load(Ordering::Acquire) {
            drop(st);
            return done(Err(FetchError {
                slot: slots.first().copied().unwrap_or(0),
                reason: "the file system is shutting down".into(),
            }));
        }
        let mut remaining = Vec::new();
        for &slot in slots {
            if inner.cache.is_local(slot) {
                continue;
            }
            if let Some((reason, _)) = st.failed.get(&slot) {
                let reason = Arc::clone(reason);
                drop(st);
                return done(Err(FetchError { slot, reason }));
            }
            if slot >= inner.table.len() {
                drop(st);
                return done(Err(FetchError {
                    slot,
                    reason: "no such chunk slot".into(),
                }));
            }
            remaining.push(slot);
        }
        remaining.dedup();
        if remaining.is_empty() {
            drop(st);
            return done(Ok(()));
        }
        let id = st.next_waiter;
        st.next_waiter += 1;
        let deadline = Instant::now() + inner.config.retry_timeout;
        for &slot in &remaining {
            st.slot_waiters.entry(slot).or_default().push(id);
        }
        st.waiters.insert(
            id,
            Waiter {
                first: remaining[0],
                remaining: remaining.len(),
                deadline,
                done,
            },
        );
        let earliest = st.deadlines.first().is_none_or(|(d, _)| deadline < *d);
        st.deadlines.insert((deadline, id));
        if earliest {
            inner.timer.notify_all();
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> FetchStats {
        let i = &self.inner;
        FetchStats {
            bytes_fetched: i.bytes_fetched.load(Ordering::Relaxed),
            requests: i.requests.load(Ordering::Relaxed),
            chunks_fetched: i.chunks_fetched.load(Ordering::Relaxed),
            fetch_errors: i.fetch_errors.load(Ordering::Relaxed),
            chunks_failed: i.chunks_failed.load(Ordering::Relaxed),
            reads_timed_out: i.reads_timed_out.load(Ordering::Relaxed),
            delta_chunks: i.delta_chunks.load(Ordering::Relaxed),
            delta_bytes: i.delta_bytes.load(Ordering::Relaxed),
            bulk_chunks: i.bulk_chunks.load(Ordering::Relaxed),
            bulk_bytes: i.bulk_bytes.load(Ordering::Relaxed),
        }
    }

    /// From now on, chunks that have a delta in `deltas` are fetched as that delta when the
    /// base image's cache holds its window ([`delta`]). Once per mount; later calls are
    /// ignored.
    pub fn use_deltas(&self, deltas: delta::Deltas) {
        tracing::info!(chunks = deltas.len(), base = %deltas.base_root, "chunks this cache's older image can rebuild come as deltas");
        let _ = self.inner.deltas.set(deltas);
    }

    /// The image whose root digest is `root` was opened from `source_spec`: the fill may
    /// take up the bulk sidecar beside it ([`Fetcher::take_up_bulk`]).
    pub fn expect_bulk(&self, source_spec: &str, retry: &RetryPolicy, root: crate::format::Digest) {
        *self.inner.bulk_spec.lock() = Some((source_spec.to_string(), *retry, root));
    }

    /// Reads the bulk sidecar beside the image [`Fetcher::expect_bulk`] named (in a thread,
    /// polling `stopped` so an unmount never waits for it) and, when it is usable for this
    /// image, asks for background batches as its frames from now on. True when it is used.
    pub fn take_up_bulk(&self, stopped: &dyn Fn() -> bool) -> bool {
        let Some((spec, retry, root)) = self.inner.bulk_spec.lock().take() else {
            return self.inner.bulk.get().is_some();
        };
        let Some(fetch) = bulk::spawn_fetch(&spec, &retry) else {
            return false;
        };
        while !fetch.is_finished() {
            if stopped() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let fetched = match fetch.join() {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) | Err(_) => return false,
            Ok(Err(error)) => {
                tracing::warn!(%error, "the background fill fetches the image's own frames: the bulk sidecar cannot be read");
                return false;
            }
        };
        match bulk::Bulk::new(fetched, &root, self.inner.table.len()) {
            Ok(b) => {
                tracing::info!(sidecar = %b.spec, frames = b.len(), "the background fill fetches the bulk sidecar's frames");
                let _ = self.inner.bulk.set(b);
                true
            }
            Err(error) => {
                tracing::warn!(%error, "the background fill fetches the image's own frames");
                false
            }
        }
    }

    /// True when this scheduler fetched and stored `slot` (since it started).
    pub fn fetched(&self, slot: u64) -> bool {
        self.inner
            .fetched
            .get((slot / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (slot % 64)) != 0)
    }

    /// Reads waiting for chunks now.
    pub fn waiting(&self) -> usize {
        self.inner.state.lock().waiters.len()
    }

    /// Slots queued or in flight now.
    pub fn pending(&self) -> usize {
        self.inner.state.lock().slots.len()
    }

    /// True when nothing is queued or in flight at `priority` or above.
    pub fn idle_at(&self, priority: Priority) -> bool {
        let st = self.inner.state.lock();
        (0..=priority as usize).all(|p| {
            st.in_flight[p] == 0 && st.queues[p].is_empty() && st.entry_queues[p].is_empty()
        })
    }

    /// The cache this scheduler fills.
    pub fn cache(&self) -> &ChunkCache {
        &self.inner.cache
    }

    /// The chunk table it fetches by.
    pub fn table(&self) -> &Arc<LazyTable> {
        &self.inner.table
    }

    /// The scheduler's tunables.
    pub fn config(&self) -> &FetchConfig {
        &self.inner.config
    }

    /// Stored offset (in the data section) of the latest demand request, if any.
    pub fn last_demand_offset(&self) -> Option<u64> {
        self.inner
            .last_demand
            .load(Ordering::Relaxed)
            .checked_sub(1)
    }

    /// True once the scheduler is shutting down.
    pub fn is_shut_down(&self) -> bool {
        self.inner.shutdown.load(Ordering::Acquire)
    }
}

impl Fetcher {
    /// Stops the scheduler (at unmount): workers take no more work, a request in flight
    /// stops at its next piece, retries and table loads stop, and every waiter gets an
    /// error. Returns at once; dropping the scheduler waits (briefly) for the workers.
    pub fn shutdown(&self) {
        self.inner.shutdown.store(true, Ordering::Release);
        self.inner.table.cancel();
        let waiting: Vec<Waiter> = {
            let mut st = self.inner.state.lock();
            self.inner.work.notify_all();
            self.inner.timer.notify_all();
            st.slot_waiters.clear();
            st.deadlines.clear();
            st.waiters.drain().map(|(_, w)| w).collect()
        };
        for w in waiting {
            (w.done)(Err(FetchError {
                slot: w.first,
                reason: "the file system is shutting down".into(),
            }));
        }
    }
}

/// How long dropping the fill or the prefetcher waits for its thread: one that is inside a
/// request (the fill loading dictionaries over a slow link) has been told to stop and ends
/// when the request does; a process that is done (`incfs run` after its command) should not
/// wait for that.
pub(crate) const THREAD_JOIN_WAIT: Duration = Duration::from_millis(10);

/// Joins `thread` if it ends within `wait`; else leaves it to end by itself (it must have
/// been told to stop) and says so at debug level.
pub(crate) fn join_within(thread: JoinHandle<()>, wait: Duration) {
    let deadline = Instant::now() + wait;
    while !thread.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    if thread.is_finished() {
        let _ = thread.join();
    } else {
        tracing::debug!(
            thread = thread.thread().name().unwrap_or("?"),
            "still inside a request at shutdown; not waiting for it"
        );
    }
}

/// How long dropping a [`Fetcher`] waits for its workers: a worker stuck in a request that
/// sends nothing more is left to end by itself (by its timeout), so unmounting never waits
/// for a stalled server.
const WORKER_JOIN_WAIT: Duration = Duration::from_millis(300);

impl Drop for Fetcher {
    fn drop(&mut self) {
        self.shutdown();
        // The last owner may be a completion running on a worker: it cannot wait for itself
        // (that worker ends on its own once it sees the shutdown).
        let me = std::thread::current().id();
        let others = |t: &JoinHandle<()>| t.thread().id() != me;
        let deadline = Instant::now() + WORKER_JOIN_WAIT;
        while Instant::now() < deadline
            && self.threads.iter().any(|t| others(t) && !t.is_finished())
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let stuck = self
            .threads
            .iter()
            .filter(|t| others(t) && !t.is_finished())
            .count();
        if stuck > 0 {
            tracing::debug!(
                stuck,
                "fetch workers still in a request at shutdown; not waiting for them"
            );
        }
        for t in self
            .threads
            .drain(..)
            .filter(|t| others(t) && t.is_finished())
        {
            let _ = t.join();
        }
    }
}

impl Inner {
    /// Queues the slots that are not local at `priority`; true when any was added. When
    /// some of them lack their table entry, all of them wait for a worker to load the
    /// entries, so they still travel together.
    fn queue(&self, st: &mut State, slots: &[u64], priority: Priority, amplify: bool) -> bool {
        let all_entries = slots
            .iter()
            .all(|&s| s >= self.table.len() || self.table.get(s).is_some());
        let mut added = false;
        for &slot in slots {
            if slot >= self.table.len() || self.cache.is_local(slot) {
                continue;
            }
            // A slot that failed just now fails again at once: the kernel retries a failed
            // page read by itself straight away, which would otherwise wait out a second
            // deadline before the reader sees its EIO.
            if st
                .failed
                .get(&slot)
                .is_some_and(|(_, at)| at.elapsed() < FAILURE_MEMO)
            {
                continue;
            }
            st.failed.remove(&slot);
            match st.slots.get(&slot) {
                Some(SlotState::InFlight) => continue,
                Some(SlotState::Queued(p, a))
                    if *p < priority || (*p == priority && *a >= amplify) =>
                {
                    continue;
                }
                Some(SlotState::NeedsEntry(p)) if *p <= priority => continue,
                _ => {}
            }
            if all_entries {
                st.slots.insert(slot, SlotState::Queued(priority, amplify));
                st.queues[priority as usize].push_back(slot);
            } else {
                st.slots.insert(slot, SlotState::NeedsEntry(priority));
                st.entry_queues[priority as usize].push_back(slot);
            }
            added = true;
        }
        added
    }

    fn worker(&self, demand_only: bool) {
        loop {
            let job = {
                let mut st = self.state.lock();
                loop {
                    if self.shutdown.load(Ordering::Acquire) {
                        return;
                    }
                    if let Some(job) = self.pick(&mut st, demand_only) {
                        break job;
                    }
                    self.work.wait(&mut st);
                }
            };
            let (slots, priority) = match &job {
                Job::Entries(s, p) | Job::Chunks(s, p) => (s.clone(), *p),
            };
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| match job {
                Job::Entries(slots, p) => self.load_entries(slots, p),
                Job::Chunks(batch, p) => self.run(batch, p),
            }));
            let mut st = self.state.lock();
            st.in_flight[priority as usize] -= 1;
            // Freeing a background place may let more work start.
            self.work.notify_all();
            drop(st);
            if r.is_err() {
                tracing::error!(
                    slots = slots.len(),
                    "a fetch worker panicked; failing its chunks"
                );
                let still: Vec<u64> = {
                    let st = self.state.lock();
                    slots
                        .iter()
                        .copied()
                        .filter(|s| matches!(st.slots.get(s), Some(SlotState::InFlight)))
                        .collect()
                };
                self.fail(&still, "the fetch worker handling it failed");
            }
        }
    }

    /// The next job: table entries to load or a run of stored-adjacent chunks, highest
    /// priority first; marks its slots in flight.
    fn pick(&self, st: &mut State, demand_only: bool) -> Option<Job> {
        let prios: &[Priority] = if demand_only {
            &[Priority::Demand]
        } else {
            &[Priority::Demand, Priority::Prefetch, Priority::Background]
        };
        for &p in prios {
            if p == Priority::Background
                && st.in_flight[p as usize] >= self.config.background_requests.max(1)
            {
                continue;
            }
            let job = self
                .pick_entries(st, p)
                .map(|s| Job::Entries(s, p))
                .or_else(|| self.pick_chunks(st, p).map(|b| Job::Chunks(b, p)));
            if job.is_some() {
                st.in_flight[p as usize] += 1;
                return job;
            }
        }
        None
    }

    /// Every slot queued at `p` for its table entry.
    fn pick_entries(&self, st: &mut State, p: Priority) -> Option<Vec<u64>> {
        let mut out = Vec::new();
        while let Some(slot) = st.entry_queues[p as usize].pop_front() {
            if st.slots.get(&slot) == Some(&SlotState::NeedsEntry(p)) {
                st.slots.insert(slot, SlotState::InFlight);
                out.push(slot);
            }
        }
        (!out.is_empty()).then_some(out)
    }

    /// Takes the next queued slot at `p` and the chunks that follow it in stored order:
    /// queued ones at `p` or above; for a demand miss that may be widened, any that are not
    /// local up to the amplification budget; for prefetch, gaps up to the bridge size
    /// between queued ones.
    ///
    /// At prefetch priority, when the source takes several ranges in one request, further
    /// runs are taken the same way (up to [`FetchConfig::ranges_per_request`] and
    /// [`FetchConfig::multi_range_bytes`]): the batch is then fetched as one multi-range
    /// request ([`Inner::run`]).
    fn pick_chunks(&self, st: &mut State, p: Priority) -> Option<Vec<u64>> {
        let limit = if p == Priority::Background {
            self.config.background_request_bytes
        } else {
            self.config.max_request_bytes
        };
        let (mut batch, mut bytes) = self.pick_run(st, p, limit)?;
        if p == Priority::Prefetch {
            let max_runs = self.runs_per_request();
            let mut runs = 1;
            while runs < max_runs && bytes < self.config.multi_range_bytes {
                let Some((more, n)) = self.pick_run(st, p, limit.saturating_sub(bytes)) else {
                    break;
                };
                batch.extend(more);
                bytes += n;
                runs += 1;
            }
        }
        Some(batch)
    }

    /// Runs one request may carry: what the configuration allows and the source takes.
    fn runs_per_request(&self) -> usize {
        self.config
            .ranges_per_request
            .min(self.source.ranges_per_request())
    }

    /// One run of [`Inner::pick_chunks`]: the next queued slot at `p` and what follows it,
    /// up to `limit` stored bytes; with its stored bytes.
    fn pick_run(&self, st: &mut State, p: Priority, limit: u64) -> Option<(Vec<u64>, u64)> {
        // Runs share requests where the source allows it; bridging gaps only pays for a
        // round trip elsewhere.
        let bridge_gap = if self.runs_per_request() > 1 {
            0
        } else {
            self.config.bridge_gap_bytes
        };
        while let Some(first) = st.queues[p as usize].pop_front() {
            let amplify = match st.slots.get(&first) {
                Some(SlotState::Queued(q, a)) if *q == p => *a,
                _ => continue, // stale entry: raised, in flight or done
            };
            if self.cache.is_local(first) {
                st.slots.remove(&first);
                continue;
            }
            let Some(first_entry) = self.table.get(first) else {
                st.slots.remove(&first);
                continue;
            };
            st.slots.insert(first, SlotState::InFlight);
            if p == Priority::Demand {
                self.last_demand
                    .store(first_entry.stored_offset + 1, Ordering::Relaxed);
            }
            if p == Priority::Background
                && let Some((b, k)) = self
                    .usable_bulk()
                    .and_then(|b| Some((b, b.frame_of(first)?)))
            {
                return Some(self.take_bulk_frames(st, b, first, k, limit));
            }
            let mut batch = vec![first];
            let mut amplify_left = if amplify {
                self.config.miss_amplify_bytes
            } else {
                0
            };
            // Wanted at `p` or sooner.
            let wanted = |st: &State, s: u64| {
                s == first || matches!(st.slots.get(&s), Some(SlotState::Queued(q, _)) if *q <= p)
            };
            // Neither local nor queued or in flight anywhere: free to take along.
            let free = |st: &State, s: u64| !st.slots.contains_key(&s) && !self.cache.is_local(s);
            // Held by another image's cache: copied, not fetched, so a request widened or
            // bridged over it would be cut in two (see `seed`).
            let held = |s: u64| {
                self.table
                    .get(s)
                    .is_some_and(|e| self.cache.sibling_holds(&e))
            };
            let mut at = first_entry.stored_offset;
            let mut bytes = 0u64;
            loop {
                let here = self.table.slots_at(at);
                let Some(len) = here
                    .first()
                    .and_then(|s| self.table.get(*s))
                    .map(|e| u64::from(e.stored_len))
                else {
                    break;
                };
                if bytes > 0 && bytes + len > limit {
                    break;
                }
                let take = if here.iter().any(|&s| wanted(st, s)) {
                    true
                } else if amplify_left >= len
                    && here.iter().any(|&s| free(st, s))
                    && !here.iter().all(|&s| held(s))
                {
                    amplify_left -= len;
                    true
                } else if p == Priority::Prefetch && bridge_gap > 0 {
                    // Bridge to the next wanted chunk if it is near.
                    let mut gap = 0u64;
                    let mut probe = at;
                    let mut found = false;
                    while gap <= bridge_gap {
                        let slots = self.table.slots_at(probe);
                        let Some(l) = slots
                            .first()
                            .and_then(|s| self.table.get(*s))
                            .map(|e| u64::from(e.stored_len))
                        else {
                            break;
                        };
                        if slots.iter().any(|&s| wanted(st, s)) {
                            found = gap > 0;
                            break;
                        }
                        if slots.iter().any(|&s| {
                            matches!(st.slots.get(&s), Some(SlotState::InFlight)) || held(s)
                        }) {
                            break;
                        }
                        gap += l;
                        probe += l;
                    }
                    found && bytes + gap <= limit
                } else {
                    false
                };
                if !take {
                    break;
                }
                // A frame comes whole: take every chunk of it that is neither local nor in
                // flight, asked for or not, so it is stored now rather than fetched again.
                for s in here {
                    if s == first || self.cache.is_local(s) {
                        continue;
                    }
                    match st.slots.get(&s) {
                        Some(SlotState::InFlight) | Some(SlotState::NeedsEntry(_)) => {}
                        _ => {
                            st.slots.insert(s, SlotState::InFlight);
                            batch.push(s);
                        }
                    }
                }
                bytes += len;
                at += len;
            }
            return Some((batch, bytes.max(u64::from(first_entry.stored_len))));
        }
        None
    }

    /// Loads the table entries of `slots`, then queues them at `p`; a load that fails fails
    /// them. Below demand priority (a read-ahead window, a plan) the entries of as many slots
    /// again after them are loaded in the same request, so the next window finds its entries
    /// there.
    fn load_entries(&self, slots: Vec<u64>, p: Priority) {
        let mut want = slots.clone();
        if p != Priority::Demand
            && let (Some(&lo), Some(&hi)) = (slots.iter().min(), slots.iter().max())
        {
            let n = (hi - lo + 1).max(slots.len() as u64);
            want.extend(hi + 1..(hi + 1 + n).min(self.table.len()));
        }
        match self.table.load(&want, p.kind()) {
            Ok(()) => {
                // Chunks another image's cache holds become local here (and are released
                // below), before the rest are queued.
                for &slot in &slots {
                    if let Some(e) = self.table.get(slot) {
                        self.cache.seed(slot, &e);
                    }
                }
                let mut st = self.state.lock();
                let mut local = Vec::new();
                for &slot in &slots {
                    if st.slots.get(&slot) != Some(&SlotState::InFlight) {
                        continue;
                    }
                    st.slots.remove(&slot);
                    if self.cache.is_local(slot) {
                        local.push(slot);
                    }
                }
                self.queue(&mut st, &slots, p, p == Priority::Demand);
                self.work.notify_all();
                drop(st);
                self.release(&local);
            }
            Err(e) => self.fail(&slots, &e.to_string()),
        }
    }

    /// The deadline thread: answers waiters that waited longer than the retry timeout.
    fn deadlines(&self) {
        let mut st = self.state.lock();
        loop {
            if self.shutdown.load(Ordering::Acquire) {
                return;
            }
            let now = Instant::now();
            let mut expired = Vec::new();
            while let Some(&(when, id)) = st.deadlines.first() {
                if when > now {
                    break;
                }
                st.deadlines.pop_first();
                if let Some(w) = st.waiters.remove(&id) {
                    expired.push(w);
                }
            }
            if !expired.is_empty() {
                drop(st);
                let why: Arc<str> = format!(
                    "no answer from {} within the retry timeout ({:?})",
                    self.source.describe(),
                    self.config.retry_timeout
                )
                .into();
                for w in expired {
                    self.reads_timed_out.fetch_add(1, Ordering::Relaxed);
                    (w.done)(Err(FetchError {
                        slot: w.first,
                        reason: Arc::clone(&why),
                    }));
                }
                st = self.state.lock();
                continue;
            }
            match st.deadlines.first() {
                Some(&(when, _)) => {
                    self.timer.wait_until(&mut st, when);
                }
                None => self.timer.wait(&mut st),
            }
        }
    }

    /// Fetches, verifies and stores `batch`, retrying what fails; then releases the slots.
    fn run(&self, batch: Vec<u64>, priority: Priority) {
        let mut policy = self.config.retry().begin();
        let remaining = self.seed(batch);
        let remaining = self.rebuild(remaining, priority, policy.timeout());
        let mut remaining = if priority == Priority::Background {
            self.fetch_bulk(remaining, policy.timeout())
        } else {
            remaining
        };
        if remaining.is_empty() {
            return;
        }
        loop {
            let mut retry = Vec::new();
            let mut last_error = String::new();
            // In stored order, so runs that touch are one range and the ranges ascend.
            remaining.sort_by_key(|s| (self.table.get(*s).map(|e| e.stored_offset), *s));
            // A chunk whose dictionary did not come is tried again, like any request; the
            // others go on.
            let mut current = remaining.clone();
            if let Err((missing, why)) =
                self.load_dictionaries(&current, priority, policy.timeout())
            {
                let needs = |s: &u64| {
                    self.table
                        .get(*s)
                        .is_some_and(|e| missing.contains(&e.dictionary))
                };
                retry.extend(current.iter().copied().filter(needs));
                current.retain(|s| !needs(s));
                last_error = why;
            }
            let runs = contiguous_runs(&self.table, &current);
            let group = self.runs_per_request().max(1);
            for runs in runs.chunks(group) {
                let (not_done, error) = self.fetch_runs(runs, priority, policy.timeout());
                if let Some((why, retryable)) = error {
                    if !retryable {
                        self.fail(&not_done, &why);
                        last_error = why;
                        continue;
                    }
                    last_error = why;
                }
                retry.extend(not_done);
            }
            if retry.is_empty() {
                return;
            }
            if retry.len() < remaining.len() {
                // Some chunks came: the rest get a new deadline (see `retry`).
                policy.restart();
            }
            let attempt = policy.attempt();
            let pause = match policy.next_pause() {
                Some(p) if !self.shutdown.load(Ordering::Acquire) => p,
                _ => {
                    self.fail(
                        &retry,
                        &format!(
                            "gave up after {attempt} attempts in {:.1} s: {last_error}",
                            policy.elapsed().as_secs_f64()
                        ),
                    );
                    return;
                }
            };
            tracing::debug!(attempt, slots = retry.len(), error = %last_error, "retrying chunks");
            std::thread::sleep(pause);
            remaining = retry;
        }
    }

    /// Fetches and prepares the dictionaries the frames of `slots` name that are not loaded
    /// yet, each in a request of its own (once per mount: a few hundred KiB in all); on
    /// failure, the numbers of those that did not load, and the last error.
    fn load_dictionaries(
        &self,
        slots: &[u64],
        priority: Priority,
        timeout: Duration,
    ) -> Result<(), (Vec<u8>, String)> {
        let wanted: Vec<u8> = slots
            .iter()
            .filter_map(|s| self.table.get(*s))
            .map(|e| e.dictionary)
            .collect();
        self.load_dictionary_numbers(wanted, priority, timeout)
    }

    /// [`Inner::load_dictionaries`] of dictionaries given by number (0s are skipped).
    fn load_dictionary_numbers(
        &self,
        mut wanted: Vec<u8>,
        priority: Priority,
        timeout: Duration,
    ) -> Result<(), (Vec<u8>, String)> {
        wanted.retain(|&d| d != 0);
        wanted.sort_unstable();
        wanted.dedup();
        let mut failed = Vec::new();
        let mut last = String::new();
        for number in wanted {
            let loaded = self.dictionaries.get(number, |d| {
                let bytes = read_within(
                    &*self.source,
                    self.data_offset + d.offset,
                    u64::from(d.len),
                    priority.kind(),
                    timeout,
                )
                .map_err(|e| crate::format::FormatError::Io(std::io::Error::other(e)))?;
                self.requests.fetch_add(1, Ordering::Relaxed);
                self.bytes_fetched
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                Ok(bytes)
            });
            if let Err(e) = loaded {
                last = format!("{}: {e}", self.source.describe());
                failed.push(number);
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err((failed, last))
        }
    }

    /// Stores the chunks of `batch` that another image's cache under the same cache
    /// directory holds ([`ChunkCache::seed`]) and releases them; returns the rest, to fetch.
    /// Done before slots are queued (so requests are not cut around such chunks) and again
    /// before a request (for chunks a request was widened over).
    fn seed(&self, batch: Vec<u64>) -> Vec<u64> {
        let (seeded, rest): (Vec<u64>, Vec<u64>) = batch.into_iter().partition(|&slot| {
            self.table
                .get(slot)
                .is_some_and(|e| self.cache.seed(slot, &e))
        });
        self.release(&seeded);
        rest
    }

    /// Rebuilds the chunks of `batch` that have a delta whose window the base image's cache
    /// holds ([`delta`]) from those deltas, fetched in as few requests as the sidecar's
    /// source allows, one attempt; the rest go back to the queue for another worker.
    /// Returns the chunks whose delta did not come or did not verify, to fetch as usual.
    fn rebuild(&self, batch: Vec<u64>, priority: Priority, timeout: Duration) -> Vec<u64> {
        let Some(d) = self.deltas.get() else {
            return batch;
        };
        let mut rest = Vec::new();
        // (slot, entry), in the order of their deltas; their windows are read from disk
        // while the deltas travel.
        let mut jobs = Vec::new();
        for slot in batch {
            let job = d.by_slot.get(&slot).filter(|e| {
                self.cache.prepare_sibling_window(
                    &d.base_root,
                    e.base_inode,
                    e.window_offset,
                    e.window_len,
                )
            });
            match job {
                Some(e) => jobs.push((slot, *e)),
                None => rest.push(slot),
            }
        }
        if jobs.is_empty() {
            return rest;
        }
        if !rest.is_empty() {
            // The chunks without a usable delta go back to the front of their queue, so
            // another worker fetches them while this one fetches the deltas.
            let mut st = self.state.lock();
            for &slot in rest.iter().rev() {
                st.slots.insert(slot, SlotState::Queued(priority, false));
                st.queues[priority as usize].push_front(slot);
            }
            drop(st);
            self.work.notify_all();
            rest.clear();
        }
        jobs.sort_by_key(|j| j.1.data_offset);
        // Adjacent deltas make one range: (start, len, first job, jobs).
        let mut groups: Vec<(u64, u64, usize, usize)> = Vec::new();
        for (k, (_, e)) in jobs.iter().enumerate() {
            let at = d.data_start + e.data_offset;
            match groups.last_mut() {
                Some(g) if g.0 + g.1 == at && g.1 < self.config.max_request_bytes => {
                    g.1 += u64::from(e.data_len);
                    g.3 += 1;
                }
                _ => groups.push((at, u64::from(e.data_len), k, 1)),
            }
        }
        let mut stored = vec![false; jobs.len()];
        let per_request = d.source.ranges_per_request().max(1);
        for part in groups.chunks(per_request) {
            let ranges: Vec<(u64, u64)> = part.iter().map(|g| (g.0, g.1)).collect();
            let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); part.len()];
            self.requests.fetch_add(1, Ordering::Relaxed);
            let r =
                d.source
                    .read_ranges_within(&ranges, priority.kind(), timeout, &mut |i, piece| {
                        self.bytes_fetched
                            .fetch_add(piece.len() as u64, Ordering::Relaxed);
                        let (Some(buf), Some(&(start, len, first, n))) =
                            (bufs.get_mut(i), part.get(i))
                        else {
                            return std::ops::ControlFlow::Break(());
                        };
                        buf.extend_from_slice(piece);
                        if buf.len() as u64 == len {
                            let mut done = Vec::new();
                            for k in first..first + n {
                                let (slot, e) = &jobs[k];
                                let at = (d.data_start + e.data_offset - start) as usize;
                                let delta = &buf[at..at + e.data_len as usize];
                                let window = self.cache.sibling_window(
                                    &d.base_root,
                                    e.base_inode,
                                    e.window_offset,
                                    e.window_len,
                                );
                                if window.is_some_and(|w| self.store_delta(*slot, delta, &w)) {
                                    stored[k] = true;
                                    done.push(*slot);
                                }
                            }
                            self.release(&done);
                        }
                        std::ops::ControlFlow::Continue(())
                    });
            if let Err(e) = r {
                self.fetch_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(source = %d.source.describe(), error = %e, "deltas did not come; fetching their chunks");
            }
        }
        rest.extend(
            jobs.iter()
                .zip(&stored)
                .filter(|(_, s)| !**s)
                .map(|((slot, _), _)| *slot),
        );
        rest
    }

    /// Decodes `delta` against `window`, checks it against `slot`'s digest and stores it.
    fn store_delta(&self, slot: u64, delta: &[u8], window: &[u8]) -> bool {
        let Some(e) = self.table.get(slot) else {
            return false;
        };
        let raw = match crate::format::delta::decode_delta(delta, window, e.raw_len) {
            Ok(raw)
                if raw.len() == e.raw_len as usize
                    && crate::format::Digest::of(&raw) == e.digest =>
            {
                raw
            }
            Ok(_) => {
                tracing::debug!(
                    slot,
                    "a delta decoded to other bytes than its chunk; fetching the chunk"
                );
                return false;
            }
            Err(error) => {
                tracing::debug!(slot, %error, "a delta did not decode; fetching the chunk");
                return false;
            }
        };
        if self.store_verified(slot, &raw).is_err() {
            return false;
        }
        self.delta_chunks.fetch_add(1, Ordering::Relaxed);
        self.delta_bytes
            .fetch_add(delta.len() as u64, Ordering::Relaxed);
        true
    }

    /// The bulk sidecar, while it has not failed [`MAX_BULK_FAILURES`] times in a row.
    fn usable_bulk(&self) -> Option<&bulk::Bulk> {
        self.bulk
            .get()
            .filter(|_| self.bulk_failures.load(Ordering::Relaxed) < MAX_BULK_FAILURES)
    }

    /// A background batch as bulk frames: `first` (in frame `k`) and every chunk of that
    /// frame and the ones after it that is neither local nor wanted elsewhere, up to `limit`
    /// bytes of frames; with those bytes.
    fn take_bulk_frames(
        &self,
        st: &mut State,
        b: &bulk::Bulk,
        first: u64,
        mut k: usize,
        limit: u64,
    ) -> (Vec<u64>, u64) {
        let mut batch = vec![first];
        let mut bytes = 0u64;
        while let Some(f) = b.frames.get(k) {
            let len = u64::from(f.len);
            if bytes > 0 && bytes + len > limit {
                break;
            }
            let before = batch.len();
            for s in f.slots() {
                if s == first || self.cache.is_local(s) {
                    continue;
                }
                if matches!(
                    st.slots.get(&s),
                    None | Some(SlotState::Queued(Priority::Background, _))
                ) {
                    st.slots.insert(s, SlotState::InFlight);
                    batch.push(s);
                }
            }
            if bytes > 0 && batch.len() == before {
                break;
            }
            bytes += len;
            k += 1;
        }
        (batch, bytes)
    }

    /// Fetches the chunks of a background `batch` as the bulk sidecar's frames that hold
    /// them, adjacent frames as one range, one attempt; returns the chunks not stored that
    /// way, to fetch from the image as usual.
    fn fetch_bulk(&self, batch: Vec<u64>, timeout: Duration) -> Vec<u64> {
        let Some(b) = self.usable_bulk() else {
            return batch;
        };
        let mut frames: Vec<usize> = batch.iter().filter_map(|&s| b.frame_of(s)).collect();
        frames.sort_unstable();
        frames.dedup();
        if frames.is_empty() {
            return batch;
        }
        let dicts = frames.iter().map(|&k| b.frames[k].dictionary).collect();
        if let Err((missing, why)) =
            self.load_dictionary_numbers(dicts, Priority::Background, timeout)
        {
            tracing::debug!(error = %why, "dictionaries for bulk frames did not come");
            frames.retain(|&k| !missing.contains(&b.frames[k].dictionary));
        }
        let wanted: HashSet<u64> = batch.iter().copied().collect();
        // Adjacent frames make one range: (start, len, frames).
        let mut groups: Vec<(u64, u64, Vec<usize>)> = Vec::new();
        for k in frames {
            let f = &b.frames[k];
            let at = b.data_start + f.offset;
            match groups.last_mut() {
                Some(g) if g.0 + g.1 == at && g.1 < self.config.max_request_bytes => {
                    g.1 += u64::from(f.len);
                    g.2.push(k);
                }
                _ => groups.push((at, u64::from(f.len), vec![k])),
            }
        }
        let mut stored: HashSet<u64> = HashSet::new();
        for part in groups.chunks(b.source.ranges_per_request().max(1)) {
            let ranges: Vec<(u64, u64)> = part.iter().map(|g| (g.0, g.1)).collect();
            // Per range: bytes received, and how many of its frames are handled.
            let mut bufs: Vec<(Vec<u8>, usize)> = vec![(Vec::new(), 0); part.len()];
            let stored_before = stored.len();
            self.requests.fetch_add(1, Ordering::Relaxed);
            let r = b.source.read_ranges_within(
                &ranges,
                Priority::Background.kind(),
                timeout,
                &mut |i, piece| {
                    self.bytes_fetched
                        .fetch_add(piece.len() as u64, Ordering::Relaxed);
                    self.bulk_bytes
                        .fetch_add(piece.len() as u64, Ordering::Relaxed);
                    let (Some((buf, next)), Some((start, _, ks))) = (bufs.get_mut(i), part.get(i))
                    else {
                        return std::ops::ControlFlow::Break(());
                    };
                    buf.extend_from_slice(piece);
                    while let Some(&k) = ks.get(*next) {
                        let f = &b.frames[k];
                        let at = (b.data_start + f.offset - start) as usize;
                        let Some(bytes) = buf.get(at..at + f.len as usize) else {
                            break;
                        };
                        let done = self.store_bulk_frame(b, f, bytes, &wanted);
                        stored.extend(done.iter().copied());
                        self.release(&done);
                        *next += 1;
                    }
                    if self.shutdown.load(Ordering::Acquire) {
                        std::ops::ControlFlow::Break(())
                    } else {
                        std::ops::ControlFlow::Continue(())
                    }
                },
            );
            // A request that stored nothing (it failed, or its frames did not verify) counts
            // against the sidecar.
            let error = match r {
                Ok(()) if stored.len() > stored_before => None,
                Ok(()) => Some("no chunk of its frames verified".to_string()),
                Err(e) => {
                    self.fetch_errors.fetch_add(1, Ordering::Relaxed);
                    Some(e.to_string())
                }
            };
            match error {
                None => self.bulk_failures.store(0, Ordering::Relaxed),
                Some(e) => {
                    let n = self.bulk_failures.fetch_add(1, Ordering::Relaxed) + 1;
                    if n == MAX_BULK_FAILURES {
                        tracing::warn!(sidecar = %b.spec, error = %e, "the bulk sidecar failed {n} times in a row; the fill fetches the image's own frames from now on");
                    } else {
                        tracing::debug!(sidecar = %b.spec, error = %e, "bulk frames did not come; fetching their chunks from the image");
                    }
                }
            }
        }
        batch.into_iter().filter(|s| !stored.contains(s)).collect()
    }

    /// Decodes one bulk frame and stores the chunks of it in `wanted` that are not local,
    /// each checked against its digest first; returns those stored.
    fn store_bulk_frame(
        &self,
        b: &bulk::Bulk,
        f: &crate::format::bulk::BulkFrame,
        stored: &[u8],
        wanted: &HashSet<u64>,
    ) -> Vec<u64> {
        let raw = self
            .dictionaries
            .get(f.dictionary, |_| Err(not_loaded(f.dictionary)))
            .map_err(|e| e.to_string())
            .and_then(|d| crate::format::bulk::decode_bulk_frame(f, stored, d));
        let chunks = raw
            .as_deref()
            .map_err(Clone::clone)
            .and_then(|raw| crate::format::bulk::frame_chunks(f, raw, |s| self.table.get(s)));
        let chunks = match chunks {
            Ok(c) => c,
            Err(error) => {
                self.fetch_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(sidecar = %b.spec, offset = f.offset, %error, "a bulk frame did not decode or its chunks do not fit it; fetching them from the image");
                return Vec::new();
            }
        };
        let mut done = Vec::new();
        let mut bad = 0u32;
        for (s, e, bytes) in chunks {
            if !wanted.contains(&s) || self.cache.is_local(s) {
                continue;
            }
            if crate::format::Digest::of(bytes) != e.digest {
                bad += 1;
                continue;
            }
            if self.store_verified(s, bytes).is_ok() {
                self.bulk_chunks.fetch_add(1, Ordering::Relaxed);
                done.push(s);
            }
        }
        if bad > 0 {
            self.fetch_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(sidecar = %b.spec, offset = f.offset, chunks = bad, "chunks of a bulk frame did not verify; not using their bytes, fetching them from the image");
        }
        done
    }

    /// One request for `runs` (ascending, apart; one range each, several in one request
    /// where the source allows), read as a stream: each chunk is decoded, checked and stored
    /// as soon as its bytes have arrived, and its waiters are woken then. Returns the slots
    /// not stored (to retry or fail) and the error that stopped the request, with whether it
    /// is worth retrying.
    fn fetch_runs(
        &self,
        runs: &[Vec<u64>],
        priority: Priority,
        timeout: Duration,
    ) -> (Vec<u64>, Option<(String, bool)>) {
        let Some(mut readers) = runs
            .iter()
            .map(|run| RunReader::new(&self.table, run, self.config.max_request_bytes))
            .collect::<Option<Vec<_>>>()
        else {
            return (
                runs.concat(),
                Some(("a run without table entries".into(), false)),
            );
        };
        let ranges: Vec<(u64, u64)> = readers
            .iter()
            .map(|r| (self.data_offset + r.start, r.len))
            .collect();
        let requests = if self.source.ranges_per_request() > 1 {
            1
        } else {
            ranges.len() as u64
        };
        self.requests.fetch_add(requests, Ordering::Relaxed);
        let result = self.source.read_ranges_within(
            &ranges,
            priority.kind(),
            timeout,
            &mut |i, piece: &[u8]| {
                // Counted as it arrives: a reader woken below may read the stats at once.
                self.bytes_fetched
                    .fetch_add(piece.len() as u64, Ordering::Relaxed);
                let Some(reader) = readers.get_mut(i) else {
                    return std::ops::ControlFlow::Break(());
                };
                let done = reader.feed(self, piece);
                self.release(&done);
                if reader.received > reader.len || self.shutdown.load(Ordering::Acquire) {
                    std::ops::ControlFlow::Break(())
                } else {
                    std::ops::ControlFlow::Continue(())
                }
            },
        );
        let mut not_done = Vec::new();
        let mut bad_why = None;
        let mut short = None;
        let mut progress = false;
        for r in &readers {
            not_done.extend(r.bad.iter().map(|(s, _)| *s));
            not_done.extend_from_slice(&r.run[r.next..]);
            progress |= r.next > 0;
            if let Some((_, why)) = r.bad.last() {
                bad_why = Some(why.clone());
            }
            if r.received != r.len && short.is_none() {
                short = Some((r.received, r.len));
            }
        }
        let (start, len) = (ranges[0].0, ranges.iter().map(|r| r.1).sum::<u64>());
        let error = match result {
            Err(e) => {
                self.fetch_errors.fetch_add(1, Ordering::Relaxed);
                if progress && e.is_retryable() {
                    // A long request on a slow or shared link outlived its attempt after
                    // storing some of its chunks: the rest is asked for again, with a fresh
                    // deadline (the work made progress). Expected there, so not a warning.
                    tracing::debug!(source = %self.source.describe(), offset = start, len, ranges = ranges.len(), error = %e, "range request cut short; asking again for the rest");
                } else {
                    tracing::warn!(source = %self.source.describe(), offset = start, len, ranges = ranges.len(), error = %e, "range request failed");
                }
                Some((e.to_string(), e.is_retryable()))
            }
            Ok(()) if short.is_some() => {
                self.fetch_errors.fetch_add(1, Ordering::Relaxed);
                let (got, want) = short.unwrap_or_default();
                Some((
                    format!("source returned {got} bytes for a range of {want}"),
                    true,
                ))
            }
            Ok(()) => bad_why.map(|why| (why, true)),
        };
        (not_done, error)
    }

    /// Takes one chunk out of its decoded frame, checks it, then stores it. Bytes that do
    /// not verify are dropped here and never reach the cache.
    fn verify_store(&self, slot: u64, e: &ChunkEntry, frame: &[u8]) -> Result<(), String> {
        match chunk_of_frame(slot, e, frame) {
            Ok(raw) => {
                self.store_verified(slot, &raw)?;
                self.chunks_fetched.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(err) => {
                self.fetch_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(slot, source = %self.source.describe(), error = %err, "chunk did not verify; not using its bytes");
                Err(err.to_string())
            }
        }
    }

    /// Stores the verified bytes of `slot` and marks it fetched by this mount.
    fn store_verified(&self, slot: u64, raw: &[u8]) -> Result<(), String> {
        if let Err(err) = self.cache.store(slot, raw) {
            tracing::error!(slot, error = %err, "storing a verified chunk failed");
            return Err(err.to_string());
        }
        if let Some(w) = self.fetched.get((slot / 64) as usize) {
            w.fetch_or(1 << (slot % 64), Ordering::Relaxed);
        }
        Ok(())
    }

    /// Marks stored slots finished and answers the waiters that have all they need.
    fn release(&self, done: &[u64]) {
        if done.is_empty() {
            return;
        }
        let mut ready = Vec::new();
        {
            let mut st = self.state.lock();
            for slot in done {
                st.slots.remove(slot);
                for id in st.slot_waiters.remove(slot).unwrap_or_default() {
                    let finished = st.waiters.get_mut(&id).is_some_and(|w| {
                        w.remaining -= 1;
                        w.remaining == 0
                    });
                    if finished && let Some(w) = st.waiters.remove(&id) {
                        st.deadlines.remove(&(w.deadline, id));
                        ready.push(w);
                    }
                }
            }
        }
        for w in ready {
            (w.done)(Ok(()));
        }
    }

    /// Marks slots failed and answers their waiters with the error; slots nobody waits for
    /// are forgotten instead.
    fn fail(&self, slots: &[u64], reason: &str) {
        let reason: Arc<str> = reason.into();
        let mut failed = Vec::new();
        {
            let mut st = self.state.lock();
            for &slot in slots {
                st.slots.remove(&slot);
                self.chunks_failed.fetch_add(1, Ordering::Relaxed);
                let ids = st.slot_waiters.remove(&slot).unwrap_or_default();
                if ids.is_empty() {
                    // Nobody waits for it (read-ahead, a widened miss, the fill): forget it,
                    // so the next reader asks the source again instead of sharing this
                    // failure (a request that failed for its neighbours' sake).
                    continue;
                }
                st.failed
                    .insert(slot, (Arc::clone(&reason), Instant::now()));
                for id in ids {
                    if let Some(w) = st.waiters.remove(&id) {
                        st.deadlines.remove(&(w.deadline, id));
                        failed.push((slot, w));
                    }
                }
            }
        }
        for (slot, w) in failed {
            (w.done)(Err(FetchError {
                slot,
                reason: Arc::clone(&reason),
            }));
        }
    }
}

/// The chunks of one run as its range's bytes arrive: decoded, checked and stored one by one.
struct RunReader<'a> {
    run: &'a [u64],
    /// The range: first stored byte (within the data section) and length.
    start: u64,
    len: u64,
    /// Bytes received and not yet dropped; `consumed` bytes of the range precede them.
    buf: Vec<u8>,
    consumed: u64,
    received: u64,
    /// Chunks of `run` before `next` are handled.
    next: usize,
    /// Chunks that did not verify or store, with why.
    bad: Vec<(u64, String)>,
    /// The last frame decoded: (stored offset, raw bytes).
    frame: Option<(u64, Vec<u8>)>,
}

impl<'a> RunReader<'a> {
    /// `None` when the run is empty or lacks table entries.
    fn new(table: &LazyTable, run: &'a [u64], max_buf: u64) -> Option<Self> {
        let first = table.get(*run.first()?)?;
        let last = table.get(*run.last()?)?;
        let len = last.stored_offset + u64::from(last.stored_len) - first.stored_offset;
        Some(RunReader {
            run,
            start: first.stored_offset,
            len,
            buf: Vec::with_capacity(len.min(max_buf) as usize),
            consumed: 0,
            received: 0,
            next: 0,
            bad: Vec::new(),
            frame: None,
        })
    }

    /// Takes the next bytes of the range; returns the slots stored from them.
    fn feed(&mut self, inner: &Inner, piece: &[u8]) -> Vec<u64> {
        self.received += piece.len() as u64;
        self.buf.extend_from_slice(piece);
        let mut done = Vec::new();
        while let Some(&slot) = self.run.get(self.next) {
            let Some(e) = inner.table.get(slot) else {
                break;
            };
            let at = (e.stored_offset - self.start - self.consumed) as usize;
            let end = at + e.stored_len as usize;
            if end > self.buf.len() {
                break;
            }
            // Chunks of one frame come one after another in the run: decode it once.
            if self
                .frame
                .as_ref()
                .is_none_or(|(o, _)| *o != e.stored_offset)
            {
                let dict = inner
                    .dictionaries
                    .get(e.dictionary, |_| Err(not_loaded(e.dictionary)));
                self.frame = match dict.and_then(|d| decode_frame(slot, &e, &self.buf[at..end], d))
                {
                    Ok(f) => Some((e.stored_offset, f)),
                    Err(err) => {
                        inner.fetch_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(slot, source = %inner.source.describe(), error = %err, "frame did not decode; not using its bytes");
                        None
                    }
                };
            }
            let stored = match &self.frame {
                Some((_, f)) => inner.verify_store(slot, &e, f),
                None => Err(format!("chunk slot {slot}: its frame did not decode")),
            };
            match stored {
                Ok(()) => done.push(slot),
                Err(why) => self.bad.push((slot, why)),
            }
            self.next += 1;
            // A slot sharing this chunk's stored bytes (deduplicated) may come next: keep
            // the bytes until the run moves past them.
            let next_is_past = self
                .run
                .get(self.next)
                .and_then(|s| inner.table.get(*s))
                .is_some_and(|n| n.stored_offset >= e.stored_offset + u64::from(e.stored_len));
            if next_is_past && end > (1 << 20) {
                // Drop what is handled so the buffer stays small.
                self.buf.drain(..end);
                self.consumed += end as u64;
            }
        }
        done
    }
}

/// The error of a frame decoded before its dictionary was loaded (never, since
/// [`Inner::load_dictionaries`] runs first).
fn not_loaded(number: u8) -> crate::format::FormatError {
    crate::format::FormatError::ManifestInvalid(format!("dictionary {number} is not loaded"))
}

/// Splits `slots` (ascending) into runs whose stored bytes are adjacent.
fn contiguous_runs(table: &LazyTable, slots: &[u64]) -> Vec<Vec<u64>> {
    let mut out: Vec<Vec<u64>> = Vec::new();
    // (start, end) of the last stored chunk added.
    let mut prev: Option<(u64, u64)> = None;
    for &slot in slots {
        let Some(e) = table.get(slot) else { continue };
        match (out.last_mut(), prev) {
            // The next chunk, or another slot sharing the same stored chunk.
            (Some(run), Some((start, end)))
                if e.stored_offset == end || e.stored_offset == start =>
            {
                run.push(slot)
            }
            _ => out.push(vec![slot]),
        }
        prev = Some((e.stored_offset, e.stored_offset + u64::from(e.stored_len)));
    }
    out
}
