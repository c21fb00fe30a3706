//! pack → read back → verify, on odd trees, at several chunk sizes, and on the real clang-22
//! tree; corruption is reported naming the file and chunk.

mod common;

use std::fs;
use std::path::Path;

use incfs_datasets::require::{Need, require};
use incfs_datasets::trees::{self, Workload};
use incfs_fs::format::{Digest, FormatError, Image, PackOptions, pack_dir};

fn pack(dir: &Path, out: &Path, chunk: u32) -> incfs_fs::format::PackSummary {
    let opts = PackOptions {
        chunk_size: chunk,
        ..PackOptions::default()
    };
    pack_dir(dir, out, &opts, &()).unwrap()
}

#[test]
fn odd_tree_round_trips_at_4k_64k_and_1m_chunks() {
    for chunk in [4096u32, 65536, 1 << 20] {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        common::odd_tree(&tree, chunk as usize);
        let img_path = tmp.path().join("t.img");
        let s = pack(&tree, &img_path, chunk);
        assert_eq!(
            s.skipped.len(),
            1,
            "only the fifo is skipped: {:?}",
            s.skipped
        );
        assert!(s.skipped[0].0.ends_with("a-fifo"));
        assert_eq!(s.hardlinks, 1);
        assert!(
            s.dedupe_saved >= u64::from(chunk) * 3,
            "identical chunks stored once"
        );
        let img = Image::open_path(&img_path, Some(&s.root_digest)).unwrap();
        let files = common::assert_image_matches(&img, &tree);
        assert!(files >= 14, "compared {files} files");
        let report = img.verify(&|_| {});
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        assert_eq!(report.chunks, img.table().len());
    }
}

#[test]
fn odd_tree_round_trips_with_chunks_framed_together() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    common::odd_tree(&tree, 4096);
    let one = pack(&tree, &tmp.path().join("one.img"), 4096);
    let img_path = tmp.path().join("framed.img");
    let opts = PackOptions {
        chunk_size: 4096,
        frame_bytes: 64 * 1024,
        ..PackOptions::default()
    };
    let s = pack_dir(&tree, &img_path, &opts, &()).unwrap();
    assert_eq!(
        (s.unique_chunks, s.dedupe_saved),
        (one.unique_chunks, one.dedupe_saved),
        "the same chunks stored once, framed or not"
    );
    let img = Image::open_path(&img_path, Some(&s.root_digest)).unwrap();
    let framed = img
        .table()
        .entries()
        .iter()
        .filter(|e| e.frame_len > e.raw_len)
        .count();
    assert!(framed > 0, "no chunk shares a frame");
    assert!(
        img.table()
            .entries()
            .iter()
            .all(|e| e.frame_len <= 256 * 1024),
        "a frame holds at most 64 KiB, or 256 KiB of a file read whole (a small file)"
    );
    let files = common::assert_image_matches(&img, &tree);
    assert!(files >= 14, "compared {files} files");
    let report = img.verify(&|_| {});
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    // Too large a frame is refused, naming the option.
    let big = PackOptions {
        frame_bytes: 64 << 20,
        ..opts
    };
    let e = pack_dir(&tree, &tmp.path().join("big.img"), &big, &()).unwrap_err();
    assert!(e.to_string().contains("frame size"), "{e}");
}

#[test]
fn packing_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    common::odd_tree(&tree, 4096);
    let a = pack(&tree, &tmp.path().join("a.img"), 4096);
    let b = pack(&tree, &tmp.path().join("b.img"), 4096);
    assert_eq!(a.root_digest, b.root_digest);
    assert_eq!(
        fs::read(tmp.path().join("a.img")).unwrap(),
        fs::read(tmp.path().join("b.img")).unwrap()
    );
}

#[test]
fn a_flipped_data_byte_is_named_by_verify_and_refused_by_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    fs::create_dir(&tree).unwrap();
    fs::write(tree.join("a"), common::noise(4096 * 3, 9)).unwrap();
    fs::write(tree.join("b"), common::noise(4096 * 2, 10)).unwrap();
    let img_path = tmp.path().join("t.img");
    pack(&tree, &img_path, 4096);
    let mut bytes = fs::read(&img_path).unwrap();
    let img = Image::open(bytes.clone(), None).unwrap();
    // Chunk 1 of "b": b is the second file, so its chunks are slots 3 and 4.
    let entry = *img.table().get(4).unwrap();
    let at = (img.header().data_offset + entry.stored_offset + 7) as usize;
    bytes[at] ^= 0x01;
    let bad = Image::open(bytes, None).unwrap();
    let report = bad.verify(&|_| {});
    assert_eq!(report.failures.len(), 1);
    let f = &report.failures[0];
    assert_eq!(f.path.as_deref(), Some("b"));
    assert_eq!(f.chunk_index, 1);
    assert!(f.reason.contains("digest"), "{}", f.reason);
    let b_inode = bad.walk().into_iter().find(|(p, _)| p == b"b").unwrap().1;
    assert!(matches!(
        bad.read_file(b_inode),
        Err(FormatError::ChunkCorrupt { slot: 4, .. })
    ));
}

#[test]
fn wrong_expected_digest_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    fs::create_dir(&tree).unwrap();
    fs::write(tree.join("a"), b"x").unwrap();
    let img_path = tmp.path().join("t.img");
    pack(&tree, &img_path, 4096);
    let other = Digest([3; 32]);
    assert!(matches!(
        Image::open_path(&img_path, Some(&other)),
        Err(FormatError::RootDigest { .. })
    ));
}

#[test]
fn bad_options_and_roots_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.img");
    for chunk in [0u32, 1000, 2048, 3 << 20] {
        let opts = PackOptions {
            chunk_size: chunk,
            ..PackOptions::default()
        };
        assert!(
            pack_dir(tmp.path(), &out, &opts, &()).is_err(),
            "chunk {chunk}"
        );
    }
    let err = pack_dir(
        &tmp.path().join("missing"),
        &out,
        &PackOptions::default(),
        &(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
    assert!(!out.exists(), "no partial output");
}

#[test]
fn clang_tree_round_trips_byte_for_byte() {
    if !require("clang_tree_round_trips_byte_for_byte", &[Need::Clang]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let tree = trees::shared(Workload::Clang, Path::new(env!("CARGO_TARGET_TMPDIR"))).unwrap();
    let img_path = tmp.path().join("clang.img");
    let s = pack(&tree, &img_path, 65536);
    assert!(s.raw_bytes > 150_000_000, "tree is {} bytes", s.raw_bytes);
    assert!(
        s.stored_bytes < s.raw_bytes / 2,
        "compressed {} -> {}",
        s.raw_bytes,
        s.stored_bytes
    );
    let img = Image::open_path(&img_path, Some(&s.root_digest)).unwrap();
    let files = common::assert_image_matches(&img, &tree);
    assert!(files > 100, "compared {files} files");
}
