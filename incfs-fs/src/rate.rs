//! Byte-rate limiting: one [`TokenBucket`] shared by every user of a link or a budget (the
//! background fill's `--fill-bandwidth-mbit`, and the link emulator of `incfs serve` and the
//! test sources, `crate::link`, with the `serve` or `testing` feature).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket limiting bytes per second, shared by every user of one link.
///
/// Implemented as a virtual clock (GCRA): the bucket remembers when the link will have sent
/// everything reserved so far; a reservation moves that time on by `n / rate` and the caller
/// waits until it is no more than one burst ahead of now. Reservations are granted in the
/// order they are made, so connections share the link fairly at piece granularity.
#[derive(Debug)]
pub struct TokenBucket {
    bytes_per_sec: f64,
    burst: Duration,
    /// When everything reserved so far has been sent, at the link's rate.
    busy_until: Mutex<Instant>,
}

impl TokenBucket {
    /// A bucket refilling at `bytes_per_sec`, holding at most `burst_bytes` (a full bucket
    /// lets that many bytes go at once). `bytes_per_sec` must be positive.
    pub fn new(bytes_per_sec: f64, burst_bytes: u64) -> Self {
        let rate = if bytes_per_sec.is_finite() && bytes_per_sec > 0.0 {
            bytes_per_sec
        } else {
            f64::MAX
        };
        TokenBucket {
            bytes_per_sec: rate,
            burst: Duration::from_secs_f64(burst_bytes as f64 / rate),
            busy_until: Mutex::new(Instant::now()),
        }
    }

    /// The rate, in bytes per second.
    pub fn bytes_per_sec(&self) -> f64 {
        self.bytes_per_sec
    }

    /// Takes `n` bytes' worth of tokens now and returns how long the caller must wait before
    /// sending them (zero when the bucket had enough). The tokens are taken either way, so
    /// callers that give up after reserving still used the link.
    pub fn reserve(&self, n: u64) -> Duration {
        let now = Instant::now();
        let mut busy = self.busy_until.lock().unwrap_or_else(|e| e.into_inner());
        let start = (*busy).max(now);
        *busy = start + Duration::from_secs_f64(n as f64 / self.bytes_per_sec);
        busy.saturating_duration_since(now + self.burst)
    }

    /// Takes `n` bytes' worth of tokens, sleeping the thread until they may be sent.
    pub fn take_blocking(&self, n: u64) {
        let wait = self.reserve(n);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_lets_a_burst_through_then_paces() {
        let b = TokenBucket::new(1_000_000.0, 100_000);
        assert_eq!(b.reserve(100_000), Duration::ZERO);
        // The next 500 kB need 0.5 s at 1 MB/s (give or take the microseconds spent here).
        let wait = b.reserve(500_000);
        assert!(wait >= Duration::from_millis(490), "{wait:?}");
    }
}
