//! A mount loads the chunk table a verified segment at a time: it reads only the header and
//! manifest (and whatever of the table came with that read) up front, fetches a segment
//! when a read first needs it, and turns a segment that does not verify into EIO for the
//! reads that need it, never into wrong bytes.

use std::fs;
use std::sync::Arc;
use std::time::Duration;

use incfs_fs::fetch::FetchConfig;
use incfs_fs::format::{Header, Image, PackOptions, SEGMENT_BYTES, SEGMENT_ENTRIES, pack_dir};
use incfs_fs::fs::{FsConfig, FsError, IncFs, Stats};
use incfs_fs::source::{MockSource, Source};

const CHUNK: u64 = 4096;
/// 10 segments of chunk table (480 KiB): more than the mount's first read brings.
const CHUNKS: u64 = 10 * SEGMENT_ENTRIES as u64;

/// Chunk `i` of the file: distinct per chunk, and compressible, so the image stays small.
fn chunk_bytes(i: u64) -> Vec<u8> {
    let mut b = format!("chunk {i:08} ")
        .into_bytes()
        .repeat(CHUNK as usize / 15 + 1);
    b.truncate(CHUNK as usize);
    b
}

struct Fixture {
    _tmp: tempfile::TempDir,
    bytes: Vec<u8>,
    header: Header,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    let data: Vec<u8> = (0..CHUNKS).flat_map(chunk_bytes).collect();
    fs::write(tree.join("big"), data).unwrap();
    let out = tmp.path().join("img");
    let opts = PackOptions {
        chunk_size: CHUNK as u32,
        ..PackOptions::default()
    };
    pack_dir(&tree, &out, &opts, &()).unwrap();
    let bytes = fs::read(&out).unwrap();
    let header = Image::open(bytes.clone(), None).unwrap().header().clone();
    Fixture {
        _tmp: tmp,
        bytes,
        header,
    }
}

fn mount(src: Arc<dyn Source>, cache: &std::path::Path) -> Arc<IncFs> {
    let mut cfg = FsConfig::new(cache.to_path_buf());
    cfg.fetch = FetchConfig {
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        max_attempts: 3,
        // Exact request accounting: no miss widening or gap bridging unless a test asks.
        miss_amplify_bytes: 0,
        bridge_gap_bytes: 0,
        ..FetchConfig::default()
    };
    Arc::new(IncFs::new(src, &cfg).unwrap())
}

fn read_chunk(fs: &Arc<IncFs>, ino: u64, i: u64) -> Result<Vec<u8>, FsError> {
    let (fh, _) = fs.open(ino)?;
    let r = fs.read(ino, fh, i * CHUNK, CHUNK as u32);
    fs.release(fh);
    r
}

fn stats(fs: &IncFs) -> Stats {
    fs.stats()
}

#[test]
fn a_mount_fetches_only_the_table_segments_its_reads_need() {
    let fx = fixture();
    let source = Arc::new(MockSource::new(fx.bytes.clone()));
    let cache = tempfile::tempdir().unwrap();
    let fs = mount(source.clone(), cache.path());
    let s = stats(&fs);
    assert_eq!(s.table_segments_total, 10);
    assert!(
        s.table_segments_loaded < 10,
        "the whole table came up front ({} segments)",
        s.table_segments_loaded
    );
    assert_eq!((s.table_requests, s.requests), (0, 0));
    assert_eq!(
        source.requests().len(),
        1,
        "one read for header and manifest"
    );

    let ino = fs.lookup(1, b"big").unwrap().ino;
    let last = CHUNKS - 1;
    assert_eq!(read_chunk(&fs, ino, last).unwrap(), chunk_bytes(last));
    let s = stats(&fs);
    assert_eq!(s.table_requests, 1);
    assert_eq!(s.table_bytes, SEGMENT_BYTES, "only the last segment");
    assert_eq!(s.requests, 2, "the segment, then the chunk");
    // Another chunk of the same segment needs no table request.
    assert_eq!(
        read_chunk(&fs, ino, last - 5).unwrap(),
        chunk_bytes(last - 5)
    );
    assert_eq!(stats(&fs).table_requests, 1);
    // A whole read is right, and loads every segment once.
    for i in (0..CHUNKS).step_by(97) {
        assert_eq!(
            read_chunk(&fs, ino, i).unwrap(),
            chunk_bytes(i),
            "chunk {i}"
        );
    }
    let s = stats(&fs);
    assert_eq!(s.table_segments_loaded, 10);
    assert!(s.table_bytes <= 10 * SEGMENT_BYTES);
}

#[test]
fn a_table_segment_that_does_not_verify_gives_eio_never_wrong_bytes() {
    let fx = fixture();
    let mut bytes = fx.bytes.clone();
    // Flip a bit in the stored offset of the last segment's first entry: the entry would
    // point at another chunk's bytes if it were used.
    let at = fx.header.chunk_table_offset + 9 * SEGMENT_BYTES;
    bytes[at as usize] ^= 0x40;
    let source = Arc::new(MockSource::new(bytes));
    let cache = tempfile::tempdir().unwrap();
    let fs = mount(source.clone(), cache.path());
    let ino = fs.lookup(1, b"big").unwrap().ino;
    let first_of_last = 9 * SEGMENT_ENTRIES as u64;
    match read_chunk(&fs, ino, first_of_last) {
        Err(e @ FsError::Fetch { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("segment 9"), "{msg}");
        }
        other => panic!("expected EIO, got {:?}", other.map(|b| b.len())),
    }
    let s = stats(&fs);
    assert_eq!(s.table_requests, 3, "retried up to max_attempts");
    assert_eq!(s.read_errors, 1);
    // The rest of the image still reads right.
    assert_eq!(read_chunk(&fs, ino, 0).unwrap(), chunk_bytes(0));
    assert_eq!(
        read_chunk(&fs, ino, first_of_last - 1).unwrap(),
        chunk_bytes(first_of_last - 1)
    );
    assert!(matches!(
        read_chunk(&fs, ino, CHUNKS - 1),
        Err(FsError::Fetch { .. })
    ));
}

#[test]
fn concurrent_readers_of_one_segment_fetch_it_once() {
    let fx = fixture();
    let source = Arc::new(MockSource::new(fx.bytes.clone()));
    source.set_delay(Duration::from_millis(30));
    let cache = tempfile::tempdir().unwrap();
    let fs = Arc::new(mount(source.clone(), cache.path()));
    let ino = fs.lookup(1, b"big").unwrap().ino;
    let base = 8 * SEGMENT_ENTRIES as u64;
    let readers: Vec<_> = (0..8u64)
        .map(|k| {
            let fs = Arc::clone(&fs);
            std::thread::spawn(move || {
                let i = base + k * 100;
                assert_eq!(read_chunk(&fs, ino, i).unwrap(), chunk_bytes(i));
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    let s = stats(&fs);
    assert_eq!(s.table_requests, 1);
    assert_eq!(s.table_bytes, SEGMENT_BYTES);
}

/// In a hot-first image the planned slots' entries lead the table whatever their slot
/// numbers: a start that reads only planned chunks loads no segment beyond the first read.
#[test]
fn a_relaid_table_puts_the_planned_entries_first() {
    use incfs_fs::format::{RelayoutOptions, relayout};
    let fx = fixture();
    let img = Image::open(fx.bytes.clone(), None).unwrap();
    // 300 slots from every segment, in a scrambled order.
    let plan: Vec<u64> = (0..300u64).map(|i| (i * 7919) % CHUNKS).collect();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("hot.img");
    relayout(&img, &plan, &out, &RelayoutOptions::default()).unwrap();
    let source = Arc::new(MockSource::new(fs::read(&out).unwrap()));
    let cache = tempfile::tempdir().unwrap();
    let fs = mount(source.clone(), cache.path());
    let ino = fs.lookup(1, b"big").unwrap().ino;
    for &i in plan.iter().rev() {
        assert_eq!(
            read_chunk(&fs, ino, i).unwrap(),
            chunk_bytes(i),
            "chunk {i}"
        );
    }
    let s = stats(&fs);
    assert_eq!(s.table_requests, 0, "{s:?}");
    // A chunk outside the plan, at the table's end, loads its segment.
    let cold = (0..CHUNKS).rev().find(|c| !plan.contains(c)).unwrap();
    assert_eq!(read_chunk(&fs, ino, cold).unwrap(), chunk_bytes(cold));
    assert_eq!(stats(&fs).table_requests, 1);
}
