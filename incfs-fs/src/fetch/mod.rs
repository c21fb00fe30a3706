//! The fetch scheduler: brings chunks from the source into the cache, verified.
//!
//! One scheduler per mount, with three queues in strict priority order: demand (a reader is
//! blocked), prefetch (the plan asked), background (everything else). Callers
//! [`Fetcher::submit`] slots at a priority (a later prefetcher uses this) or
//! [`Fetcher::fetch`] them and block until they are local.
//!
//! Worker threads take the first slot of the highest non-empty queue and extend it with the
//! queued slots that follow it in the image's data section (any priority), up to
//! [`FetchConfig::max_request_bytes`], so adjacent missing chunks travel as one range
//! request. Worker 0 serves only demand, so a miss never waits behind a prefetch.
//!
//! A slot is queued or in flight at most once: concurrent readers of one chunk cause one
//! fetch. Every chunk is decoded and checked against its digest ([`chunk_of_frame`]) before
//! it is stored; bytes that do not match are never stored or returned. Failed requests and
//! chunks that do not verify are retried under the mount's [`RetryPolicy`] (jittered
//! backoff, each request bounded by the time left before [`FetchConfig::retry_timeout`]);
//! then the slot fails and its waiters get a [`FetchError`].

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::cache::ChunkCache;
use crate::format::{ChunkEntry, chunk_of_frame, decode_frame};
use crate::retry::RetryPolicy;
use crate::source::{RequestKind, Source};
use crate::table::LazyTable;

/// How long a failed slot stays failed: requests for it within this time fail at once
/// instead of fetching again. Covers the kernel's own immediate retry of a failed page read,
/// and is short enough that a program trying again a second later reaches the source.
pub const FAILURE_MEMO: Duration = Duration::from_millis(500);

/// Tunables of the scheduler.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Worker threads (at least 2: worker 0 serves demand only). Default 4: requests are
    /// I/O-bound, and four in flight keep a loopback or LAN link busy on two cores.
    pub workers: usize,
    /// Largest range request, in stored bytes. Default 4 MiB: large enough that a request's
    /// fixed cost (one round trip) is small next to its transfer on a 100 Mbit link, small
    /// enough that a demand read never waits long behind one.
    pub max_request_bytes: u64,
    /// Attempts per request before its chunks fail. Default 20 ([`RetryPolicy`]).
    pub max_attempts: u32,
    /// Wait before the first retry; doubles each time, jittered. Default 50 ms.
    pub initial_backoff: Duration,
    /// Longest wait between retries. Default 1 s.
    pub max_backoff: Duration,
    /// Longest time spent on one request's chunks, every attempt and pause included, before
    /// they fail (restarted when an attempt stores some of them). Default 10 s
    /// ([`crate::retry::DEFAULT_DEADLINE`], which explains the choice).
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
            workers: 4,
            max_request_bytes: 4 * 1024 * 1024,
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
    /// The prefetch plan names it.
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Queued(Priority),
    InFlight,
}

#[derive(Default)]
struct State {
    slots: HashMap<u64, SlotState>,
    queues: [VecDeque<u64>; 3],
    /// Slots that failed, with why and when: a new request for one within
    /// [`FAILURE_MEMO`] fails at once.
    failed: HashMap<u64, (Arc<str>, Instant)>,
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
    /// Wakes waiters when slots finish.
    done: Condvar,
    shutdown: AtomicBool,
    bytes_fetched: AtomicU64,
    requests: AtomicU64,
    chunks_fetched: AtomicU64,
    fetch_errors: AtomicU64,
    chunks_failed: AtomicU64,
    /// Slots fetched and stored by this scheduler, one bit each.
    fetched: Vec<AtomicU64>,
}

/// The scheduler. Dropping it stops the workers.
pub struct Fetcher {
    inner: Arc<Inner>,
    workers: Vec<JoinHandle<()>>,
}

impl Fetcher {
    /// Starts a scheduler that reads chunks of `table` (whose data section starts at
    /// `data_offset`) from `source` into `cache`.
    pub fn new(
        source: Arc<dyn Source>,
        data_offset: u64,
        table: Arc<LazyTable>,
        cache: ChunkCache,
        config: FetchConfig,
    ) -> std::io::Result<Self> {
        let n = config.workers.max(2);
        let words = table.len().div_ceil(64);
        let inner = Arc::new(Inner {
            source,
            data_offset,
            table,
            cache,
            config,
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            done: Condvar::new(),
            shutdown: AtomicBool::new(false),
            bytes_fetched: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            chunks_fetched: AtomicU64::new(0),
            fetch_errors: AtomicU64::new(0),
            chunks_failed: AtomicU64::new(0),
            fetched: (0..words).map(|_| AtomicU64::new(0)).collect(),
        });
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let inner = Arc::clone(&inner);
            workers.push(
                std::thread::Builder::new()
                    .name(format!("incfs-fetch-{i}"))
                    .spawn(move || inner.worker(i == 0))?,
            );
        }
        Ok(Fetcher { inner, workers })
    }

    /// Queues the slots that are not local at `priority` (raising the priority of slots
    /// already queued lower). Returns once their chunk-table entries are loaded: slots
    /// whose entries could not be loaded are left out (and logged).
    pub fn submit(&self, slots: &[u64], priority: Priority) {
        if let Err(e) = self.inner.table.load(slots, priority.kind()) {
            tracing::warn!(error = %e, "not queueing chunks whose table entries did not load");
        }
        let mut st = self.inner.state.lock();
        if self.inner.queue(&mut st, slots, priority) {
            self.inner.work.notify_all();
        }
    }

    /// Fetches the slots that are not local at `priority` and blocks until all are local,
    /// or returns the first failure.
    pub fn fetch(&self, slots: &[u64], priority: Priority) -> Result<(), FetchError> {
        self.fetch_ahead(slots, priority, &[])
    }

    /// Like [`Fetcher::fetch`], and queues `ahead` (slots that follow `slots` in the data
    /// section) at background priority in the same step, so that the request for `slots`
    /// extends over them; returns once `slots` are local, without waiting for `ahead`.
    pub fn fetch_ahead(
        &self,
        slots: &[u64],
        priority: Priority,
        ahead: &[u64],
    ) -> Result<(), FetchError> {
        let inner = &self.inner;
        if let Err(e) = inner.table.load(slots, priority.kind()) {
            return Err(FetchError {
                slot: slots.first().copied().unwrap_or(0),
                reason: e.to_string().into(),
            });
        }
        // Read-ahead is best effort: its entries load with the request's, or it is dropped.
        let _ = inner.table.load(ahead, Priority::Background.kind());
        let mut st = inner.state.lock();
        let a = inner.queue(&mut st, slots, priority);
        let b = inner.queue(&mut st, ahead, Priority::Background);
        if a || b {
            inner.work.notify_all();
        }
        loop {
            let mut all_local = true;
            for &slot in slots {
                if inner.cache.is_local(slot) {
                    continue;
                }
                if let Some((reason, _)) = st.failed.get(&slot) {
                    return Err(FetchError {
                        slot,
                        reason: Arc::clone(reason),
                    });
                }
                if slot >= inner.table.len() {
                    return Err(FetchError {
                        slot,
                        reason: "no such chunk slot".into(),
                    });
                }
                if inner.table.get(slot).is_none() {
                    return Err(FetchError {
                        slot,
                        reason: "its chunk table entry is not loaded".into(),
                    });
                }
                if let std::collections::hash_map::Entry::Vacant(e) = st.slots.entry(slot) {
                    // Finished without becoming local and without a recorded failure (the
                    // failure was cleared by another submit): queue it again.
                    e.insert(SlotState::Queued(priority));
                    st.queues[priority as usize].push_back(slot);
                    inner.work.notify_all();
                }
                all_local = false;
            }
            if all_local {
                return Ok(());
            }
            if inner.shutdown.load(Ordering::Acquire) {
                return Err(FetchError {
                    slot: slots.first().copied().unwrap_or(0),
                    reason: "the file system is shutting down".into(),
                });
            }
            inner.done.wait(&mut st);
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
        }
    }

    /// True when this scheduler fetched and stored `slot` (since it started).
    pub fn fetched(&self, slot: u64) -> bool {
        self.inner
            .fetched
            .get((slot / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (slot % 64)) != 0)
    }

    /// Slots queued or in flight now.
    pub fn pending(&self) -> usize {
        self.inner.state.lock().slots.len()
    }

    /// The cache this scheduler fills.
    pub fn cache(&self) -> &ChunkCache {
        &self.inner.cache
    }
}

impl Fetcher {
    /// Stops the scheduler (at unmount): workers take no more work, a request in flight
    /// stops at its next piece, retries and table loads stop, and waiters fail. Returns at
    /// once; dropping the scheduler waits (briefly) for the workers.
    pub fn shutdown(&self) {
        self.inner.shutdown.store(true, Ordering::Release);
        self.inner.table.cancel();
        let _st = self.inner.state.lock();
        self.inner.work.notify_all();
        self.inner.done.notify_all();
    }
}

/// How long dropping a [`Fetcher`] waits for its workers: a worker stuck in a request that
/// sends nothing more is left to end by itself (by its timeout), so unmounting never waits
/// for a stalled server.
const WORKER_JOIN_WAIT: Duration = Duration::from_millis(300);

impl Drop for Fetcher {
    fn drop(&mut self) {
        self.shutdown();
        let deadline = Instant::now() + WORKER_JOIN_WAIT;
        while Instant::now() < deadline && self.workers.iter().any(|w| !w.is_finished()) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let stuck = self.workers.iter().filter(|w| !w.is_finished()).count();
        if stuck > 0 {
            tracing::debug!(
                stuck,
                "fetch workers still in a request at shutdown; not waiting for them"
            );
        }
        for w in self.workers.drain(..).filter(|w| w.is_finished()) {
            let _ = w.join();
        }
    }
}

impl Inner {
    /// Queues the slots that are not local at `priority`; true when any was added.
    fn queue(&self, st: &mut State, slots: &[u64], priority: Priority) -> bool {
        let mut added = false;
        for &slot in slots {
            // A slot is queued only once its table entry is loaded: the worker needs it.
            if self.cache.is_local(slot) || self.table.get(slot).is_none() {
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
                Some(SlotState::Queued(p)) if *p <= priority => continue,
                _ => {}
            }
            st.slots.insert(slot, SlotState::Queued(priority));
            st.queues[priority as usize].push_back(slot);
            added = true;
        }
        added
    }

    fn worker(&self, demand_only: bool) {
        loop {
            let (batch, priority) = {
                let mut st = self.state.lock();
                loop {
                    if self.shutdown.load(Ordering::Acquire) {
                        return;
                    }
                    if let Some(b) = self.pick(&mut st, demand_only) {
                        break b;
                    }
                    self.work.wait(&mut st);
                }
            };
            self.run(batch, priority);
        }
    }

    /// Takes the next run of stored-adjacent queued slots, marking them in flight.
    fn pick(&self, st: &mut State, demand_only: bool) -> Option<(Vec<u64>, Priority)> {
        let prios: &[Priority] = if demand_only {
            &[Priority::Demand]
        } else {
            &[Priority::Demand, Priority::Prefetch, Priority::Background]
        };
        for &p in prios {
            while let Some(first) = st.queues[p as usize].pop_front() {
                if st.slots.get(&first) != Some(&SlotState::Queued(p)) {
                    continue; // stale entry: raised, in flight or done
                }
                if self.cache.is_local(first) {
                    st.slots.remove(&first);
                    continue;
                }
                st.slots.insert(first, SlotState::InFlight);
                let mut batch = vec![first];
                let Some(first_entry) = self.table.get(first) else {
                    continue;
                };
                // Extend with queued slots whose stored bytes come next in the data section
                // (and with queued slots sharing a stored chunk), whatever their slot numbers:
                // a hot-first image stores planned chunks back to back in plan order.
                let mut at = first_entry.stored_offset;
                let mut bytes = 0u64;
                loop {
                    let here = self.table.slots_at(at);
                    let queued = |s: &u64| {
                        *s == first || matches!(st.slots.get(s), Some(SlotState::Queued(_)))
                    };
                    if !here.iter().any(queued) {
                        break;
                    }
                    // A frame of several chunks comes whole: take every chunk of it that is
                    // neither local nor in flight, asked for or not, so it is stored now
                    // rather than fetched again with the next miss in the frame.
                    let queued: Vec<u64> = here
                        .iter()
                        .copied()
                        .filter(|s| {
                            queued(s) || (!st.slots.contains_key(s) && !self.cache.is_local(*s))
                        })
                        .collect();
                    let Some(len) = queued
                        .first()
                        .and_then(|s| self.table.get(*s))
                        .map(|e| u64::from(e.stored_len))
                    else {
                        break;
                    };
                    if bytes > 0 && bytes + len > self.config.max_request_bytes {
                        break;
                    }
                    for s in queued {
                        if s != first {
                            st.slots.insert(s, SlotState::InFlight);
                            batch.push(s);
                        }
                    }
                    bytes += len;
                    at += len;
                }
                return Some((batch, p));
            }
        }
        None
    }

    /// Fetches, verifies and stores `batch`, retrying what fails; then releases the slots.
    fn run(&self, batch: Vec<u64>, priority: Priority) {
        let mut policy = self.config.retry().begin();
        let mut remaining = batch;
        loop {
            let mut retry = Vec::new();
            let mut last_error = String::new();
            for run in contiguous_runs(&self.table, &remaining) {
                let (not_done, error) = self.fetch_run(&run, priority, policy.timeout());
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

    /// One range request for `run`, read as a stream: each chunk is decoded, checked and
    /// stored as soon as its bytes have arrived, and its waiters are woken then. Returns the
    /// slots not stored (to retry or fail) and the error that stopped the request, with
    /// whether it is worth retrying.
    fn fetch_run(
        &self,
        run: &[u64],
        priority: Priority,
        timeout: Duration,
    ) -> (Vec<u64>, Option<(String, bool)>) {
        let (Some(first), Some(last)) = (
            run.first().and_then(|s| self.table.get(*s)),
            run.last().and_then(|s| self.table.get(*s)),
        ) else {
            return (run.to_vec(), Some(("empty run".into(), false)));
        };
        let start = first.stored_offset;
        let len = last.stored_offset + u64::from(last.stored_len) - start;
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut buf: Vec<u8> = Vec::with_capacity(len.min(self.config.max_request_bytes) as usize);
        // Chunks of `run` before `next` are handled; `consumed` bytes of the range precede it.
        let mut next = 0usize;
        let mut consumed = 0u64;
        let mut bad: Vec<(u64, String)> = Vec::new();
        let mut received = 0u64;
        // The last frame decoded: (stored offset, raw bytes).
        let mut frame: Option<(u64, Vec<u8>)> = None;
        let result = self.source.read_range_within(
            self.data_offset + start,
            len,
            priority.kind(),
            timeout,
            &mut |piece: &[u8]| {
                received += piece.len() as u64;
                // Counted as it arrives: a reader woken below may read the stats at once.
                self.bytes_fetched
                    .fetch_add(piece.len() as u64, Ordering::Relaxed);
                buf.extend_from_slice(piece);
                let mut done = Vec::new();
                while let Some(&slot) = run.get(next) {
                    let Some(e) = self.table.get(slot) else { break };
                    let at = (e.stored_offset - start - consumed) as usize;
                    let end = at + e.stored_len as usize;
                    if end > buf.len() {
                        break;
                    }
                    // Chunks of one frame come one after another in the run: decode it once.
                    if frame.as_ref().is_none_or(|(o, _)| *o != e.stored_offset) {
                        frame = match decode_frame(slot, &e, &buf[at..end]) {
                            Ok(f) => Some((e.stored_offset, f)),
                            Err(err) => {
                                self.fetch_errors.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(slot, source = %self.source.describe(), error = %err, "frame did not decode; not using its bytes");
                                None
                            }
                        };
                    }
                    let stored = match &frame {
                        Some((_, f)) => self.verify_store(slot, &e, f),
                        None => Err(format!("chunk slot {slot}: its frame did not decode")),
                    };
                    match stored {
                        Ok(()) => done.push(slot),
                        Err(why) => bad.push((slot, why)),
                    }
                    next += 1;
                    // A slot sharing this chunk's stored bytes (deduplicated) may come next:
                    // keep the bytes until the run moves past them.
                    let next_is_past =
                        run.get(next)
                            .and_then(|s| self.table.get(*s))
                            .is_some_and(|n| {
                                n.stored_offset >= e.stored_offset + u64::from(e.stored_len)
                            });
                    if next_is_past && end > (1 << 20) {
                        // Drop what is handled so the buffer stays small.
                        buf.drain(..end);
                        consumed += end as u64;
                    }
                }
                self.release(&done);
                if received > len || self.shutdown.load(Ordering::Acquire) {
                    std::ops::ControlFlow::Break(())
                } else {
                    std::ops::ControlFlow::Continue(())
                }
            },
        );
        let mut not_done: Vec<u64> = bad.iter().map(|(s, _)| *s).collect();
        not_done.extend_from_slice(&run[next..]);
        let error = match result {
            Err(e) => {
                self.fetch_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(source = %self.source.describe(), offset = start, len, error = %e, "range request failed");
                Some((e.to_string(), e.is_retryable()))
            }
            Ok(()) if received != len => {
                self.fetch_errors.fetch_add(1, Ordering::Relaxed);
                Some((
                    format!("source returned {received} bytes for a range of {len}"),
                    true,
                ))
            }
            Ok(()) => bad.last().map(|(_, why)| (why.clone(), true)),
        };
        (not_done, error)
    }

    /// Takes one chunk out of its decoded frame, checks it, then stores it. Bytes that do
    /// not verify are dropped here and never reach the cache.
    fn verify_store(&self, slot: u64, e: &ChunkEntry, frame: &[u8]) -> Result<(), String> {
        match chunk_of_frame(slot, e, frame) {
            Ok(raw) => match self.cache.store(slot, &raw) {
                Ok(()) => {
                    self.chunks_fetched.fetch_add(1, Ordering::Relaxed);
                    if let Some(w) = self.fetched.get((slot / 64) as usize) {
                        w.fetch_or(1 << (slot % 64), Ordering::Relaxed);
                    }
                    Ok(())
                }
                Err(err) => {
                    tracing::error!(slot, error = %err, "storing a verified chunk failed");
                    Err(err.to_string())
                }
            },
            Err(err) => {
                self.fetch_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(slot, source = %self.source.describe(), error = %err, "chunk did not verify; not using its bytes");
                Err(err.to_string())
            }
        }
    }

    /// Marks stored slots finished and wakes their waiters.
    fn release(&self, done: &[u64]) {
        if done.is_empty() {
            return;
        }
        let mut st = self.state.lock();
        for slot in done {
            st.slots.remove(slot);
        }
        self.done.notify_all();
    }

    fn fail(&self, slots: &[u64], reason: &str) {
        let reason: Arc<str> = reason.into();
        let mut st = self.state.lock();
        for &slot in slots {
            st.slots.remove(&slot);
            st.failed
                .insert(slot, (Arc::clone(&reason), Instant::now()));
            self.chunks_failed.fetch_add(1, Ordering::Relaxed);
        }
        self.done.notify_all();
    }
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
