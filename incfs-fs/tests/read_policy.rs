//! The read path's policy, over a mock source and without a mount: small files come whole,
//! a miss is widened over the chunks that follow it, a sequential reader's window grows so
//! a 64 MiB read takes few requests, a read never blocks its caller while it waits, a
//! reader that waits too long gets an error (and the next read works), a plan on a layout
//! not made for it is bridged into few requests with many in flight (and shares requests
//! where the server answers several ranges in one), and the background
//! fill makes the image local without ever going before a reader.

mod common;

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::TryRecvError;
use std::time::{Duration, Instant};

use incfs_fs::elf;
use incfs_fs::fetch::fill::FillConfig;
use incfs_fs::fetch::{FetchConfig, Priority};
use incfs_fs::format::{Header, Image, PackOptions, pack_dir};
use incfs_fs::fs::{FsConfig, IncFs};
use incfs_fs::link::LinkConfig;
use incfs_fs::source::{MockRequest, MockSource, RequestKind, Source, ThrottledSource};

const CHUNK: u64 = 4096;

/// Packs `files` (name, bytes) at 4 KiB chunks; returns the image bytes and its header.
fn pack(dir: &Path, files: &[(&str, Vec<u8>)]) -> (Vec<u8>, Header) {
    let tree = dir.join("tree");
    fs::create_dir_all(&tree).unwrap();
    for (name, data) in files {
        fs::write(tree.join(name), data).unwrap();
    }
    let out = dir.join("a.img");
    let opts = PackOptions {
        chunk_size: CHUNK as u32,
        ..PackOptions::default()
    };
    pack_dir(&tree, &out, &opts, &()).unwrap();
    let bytes = fs::read(out).unwrap();
    let header = Image::open(bytes.clone(), None).unwrap().header().clone();
    (bytes, header)
}

/// The scheduler's defaults with quick retries and the given amplification.
fn fetch_config(amplify: u64) -> FetchConfig {
    FetchConfig {
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        max_attempts: 3,
        miss_amplify_bytes: amplify,
        ..FetchConfig::default()
    }
}

fn mount(src: Arc<dyn Source>, cache: &Path, fetch: FetchConfig) -> Arc<IncFs> {
    let mut cfg = FsConfig::new(cache.to_path_buf());
    cfg.fetch = fetch;
    Arc::new(IncFs::new(src, &cfg).unwrap())
}

fn ino(fs: &IncFs, name: &str) -> u64 {
    fs.lookup(1, name.as_bytes()).unwrap().ino
}

/// Requests for chunk data (not table segments or metadata).
fn data_requests(src: &MockSource, h: &Header) -> Vec<MockRequest> {
    src.requests()
        .into_iter()
        .filter(|r| r.offset >= h.data_offset)
        .collect()
}

fn text(len: usize, seed: u64) -> Vec<u8> {
    let line = format!("line {seed} of some text that compresses\n").into_bytes();
    let mut out = line.repeat(len / line.len() + 1);
    out.truncate(len);
    out
}

#[test]
fn a_small_file_comes_whole_with_its_first_read() {
    let tmp = tempfile::tempdir().unwrap();
    let a = text(40 * 1024, 1);
    let b = common::noise(200 * 1024, 2);
    let (bytes, h) = pack(tmp.path(), &[("a", a.clone()), ("b", b.clone())]);
    let src = Arc::new(MockSource::new(bytes));
    let fs = mount(src.clone(), &tmp.path().join("cache"), fetch_config(0));
    src.clear_requests();
    for (name, want) in [("a", &a), ("b", &b)] {
        let ino = ino(&fs, name);
        let (fh, _) = fs.open(ino).unwrap();
        let before = data_requests(&src, &h).len();
        assert_eq!(fs.read(ino, fh, 0, 4096).unwrap(), want[..4096]);
        // The rest of the file is read without another request.
        let mut off = 4096u64;
        while off < want.len() as u64 {
            let got = fs.read(ino, fh, off, 64 * 1024).unwrap();
            assert_eq!(got, want[off as usize..(off as usize + got.len())]);
            off += got.len() as u64;
        }
        let reqs = data_requests(&src, &h);
        assert_eq!(reqs.len() - before, 1, "{name}: {reqs:?}");
        fs.release(fh);
    }
    fs.shutdown().unwrap();
}

#[test]
fn a_miss_is_widened_over_the_chunks_that_follow_it() {
    let tmp = tempfile::tempdir().unwrap();
    let big = common::noise(256 * CHUNK as usize, 3); // incompressible: stored = 4 KiB
    let (bytes, h) = pack(tmp.path(), &[("big", big.clone())]);
    let src = Arc::new(MockSource::new(bytes));
    let fs = mount(
        src.clone(),
        &tmp.path().join("cache"),
        fetch_config(16 * CHUNK),
    );
    src.clear_requests();
    let ino = ino(&fs, "big");
    let (fh, _) = fs.open(ino).unwrap();
    // A page fault in the middle: its chunk and the 16 after it, in one request.
    assert_eq!(
        fs.read(ino, fh, 100 * CHUNK, 4096).unwrap(),
        big[100 * CHUNK as usize..101 * CHUNK as usize]
    );
    let reqs = data_requests(&src, &h);
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0].len, 17 * CHUNK);
    assert_eq!(reqs[0].kind, RequestKind::Demand);
    // A fault among the widened chunks is a hit; one far away is a new (widened) request.
    fs.read(ino, fh, 110 * CHUNK, 4096).unwrap();
    assert_eq!(data_requests(&src, &h).len(), 1);
    fs.read(ino, fh, 10 * CHUNK, 4096).unwrap();
    let reqs = data_requests(&src, &h);
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].len, 17 * CHUNK);
    // Widening stops at chunks already local: a miss just before them takes only the gap.
    fs.read(ino, fh, 95 * CHUNK, 4096).unwrap();
    assert_eq!(data_requests(&src, &h)[2].len, 5 * CHUNK);
    assert_eq!(fs.stats().chunks_local, 17 + 17 + 5);
    fs.shutdown().unwrap();
}

#[test]
fn a_sequential_read_of_64_mib_takes_few_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 64usize << 20;
    let big = common::noise(size, 4);
    let (bytes, _) = pack(tmp.path(), &[("big", big.clone())]);
    let mock = Arc::new(MockSource::new(bytes));
    let link = LinkConfig {
        latency_ms: 2,
        ..LinkConfig::default()
    };
    let src = Arc::new(ThrottledSource::new(Arc::clone(&mock), link));
    let fs = mount(src, &tmp.path().join("cache"), FetchConfig::default());
    mock.clear_requests();
    let ino = ino(&fs, "big");
    let (fh, _) = fs.open(ino).unwrap();
    // As the kernel reads a file a program streams: 128 KiB at a time.
    let mut off = 0usize;
    while off < size {
        let got = fs.read(ino, fh, off as u64, 128 * 1024).unwrap();
        assert!(
            got == big[off..off + got.len()],
            "wrong bytes at offset {off}"
        );
        off += got.len();
    }
    let reqs = mock.requests();
    assert!(
        reqs.len() <= 20,
        "{} requests (table and data) for a sequential 64 MiB read: {reqs:?}",
        reqs.len()
    );
    fs.shutdown().unwrap();
}

#[test]
fn a_read_does_not_block_its_caller_while_it_waits() {
    let tmp = tempfile::tempdir().unwrap();
    // Larger than a small file, which would come whole in one request.
    let big = common::noise(128 * CHUNK as usize, 5);
    let (bytes, _) = pack(tmp.path(), &[("big", big.clone())]);
    let src = Arc::new(MockSource::new(bytes));
    let fs = mount(src.clone(), &tmp.path().join("cache"), fetch_config(0));
    src.set_delay(Duration::from_millis(500));
    let ino = ino(&fs, "big");
    let (fh, _) = fs.open(ino).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..8u64 {
        let tx = tx.clone();
        fs.read_then(ino, fh, i * 8 * CHUNK, 4096, move |r| {
            let _ = tx.send((i, r));
        });
    }
    // Every call has returned while the source is still sleeping on the first request.
    assert!(matches!(rx.try_recv(), Err(TryRecvError::Empty)));
    for _ in 0..8 {
        let (i, r) = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        let at = (i * 8 * CHUNK) as usize;
        assert_eq!(r.unwrap(), big[at..at + 4096]);
    }
    // They waited together, not one after another on a few threads.
    assert!(src.peak_in_flight() >= 8, "{}", src.peak_in_flight());
    fs.shutdown().unwrap();
}

#[test]
fn a_reader_that_waits_too_long_gets_an_error_and_the_next_read_works() {
    let tmp = tempfile::tempdir().unwrap();
    let big = common::noise(16 * CHUNK as usize, 6);
    let (bytes, _) = pack(tmp.path(), &[("big", big.clone())]);
    let src = Arc::new(MockSource::new(bytes));
    let mut cfg = fetch_config(0);
    cfg.retry_timeout = Duration::from_millis(500);
    let fs = mount(src.clone(), &tmp.path().join("cache"), cfg);
    let ino = ino(&fs, "big");
    let (fh, _) = fs.open(ino).unwrap();
    src.set_delay(Duration::from_secs(3));
    let t = Instant::now();
    let err = fs.read(ino, fh, 0, 4096).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "answered after {:?}",
        t.elapsed()
    );
    assert!(err.to_string().contains("retry timeout"), "{err}");
    assert_eq!(fs.stats().reads_timed_out, 1);
    // The source answers again: the next read gets the bytes, no remount.
    src.set_delay(Duration::ZERO);
    let got = loop {
        match fs.read(ino, fh, 0, 4096) {
            Ok(b) => break b,
            Err(_) => assert!(t.elapsed() < Duration::from_secs(20)),
        }
    };
    assert_eq!(got, big[..4096]);
    fs.shutdown().unwrap();
}

#[test]
fn a_scattered_plan_is_bridged_into_few_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let big = common::noise(400 * CHUNK as usize, 7);
    let (bytes, h) = pack(tmp.path(), &[("big", big)]);
    let src = Arc::new(MockSource::new(bytes));
    let mut cfg = fetch_config(0);
    cfg.bridge_gap_bytes = 4 * CHUNK;
    let fs = mount(src.clone(), &tmp.path().join("cache"), cfg);
    src.clear_requests();
    // Every third chunk: gaps of two chunks, within the bridge.
    let plan: Vec<u64> = (0..400).step_by(3).collect();
    fs.fetcher().submit(&plan, Priority::Prefetch);
    fs.fetcher().fetch(&plan, Priority::Prefetch).unwrap();
    let reqs = data_requests(&src, &h);
    assert!(reqs.len() <= 4, "{} requests: {reqs:?}", reqs.len());
    fs.shutdown().unwrap();
}

#[test]
fn far_apart_planned_ranges_are_in_flight_together() {
    let tmp = tempfile::tempdir().unwrap();
    let big = common::noise(1000 * CHUNK as usize, 8);
    let (bytes, _) = pack(tmp.path(), &[("big", big)]);
    let src = Arc::new(MockSource::new(bytes));
    let fs = mount(src.clone(), &tmp.path().join("cache"), fetch_config(0));
    src.set_delay(Duration::from_millis(50));
    // 40 ranges 25 chunks apart: too far to bridge.
    let plan: Vec<u64> = (0..1000).step_by(25).collect();
    fs.fetcher().submit(&plan, Priority::Prefetch);
    fs.fetcher().fetch(&plan, Priority::Prefetch).unwrap();
    let peak = src.peak_in_flight();
    assert!(peak >= 8, "only {peak} requests in flight at once");
    fs.shutdown().unwrap();
}

#[test]
fn far_apart_planned_ranges_share_requests_where_the_server_takes_several() {
    use incfs_fs::serve::{ServeConfig, Server};
    use incfs_fs::source::{HttpConfig, HttpSource};
    let tmp = tempfile::tempdir().unwrap();
    let big = common::noise(1000 * CHUNK as usize, 9);
    let (bytes, h) = pack(tmp.path(), &[("big", big.clone())]);
    let img = tmp.path().join("served.img");
    fs::write(&img, &bytes).unwrap();
    // 40 chunks 25 apart (too far to bridge): 40 runs of ~4 KiB, within one request's
    // 64 ranges and 256 KiB.
    let plan: Vec<u64> = (0..1000).step_by(25).collect();
    let data_ranges = |server: &Server| {
        server
            .stats()
            .ranges
            .iter()
            .filter(|r| r.start >= h.data_offset && r.kind == "prefetch")
            .count()
    };
    for multi in [true, false] {
        let mut config = ServeConfig::new(&img);
        config.link.latency_ms = 5;
        config.multi_range = multi;
        let server = Server::start(config).unwrap();
        let src =
            Arc::new(HttpSource::open(&server.url("served.img"), &HttpConfig::default()).unwrap());
        let cache = tmp.path().join(format!("cache-{multi}"));
        let fs = mount(src, &cache, fetch_config(0));
        server.reset_stats();
        fs.fetcher().submit(&plan, Priority::Prefetch);
        fs.fetcher().fetch(&plan, Priority::Prefetch).unwrap();
        let stats = server.stats();
        assert_eq!(
            data_ranges(&server),
            40,
            "every planned chunk asked for once"
        );
        if multi {
            assert!(
                stats.requests <= 3 && stats.multi_range_requests >= 1,
                "40 planned runs took {} requests ({} multi-range)",
                stats.requests,
                stats.multi_range_requests
            );
        } else {
            assert!(stats.requests >= 40, "{} requests", stats.requests);
        }
        // The chunks are stored and right.
        let ino = ino(&fs, "big");
        let (fh, _) = fs.open(ino).unwrap();
        for &slot in &plan {
            let at = slot * CHUNK;
            let got = fs.read(ino, fh, at, CHUNK as u32).unwrap();
            assert!(
                got[..] == big[at as usize..(at + CHUNK) as usize],
                "chunk {slot}"
            );
        }
        fs.shutdown().unwrap();
    }
}

#[test]
fn the_background_fill_makes_the_image_local_and_never_goes_before_a_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let big = common::noise(1024 * CHUNK as usize, 9);
    let small = text(10 * 1024, 9);
    let (bytes, h) = pack(tmp.path(), &[("big", big.clone()), ("small", small)]);
    let src = Arc::new(MockSource::new(bytes));
    let fs = mount(src.clone(), &tmp.path().join("cache"), fetch_config(0));
    src.set_delay(Duration::from_millis(30));
    src.clear_requests();
    fs.start_fill(FillConfig::default()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while data_requests(&src, &h).is_empty() {
        assert!(Instant::now() < deadline, "the fill never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    // A reader arrives while the fill runs: its request goes before any queued fill.
    let ino = ino(&fs, "big");
    let (fh, _) = fs.open(ino).unwrap();
    let at = 1000 * CHUNK;
    let before = data_requests(&src, &h).len();
    let got = fs.read(ino, fh, at, 4096).unwrap();
    assert_eq!(got, big[at as usize..at as usize + 4096]);
    let reqs = data_requests(&src, &h);
    let demand = reqs
        .iter()
        .position(|r| r.kind == RequestKind::Demand)
        .unwrap();
    // At most the fill's requests already on their way when the read arrived go first.
    let in_flight = FetchConfig::default().background_requests;
    assert!(
        demand <= before + in_flight,
        "the demand request was #{demand}, {before} were sent before the read"
    );
    assert!(
        reqs.iter()
            .filter(|r| r.kind == RequestKind::Background)
            .all(|r| r.len <= FetchConfig::default().background_request_bytes)
    );
    // Then everything becomes local.
    while fs.stats().chunks_local < fs.stats().chunks_total {
        assert!(
            Instant::now() < deadline,
            "the fill never finished: {:?}",
            fs.stats()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    while !fs.stats().fill.is_some_and(|f| f.done) {
        assert!(Instant::now() < deadline, "the fill never said it was done");
        std::thread::sleep(Duration::from_millis(20));
    }
    fs.shutdown().unwrap();
}

/// The path of a shared library this test process has mapped (libc), from /proc/self/maps.
fn a_mapped_library() -> std::path::PathBuf {
    let maps = fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/libc.so") || p.contains("/libc-"))
        .map(std::path::PathBuf::from)
        .expect("this process maps a libc")
}

#[test]
fn an_elf_librarys_loader_sections_are_queued_at_its_first_read() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = fs::read(a_mapped_library()).unwrap();
    let head = &lib[..elf::HEADER_LEN];
    let table = elf::section_table(head, lib.len() as u64).expect("libc has section headers");
    let loader = elf::loader_ranges(
        &lib[table.start as usize..table.end as usize],
        lib.len() as u64,
    );
    let loader_bytes: u64 = loader.iter().map(|r| r.end - r.start).sum();
    assert!(
        !loader.is_empty() && loader_bytes < lib.len() as u64 / 2,
        "libc's loader sections: {loader:x?} of {} bytes",
        lib.len()
    );
    // A page of code no loader section covers, away from the file's start.
    let text_page = (lib.len() as u64 / 2 / CHUNK) * CHUNK;
    assert!(
        !loader
            .iter()
            .any(|r| r.start < text_page + CHUNK && text_page < r.end)
    );
    let (bytes, h) = pack(tmp.path(), &[("libc.so.6", lib.clone())]);

    for hints in [true, false] {
        let src = Arc::new(MockSource::new(bytes.clone()));
        let cache = tmp.path().join(format!("cache-{hints}"));
        let fs = mount(
            src.clone(),
            &cache,
            FetchConfig {
                loader_hints: hints,
                ..fetch_config(0)
            },
        );
        let ino = ino(&fs, "libc.so.6");
        let (fh, _) = fs.open(ino).unwrap();
        assert_eq!(fs.read(ino, fh, 0, 4096).unwrap(), lib[..4096]);
        let deadline = Instant::now() + Duration::from_secs(20);
        if hints {
            while fs.stats().loader_hint_files == 0 || fs.fetcher().pending() > 0 {
                assert!(Instant::now() < deadline, "no hint: {:?}", fs.stats());
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(fs.stats().loader_hint_bytes, loader_bytes);
        }
        // The loader reads its sections: with hints, without a request.
        let before = data_requests(&src, &h).len();
        for r in &loader {
            let got = fs.read(ino, fh, r.start, (r.end - r.start) as u32).unwrap();
            assert_eq!(got, lib[r.start as usize..r.end as usize]);
        }
        let for_loader = data_requests(&src, &h).len() - before;
        if hints {
            assert_eq!(
                for_loader, 0,
                "hinted sections were read from the source again"
            );
        } else {
            assert!(for_loader > 0);
            assert_eq!(fs.stats().loader_hint_files, 0);
        }
        // Code is not part of the hint: reading it is a miss.
        let before = data_requests(&src, &h).len();
        let got = fs.read(ino, fh, text_page, 4096).unwrap();
        assert_eq!(got, lib[text_page as usize..text_page as usize + 4096]);
        assert_eq!(data_requests(&src, &h).len() - before, 1);
        fs.release(fh);
        fs.shutdown().unwrap();
    }
}
