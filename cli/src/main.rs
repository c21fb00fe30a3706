//! `incfs`: start big programs before their files have arrived.
//!
//! This binary parses arguments, shows progress and formats output; every piece of logic
//! lives in the library crates.

mod cache_args;
mod fetch_args;
mod image_cmds;
mod mount_cmds;
mod mount_helper;
mod oci_cmds;
mod plan_cmds;
mod progress;
mod record_cmds;
mod run_cmd;
mod serve_cmd;
mod update_cmds;
mod util;

use std::io::Write;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "incfs",
    version,
    about = "Start big programs before their files have arrived"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pack a directory tree into an image.
    Pack(image_cmds::PackArgs),
    /// Show an image's tree, sizes and chunk statistics.
    Inspect(image_cmds::InspectArgs),
    /// Check every chunk of an image against its digest.
    Verify(image_cmds::VerifyArgs),
    /// Serve an image (or a directory of them) over HTTP, with optional link emulation.
    Serve(serve_cmd::ServeArgs),
    /// Rewrite an image with a plan's chunks first (hot-first layout) and rebind the plan.
    Relayout(image_cmds::RelayoutArgs),
    /// Mount an image on a temporary directory, prefetch its plan, run a command on it.
    Run(run_cmd::RunArgs),
    /// Publish an image, with its plan and signature, to an OCI registry.
    Push(oci_cmds::PushArgs),
    /// Copy an image (and its plan and signature) from an OCI registry, verified.
    Pull(oci_cmds::PullArgs),
    /// Make an ed25519 key pair for signing images.
    Keygen(image_cmds::KeygenArgs),
    /// Sign an image's root digest (readers check it with `--trust`).
    Sign(image_cmds::SignArgs),
    /// Mount an image (local or http(s)://) read-only; chunks are fetched and verified lazily.
    Mount(mount_cmds::MountArgs),
    /// Unmount an incfs mount and wait for its daemon to save its cache.
    Umount(mount_cmds::UmountArgs),
    /// Show a mount's counters (bytes fetched, chunks local, misses).
    Stats(mount_cmds::StatsArgs),
    /// Inspect, clear or trim a cache directory (`incfs cache stat|clear|gc [DIR]`).
    Cache(mount_cmds::CacheArgs),
    /// Look into recorded traces (`incfs trace show TRACE`).
    Trace(plan_cmds::TraceArgs),
    /// Turn traces into a prefetch plan for an image (`incfs plan report` scores one).
    Plan(plan_cmds::PlanArgs),
    /// Compare two images: the chunks and bytes the new one shares with the old one.
    Diff(update_cmds::DiffArgs),
    /// Run a command under the eBPF recorder and write the pages its process tree touched.
    RecordTrace(record_cmds::RecordTraceArgs),
}

fn run() -> anyhow::Result<ExitCode> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let app = Cli::command();
    let is_subcommand = |s: &str| app.find_subcommand(s).is_some() || s == "help";
    let cli = match mount_helper::translate(&argv, is_subcommand) {
        Some(args) => Cli::parse_from(args?),
        None => Cli::parse(),
    };
    match cli.command {
        Command::Pack(a) => image_cmds::pack(a),
        Command::Inspect(a) => image_cmds::inspect(a),
        Command::Verify(a) => image_cmds::verify(a),
        Command::Serve(a) => serve_cmd::serve(a),
        Command::Relayout(a) => image_cmds::relayout(a),
        Command::Run(a) => run_cmd::run(a),
        Command::Push(a) => oci_cmds::push(a),
        Command::Pull(a) => oci_cmds::pull(a),
        Command::Keygen(a) => image_cmds::keygen(a),
        Command::Sign(a) => image_cmds::sign(a),
        Command::Mount(a) => mount_cmds::mount(a),
        Command::Umount(a) => mount_cmds::umount(a),
        Command::Stats(a) => mount_cmds::stats(a),
        Command::Cache(a) => mount_cmds::cache(a),
        Command::Trace(a) => plan_cmds::trace(a),
        Command::Plan(a) => plan_cmds::plan(a),
        Command::Diff(a) => update_cmds::diff(a),
        Command::RecordTrace(a) => record_cmds::record_trace(a),
    }
}

/// Warnings and errors, but not fuser's "Failed to umount filesystem" after every unmount:
/// when the mount was ended from outside (`incfs umount`, `fusermount3 -u`), the session's
/// own unmount on its way out finds nothing left to unmount (EINVAL). Our own unmount
/// failures are logged by incfs.
const DEFAULT_LOG_FILTER: &str = "warn,fuser::session=error";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .with_writer(std::io::stderr)
        .init();
    match run() {
        Ok(code) => code,
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            let _ = writeln!(std::io::stderr(), "incfs: error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
