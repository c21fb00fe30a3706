//! `incfs serve`: serve images over HTTP with link emulation and fault injection.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use incfs_fs::link::{DEFAULT_STALL_MS, FaultConfig, FaultKind, LinkConfig};
use incfs_fs::serve::{STATS_PATH, ServeConfig, ServeError, Server};

/// Arguments of `incfs serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// Image file (served at `/` and `/NAME`) or directory (every file under it, with an
    /// index at each directory).
    path: PathBuf,
    /// Address to listen on. Loopback by default; port 0 picks a free port (the URL is
    /// printed on stdout).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Delay added to every request before its response head, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Bandwidth shared by all connections, in Mbit/s (default: unlimited).
    #[arg(long)]
    bandwidth_mbit: Option<f64>,
    /// Spoil this fraction (0..1) of file GETs with a seeded random mix of faults: connection
    /// resets, stalls, 5xx, short bodies, flipped bits.
    #[arg(long, value_name = "RATE")]
    inject_faults: Option<f64>,
    /// Seed of the fault draw, to repeat a run.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Kinds of fault to draw from, comma-separated (default: all of reset, stall,
    /// server-error, short-body, bit-flip).
    #[arg(long, value_delimiter = ',', value_parser = parse_kind)]
    fault_kinds: Vec<FaultKind>,
    /// How long a stall fault holds a response, in milliseconds.
    #[arg(long, default_value_t = DEFAULT_STALL_MS)]
    stall_ms: u64,
    /// Worker threads of the server.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Answer a request for several ranges with the whole file, as servers without
    /// multi-range support do (S3, some CDNs), instead of a multipart/byteranges body.
    #[arg(long)]
    single_range: bool,
}

fn parse_kind(s: &str) -> Result<FaultKind, String> {
    s.trim().parse()
}

/// Runs the server until the process is killed.
pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut faults = FaultConfig {
        rate: args.inject_faults.unwrap_or(0.0),
        seed: args.seed,
        stall_ms: args.stall_ms,
        ..FaultConfig::default()
    };
    if !args.fault_kinds.is_empty() {
        faults.kinds = args.fault_kinds;
    }
    let link = LinkConfig {
        latency_ms: args.latency_ms,
        bandwidth_mbit: args.bandwidth_mbit,
        faults,
    };
    link.validate()
        .map_err(anyhow::Error::msg)
        .context("check --bandwidth-mbit, --inject-faults and --fault-kinds")?;
    let is_file = args.path.is_file();
    let config = ServeConfig {
        listen: args.listen,
        link: link.clone(),
        workers: args.workers.max(1),
        multi_range: !args.single_range,
        ..ServeConfig::new(&args.path)
    };
    let mut server = Server::start(config).map_err(|e| {
        let hint = match &e {
            ServeError::Bind { .. } => " (is the address in use? try --listen 127.0.0.1:0)",
            ServeError::Path { .. } => " (give an image file or a directory of them)",
            _ => "",
        };
        anyhow::Error::new(e).context(format!("cannot serve {}{hint}", args.path.display()))
    })?;
    let name = if is_file {
        args.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        String::new()
    };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "serving {} at {}",
        args.path.display(),
        server.url(&name)
    )?;
    writeln!(out, "stats at {}", server.url(STATS_PATH))?;
    if !link.is_perfect() {
        writeln!(
            out,
            "link: latency {} ms, bandwidth {}, faults {}",
            link.latency_ms,
            link.bandwidth_mbit
                .map_or("unlimited".to_string(), |m| format!("{m} Mbit/s")),
            if link.faults.is_active() {
                let kinds: Vec<&str> = link.faults.kinds.iter().map(|k| k.name()).collect();
                format!(
                    "{} of GETs (seed {}; {})",
                    link.faults.rate,
                    link.faults.seed,
                    kinds.join(", ")
                )
            } else {
                "none".to_string()
            }
        )?;
    }
    out.flush()?;
    drop(out);
    server.wait();
    anyhow::bail!("the server stopped unexpectedly")
}
