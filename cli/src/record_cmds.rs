//! `incfs record-trace`: run a command under the eBPF recorder and write its trace.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use incfs_recorder::{RecordError, RecordOptions, StopReason};

/// Exit code when the command does not exist (as a shell uses).
const EXIT_NOT_FOUND: u8 = 127;

/// Arguments of `incfs record-trace`.
#[derive(clap::Args)]
#[command(after_help = "\
Record the program from the tree it lives in, as it is normally run, twice or more:

  incfs record-trace -o run1.parquet --root tree -- tree/bin/clang -c hello.c
  incfs record-trace -o run2.parquet --root tree -- tree/bin/clang -c hello.c
  incfs pack tree --order run1.parquet run2.parquet -o app.img

With --root, the trace holds the start's demand set on any file system, cached or not (clang
-c hello.c: 10,111 pages, the pages a readahead-0 `incfs run` reads; recorded with --no-view
from ext4 with 8 MiB readahead: 1,161). `incfs trace show TRACE` says whether a trace is
complete. Needs root (eBPF, and mounting the view).")]
pub struct RecordTraceArgs {
    /// Where to write the trace (Parquet; see docs/trace.md).
    #[arg(short, long, value_name = "TRACE")]
    output: PathBuf,
    /// The tree the program lives in (repeatable). CMD runs in a private mount namespace
    /// where DIR is covered by a readahead-0 view of itself, so the trace holds every page
    /// the start needs (the demand set), whatever the disk's readahead; nothing on the
    /// machine changes. Files under DIR get their path in the trace. Without --root, every
    /// file is resolved and the trace is recorded on the file systems directly.
    #[arg(long = "root", value_name = "DIR")]
    roots: Vec<PathBuf>,
    /// Record on the file systems directly, without the view: readahead and fault-around
    /// then bring most pages in without an event, and the trace holds only a part of the
    /// demand set (docs/trace.md).
    #[arg(long)]
    no_view: bool,
    /// Evict the --root files from the page cache first (for --no-view: a cold start; the
    /// view's page cache starts empty anyway).
    #[arg(long)]
    cold: bool,
    /// Stop recording (and the command) after S seconds.
    #[arg(long, value_name = "S")]
    duration: Option<f64>,
    /// Ring buffer size in MiB (a power of two).
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    ring_buffer_mib: u32,
    /// Do not record openat calls.
    #[arg(long)]
    no_opens: bool,
    /// The command to run and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<OsString>,
}

/// Runs `incfs record-trace`.
pub fn record_trace(a: RecordTraceArgs) -> anyhow::Result<ExitCode> {
    let mut opts = RecordOptions::new(a.command);
    opts.roots = a.roots;
    opts.cold = a.cold;
    opts.view = !a.no_view && !opts.roots.is_empty();
    opts.trace_opens = !a.no_opens;
    opts.ring_buffer_bytes = a
        .ring_buffer_mib
        .checked_mul(1 << 20)
        .context("--ring-buffer-mib is too large (at most 2048)")?;
    if let Some(s) = a.duration {
        opts.duration = Some(
            Duration::try_from_secs_f64(s)
                .with_context(|| format!("--duration {s}: not a number of seconds"))?,
        );
    }
    let recording = match incfs_recorder::record(&opts) {
        Ok(r) => r,
        Err(err @ RecordError::CommandNotFound { .. }) => {
            let _ = writeln!(std::io::stderr(), "incfs: {err}");
            return Ok(ExitCode::from(EXIT_NOT_FOUND));
        }
        Err(err) => return Err(err).context("record-trace"),
    };
    recording
        .write(&a.output)
        .with_context(|| format!("writing the trace to {}", a.output.display()))?;
    let s = &recording.stats;
    let how = match recording.stop {
        StopReason::Exited => String::new(),
        StopReason::Duration => " (stopped at --duration)".to_owned(),
        StopReason::Signal(sig) => format!(" (stopped by signal {sig})"),
    };
    let mut err = std::io::stderr().lock();
    writeln!(
        err,
        "incfs: {} events, {} files ({} resolved under the roots) in {:.3} s{how}; lost_events: {} -> {}",
        recording.events.len(),
        s.files,
        s.resolved_files,
        s.elapsed.as_secs_f64(),
        s.lost_events,
        a.output.display()
    )?;
    match &s.view {
        Some(v) => {
            writeln!(
                err,
                "incfs: recorded through a readahead-0 view of the roots, in the command's own \
                 mount namespace (gone with it; nothing on the machine was changed): the views \
                 served {} pages in {} reads, the trace touches {} of those files' pages",
                v.served_pages, v.reads, v.touched_pages
            )?;
            let outside = s.files.saturating_sub(s.resolved_files);
            if outside > 0 {
                writeln!(
                    err,
                    "incfs: {outside} files outside the roots (system libraries, ...) were read \
                     directly, with readahead: their events are in the trace without a path; if \
                     the program's image should hold them, record with their directory as \
                     another --root"
                )?;
            }
            if v.failed_reads > 0 {
                writeln!(
                    err,
                    "incfs: warning: {} reads of the roots failed (the command saw EIO)",
                    v.failed_reads
                )?;
            }
            for e in &v.errors {
                writeln!(err, "incfs: warning: a view stopped serving: {e}")?;
            }
            if v.touched_pages * 10 < v.served_pages * 9 {
                writeln!(
                    err,
                    "incfs: warning: the trace counts fewer pages than the views served \
                     ({} of {}): events were missed; check lost_events and retry",
                    v.touched_pages, v.served_pages
                )?;
            }
        }
        None => {
            let why = if opts.roots.is_empty() {
                "no --root was given"
            } else {
                "--no-view was given"
            };
            writeln!(
                err,
                "incfs: warning: recorded on the file systems directly ({why}): readahead and \
                 fault-around bring most pages in without an event, so this trace likely holds \
                 only a part of the start's demand set; give --root TREE (the directory the \
                 program lives in) for a complete one"
            )?;
        }
    }
    if s.lost_events > 0 {
        writeln!(
            err,
            "incfs: warning: {} events were lost (ring buffer full): the trace is incomplete; \
             retry with a larger --ring-buffer-mib",
            s.lost_events
        )?;
    }
    if s.untracked_forks > 0 {
        writeln!(
            err,
            "incfs: warning: {} processes of the tree were not followed (tracked-process map full)",
            s.untracked_forks
        )?;
    }
    Ok(ExitCode::from(recording.exit_code()))
}
