//! The chunk table of a mounted image, fetched a segment at a time.
//!
//! A mount reads the header and the manifest up front, and no more of the chunk table than
//! came with that first read: at 4 KiB chunks the table weighs 12 MiB per GiB of files, a
//! second or more of link time that a program starting lazily should not wait for. The
//! table is cut in segments of [`SEGMENT_ENTRIES`] entries (56 KiB, describing 4 MiB of
//! file data at 4 KiB chunks) whose digests the manifest holds, so each segment is verified
//! against the root digest on its own before any of its entries is used.
//!
//! A segment is fetched when a reader or the prefetcher first needs one of its slots.
//! Segments needed at once, when adjacent or separated by at most [`MAX_GAP_SEGMENTS`],
//! travel as one range request: a plan's slots bring their segments in one or a few
//! requests. Concurrent loaders of one segment cause one fetch; a failed request or a
//! segment that does not verify is retried under the mount's [`RetryPolicy`] (one deadline
//! for the load, each request bounded by the time left), then the load fails and the read
//! that needed it gets EIO.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::{Condvar, Mutex, RwLock};

use crate::cache::offline::TableStore;
use crate::format::{
    ChunkEntry, Digest, FormatError, ImageHead, SEGMENT_BYTES, SEGMENT_ENTRIES, TableOrder,
    decode_segment,
};
use crate::source::{RequestKind, Source, read_within};

/// Largest run of unneeded segments fetched to join two needed ones in one request: two
/// segments (112 KiB) take ~9 ms at 100 Mbit/s, less than the round trip they save.
pub const MAX_GAP_SEGMENTS: usize = 2;
/// Largest table request, in segments (3 MiB).
const MAX_REQUEST_SEGMENTS: usize = 64;

/// How failed segment requests are retried (the one policy of the mount).
pub use crate::retry::RetryPolicy;

/// A segment of the chunk table could not be loaded.
#[derive(Debug, Clone, thiserror::Error)]
#[error("chunk table segment {segment} of {source_name}: {reason}")]
pub struct TableError {
    /// The segment.
    pub segment: u64,
    /// The source, as it describes itself.
    pub source_name: String,
    /// The last error seen.
    pub reason: String,
}

/// Counters of segment loading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Range requests for table segments (retries included).
    pub requests: u64,
    /// Bytes of table received in them.
    pub bytes: u64,
    /// Segments loaded and verified (those that came with the first read included).
    pub segments_loaded: u64,
    /// Segments of the table.
    pub segments_total: u64,
}

/// The chunk table of a mounted image, loaded segment by segment and verified.
pub struct LazyTable {
    source: Arc<dyn Source>,
    table_offset: u64,
    table_len: u64,
    len: u64,
    chunk_size: u32,
    data_len: u64,
    digests: Vec<Digest>,
    /// Where each slot's entry sits in the table.
    order: TableOrder,
    segments: Vec<OnceLock<Box<[ChunkEntry]>>>,
    /// Slots of the loaded segments by the offset of their stored bytes (several when
    /// identical chunks are stored once), so the scheduler can coalesce in stored order.
    by_offset: RwLock<HashMap<u64, Vec<u64>>>,
    /// Segments some thread is fetching now.
    loading: Mutex<HashSet<usize>>,
    loaded: Condvar,
    retry: RetryPolicy,
    /// Set at unmount: loads stop retrying and fail.
    cancelled: AtomicBool,
    /// Where loaded segments are kept for a mount without the source (the image's cache).
    store: OnceLock<TableStore>,
    requests: AtomicU64,
    bytes: AtomicU64,
    segments_loaded: AtomicU64,
}

impl LazyTable {
    /// The table of the image whose verified `head` was read from `source`. Segments that
    /// came whole with the first read are checked and kept; the rest load on demand.
    pub fn open(
        source: Arc<dyn Source>,
        head: &ImageHead,
        retry: RetryPolicy,
    ) -> Result<Self, FormatError> {
        let h = &head.header;
        let m = &head.manifest;
        let table = LazyTable {
            order: m.order()?,
            source,
            table_offset: h.chunk_table_offset,
            table_len: h.chunk_table_len,
            len: m.chunk_count,
            chunk_size: m.chunk_size,
            data_len: m.data_len,
            digests: m.segment_digests.clone(),
            segments: m.segment_digests.iter().map(|_| OnceLock::new()).collect(),
            by_offset: RwLock::new(HashMap::new()),
            loading: Mutex::new(HashSet::new()),
            loaded: Condvar::new(),
            retry,
            cancelled: AtomicBool::new(false),
            store: OnceLock::new(),
            requests: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            segments_loaded: AtomicU64::new(0),
        };
        for k in 0..table.segments.len() {
            let r = table.segment_range(k);
            let Some(bytes) = usize::try_from(r.start)
                .ok()
                .zip(usize::try_from(r.end).ok())
                .and_then(|(s, e)| head.first.get(s..e))
            else {
                break;
            };
            // A segment damaged in transit is left to load (and retry) later.
            if let Ok(entries) = table.decode(k, bytes) {
                table.install(k, entries);
            }
        }
        Ok(table)
    }

    /// Number of chunk slots.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the image has no chunks.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entry of `slot`, when its segment is loaded.
    pub fn get(&self, slot: u64) -> Option<ChunkEntry> {
        if slot >= self.len {
            return None;
        }
        let pos = self.order.position_of(slot);
        let k = usize::try_from(pos / SEGMENT_ENTRIES as u64).ok()?;
        let i = (pos % SEGMENT_ENTRIES as u64) as usize;
        self.segments.get(k)?.get()?.get(i).copied()
    }

    /// Loaded slots whose stored bytes start at `offset`.
    pub fn slots_at(&self, offset: u64) -> Vec<u64> {
        self.by_offset
            .read()
            .get(&offset)
            .cloned()
            .unwrap_or_default()
    }

    /// The counters so far.
    pub fn stats(&self) -> TableStats {
        TableStats {
            requests: self.requests.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            segments_loaded: self.segments_loaded.load(Ordering::Relaxed),
            segments_total: self.segments.len() as u64,
        }
    }

    /// Keeps every segment loaded from now on in `store`, and the ones that came with
    /// `first` (the image's first bytes, as read at mount); loads from it, verified, the
    /// segments it holds that are not loaded yet. Returns the segments it supplied.
    pub fn attach_store(&self, store: TableStore, first: &[u8]) -> u64 {
        let mut supplied = 0;
        for k in 0..self.segments.len() {
            let r = self.segment_range(k);
            let at = r.start - self.table_offset;
            let from_first = usize::try_from(r.start)
                .ok()
                .zip(usize::try_from(r.end).ok())
                .and_then(|(a, b)| first.get(a..b));
            match (self.segments[k].get().is_some(), from_first) {
                (true, Some(bytes)) => {
                    if let Err(error) = store.save(at, bytes) {
                        tracing::debug!(%error, path = %store.path().display(), "keeping a table segment failed");
                    }
                }
                (true, None) => {}
                (false, _) => {
                    if let Ok(bytes) = store.load(at, r.end - r.start)
                        && let Ok(entries) = self.decode(k, &bytes)
                    {
                        self.install(k, entries);
                        supplied += 1;
                    }
                }
            }
        }
        let _ = self.store.set(store);
        supplied
    }

    /// Keeps segment `k`'s verified `bytes` in the store, if there is one.
    fn keep(&self, k: usize, bytes: &[u8]) {
        if let Some(store) = self.store.get() {
            let at = self.segment_range(k).start - self.table_offset;
            if let Err(error) = store.save(at, bytes) {
                tracing::debug!(%error, path = %store.path().display(), "keeping a table segment failed");
            }
        }
    }

    /// Stops every load (at unmount): requests in flight finish or time out, then fail
    /// instead of being retried; later loads fail at once.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    /// Makes the entries of `slots` available, fetching their segments that are not loaded
    /// (slots past the table are ignored). Blocks until they are loaded or failed.
    pub fn load(&self, slots: &[u64], kind: RequestKind) -> Result<(), TableError> {
        let mut want: Vec<usize> = slots
            .iter()
            .filter(|&&s| s < self.len)
            .map(|&s| (self.order.position_of(s) / SEGMENT_ENTRIES as u64) as usize)
            .filter(|&k| self.segments[k].get().is_none())
            .collect();
        if want.is_empty() {
            return Ok(());
        }
        want.sort_unstable();
        want.dedup();
        let mine: Vec<usize> = {
            let mut loading = self.loading.lock();
            let mine: Vec<usize> = want
                .iter()
                .copied()
                .filter(|k| self.segments[*k].get().is_none() && !loading.contains(k))
                .collect();
            loading.extend(mine.iter().copied());
            mine
        };
        let result = self.fetch(&mine, kind);
        let mut loading = self.loading.lock();
        for k in &mine {
            loading.remove(k);
        }
        self.loaded.notify_all();
        result?;
        // Wait for the segments other threads were fetching.
        while want
            .iter()
            .any(|k| self.segments[*k].get().is_none() && loading.contains(k))
        {
            self.loaded.wait(&mut loading);
        }
        match want.iter().find(|k| self.segments[**k].get().is_none()) {
            Some(&k) => Err(self.error(k, "another reader's fetch of it failed".into())),
            None => Ok(()),
        }
    }

    /// Fetches segments `wanted` (ascending), joined in as few requests as the gap and size
    /// limits allow.
    fn fetch(&self, wanted: &[usize], kind: RequestKind) -> Result<(), TableError> {
        let mut runs: Vec<Range<usize>> = Vec::new();
        for &k in wanted {
            match runs.last_mut() {
                Some(r)
                    if k - r.end <= MAX_GAP_SEGMENTS && k + 1 - r.start <= MAX_REQUEST_SEGMENTS =>
                {
                    r.end = k + 1
                }
                _ => runs.push(k..k + 1),
            }
        }
        for run in runs {
            self.fetch_run(run, kind)?;
        }
        Ok(())
    }

    fn fetch_run(&self, run: Range<usize>, kind: RequestKind) -> Result<(), TableError> {
        let start = self.segment_range(run.start).start;
        let end = self.segment_range(run.end - 1).end;
        let mut retry = self.retry.begin();
        loop {
            if self.cancelled.load(Ordering::Acquire) {
                return Err(self.error(run.start, "the file system is shutting down".into()));
            }
            self.requests.fetch_add(1, Ordering::Relaxed);
            let failure =
                match read_within(&*self.source, start, end - start, kind, retry.timeout()) {
                    Ok(bytes) if bytes.len() as u64 == end - start => {
                        self.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                        let mut bad = None;
                        for k in run.clone() {
                            if self.segments[k].get().is_some() {
                                continue;
                            }
                            let r = self.segment_range(k);
                            let piece =
                                &bytes[(r.start - start) as usize..(r.end - start) as usize];
                            match self.decode(k, piece) {
                                Ok(entries) => {
                                    self.install(k, entries);
                                    self.keep(k, piece);
                                }
                                Err(e) => bad = Some((k, e.to_string(), true)),
                            }
                        }
                        bad
                    }
                    Ok(bytes) => {
                        self.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                        Some((
                            run.start,
                            format!(
                                "source returned {} bytes for a range of {}",
                                bytes.len(),
                                end - start
                            ),
                            true,
                        ))
                    }
                    Err(e) => Some((run.start, e.to_string(), e.is_retryable())),
                };
            let Some((segment, reason, retryable)) = failure else {
                return Ok(());
            };
            let attempt = retry.attempt();
            tracing::warn!(segment, attempt, source = %self.source.describe(), error = %reason, "loading a chunk table segment failed");
            match retry.next_pause() {
                Some(pause) if retryable && !self.cancelled.load(Ordering::Acquire) => {
                    std::thread::sleep(pause)
                }
                _ => {
                    return Err(self.error(
                        segment,
                        format!(
                            "gave up after {attempt} attempts in {:.1} s: {reason}",
                            retry.elapsed().as_secs_f64()
                        ),
                    ));
                }
            }
        }
    }

    /// Absolute byte range of segment `k` in the image.
    fn segment_range(&self, k: usize) -> Range<u64> {
        let start = k as u64 * SEGMENT_BYTES;
        let end = (start + SEGMENT_BYTES).min(self.table_len);
        self.table_offset + start..self.table_offset + end
    }

    fn decode(&self, k: usize, bytes: &[u8]) -> Result<Vec<ChunkEntry>, FormatError> {
        decode_segment(
            bytes,
            k as u64,
            &self.digests[k],
            self.chunk_size,
            self.data_len,
            &self.order,
        )
    }

    fn install(&self, k: usize, entries: Vec<ChunkEntry>) {
        let first = (k * SEGMENT_ENTRIES) as u64;
        let mut index = self.by_offset.write();
        if self.segments[k].set(entries.into_boxed_slice()).is_ok() {
            self.segments_loaded.fetch_add(1, Ordering::Relaxed);
            for (i, e) in self.segments[k].get().into_iter().flatten().enumerate() {
                let slot = self.order.slot_at(first + i as u64);
                index.entry(e.stored_offset).or_default().push(slot);
            }
        }
    }

    fn error(&self, segment: usize, reason: String) -> TableError {
        TableError {
            segment: segment as u64,
            source_name: self.source.describe(),
            reason,
        }
    }
}
