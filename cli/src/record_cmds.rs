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
pub struct RecordTraceArgs {
    /// Where to write the trace (Parquet; see docs/trace.md).
    #[arg(short, long, value_name = "TRACE")]
    output: PathBuf,
    /// Resolve the files under DIR to paths (repeatable; default: every file). With --cold,
    /// the files evicted before the start.
    #[arg(long = "root", value_name = "DIR")]
    roots: Vec<PathBuf>,
    /// Evict the --root files from the page cache first, so the trace is a cold start.
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
