//! The trace file: page-level accesses of one run of a program (see `docs/trace.md`).
//!
//! Written by the recorder (`incfs record-trace`), read by the planner and `incfs trace show`.

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
}
