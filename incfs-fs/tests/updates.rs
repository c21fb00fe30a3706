//! Updates: what a new image shares with an old one (`format::diff`), a mount of the new
//! image taking the old image's cached chunks instead of fetching them
//! (`cache::siblings`), and a plan carried over to the new image (`plan::carry`).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use incfs_fs::fetch::{FetchConfig, ReadAheadConfig};
use incfs_fs::format::{
    FileStatus, Image, PackOptions, RelayoutOptions, diff, pack_dir, relayout, relayout_on_base,
};
use incfs_fs::fs::{FsConfig, IncFs, OpenMode};
use incfs_fs::plan::carry::carry;
use incfs_fs::plan::{PLAN_VERSION, PlanEntry, PrefetchPlan};
use incfs_fs::source::{MockSource, RequestKind, Source};

const CHUNK: usize = 4096;

/// v1 and v2 of a small app: `same` unchanged, `grown` with chunks appended, `patched` with
/// its third chunk rewritten, `renamed-1` renamed to `renamed-2`, `gone` removed, `added`
/// new.
struct Versions {
    tmp: tempfile::TempDir,
    v1: PathBuf,
    v2: PathBuf,
}

fn versions() -> Versions {
    let tmp = tempfile::tempdir().unwrap();
    let (t1, t2) = (tmp.path().join("t1"), tmp.path().join("t2"));
    for t in [&t1, &t2] {
        fs::create_dir_all(t.join("lib")).unwrap();
        fs::write(t.join("same"), common::noise(5 * CHUNK, 1)).unwrap();
    }
    let grown = common::noise(6 * CHUNK, 2);
    fs::write(t1.join("lib/grown"), &grown[..4 * CHUNK]).unwrap();
    fs::write(t2.join("lib/grown"), &grown).unwrap();
    let mut patched = common::noise(8 * CHUNK, 3);
    fs::write(t1.join("lib/patched"), &patched).unwrap();
    patched[2 * CHUNK..3 * CHUNK].copy_from_slice(&common::noise(CHUNK, 4));
    fs::write(t2.join("lib/patched"), &patched).unwrap();
    let renamed = common::noise(3 * CHUNK + 100, 5);
    fs::write(t1.join("renamed-1"), &renamed).unwrap();
    fs::write(t2.join("renamed-2"), &renamed).unwrap();
    fs::write(t1.join("gone"), common::noise(2 * CHUNK, 6)).unwrap();
    fs::write(t2.join("added"), common::noise(2 * CHUNK, 7)).unwrap();
    let opts = PackOptions::default();
    let (v1, v2) = (tmp.path().join("v1.img"), tmp.path().join("v2.img"));
    pack_dir(&t1, &v1, &opts, &()).unwrap();
    pack_dir(&t2, &v2, &opts, &()).unwrap();
    Versions { tmp, v1, v2 }
}

#[test]
fn diff_counts_shared_and_new_chunks_per_file() {
    let v = versions();
    let (old, new) = (
        Image::open_path(&v.v1, None).unwrap(),
        Image::open_path(&v.v2, None).unwrap(),
    );
    let d = diff(&old, &new);
    // v2: same 5 + grown 6 + patched 8 + renamed 4 + added 2 = 25 chunks; new: grown's 2,
    // patched's 1, added's 2.
    assert_eq!(d.total.chunks, 25);
    assert_eq!(d.total.new_chunks(), 5);
    assert_eq!(d.total.new_raw_bytes(), 5 * CHUNK as u64);
    assert_eq!(
        d.total.raw_bytes,
        new.manifest().data_len.max(d.total.raw_bytes)
    );
    assert!(d.total.new_stored_bytes() > 0 && d.total.shared_stored_bytes > 0);
    assert_eq!(
        (
            d.files_same,
            d.files_changed,
            d.files_added,
            d.files_removed
        ),
        (1, 2, 2, 2)
    );
    let file = |p: &str| d.files.iter().find(|f| f.path == p).unwrap();
    assert_eq!(file("same").status, FileStatus::Same);
    assert_eq!(file("lib/patched").status, FileStatus::Changed);
    assert_eq!(file("lib/patched").counts.new_chunks(), 1);
    assert_eq!(file("lib/grown").counts.shared_chunks, 4);
    // Renamed: "added" by path, but every chunk shared.
    assert_eq!(file("renamed-2").status, FileStatus::Added);
    assert_eq!(file("renamed-2").counts.new_chunks(), 0);
    // An image against itself shares everything.
    let d = diff(&new, &new);
    assert_eq!(d.total.new_chunks(), 0);
    assert_eq!(d.total.shared_raw_ratio(), 1.0);
}

fn mount(src: Arc<dyn Source>, cache: &Path) -> Arc<IncFs> {
    let mut cfg = FsConfig::new(cache.to_path_buf());
    cfg.fetch = FetchConfig {
        miss_amplify_bytes: 0,
        bridge_gap_bytes: 0,
        readahead: ReadAheadConfig {
            small_file: 0,
            ..ReadAheadConfig::default()
        },
        ..FetchConfig::default()
    };
    Arc::new(IncFs::new(src, &cfg).unwrap())
}

/// Reads every file of the mounted image and checks it against the image.
fn read_everything(fs: &Arc<IncFs>, img: &Image<fs::File>) {
    for f in img.files() {
        let ino = u64::from(f.inode) + 1;
        let (fh, _) = fs.open(ino).unwrap();
        let mut got = Vec::new();
        while (got.len() as u64) < f.size {
            let b = fs.read(ino, fh, got.len() as u64, 64 * 1024).unwrap();
            assert!(!b.is_empty());
            got.extend_from_slice(&b);
        }
        fs.release(fh);
        assert_eq!(got, img.read_file(f.inode).unwrap(), "{}", f.display_path());
    }
}

/// Stored bytes of the data section the source served.
fn data_requests(src: &MockSource, img: &Image<fs::File>) -> Vec<(u64, u64)> {
    let data = img.header().data_offset;
    src.requests()
        .iter()
        .filter(|r| r.offset >= data && r.kind != RequestKind::Background)
        .map(|r| (r.offset - data, r.len))
        .collect()
}

#[test]
fn a_new_image_takes_the_chunks_an_old_image_cached_and_fetches_only_the_rest() {
    let v = versions();
    let cache = tempfile::tempdir().unwrap();
    let (old, new) = (
        Image::open_path(&v.v1, None).unwrap(),
        Image::open_path(&v.v2, None).unwrap(),
    );
    let d = diff(&old, &new);

    // v1: mount, read everything, unmount.
    let src1 = Arc::new(MockSource::new(fs::read(&v.v1).unwrap()));
    let fs1 = mount(src1.clone(), cache.path());
    read_everything(&fs1, &old);
    assert_eq!(fs1.stats().chunks_seeded, 0, "nothing to take from yet");
    fs1.shutdown().unwrap();
    drop(fs1);

    // v2 with the same cache root: the source sees only v2's new chunks.
    let src2 = Arc::new(MockSource::new(fs::read(&v.v2).unwrap()));
    let fs2 = mount(src2.clone(), cache.path());
    read_everything(&fs2, &new);
    let s = fs2.stats();
    assert_eq!(s.chunks_fetched, d.total.new_chunks(), "{s:?}");
    assert_eq!(s.chunks_seeded, d.total.shared_chunks, "{s:?}");
    assert_eq!(s.bytes_seeded, d.total.shared_raw_bytes, "{s:?}");
    let fetched: u64 = data_requests(&src2, &new).iter().map(|r| r.1).sum();
    assert_eq!(fetched, d.total.new_stored_bytes(), "{:?}", src2.requests());
    // The seeded files are whole in the cache: passed through.
    let same = fs2.lookup(1, b"same").unwrap().ino;
    let (fh, mode) = fs2.open(same).unwrap();
    assert!(matches!(mode, OpenMode::Passthrough { .. }), "{mode:?}");
    fs2.release(fh);
    fs2.shutdown().unwrap();
    drop(fs2);

    // A remount of v2 needs nothing at all, and v1's cache is untouched.
    let src3 = Arc::new(MockSource::new(fs::read(&v.v2).unwrap()));
    let fs3 = mount(src3.clone(), cache.path());
    read_everything(&fs3, &new);
    assert_eq!(fs3.stats().chunks_fetched, 0);
    fs3.shutdown().unwrap();
    let fs4 = mount(
        Arc::new(MockSource::new(fs::read(&v.v1).unwrap())),
        cache.path(),
    );
    read_everything(&fs4, &old);
    assert_eq!(fs4.stats().chunks_fetched, 0);
    fs4.shutdown().unwrap();
    drop(v.tmp);
}

#[test]
fn a_damaged_sibling_chunk_is_fetched_instead() {
    let v = versions();
    let cache = tempfile::tempdir().unwrap();
    let (old, new) = (
        Image::open_path(&v.v1, None).unwrap(),
        Image::open_path(&v.v2, None).unwrap(),
    );
    let fs1 = mount(
        Arc::new(MockSource::new(fs::read(&v.v1).unwrap())),
        cache.path(),
    );
    read_everything(&fs1, &old);
    fs1.shutdown().unwrap();
    drop(fs1);
    // Flip a byte of `same` in v1's backing file (behind the record's back).
    let same = old.files().into_iter().find(|f| f.path == b"same").unwrap();
    let backing = cache
        .path()
        .join(old.root_digest().to_hex())
        .join("data")
        .join(same.inode.to_string());
    let mut bytes = fs::read(&backing).unwrap();
    bytes[CHUNK + 7] ^= 0x40;
    fs::write(&backing, bytes).unwrap();

    let fs2 = mount(
        Arc::new(MockSource::new(fs::read(&v.v2).unwrap())),
        cache.path(),
    );
    read_everything(&fs2, &new);
    let d = diff(&old, &new);
    let s = fs2.stats();
    assert_eq!(s.chunks_fetched, d.total.new_chunks() + 1, "{s:?}");
    assert_eq!(s.chunks_seeded, d.total.shared_chunks - 1, "{s:?}");
    fs2.shutdown().unwrap();
}

#[test]
fn a_plan_carries_over_to_the_new_image() {
    let v = versions();
    let (old, new) = (
        Image::open_path(&v.v1, None).unwrap(),
        Image::open_path(&v.v2, None).unwrap(),
    );
    let entry = |file: &str, first_chunk, chunk_count, offset_ms| PlanEntry {
        file: file.into(),
        first_chunk,
        chunk_count,
        offset_ms,
        confidence: 1.0,
    };
    let plan = PrefetchPlan {
        version: PLAN_VERSION,
        image_digest: old.root_digest().to_hex(),
        chunk_size: CHUNK as u32,
        total_bytes: 0,
        entries: vec![
            entry("lib/patched", 1, 3, 1.0),
            entry("renamed-1", 0, 4, 2.0),
            entry("gone", 0, 2, 3.0),
            entry("same", 0, 2, 4.0),
            entry("lib/grown", 0, 4, 5.0),
            entry("same", 1, 2, 6.0),
        ],
    };
    let path = v.tmp.path().join("v1.plan.json");
    let (carried, r) = carry(&plan, &path, &old, &new).unwrap();
    assert_eq!(carried.image_digest, new.root_digest().to_hex());
    // patched 1..4 (chunk 2 changed), renamed-1 taken as renamed to renamed-2 (4 kept),
    // gone 2 dropped (no similar new path), same 0..3, grown 4.
    assert_eq!(
        (r.chunks_in, r.kept, r.moved, r.changed, r.dropped),
        (16, 13, 0, 1, 2)
    );
    let got: Vec<(&str, u64, u64, f64)> = carried
        .entries
        .iter()
        .map(|e| (e.file.as_str(), e.first_chunk, e.chunk_count, e.offset_ms))
        .collect();
    assert_eq!(
        got,
        vec![
            ("lib/patched", 1, 3, 1.0),
            ("renamed-2", 0, 4, 2.0),
            ("same", 0, 2, 4.0),
            ("lib/grown", 0, 4, 5.0),
            ("same", 2, 1, 6.0),
        ]
    );
    carried.slots(&path, new.manifest()).unwrap();
    assert!(carried.total_bytes > 0);
    // A plan for another image is refused.
    assert!(carry(&carried, &path, &old, &new).is_err());
}

#[test]
fn an_update_laid_out_on_its_base_keeps_shared_and_new_chunks_in_separate_frames() {
    let v = versions();
    let cache = tempfile::tempdir().unwrap();
    let (old, new) = (
        Image::open_path(&v.v1, None).unwrap(),
        Image::open_path(&v.v2, None).unwrap(),
    );
    // Every slot planned, in an order that alternates files so frames would mix.
    let mut hot: Vec<u64> = (0..new.table().len()).collect();
    hot.reverse();
    let base: std::collections::HashSet<_> =
        old.table().entries().iter().map(|e| e.digest).collect();
    let opts = RelayoutOptions::default();
    let plain = v.tmp.path().join("v2-hot.img");
    let on_base = v.tmp.path().join("v2-hot-base.img");
    let a = relayout(&new, &hot, &plain, &opts).unwrap();
    let b = relayout_on_base(&new, &hot, &base, &on_base, &opts).unwrap();
    assert!(b.hot_frames > a.hot_frames);
    // With no base, the same image as relayout.
    let c = relayout_on_base(
        &new,
        &hot,
        &Default::default(),
        &v.tmp.path().join("c.img"),
        &opts,
    )
    .unwrap();
    assert_eq!(c.root_digest, a.root_digest);
    let img = Image::open_path(&on_base, None).unwrap();
    assert!(img.verify(&|_| {}).failures.is_empty());
    let mut frames: std::collections::HashMap<u64, (bool, u32)> = Default::default();
    for e in img.table().entries() {
        let shared = base.contains(&e.digest);
        let f = frames
            .entry(e.stored_offset)
            .or_insert((shared, e.stored_len));
        assert_eq!(f.0, shared, "a frame mixes shared and new chunks");
    }
    let new_frames: u64 = frames
        .values()
        .filter(|(shared, _)| !shared)
        .map(|(_, len)| u64::from(*len))
        .sum();

    // v1 cached, then the start of v2 fetches only the frames of new chunks.
    let fs1 = mount(
        Arc::new(MockSource::new(fs::read(&v.v1).unwrap())),
        cache.path(),
    );
    read_everything(&fs1, &old);
    fs1.shutdown().unwrap();
    drop(fs1);
    let src = Arc::new(MockSource::new(fs::read(&on_base).unwrap()));
    let fs2 = mount(src.clone(), cache.path());
    read_everything(&fs2, &img);
    let fetched: u64 = data_requests(&src, &img).iter().map(|r| r.1).sum();
    assert_eq!(fetched, new_frames, "{:?}", src.requests());
    fs2.shutdown().unwrap();
}

/// Packs trees `t1` and `t2` (default options) into `dir`'s `v1.img` and `v2.img`; opens both.
fn pack_versions(t1: &Path, t2: &Path, dir: &Path) -> (Image<fs::File>, Image<fs::File>) {
    let (v1, v2) = (dir.join("v1.img"), dir.join("v2.img"));
    pack_dir(t1, &v1, &PackOptions::default(), &()).unwrap();
    pack_dir(t2, &v2, &PackOptions::default(), &()).unwrap();
    (
        Image::open_path(&v1, None).unwrap(),
        Image::open_path(&v2, None).unwrap(),
    )
}

#[test]
fn a_planned_chunk_that_moved_to_another_file_is_found_by_its_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let (t1, t2) = (tmp.path().join("t1"), tmp.path().join("t2"));
    fs::create_dir_all(&t1).unwrap();
    fs::create_dir_all(t2.join("zz")).unwrap();
    let x = common::noise(2 * CHUNK, 21);
    fs::write(t1.join("a.bin"), &x).unwrap();
    let mut other = common::noise(CHUNK, 22);
    other.extend_from_slice(&x);
    fs::write(t2.join("zz/other.dat"), &other).unwrap();
    let (old, new) = pack_versions(&t1, &t2, tmp.path());
    let plan = PrefetchPlan {
        version: PLAN_VERSION,
        image_digest: old.root_digest().to_hex(),
        chunk_size: CHUNK as u32,
        total_bytes: 0,
        entries: vec![PlanEntry {
            file: "a.bin".into(),
            first_chunk: 0,
            chunk_count: 2,
            offset_ms: 0.0,
            confidence: 1.0,
        }],
    };
    let (carried, r) = carry(&plan, &tmp.path().join("p.json"), &old, &new).unwrap();
    assert_eq!((r.kept, r.moved, r.changed, r.dropped), (0, 2, 0, 0));
    assert_eq!(carried.entries.len(), 1);
    let e = &carried.entries[0];
    assert_eq!(
        (e.file.as_str(), e.first_chunk, e.chunk_count),
        ("zz/other.dat", 1, 2)
    );
}

#[test]
fn a_rebuilt_files_shifted_chunks_come_as_deltas_against_the_cached_old_version() {
    use incfs_fs::fetch::delta::spawn_fetch;
    use incfs_fs::format::delta::{DELTA_HEADER_LEN, write_deltas};
    use incfs_fs::retry::RetryPolicy;
    let tmp = tempfile::tempdir().unwrap();
    let (t1, t2) = (tmp.path().join("t1"), tmp.path().join("t2"));
    fs::create_dir_all(&t1).unwrap();
    fs::create_dir_all(&t2).unwrap();
    // v2 of the library: 150 bytes inserted near its start (every later chunk shifts) and
    // one byte changed further on.
    let old_lib = common::noise(60 * CHUNK, 11);
    let mut new_lib = old_lib.clone();
    new_lib.splice(10_000..10_000, common::noise(150, 12));
    new_lib[200_000] ^= 1;
    fs::write(t1.join("lib.so"), &old_lib).unwrap();
    fs::write(t2.join("lib.so"), &new_lib).unwrap();
    let (old, new) = pack_versions(&t1, &t2, tmp.path());
    let (v1, v2) = (tmp.path().join("v1.img"), tmp.path().join("v2.img"));
    let d = diff(&old, &new);
    assert!(d.total.new_chunks() >= 55, "{:?}", d.total);
    let sidecar = tmp.path().join("v2.img.delta");
    let summary = write_deltas(&old, &new, &sidecar).unwrap();
    assert_eq!(summary.candidates, d.total.new_chunks());
    assert!(summary.deltas >= 55, "{summary:?}");
    assert!(
        summary.delta_bytes * 10 < summary.stored_bytes,
        "{summary:?}"
    );

    // v1 read whole into a cache root; then v2 with the same root and its sidecar.
    let v2_start = |cache: &Path| {
        let fs1 = mount(Arc::new(MockSource::new(fs::read(&v1).unwrap())), cache);
        read_everything(&fs1, &old);
        fs1.shutdown().unwrap();
        drop(fs1);
        let src = Arc::new(MockSource::new(fs::read(&v2).unwrap()));
        let fs2 = mount(src.clone(), cache);
        let fetch = spawn_fetch(&v2.to_string_lossy(), cache, &RetryPolicy::default()).unwrap();
        let used = fs2.use_deltas(fetch);
        read_everything(&fs2, &new);
        let stats = fs2.stats();
        fs2.shutdown().unwrap();
        let fetched: u64 = data_requests(&src, &new).iter().map(|r| r.1).sum();
        (used, stats, fetched)
    };
    let cache = tempfile::tempdir().unwrap();
    let (used, s, fetched) = v2_start(cache.path());
    assert!(used);
    assert_eq!(s.chunks_from_deltas, summary.deltas, "{s:?}");
    assert_eq!(s.delta_bytes, summary.delta_bytes, "{s:?}");
    assert_eq!(
        s.chunks_fetched,
        d.total.new_chunks() - summary.deltas,
        "{s:?}"
    );
    assert!(
        fetched * 5 < d.total.new_stored_bytes(),
        "fetched {fetched} of the image's {} new stored bytes",
        d.total.new_stored_bytes()
    );

    // A damaged sidecar costs fetches, never a wrong byte (read_everything checks them).
    let mut bytes = fs::read(&sidecar).unwrap();
    let index_len = u64::from_le_bytes(bytes[72..80].try_into().unwrap());
    for b in &mut bytes[(DELTA_HEADER_LEN + index_len) as usize..] {
        *b ^= 0x5a;
    }
    fs::write(&sidecar, &bytes).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let (_, s, _) = v2_start(cache.path());
    assert_eq!(s.chunks_from_deltas, 0, "{s:?}");
    assert_eq!(s.chunks_fetched, d.total.new_chunks(), "{s:?}");

    // Without the old version cached, the sidecar is not even read.
    let alone = tempfile::tempdir().unwrap();
    let fs2 = mount(
        Arc::new(MockSource::new(fs::read(&v2).unwrap())),
        alone.path(),
    );
    let fetch = spawn_fetch(&v2.to_string_lossy(), alone.path(), &RetryPolicy::default()).unwrap();
    assert!(!fs2.use_deltas(fetch));
    fs2.shutdown().unwrap();
}
