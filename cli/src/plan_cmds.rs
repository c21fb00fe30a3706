//! `plan`, `plan report` and `trace show`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use incfs_fs::plan::PrefetchPlan;
use incfs_planner::image_index::ImageIndex;
use incfs_planner::input::load_input;
use incfs_planner::pipeline::{MappedRun, MinRuns, PlanOptions, PlanStats, map_run, plan_runs};
use incfs_planner::report::{Report, report};
use incfs_planner::summary::{Verdict, summarize};
use incfs_planner::timeline::draw_timeline;
use incfs_planner::touch::TouchKinds;
use incfs_planner::trace::read_trace;
use serde::Serialize;

use crate::util::parse_size;

/// Arguments of `incfs plan`.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct PlanArgs {
    #[command(subcommand)]
    command: Option<PlanCommand>,
    /// Traces (Parquet from `incfs record-trace`) and/or mount read-logs
    /// (`MOUNTPOINT/.incfs/read-log`), one per run.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Plan file to write (JSON; zstd-compressed when it ends in .zst).
    #[arg(short, long, required = true)]
    output: Option<PathBuf>,
    #[command(flatten)]
    common: CommonArgs,
    /// After planning, print the quality report (as `incfs plan report` does).
    #[arg(long)]
    report: bool,
}

#[derive(Subcommand)]
enum PlanCommand {
    /// Score a plan: bytes vs the image, leave-one-out hit rate and over-fetch, a timeline.
    Report(ReportArgs),
    /// Carry a plan over to a new version of its image, where its chunks survive.
    Carry(crate::update_cmds::CarryArgs),
}

#[derive(Args)]
struct ReportArgs {
    /// The plan to score.
    plan: PathBuf,
    /// The traces and read-logs to score it on (and to plan leave-one-out from).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    #[command(flatten)]
    common: CommonArgs,
}

/// Options shared by `plan` and `plan report`.
#[derive(Args)]
struct CommonArgs {
    /// The image the plan is for.
    #[arg(long, required = true)]
    image: Option<PathBuf>,
    /// Keep chunks touched by at least this many runs (`2`) or this share of them (`0.5`,
    /// `50%`, rounded up).
    #[arg(long, value_parser = MinRuns::parse, default_value = "50%")]
    min_runs: MinRuns,
    /// Stop the plan at this many stored bytes (suffixes K, M, G).
    #[arg(long, value_parser = parse_size)]
    max_bytes: Option<u64>,
    /// Strip this prefix from trace paths to get image paths (repeatable). Default: the
    /// roots recorded in each trace.
    #[arg(long)]
    strip_prefix: Vec<String>,
    /// Also count these event kinds as touches: map_pages (fault-around, over-approximates),
    /// add_to_cache (includes readahead).
    #[arg(long, value_delimiter = ',')]
    touch: Vec<String>,
    /// Adjacent chunks join one range while their median first touches stay this close.
    #[arg(long, default_value_t = 100.0)]
    merge_window_ms: f64,
    /// Link speed the report assumes, in Mbit/s.
    #[arg(long, default_value_t = 100.0)]
    bandwidth_mbit: f64,
    /// Draw the access timeline with the plan overlaid into this SVG file.
    #[arg(long)]
    timeline: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

impl CommonArgs {
    fn options(&self) -> anyhow::Result<PlanOptions> {
        let mut touch = TouchKinds::default();
        for t in &self.touch {
            match t.as_str() {
                "map_pages" => touch.map_pages = true,
                "add_to_cache" => touch.add_to_cache = true,
                "fault" | "get_pages" => {}
                other => anyhow::bail!(
                    "--touch {other}: not an event kind (map_pages, add_to_cache; fault and \
                     get_pages always count)"
                ),
            }
        }
        if self.merge_window_ms.is_nan() || self.merge_window_ms < 0.0 {
            anyhow::bail!("--merge-window-ms must be 0 or more");
        }
        if self.bandwidth_mbit.is_nan() || self.bandwidth_mbit <= 0.0 {
            anyhow::bail!("--bandwidth-mbit must be more than 0");
        }
        Ok(PlanOptions {
            min_runs: self.min_runs,
            max_bytes: self.max_bytes,
            strip_prefixes: self.strip_prefix.clone(),
            touch,
            merge_window_ns: (self.merge_window_ms * 1e6) as u64,
        })
    }

    fn image(&self) -> anyhow::Result<&Path> {
        self.image
            .as_deref()
            .context("give the image with --image IMG")
    }

    fn bandwidth(&self) -> f64 {
        self.bandwidth_mbit * 1e6 / 8.0
    }
}

fn load_runs(
    inputs: &[PathBuf],
    index: &ImageIndex,
    opts: &PlanOptions,
) -> anyhow::Result<Vec<MappedRun>> {
    inputs
        .iter()
        .map(|p| {
            crate::util::check_trace_in_child(p)?;
            let raw = load_input(p, index.chunk_size, opts.touch)?;
            Ok(map_run(&raw, index, opts)?)
        })
        .collect()
}

/// A plan for `image` from traces or read-logs, with the planner's default options (what
/// `incfs plan INPUTS --image IMAGE` writes).
pub fn plan_from_inputs(inputs: &[PathBuf], image: &Path) -> anyhow::Result<PrefetchPlan> {
    let opts = PlanOptions::default();
    let index = ImageIndex::open(image, None)?;
    let runs = load_runs(inputs, &index, &opts)?;
    let refs: Vec<&MappedRun> = runs.iter().collect();
    let (plan, _) = plan_runs(&refs, &index, &opts)?;
    Ok(plan)
}

#[derive(Serialize)]
struct PlanJson<'a> {
    plan: &'a Path,
    entries: usize,
    total_bytes: u64,
    image_digest: &'a str,
    stats: &'a PlanStats,
    #[serde(skip_serializing_if = "Option::is_none")]
    report: Option<&'a Report>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeline: Option<&'a Path>,
}

/// Runs `incfs plan ...`.
pub fn plan(args: PlanArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        Some(PlanCommand::Report(r)) => return plan_report(r),
        Some(PlanCommand::Carry(c)) => return crate::update_cmds::carry(c),
        None => {}
    }
    let Some(output) = args.output else {
        anyhow::bail!("give the plan file to write with -o PLAN");
    };
    let c = &args.common;
    let opts = c.options()?;
    let index = ImageIndex::open(c.image()?, None)?;
    let runs = load_runs(&args.inputs, &index, &opts)?;
    let refs: Vec<&MappedRun> = runs.iter().collect();
    let (plan, stats) = plan_runs(&refs, &index, &opts)?;
    plan.save(&output)?;
    let rep = if args.report || c.timeline.is_some() {
        Some(report(&plan, &index, &runs, &opts, c.bandwidth())?)
    } else {
        None
    };
    if let Some(svg) = &c.timeline {
        draw_timeline(svg, &index, &runs, &plan, c.bandwidth())?;
    }
    let mut out = std::io::stdout().lock();
    if c.json {
        let j = PlanJson {
            plan: &output,
            entries: plan.entries.len(),
            total_bytes: plan.total_bytes,
            image_digest: &plan.image_digest,
            stats: &stats,
            report: rep.as_ref().filter(|_| args.report),
            timeline: c.timeline.as_deref(),
        };
        serde_json::to_writer_pretty(&mut out, &j)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    print_plan(&mut out, &output, &plan, &stats, &index)?;
    if args.report
        && let Some(r) = &rep
    {
        print_report(&mut out, r)?;
    }
    if let Some(svg) = &c.timeline {
        writeln!(out, "timeline:   {}", svg.display())?;
    }
    Ok(ExitCode::SUCCESS)
}

fn plan_report(a: ReportArgs) -> anyhow::Result<ExitCode> {
    let c = &a.common;
    let opts = c.options()?;
    let plan = PrefetchPlan::load(&a.plan)?;
    let image = c.image()?;
    let index = ImageIndex::open(image, None)?;
    plan.check_image(&a.plan, &index.digest)
        .with_context(|| format!("is {} the image the plan was made for?", image.display()))?;
    let runs = load_runs(&a.inputs, &index, &opts)?;
    let r = report(&plan, &index, &runs, &opts, c.bandwidth())?;
    if let Some(svg) = &c.timeline {
        draw_timeline(svg, &index, &runs, &plan, c.bandwidth())?;
    }
    let mut out = std::io::stdout().lock();
    if c.json {
        serde_json::to_writer_pretty(&mut out, &r)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    print_report(&mut out, &r)?;
    if let Some(svg) = &c.timeline {
        writeln!(out, "timeline:   {}", svg.display())?;
    }
    Ok(ExitCode::SUCCESS)
}

fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1 << 20)
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn print_plan(
    out: &mut impl Write,
    path: &Path,
    plan: &PrefetchPlan,
    s: &PlanStats,
    index: &ImageIndex,
) -> anyhow::Result<()> {
    writeln!(out, "plan:       {}", path.display())?;
    writeln!(
        out,
        "fetches:    {:.2} MiB stored in {} ranges of {} chunks ({} of the image's {:.2} MiB)",
        mib(plan.total_bytes),
        plan.entries.len(),
        s.planned_chunks,
        pct(plan.total_bytes as f64 / index.stored_bytes.max(1) as f64),
        mib(index.stored_bytes)
    )?;
    writeln!(
        out,
        "runs:       {} (a chunk needs {}); chunks touched {}, kept {}, planned {}{}",
        s.runs,
        s.needed_runs,
        s.touched_chunks,
        s.kept_chunks,
        s.planned_chunks,
        if s.cut_by_budget {
            " (cut by --max-bytes)"
        } else {
            ""
        }
    )?;
    if s.unknown_paths > 0 {
        writeln!(
            out,
            "not in the image: {} paths ({} ranges), e.g. {}",
            s.unknown_paths,
            s.unknown_ranges,
            s.unknown_examples.join(", ")
        )?;
        if s.kept_chunks == 0 {
            writeln!(
                out,
                "            no trace path matched: were the traces recorded under another \
                 root? try --strip-prefix ROOT"
            )?;
        }
    }
    if s.past_eof > 0 {
        writeln!(
            out,
            "past EOF:   {} ranges beyond the end of their file in the image",
            s.past_eof
        )?;
    }
    if s.unresolved > 0 {
        writeln!(
            out,
            "unresolved: {} touch events had no path (files outside the recorded roots)",
            s.unresolved
        )?;
    }
    Ok(())
}

fn print_report(out: &mut impl Write, r: &Report) -> anyhow::Result<()> {
    writeln!(out)?;
    writeln!(
        out,
        "report at {:.0} Mbit/s: plan {:.2} MiB = {} of the image ({:.2} MiB stored, {:.2} MiB raw)",
        r.bandwidth_bytes_per_s * 8.0 / 1e6,
        mib(r.plan_bytes),
        pct(r.plan_share),
        mib(r.image_stored_bytes),
        mib(r.image_raw_bytes)
    )?;
    let table = |out: &mut dyn Write, title: &str, scores: &[incfs_planner::report::Score]| {
        writeln!(out, "  {title}")?;
        writeln!(
            out,
            "    {:>8} {:>9} {:>9} {:>10}  run",
            "touched", "hit rate", "coverage", "overfetch"
        )?;
        for s in scores {
            writeln!(
                out,
                "    {:>8} {:>9} {:>9} {:>10}  {}",
                s.touched_chunks,
                pct(s.hit_rate),
                pct(s.coverage),
                pct(s.overfetch),
                s.source.display()
            )?;
        }
        std::io::Result::Ok(())
    };
    table(out, "the plan on each run:", &r.self_scores)?;
    if r.leave_one_out.is_empty() {
        writeln!(out, "  leave-one-out: needs at least two runs")?;
    } else {
        table(
            out,
            "leave-one-out (planned from the other runs):",
            &r.leave_one_out,
        )?;
        writeln!(
            out,
            "    mean hit rate {}, mean over-fetch {}",
            pct(r.loo_hit_rate.unwrap_or(0.0)),
            pct(r.loo_overfetch.unwrap_or(0.0))
        )?;
    }
    Ok(())
}

/// Arguments of `incfs trace`.
#[derive(Args)]
pub struct TraceArgs {
    #[command(subcommand)]
    command: TraceCommand,
}

#[derive(Subcommand)]
enum TraceCommand {
    /// Summarize a trace: pages touched per file, event counts, timeline.
    Show(ShowArgs),
}

#[derive(Args)]
struct ShowArgs {
    /// Trace file (Parquet, from `incfs record-trace`).
    trace: PathBuf,
    /// Print as JSON.
    #[arg(long)]
    json: bool,
    /// Show at most this many files (text output; JSON lists all).
    #[arg(long, default_value_t = 30)]
    top: usize,
}

/// Runs `incfs trace ...`.
pub fn trace(args: TraceArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        TraceCommand::Show(a) => trace_show(a),
    }
}

fn trace_show(a: ShowArgs) -> anyhow::Result<ExitCode> {
    crate::util::check_trace_in_child(&a.trace)?;
    let (meta, df) = read_trace(&a.trace)?;
    let s = summarize(&meta, &df)
        .with_context(|| format!("{}: summarizing the trace", a.trace.display()))?;
    let mut out = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer_pretty(&mut out, &s)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let ms = |ns: u64| ns as f64 / 1e6;
    writeln!(out, "trace:      {}", a.trace.display())?;
    writeln!(out, "command:    {}", s.command.join(" "))?;
    writeln!(
        out,
        "events:     {} ({} lost), {:.1} ms, page size {}",
        s.events,
        s.lost_events,
        ms(s.duration_ns),
        s.page_size
    )?;
    let kinds: Vec<String> = s.kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
    writeln!(out, "kinds:      {}", kinds.join(", "))?;
    let pages: u64 = s.files.iter().map(|f| f.pages).sum();
    let mib: f64 = s.files.iter().map(|f| f.mib).sum();
    writeln!(
        out,
        "files:      {}, {pages} pages touched = {mib:.1} MiB",
        s.files.len()
    )?;
    let c = &s.completeness;
    let verdict = match c.verdict {
        Verdict::Complete => "complete",
        Verdict::LikelyThin => "LIKELY THIN",
        Verdict::Unknown => "unknown",
    };
    writeln!(out, "complete:   {verdict}: {}", c.hint)?;
    writeln!(out)?;
    writeln!(
        out,
        "{:>10} {:>8} {:>8} {:>8} {:>8}  path",
        "first ms", "pages", "MiB", "mapped", "events"
    )?;
    for f in s.files.iter().take(a.top) {
        writeln!(
            out,
            "{:>10.2} {:>8} {:>8.2} {:>8} {:>8}  {}",
            ms(f.first_ns),
            f.pages,
            f.mib,
            f.mapped_pages,
            f.events,
            f.path
        )?;
    }
    if s.files.len() > a.top {
        writeln!(
            out,
            "{:>10} ... {} more (--top N, or --json)",
            "",
            s.files.len() - a.top
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "timeline:   {:>10} {:>10} {:>8} {:>9}",
        "from ms", "to ms", "events", "new files"
    )?;
    for b in &s.timeline {
        writeln!(
            out,
            "            {:>10.2} {:>10.2} {:>8} {:>9}",
            ms(b.start_ns),
            ms(b.end_ns),
            b.events,
            b.new_files
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
