//! Hot-first relayout: the plan's chunks come first, in plan order; the tree reads back
//! identical; the plan is rebound to the new root digest.

mod common;

use std::fs;

use incfs_fs::format::{Image, PackOptions, pack_dir, relayout};
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
    let s = relayout(&img, &hot, &out).unwrap();
    assert_ne!(s.root_digest, packed.root_digest);
    assert_eq!(s.hot_chunks, 5, "the duplicate chunk is placed once");
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
    assert!(relayout(&img, &[7], &tmp.path().join("x.img")).is_err());
}
