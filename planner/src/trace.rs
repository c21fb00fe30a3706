//! The trace file: page-level accesses of one run of a program (see `docs/trace.md`).
//!
//! Written by the recorder (`incfs record-trace`), read by the planner and `incfs trace show`.
//!
//! On disk a trace is one Parquet file with the columns of [`COLUMNS`] (one row per
//! [`TraceEvent`]) and the [`TraceMeta`] as file-level key-value metadata, keys prefixed
//! `incfs.`, plus `incfs.trace.version` = [`TRACE_VERSION`]. [`write_trace`] writes one
//! through a temporary file renamed into place; [`read_trace`] reads one back and checks its
//! schema and version.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use polars::prelude::*;

/// What an event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// `filemap:mm_filemap_fault`: a page fault on a mapped file page.
    Fault,
    /// `filemap:mm_filemap_map_pages`: pages mapped by fault-around.
    MapPages,
    /// `filemap:mm_filemap_get_pages`: the read path asked for a range of pages.
    GetPages,
    /// `filemap:mm_filemap_add_to_page_cache`: pages that came from storage.
    AddToCache,
    /// A file was opened (file-level order; no page range).
    Open,
    /// A program was executed (file-level order; no page range).
    Exec,
}

impl EventKind {
    /// The name stored in the trace's `kind` column.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Fault => "fault",
            EventKind::MapPages => "map_pages",
            EventKind::GetPages => "get_pages",
            EventKind::AddToCache => "add_to_cache",
            EventKind::Open => "open",
            EventKind::Exec => "exec",
        }
    }

    /// The kind stored under `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            EventKind::Fault,
            EventKind::MapPages,
            EventKind::GetPages,
            EventKind::AddToCache,
            EventKind::Open,
            EventKind::Exec,
        ]
        .into_iter()
        .find(|k| k.name() == name)
    }
}

/// One event of a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEvent {
    /// Nanoseconds since the recording started.
    pub ts_ns: u64,
    /// Process (thread group) id.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// The thread's command name.
    pub comm: String,
    /// What happened.
    pub kind: EventKind,
    /// Device of the file, as userspace `st_dev` encodes it.
    pub dev: u64,
    /// Inode number of the file.
    pub ino: u64,
    /// Path of the file, when resolved under the recorded roots.
    pub path: Option<String>,
    /// First page index touched (0 for open/exec).
    pub first_page: u64,
    /// Number of pages touched (0 for open/exec).
    pub page_count: u32,
}

/// What a trace says about how it was recorded (Parquet key-value metadata).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TraceMeta {
    /// The command and its arguments.
    pub command: Vec<String>,
    /// `uname -r` of the recording machine.
    pub kernel: String,
    /// Page size in bytes.
    pub page_size: u32,
    /// Directories whose files were resolved to paths.
    pub roots: Vec<String>,
    /// Wall-clock start, nanoseconds since the Unix epoch.
    pub start_unix_ns: u64,
    /// Version of the incfs that recorded it.
    pub tool_version: String,
    /// Events the kernel side could not deliver (ring buffer full).
    pub lost_events: u64,
    /// How the pages reached the recorded program (`incfs.recorded_via`).
    pub recorded_via: RecordedVia,
    /// Distinct pages the readahead-0 view served the program (`incfs.view_pages`; 0 when
    /// not recorded through a view).
    pub view_pages: u64,
}

/// How a trace was recorded, which says how much of the demand set it can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordedVia {
    /// Unknown (a trace written before the key existed).
    #[default]
    Unknown,
    /// Through a readahead-0 view of the roots: every page the program needed reached the
    /// view as its own request, so `fault` and `get_pages` events give the demand set.
    View,
    /// On the file system directly: readahead and fault-around may have brought most of
    /// the pages in without an event the planner counts.
    Direct,
}

impl RecordedVia {
    /// The value stored in the metadata.
    pub fn name(self) -> &'static str {
        match self {
            RecordedVia::Unknown => "",
            RecordedVia::View => "view",
            RecordedVia::Direct => "direct",
        }
    }
}

/// Version of the trace file this build writes and reads (`incfs.trace.version`).
pub const TRACE_VERSION: &str = "1";

/// The key of the version in the Parquet key-value metadata.
pub const VERSION_KEY: &str = "incfs.trace.version";

/// The columns of a trace, in order, with their types (`path` is the only nullable one).
pub const COLUMNS: [(&str, ColumnType); 10] = [
    ("ts_ns", ColumnType::U64),
    ("pid", ColumnType::U32),
    ("tid", ColumnType::U32),
    ("comm", ColumnType::Str),
    ("kind", ColumnType::Str),
    ("dev", ColumnType::U64),
    ("ino", ColumnType::U64),
    ("path", ColumnType::Str),
    ("first_page", ColumnType::U64),
    ("page_count", ColumnType::U32),
];

/// The type of a trace column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// Unsigned 32-bit integer.
    U32,
    /// Unsigned 64-bit integer.
    U64,
    /// UTF-8 string.
    Str,
}

impl ColumnType {
    fn dtype(self) -> DataType {
        match self {
            ColumnType::U32 => DataType::UInt32,
            ColumnType::U64 => DataType::UInt64,
            ColumnType::Str => DataType::String,
        }
    }
}

/// Parquet files begin and end with these four bytes.
const PARQUET_MAGIC: &[u8; 4] = b"PAR1";

/// Errors reading or writing a trace; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be opened, read or written.
    #[error("{path}: {error}")]
    Io {
        /// The trace file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The file is empty.
    #[error("{path}: the file is empty, not a trace (was the recording interrupted?)")]
    Empty {
        /// The trace file.
        path: PathBuf,
    },
    /// The file is not (or no longer) a complete Parquet file.
    #[error("{path}: not a complete Parquet file ({reason}); it may be truncated")]
    NotParquet {
        /// The trace file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The file is Parquet, but not a trace of this version.
    #[error("{path}: not an incfs trace: {reason}")]
    Schema {
        /// The trace file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// polars failed while writing or reading the data.
    #[error("{path}: {error}")]
    Polars {
        /// The trace file.
        path: PathBuf,
        /// The polars error.
        error: PolarsError,
    },
}

/// Builds the polars `DataFrame` of a trace's events (columns of [`COLUMNS`]).
pub fn events_to_frame(events: &[TraceEvent]) -> PolarsResult<DataFrame> {
    let col_u64 = |name: &str, f: &dyn Fn(&TraceEvent) -> u64| {
        Column::new(name.into(), events.iter().map(f).collect::<Vec<u64>>())
    };
    let col_u32 = |name: &str, f: &dyn Fn(&TraceEvent) -> u32| {
        Column::new(name.into(), events.iter().map(f).collect::<Vec<u32>>())
    };
    let columns = vec![
        col_u64("ts_ns", &|e| e.ts_ns),
        col_u32("pid", &|e| e.pid),
        col_u32("tid", &|e| e.tid),
        Column::new(
            "comm".into(),
            events.iter().map(|e| e.comm.as_str()).collect::<Vec<_>>(),
        ),
        Column::new(
            "kind".into(),
            events.iter().map(|e| e.kind.name()).collect::<Vec<_>>(),
        ),
        col_u64("dev", &|e| e.dev),
        col_u64("ino", &|e| e.ino),
        Column::new(
            "path".into(),
            events
                .iter()
                .map(|e| e.path.as_deref())
                .collect::<Vec<Option<&str>>>(),
        ),
        col_u64("first_page", &|e| e.first_page),
        col_u32("page_count", &|e| e.page_count),
    ];
    DataFrame::new(events.len(), columns)
}

impl TraceMeta {
    /// The metadata as Parquet key-value pairs (keys prefixed `incfs.`, lists as JSON arrays).
    pub fn to_key_values(&self) -> Vec<(String, String)> {
        let json = |v: &[String]| serde_json::to_string(v).unwrap_or_else(|_| "[]".into());
        vec![
            (VERSION_KEY.into(), TRACE_VERSION.into()),
            ("incfs.command".into(), json(&self.command)),
            ("incfs.kernel".into(), self.kernel.clone()),
            ("incfs.page_size".into(), self.page_size.to_string()),
            ("incfs.roots".into(), json(&self.roots)),
            ("incfs.start_unix_ns".into(), self.start_unix_ns.to_string()),
            ("incfs.tool_version".into(), self.tool_version.clone()),
            ("incfs.lost_events".into(), self.lost_events.to_string()),
            ("incfs.recorded_via".into(), self.recorded_via.name().into()),
            ("incfs.view_pages".into(), self.view_pages.to_string()),
        ]
    }

    /// Parses the metadata from Parquet key-value pairs; checks the version. Missing keys
    /// other than the version take their default; a malformed value is an error.
    pub fn from_key_values<'a>(
        kv: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
    ) -> Result<Self, String> {
        let mut meta = TraceMeta::default();
        let mut version = None;
        for (key, value) in kv {
            let value = value.unwrap_or("");
            let num = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| format!("metadata {key} = {v:?} is not a number"))
            };
            let list = |v: &str| {
                serde_json::from_str::<Vec<String>>(v)
                    .map_err(|_| format!("metadata {key} = {v:?} is not a JSON list of strings"))
            };
            match key {
                VERSION_KEY => version = Some(value.to_string()),
                "incfs.command" => meta.command = list(value)?,
                "incfs.kernel" => meta.kernel = value.to_string(),
                "incfs.page_size" => {
                    meta.page_size = u32::try_from(num(value)?)
                        .map_err(|_| format!("metadata {key} = {value:?} is too large"))?
                }
                "incfs.roots" => meta.roots = list(value)?,
                "incfs.start_unix_ns" => meta.start_unix_ns = num(value)?,
                "incfs.tool_version" => meta.tool_version = value.to_string(),
                "incfs.lost_events" => meta.lost_events = num(value)?,
                "incfs.recorded_via" => {
                    meta.recorded_via = match value {
                        "view" => RecordedVia::View,
                        "direct" => RecordedVia::Direct,
                        // Unknown values (a newer recorder): claim nothing.
                        _ => RecordedVia::Unknown,
                    }
                }
                "incfs.view_pages" => meta.view_pages = num(value)?,
                _ => {}
            }
        }
        match version.as_deref() {
            Some(TRACE_VERSION) => {}
            Some(v) => {
                return Err(format!(
                    "trace version {v:?}, this incfs reads version {TRACE_VERSION:?}"
                ));
            }
            None => return Err(format!("no {VERSION_KEY} in the Parquet metadata")),
        }
        if meta.page_size == 0 || !meta.page_size.is_power_of_two() {
            return Err(format!(
                "page size {} is not a power of two",
                meta.page_size
            ));
        }
        Ok(meta)
    }
}

/// Writes a trace: Parquet (zstd) with `meta` as key-value metadata, through a temporary file
/// in the same directory renamed into place.
pub fn write_trace(path: &Path, meta: &TraceMeta, events: &[TraceEvent]) -> Result<(), TraceError> {
    let io = |error| TraceError::Io {
        path: path.to_path_buf(),
        error,
    };
    let polars = |error| TraceError::Polars {
        path: path.to_path_buf(),
        error,
    };
    let mut df = events_to_frame(events).map_err(polars)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    ParquetWriter::new(tmp.as_file_mut())
        .with_key_value_metadata(Some(KeyValueMetadata::from_static(meta.to_key_values())))
        .finish(&mut df)
        .map_err(polars)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Reads a whole trace and checks its schema and version.
pub fn read_trace(path: &Path) -> Result<(TraceMeta, DataFrame), TraceError> {
    read_trace_columns(path, None)
}

/// Reads a trace's metadata and the named columns (all when `None`), checking the schema of
/// the whole file and its version.
pub fn read_trace_columns(
    path: &Path,
    columns: Option<&[&str]>,
) -> Result<(TraceMeta, DataFrame), TraceError> {
    guard_panics(path, || {
        let (meta, mut reader) = open_trace(path)?;
        if let Some(cols) = columns {
            reader = reader.with_columns(Some(cols.iter().map(|c| c.to_string()).collect()));
        }
        let df = reader.finish().map_err(|e| not_parquet(path, e))?;
        Ok((meta, df))
    })
}

/// Reads only a trace's metadata (checking its schema and version).
pub fn read_trace_meta(path: &Path) -> Result<TraceMeta, TraceError> {
    guard_panics(path, || open_trace(path).map(|(meta, _)| meta))
}

/// Runs `read` on the trace at `path`, turning a panic into an error naming the file: the
/// Parquet reader panics on some malformed files (e.g. a column chunk whose metadata lacks
/// its byte range, found by `fuzz/` target `trace`) instead of returning an error.
fn guard_panics<T>(
    path: &Path,
    read: impl FnOnce() -> Result<T, TraceError>,
) -> Result<T, TraceError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown failure".into());
        Err(TraceError::NotParquet {
            path: path.to_path_buf(),
            reason: format!("the Parquet reader failed on it: {what}"),
        })
    })
}

fn not_parquet(path: &Path, e: PolarsError) -> TraceError {
    TraceError::NotParquet {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Opens a trace, reads its footer and checks magic, schema and version.
fn open_trace(path: &Path) -> Result<(TraceMeta, ParquetReader<File>), TraceError> {
    let io = |error| TraceError::Io {
        path: path.to_path_buf(),
        error,
    };
    let mut file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len == 0 {
        return Err(TraceError::Empty {
            path: path.to_path_buf(),
        });
    }
    let mut head = [0u8; 4];
    let n = file.read(&mut head).map_err(io)?;
    if n < 4 || &head != PARQUET_MAGIC {
        return Err(TraceError::NotParquet {
            path: path.to_path_buf(),
            reason: "it does not start with the Parquet magic PAR1".into(),
        });
    }
    let mut tail = [0u8; 4];
    if len < 12 || {
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut tail, len - 4).map_err(io)?;
        &tail != PARQUET_MAGIC
    } {
        return Err(TraceError::NotParquet {
            path: path.to_path_buf(),
            reason: format!("{len} bytes, and it does not end with the Parquet footer magic PAR1"),
        });
    }
    let mut reader = ParquetReader::new(file);
    let schema = reader.schema().map_err(|e| not_parquet(path, e))?;
    let metadata = reader.get_metadata().map_err(|e| not_parquet(path, e))?;
    let schema_err = |reason: String| TraceError::Schema {
        path: path.to_path_buf(),
        reason,
    };
    let kv = metadata.key_value_metadata().as_deref().unwrap_or(&[]);
    let meta = TraceMeta::from_key_values(kv.iter().map(|k| (k.key.as_str(), k.value.as_deref())))
        .map_err(&schema_err)?;
    for (name, ty) in COLUMNS {
        let Some(field) = schema.get(name) else {
            return Err(schema_err(format!("no column {name:?}")));
        };
        let got = DataType::from_arrow_field(field);
        if got != ty.dtype() {
            return Err(schema_err(format!(
                "column {name:?} has type {got}, expected {}",
                ty.dtype()
            )));
        }
    }
    Ok((meta, reader))
}
