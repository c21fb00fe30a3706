//! The file system core ([`IncFs`]) driven without a mount, over in-memory and faulty
//! sources: metadata, lazy verified reads, coalescing, one fetch for concurrent readers,
//! retries and EIO, cache crash recovery, priorities, control files, passthrough decisions.

mod common;

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use incfs_fs::fetch::ReadAheadConfig;
use incfs_fs::fetch::{FetchConfig, Priority};
use incfs_fs::format::{Image, InodeKind, PackOptions, pack_dir};
use incfs_fs::fs::{FsConfig, FsError, IncFs, NodeKind, OpenMode, Stats};
use incfs_fs::source::{FailingSource, FailureKind, FailurePlan, MockSource, RequestKind, Source};
use proptest::prelude::*;

const CHUNK: u32 = 4096;

/// A packed test image: the tree, the image bytes, the opened image.
struct Fixture {
    _tmp: tempfile::TempDir,
    tree: PathBuf,
    bytes: Vec<u8>,
    img: Image<Vec<u8>>,
}

fn fixture(build: impl FnOnce(&Path)) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    build(&tree);
    let out = tmp.path().join("img");
    let opts = PackOptions {
        chunk_size: CHUNK,
        ..PackOptions::default()
    };
    pack_dir(&tree, &out, &opts, &()).unwrap();
    let bytes = fs::read(&out).unwrap();
    let img = Image::open(bytes.clone(), None).unwrap();
    Fixture {
        _tmp: tmp,
        tree,
        bytes,
        img,
    }
}

fn odd() -> Fixture {
    fixture(|t| common::odd_tree(t, CHUNK as usize))
}

/// A tree with one big incompressible file.
fn big(len: usize) -> Fixture {
    fixture(|t| {
        fs::create_dir_all(t).unwrap();
        fs::write(t.join("big"), common::noise(len, 42)).unwrap();
    })
}

fn quick_fetch() -> FetchConfig {
    FetchConfig {
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        max_attempts: 3,
        // Exact request accounting: no miss widening, gap bridging or whole small files
        // unless a test asks.
        miss_amplify_bytes: 0,
        bridge_gap_bytes: 0,
        readahead: ReadAheadConfig {
            small_file: 0,
            ..ReadAheadConfig::default()
        },
        ..FetchConfig::default()
    }
}

fn mount(src: Arc<dyn Source>, cache: &Path) -> Arc<IncFs> {
    let mut cfg = FsConfig::new(cache.to_path_buf());
    cfg.fetch = quick_fetch();
    Arc::new(IncFs::new(src, &cfg).unwrap())
}

/// Resolves a relative path (bytes) to a FUSE inode number.
fn resolve(fs: &IncFs, path: &[u8]) -> u64 {
    let mut ino = 1;
    for comp in path.split(|b| *b == b'/').filter(|c| !c.is_empty()) {
        ino = fs.lookup(ino, comp).unwrap().ino;
    }
    ino
}

/// Reads a whole file through the core in `piece`-byte reads.
fn read_all(fs: &Arc<IncFs>, ino: u64, piece: u32) -> Result<Vec<u8>, FsError> {
    let (fh, _) = fs.open(ino)?;
    let size = fs.getattr(ino)?.size;
    let mut out = Vec::new();
    let r = (|| {
        while (out.len() as u64) < size {
            let b = fs.read(ino, fh, out.len() as u64, piece)?;
            assert!(!b.is_empty(), "short read at {}", out.len());
            out.extend_from_slice(&b);
        }
        Ok(())
    })();
    fs.release(fh);
    r.map(|()| out)
}

fn read_control(fs: &Arc<IncFs>, name: &str) -> Vec<u8> {
    let dir = fs.lookup(1, b".incfs").unwrap().ino;
    let ino = fs.lookup(dir, name.as_bytes()).unwrap().ino;
    let (fh, mode) = fs.open(ino).unwrap();
    assert!(matches!(mode, OpenMode::Direct));
    let mut out = Vec::new();
    loop {
        let b = fs.read(ino, fh, out.len() as u64, 7).unwrap();
        if b.is_empty() {
            break;
        }
        out.extend_from_slice(&b);
    }
    fs.release(fh);
    out
}

fn stats(fs: &Arc<IncFs>) -> Stats {
    serde_json::from_slice(&read_control(fs, "stats")).unwrap()
}

#[test]
fn metadata_and_every_file_match_the_tree() {
    let fx = odd();
    let cache = tempfile::tempdir().unwrap();
    let src = Arc::new(MockSource::new(fx.bytes.clone()));
    let fs = mount(src.clone(), cache.path());
    let after_mount = src.requests().len();
    let mut files = 0;
    for (path, inode) in fx.img.walk() {
        let disk = fx.tree.join(std::ffi::OsStr::from_bytes(&path));
        let meta = fs::symlink_metadata(&disk).unwrap();
        let ino = resolve(&fs, &path);
        assert_eq!(ino, u64::from(inode) + 1);
        let a = fs.getattr(ino).unwrap();
        match &fx.img.inode(inode).unwrap().kind {
            InodeKind::File { .. } => {
                assert_eq!(a.kind, NodeKind::File);
                assert_eq!(a.size, meta.len());
                assert_eq!(
                    u32::from(a.perm),
                    std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777
                );
                files += 1;
            }
            InodeKind::Dir { entries } => {
                assert_eq!(a.kind, NodeKind::Dir);
                let names: Vec<Vec<u8>> = fs
                    .readdir(ino, 0)
                    .unwrap()
                    .into_iter()
                    .map(|d| d.name)
                    .collect();
                assert_eq!(names.len(), entries.len() + 2);
                let mut want: Vec<Vec<u8>> = fs::read_dir(&disk)
                    .unwrap()
                    .map(|e| e.unwrap().file_name().as_bytes().to_vec())
                    .filter(|n| n.as_slice() != b"a-fifo")
                    .collect();
                want.sort();
                assert_eq!(&names[2..], &want[..]);
            }
            InodeKind::Symlink { .. } => {
                assert_eq!(a.kind, NodeKind::Symlink);
                assert_eq!(
                    fs.readlink(ino).unwrap(),
                    fs::read_link(&disk).unwrap().as_os_str().as_bytes()
                );
            }
        }
    }
    assert!(files > 10);
    // Metadata came from the manifest: no request after mount.
    assert_eq!(src.requests().len(), after_mount);

    // Data: every file, read in odd-sized pieces, equals the tree.
    for f in fx.img.files() {
        let disk = fx.tree.join(std::ffi::OsStr::from_bytes(&f.path));
        let got = read_all(&fs, u64::from(f.inode) + 1, 5000).unwrap();
        assert_eq!(got, fs::read(&disk).unwrap(), "{}", f.display_path());
    }
    // Xattrs.
    let text = resolve(&fs, b"text");
    assert_eq!(fs.getxattr(text, b"user.incfs.test").unwrap(), b"value-1");
    assert!(
        fs.listxattr(text)
            .unwrap()
            .starts_with(b"user.incfs.test\0")
    );
    assert!(matches!(
        fs.getxattr(text, b"user.none"),
        Err(FsError::NoXattr)
    ));
    // Hard links share an inode.
    assert_eq!(resolve(&fs, b"hardlink-b"), resolve(&fs, b"sub/hardlink-a"));
    assert!(matches!(fs.lookup(1, b"missing"), Err(FsError::NotFound)));
    assert!(matches!(fs.readlink(text), Err(FsError::NotSymlink)));
    // Reads past the end are empty.
    let (fh, _) = fs.open(text).unwrap();
    assert!(fs.read(text, fh, 1 << 40, 100).unwrap().is_empty());
    fs.release(fh);
    fs.shutdown().unwrap();
}

#[test]
fn adjacent_missing_chunks_coalesce_into_one_request() {
    let fx = big(64 * CHUNK as usize);
    let cache = tempfile::tempdir().unwrap();
    let src = Arc::new(MockSource::new(fx.bytes.clone()));
    let fs = mount(src.clone(), cache.path());
    src.clear_requests();
    let ino = resolve(&fs, b"big");
    let (fh, _) = fs.open(ino).unwrap();
    // One read of 16 chunks: one demand request with exactly their stored bytes.
    let got = fs.read(ino, fh, 0, 16 * CHUNK).unwrap();
    assert_eq!(
        got,
        fs::read(fx.tree.join("big")).unwrap()[..16 * CHUNK as usize]
    );
    let reqs = src.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0].kind, RequestKind::Demand);
    let stored: u64 = fx.img.table().entries()[..16]
        .iter()
        .map(|e| u64::from(e.stored_len))
        .sum();
    assert_eq!(reqs[0].len, stored);
    // Reading them again is a hit: no request.
    fs.read(ino, fh, 100, 1000).unwrap();
    assert_eq!(src.requests().len(), 1);
    fs.release(fh);
    fs.shutdown().unwrap();
}

#[test]
fn a_sequential_reader_gets_a_window_ahead_and_a_random_read_does_not() {
    let fx = big(64 * CHUNK as usize);
    let want = fs::read(fx.tree.join("big")).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let src = Arc::new(MockSource::new(fx.bytes.clone()));
    let mut cfg = FsConfig::new(cache.path().to_path_buf());
    cfg.fetch = quick_fetch();
    cfg.fetch.readahead = ReadAheadConfig {
        small_file: 0,
        initial_window: 16 * u64::from(CHUNK),
        max_window: 16 * u64::from(CHUNK),
    };
    let fs = Arc::new(IncFs::new(src.clone(), &cfg).unwrap());
    src.clear_requests();
    let ino = resolve(&fs, b"big");
    let (fh, _) = fs.open(ino).unwrap();
    // A first read fetches only what it touches.
    assert_eq!(fs.read(ino, fh, 0, CHUNK).unwrap(), want[..CHUNK as usize]);
    // The next read continues where it ended: its own chunk comes at demand priority, and
    // the 16 chunks after it as one read-ahead request.
    assert_eq!(
        fs.read(ino, fh, u64::from(CHUNK), CHUNK).unwrap(),
        want[CHUNK as usize..2 * CHUNK as usize]
    );
    fs.fetcher()
        .fetch(&(2..18).collect::<Vec<u64>>(), Priority::Background)
        .unwrap();
    let stored = |r: std::ops::Range<usize>| -> u64 {
        fx.img.table().entries()[r]
            .iter()
            .map(|e| u64::from(e.stored_len))
            .sum()
    };
    let mut reqs: Vec<(u64, RequestKind)> =
        src.requests().iter().map(|r| (r.len, r.kind)).collect();
    assert_eq!(reqs.len(), 3, "{reqs:?}");
    assert_eq!(reqs[0], (stored(0..1), RequestKind::Demand));
    reqs.sort();
    let mut expect = vec![
        (stored(0..1), RequestKind::Demand),
        (stored(1..2), RequestKind::Demand),
        (stored(2..18), RequestKind::Prefetch),
    ];
    expect.sort();
    assert_eq!(reqs, expect);
    // A random read elsewhere fetches only its chunk.
    fs.read(ino, fh, 40 * u64::from(CHUNK), 10).unwrap();
    assert_eq!(src.requests()[3].len, stored(40..41));
    fs.release(fh);
    fs.shutdown().unwrap();
}

#[test]
fn a_multi_megabyte_range_is_verified_chunk_by_chunk_as_it_streams() {
    // 48 incompressible chunks of 64 KiB: one 3 MiB request, decoded piecewise.
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    let want = common::noise(48 * 65536 + 1000, 5);
    fs::write(tree.join("f"), &want).unwrap();
    let img = tmp.path().join("img");
    let opts = PackOptions {
        chunk_size: 65536,
        ..PackOptions::default()
    };
    pack_dir(&tree, &img, &opts, &()).unwrap();
    let src = Arc::new(MockSource::new(fs::read(&img).unwrap()));
    let fs = mount(src.clone(), &tmp.path().join("cache"));
    src.clear_requests();
    src.set_piece_size(10_000); // pieces that do not line up with chunks
    let ino = resolve(&fs, b"f");
    assert_eq!(read_all(&fs, ino, 4 << 20).unwrap(), want);
    let reqs = src.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert!(reqs[0].len > 3 << 20);
    assert_eq!(stats(&fs).chunks_fetched, 49);
    fs.shutdown().unwrap();
}

#[test]
fn requests_are_capped_at_max_request_bytes() {
    let fx = big(64 * CHUNK as usize);
    let cache = tempfile::tempdir().unwrap();
    let src = Arc::new(MockSource::new(fx.bytes.clone()));
    let mut cfg = FsConfig::new(cache.path().to_path_buf());
    cfg.fetch = quick_fetch();
    cfg.fetch.max_request_bytes = 10 * u64::from(CHUNK);
    let fs = Arc::new(IncFs::new(src.clone(), &cfg).unwrap());
    src.clear_requests();
    let ino = resolve(&fs, b"big");
    let got = read_all(&fs, ino, 64 * CHUNK).unwrap();
    assert_eq!(got, fs::read(fx.tree.join("big")).unwrap());
    let reqs = src.requests();
    assert!(
        reqs.iter().all(|r| r.len <= 10 * u64::from(CHUNK)),
        "{reqs:?}"
    );
    assert!(reqs.len() >= 7, "{} requests", reqs.len());
    fs.shutdown().unwrap();
}

#[test]
fn concurrent_readers_of_one_chunk_cause_one_fetch() {
    let fx = big(8 * CHUNK as usize);
    let cache = tempfile::tempdir().unwrap();
    let src = Arc::new(MockSource::new(fx.bytes.clone()));
    let fs = Arc::new(mount(src.clone(), cache.path()));
    src.clear_requests();
    // Hold each request long enough that all readers arrive while it is in flight.
    src.set_delay(Duration::from_millis(300));
    let ino = resolve(&fs, b"big");
    let want = fs::read(fx.tree.join("big")).unwrap();
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let fs = Arc::clone(&fs);
            std::thread::spawn(move || {
                let (fh, _) = fs.open(ino).unwrap();
                let r = fs
                    .read(ino, fh, 3 * u64::from(CHUNK) + i * 100, 50)
                    .unwrap();
                fs.release(fh);
                r
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let off = 3 * CHUNK as usize + i * 100;
        assert_eq!(h.join().unwrap(), want[off..off + 50]);
    }
    let reqs = src.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    let s = stats(&fs);
    assert_eq!(s.chunks_fetched, 1);
    assert_eq!(s.demand_misses, 8);
}

#[test]
fn transient_failures_are_retried() {
    let fx = big(8 * CHUNK as usize);
    let cache = tempfile::tempdir().unwrap();
    for kind in [
        FailureKind::Error,
        FailureKind::Unavailable,
        FailureKind::Short,
        FailureKind::Corrupt,
    ] {
        let src = Arc::new(FailingSource::new(
            MockSource::new(fx.bytes.clone()),
            FailurePlan::Countdown { pass: 0, fail: 2 },
            kind,
        ));
        let cache = cache.path().join(format!("{kind:?}"));
        let fs = mount(src.clone(), &cache);
        let got = read_all(&fs, resolve(&fs, b"big"), 1 << 20).unwrap();
        assert_eq!(got, fs::read(fx.tree.join("big")).unwrap(), "{kind:?}");
        assert_eq!(src.failures(), 2, "{kind:?} {:?}", fs.fetcher().stats());
        assert!(stats(&fs).fetch_errors >= 2, "{kind:?}");
        fs.shutdown().unwrap();
    }
}

#[test]
fn bytes_that_never_verify_are_eio_and_local_chunks_keep_working() {
    let fx = fixture(|t| {
        fs::create_dir_all(t).unwrap();
        fs::write(t.join("a"), common::noise(4 * CHUNK as usize, 1)).unwrap();
        fs::write(t.join("b"), common::noise(4 * CHUNK as usize, 2)).unwrap();
    });
    let cache = tempfile::tempdir().unwrap();
    let src = Arc::new(FailingSource::new(
        MockSource::new(fx.bytes.clone()),
        FailurePlan::Countdown {
            pass: u64::MAX,
            fail: 0,
        },
        FailureKind::Corrupt,
    ));
    let fs = mount(src.clone(), cache.path());
    let a = resolve(&fs, b"a");
    let b = resolve(&fs, b"b");
    let want_a = fs::read(fx.tree.join("a")).unwrap();
    assert_eq!(read_all(&fs, a, 1 << 20).unwrap(), want_a);
    // From now on the source serves corrupted bytes for everything.
    src.set_plan(FailurePlan::Countdown {
        pass: 0,
        fail: u64::MAX,
    });
    let err = read_all(&fs, b, 1 << 20).unwrap_err();
    match &err {
        FsError::Fetch { path, .. } => assert_eq!(path, "b"),
        other => panic!("expected a fetch error, got {other:?}"),
    }
    assert!(err.to_string().contains("b: chunk"), "{err}");
    // Local data keeps working.
    assert_eq!(read_all(&fs, a, 1 << 20).unwrap(), want_a);
    let s = stats(&fs);
    assert!(s.fetch_errors >= 3 && s.read_errors >= 1, "{s:?}");
    // The source heals: the same read, tried again a moment later (a chunk that failed
    // stays failed for FAILURE_MEMO), now succeeds.
    src.set_plan(FailurePlan::Countdown {
        pass: u64::MAX,
        fail: 0,
    });
    std::thread::sleep(incfs_fs::fetch::FAILURE_MEMO);
    assert_eq!(
        read_all(&fs, b, 1 << 20).unwrap(),
        fs::read(fx.tree.join("b")).unwrap()
    );
    fs.shutdown().unwrap();
}

#[test]
fn unreachable_or_wrong_image_fails_at_open() {
    let fx = odd();
    let cache = tempfile::tempdir().unwrap();
    let src = Arc::new(FailingSource::new(
        MockSource::new(fx.bytes.clone()),
        FailurePlan::Always,
        FailureKind::Error,
    ));
    let cfg = FsConfig::new(cache.path().to_path_buf());
    assert!(matches!(IncFs::new(src, &cfg), Err(FsError::Meta { .. })));
    let mut cfg = FsConfig::new(cache.path().to_path_buf());
    cfg.expect_digest = Some(incfs_fs::format::Digest([9; 32]));
    let err = IncFs::new(Arc::new(MockSource::new(fx.bytes.clone())), &cfg)
        .err()
        .unwrap();
    assert!(err.to_string().contains("root digest"), "{err}");
}

#[test]
fn clean_restart_fetches_nothing_again() {
    let fx = odd();
    let cache = tempfile::tempdir().unwrap();
    let fs = mount(Arc::new(MockSource::new(fx.bytes.clone())), cache.path());
    for f in fx.img.files() {
        read_all(&fs, u64::from(f.inode) + 1, 1 << 20).unwrap();
    }
    fs.shutdown().unwrap();
    stop_and_wait(fs, cache.path());
    let src = Arc::new(MockSource::new(fx.bytes.clone()));
    let fs = mount(src.clone(), cache.path());
    let before = src.requests().len();
    for f in fx.img.files() {
        let disk = fx.tree.join(std::ffi::OsStr::from_bytes(&f.path));
        assert_eq!(
            read_all(&fs, u64::from(f.inode) + 1, 1 << 20).unwrap(),
            fs::read(disk).unwrap()
        );
    }
    assert_eq!(src.requests().len(), before);
    let s = stats(&fs);
    assert_eq!(s.bytes_fetched, 0);
    assert!(!s.recovered_unclean);
    assert_eq!(s.chunks_local, s.chunks_total);
}

/// A flush of more backing files than it syncs on one thread records every one of them.
#[test]
fn a_close_after_many_files_were_fetched_records_them_all() {
    let fx = fixture(|t| {
        fs::create_dir_all(t).unwrap();
        for i in 0..100u64 {
            let len = 1000 + 700 * i as usize;
            fs::write(t.join(format!("f{i}")), common::noise(len, i)).unwrap();
        }
    });
    let cache = tempfile::tempdir().unwrap();
    let fs = mount(Arc::new(MockSource::new(fx.bytes.clone())), cache.path());
    for f in fx.img.files() {
        read_all(&fs, u64::from(f.inode) + 1, 1 << 20).unwrap();
    }
    fs.shutdown().unwrap();
    assert_eq!(stats(&fs).chunks_durable, stats(&fs).chunks_total);
    stop_and_wait(fs, cache.path());
    let src = Arc::new(MockSource::new(fx.bytes.clone()));
    let fs = mount(src.clone(), cache.path());
    let s = stats(&fs);
    assert!(!s.recovered_unclean);
    assert_eq!(s.chunks_local, s.chunks_total, "every chunk recorded");
    for f in fx.img.files() {
        let disk = fx.tree.join(std::ffi::OsStr::from_bytes(&f.path));
        assert_eq!(
            read_all(&fs, u64::from(f.inode) + 1, 1 << 20).unwrap(),
            fs::read(disk).unwrap()
        );
    }
    assert_eq!(stats(&fs).bytes_fetched, 0);
}

/// The single image cache directory under `cache` (beside the source index).
fn image_cache(cache: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name() != Some(incfs_fs::cache::offline::SOURCES_DIR.as_ref()))
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs[0].clone()
}

/// Drops the mount `fs` of `cache` and waits until nothing of it holds the image cache (its
/// fetch workers end on their own, and on a loaded machine may outlive the drop's short wait
/// for them): the next mount then starts as a new process's would, alone.
fn stop_and_wait(fs: Arc<IncFs>, cache: &Path) {
    drop(fs);
    let lock = image_cache(cache).join("lock");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let f = fs::File::open(&lock).unwrap();
        // SAFETY: `f` is an open descriptor for the duration of the call.
        if unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } == 0
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cache stayed in use"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn unclean_stop_rechecks_recorded_chunks() {
    let fx = big(8 * CHUNK as usize);
    let want = fs::read(fx.tree.join("big")).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let fs = mount(Arc::new(MockSource::new(fx.bytes.clone())), cache.path());
    let ino = resolve(&fs, b"big");
    // Read chunks 0..4 only, make them durable, then stop without a clean shutdown.
    let (fh, _) = fs.open(ino).unwrap();
    fs.read(ino, fh, 0, 4 * CHUNK).unwrap();
    fs.release(fh);
    fs.cache().flush().unwrap();
    stop_and_wait(fs, cache.path());

    // Torn state: chunk 1's bytes damaged on disk, and the record claiming chunk 6, whose
    // bytes never arrived (a hole of zeros).
    let dir = image_cache(cache.path());
    let data = fs::read_dir(dir.join("data"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .write_all_at(b"garbage", u64::from(CHUNK) + 10)
        .unwrap();
    let rec = dir.join("record");
    let mut bytes = fs::read(&rec).unwrap();
    bytes[64] |= 1 << 6;
    fs::write(&rec, &bytes).unwrap();

    let src = Arc::new(MockSource::new(fx.bytes.clone()));
    let fs = mount(src.clone(), cache.path());
    let r = fs.cache().recovery();
    assert!(r.unclean);
    assert_eq!(r.recorded, 5);
    assert_eq!(r.rechecked, 5);
    assert_eq!(r.dropped, 2);
    assert_eq!(read_all(&fs, ino, 1 << 20).unwrap(), want);
    // Only the dropped chunks and the never-read ones were fetched: 0, 2, 3 were kept.
    let s = stats(&fs);
    assert_eq!(s.chunks_fetched, 5, "{s:?}");
    fs.shutdown().unwrap();
}

#[test]
fn recovery_rechecks_only_chunks_recorded_since_the_last_checkpoint() {
    let fx = big(8 * CHUNK as usize);
    let want = fs::read(fx.tree.join("big")).unwrap();
    let cache = tempfile::tempdir().unwrap();
    // A clean mount that read chunks 0..4: its shutdown checkpoints them.
    let fs = mount(Arc::new(MockSource::new(fx.bytes.clone())), cache.path());
    let ino = resolve(&fs, b"big");
    let (fh, _) = fs.open(ino).unwrap();
    fs.read(ino, fh, 0, 4 * CHUNK).unwrap();
    fs.release(fh);
    fs.shutdown().unwrap();
    stop_and_wait(fs, cache.path());
    // A mount that reads 4..8 and stops uncleanly.
    let fs = mount(Arc::new(MockSource::new(fx.bytes.clone())), cache.path());
    assert!(!fs.cache().recovery().unclean);
    let (fh, _) = fs.open(ino).unwrap();
    fs.read(ino, fh, 4 * u64::from(CHUNK), 4 * CHUNK).unwrap();
    fs.release(fh);
    fs.cache().flush().unwrap();
    stop_and_wait(fs, cache.path());
    // Only 4..8 are read back and checked; nothing is fetched again.
    let src = Arc::new(MockSource::new(fx.bytes.clone()));
    let fs = mount(src.clone(), cache.path());
    let r = fs.cache().recovery();
    assert_eq!(
        (r.unclean, r.recorded, r.rechecked, r.dropped),
        (true, 8, 4, 0)
    );
    let before = src.requests().len();
    assert_eq!(read_all(&fs, ino, 1 << 20).unwrap(), want);
    assert_eq!(src.requests().len(), before);
    stop_and_wait(fs, cache.path());
    // That recovery was itself a checkpoint: a second unclean stop re-checks nothing.
    let fs = mount(Arc::new(MockSource::new(fx.bytes.clone())), cache.path());
    let r = fs.cache().recovery();
    assert_eq!((r.unclean, r.rechecked), (true, 0));
    fs.shutdown().unwrap();
}

#[test]
fn a_damaged_record_header_starts_empty() {
    let fx = big(4 * CHUNK as usize);
    let cache = tempfile::tempdir().unwrap();
    let fs = mount(Arc::new(MockSource::new(fx.bytes.clone())), cache.path());
    read_all(&fs, resolve(&fs, b"big"), 1 << 20).unwrap();
    fs.shutdown().unwrap();
    stop_and_wait(fs, cache.path());
    let rec = image_cache(cache.path()).join("record");
    let mut bytes = fs::read(&rec).unwrap();
    bytes[20] ^= 0xff;
    fs::write(&rec, &bytes).unwrap();
    let fs = mount(Arc::new(MockSource::new(fx.bytes.clone())), cache.path());
    assert_eq!(fs.cache().local_chunks(), 0);
    assert_eq!(
        read_all(&fs, resolve(&fs, b"big"), 1 << 20).unwrap(),
        fs::read(fx.tree.join("big")).unwrap()
    );
    fs.shutdown().unwrap();
}

#[test]
fn two_images_never_share_a_cache_and_two_mounts_share_one() {
    let a = big(16 * CHUNK as usize);
    let want = fs::read(a.tree.join("big")).unwrap();
    let b = odd();
    let cache = tempfile::tempdir().unwrap();
    let fa = mount(Arc::new(MockSource::new(a.bytes.clone())), cache.path());
    let fb = mount(Arc::new(MockSource::new(b.bytes.clone())), cache.path());
    assert_ne!(fa.cache().dir(), fb.cache().dir());
    assert!(!fa.cache().recovery().shared);
    let ino = resolve(&fa, b"big");
    let (fh, _) = fa.open(ino).unwrap();
    fa.read(ino, fh, 0, 4 * CHUNK).unwrap();
    fa.release(fh);
    fa.cache().flush().unwrap();

    // A second mount of image a, while the first is up: it shares the cache, starts with
    // the chunks the first recorded (re-checking nothing) and serves the right bytes.
    let src2 = Arc::new(MockSource::new(a.bytes.clone()));
    let fa2 = mount(src2.clone(), cache.path());
    assert_eq!(fa2.cache().dir(), fa.cache().dir());
    let r = fa2.cache().recovery();
    assert!(r.shared && !r.unclean && r.rechecked == 0, "{r:?}");
    assert_eq!(fa2.cache().local_chunks(), 4);
    assert_eq!(read_all(&fa2, ino, 1 << 20).unwrap(), want);
    assert_eq!(stats(&fa2).chunks_fetched, 12);
    // The first learns at its next flush what the second recorded, and fetches nothing.
    fa2.cache().flush().unwrap();
    fa.cache().flush().unwrap();
    assert_eq!(fa.cache().local_chunks(), 16);
    assert_eq!(read_all(&fa, ino, 1 << 20).unwrap(), want);
    assert_eq!(stats(&fa).chunks_fetched, 4);

    let infos = incfs_fs::cache::stat_dir(cache.path()).unwrap();
    assert_eq!(infos.len(), 2);
    assert!(infos.iter().all(|i| i.in_use));
    let err = incfs_fs::cache::clear_dir(cache.path()).unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
    assert_eq!(incfs_fs::cache::stat_dir(cache.path()).unwrap().len(), 2);

    // The first to close leaves the record to the other; the last marks it clean.
    fa.shutdown().unwrap();
    let rec = fa.cache().dir().join("record");
    let clean = |p: &Path| {
        incfs_fs::cache::record::RecordHeader::decode(&fs::read(p).unwrap())
            .unwrap()
            .clean
    };
    assert!(!clean(&rec));
    fa2.shutdown().unwrap();
    assert!(clean(&rec));
    fb.shutdown().unwrap();
    drop((fa, fa2, fb));
    let fa3 = mount(Arc::new(MockSource::new(a.bytes.clone())), cache.path());
    let r = fa3.cache().recovery();
    assert!(!r.unclean && !r.shared && r.recorded == 16, "{r:?}");
    fa3.shutdown().unwrap();
    drop(fa3);
    let removed = incfs_fs::cache::clear_dir(cache.path()).unwrap();
    assert_eq!(removed.len(), 2);
}

#[test]
fn gc_evicts_least_recently_used_images_but_never_one_in_use() {
    let fixtures = [big(8 * CHUNK as usize), big(9 * CHUNK as usize), odd()];
    let cache = tempfile::tempdir().unwrap();
    let mut dirs = Vec::new();
    for fx in &fixtures {
        let fs = mount(Arc::new(MockSource::new(fx.bytes.clone())), cache.path());
        for f in fx.img.files() {
            read_all(&fs, u64::from(f.inode) + 1, 1 << 20).unwrap();
        }
        fs.shutdown().unwrap();
        dirs.push(fs.cache().dir().to_path_buf());
        // mtimes are the LRU clock: keep the three uses apart.
        std::thread::sleep(Duration::from_millis(20));
    }
    // The oldest one is in use now (and so becomes the most recent).
    let inuse = mount(
        Arc::new(MockSource::new(fixtures[0].bytes.clone())),
        cache.path(),
    );
    let sizes: Vec<u64> = {
        let infos = incfs_fs::cache::stat_dir(cache.path()).unwrap();
        dirs.iter()
            .map(|d| infos.iter().find(|i| &i.dir == d).unwrap().bytes_on_disk)
            .collect()
    };
    let total: u64 = sizes.iter().sum();
    // A cap that only dropping one image meets: the least recently used not in use (b).
    let r = incfs_fs::cache::gc::gc(cache.path(), total - 1).unwrap();
    assert_eq!(r.removed, vec![dirs[1].clone()], "{r:?}");
    assert_eq!(r.kept_bytes, total - sizes[1]);
    // A cap of 0 removes everything but the image in use.
    let r = incfs_fs::cache::gc::gc(cache.path(), 0).unwrap();
    assert_eq!(r.removed, vec![dirs[2].clone()], "{r:?}");
    assert_eq!(r.busy, 1);
    assert!(dirs[0].is_dir());
    // The mount in use still works, and its cache stays after it.
    assert_eq!(
        read_all(&inuse, resolve(&inuse, b"big"), 1 << 20).unwrap(),
        fs::read(fixtures[0].tree.join("big")).unwrap()
    );
    inuse.shutdown().unwrap();
    drop(inuse);
    let r = incfs_fs::cache::gc::gc(cache.path(), 0).unwrap();
    assert_eq!(r.removed, vec![dirs[0].clone()], "{r:?}");
    assert!(incfs_fs::cache::stat_dir(cache.path()).unwrap().is_empty());
}

#[test]
fn demand_is_served_before_queued_prefetch() {
    let fx = big(64 * CHUNK as usize);
    let cache = tempfile::tempdir().unwrap();
    let src = Arc::new(MockSource::new(fx.bytes.clone()));
    let mut cfg = FsConfig::new(cache.path().to_path_buf());
    cfg.fetch = quick_fetch();
    cfg.fetch.workers = 2;
    cfg.fetch.max_request_bytes = 1; // one chunk per request
    let fs = Arc::new(IncFs::new(src.clone(), &cfg).unwrap());
    src.clear_requests();
    src.set_delay(Duration::from_millis(20));
    // Queue 40 chunks of prefetch, then demand the last chunk of the file.
    let slots: Vec<u64> = (0..40).collect();
    fs.fetcher().submit(&slots, Priority::Prefetch);
    let ino = resolve(&fs, b"big");
    let (fh, _) = fs.open(ino).unwrap();
    fs.read(ino, fh, 63 * u64::from(CHUNK), 10).unwrap();
    fs.release(fh);
    fs.fetcher().fetch(&slots, Priority::Prefetch).unwrap();
    let reqs = src.requests();
    assert_eq!(reqs.len(), 41);
    let demand_at = reqs
        .iter()
        .position(|r| r.kind == RequestKind::Demand)
        .unwrap();
    // The demand went out while most of the prefetch was still queued (one prefetch worker
    // takes 40 x 20 ms; the demand worker picks the miss up at once).
    assert!(
        demand_at < 20,
        "demand was request {demand_at} of {}",
        reqs.len()
    );
    fs.shutdown().unwrap();
}

#[test]
fn control_files_report_stats_and_read_log() {
    let fx = big(8 * CHUNK as usize);
    let cache = tempfile::tempdir().unwrap();
    let fs = mount(Arc::new(MockSource::new(fx.bytes.clone())), cache.path());
    let ino = resolve(&fs, b"big");
    let (fh, _) = fs.open(ino).unwrap();
    fs.read(ino, fh, 0, 100).unwrap();
    fs.read(ino, fh, 50, 100).unwrap();
    fs.release(fh);
    let s = stats(&fs);
    assert_eq!((s.demand_misses, s.blocked_reads, s.reads), (1, 1, 2));
    assert_eq!(s.chunks_total, 8);
    assert_eq!(s.chunks_local, 1);
    assert_eq!(s.bytes_cached, u64::from(CHUNK));
    // The program read the one chunk fetched: all of it was used.
    let stored = u64::from(fx.img.table().get(0).unwrap().stored_len);
    assert_eq!(s.bytes_used, stored);
    assert_eq!(s.bytes_fetched, stored);
    assert_eq!(s.requests, 1);
    assert_eq!(s.table_requests, 0, "the table came with the first read");
    let log = String::from_utf8(read_control(&fs, "read-log")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["path"], "big");
    assert_eq!(lines[0]["offset"], 0);
    assert_eq!(lines[0]["len"], 100);
    assert_eq!(lines[0]["result"], "miss");
    assert_eq!(lines[1]["result"], "hit");
    assert!(lines[1]["ns"].as_u64().unwrap() >= lines[0]["ns"].as_u64().unwrap());
    assert!(log.starts_with("{\"ns\":"), "{log}");
    // The control dir is listed in the root.
    assert!(
        fs.readdir(1, 0)
            .unwrap()
            .iter()
            .any(|d| d.name == b".incfs")
    );
}

#[test]
fn passthrough_only_for_complete_files_without_cached_opens() {
    let fx = big(4 * CHUNK as usize);
    let cache = tempfile::tempdir().unwrap();
    let fs = mount(Arc::new(MockSource::new(fx.bytes.clone())), cache.path());
    let ino = resolve(&fs, b"big");
    let (fh1, m1) = fs.open(ino).unwrap();
    assert!(matches!(m1, OpenMode::Cached));
    let mut got = Vec::new();
    while got.len() < 4 * CHUNK as usize {
        got.extend(fs.read(ino, fh1, got.len() as u64, CHUNK).unwrap());
    }
    // Complete now, but a cached open is live: the next open must be cached too.
    let (fh2, m2) = fs.open(ino).unwrap();
    assert!(matches!(m2, OpenMode::Cached));
    fs.release(fh1);
    fs.release(fh2);
    let (fh3, m3) = fs.open(ino).unwrap();
    let OpenMode::Passthrough { file, .. } = m3 else {
        panic!("expected passthrough");
    };
    let mut buf = vec![0u8; 4 * CHUNK as usize];
    file.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, fs::read(fx.tree.join("big")).unwrap());
    // While a passthrough open is live, further opens are passthrough too.
    let (fh4, m4) = fs.open(ino).unwrap();
    assert!(matches!(m4, OpenMode::Passthrough { .. }));
    // The kernel refused one: it is downgraded only if it is the only passthrough open.
    assert!(matches!(
        fs.passthrough_failed(fh4),
        Err(FsError::ModeConflict)
    ));
    fs.release(fh4);
    fs.passthrough_failed(fh3).unwrap();
    fs.release(fh3);
    let s = stats(&fs);
    assert_eq!(s.passthrough_opens, 1);
    fs.disable_passthrough();
    assert!(matches!(fs.open(ino).unwrap().1, OpenMode::Cached));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Reference model: any sequence of reads returns exactly the file's bytes at that
    /// range, whatever is local already.
    #[test]
    fn reads_match_the_reference(reads in prop::collection::vec((0u64..70_000, 1u32..20_000), 1..12)) {
        let fx = big(16 * CHUNK as usize + 123);
        let want = fs::read(fx.tree.join("big")).unwrap();
        let cache = tempfile::tempdir().unwrap();
        let fs = mount(Arc::new(MockSource::new(fx.bytes.clone())), cache.path());
        let ino = resolve(&fs, b"big");
        let (fh, _) = fs.open(ino).unwrap();
        for (off, len) in reads {
            let got = fs.read(ino, fh, off, len).unwrap();
            let start = (off as usize).min(want.len());
            let end = (off as usize + len as usize).min(want.len());
            prop_assert_eq!(&got[..], &want[start..end]);
        }
        fs.release(fh);
        fs.shutdown().unwrap();
    }
}

/// Pages of `path` in the page cache, of its first `len` bytes.
fn resident_pages(path: &Path, len: usize) -> usize {
    let f = fs::File::open(path).unwrap();
    let page = 4096;
    let pages = len.div_ceil(page);
    let mut vec = vec![0u8; pages];
    // SAFETY: a private read-only mapping of `len` bytes of an open file, asked which of its
    // pages are resident, then unmapped; nothing is read through it.
    unsafe {
        use std::os::fd::AsRawFd;
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        assert_eq!(libc::mincore(p, len, vec.as_mut_ptr()), 0);
        libc::munmap(p, len);
    }
    vec.iter().filter(|&&b| b & 1 != 0).count()
}

/// Writes `path` back and drops its pages from the page cache (no root needed).
fn evict(path: &Path) {
    let f = fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: an advisory call on an open descriptor.
    unsafe {
        use std::os::fd::AsRawFd;
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

#[test]
fn a_mount_reads_ahead_the_local_part_of_the_files_the_last_start_opened() {
    const SIZES: [(&str, usize); 5] = [
        ("a", 40960),
        ("b", 49152),
        ("c", 57344),
        ("d", 65536),
        ("e", 2 << 20),
    ];
    let fx = fixture(|t| {
        fs::create_dir_all(t).unwrap();
        for (i, (name, len)) in SIZES.iter().enumerate() {
            fs::write(t.join(name), common::noise(*len, i as u64)).unwrap();
        }
    });
    // On the build's disk (not a tmpfs /tmp, whose pages cannot be dropped).
    let cache = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let src: Arc<dyn Source> = Arc::new(MockSource::new(fx.bytes.clone()));
    // First mount: a, b, c and e local whole, d's first chunk only; nothing to read ahead yet.
    let fs1 = mount(src.clone(), cache.path());
    for name in ["a", "b", "c", "e"] {
        read_all(&fs1, resolve(&fs1, name.as_bytes()), 1 << 20).unwrap();
    }
    let d = resolve(&fs1, b"d");
    let (fh, _) = fs1.open(d).unwrap();
    fs1.read(d, fh, 0, CHUNK).unwrap();
    fs1.release(fh);
    assert_eq!(stats(&fs1).bytes_warmed, 0);
    fs1.shutdown().unwrap();
    // The last start: opens d, then b, then a, e, and b again. The whole files pass through.
    let fs2 = mount(src.clone(), cache.path());
    for name in ["d", "b", "a", "e", "b"] {
        let ino = resolve(&fs2, name.as_bytes());
        let (fh, mode) = fs2.open(ino).unwrap();
        assert_eq!(matches!(mode, OpenMode::Passthrough { .. }), name != "d");
        fs2.release(fh);
    }
    fs2.shutdown().unwrap();

    // The backing files, by size, out of the page cache.
    let data: Vec<PathBuf> = fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().path().join("data"))
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(data.len(), 1);
    let backing = |len: usize| {
        fs::read_dir(&data[0])
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| fs::metadata(p).unwrap().len() == len as u64)
            .unwrap()
    };
    for (_, len) in SIZES {
        evict(&backing(len));
        assert_eq!(
            resident_pages(&backing(len), len),
            0,
            "the cache's file system keeps a file's pages after POSIX_FADV_DONTNEED"
        );
    }

    let fs3 = mount(src.clone(), cache.path());
    let want = (40960 + 49152 + CHUNK as usize) as u64;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while stats(&fs3).bytes_warmed < want {
        assert!(std::time::Instant::now() < deadline, "nothing read ahead");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        stats(&fs3).bytes_warmed,
        want,
        "only local chunks of opened files"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let resident = || SIZES.map(|(_, len)| resident_pages(&backing(len), len));
    while resident()[..2] != [10, 12] || resident()[3] < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "pages resident: {:?}",
            resident()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = resident();
    assert_eq!(r[2], 0, "c was not opened by the last start");
    assert_eq!(r[3], 1, "d: its one local chunk, not its holes");
    assert_eq!(
        r[4], 0,
        "e: a big file passed through is left to the kernel's readahead"
    );
    // Read-ahead serves nothing itself: the files read back as the tree has them.
    for (name, _) in SIZES {
        assert_eq!(
            read_all(&fs3, resolve(&fs3, name.as_bytes()), 1 << 20).unwrap(),
            fs::read(fx.tree.join(name)).unwrap()
        );
    }
    fs3.shutdown().unwrap();
}

/// A source whose reads, once armed, wait at a gate until it opens.
struct GateSource {
    inner: MockSource,
    armed: std::sync::atomic::AtomicBool,
    state: parking_lot::Mutex<(bool, usize)>, // (open, reads waiting)
    changed: parking_lot::Condvar,
}

impl GateSource {
    fn set_open(&self, open: bool) {
        self.state.lock().0 = open;
        self.changed.notify_all();
    }

    /// Waits until a read is held at the gate; false after `within`.
    fn wait_for_held(&self, within: Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        let mut st = self.state.lock();
        while st.1 == 0 {
            if self.changed.wait_until(&mut st, deadline).timed_out() {
                return st.1 > 0;
            }
        }
        true
    }
}

impl Source for GateSource {
    fn read_range(
        &self,
        offset: u64,
        len: u64,
        kind: RequestKind,
    ) -> Result<Vec<u8>, incfs_fs::source::SourceError> {
        if self.armed.load(std::sync::atomic::Ordering::Acquire) {
            let mut st = self.state.lock();
            st.1 += 1;
            self.changed.notify_all();
            while !st.0 {
                self.changed.wait(&mut st);
            }
            st.1 -= 1;
        }
        self.inner.read_range(offset, len, kind)
    }

    fn total_len(&self) -> Result<u64, incfs_fs::source::SourceError> {
        self.inner.total_len()
    }

    fn describe(&self) -> String {
        "gate".into()
    }
}

#[test]
fn stopping_does_not_wait_for_a_fill_request_the_source_holds() {
    // Eight table segments: the mount reads the first few, the fill loads the rest itself.
    let fx = big(8 * 1024 * CHUNK as usize);
    let cache = tempfile::tempdir().unwrap();
    let src = Arc::new(GateSource {
        inner: MockSource::new(fx.bytes.clone()),
        armed: false.into(),
        state: parking_lot::Mutex::new((false, 0)),
        changed: parking_lot::Condvar::new(),
    });
    let fs = mount(src.clone(), cache.path());
    src.armed.store(true, std::sync::atomic::Ordering::Release);
    fs.start_fill(incfs_fs::fetch::fill::FillConfig::default())
        .unwrap();
    assert!(
        src.wait_for_held(Duration::from_secs(10)),
        "the fill should be in a request"
    );
    // The unmount (shutdown and drop, as `incfs run` does after its command) returns while
    // the source still holds the fill's request: it was told to stop and ends by itself.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        fs.shutdown().unwrap();
        drop(fs);
        tx.send(()).unwrap();
    });
    let stopped = rx.recv_timeout(Duration::from_secs(5));
    let still_held = src.state.lock().1 > 0;
    src.set_open(true);
    assert!(stopped.is_ok(), "stopping waited for the held request");
    assert!(
        still_held,
        "the request was still held when stopping returned"
    );
}

/// A published plan's fetch that answers only when told: the plan for all of `big`.
fn held_plan(fs: &IncFs) -> (incfs_fs::plan::PublishedFetch, std::sync::mpsc::Sender<()>) {
    let plan = incfs_fs::plan::PrefetchPlan {
        version: incfs_fs::plan::PLAN_VERSION,
        image_digest: fs.root_digest().to_hex(),
        chunk_size: CHUNK,
        total_bytes: 0,
        entries: vec![incfs_fs::plan::PlanEntry {
            file: "big".into(),
            first_chunk: 0,
            chunk_count: 64,
            offset_ms: 0.0,
            confidence: 1.0,
        }],
    };
    let bytes = serde_json::to_vec(&plan).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let fetch = std::thread::spawn(move || {
        let _ = rx.recv();
        Ok(Some((PathBuf::from("http://server/img.plan.json"), bytes)))
    });
    (fetch, tx)
}

#[test]
fn a_warm_start_does_not_wait_for_the_published_plan_and_a_first_start_does() {
    let fx = big(64 * CHUNK as usize);
    let want = fs::read(fx.tree.join("big")).unwrap();

    // A first start: nothing local, so the plan leads and the mount waits for it.
    let cold = tempfile::tempdir().unwrap();
    let fs = mount(Arc::new(MockSource::new(fx.bytes.clone())), cold.path());
    let (fetch, release) = held_plan(&fs);
    let (tx, rx) = std::sync::mpsc::channel();
    let f = Arc::clone(&fs);
    std::thread::spawn(move || {
        let running = f.start_published_prefetch(fetch, Default::default());
        tx.send(running).unwrap();
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "a first start should wait for its plan"
    );
    release.send(()).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
    fs.shutdown().unwrap();

    // A cache that holds the first chunks of the file.
    let warm = tempfile::tempdir().unwrap();
    let fs = mount(Arc::new(MockSource::new(fx.bytes.clone())), warm.path());
    let ino = resolve(&fs, b"big");
    let (fh, _) = fs.open(ino).unwrap();
    assert!(fs.read(ino, fh, 0, 4 * CHUNK).unwrap() == want[..4 * CHUNK as usize]);
    fs.release(fh);
    fs.shutdown().unwrap();
    stop_and_wait(fs, warm.path());

    // A warm start: the mount goes on while the plan is on its way, the fill waits for it,
    // and the plan is walked once it has arrived.
    let fs = mount(Arc::new(MockSource::new(fx.bytes.clone())), warm.path());
    assert!(fs.cache().local_chunks() > 0);
    let (fetch, release) = held_plan(&fs);
    assert!(fs.start_published_prefetch(fetch, Default::default()));
    fs.start_fill(incfs_fs::fetch::fill::FillConfig::default())
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(fs.prefetch_stats().is_none(), "the plan has not arrived");
    assert_eq!(
        fs.fill_stats().map(|f| f.bytes_asked),
        Some(0),
        "the fill waits for the plan on its way"
    );
    release.send(()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !fs.fill_stats().is_some_and(|f| f.done) {
        assert!(
            std::time::Instant::now() < deadline,
            "the image never became local"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(fs.prefetch_stats().is_some(), "the plan was walked");
    assert_eq!(read_all(&fs, ino, 1 << 20).unwrap(), want);
    fs.shutdown().unwrap();
}
