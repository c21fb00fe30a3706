//! The prefetcher over the fetch scheduler and a mock source: it walks the plan before any
//! read, a hot-first image's plan travels in a few long requests, demand misses overtake
//! queued prefetch, and the window jumps forward when the program does.

mod common;

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use incfs_fs::cache::ChunkCache;
use incfs_fs::fetch::{FetchConfig, Fetcher, Priority};
use incfs_fs::format::{Image, PackOptions, RelayoutOptions, pack_dir, read_head, relayout};
use incfs_fs::prefetch::{PrefetchConfig, Prefetcher};
use incfs_fs::source::{MetaReader, MockSource, RequestKind, Source};
use incfs_fs::table::LazyTable;

const CHUNK: u64 = 4096;

/// An image of one 400-chunk file of incompressible bytes (so stored = raw = 4 KiB).
fn image(dir: &std::path::Path) -> Vec<u8> {
    one_file_image(dir, &common::noise(400 * CHUNK as usize, 7))
}

/// An image of one file `big` holding `data`, at 4 KiB chunks.
fn one_file_image(dir: &std::path::Path, data: &[u8]) -> Vec<u8> {
    let tree = dir.join("tree");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("big"), data).unwrap();
    let out = dir.join("a.img");
    let opts = PackOptions {
        chunk_size: CHUNK as u32,
        ..PackOptions::default()
    };
    pack_dir(&tree, &out, &opts, &()).unwrap();
    fs::read(out).unwrap()
}

/// `n` chunks of text, distinct and compressible.
fn text_chunks(n: u64) -> Vec<u8> {
    (0..n)
        .flat_map(|i| {
            let mut b = format!("{i:011} ").into_bytes().repeat(342);
            b.truncate(CHUNK as usize);
            b
        })
        .collect()
}

/// The image `bytes` relaid out hot-first for `plan` (written under `dir`).
fn relaid(dir: &std::path::Path, bytes: Vec<u8>, plan: &[u64], opts: &RelayoutOptions) -> Vec<u8> {
    let img = Image::open(bytes, None).unwrap();
    let out = dir.join("hot.img");
    relayout(&img, plan, &out, opts).unwrap();
    fs::read(out).unwrap()
}

/// Runs the prefetcher over `plan` (distinct slots) until it is all local; returns the
/// source's requests.
fn prefetch_all(r: &Rig, plan: &[u64]) -> Vec<incfs_fs::source::MockRequest> {
    let p = Prefetcher::start(
        Arc::clone(&r.fetcher),
        Arc::clone(&r.table),
        plan,
        PrefetchConfig::default(),
    )
    .unwrap();
    wait_until("the plan to be local", || {
        p.stats().planned_local == plan.len() as u64
    });
    r.source.requests()
}

struct Rig {
    source: Arc<MockSource>,
    fetcher: Arc<Fetcher>,
    table: Arc<LazyTable>,
    _cache_dir: tempfile::TempDir,
}

fn rig(bytes: Vec<u8>) -> Rig {
    let source = Arc::new(MockSource::new(bytes));
    let head = read_head(&MetaReader(&*source), None).unwrap();
    let dyn_source: Arc<dyn Source> = source.clone();
    let table = Arc::new(
        LazyTable::open(
            Arc::clone(&dyn_source),
            &head,
            FetchConfig::default().retry(),
        )
        .unwrap(),
    );
    let (header, manifest) = (head.header, head.manifest);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(cache_dir.path(), &header.root_digest, &manifest, &table).unwrap();
    source.clear_requests();
    let fetcher = Fetcher::new(
        dyn_source,
        header.data_offset,
        &manifest.dictionaries,
        Arc::clone(&table),
        cache,
        FetchConfig::default(),
    )
    .unwrap();
    Rig {
        source,
        fetcher: Arc::new(fetcher),
        table,
        _cache_dir: cache_dir,
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_hot_first_plan_is_fetched_before_any_read_in_few_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = image(tmp.path());
    // Plan: 100 scattered chunks, in a scrambled order.
    let plan: Vec<u64> = (0..100u64).map(|i| (i * 37) % 400).collect();
    // Relay the image so the plan's chunks lead the data section, in plan order.
    let r = rig(relaid(
        tmp.path(),
        bytes,
        &plan,
        &RelayoutOptions::default(),
    ));
    let reqs = prefetch_all(&r, &plan);
    assert!(reqs.iter().all(|q| q.kind == RequestKind::Prefetch));
    assert!(
        reqs.len() <= 3,
        "{} requests for a hot-first plan: {reqs:?}",
        reqs.len()
    );
    assert_eq!(reqs.iter().map(|q| q.len).sum::<u64>(), 100 * CHUNK);
    // Nothing outside the plan was fetched.
    assert_eq!(r.fetcher.cache().local_chunks(), 100);
}

#[test]
fn a_demand_miss_overtakes_queued_prefetch() {
    let tmp = tempfile::tempdir().unwrap();
    let r = rig(image(tmp.path()));
    r.source.set_delay(Duration::from_millis(30));
    // A scattered plan: 150 separate requests, far more than the workers can carry at once.
    let plan: Vec<u64> = (0..150u64).map(|i| i * 2).collect();
    let cfg = PrefetchConfig {
        window_bytes: u64::MAX,
    };
    let p = Prefetcher::start(Arc::clone(&r.fetcher), Arc::clone(&r.table), &plan, cfg).unwrap();
    wait_until("prefetch to start", || !r.source.requests().is_empty());
    r.fetcher.fetch(&[399], Priority::Demand).unwrap();
    let reqs = r.source.requests();
    let demand_at = reqs
        .iter()
        .position(|q| q.kind == RequestKind::Demand)
        .unwrap();
    assert!(
        demand_at < 10,
        "the demand request was #{demand_at} of {}",
        reqs.len()
    );
    wait_until("the plan to be local", || p.stats().planned_local == 150);
}

#[test]
fn the_window_jumps_forward_with_the_program() {
    let tmp = tempfile::tempdir().unwrap();
    let r = rig(image(tmp.path()));
    r.source.set_delay(Duration::from_millis(20));
    let plan: Vec<u64> = (0..400u64).step_by(2).collect(); // 200 non-adjacent chunks
    let cfg = PrefetchConfig {
        window_bytes: 8 * CHUNK,
    };
    let p = Prefetcher::start(Arc::clone(&r.fetcher), Arc::clone(&r.table), &plan, cfg).unwrap();
    wait_until("prefetch to start", || !r.source.requests().is_empty());
    // The program reads plan entry 150 (slot 300): the window jumps there.
    p.on_read(0, 300, 300, false);
    r.fetcher.fetch(&[300], Priority::Demand).unwrap();
    wait_until("the rest of the plan", || {
        (150..200).all(|i| r.fetcher.cache().is_local(plan[i]))
    });
    let s = p.stats();
    assert_eq!(s.skips, 1);
    assert_eq!(s.prefetch_misses, 1);
    // Entries between the first window and the jump were skipped, not fetched.
    let skipped_local = (20..150)
        .filter(|&i| r.fetcher.cache().is_local(plan[i]))
        .count();
    assert_eq!(
        skipped_local, 0,
        "the prefetcher filled in chunks the program went past"
    );
}

#[test]
fn a_jump_takes_what_the_window_had_queued_behind_it_off_the_queue() {
    let tmp = tempfile::tempdir().unwrap();
    let r = rig(image(tmp.path()));
    r.source.set_delay(Duration::from_millis(200));
    // 40 ranges too far apart to bridge, all queued at once (the window holds the plan).
    let plan: Vec<u64> = (0..400u64).step_by(10).collect();
    let cfg = PrefetchConfig {
        window_bytes: u64::MAX,
    };
    let p = Prefetcher::start(Arc::clone(&r.fetcher), Arc::clone(&r.table), &plan, cfg).unwrap();
    wait_until("prefetch to start", || !r.source.requests().is_empty());
    // The program reads plan entry 30 (slot 300) while the first requests are in flight.
    p.on_read(0, 300, 300, false);
    r.fetcher.fetch(&[300], Priority::Demand).unwrap();
    wait_until("the rest of the plan", || {
        (30..40).all(|i| r.fetcher.cache().is_local(plan[i]))
    });
    // What was queued (not yet in flight) between the window's start and the jump was
    // dropped, not fetched.
    let fetched_behind = (16..30)
        .filter(|&i| r.fetcher.cache().is_local(plan[i]))
        .count();
    assert_eq!(
        fetched_behind, 0,
        "chunks the program went past were fetched"
    );
}

/// Regression: a streamed run that holds two slots sharing one stored chunk (identical files)
/// past the first MiB must not drop those bytes before the second slot is served.
#[test]
fn deduplicated_chunks_in_one_long_request_are_all_served() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    let data = common::noise(3 << 20, 11);
    fs::write(tree.join("a"), &data).unwrap();
    fs::write(tree.join("b"), &data).unwrap();
    let out = tmp.path().join("d.img");
    let opts = PackOptions {
        chunk_size: 65536,
        ..PackOptions::default()
    };
    pack_dir(&tree, &out, &opts, &()).unwrap();
    let r = rig(fs::read(&out).unwrap());
    let n = r.table.len();
    assert_eq!(n, 96);
    // Interleaved a0, b0, a1, b1, …: each pair shares stored bytes.
    let slots: Vec<u64> = (0..48).flat_map(|i| [i, 48 + i]).collect();
    r.fetcher.fetch(&slots, Priority::Demand).unwrap();
    assert!((0..n).all(|s| r.fetcher.cache().is_local(s)));
    let reqs = r.source.requests();
    assert!(reqs.len() <= 3, "{} requests", reqs.len());
    assert_eq!(reqs.iter().map(|q| q.len).sum::<u64>(), 3 << 20);
}

/// A hot-first image whose chunk table is too big for the mount's first read: the plan's
/// entries lead the table (so they came with that read) and its chunks come in one or two
/// requests, however scattered the planned slots were in the original image.
#[test]
fn a_hot_first_plan_with_a_lazy_table_takes_at_most_three_requests() {
    let tmp = tempfile::tempdir().unwrap();
    // 10 table segments; distinct, compressible chunks.
    let n = 10 * incfs_fs::format::SEGMENT_ENTRIES as u64;
    let bytes = one_file_image(tmp.path(), &text_chunks(n));
    // 200 slots scattered over every segment, in a scrambled order.
    let plan: Vec<u64> = (0..200u64).map(|i| (i * 7919) % n).collect();
    let r = rig(relaid(
        tmp.path(),
        bytes,
        &plan,
        &RelayoutOptions::default(),
    ));
    let before = r.table.stats();
    assert!(before.segments_loaded < before.segments_total);
    let reqs = prefetch_all(&r, &plan);
    assert!(
        reqs.len() <= 3,
        "{} requests for a hot-first plan: {reqs:?}",
        reqs.len()
    );
    // The planned slots' entries lead the relaid table: they came with the first read.
    assert_eq!(r.table.stats().requests, 0, "{reqs:?}");
    assert_eq!(r.fetcher.cache().local_chunks(), 200);
}

/// A miss in a frame of several chunks fetches the frame once and stores every chunk of it:
/// the next reads in the frame are local.
#[test]
fn a_miss_in_a_shared_frame_stores_the_whole_frame() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = one_file_image(tmp.path(), &text_chunks(64));
    let img = Image::open(bytes, None).unwrap();
    let hot = tmp.path().join("hot.img");
    let frames = RelayoutOptions {
        frame_bytes: 16 * CHUNK as u32,
        level: 19,
    };
    let plan: Vec<u64> = (0..64).collect();
    let s = relayout(&img, &plan, &hot, &frames).unwrap();
    assert_eq!(s.hot_frames, 4);
    let r = rig(fs::read(&hot).unwrap());
    r.fetcher.fetch(&[20], Priority::Demand).unwrap();
    assert_eq!(r.source.requests().len(), 1);
    assert!((16..32).all(|s| r.fetcher.cache().is_local(s)));
    assert_eq!(r.fetcher.cache().local_chunks(), 16);
    r.fetcher.fetch(&[31, 16], Priority::Demand).unwrap();
    assert_eq!(
        r.source.requests().len(),
        1,
        "the frame is not fetched again"
    );
    assert_eq!(r.fetcher.stats().chunks_fetched, 16);
}
