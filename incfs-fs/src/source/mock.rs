//! An in-memory source for tests: serves an image held in memory and records every request.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use super::{RequestKind, Source, SourceError};

/// One request as the mock saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MockRequest {
    /// First byte.
    pub offset: u64,
    /// Bytes asked for.
    pub len: u64,
    /// Why.
    pub kind: RequestKind,
}

/// Serves an image from memory. Every request is logged ([`MockSource::requests`]); an
/// optional delay per request lets tests hold a fetch in flight.
#[derive(Debug)]
pub struct MockSource {
    data: Arc<Vec<u8>>,
    delay: Mutex<Duration>,
    piece: AtomicU64,
    log: Mutex<Vec<MockRequest>>,
    bytes: AtomicU64,
    in_flight: AtomicU64,
    peak_in_flight: AtomicU64,
}

impl MockSource {
    /// A source serving `data`.
    pub fn new(data: Vec<u8>) -> Self {
        MockSource {
            data: Arc::new(data),
            delay: Mutex::new(Duration::ZERO),
            piece: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
            bytes: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            peak_in_flight: AtomicU64::new(0),
        }
    }

    /// Sleeps `delay` in every request from now on.
    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock() = delay;
    }

    /// Hands streamed reads over in pieces of `bytes` (0, the default: one piece).
    pub fn set_piece_size(&self, bytes: u64) {
        self.piece.store(bytes, Ordering::Relaxed);
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<MockRequest> {
        self.log.lock().clone()
    }

    /// Forgets the logged requests.
    pub fn clear_requests(&self) {
        self.log.lock().clear();
    }

    /// Bytes served so far.
    pub fn bytes_served(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The most requests that were in flight at once so far.
    pub fn peak_in_flight(&self) -> u64 {
        self.peak_in_flight.load(Ordering::Relaxed)
    }
}

impl Source for MockSource {
    fn read_range(&self, offset: u64, len: u64, kind: RequestKind) -> Result<Vec<u8>, SourceError> {
        self.log.lock().push(MockRequest { offset, len, kind });
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_in_flight.fetch_max(now, Ordering::Relaxed);
        let delay = *self.delay.lock();
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let total = self.data.len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= total => {
                self.bytes.fetch_add(len, Ordering::Relaxed);
                Ok(self.data[offset as usize..end as usize].to_vec())
            }
            _ => Err(SourceError::OutOfRange {
                source_name: self.describe(),
                offset,
                len,
                total,
            }),
        }
    }

    fn total_len(&self) -> Result<u64, SourceError> {
        Ok(self.data.len() as u64)
    }

    fn read_range_streaming(
        &self,
        offset: u64,
        len: u64,
        kind: RequestKind,
        on_piece: &mut dyn FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<(), SourceError> {
        let data = self.read_range(offset, len, kind)?;
        let piece = match self.piece.load(Ordering::Relaxed) {
            0 => data.len().max(1),
            n => n as usize,
        };
        for p in data.chunks(piece) {
            if on_piece(p).is_break() {
                break;
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        "mock".into()
    }
}
