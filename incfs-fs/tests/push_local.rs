//! Local data of partly local files pushed into the page cache at their first open
//! (`incfs_fs::fs::push`). Without a mount: what is pushed is exactly the whole chunks that
//! were local when the mount started, with their bytes. On real mounts (root, /dev/fuse): a
//! restart from a cache holding part of a file serves that part from the page cache, without a
//! read reaching the daemon, by `read()` and by `mmap()`, with the right bytes; a chunk that
//! was not local is fetched and verified on demand as before; a chunk that does not verify
//! fails the read with EIO, never wrong bytes.

mod common;

use std::fs;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use incfs_datasets::require::{Need, require};
use incfs_fs::format::{Image, PackOptions, pack_dir};
use incfs_fs::fs::push::{PushConfig, Pusher, Store};
use incfs_fs::fs::{FsConfig, IncFs};
use incfs_fs::source::{FileSource, MockSource, Source};

use common::daemon::{Daemon, ENV_EXACT, drop_caches};

/// The daemon: does nothing unless started by [`Daemon::start`].
#[test]
#[ignore = "helper: run by the mount tests as their FUSE daemon"]
fn daemon_child() {
    common::daemon::child();
}

/// Chunk size of the test image.
const CHUNK: u64 = 16 * 1024;
/// The file: 128 whole chunks and a last one of 3,000 bytes.
const SIZE: u64 = 128 * CHUNK + 3000;

fn dir(root: &Path, name: &str) -> PathBuf {
    let p = root.join(name);
    fs::create_dir_all(&p).unwrap();
    p
}

/// Image offsets of the stored bytes of chunk `index` of file `name`.
fn stored_range(img: &Path, name: &[u8], index: u64) -> (u64, u64) {
    let img = Image::open_path(img, None).unwrap();
    let f = img.files().into_iter().find(|f| f.path == name).unwrap();
    let e = img.table().get(f.first_chunk + index).unwrap();
    let start = img.header().data_offset + e.stored_offset;
    (start, start + u64::from(e.stored_len))
}

/// Reads `len` bytes at `off` of `f` through a private read-only mapping of the whole file.
fn read_mapped(f: &fs::File, off: u64, len: usize) -> Vec<u8> {
    // SAFETY: a fresh private read-only mapping of SIZE bytes of a file that long; the copy
    // stays inside it, and the mapping is unmapped before return.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            SIZE as usize,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        let s = std::slice::from_raw_parts(p.cast::<u8>().add(off as usize), len).to_vec();
        libc::munmap(p, SIZE as usize);
        s
    }
}

/// Packs a tree holding one file `lib` of [`SIZE`] noise bytes into `root/img`; returns the
/// image's path and the content.
fn one_file_image(root: &Path) -> (PathBuf, Vec<u8>) {
    let tree = dir(root, "tree");
    let content = common::noise(SIZE as usize, 7);
    fs::write(tree.join("lib"), &content).unwrap();
    let img = root.join("img");
    let opts = PackOptions {
        chunk_size: CHUNK as u32,
        ..PackOptions::default()
    };
    pack_dir(&tree, &img, &opts, &()).unwrap();
    (img, content)
}

fn open_fs(img: &Path, cache: &Path) -> Arc<IncFs> {
    let src = Arc::new(FileSource::open(img).unwrap());
    let mut cfg = FsConfig::new(cache.to_path_buf());
    // Only the chunks a read touches become local (no widened misses).
    cfg.fetch.miss_amplify_bytes = 0;
    Arc::new(IncFs::new(src, &cfg).unwrap())
}

/// One store: FUSE inode, offset, bytes.
type Stored = (u64, u64, Vec<u8>);

/// A [`Store`] that keeps what it was given.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Stored>>>);

impl Store for Recorder {
    fn store(&self, ino: u64, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.lock().unwrap().push((ino, offset, data.to_vec()));
        Ok(())
    }
}

#[test]
fn only_whole_chunks_local_at_mount_are_pushed_with_their_bytes() {
    let w = tempfile::tempdir().unwrap();
    let (img, content) = one_file_image(w.path());
    let cache = dir(w.path(), "cache");
    // Lib is FUSE inode 2 (the root is 1, its only entry the next).
    let ino = 2;
    let fs = open_fs(&img, &cache);
    assert_eq!(fs.getattr(ino).unwrap().size, SIZE);
    let (fh, _) = fs.open(ino).unwrap();
    // Chunks 3..6 and the last two (the last one 3,000 bytes) become local.
    fs.read(ino, fh, 3 * CHUNK, (3 * CHUNK) as u32).unwrap();
    fs.read(ino, fh, SIZE - 10_000, 10_000).unwrap();
    // Nothing was local at mount: nothing to push.
    assert_eq!(fs.preloaded_ranges(ino, u64::MAX), vec![]);
    fs.release(fh);
    fs.shutdown().unwrap();
    drop(fs);

    let fs = open_fs(&img, &cache);
    let all = vec![3 * CHUNK..6 * CHUNK, 127 * CHUNK..SIZE];
    assert_eq!(fs.preloaded_ranges(ino, u64::MAX), all);
    // A budget takes whole chunks from the start, never part of one.
    assert_eq!(
        fs.preloaded_ranges(ino, 2 * CHUNK + 100),
        vec![3 * CHUNK..5 * CHUNK]
    );
    // A chunk this mount fetches is not pushed (the read that fetched it filled the cache).
    let (fh, _) = fs.open(ino).unwrap();
    fs.read(ino, fh, 6 * CHUNK, 100).unwrap();
    assert_eq!(fs.preloaded_ranges(ino, u64::MAX), all);

    let rec = Recorder::default();
    let config = PushConfig {
        threads: 2,
        ..PushConfig::default()
    };
    let pusher = Pusher::start(Arc::clone(&fs), rec.clone(), config).unwrap();
    pusher.opened(ino);
    // The open is answered only once its file is pushed (no read can then hold a page).
    let expected = 3 * CHUNK + CHUNK + 3000;
    assert_eq!(fs.stats().pushed_bytes, expected);
    pusher.opened(ino); // the second open of the mount pushes nothing more
    pusher.stop();
    let mut got = rec.0.lock().unwrap().clone();
    got.sort_by_key(|(_, off, _)| *off);
    let mut pushed = Vec::new();
    for (i, off, data) in &got {
        assert_eq!(*i, ino);
        assert!(
            data[..] == content[*off as usize..*off as usize + data.len()],
            "at {off}"
        );
        pushed.push(*off..*off + data.len() as u64);
    }
    assert_eq!(pushed, all, "pushed exactly the local ranges, once");
    assert_eq!(fs.stats().pushed_bytes, expected);
    fs.release(fh);
    fs.shutdown().unwrap();
}

/// A store's thread and byte range.
type ThreadStore = (std::thread::ThreadId, Range<u64>);

/// A [`Store`] that notes which thread made each store, and where.
#[derive(Clone, Default)]
struct ThreadRecorder(Arc<Mutex<Vec<ThreadStore>>>);

impl Store for ThreadRecorder {
    fn store(&self, _ino: u64, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let at = offset..offset + data.len() as u64;
        self.0
            .lock()
            .unwrap()
            .push((std::thread::current().id(), at));
        Ok(())
    }
}

/// Makes the first `chunks` chunks of `lib` local in a fresh cache, remounts it and opens
/// `lib` through a pusher; returns the threads that stored, and what.
fn push_after_reading(chunks: u64) -> Vec<ThreadStore> {
    let w = tempfile::tempdir().unwrap();
    let (img, _) = one_file_image(w.path());
    let cache = dir(w.path(), "cache");
    let ino = 2;
    let fs = open_fs(&img, &cache);
    let (fh, _) = fs.open(ino).unwrap();
    fs.read(ino, fh, 0, (chunks * CHUNK) as u32).unwrap();
    fs.release(fh);
    fs.shutdown().unwrap();
    drop(fs);

    let fs = open_fs(&img, &cache);
    let rec = ThreadRecorder::default();
    let pusher = Pusher::start(Arc::clone(&fs), rec.clone(), PushConfig::default()).unwrap();
    pusher.opened(ino);
    assert_eq!(fs.stats().pushed_bytes, chunks * CHUNK);
    pusher.stop();
    fs.shutdown().unwrap();
    rec.0.lock().unwrap().clone()
}

/// A file whose local part is one small range is pushed by the thread that opens it (a
/// hand-off to a worker and back would cost as much as the push); a larger one by the
/// workers, side by side.
#[test]
fn a_small_local_part_is_pushed_by_the_opening_thread_and_a_large_one_by_the_workers() {
    let me = std::thread::current().id();
    let small = 2;
    assert!(small * CHUNK <= incfs_fs::fs::push::INLINE_BYTES);
    let got = push_after_reading(small);
    assert!(!got.is_empty());
    assert!(got.iter().all(|(t, _)| *t == me), "{got:?}");
    assert_eq!(got.last().map(|(_, r)| r.end), Some(small * CHUNK));

    let large = 40;
    assert!(large * CHUNK > incfs_fs::fs::push::INLINE_BYTES);
    let got = push_after_reading(large);
    assert!(!got.is_empty());
    assert!(got.iter().all(|(t, _)| *t != me), "{got:?}");
}

/// A read that waits for the network holds its pages locked in the kernel, and a store into
/// them would wait for that lock uninterruptibly: killed there, a daemon could never exit
/// (`fs::push`). So the push leaves out the chunks such a read covers.
#[test]
fn the_push_leaves_out_the_chunks_of_a_read_waiting_for_the_network() {
    let w = tempfile::tempdir().unwrap();
    let (img, content) = one_file_image(w.path());
    let cache = dir(w.path(), "cache");
    let ino = 2;
    let fs = open_fs(&img, &cache);
    let (fh, _) = fs.open(ino).unwrap();
    fs.read(ino, fh, 0, (8 * CHUNK) as u32).unwrap();
    fs.release(fh);
    fs.shutdown().unwrap();
    drop(fs);

    // Chunks 0..8 local; a read of chunks 4..12 waits for 8..12 from a slow source.
    let src = Arc::new(MockSource::new(fs::read(&img).unwrap()));
    let mut cfg = FsConfig::new(cache.clone());
    cfg.fetch.miss_amplify_bytes = 0;
    let fs = Arc::new(IncFs::new(Arc::clone(&src) as Arc<dyn Source>, &cfg).unwrap());
    assert_eq!(fs.preloaded_ranges(ino, u64::MAX), vec![0..8 * CHUNK]);
    src.set_delay(Duration::from_millis(1500));
    let (fh, _) = fs.open(ino).unwrap();
    let reader = {
        let fs = Arc::clone(&fs);
        std::thread::spawn(move || fs.read(ino, fh, 4 * CHUNK, (8 * CHUNK) as u32))
    };
    let t = Instant::now();
    while fs.stats().blocked_reads == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the read did not start"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let rec = Recorder::default();
    let pusher = Pusher::start(Arc::clone(&fs), rec.clone(), PushConfig::default()).unwrap();
    pusher.opened(ino);
    while fs.stats().pushed_bytes < 4 * CHUNK {
        assert!(t.elapsed() < Duration::from_secs(5), "not pushed");
        std::thread::sleep(Duration::from_millis(2));
    }
    let got = reader.join().unwrap().unwrap();
    assert!(got[..] == content[4 * CHUNK as usize..12 * CHUNK as usize]);
    pusher.stop();
    let stored: Vec<_> = rec
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|(_, off, data)| *off..*off + data.len() as u64)
        .collect();
    assert_eq!(
        stored,
        vec![0..4 * CHUNK],
        "only the chunks no waiting read holds"
    );
    fs.release(fh);
    fs.shutdown().unwrap();
}

#[test]
fn push_serves_chunks_local_at_mount_from_the_page_cache() {
    let name = "push_serves_chunks_local_at_mount_from_the_page_cache";
    if !require(name, &[Need::Root, Need::Fuse]) {
        return;
    }
    let w = tempfile::tempdir().unwrap();
    let (img, content) = one_file_image(w.path());
    let (mnt, cache) = (dir(w.path(), "mnt"), dir(w.path(), "cache"));

    // First mount: the first 64 chunks and the last two become local (and no others: misses
    // are not widened).
    let exact = [(ENV_EXACT, String::new())];
    let d = Daemon::start_with(img.to_str().unwrap(), &mnt, &cache, None, &exact);
    let f = fs::File::open(mnt.join("lib")).unwrap();
    // Backwards, one chunk at a time: a sequential reader would have the rest fetched ahead.
    let mut buf = vec![0u8; CHUNK as usize];
    for c in (0..64).rev() {
        f.read_exact_at(&mut buf, c * CHUNK).unwrap();
    }
    let mut tail = vec![0u8; 10_000];
    f.read_exact_at(&mut tail, SIZE - 10_000).unwrap();
    drop(f);
    let s = d.stats();
    assert_eq!(s.chunks_local, 66, "{s:?}");
    assert_eq!(s.pushed_bytes, 0, "nothing was local at mount: {s:?}");
    d.unmount();

    // Second mount from the same cache, page cache dropped, chunk 80 corrupted at the source.
    drop_caches();
    let bad = stored_range(&img, b"lib", 80);
    let d = Daemon::start_with(img.to_str().unwrap(), &mnt, &cache, Some(bad), &exact);
    let f = fs::File::open(mnt.join("lib")).unwrap();
    let expected = 65 * CHUNK + 3000;
    let t = Instant::now();
    while d.stats().pushed_bytes < expected {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "not pushed: {:?}",
            d.stats()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let before = d.stats();
    assert_eq!(before.pushed_bytes, expected, "{before:?}");

    // The local part comes from the page cache: right bytes, no read reaches the daemon.
    for off in [0, 5 * CHUNK + 17, 63 * CHUNK] {
        let mut b = vec![0u8; CHUNK as usize];
        f.read_exact_at(&mut b, off).unwrap();
        assert!(
            b == content[off as usize..(off + CHUNK) as usize],
            "read at {off}"
        );
    }
    assert!(
        read_mapped(&f, 40 * CHUNK, 3 * CHUNK as usize)
            == content[(40 * CHUNK) as usize..(43 * CHUNK) as usize]
    );
    assert!(read_mapped(&f, SIZE - 10_000, 10_000) == content[(SIZE - 10_000) as usize..]);
    let after = d.stats();
    assert_eq!(
        after.reads, before.reads,
        "a pushed page was read through incfs: {after:?}"
    );
    assert_eq!(after.chunks_fetched, 0, "{after:?}");

    // A chunk that was not local is fetched, verified and served.
    let mut b = vec![0u8; 100];
    f.read_exact_at(&mut b, 70 * CHUNK + 5).unwrap();
    assert!(b == content[(70 * CHUNK + 5) as usize..(70 * CHUNK + 105) as usize]);
    let s = d.stats();
    assert!(s.reads > after.reads && s.chunks_fetched >= 1, "{s:?}");

    // A chunk that does not verify: EIO, not its bytes.
    let err = f.read_exact_at(&mut b, 80 * CHUNK + 5).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(d.stats().fetch_errors > 0);
    drop(f);
    d.unmount();
}
