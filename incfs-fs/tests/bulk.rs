//! The bulk sidecar (`IMG.bulk`): it holds every chunk of the image once more, in large
//! frames; the background fill fetches those instead of the image's one-chunk frames and
//! moves fewer bytes; a damaged, foreign or failing sidecar never gives a wrong byte, and
//! the fill then completes from the image.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use incfs_fs::fetch::fill::FillConfig;
use incfs_fs::format::bulk::{
    BULK_HEADER_LEN, BulkOptions, decode_bulk_frame, parse_header, parse_index, path_beside,
    write_beside,
};
use incfs_fs::format::{Digest, Image, PackOptions, pack_dir};
use incfs_fs::fs::{FsConfig, IncFs, Stats};
use incfs_fs::retry::RetryPolicy;
use incfs_fs::serve::{ServeConfig, Server};
use incfs_fs::source::{MockSource, Source};

/// 600 `.py` files of two chunks (a dictionary group), a 1 MiB text file and some noise.
fn tree(root: &Path, seed: u64) {
    fs::create_dir_all(root.join("pkg")).unwrap();
    for i in 0..600u64 {
        fs::write(
            root.join("pkg").join(format!("m{i}.py")),
            common::source_text(seed + i, 8000),
        )
        .unwrap();
    }
    fs::write(
        root.join("big.txt"),
        common::source_text(seed + 9999, 1 << 20),
    )
    .unwrap();
    for i in 0..3u64 {
        fs::write(
            root.join(format!("noise{i}.bin")),
            common::noise(30_000, seed + i),
        )
        .unwrap();
    }
}

struct Packed {
    _tmp: tempfile::TempDir,
    tree: PathBuf,
    image: PathBuf,
}

/// A packed tree with its sidecar beside it.
fn packed(seed: u64) -> Packed {
    let tmp = tempfile::tempdir().unwrap();
    let tree_dir = tmp.path().join("tree");
    tree(&tree_dir, seed);
    let image = tmp.path().join("app.img");
    pack_dir(&tree_dir, &image, &PackOptions::default(), &()).unwrap();
    write_beside(&image, &BulkOptions::default()).unwrap();
    Packed {
        _tmp: tmp,
        tree: tree_dir,
        image,
    }
}

/// Mounts the image in-process over a mock source (the sidecar, when `bulk`, read from the
/// file beside it), runs the fill to its end and checks every file against the tree.
fn fill(p: &Packed, bulk: bool) -> Stats {
    fill_with(p, bulk, FsConfig::new)
}

/// [`fill`] with the configuration `config` makes of the cache directory.
fn fill_with(p: &Packed, bulk: bool, config: impl Fn(PathBuf) -> FsConfig) -> Stats {
    let cache = tempfile::tempdir().unwrap();
    let spec = bulk.then(|| p.image.to_str().unwrap().to_string());
    fill_in(p, cache.path(), spec.as_deref(), config)
}

/// [`fill`] into the cache at `cache`, with the sidecar beside `bulk_spec` if given.
fn fill_in(
    p: &Packed,
    cache: &Path,
    bulk_spec: Option<&str>,
    config: impl Fn(PathBuf) -> FsConfig,
) -> Stats {
    let src: Arc<dyn Source> = Arc::new(MockSource::new(fs::read(&p.image).unwrap()));
    let fs = Arc::new(IncFs::new(src, &config(cache.to_path_buf())).unwrap());
    if let Some(spec) = bulk_spec {
        fs.use_bulk(spec, &RetryPolicy::default());
    }
    fs.start_fill(FillConfig::default()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !fs.fill_stats().is_some_and(|s| s.done) {
        assert!(Instant::now() < deadline, "the fill did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    let stats = fs.stats();
    let img = Image::open_path(&p.image, None).unwrap();
    for f in img.files() {
        let want = fs::read(p.tree.join(f.display_path())).unwrap();
        let got = common::read_file(&fs, &f.display_path()).unwrap();
        assert!(got == want, "{} differs", f.display_path());
    }
    fs.shutdown().unwrap();
    stats
}

#[test]
fn the_sidecar_holds_every_chunk_once_in_frames_smaller_than_the_image() {
    let p = packed(1);
    let img = Image::open_path(&p.image, None).unwrap();
    let bytes = fs::read(path_beside(&p.image)).unwrap();
    let (root, len) = parse_header(&bytes).unwrap();
    assert_eq!(root, img.root_digest());
    let index = &bytes[BULK_HEADER_LEN as usize..(BULK_HEADER_LEN + len) as usize];
    let frames = parse_index(index, len, img.table().len()).unwrap();
    let data = &bytes[(BULK_HEADER_LEN + len) as usize..];
    assert!(frames.len() > 1, "{} frames", frames.len());
    assert!(
        frames.iter().any(|f| f.dictionary != 0),
        "a frame of the .py group uses its dictionary"
    );
    let mut seen = 0u64;
    for f in &frames {
        let stored = &data[f.offset as usize..(f.offset + u64::from(f.len)) as usize];
        let dict = img.dictionary(f.dictionary).unwrap();
        let raw = decode_bulk_frame(f, stored, dict).unwrap();
        assert!(raw.len() <= 256 * 1024 + 4096);
        let mut at = 0usize;
        for s in f.slots() {
            let e = img.table().get(s).unwrap();
            let chunk = &raw[at..at + e.raw_len as usize];
            assert_eq!(Digest::of(chunk), e.digest, "slot {s}");
            at += e.raw_len as usize;
            seen += 1;
        }
        assert_eq!(at, raw.len());
    }
    assert_eq!(seen, img.table().len(), "every slot once");
    let image_data = img.header().data_len;
    assert!(
        (data.len() as u64) * 10 < image_data * 9,
        "sidecar frames {} bytes, image data {image_data}",
        data.len()
    );
}

#[test]
fn the_fill_takes_every_chunk_from_the_sidecar_and_moves_fewer_bytes() {
    let p = packed(2);
    let without = fill(&p, false);
    assert_eq!(without.chunks_from_bulk, 0);
    let with = fill(&p, true);
    assert_eq!(with.chunks_from_bulk, with.chunks_total, "{with:?}");
    assert!(with.bulk_bytes > 0);
    assert!(
        with.bytes_fetched * 10 < without.bytes_fetched * 9,
        "with the sidecar {} bytes, without {}",
        with.bytes_fetched,
        without.bytes_fetched
    );
}

#[test]
fn a_damaged_sidecar_gives_no_wrong_byte_and_the_fill_completes_from_the_image() {
    let p = packed(3);
    let path = path_beside(&p.image);
    let mut bytes = fs::read(&path).unwrap();
    let (_, len) = parse_header(&bytes).unwrap();
    let start = (BULK_HEADER_LEN + len) as usize;
    // Flip a byte every 20 KiB of the frames.
    for at in (start + 100..bytes.len()).step_by(20 * 1024) {
        bytes[at] ^= 0x5a;
    }
    fs::write(&path, &bytes).unwrap();
    let s = fill(&p, true);
    assert!(s.chunks_from_bulk < s.chunks_total, "{s:?}");
    assert!(s.fetch_errors > 0, "{s:?}");
    assert_eq!(s.chunks_local, s.chunks_total);
}

#[test]
fn a_sidecar_of_another_image_is_not_used() {
    let p = packed(4);
    let other = packed(5);
    fs::copy(path_beside(&other.image), path_beside(&p.image)).unwrap();
    let s = fill(&p, true);
    assert_eq!(s.chunks_from_bulk, 0, "{s:?}");
    assert_eq!(s.chunks_local, s.chunks_total);
}

#[test]
fn a_sidecar_whose_frames_do_not_come_is_dropped_and_the_fill_completes() {
    let p = packed(6);
    let path = path_beside(&p.image);
    let bytes = fs::read(&path).unwrap();
    let (_, len) = parse_header(&bytes).unwrap();
    // Header and index only: every frame request fails.
    fs::write(&path, &bytes[..(BULK_HEADER_LEN + len) as usize]).unwrap();
    let t = Instant::now();
    // Batches of 32 KiB: many more than the failures after which the sidecar is dropped.
    let s = fill_with(&p, true, |dir| {
        let mut c = FsConfig::new(dir);
        c.fetch.background_request_bytes = 32 * 1024;
        c
    });
    assert_eq!(s.chunks_from_bulk, 0, "{s:?}");
    // Three failures in a row drop it (one more may have been in flight beside them).
    assert!((3..=4).contains(&s.fetch_errors), "{s:?}");
    assert!(s.requests > 10, "{s:?}");
    assert_eq!(s.chunks_local, s.chunks_total);
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "{:?}: the failing sidecar must be dropped, not retried per batch",
        t.elapsed()
    );
}

#[test]
fn a_cache_that_holds_everything_never_asks_for_the_sidecar() {
    let p = packed(7);
    // The sidecar alone, on a server of its own, so its requests can be counted.
    let www = tempfile::tempdir().unwrap();
    fs::copy(path_beside(&p.image), www.path().join("app.img.bulk")).unwrap();
    let server = Server::start(ServeConfig::new(www.path())).unwrap();
    let spec = server.url("app.img");
    let cache = tempfile::tempdir().unwrap();
    let first = fill_in(&p, cache.path(), Some(&spec), FsConfig::new);
    assert_eq!(first.chunks_from_bulk, first.chunks_total, "{first:?}");
    assert!(server.stats().requests > 0);
    server.reset_stats();
    let again = fill_in(&p, cache.path(), Some(&spec), FsConfig::new);
    assert_eq!(again.chunks_local, again.chunks_total);
    assert_eq!(
        server.stats().requests,
        0,
        "the sidecar was asked for: {:?}",
        server.stats()
    );
}
