//! The fetch options `incfs run` and `incfs mount` share: scheduler workers, the background
//! fill, and the read policy's two sizes (for measuring them; the defaults come from the
//! benchmarks).

use std::process::Command;

use clap::Args;
use incfs_fs::fetch::fill::FillConfig;
use incfs_fs::fs::FsConfig;

use crate::util::parse_size;

/// Options of the fetch scheduler.
#[derive(Args, Debug, Clone)]
pub struct FetchArgs {
    /// Fetch worker threads, so range requests in flight at most (4 of them serve demand
    /// misses only).
    #[arg(long, default_value_t = 16)]
    fetch_workers: usize,
    /// Do not fetch the rest of the image in the background (by default, after the plan,
    /// or at once without one, every chunk not yet local is fetched at the lowest priority
    /// so the app becomes fully local and works offline).
    #[arg(long)]
    no_fill: bool,
    /// Cap the background fill at this many Mbit/s (default: no cap; it only uses the
    /// link when no read or plan needs it).
    #[arg(long, value_name = "MBIT")]
    fill_bandwidth_mbit: Option<f64>,
    /// Stored bytes a demand miss outside the plan is widened by, over the chunks that
    /// follow it (K, M suffixes; 0 turns it off).
    #[arg(long, value_parser = parse_size, default_value = "256K")]
    miss_amplify: u64,
    /// Largest gap between planned chunks that one prefetch request bridges (K, M).
    #[arg(long, value_parser = parse_size, default_value = "16K")]
    bridge_gap: u64,
    /// Most runs of planned chunks asked for in one multi-range request, where the server
    /// answers those (1 asks for one range at a time).
    #[arg(long, default_value_t = 64)]
    ranges_per_request: usize,
    /// Stored bytes at which a multi-range prefetch request stops taking more runs (K, M).
    #[arg(long, value_parser = parse_size, default_value = "256K")]
    multi_range_bytes: u64,
    /// Do not queue the sections the dynamic loader reads (symbol tables, relocations,
    /// relocated data) when an ELF file no plan covers is first read.
    #[arg(long)]
    no_loader_hints: bool,
}

impl FetchArgs {
    /// Sets the scheduler's tunables in `fs`; returns the fill to start, if any.
    pub fn apply(&self, fs: &mut FsConfig) -> Option<FillConfig> {
        fs.fetch.workers = self.fetch_workers.max(2);
        fs.fetch.demand_workers = fs.fetch.demand_workers.min(fs.fetch.workers - 1);
        fs.fetch.miss_amplify_bytes = self.miss_amplify;
        fs.fetch.bridge_gap_bytes = self.bridge_gap;
        fs.fetch.ranges_per_request = self.ranges_per_request.max(1);
        fs.fetch.multi_range_bytes = self.multi_range_bytes;
        fs.fetch.loader_hints = !self.no_loader_hints;
        (!self.no_fill).then(|| FillConfig {
            bytes_per_sec: self
                .fill_bandwidth_mbit
                .filter(|m| *m > 0.0)
                .map(|m| m * 1e6 / 8.0),
        })
    }

    /// Passes the same options on to a daemon started as `cmd`.
    pub fn forward(&self, cmd: &mut Command) {
        cmd.arg("--fetch-workers")
            .arg(self.fetch_workers.to_string())
            .arg("--miss-amplify")
            .arg(self.miss_amplify.to_string())
            .arg("--bridge-gap")
            .arg(self.bridge_gap.to_string())
            .arg("--ranges-per-request")
            .arg(self.ranges_per_request.to_string())
            .arg("--multi-range-bytes")
            .arg(self.multi_range_bytes.to_string());
        if self.no_fill {
            cmd.arg("--no-fill");
        }
        if self.no_loader_hints {
            cmd.arg("--no-loader-hints");
        }
        if let Some(m) = self.fill_bandwidth_mbit {
            cmd.arg("--fill-bandwidth-mbit").arg(m.to_string());
        }
    }
}
