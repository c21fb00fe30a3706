//! Records a command and prints its events as CSV (ts_ns,pid,tid,comm,kind,dev,ino,first_page,
//! page_count,path): a debugging aid for the probe.
//!
//! `cargo run -p incfs-recorder --example dump-events -- CMD ARGS...` (as root)

use std::ffi::OsString;
use std::process::ExitCode;

fn main() -> ExitCode {
    let command: Vec<OsString> = std::env::args_os().skip(1).collect();
    let rec = match incfs_recorder::record(&incfs_recorder::RecordOptions::new(command)) {
        Ok(rec) => rec,
        Err(err) => {
            eprintln!("dump-events: {err}");
            return ExitCode::from(2);
        }
    };
    for e in &rec.events {
        println!(
            "{},{},{},{},{},{},{},{},{},{}",
            e.ts_ns,
            e.pid,
            e.tid,
            e.comm,
            e.kind.name(),
            e.dev,
            e.ino,
            e.first_page,
            e.page_count,
            e.path.as_deref().unwrap_or("")
        );
    }
    eprintln!("lost_events: {}", rec.stats.lost_events);
    ExitCode::from(rec.exit_code())
}
