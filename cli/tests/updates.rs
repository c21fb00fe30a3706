//! `incfs diff` and `incfs plan carry` as a user runs them.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

fn incfs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_incfs"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn bytes(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn pack(dir: &Path, img: &Path) {
    ok(incfs(&[
        "pack",
        dir.to_str().unwrap(),
        "-o",
        img.to_str().unwrap(),
    ]));
}

#[test]
fn diff_then_carry_a_plan() {
    let tmp = tempfile::tempdir().unwrap();
    let (t1, t2) = (tmp.path().join("t1"), tmp.path().join("t2"));
    let lib = bytes(10 * 4096, 1);
    let mut lib2 = lib.clone();
    lib2[4096..8192].copy_from_slice(&bytes(4096, 2));
    fs::create_dir_all(&t1).unwrap();
    fs::create_dir_all(&t2).unwrap();
    fs::write(t1.join("lib.so"), &lib).unwrap();
    fs::write(t2.join("lib.so"), &lib2).unwrap();
    fs::write(t2.join("new.so"), bytes(3 * 4096, 3)).unwrap();
    let (v1, v2) = (tmp.path().join("v1.img"), tmp.path().join("v2.img"));
    pack(&t1, &v1);
    pack(&t2, &v2);

    let text = ok(incfs(&["diff", v1.to_str().unwrap(), v2.to_str().unwrap()]));
    assert!(text.contains("1 changed, 1 added, 0 removed"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&ok(incfs(&[
        "diff",
        v1.to_str().unwrap(),
        v2.to_str().unwrap(),
        "--json",
    ])))
    .unwrap();
    assert_eq!(json["total"]["chunks"], 13);
    assert_eq!(json["total"]["shared_chunks"], 9);
    assert_eq!(json["files"].as_array().unwrap().len(), 2);

    let plan = tmp.path().join("v1.plan.json");
    let digest = json["old_digest"].as_str().unwrap();
    fs::write(
        &plan,
        serde_json::json!({
            "version": 1, "image_digest": digest, "chunk_size": 4096, "total_bytes": 0,
            "entries": [{"file": "lib.so", "first_chunk": 0, "chunk_count": 4,
                         "offset_ms": 0.0, "confidence": 1.0}]
        })
        .to_string(),
    )
    .unwrap();
    let out = tmp.path().join("v2.plan.json");
    let text = ok(incfs(&[
        "plan",
        "carry",
        plan.to_str().unwrap(),
        "--from",
        v1.to_str().unwrap(),
        "--image",
        v2.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]));
    assert!(
        text.contains("4 in, 3 kept, 0 moved, 1 changed, 0 dropped"),
        "{text}"
    );
    let carried: serde_json::Value = serde_json::from_slice(&fs::read(&out).unwrap()).unwrap();
    assert_eq!(carried["image_digest"], json["new_digest"]);
    // The wrong old image: refused, naming what to check.
    let bad = incfs(&[
        "plan",
        "carry",
        plan.to_str().unwrap(),
        "--from",
        v2.to_str().unwrap(),
        "--image",
        v2.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("the image the plan was made for"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
