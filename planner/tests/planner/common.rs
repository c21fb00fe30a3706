//! Helpers shared by the planner tests: a small packed image and synthetic traces.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use incfs_fs::format::{PackOptions, pack_dir};
use incfs_planner::trace::{EventKind, TraceEvent, TraceMeta, write_trace};

/// Chunk size of the test image.
pub const CS: u64 = 64 * 1024;
/// Pages per chunk at 4 KiB pages.
pub const PPC: u64 = CS / 4096;

pub use incfs_datasets::synth::noise;

/// A packed test image and the temp dir holding it.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
}

/// Files: `bin/app` 4 chunks, `lib/liba.so` 16 chunks, `lib/libb.so` 8 chunks,
/// `lib/dup.so` = a copy of liba (deduplicated), `lib/link.so` a hard link to libb.
pub fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::create_dir_all(tree.join("lib")).unwrap();
    std::fs::write(tree.join("bin/app"), noise(4 * CS as usize, 1)).unwrap();
    let a = noise(16 * CS as usize, 2);
    std::fs::write(tree.join("lib/liba.so"), &a).unwrap();
    std::fs::write(tree.join("lib/dup.so"), &a).unwrap();
    std::fs::write(tree.join("lib/libb.so"), noise(8 * CS as usize, 3)).unwrap();
    std::fs::hard_link(tree.join("lib/libb.so"), tree.join("lib/link.so")).unwrap();
    let image = dir.path().join("img.incfs");
    let opts = PackOptions {
        chunk_size: CS as u32,
        level: 1,
        ..PackOptions::default()
    };
    pack_dir(&tree, &image, &opts, &()).unwrap();
    Fixture { dir, image }
}

/// A trace recorded under `/rec/root`.
pub fn meta() -> TraceMeta {
    TraceMeta {
        command: vec!["app".into()],
        kernel: "6.18".into(),
        page_size: 4096,
        roots: vec!["/rec/root".into()],
        start_unix_ns: 0,
        tool_version: "test".into(),
        lost_events: 0,
        ..TraceMeta::default()
    }
}

/// A fault on page `page` of `path` at `ms` milliseconds.
pub fn fault(ms: f64, path: &str, page: u64) -> TraceEvent {
    touch(ms, EventKind::Fault, path, page, 1)
}

/// An event of `kind` on `count` pages from `page`.
pub fn touch(ms: f64, kind: EventKind, path: &str, page: u64, count: u32) -> TraceEvent {
    TraceEvent {
        ts_ns: (ms * 1e6) as u64,
        pid: 1,
        tid: 1,
        comm: "app".into(),
        kind,
        dev: 1,
        ino: 1,
        path: Some(path.to_string()),
        first_page: page,
        page_count: count,
    }
}

/// Writes a trace into `dir` as `name`.
pub fn write(dir: &Path, name: &str, meta: &TraceMeta, events: &[TraceEvent]) -> PathBuf {
    let p = dir.join(name);
    write_trace(&p, meta, events).unwrap();
    p
}
