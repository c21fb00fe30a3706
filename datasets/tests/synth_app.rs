//! The synthetic app as the benches and the recorder's coverage test run it: `incfs-synth
//! gen` writes the tree it says, and `access` reads it in every pattern with the same
//! checksum each time it is given the same seed. (Being an integration test of this package
//! also makes a workspace `cargo test` build the `incfs-synth` binary those tests run.)

use std::path::Path;
use std::process::Command;

fn synth() -> Command {
    Command::new(env!("CARGO_BIN_EXE_incfs-synth"))
}

fn files_under(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        if m.is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push((e.file_name().to_string_lossy().into_owned(), m.len()));
        }
    }
    out
}

#[test]
fn gen_writes_the_tree_and_access_reads_it_the_same_way_each_time() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    let out = synth()
        .arg("gen")
        .arg(&tree)
        .args(["--files", "12", "--size", "64K"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files = files_under(&tree);
    assert_eq!(files.len(), 12, "{files:?}");
    assert!(files.iter().all(|(_, len)| *len == 64 * 1024), "{files:?}");
    for pattern in ["seq", "scattered", "mmap", "multiproc"] {
        let run = || {
            let out = synth()
                .arg("access")
                .arg(&tree)
                .args(["--pattern", pattern, "--fraction", "0.5", "--seed", "3"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{pattern}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            out.stdout
        };
        let first = run();
        assert!(!first.is_empty(), "{pattern}: no checksum printed");
        assert_eq!(first, run(), "{pattern}: the same seed read differently");
    }
}
