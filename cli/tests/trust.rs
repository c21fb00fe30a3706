//! `incfs keygen`, `sign`, and `--trust`: a signed image mounts, over a path or HTTP; a
//! signature by another key, a tampered signature, a missing one, or an image swapped under
//! its signature are refused before anything is served.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use incfs_datasets::require::{Need, require};
use incfs_fs::serve::{ServeConfig, Server};

fn incfs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_incfs"))
        // The per-user cache of `run` without `--cache`, kept out of the machine's.
        .env(
            "INCFS_CACHE",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("incfs-cache"),
        )
        .args(args)
        .output()
        .unwrap()
}

fn pack(dir: &Path, name: &str, content: &str) -> String {
    let tree = dir.join(format!("{name}-tree"));
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("file"), content).unwrap();
    let img = dir.join(format!("{name}.img"));
    let out = incfs(&["pack", tree.to_str().unwrap(), "-o", img.to_str().unwrap()]);
    assert!(out.status.success());
    img.to_string_lossy().into_owned()
}

#[test]
fn only_images_signed_by_the_trusted_key_are_used() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let key = d.join("key");
    let other = d.join("other");
    assert!(incfs(&["keygen", key.to_str().unwrap()]).status.success());
    assert!(incfs(&["keygen", other.to_str().unwrap()]).status.success());
    let pubkey = format!("{}.pub", key.display());
    let other_pub = format!("{}.pub", other.display());
    let img = pack(d, "app", "signed content");
    let out = incfs(&["sign", &img, "--key", key.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Refusals need no mount: they happen before one.
    let out = incfs(&["run", "--image", &img, "--trust", &other_pub, "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not verify"));

    let unsigned = pack(d, "unsigned", "x");
    let out = incfs(&[
        "run", "--image", &unsigned, "--trust", &pubkey, "--", "true",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsigned.img.sig"));

    let sig = format!("{img}.sig");
    let good = fs::read_to_string(&sig).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    v["root_digest"] = serde_json::Value::String("ab".repeat(32));
    fs::write(&sig, v.to_string()).unwrap();
    let out = incfs(&["run", "--image", &img, "--trust", &pubkey, "--", "true"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a tampered signature must be refused"
    );
    fs::write(&sig, &good).unwrap();

    // Another image put in place of the signed one.
    let original = d.join("original.img");
    fs::copy(&img, &original).unwrap();
    let swapped = pack(d, "swapped", "evil content");
    fs::copy(&swapped, &img).unwrap();
    let out = incfs(&["run", "--image", &img, "--trust", &pubkey, "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("root digest mismatch"));
    fs::copy(&original, &img).unwrap();

    if !require(
        "only_images_signed_by_the_trusted_key_are_used (mounting)",
        &[Need::Root, Need::Fuse],
    ) {
        return;
    }
    let server = Server::start(ServeConfig::new(d)).unwrap();
    for source in [img, server.url("app.img")] {
        let out = incfs(&[
            "run",
            "--image",
            &source,
            "--trust",
            &pubkey,
            "--",
            "cat",
            "{mnt}/file",
        ]);
        assert!(
            out.status.success(),
            "{source}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, b"signed content");
    }
}
