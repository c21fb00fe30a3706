//! The userspace side of the incfs recorder: page-level startup traces of a process tree.
//!
//! [`record`] runs one command under the eBPF probe (`ebpf/probe`) and returns what it
//! touched as [`TraceEvent`]s:
//!
//! 1. **Prepare.** Check privileges, mount tracefs if needed, read the tracepoint record
//!    layouts from the format files into the probe's config, and with `cold` evict the
//!    roots' files from the page cache.
//!    With `view`, prepare a readahead-0 FUSE view of each root (`view` module).
//! 2. **Attach, then spawn.** Load and attach the probe, start the drain thread, put the
//!    recorder's own tgid in the tracked set, spawn the command (the kernel's fork event
//!    adds the child before it runs a single instruction), and untrack the recorder again.
//!    From then on the probe follows forks and exits in the kernel. With `view`, the child
//!    enters a private mount namespace and mounts the views over the roots before `exec`,
//!    and the recorder serves them.
//! 3. **Wait.** Until the command exits, `duration` runs out or a signal (Ctrl-C) arrives;
//!    in the last two cases the command is asked to stop and, after a grace period, killed.
//! 4. **Collect.** Drain the rest of the ring buffer, read the lost-event counter, detach,
//!    turn kernel device numbers into userspace ones, map events on a view's inodes to the
//!    real files, resolve (dev, ino) to paths under the roots and sort by time.
//!
//! [`Recording::write`] stores the result as a Parquet trace (`docs/trace.md`).

mod child;
mod drain;
mod files;
mod probe;
mod tracefs;
mod view;

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use incfs_common::{COMM_LEN, Counter, Kind, NamedEvent};
use incfs_planner::trace::{EventKind, RecordedVia, TraceEvent, TraceMeta};

pub use child::StopReason;
pub use files::Evicted;
pub use view::ViewError;

/// Default ring buffer size: 64 MiB holds one million page events, more than a cold start
/// of clang (about 30,000 events) produces between two wake-ups of the drain thread.
pub const DEFAULT_RING_BUFFER_BYTES: u32 = 64 << 20;

/// Held while the recorder's own tgid is tracked (see [`record`]).
static SPAWN_WINDOW: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// What to record and how.
#[derive(Debug, Clone)]
pub struct RecordOptions {
    /// The command and its arguments (at least the program).
    pub command: Vec<OsString>,
    /// Directories whose files are resolved to paths (and evicted with `cold`); empty means
    /// every file (`/`).
    pub roots: Vec<PathBuf>,
    /// Evict the roots' files from the page cache before starting (needs explicit roots).
    pub cold: bool,
    /// Stop recording (and the command) after this long.
    pub duration: Option<Duration>,
    /// Ring buffer size in bytes: a power of two, at least one page.
    pub ring_buffer_bytes: u32,
    /// Record `openat` calls (file-level order).
    pub trace_opens: bool,
    /// Run the command in a private mount namespace where each root is covered by a
    /// readahead-0 FUSE view of itself (`view` module), so the trace holds the demand set.
    /// Needs roots and `/dev/fuse`.
    pub view: bool,
}

impl RecordOptions {
    /// Options for recording `command` with the defaults: all files, warm, no time limit.
    pub fn new(command: Vec<OsString>) -> Self {
        RecordOptions {
            command,
            roots: Vec::new(),
            cold: false,
            duration: None,
            ring_buffer_bytes: DEFAULT_RING_BUFFER_BYTES,
            trace_opens: true,
            view: false,
        }
    }
}

/// Counts that say how complete a recording is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordStats {
    /// Events the probe could not deliver (ring buffer full). Also in the trace metadata.
    pub lost_events: u64,
    /// Forks the probe could not follow (tracked-process map full).
    pub untracked_forks: u64,
    /// Open/exec events dropped because their name did not lead to a regular file.
    pub dropped_names: u64,
    /// Distinct files (dev, ino) in the trace.
    pub files: usize,
    /// Of those, files resolved to a path under the roots.
    pub resolved_files: usize,
    /// What `cold` evicted.
    pub evicted: Option<Evicted>,
    /// Wall time from spawning the command to its exit.
    pub elapsed: Duration,
    /// What the readahead-0 views served, when the recording went through them.
    pub view: Option<ViewStats>,
}

/// What the readahead-0 views served during a recording: the demand set as the file system
/// saw it, against which the trace's touched pages are checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViewStats {
    /// Distinct pages the views read from the roots for the command.
    pub served_pages: u64,
    /// Distinct pages of files served by the views that the trace counts as touched
    /// (`fault`, `get_pages`), clipped to the file sizes.
    pub touched_pages: u64,
    /// Read requests the views answered.
    pub reads: u64,
    /// Reads that failed on the underlying files (the command saw EIO).
    pub failed_reads: u64,
    /// Views that stopped serving with an error (root and why).
    pub errors: Vec<String>,
}

/// The result of [`record`].
#[derive(Debug)]
pub struct Recording {
    /// The trace metadata.
    pub meta: TraceMeta,
    /// The events, by time.
    pub events: Vec<TraceEvent>,
    /// How the command ended.
    pub status: ExitStatus,
    /// Why the recording stopped.
    pub stop: StopReason,
    /// Completeness counts.
    pub stats: RecordStats,
}

impl Recording {
    /// Writes the trace to `path` (Parquet, `docs/trace.md`).
    pub fn write(&self, path: &Path) -> Result<(), RecordError> {
        incfs_planner::trace::write_trace(path, &self.meta, &self.events).map_err(|source| {
            RecordError::Write {
                source: Box::new(source),
            }
        })
    }

    /// The exit code to pass on: the command's, or 128 + signal when it was killed.
    pub fn exit_code(&self) -> u8 {
        exit_code(&self.status)
    }
}

/// `status` as a shell reports it: the exit code, or 128 + the signal number.
pub fn exit_code(status: &ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => (code & 0xff) as u8,
        (None, Some(sig)) => (128 + sig).clamp(0, 255) as u8,
        (None, None) => 1,
    }
}

/// What can go wrong while recording.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// No command was given.
    #[error("no command to record")]
    EmptyCommand,
    /// The view covers roots; without one there is nothing to cover.
    #[error(
        "the readahead-0 view covers the --root directories: give at least one --root \
         (or record without the view, where readahead hides most of the demand set)"
    )]
    ViewWithoutRoots,
    /// A view could not be prepared.
    #[error(transparent)]
    View(#[from] ViewError),
    /// The command could not be started inside the views' mount namespace.
    #[error(
        "cannot start {command} in a private mount namespace with the readahead-0 views \
         (it needs root or CAP_SYS_ADMIN, and a kernel that lets it mount FUSE)"
    )]
    ViewSpawn {
        /// The program name as given.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `cold` without roots would evict every file on the machine.
    #[error("--cold evicts the files under the --root directories: give at least one --root")]
    ColdWithoutRoots,
    /// The ring buffer size is not a power of two multiple of the page size.
    #[error("ring buffer size {0} is not a power of two of at least one page")]
    RingBufferSize(u32),
    /// A root directory is missing or unreadable.
    #[error("root {path}: cannot use it as a root")]
    Root {
        /// The root as given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not root and without the capabilities eBPF tracing needs.
    #[error(
        "recording needs root (or the CAP_BPF, CAP_PERFMON and CAP_DAC_READ_SEARCH \
         capabilities): run it with sudo"
    )]
    NotPrivileged,
    /// tracefs is neither mounted nor mountable.
    #[error(
        "cannot use tracefs at {path} (mount it with `mount -t tracefs nodev {path}`, as root)"
    )]
    Tracefs {
        /// Where it was expected.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A tracepoint format file does not have the layout the probe reads.
    #[error("tracepoint format {path} {what}: this kernel's layout is not supported")]
    Format {
        /// The format file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The kernel refused the probe.
    #[error(
        "the kernel refused to load the eBPF probe (it needs root, a kernel with BPF enabled \
         (CONFIG_BPF_SYSCALL, ring buffers: Linux 5.8+) and no seccomp or LSM policy \
         blocking bpf(2))"
    )]
    Load {
        /// aya's error.
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// A program could not be attached to its tracepoint.
    #[error("cannot attach the probe to tracepoint {tracepoint}")]
    Attach {
        /// `category:name`.
        tracepoint: String,
        /// aya's error.
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// A map of the probe could not be used.
    #[error("eBPF map {map}")]
    Map {
        /// The map's name.
        map: &'static str,
        /// aya's error.
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// The command does not exist.
    #[error("{command}: command not found")]
    CommandNotFound {
        /// The program name as given.
        command: String,
    },
    /// The command could not be started.
    #[error("cannot run {command}")]
    Spawn {
        /// The program name as given.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An I/O error on a named file.
    #[error("{path}: {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An I/O error of the recorder itself (threads, pipes, waiting).
    #[error("{what}")]
    Internal {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Writing the trace failed.
    #[error("cannot write the trace")]
    Write {
        /// The planner's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Runs `opts.command` under the probe and returns what its process tree touched.
pub fn record(opts: &RecordOptions) -> Result<Recording, RecordError> {
    let Some(program) = opts.command.first() else {
        return Err(RecordError::EmptyCommand);
    };
    if opts.cold && opts.roots.is_empty() {
        return Err(RecordError::ColdWithoutRoots);
    }
    let page_size = page_size();
    let ring = opts.ring_buffer_bytes;
    if !ring.is_power_of_two() || ring < page_size {
        return Err(RecordError::RingBufferSize(ring));
    }
    let roots = canonical_roots(&opts.roots)?;
    if opts.view && roots.is_empty() {
        return Err(RecordError::ViewWithoutRoots);
    }
    check_privileges()?;
    let tracefs = tracefs::ensure_mounted()?;
    // Wake the drain thread early when an eighth of the ring is used; otherwise it reads
    // on its timed poll.
    let config = tracefs::probe_config(&tracefs, opts.trace_opens, ring / 8)?;

    let evicted = opts.cold.then(|| {
        let done = files::evict(&roots);
        tracing::info!(
            files = done.files,
            bytes = done.bytes,
            failed = done.failed,
            "evicted the roots from the page cache"
        );
        done
    });

    let mut views = if opts.view {
        let shared = Arc::new(roots.clone());
        outermost(&roots)
            .iter()
            .map(|r| view::View::new(r, Arc::clone(&shared)))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };

    let mut probe = probe::Probe::load(&config, ring)?;
    let own_pid = std::process::id();
    let ring_buf = probe.events.take().ok_or(RecordError::Internal {
        what: "the probe's ring buffer was already taken",
        source: std::io::Error::other("no ring buffer"),
    })?;
    let drainer =
        drain::Drainer::start(ring_buf, probe.logger.take(), own_pid).map_err(|source| {
            RecordError::Internal {
                what: "cannot start the drain thread",
                source,
            }
        })?;
    let signals = child::SignalGuard::install().map_err(|source| RecordError::Internal {
        what: "cannot install signal handlers",
        source,
    })?;

    let start_mono = monotonic_ns();
    let start_unix_ns = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let started = Instant::now();
    let spawned = {
        // While the recorder's tgid is tracked, every fork it makes is followed: only one
        // recording of this process may be in that window at a time.
        let _window = SPAWN_WINDOW
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut cmd = std::process::Command::new(program);
        cmd.args(&opts.command[1..]);
        if !views.is_empty() {
            for v in &mut views {
                v.serve()?;
            }
            let plan = view::EnterPlan::new(&views);
            // SAFETY: `enter` makes only async-signal-safe calls (unshare, mount, write,
            // chdir, getpid) on data prepared before the fork.
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(move || view::enter(&plan));
            }
        }
        probe.track(own_pid)?;
        let spawned = cmd.spawn();
        probe.untrack(own_pid);
        for v in &mut views {
            v.spawned();
        }
        spawned
    };
    let mut child = match spawned {
        Ok(child) => child,
        Err(source) => {
            drop(drainer);
            for v in views {
                v.finish();
            }
            let command = program.to_string_lossy().into_owned();
            return Err(if source.kind() == std::io::ErrorKind::NotFound {
                RecordError::CommandNotFound { command }
            } else if opts.view && source.raw_os_error().is_some_and(is_setup_errno) {
                RecordError::ViewSpawn { command, source }
            } else {
                RecordError::Spawn { command, source }
            });
        }
    };
    let deadline = opts.duration.map(|d| started + d);
    let waited = child::wait(&mut child, &signals, deadline);
    let elapsed = started.elapsed();
    let mut drained = drainer.finish();
    drop(signals);
    let (status, stop) = waited.map_err(|source| RecordError::Internal {
        what: "waiting for the command failed",
        source,
    })?;
    let lost_events = probe.counter(Counter::Lost)?;
    let untracked_forks = probe.counter(Counter::TrackFailed)?;
    drained.pages.extend(
        probe
            .pending_events()?
            .into_iter()
            .filter(|e| e.pid != own_pid),
    );
    probe.log_run_stats();
    drop(probe);
    tracing::info!(
        records = drained.records,
        busy_ms = drained.busy.as_secs_f64() * 1e3,
        mrecords_per_s = drained.records as f64 / drained.busy.as_secs_f64().max(1e-9) / 1e6,
        "drain thread"
    );
    if drained.malformed > 0 {
        tracing::warn!(
            records = drained.malformed,
            "ring buffer records of unknown size"
        );
    }

    let reports: Vec<view::ViewReport> = views.into_iter().map(view::View::finish).collect();
    let (events, mut stats) = collect(&drained, &roots, start_mono, &reports);
    stats.lost_events = lost_events;
    stats.untracked_forks = untracked_forks;
    stats.evicted = evicted;
    stats.elapsed = elapsed;
    let meta = TraceMeta {
        command: opts
            .command
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect(),
        kernel: kernel_release(),
        page_size,
        roots: if opts.roots.is_empty() {
            vec!["/".to_owned()]
        } else {
            roots
                .iter()
                .map(|r| r.to_string_lossy().into_owned())
                .collect()
        },
        start_unix_ns,
        tool_version: env!("CARGO_PKG_VERSION").to_owned(),
        lost_events,
        recorded_via: if opts.view {
            RecordedVia::View
        } else {
            RecordedVia::Direct
        },
        view_pages: stats.view.as_ref().map_or(0, |v| v.served_pages),
    };
    Ok(Recording {
        meta,
        events,
        status,
        stop,
        stats,
    })
}

/// Turns drained records into trace events (userspace dev_t, resolved paths, by time).
fn collect(
    drained: &drain::Drained,
    roots: &[PathBuf],
    start_mono: u64,
    views: &[view::ViewReport],
) -> (Vec<TraceEvent>, RecordStats) {
    let mut stats = RecordStats::default();
    // Events on a view's inodes name the view's device and node id: map them to the file
    // the view served (its real dev and ino) and the path the program used.
    let by_dev: HashMap<u64, &view::ViewReport> =
        views.iter().filter_map(|v| v.dev.map(|d| (d, v))).collect();
    let real_id = |kernel_dev: u32, ino: u64| -> (files::FileId, Option<&String>) {
        let dev = user_dev(kernel_dev);
        match by_dev.get(&dev).and_then(|v| v.files.get(&ino)) {
            Some((id, path)) => (*id, Some(path)),
            None => ((dev, ino), None),
        }
    };
    // Named events: resolve each distinct (name, cwd) once.
    let mut names: HashMap<PathBuf, Option<files::KnownName>> = HashMap::new();
    let mut named_ids: Vec<Option<files::FileId>> = Vec::with_capacity(drained.named.len());
    for e in &drained.named {
        let path = absolute_name(e, &drained.cwds);
        let id = path.and_then(|p| {
            names
                .entry(p.clone())
                .or_insert_with(|| stat_regular(&p))
                .as_ref()
                .map(|k| k.id)
        });
        named_ids.push(id);
    }
    let known: Vec<files::KnownName> = names.values().flatten().cloned().collect();
    let mut view_paths: HashMap<files::FileId, String> = HashMap::new();
    let mut wanted: HashSet<files::FileId> = HashSet::new();
    for e in &drained.pages {
        match real_id(e.kernel_dev, e.ino) {
            (id, Some(path)) => {
                view_paths.entry(id).or_insert_with(|| path.clone());
            }
            (id, None) => {
                wanted.insert(id);
            }
        }
    }
    wanted.extend(
        known
            .iter()
            .map(|k| k.id)
            .filter(|id| !view_paths.contains_key(id)),
    );
    let search_roots: Vec<PathBuf> = if roots.is_empty() {
        vec![PathBuf::from("/")]
    } else {
        roots.to_vec()
    };
    let mut paths = files::resolve(&search_roots, &wanted, &known);
    stats.files = wanted.len() + view_paths.len();
    paths.extend(view_paths);
    stats.resolved_files = paths.len();

    let mut events = Vec::with_capacity(drained.pages.len() + drained.named.len());
    for e in &drained.pages {
        let Some(kind) = Kind::from_u32(e.kind).and_then(event_kind) else {
            continue;
        };
        let (id, _) = real_id(e.kernel_dev, e.ino);
        events.push(TraceEvent {
            ts_ns: e.ts_ns.saturating_sub(start_mono),
            pid: e.pid,
            tid: e.tid,
            comm: comm(&e.comm),
            kind,
            dev: id.0,
            ino: id.1,
            path: paths.get(&id).cloned(),
            first_page: e.index,
            page_count: e.nr_pages,
        });
    }
    for (e, id) in drained.named.iter().zip(named_ids) {
        let Some(kind) = Kind::from_u32(e.event.kind).and_then(event_kind) else {
            continue;
        };
        let Some(id) = id else {
            stats.dropped_names += 1;
            continue;
        };
        events.push(TraceEvent {
            ts_ns: e.event.ts_ns.saturating_sub(start_mono),
            pid: e.event.pid,
            tid: e.event.tid,
            comm: comm(&e.event.comm),
            kind,
            dev: id.0,
            ino: id.1,
            path: paths.get(&id).cloned(),
            first_page: 0,
            page_count: 0,
        });
    }
    events.sort_by_key(|e| e.ts_ns);
    if !views.is_empty() {
        stats.view = Some(view_stats(&events, views));
    }
    (events, stats)
}

/// The views' counts, and how many pages of the files they served the trace counts as
/// touched (clipped to each file's size: a `read` past the end asks for pages that do not
/// exist).
fn view_stats(events: &[TraceEvent], views: &[view::ViewReport]) -> ViewStats {
    let served: HashMap<files::FileId, &String> = views
        .iter()
        .flat_map(|v| v.files.values().map(|(id, path)| (*id, path)))
        .collect();
    let mut touched: HashMap<files::FileId, Vec<(u64, u64)>> = HashMap::new();
    for e in events {
        if matches!(e.kind, EventKind::Fault | EventKind::GetPages)
            && served.contains_key(&(e.dev, e.ino))
        {
            touched
                .entry((e.dev, e.ino))
                .or_default()
                .push((e.first_page, e.first_page + u64::from(e.page_count)));
        }
    }
    let page = u64::from(page_size());
    let touched_pages = touched
        .iter_mut()
        .map(|(id, ranges)| {
            let pages = served
                .get(id)
                .and_then(|p| std::fs::metadata(p.as_str()).ok())
                .map_or(u64::MAX, |m| m.len().div_ceil(page));
            for r in ranges.iter_mut() {
                r.1 = r.1.min(pages);
                r.0 = r.0.min(r.1);
            }
            union_len(ranges)
        })
        .sum();
    ViewStats {
        served_pages: views.iter().map(|v| v.pages).sum(),
        touched_pages,
        reads: views.iter().map(|v| v.reads).sum(),
        failed_reads: views.iter().map(|v| v.failed_reads).sum(),
        errors: views.iter().filter_map(|v| v.error.clone()).collect(),
    }
}

/// Distinct integers covered by half-open ranges.
fn union_len(ranges: &mut [(u64, u64)]) -> u64 {
    ranges.sort_unstable();
    let (mut total, mut end) = (0, 0);
    for &(s, e) in ranges.iter() {
        let s = s.max(end);
        if e > s {
            total += e - s;
            end = e;
        }
    }
    total
}

/// The roots that no other root contains (a view covers everything below its root).
fn outermost(roots: &[PathBuf]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for r in roots {
        if !roots.iter().any(|o| o != r && r.starts_with(o)) && !out.contains(r) {
            out.push(r.clone());
        }
    }
    out
}

/// Errors of the views' setup in the child (unshare, mount) rather than of the exec.
fn is_setup_errno(errno: i32) -> bool {
    matches!(
        errno,
        libc::EPERM | libc::EINVAL | libc::ENODEV | libc::EBUSY
    )
}

fn event_kind(kind: Kind) -> Option<EventKind> {
    Some(match kind {
        Kind::Fault => EventKind::Fault,
        Kind::MapPages => EventKind::MapPages,
        Kind::GetPages => EventKind::GetPages,
        Kind::AddToCache => EventKind::AddToCache,
        Kind::Open => EventKind::Open,
        Kind::Exec => EventKind::Exec,
    })
}

/// The absolute name an open or exec refers to, when it can be known.
fn absolute_name(e: &NamedEvent, cwds: &HashMap<u32, PathBuf>) -> Option<PathBuf> {
    let len = e.name.iter().position(|&b| b == 0).unwrap_or(e.name.len());
    if len == 0 || len == e.name.len() {
        // Empty, or cut at NAME_LEN: not a usable name.
        return None;
    }
    let name = Path::new(OsStr::from_bytes(&e.name[..len]));
    if name.is_absolute() {
        return Some(name.to_path_buf());
    }
    let relative_to_cwd = e.event.kind == Kind::Exec as u32 || e.event.dfd == libc::AT_FDCWD;
    if !relative_to_cwd {
        return None;
    }
    cwds.get(&e.event.pid).map(|cwd| cwd.join(name))
}

/// What `path` leads to, when it is a regular file.
fn stat_regular(path: &Path) -> Option<files::KnownName> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    let real = std::fs::canonicalize(path).ok()?;
    let link = match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir)
            .map(|d| d.join(name))
            .unwrap_or_else(|_| real.clone()),
        _ => real.clone(),
    };
    Some(files::KnownName {
        id: (meta.dev(), meta.ino()),
        real,
        link,
    })
}

/// The kernel's internal `dev_t` (`major << 20 | minor`) as userspace `st_dev`.
pub fn user_dev(kernel_dev: u32) -> u64 {
    let major = kernel_dev >> 20;
    let minor = kernel_dev & ((1 << 20) - 1);
    libc::makedev(major, minor)
}

fn comm(raw: &[u8; COMM_LEN]) -> String {
    let len = raw.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    String::from_utf8_lossy(&raw[..len]).into_owned()
}

fn canonical_roots(roots: &[PathBuf]) -> Result<Vec<PathBuf>, RecordError> {
    roots
        .iter()
        .map(|r| {
            let real = std::fs::canonicalize(r).map_err(|source| RecordError::Root {
                path: r.clone(),
                source,
            })?;
            if !real.is_dir() {
                return Err(RecordError::Root {
                    path: r.clone(),
                    source: std::io::Error::other("not a directory"),
                });
            }
            Ok(real)
        })
        .collect()
}

/// Root, or the capabilities that loading tracing programs and reading every file need.
fn check_privileges() -> Result<(), RecordError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(());
    }
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        Ok(())
    } else {
        Err(RecordError::NotPrivileged)
    }
}

pub(crate) fn page_size() -> u32 {
    // SAFETY: sysconf has no memory preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(n).unwrap_or(4096)
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is valid for writes; CLOCK_MONOTONIC always exists. bpf_ktime_get_ns
    // reads the same clock.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn kernel_release() -> String {
    // SAFETY: a zeroed utsname is a valid buffer for uname to fill.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is valid for writes.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return String::new();
    }
    let bytes: Vec<u8> = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use incfs_common::Event;

    #[test]
    fn kernel_dev_to_user_dev() {
        // 254:1 in the kernel's encoding.
        let k = (254 << 20) | 1;
        assert_eq!(user_dev(k), libc::makedev(254, 1));
        // 259:0 (nvme) and a minor above 255.
        assert_eq!(user_dev(259 << 20), libc::makedev(259, 0));
        assert_eq!(user_dev((8 << 20) | 300), libc::makedev(8, 300));
    }

    #[test]
    fn exit_codes() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(exit_code(&ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(&ExitStatus::from_raw(libc::SIGKILL)), 137);
    }

    #[test]
    fn nested_roots_get_one_view() {
        let roots: Vec<PathBuf> = ["/t", "/t/lib", "/u", "/t", "/tt"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(
            outermost(&roots),
            ["/t", "/u", "/tt"].map(PathBuf::from).to_vec()
        );
    }

    #[test]
    fn union_counts_overlaps_once() {
        assert_eq!(union_len(&mut [(5, 8), (0, 2), (1, 3), (7, 9)]), 7);
        assert_eq!(union_len(&mut []), 0);
    }

    #[test]
    fn comm_stops_at_nul() {
        let mut raw = [0u8; COMM_LEN];
        raw[..3].copy_from_slice(b"cat");
        assert_eq!(comm(&raw), "cat");
        assert_eq!(comm(&[b'x'; COMM_LEN]), "x".repeat(COMM_LEN));
    }

    #[test]
    fn names_are_made_absolute() {
        let mut e = NamedEvent {
            event: Event {
                ts_ns: 0,
                ino: 0,
                index: 0,
                pid: 7,
                tid: 7,
                kernel_dev: 0,
                kind: Kind::Open as u32,
                nr_pages: 0,
                dfd: libc::AT_FDCWD,
                comm: [0; COMM_LEN],
            },
            name: [0; incfs_common::NAME_LEN],
        };
        e.name[..5].copy_from_slice(b"a/b.c");
        let cwds: HashMap<u32, PathBuf> = [(7, PathBuf::from("/src"))].into_iter().collect();
        assert_eq!(absolute_name(&e, &cwds), Some(PathBuf::from("/src/a/b.c")));
        e.event.dfd = 3;
        assert_eq!(absolute_name(&e, &cwds), None);
        e.name[..6].copy_from_slice(b"/x/y.c");
        assert_eq!(absolute_name(&e, &cwds), Some(PathBuf::from("/x/y.c")));
    }
}
