//! Planner at scale: 10 traces with 10 million events in total, planned against a synthetic
//! image, timed stage by stage, with the peak memory of the planning process.
//!
//! `cargo bench -p incfs-planner --bench plan_scale [-- --traces N --events M --keep DIR]`
//!
//! The parent generates the image and traces (or reuses them from `--keep DIR`), then runs
//! itself with `--plan-only DIR` so the peak RSS (`VmHWM`) is that of planning alone.
//!
//! Synthetic workload: 12 files of 16 MiB (192 MiB, 4 KiB chunks = 49,152 slots, so the
//! chunk-level aggregation is as large as a 4 KiB-chunk clang image). Each run walks a hot
//! set shared by all runs (5 % of the pages, 99.5 % of its page events, in the same order
//! with jitter) plus 0.5 % uniform noise, over one simulated second; events are 60 % fault, 20 % map_pages (16 pages), 10 %
//! get_pages (1..4 pages), 10 % add_to_cache, and 5 % name paths outside the image.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use incfs_fs::format::{PackOptions, pack_dir};
use incfs_planner::image_index::ImageIndex;
use incfs_planner::input::load_input;
use incfs_planner::pipeline::{MappedRun, PlanOptions, map_run, plan_runs};
use incfs_planner::report::report;
use incfs_planner::trace::{EventKind, TraceEvent, TraceMeta, write_trace};

const FILES: usize = 12;
const FILE_BYTES: usize = 16 << 20;
const CHUNK: u32 = 4096;
const PAGES_PER_FILE: u64 = (FILE_BYTES / 4096) as u64;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn generate(dir: &Path, traces: usize, events: usize) -> anyhow::Result<()> {
    let tree = dir.join("tree");
    std::fs::create_dir_all(&tree)?;
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    for f in 0..FILES {
        // Half noise, half text-like: compresses about 2:1 like real libraries.
        let data: Vec<u8> = (0..FILE_BYTES)
            .map(|i| {
                if (i / 4096) % 2 == 0 {
                    rng.next() as u8
                } else {
                    b'a' + (i % 23) as u8
                }
            })
            .collect();
        std::fs::write(tree.join(format!("lib{f}.so")), data)?;
    }
    let t = Instant::now();
    pack_dir(
        &tree,
        &dir.join("img.incfs"),
        &PackOptions {
            chunk_size: CHUNK,
            level: 1,
            ..PackOptions::default()
        },
        &(),
    )?;
    eprintln!(
        "packed 192 MiB at 4 KiB chunks in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    std::fs::remove_dir_all(&tree)?;
    let per = events / traces;
    // The hot set: 5 % of the image's pages, which every run touches, in a fixed order.
    let hot: Vec<(usize, u64)> = (0..(FILES as u64 * PAGES_PER_FILE / 20))
        .map(|_| (rng.below(FILES as u64) as usize, rng.below(PAGES_PER_FILE)))
        .collect();
    for r in 0..traces {
        let t = Instant::now();
        let mut rng = Rng(0x9E37_79B9 + r as u64 * 7919);
        let mut evs = Vec::with_capacity(per);
        for i in 0..per {
            let ts_ns = (i as u64 * 1_000_000_000) / per as u64 + rng.below(2_000_000);
            // Walk the hot set in order (each page many times), with 0.5 % noise.
            let (file, page) = if rng.below(200) != 0 {
                hot[(i * hot.len() / per + rng.below(64) as usize) % hot.len()]
            } else {
                (rng.below(FILES as u64) as usize, rng.below(PAGES_PER_FILE))
            };
            let k = rng.below(10);
            let (kind, count) = match k {
                0..=5 => (EventKind::Fault, 1),
                6 | 7 => (EventKind::MapPages, 16),
                8 => (EventKind::GetPages, 1 + rng.below(4) as u32),
                _ => (EventKind::AddToCache, 1),
            };
            let path = if rng.below(20) == 0 {
                format!("/usr/lib/other{}.so", rng.below(50))
            } else {
                format!("/rec/lib{file}.so")
            };
            evs.push(TraceEvent {
                ts_ns,
                pid: 100,
                tid: 100 + rng.below(4) as u32,
                comm: "app".into(),
                kind,
                dev: 2049,
                ino: file as u64 + 10,
                path: Some(path),
                first_page: page.min(PAGES_PER_FILE - u64::from(count)),
                page_count: count,
            });
        }
        let meta = TraceMeta {
            command: vec!["app".into()],
            kernel: "6.18".into(),
            page_size: 4096,
            roots: vec!["/rec".into()],
            start_unix_ns: 0,
            tool_version: "bench".into(),
            lost_events: 0,
            ..TraceMeta::default()
        };
        write_trace(&dir.join(format!("run{r:02}.parquet")), &meta, &evs)?;
        eprintln!(
            "trace {r}: {per} events in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    std::fs::write(dir.join(".complete"), format!("{traces} {events} v3"))?;
    Ok(())
}

fn vm_hwm_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn plan_only(dir: &Path) -> anyhow::Result<()> {
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    inputs.sort();
    let opts = PlanOptions::default();
    let t0 = Instant::now();
    let index = ImageIndex::open(&dir.join("img.incfs"), None)?;
    let t_index = t0.elapsed().as_secs_f64();
    let mut events = 0;
    let mut runs: Vec<MappedRun> = Vec::new();
    let (mut t_load, mut t_map) = (0.0, 0.0);
    for p in &inputs {
        let t = Instant::now();
        let raw = load_input(p, index.chunk_size, opts.touch)?;
        t_load += t.elapsed().as_secs_f64();
        events += raw.events;
        let t = Instant::now();
        runs.push(map_run(&raw, &index, &opts)?);
        t_map += t.elapsed().as_secs_f64();
    }
    let t = Instant::now();
    let refs: Vec<&MappedRun> = runs.iter().collect();
    let (plan, stats) = plan_runs(&refs, &index, &opts)?;
    plan.save(&dir.join("plan.json"))?;
    let t_plan = t.elapsed().as_secs_f64();
    let total = t0.elapsed().as_secs_f64();
    let hwm_plan = vm_hwm_mib();
    let t = Instant::now();
    let r = report(&plan, &index, &runs, &opts, 12.5e6)?;
    let t_report = t.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "traces": inputs.len(), "events": events,
            "index_s": t_index, "load_s": t_load, "map_s": t_map, "plan_s": t_plan,
            "total_s": total, "peak_rss_mib": hwm_plan,
            "report_s": t_report, "peak_rss_with_report_mib": vm_hwm_mib(),
            "entries": plan.entries.len(), "plan_bytes": plan.total_bytes,
            "touched_chunks": stats.touched_chunks, "kept_chunks": stats.kept_chunks,
            "loo_hit_rate": r.loo_hit_rate, "loo_overfetch": r.loo_overfetch,
        })
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    if let Some(dir) = get("--plan-only") {
        return plan_only(Path::new(dir));
    }
    let traces: usize = get("--traces").map_or(Ok(10), |s| s.parse())?;
    let events: usize = get("--events").map_or(Ok(10_000_000), |s| s.parse())?;
    let tmp;
    let dir = match get("--keep") {
        Some(d) => PathBuf::from(d),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let stamp = std::fs::read_to_string(dir.join(".complete")).unwrap_or_default();
    if stamp != format!("{traces} {events} v3") {
        generate(&dir, traces, events)?;
    }
    let out = Command::new(std::env::current_exe()?)
        .arg("--plan-only")
        .arg(&dir)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "planning failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}
