//! `incfs pack`, `inspect` and `verify` as a user runs them.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

fn incfs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_incfs"))
        .args(args)
        .output()
        .unwrap()
}

fn tree(dir: &Path) {
    fs::create_dir_all(dir.join("sub")).unwrap();
    fs::write(dir.join("a.txt"), b"hello world\n".repeat(1000)).unwrap();
    fs::write(
        dir.join("sub/b.bin"),
        (0..20000u32).map(|i| (i * 7) as u8).collect::<Vec<_>>(),
    )
    .unwrap();
    std::os::unix::fs::symlink("a.txt", dir.join("link")).unwrap();
}

#[test]
fn pack_inspect_verify_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    tree(&src);
    let img = tmp.path().join("x.img");
    let out = incfs(&[
        "pack",
        src.to_str().unwrap(),
        "-o",
        img.to_str().unwrap(),
        "--chunk-size",
        "4K",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pack: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let digest = pack["root_digest"].as_str().unwrap().to_string();
    assert_eq!(digest.len(), 64);
    assert_eq!(pack["files"], 2);
    assert_eq!(pack["symlinks"], 1);

    let out = incfs(&["inspect", img.to_str().unwrap(), "--json"]);
    assert!(out.status.success());
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["root_digest"], digest.as_str());
    assert_eq!(j["chunk_size"], 4096);
    assert_eq!(j["raw_bytes"], 12000 + 20000);
    let paths: Vec<&str> = j["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["a.txt", "link", "sub", "sub/b.bin"]);

    let out = incfs(&["verify", img.to_str().unwrap(), "--expect-digest", &digest]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok "));

    let wrong = "00".repeat(32);
    let out = incfs(&["verify", img.to_str().unwrap(), "--expect-digest", &wrong]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("root digest mismatch"));
}

#[test]
fn verify_names_the_file_and_chunk_of_a_flipped_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    tree(&src);
    let img = tmp.path().join("x.img");
    assert!(
        incfs(&[
            "pack",
            src.to_str().unwrap(),
            "-o",
            img.to_str().unwrap(),
            "--chunk-size",
            "4K"
        ])
        .status
        .success()
    );
    let mut bytes = fs::read(&img).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0x40; // the last chunk stored: sub/b.bin's last chunk
    fs::write(&img, &bytes).unwrap();
    let out = incfs(&["verify", img.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sub/b.bin chunk 4"), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("FAILED"));
}

#[test]
fn bad_images_give_a_clear_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let junk = tmp.path().join("junk.img");
    fs::write(&junk, b"this is not an image at all, not even close......................................................................................").unwrap();
    for cmd in ["inspect", "verify"] {
        let out = incfs(&[cmd, junk.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("junk.img") && err.contains("not an incfs image"),
            "{err}"
        );
    }
    let out = incfs(&["inspect", tmp.path().join("missing.img").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.img"));
    let out = incfs(&[
        "pack",
        tmp.path().to_str().unwrap(),
        "-o",
        "/tmp/x.img",
        "--chunk-size",
        "3K",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("power of two"));
}
