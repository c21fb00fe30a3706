//! Cold fetch throughput: `HttpSource` reading a whole image from `incfs serve` (or any URL).
//!
//! ```sh
//! cargo run --release -p incfs-fs --example http_throughput -- [--size-mb 512] \
//!     [--url http://127.0.0.1:8080/img] [--passes 3] [--latency-ms N] [--bandwidth-mbit N]
//! ```
//!
//! Without `--url` it writes a file of `--size-mb` MiB of incompressible bytes to a temp dir
//! and starts `incfs serve` on it in process (loopback, no emulation). Each case reads every
//! byte once with range requests of one size from several threads, as the fetcher does, and
//! reports file data per second (MB = 10^6 bytes). `--latency-ms` and `--bandwidth-mbit`
//! emulate a link on the in-process server (to check the emulation itself). "Cold" is the client's side: nothing is
//! cached by it; the server reads from the page cache. Prints one JSON object per case, then
//! the round-trip cost of 4 KiB requests made one after another.

use std::error::Error;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use incfs_fs::link::LinkConfig;
use incfs_fs::serve::{ServeConfig, Server};
use incfs_fs::source::{HttpConfig, HttpSource, RequestKind, Source};

/// (range size, threads): one long prefetch range at a time, coalesced prefetch in
/// parallel, and demand-sized ranges in parallel.
const CASES: [(u64, usize); 4] = [(16 << 20, 1), (4 << 20, 4), (1 << 20, 4), (64 << 10, 8)];

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    let size_mb: u64 = arg(&args, "--size-mb").map_or(Ok(512), |s| s.parse())?;
    let passes: usize = arg(&args, "--passes").map_or(Ok(3), |s| s.parse())?;
    let link = LinkConfig {
        latency_ms: arg(&args, "--latency-ms").map_or(Ok(0), |s| s.parse())?,
        bandwidth_mbit: arg(&args, "--bandwidth-mbit")
            .map(|s| s.parse())
            .transpose()?,
        ..LinkConfig::default()
    };

    let dir = tempfile::tempdir()?;
    let (url, _server, local) = match arg(&args, "--url") {
        Some(url) => (url, None, None),
        None => {
            let path = dir.path().join("image.bin");
            let mut f = File::create(&path)?;
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let mut buf = vec![0u8; 1 << 20];
            for _ in 0..size_mb {
                for w in buf.chunks_exact_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    w.copy_from_slice(&x.to_le_bytes());
                }
                f.write_all(&buf)?;
            }
            drop(f);
            let mut config = ServeConfig::new(&path);
            config.link = link;
            let server = Server::start(config)?;
            (
                server.url("image.bin"),
                Some(server),
                Some(File::open(&path)?),
            )
        }
    };
    let src = HttpSource::open(&url, &HttpConfig::default())?;
    let total = src.len();
    eprintln!("{url}: {total} bytes");

    for (range, threads) in CASES {
        for pass in 0..passes {
            let next = AtomicU64::new(0);
            let t = Instant::now();
            std::thread::scope(|s| -> Result<(), String> {
                let workers: Vec<_> = (0..threads)
                    .map(|_| {
                        s.spawn(|| -> Result<(), String> {
                            loop {
                                let off = next.fetch_add(range, Ordering::Relaxed);
                                if off >= total {
                                    return Ok(());
                                }
                                let n = range.min(total - off);
                                let data = src
                                    .read_range(off, n, RequestKind::Prefetch)
                                    .map_err(|e| e.to_string())?;
                                // Spot-check the ends of every range against the file.
                                if let Some(f) = &local {
                                    let k = n.min(64) as usize;
                                    let mut head = vec![0; k];
                                    let mut tail = vec![0; k];
                                    f.read_exact_at(&mut head, off).map_err(|e| e.to_string())?;
                                    f.read_exact_at(&mut tail, off + n - k as u64)
                                        .map_err(|e| e.to_string())?;
                                    if data[..k] != head[..] || data[n as usize - k..] != tail[..] {
                                        return Err(format!("wrong bytes at {off}+{n}"));
                                    }
                                }
                            }
                        })
                    })
                    .collect();
                for w in workers {
                    w.join().map_err(|_| "a reader panicked".to_string())??;
                }
                Ok(())
            })?;
            let secs = t.elapsed().as_secs_f64();
            println!(
                "{{\"range_bytes\":{range},\"threads\":{threads},\"pass\":{pass},\"bytes\":{total},\
                 \"seconds\":{secs:.4},\"mb_per_s\":{:.1}}}",
                total as f64 / secs / 1e6
            );
        }
    }
    // Round trips: one thread, 4 KiB ranges at scattered offsets, one after another (what a
    // single blocked demand miss costs beyond the link).
    let count = 5_000u64;
    let t = Instant::now();
    for i in 0..count {
        let off = (i * 7_919 * 4096) % (total - 4096);
        src.read_range(off, 4096, RequestKind::Demand)?;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{{\"range_bytes\":4096,\"threads\":1,\"requests\":{count},\"seconds\":{secs:.4},\
         \"requests_per_s\":{:.0},\"us_per_request\":{:.1}}}",
        count as f64 / secs,
        secs * 1e6 / count as f64
    );
    Ok(())
}
