//! A source wrapper that behaves like a slow link: a fixed delay per request and a shared
//! bandwidth limit.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{RequestKind, Source, SourceError};

/// Wraps a source with a per-request latency and a bandwidth limit shared by all
/// concurrent requests (one token bucket, like one network link).
pub struct ThrottledSource<S> {
    inner: S,
    latency: Duration,
    bytes_per_sec: Option<u64>,
    /// When the link is next free.
    next_free: Mutex<Instant>,
}

impl<S: Source> ThrottledSource<S> {
    /// Wraps `inner` with `latency` per request and at most `bytes_per_sec` (`None`:
    /// unlimited).
    pub fn new(inner: S, latency: Duration, bytes_per_sec: Option<u64>) -> Self {
        ThrottledSource {
            inner,
            latency,
            bytes_per_sec,
            next_free: Mutex::new(Instant::now()),
        }
    }
}

impl<S: Source> Source for ThrottledSource<S> {
    fn read_range(&self, offset: u64, len: u64, kind: RequestKind) -> Result<Vec<u8>, SourceError> {
        let start = Instant::now();
        let data = self.inner.read_range(offset, len, kind)?;
        let mut done = start + self.latency;
        if let Some(bps) = self.bytes_per_sec.filter(|b| *b > 0) {
            let transfer = Duration::from_secs_f64(data.len() as f64 / bps as f64);
            let mut next = self.next_free.lock();
            let begin = (*next).max(start + self.latency);
            *next = begin + transfer;
            done = *next;
        }
        let now = Instant::now();
        if done > now {
            std::thread::sleep(done - now);
        }
        Ok(data)
    }

    fn total_len(&self) -> Result<u64, SourceError> {
        self.inner.total_len()
    }

    fn describe(&self) -> String {
        format!("throttled({})", self.inner.describe())
    }
}
