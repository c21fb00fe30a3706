//! Replays the committed fuzz corpus (`fuzz/corpus/TARGET/`) and the inputs of fixed fuzz
//! findings (`fuzz/regressions/TARGET/`) through the same code the cargo-fuzz targets run
//! (`fuzz/harness.rs`, `fuzz/trace_harness.rs`), on the stable toolchain: every input must be handled without a
//! panic, and the properties the harness asserts must hold.

use std::fs;
use std::path::{Path, PathBuf};

use crate::{harness, trace_harness};

/// The files of `fuzz/DIR/TARGET`, sorted; none when the directory does not exist.
fn inputs(dir: &str, target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .join(dir)
        .join(target);
    let Ok(rd) = fs::read_dir(&root) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = rd
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

fn replay(target: &str, run: fn(&[u8])) {
    let corpus = inputs("corpus", target);
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target} is empty or missing"
    );
    for path in corpus.iter().chain(&inputs("regressions", target)) {
        // Printed so that a failure names its input (the harness panics with the property).
        eprintln!("{target}: {}", path.display());
        run(&fs::read(path).unwrap());
    }
}

#[test]
fn image_corpus() {
    replay("image", harness::image);
}

#[test]
fn chunk_corpus() {
    replay("chunk", harness::chunk);
}

#[test]
fn plan_corpus() {
    replay("plan", harness::plan);
}

#[test]
fn trace_corpus() {
    replay("trace", trace_harness::trace);
}

#[test]
fn trace_findings_are_errors_naming_the_file() {
    for path in inputs("regressions", "trace") {
        let err = incfs_planner::trace::read_trace(&path)
            .expect_err("a malformed trace was accepted")
            .to_string();
        assert!(
            err.contains(&path.display().to_string()),
            "{}: {err}",
            path.display()
        );
    }
}
