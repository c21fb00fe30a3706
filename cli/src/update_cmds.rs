//! `incfs diff` and `incfs plan carry`: what an update of an image shares with the old one.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use incfs_fs::format::{DiffCounts, FileStatus, Image, diff as diff_images};
use incfs_fs::plan::PrefetchPlan;
use incfs_fs::plan::carry::carry as carry_plan;

use crate::util::human;

/// Arguments of `incfs diff`.
#[derive(Args)]
pub struct DiffArgs {
    /// The old image.
    old: PathBuf,
    /// The new image.
    new: PathBuf,
    /// Print the whole comparison as JSON, with every file of the new image.
    #[arg(long)]
    json: bool,
    /// Files listed (those with the most new stored bytes); 0 lists none.
    #[arg(long, default_value_t = 10)]
    top: usize,
}

fn open(path: &std::path::Path) -> anyhow::Result<Image<std::fs::File>> {
    Image::open_path(path, None).with_context(|| format!("opening image {}", path.display()))
}

fn pct(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{:.1}%", part as f64 * 100.0 / whole as f64)
    }
}

fn line(out: &mut impl Write, what: &str, c: &DiffCounts) -> std::io::Result<()> {
    writeln!(
        out,
        "{what:<8} {:>10} chunks  {:>10} raw  {:>10} stored",
        c.chunks,
        human(c.raw_bytes),
        human(c.stored_bytes)
    )
}

/// Runs `incfs diff OLD NEW`.
pub fn diff(a: DiffArgs) -> anyhow::Result<ExitCode> {
    let old = open(&a.old)?;
    let new = open(&a.new)?;
    let d = diff_images(&old, &new);
    let mut out = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer_pretty(&mut out, &d)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let t = &d.total;
    writeln!(out, "old:      {} ({})", a.old.display(), d.old_digest)?;
    writeln!(out, "new:      {} ({})", a.new.display(), d.new_digest)?;
    if d.old_chunk_size != d.new_chunk_size {
        writeln!(
            out,
            "note:     chunk sizes differ ({} vs {}): few chunks can be shared",
            d.old_chunk_size, d.new_chunk_size
        )?;
    }
    line(&mut out, "new img", t)?;
    let shared = DiffCounts {
        chunks: t.shared_chunks,
        raw_bytes: t.shared_raw_bytes,
        stored_bytes: t.shared_stored_bytes,
        ..DiffCounts::default()
    };
    let fresh = DiffCounts {
        chunks: t.new_chunks(),
        raw_bytes: t.new_raw_bytes(),
        stored_bytes: t.new_stored_bytes(),
        ..DiffCounts::default()
    };
    line(&mut out, "shared", &shared)?;
    line(&mut out, "new", &fresh)?;
    writeln!(
        out,
        "shared:   {} of the raw bytes, {} of the stored bytes",
        pct(t.shared_raw_bytes, t.raw_bytes),
        pct(t.shared_stored_bytes, t.stored_bytes)
    )?;
    writeln!(
        out,
        "files:    {} same, {} changed, {} added, {} removed",
        d.files_same, d.files_changed, d.files_added, d.files_removed
    )?;
    let mut files: Vec<_> = d
        .files
        .iter()
        .filter(|f| f.status != FileStatus::Same && f.counts.new_stored_bytes() > 0)
        .collect();
    files.sort_by_key(|f| std::cmp::Reverse(f.counts.new_stored_bytes()));
    for f in files.iter().take(a.top) {
        writeln!(
            out,
            "  {:>10} new stored  {:>6} of {:>10} raw shared  {:<7}  {}",
            human(f.counts.new_stored_bytes()),
            pct(f.counts.shared_raw_bytes, f.counts.raw_bytes),
            human(f.counts.raw_bytes),
            match f.status {
                FileStatus::Same => "same",
                FileStatus::Changed => "changed",
                FileStatus::Added => "added",
            },
            f.path
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `incfs plan carry`.
#[derive(Args)]
pub struct CarryArgs {
    /// The plan made for the old image.
    plan: PathBuf,
    /// The old image (the one the plan is for).
    #[arg(long)]
    from: PathBuf,
    /// The new image.
    #[arg(long)]
    image: PathBuf,
    /// Plan file to write for the new image (JSON; zstd-compressed when it ends in .zst).
    #[arg(short, long)]
    output: PathBuf,
    /// Print what was carried as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `incfs plan carry OLD_PLAN --from OLD.img --image NEW.img -o NEW_PLAN`.
pub fn carry(a: CarryArgs) -> anyhow::Result<ExitCode> {
    let plan = PrefetchPlan::load(&a.plan)?;
    let old = open(&a.from)?;
    let new = open(&a.image)?;
    let (carried, r) = carry_plan(&plan, &a.plan, &old, &new)
        .with_context(|| format!("is {} the image the plan was made for?", a.from.display()))?;
    carried.save(&a.output)?;
    let mut out = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer_pretty(&mut out, &r)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "plan:     {} ({} entries)",
        a.output.display(),
        r.entries_out
    )?;
    writeln!(
        out,
        "chunks:   {} in, {} kept, {} moved, {} changed, {} dropped; {} out ({})",
        r.chunks_in,
        r.kept,
        r.moved,
        r.changed,
        r.dropped,
        r.chunks_out,
        human(carried.total_bytes)
    )?;
    Ok(ExitCode::SUCCESS)
}
