//! Load: 64 concurrent readers over a big image mounted from `incfs serve`, while the
//! prefetcher fetches the whole image in the background: random ranges and whole files,
//! every byte checked against the original tree. No read may fail or return wrong bytes,
//! and the daemon's peak RSS stays bounded.
//!
//! CI runs a short version (256 MiB, 20 s). `INCFS_LOAD_MIB`, `INCFS_LOAD_SECS` and
//! `INCFS_LOAD_READERS` change size, duration and readers; `scripts/soak.sh` runs the long
//! one (>= 1 GiB for minutes), whose figures are in docs/reliability.md.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use incfs_datasets::require::{Need, require};
use incfs_fs::format::{FileRef, Image, PackOptions, pack_dir};
use incfs_fs::link::LinkConfig;
use incfs_fs::serve::{ServeConfig, Server};

use common::daemon::{Daemon, ENV_PLAN, save_whole_files_plan};
use common::env_u64;

#[test]
#[ignore = "helper: run by the load test as its FUSE daemon"]
fn daemon_child() {
    common::daemon::child();
}

/// `len` bytes, half of them incompressible (BLAKE3 output) and half repetitive text, in
/// alternating 64 KiB blocks, so that both stored forms of a chunk occur.
fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut xof = blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof();
    for (i, block) in out.chunks_mut(64 * 1024).enumerate() {
        if i % 2 == 0 {
            xof.fill(block);
        } else {
            let text = format!("block {i} of file {seed}: the quick brown fox. ");
            for (b, t) in block.iter_mut().zip(text.bytes().cycle()) {
                *b = t;
            }
        }
    }
    out
}

/// A peak-RSS reading of a process: VmHWM from /proc/PID/status, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    bytes: AtomicU64,
    whole_files: AtomicU64,
}

/// One reader: until `stop`, reads a random range (or, one time in 16, a whole file of at
/// most 32 MiB) of a random file through the mount and compares it with the tree.
fn reader(
    id: u64,
    files: Arc<Vec<FileRef>>,
    tree: PathBuf,
    mnt: PathBuf,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (id + 1).wrapping_mul(0x1234_5678_9abc_def1));
    while !stop.load(Ordering::Relaxed) {
        let f = &files[rng.below(files.len() as u64) as usize];
        let rel = f.display_path();
        let (offset, len) = if rng.below(16) == 0 && f.size <= 32 << 20 {
            counters.whole_files.fetch_add(1, Ordering::Relaxed);
            (0, f.size)
        } else {
            let len = 1 + rng.below(256 * 1024).min(f.size - 1);
            (rng.below(f.size - len + 1), len)
        };
        let mut got = vec![0u8; len as usize];
        let mut want = vec![0u8; len as usize];
        fs::File::open(mnt.join(&rel))
            .and_then(|h| h.read_exact_at(&mut got, offset))
            .unwrap_or_else(|e| panic!("reader {id}: {rel} @ {offset}+{len}: {e}"));
        fs::File::open(tree.join(&rel))
            .and_then(|h| h.read_exact_at(&mut want, offset))
            .unwrap();
        assert!(
            got == want,
            "reader {id}: {rel} @ {offset}+{len}: wrong bytes"
        );
        counters.reads.fetch_add(1, Ordering::Relaxed);
        counters.bytes.fetch_add(len, Ordering::Relaxed);
    }
}

#[test]
fn many_readers_with_prefetch_get_right_bytes_in_bounded_memory() {
    if !require(
        "many_readers_with_prefetch_get_right_bytes_in_bounded_memory",
        &[Need::Root, Need::Fuse],
    ) {
        return;
    }
    let mib = env_u64("INCFS_LOAD_MIB", 256);
    let secs = env_u64("INCFS_LOAD_SECS", 20);
    let readers = env_u64("INCFS_LOAD_READERS", 64);
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    // Files from 64 KiB to 64 MiB (and a few empty-ish ones), in a few directories.
    let mut left = mib << 20;
    let mut i = 0u64;
    while left > 0 {
        let size =
            [64 << 10, 1 << 20, 3 << 20, 16 << 20, 64 << 20][i as usize % 5].min(left) + i % 7;
        let sub = tree.join(format!("d{}", i % 4));
        fs::create_dir_all(&sub).unwrap();
        fs::write(sub.join(format!("f{i}")), content(size as usize, i)).unwrap();
        left = left.saturating_sub(size);
        i += 1;
    }
    let img = dir.path().join("img");
    let t0 = Instant::now();
    let summary = pack_dir(&tree, &img, &PackOptions::default(), &()).unwrap();
    eprintln!(
        "packed {i} files, {mib} MiB in {:?}: {summary:?}",
        t0.elapsed()
    );
    let files = Arc::new(Image::open_path(&img, None).unwrap().files());
    let plan_path = dir.path().join("plan.json");
    save_whole_files_plan(&img, &plan_path);

    // A link on which fetching the whole image takes two thirds of the test (5 ms of
    // latency): demand misses and prefetch compete for most of it, then the readers go on
    // over a complete cache.
    let stored = fs::metadata(&img).unwrap().len() as f64;
    let mut cfg = ServeConfig::new(&img);
    cfg.link = LinkConfig {
        latency_ms: 5,
        bandwidth_mbit: Some(stored * 8.0 / 1e6 / (secs as f64 * 2.0 / 3.0)),
        ..LinkConfig::default()
    };
    let server = Server::start(cfg).unwrap();
    let (mnt, cache) = (dir.path().join("mnt"), dir.path().join("cache"));
    fs::create_dir_all(&mnt).unwrap();
    let env = [(ENV_PLAN, plan_path.to_string_lossy().into_owned())];
    let d = Daemon::start_with(&server.url("img"), &mnt, &cache, None, &env);

    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let start = Instant::now();
    let handles: Vec<_> = (0..readers)
        .map(|id| {
            let (files, tree, mnt) = (Arc::clone(&files), tree.clone(), mnt.clone());
            let (stop, counters) = (Arc::clone(&stop), Arc::clone(&counters));
            std::thread::spawn(move || reader(id, files, tree, mnt, stop, counters))
        })
        .collect();
    let mut samples = Vec::new();
    while start.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(1));
        let s = d.stats();
        samples.push((
            start.elapsed().as_secs(),
            s.chunks_local,
            peak_rss_kib(d.pid()),
        ));
        if handles.iter().any(|h| h.is_finished()) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut failed = 0;
    for h in handles {
        if h.join().is_err() {
            failed += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    assert_eq!(failed, 0, "{failed} readers failed (see above)");
    let s = d.stats();
    let peak = peak_rss_kib(d.pid());
    let bytes = counters.bytes.load(Ordering::Relaxed);
    eprintln!(
        "load: {mib} MiB image, {readers} readers, {elapsed:.1} s: {} reads ({} whole files), \
         {:.1} MiB read, {:.1} MiB/s; daemon peak RSS {:.1} MiB; chunks local {}/{}; \
         fetched {:.1} MiB in {} requests; demand misses {}, prefetch {:?}",
        counters.reads.load(Ordering::Relaxed),
        counters.whole_files.load(Ordering::Relaxed),
        bytes as f64 / 1048576.0,
        bytes as f64 / 1048576.0 / elapsed,
        peak as f64 / 1024.0,
        s.chunks_local,
        s.chunks_total,
        s.bytes_fetched as f64 / 1048576.0,
        s.requests,
        s.demand_misses,
        s.prefetch,
    );
    for (t, local, rss) in &samples {
        eprintln!("  t={t}s chunks_local={local} peak_rss={rss} KiB");
    }
    assert_eq!(s.read_errors, 0, "{s:?}");
    assert_eq!(s.fetch_errors, 0, "{s:?}");
    assert!(counters.reads.load(Ordering::Relaxed) > 0);
    assert!(
        s.demand_misses > 0,
        "no reader ever waited for the source: {s:?}"
    );
    // The daemon keeps no file data in memory (chunks go to the cache's files; the kernel's
    // page cache is not its RSS): its memory is the image metadata plus per-request buffers
    // (fetch workers x 4 MiB requests, FUSE threads x 1 MiB), independent of the image size.
    // 256 MiB leaves room for allocator slack in the debug build.
    assert!(peak < 256 * 1024, "daemon peak RSS {peak} KiB");
    d.unmount();
    server.shutdown();
}
