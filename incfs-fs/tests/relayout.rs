//! Hot-first relayout: the plan's chunks come first, in plan order; the tree reads back
//! identical; the plan is rebound to the new root digest.

mod common;

use std::fs;

use incfs_fs::format::{Image, PackOptions, RelayoutOptions, pack_dir, relayout};
use incfs_fs::plan::{PLAN_VERSION, PlanEntry, PrefetchPlan};

fn entry(file: &str, first_chunk: u64, chunk_count: u64) -> PlanEntry {
    PlanEntry {
        file: file.into(),
        first_chunk,
        chunk_count,
        offset_ms: 0.0,
        confidence: 1.0,
    }
}

/// One chunk per frame, at pack's level: the hot chunks are copied back to back.
const ONE_PER_FRAME: RelayoutOptions = RelayoutOptions {
    frame_bytes: 4096,
    level: 3,
};

#[test]
fn hot_chunks_lead_in_plan_order_and_the_tree_is_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    common::odd_tree(&tree, 4096);
    let img_path = tmp.path().join("a.img");
    let opts = PackOptions {
        chunk_size: 4096,
        ..PackOptions::default()
    };
    let packed = pack_dir(&tree, &img_path, &opts, &()).unwrap();
    let img = Image::open_path(&img_path, None).unwrap();
    let plan = PrefetchPlan {
        version: PLAN_VERSION,
        image_digest: packed.root_digest.to_hex(),
        chunk_size: 4096,
        total_bytes: 0,
        entries: vec![
            entry("three-and-a-half", 2, 2),
            entry("text", 0, 1),
            // Same stored bytes as three-and-a-half: placed once.
            entry("duplicate-of-three-and-a-half", 2, 1),
            entry("chunk-plus-1", 0, 2),
        ],
    };
    let plan_path = tmp.path().join("a.plan.json");
    plan.save(&plan_path).unwrap();
    let plan = PrefetchPlan::load(&plan_path).unwrap();
    let hot = plan.slots(&plan_path, img.manifest()).unwrap();
    assert_eq!(hot.len(), 6);

    let out = tmp.path().join("b.img");
    let s = relayout(&img, &hot, &out, &ONE_PER_FRAME).unwrap();
    assert_ne!(s.root_digest, packed.root_digest);
    assert_eq!(s.hot_chunks, 5, "the duplicate chunk is placed once");
    assert_eq!(s.hot_frames, 5);
    let relaid = Image::open_path(&out, Some(&s.root_digest)).unwrap();
    common::assert_image_matches(&relaid, &tree);
    assert!(relaid.verify(&|_| {}).failures.is_empty());
    assert_eq!(
        relaid.header().data_len,
        img.header().data_len,
        "same chunks stored"
    );

    // The hot chunks are the first stored bytes, in plan order, back to back.
    let mut expect = 0;
    let mut seen = std::collections::HashSet::new();
    for slot in &hot {
        let e = relaid.table().get(*slot).unwrap();
        if seen.insert(e.stored_offset) {
            assert_eq!(e.stored_offset, expect, "slot {slot}");
            expect += u64::from(e.stored_len);
        }
    }
    assert_eq!(expect, s.hot_bytes);
    assert!(
        relaid
            .table()
            .entries()
            .iter()
            .all(|e| seen.contains(&e.stored_offset) || e.stored_offset >= expect),
        "cold chunks follow the hot prefix"
    );

    let rebound = plan.rebind(&s.root_digest);
    rebound
        .check_image(&plan_path, &relaid.root_digest())
        .unwrap();
    assert!(plan.check_image(&plan_path, &relaid.root_digest()).is_err());
    assert_eq!(rebound.slots(&plan_path, relaid.manifest()).unwrap(), hot);
}

#[test]
fn plans_naming_missing_files_or_chunks_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    fs::create_dir(&tree).unwrap();
    fs::write(tree.join("f"), vec![1u8; 5000]).unwrap();
    let img_path = tmp.path().join("a.img");
    let opts = PackOptions {
        chunk_size: 4096,
        ..PackOptions::default()
    };
    let packed = pack_dir(&tree, &img_path, &opts, &()).unwrap();
    let img = Image::open_path(&img_path, None).unwrap();
    let p = tmp.path().join("p.json");
    let mk = |entries| PrefetchPlan {
        version: PLAN_VERSION,
        image_digest: packed.root_digest.to_hex(),
        chunk_size: 4096,
        total_bytes: 0,
        entries,
    };
    let err = mk(vec![entry("nope", 0, 1)])
        .slots(&p, img.manifest())
        .unwrap_err();
    assert!(
        err.to_string().contains("nope") && err.to_string().contains("p.json"),
        "{err}"
    );
    let err = mk(vec![entry("f", 1, 2)])
        .slots(&p, img.manifest())
        .unwrap_err();
    assert!(err.to_string().contains("past its 2 chunks"), "{err}");
    let mut wrong = mk(vec![]);
    wrong.chunk_size = 65536;
    assert!(wrong.slots(&p, img.manifest()).is_err());
    assert!(
        relayout(
            &img,
            &[7],
            &tmp.path().join("x.img"),
            &RelayoutOptions::default()
        )
        .is_err()
    );
}

/// The default layout packs the hot chunks several to a frame, compressed together: the
/// tree still reads back byte for byte, every chunk verifies, and each hot chunk sits in the
/// first frames in plan order.
#[test]
fn hot_chunks_share_frames_in_plan_order_and_read_back_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    common::odd_tree(&tree, 4096);
    // Compressible files of many chunks, so frames of several chunks form.
    for i in 0..4 {
        let text: Vec<u8> = format!("line {i} of a text that repeats with small changes\n")
            .into_bytes()
            .repeat(3000);
        fs::write(tree.join(format!("t{i}")), text).unwrap();
    }
    let img_path = tmp.path().join("a.img");
    let opts = PackOptions {
        chunk_size: 4096,
        ..PackOptions::default()
    };
    pack_dir(&tree, &img_path, &opts, &()).unwrap();
    let img = Image::open_path(&img_path, None).unwrap();
    let files = img.files();
    let slots_of = |name: &str| {
        let f = files.iter().find(|f| f.path == name.as_bytes()).unwrap();
        f.first_chunk..f.first_chunk + f.chunks
    };
    // Interleave the chunks of two files, then a third whole.
    let hot: Vec<u64> = slots_of("t2")
        .zip(slots_of("t0"))
        .flat_map(|(a, b)| [a, b])
        .chain(slots_of("t3"))
        .collect();
    let out = tmp.path().join("b.img");
    let frame = RelayoutOptions {
        frame_bytes: 16 * 1024,
        level: 19,
    };
    let s = relayout(&img, &hot, &out, &frame).unwrap();
    assert!(s.hot_frames > 1 && s.hot_frames < s.hot_chunks, "{s:?}");
    let relaid = Image::open_path(&out, Some(&s.root_digest)).unwrap();
    common::assert_image_matches(&relaid, &tree);
    let report = relaid.verify(&|_| {});
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    // Plan order: by (frame's stored offset, offset in frame).
    let order: Vec<(u64, u32)> = hot
        .iter()
        .map(|s| {
            let e = relaid.table().get(*s).unwrap();
            (e.stored_offset, e.frame_offset)
        })
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
    assert!(order.iter().all(|(off, _)| *off < s.hot_bytes));
    // Relaying out the relaid image again (frames in, frames out) keeps every byte.
    let again = tmp.path().join("c.img");
    let s2 = relayout(&relaid, &hot[..10], &again, &RelayoutOptions::default()).unwrap();
    let twice = Image::open_path(&again, Some(&s2.root_digest)).unwrap();
    common::assert_image_matches(&twice, &tree);
    assert!(twice.verify(&|_| {}).failures.is_empty());
}

/// A frame whose stored bytes are damaged fails every chunk it holds, naming them; no chunk
/// of it is ever returned.
#[test]
fn a_damaged_frame_fails_all_its_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    fs::create_dir(&tree).unwrap();
    fs::write(tree.join("f"), b"some text to compress ".repeat(2000)).unwrap();
    let img_path = tmp.path().join("a.img");
    let opts = PackOptions {
        chunk_size: 4096,
        ..PackOptions::default()
    };
    pack_dir(&tree, &img_path, &opts, &()).unwrap();
    let img = Image::open_path(&img_path, None).unwrap();
    let hot: Vec<u64> = (0..img.table().len()).collect();
    let out = tmp.path().join("b.img");
    let s = relayout(&img, &hot, &out, &RelayoutOptions::default()).unwrap();
    assert_eq!(s.hot_frames, 1);
    let mut bytes = fs::read(&out).unwrap();
    let relaid = Image::open(bytes.clone(), None).unwrap();
    let at = relaid.header().data_offset as usize + s.hot_bytes as usize / 2;
    bytes[at] ^= 0x10;
    let bad = Image::open(bytes, None).unwrap();
    let report = bad.verify(&|_| {});
    assert_eq!(report.failures.len() as u64, bad.table().len());
    for slot in 0..bad.table().len() {
        assert!(
            bad.read_chunk(slot).is_err(),
            "slot {slot} read despite the damage"
        );
    }
}

/// The chunks no plan names keep the source image's frames: a small file packed into one
/// frame stays one frame (copied as stored, with its dictionary), and what is left of a frame
/// that lost chunks to the hot part shares one frame again.
#[test]
fn cold_chunks_keep_the_frames_pack_gave_them() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    fs::create_dir(&tree).unwrap();
    // Enough similar chunks for pack to train their dictionary (a group of at least 512).
    for i in 0..130u64 {
        let name = match i {
            0 => "a.py".to_string(),
            1 => "b.py".to_string(),
            2 => "c.py".to_string(),
            _ => format!("m{i}.py"),
        };
        fs::write(tree.join(name), common::source_text(i, 20_000)).unwrap();
    }
    let img_path = tmp.path().join("a.img");
    let opts = PackOptions {
        chunk_size: 4096,
        whole_frames: true,
        ..PackOptions::default()
    };
    pack_dir(&tree, &img_path, &opts, &()).unwrap();
    let img = Image::open_path(&img_path, None).unwrap();
    let frames_of = |img: &Image<_>, name: &str| -> Vec<u64> {
        let mut v: Vec<u64> = common::file_entries(img, name)
            .iter()
            .map(|e| e.stored_offset)
            .collect();
        v.dedup();
        v
    };
    for name in ["a.py", "b.py", "c.py"] {
        assert_eq!(frames_of(&img, name).len(), 1, "pack frames {name} whole");
    }
    let first = |name: &str| {
        img.files()
            .into_iter()
            .find(|f| f.path == name.as_bytes())
            .unwrap()
            .first_chunk
    };
    // a.py whole and b.py's first two chunks go hot; the other files stay cold.
    let hot: Vec<u64> = (first("a.py")..first("a.py") + 5)
        .chain([first("b.py"), first("b.py") + 1])
        .collect();
    let out = tmp.path().join("b.img");
    let s = relayout(&img, &hot, &out, &RelayoutOptions::default()).unwrap();
    let relaid = Image::open_path(&out, Some(&s.root_digest)).unwrap();
    common::assert_image_matches(&relaid, &tree);
    assert!(relaid.verify(&|_| {}).failures.is_empty());

    let (before, after) = (
        common::file_entries(&img, "c.py"),
        common::file_entries(&relaid, "c.py"),
    );
    assert_eq!(
        frames_of(&relaid, "c.py").len(),
        1,
        "c.py is still one frame"
    );
    assert!(after[0].stored_offset >= s.hot_bytes, "after the hot part");
    assert_eq!(
        (after[0].stored_len, after[0].frame_len, after[0].dictionary),
        (
            before[0].stored_len,
            before[0].frame_len,
            before[0].dictionary
        ),
        "copied as stored"
    );
    assert!(after[0].dictionary > 0, "with its dictionary");
    let b = common::file_entries(&relaid, "b.py");
    assert!(b[..2].iter().all(|e| e.stored_offset < s.hot_bytes));
    assert!(
        b[2..]
            .iter()
            .all(|e| e.stored_offset == b[2].stored_offset && e.stored_offset >= s.hot_bytes),
        "b.py's cold chunks share one frame: {b:?}"
    );
    assert_eq!(b[2].frame_len, 20_000 - 2 * 4096);
    assert_eq!(
        b[2].dictionary,
        common::file_entries(&img, "b.py")[2].dictionary,
        "compressed again with its dictionary"
    );
}
