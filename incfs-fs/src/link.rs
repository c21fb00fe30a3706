//! Link emulation: latency, a bandwidth limit and injected faults.
//!
//! This kernel has no netem, so a benchmark over loopback gets a realistic link from these
//! pieces instead. They are plain Rust with no runtime attached, shared by `incfs serve`
//! (which applies them to every response) and by test sources that throttle reads in
//! process:
//!
//! - [`LinkConfig`] — everything a link does: a fixed delay before the first byte of every
//!   response, one bandwidth limit, and a [`FaultConfig`] (rate, seed, kinds of fault).
//! - [`TokenBucket`] — one limiter shared by every user of a link (all connections of a
//!   server, or all threads of a source). [`TokenBucket::reserve`] says how long to wait
//!   (async callers sleep on their own timer), [`TokenBucket::take_blocking`] sleeps the
//!   thread.
//! - [`FaultInjector`] — a seeded random draw of [`Fault`]s from a [`FaultConfig`].

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::rate::TokenBucket;

/// Bytes per second in one Mbit/s (10^6 bits per second, the unit link speeds are sold in).
pub const BYTES_PER_SEC_PER_MBIT: f64 = 125_000.0;

/// Burst a [`TokenBucket`] made by [`LinkConfig::token_bucket`] allows: 64 KiB, one piece of a
/// response as `incfs serve` sends it. Small enough that even a 1 Mbit/s link is shaped
/// within half a second, large enough that a fast link does not pay one timer per packet.
pub const DEFAULT_BURST_BYTES: u64 = 64 * 1024;

/// How long a stall fault holds a response by default: 2 s, longer than a demand read should
/// wait, short enough that a test under faults finishes.
pub const DEFAULT_STALL_MS: u64 = 2_000;

/// What a link does to traffic. The default is a perfect link: no delay, no limit, no faults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LinkConfig {
    /// Delay added to every request before the first byte of its response, in milliseconds
    /// (a one-way trip plus server think time; default 0).
    pub latency_ms: u64,
    /// Bandwidth in Mbit/s (10^6 bits per second) shared by all connections; `None` (the
    /// default) is unlimited.
    pub bandwidth_mbit: Option<f64>,
    /// Faults injected into responses (default: none).
    pub faults: FaultConfig,
}

impl LinkConfig {
    /// The latency as a [`Duration`].
    pub fn latency(&self) -> Duration {
        Duration::from_millis(self.latency_ms)
    }

    /// The bandwidth in bytes per second, or `None` when unlimited.
    pub fn bytes_per_sec(&self) -> Option<f64> {
        self.bandwidth_mbit.map(|m| m * BYTES_PER_SEC_PER_MBIT)
    }

    /// A token bucket for this link's bandwidth (burst [`DEFAULT_BURST_BYTES`]), or `None`
    /// when unlimited. Make it once and share it: one bucket is one link.
    pub fn token_bucket(&self) -> Option<TokenBucket> {
        self.bytes_per_sec()
            .map(|rate| TokenBucket::new(rate, DEFAULT_BURST_BYTES))
    }

    /// True when the link changes nothing.
    pub fn is_perfect(&self) -> bool {
        self.latency_ms == 0 && self.bandwidth_mbit.is_none() && !self.faults.is_active()
    }

    /// Checks the numbers: bandwidth positive and finite, fault rate within 0..=1, at least
    /// one kind of fault when the rate is above 0.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(m) = self.bandwidth_mbit
            && !(m.is_finite() && m > 0.0)
        {
            return Err(format!(
                "bandwidth {m} Mbit/s: give a positive number, or no limit"
            ));
        }
        self.faults.validate()
    }
}

/// One kind of injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// The connection is reset (TCP RST: `SO_LINGER` 0, then close) before the response head
    /// or part way through the body; the client sees "connection reset by peer".
    Reset,
    /// The response stops for [`FaultConfig::stall_ms`] (before the head or part way through
    /// the body), then goes on correctly.
    Stall,
    /// The server answers 500, 502 or 503 instead of the data.
    ServerError,
    /// The response announces its full length but the body ends early (the connection is
    /// closed after the short body).
    ShortBody,
    /// One bit of the body is flipped; status, headers and length are correct. Only a digest
    /// check can catch it.
    BitFlip,
}

impl FaultKind {
    /// Every kind, in the order of their names in [`FaultKind::name`].
    pub const ALL: [FaultKind; 5] = [
        FaultKind::Reset,
        FaultKind::Stall,
        FaultKind::ServerError,
        FaultKind::ShortBody,
        FaultKind::BitFlip,
    ];

    /// The name used on the command line and in stats: `reset`, `stall`, `server-error`,
    /// `short-body`, `bit-flip`.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Reset => "reset",
            FaultKind::Stall => "stall",
            FaultKind::ServerError => "server-error",
            FaultKind::ShortBody => "short-body",
            FaultKind::BitFlip => "bit-flip",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FaultKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FaultKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
                format!("unknown fault kind {s:?} (known: {})", names.join(", "))
            })
    }
}

/// Which faults to inject and how often.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FaultConfig {
    /// Fraction of eligible requests that get a fault, 0.0 (default) to 1.0.
    pub rate: f64,
    /// Seed of the random draw, so a run can be repeated (default 0). With several
    /// connections at once the order of requests, and so which one is hit, still varies.
    pub seed: u64,
    /// The kinds to draw from, each equally likely (default: all of them).
    pub kinds: Vec<FaultKind>,
    /// How long a [`FaultKind::Stall`] holds a response, in milliseconds (default
    /// [`DEFAULT_STALL_MS`]).
    pub stall_ms: u64,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            rate: 0.0,
            seed: 0,
            kinds: FaultKind::ALL.to_vec(),
            stall_ms: DEFAULT_STALL_MS,
        }
    }
}

impl FaultConfig {
    /// True when faults will be injected.
    pub fn is_active(&self) -> bool {
        self.rate > 0.0 && !self.kinds.is_empty()
    }

    /// Checks the rate (0..=1) and that a positive rate has kinds to draw from.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.rate) {
            return Err(format!(
                "fault rate {}: give a fraction between 0 and 1, e.g. 0.1",
                self.rate
            ));
        }
        if self.rate > 0.0 && self.kinds.is_empty() {
            return Err("fault rate above 0 but no kinds of fault chosen".to_string());
        }
        Ok(())
    }
}

/// One fault drawn for one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// What goes wrong.
    pub kind: FaultKind,
    /// Where in the body it strikes, in bytes from the body's start. For `Reset` and `Stall`,
    /// `None` means before the response head. For `ShortBody` it is the number of bytes sent
    /// (always less than the body); for `BitFlip` the byte whose bit flips.
    pub at: Option<u64>,
    /// For `BitFlip`, the bit (0..8) that flips; for `ServerError`, an index choosing 500, 502
    /// or 503; otherwise 0.
    pub detail: u8,
}

impl Fault {
    /// For a `ServerError`, the status to answer with.
    pub fn status(&self) -> u16 {
        [500, 502, 503][usize::from(self.detail % 3)]
    }
}

/// Draws faults from a [`FaultConfig`] with a seeded generator; shared by all connections.
#[derive(Debug)]
pub struct FaultInjector {
    config: FaultConfig,
    rng: Mutex<SplitMix64>,
}

impl FaultInjector {
    /// A new injector; `None` when the config injects nothing.
    pub fn new(config: &FaultConfig) -> Option<Self> {
        config.is_active().then(|| FaultInjector {
            config: config.clone(),
            rng: Mutex::new(SplitMix64(config.seed)),
        })
    }

    /// The config this injector draws from.
    pub fn config(&self) -> &FaultConfig {
        &self.config
    }

    /// Draws the fault (if any) for a response whose body is `body_len` bytes. Faults that
    /// need a body (short body, bit flip) are drawn only for non-empty bodies; when the draw
    /// falls on one for an empty body, the response goes through unharmed.
    pub fn draw(&self, body_len: u64) -> Option<Fault> {
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        if rng.next_f64() >= self.config.rate {
            return None;
        }
        let kinds = &self.config.kinds;
        let kind = kinds[(rng.next_u64() % kinds.len() as u64) as usize];
        let r = rng.next_u64();
        let before_head = r & 1 == 0;
        let detail = (r >> 8) as u8;
        let at_in_body = |r: u64| (r >> 16) % body_len.max(1);
        let fault = match kind {
            FaultKind::Reset | FaultKind::Stall => Fault {
                kind,
                at: (!before_head && body_len > 0).then(|| at_in_body(r)),
                detail: 0,
            },
            FaultKind::ServerError => Fault {
                kind,
                at: None,
                detail,
            },
            FaultKind::ShortBody | FaultKind::BitFlip if body_len == 0 => return None,
            FaultKind::ShortBody => Fault {
                kind,
                at: Some(at_in_body(r)),
                detail: 0,
            },
            FaultKind::BitFlip => Fault {
                kind,
                at: Some(at_in_body(r)),
                detail: detail % 8,
            },
        };
        Some(fault)
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny seeded generator, good enough to pick faults.
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1): the top 53 bits as a fraction.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_draws_repeat_with_the_seed_and_respect_the_rate() {
        let config = FaultConfig {
            rate: 0.25,
            seed: 42,
            ..FaultConfig::default()
        };
        let a = FaultInjector::new(&config).expect("active");
        let b = FaultInjector::new(&config).expect("active");
        let da: Vec<_> = (0..4000).map(|_| a.draw(1000)).collect();
        let db: Vec<_> = (0..4000).map(|_| b.draw(1000)).collect();
        assert_eq!(da, db);
        let hits = da.iter().flatten().count();
        assert!(
            (800..1200).contains(&hits),
            "{hits} faults in 4000 at rate 0.25"
        );
        for kind in FaultKind::ALL {
            assert!(
                da.iter().flatten().any(|f| f.kind == kind),
                "{kind} never drawn"
            );
        }
        for f in da.iter().flatten() {
            if let Some(at) = f.at {
                assert!(at < 1000);
            }
        }
    }

    #[test]
    fn fault_kind_names_round_trip() {
        for kind in FaultKind::ALL {
            assert_eq!(kind.name().parse::<FaultKind>(), Ok(kind));
        }
        assert!("melt".parse::<FaultKind>().is_err());
    }

    #[test]
    fn validate_rejects_nonsense() {
        let mut c = LinkConfig::default();
        assert!(c.validate().is_ok() && c.is_perfect());
        c.bandwidth_mbit = Some(0.0);
        assert!(c.validate().is_err());
        c.bandwidth_mbit = Some(100.0);
        c.faults.rate = 1.5;
        assert!(c.validate().is_err());
        c.faults.rate = 0.1;
        c.faults.kinds.clear();
        assert!(c.validate().is_err());
    }
}
