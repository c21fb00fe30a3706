//! The trace file: round trip, schema and version checks, malformed files.

use std::path::Path;

use incfs_planner::summary::summarize;
use incfs_planner::trace::{
    EventKind, TraceError, TraceEvent, TraceMeta, read_trace, read_trace_meta, write_trace,
};
use polars::prelude::*;

fn meta() -> TraceMeta {
    TraceMeta {
        command: vec!["clang".into(), "-c".into(), "hello.c".into()],
        kernel: "6.18.0".into(),
        page_size: 4096,
        roots: vec!["/opt/tree".into()],
        start_unix_ns: 1_700_000_000_000_000_000,
        tool_version: "0.1.0".into(),
        lost_events: 3,
        recorded_via: incfs_planner::trace::RecordedVia::View,
        view_pages: 1234,
    }
}

fn ev(
    ts_ns: u64,
    kind: EventKind,
    path: Option<&str>,
    first_page: u64,
    page_count: u32,
) -> TraceEvent {
    TraceEvent {
        ts_ns,
        pid: 10,
        tid: 11,
        comm: "clang".into(),
        kind,
        dev: 2049,
        ino: 77,
        path: path.map(str::to_string),
        first_page,
        page_count,
    }
}

fn events() -> Vec<TraceEvent> {
    vec![
        ev(0, EventKind::Exec, Some("/opt/tree/bin/clang"), 0, 0),
        ev(100, EventKind::Fault, Some("/opt/tree/bin/clang"), 0, 1),
        ev(200, EventKind::MapPages, Some("/opt/tree/bin/clang"), 1, 15),
        ev(
            300,
            EventKind::Fault,
            Some("/opt/tree/lib/libLLVM.so"),
            10,
            1,
        ),
        ev(
            400,
            EventKind::GetPages,
            Some("/opt/tree/lib/libLLVM.so"),
            10,
            4,
        ),
        ev(500, EventKind::Fault, None, 3, 1),
    ]
}

#[test]
fn round_trip_keeps_events_and_meta() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.parquet");
    write_trace(&p, &meta(), &events()).unwrap();
    let (m, df) = read_trace(&p).unwrap();
    assert_eq!(m, meta());
    assert_eq!(df.height(), 6);
    let kinds: Vec<&str> = df
        .column("kind")
        .unwrap()
        .str()
        .unwrap()
        .into_no_null_iter()
        .collect();
    assert_eq!(
        kinds,
        ["exec", "fault", "map_pages", "fault", "get_pages", "fault"]
    );
    let paths: Vec<Option<&str>> = df
        .column("path")
        .unwrap()
        .str()
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(paths[5], None);
    assert_eq!(paths[3], Some("/opt/tree/lib/libLLVM.so"));
    let pc: Vec<u32> = df
        .column("page_count")
        .unwrap()
        .u32()
        .unwrap()
        .into_no_null_iter()
        .collect();
    assert_eq!(pc, [0, 1, 15, 1, 4, 1]);
    assert_eq!(read_trace_meta(&p).unwrap(), meta());
}

#[test]
fn empty_trace_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.parquet");
    write_trace(&p, &meta(), &[]).unwrap();
    let (_, df) = read_trace(&p).unwrap();
    assert_eq!(df.height(), 0);
}

#[test]
fn summary_counts_pages_and_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.parquet");
    write_trace(&p, &meta(), &events()).unwrap();
    let (m, df) = read_trace(&p).unwrap();
    let s = summarize(&m, &df).unwrap();
    assert_eq!(s.events, 6);
    assert_eq!(s.lost_events, 3);
    assert_eq!(s.kinds["fault"], 3);
    assert_eq!(s.files.len(), 3);
    let clang = &s.files[0];
    assert_eq!(clang.path, "/opt/tree/bin/clang");
    assert_eq!(
        (clang.pages, clang.mapped_pages, clang.first_ns),
        (1, 16, 0)
    );
    let llvm = &s.files[1];
    assert_eq!((llvm.pages, llvm.first_ns), (4, 300));
    assert_eq!(s.files[2].path, "<dev 2049 ino 77>");
    assert_eq!(s.timeline.iter().map(|b| b.events).sum::<u64>(), 6);
}

fn err_of(p: &Path) -> String {
    let e = read_trace(p).unwrap_err();
    let s = e.to_string();
    assert!(
        s.contains(&p.display().to_string()),
        "error does not name the file: {s}"
    );
    s
}

#[test]
fn empty_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("empty.parquet");
    std::fs::write(&p, b"").unwrap();
    assert!(matches!(read_trace(&p), Err(TraceError::Empty { .. })));
    assert!(err_of(&p).contains("empty"));
}

#[test]
fn truncated_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.parquet");
    write_trace(&p, &meta(), &events()).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    for cut in [3, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        assert!(
            matches!(read_trace(&p), Err(TraceError::NotParquet { .. })),
            "cut at {cut}"
        );
        assert!(err_of(&p).contains("truncated"));
    }
}

#[test]
fn garbage_footer_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.parquet");
    write_trace(&p, &meta(), &events()).unwrap();
    let mut bytes = std::fs::read(&p).unwrap();
    let n = bytes.len();
    // Scramble the footer (its thrift metadata) but keep the magics.
    for b in &mut bytes[n - 60..n - 8] {
        *b ^= 0x5a;
    }
    std::fs::write(&p, &bytes).unwrap();
    assert!(read_trace(&p).is_err());
    err_of(&p);
}

#[test]
fn other_parquet_is_a_schema_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("other.parquet");
    let mut df = df!("a" => [1u64, 2], "b" => ["x", "y"]).unwrap();
    ParquetWriter::new(std::fs::File::create(&p).unwrap())
        .finish(&mut df)
        .unwrap();
    assert!(matches!(read_trace(&p), Err(TraceError::Schema { .. })));
    assert!(err_of(&p).contains("incfs.trace.version"));
}

fn write_with(p: &Path, kv: Vec<(String, String)>, mut df: DataFrame) {
    ParquetWriter::new(std::fs::File::create(p).unwrap())
        .with_key_value_metadata(Some(KeyValueMetadata::from_static(kv)))
        .finish(&mut df)
        .unwrap();
}

#[test]
fn wrong_column_type_is_a_schema_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.parquet");
    let mut df = incfs_planner::trace::events_to_frame(&events()).unwrap();
    df.with_column(Column::new("ts_ns".into(), vec![1i64; 6]))
        .unwrap();
    write_with(&p, meta().to_key_values(), df);
    let s = err_of(&p);
    assert!(s.contains("ts_ns") && s.contains("expected u64"), "{s}");
}

#[test]
fn missing_column_is_a_schema_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.parquet");
    let df = incfs_planner::trace::events_to_frame(&events())
        .unwrap()
        .drop("first_page")
        .unwrap();
    write_with(&p, meta().to_key_values(), df);
    assert!(err_of(&p).contains("first_page"));
}

#[test]
fn future_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.parquet");
    let mut kv = meta().to_key_values();
    kv[0].1 = "2".into();
    write_with(
        &p,
        kv,
        incfs_planner::trace::events_to_frame(&events()).unwrap(),
    );
    assert!(err_of(&p).contains("version \"2\""));
}

#[test]
fn not_parquet_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.parquet");
    std::fs::write(&p, b"{\"ns\":1}\n").unwrap();
    assert!(matches!(read_trace(&p), Err(TraceError::NotParquet { .. })));
}

#[test]
fn missing_file_is_named() {
    let p = Path::new("/nonexistent/incfs/t.parquet");
    assert!(matches!(read_trace(p), Err(TraceError::Io { .. })));
    err_of(p);
}
