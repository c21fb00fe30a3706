//! A picture of a plan against the runs: an SVG with time (ms) across and the image's files
//! stacked up the side (offset within each file, files in order of first touch). Each run's
//! first touches are dots, one colour per run; the plan's chunks are black marks at the time
//! they would arrive at the report's bandwidth. Marks left of a run's dots are hits.

use std::collections::HashMap;
use std::path::Path;

use incfs_fs::plan::PrefetchPlan;
use plotters::prelude::*;

use crate::error::{PlannerError, polars_err};
use crate::image_index::ImageIndex;
use crate::pipeline::MappedRun;
use crate::report::arrivals;

/// Size of the picture in pixels.
const SIZE: (u32, u32) = (1400, 900);
/// Files named on the picture: the largest bands only, so the labels stay legible.
const LABELED_FILES: usize = 12;

/// One file's band on the y axis.
struct Band {
    base_mib: f64,
    size_mib: f64,
    name: String,
}

/// Draws the timeline of `runs` and `plan` into an SVG file at `out`.
pub fn draw_timeline(
    out: &Path,
    index: &ImageIndex,
    runs: &[MappedRun],
    plan: &PrefetchPlan,
    bandwidth_bytes_per_s: f64,
) -> Result<(), PlannerError> {
    let draw_err = |e: String| PlannerError::Draw {
        path: out.to_path_buf(),
        reason: e,
    };
    let cs_mib = f64::from(index.chunk_size) / f64::from(1 << 20);
    // Points per run: (file, chunk, first_ns).
    let mut points: Vec<Vec<(u32, u64, u64)>> = Vec::new();
    let mut first_touch: HashMap<u32, u64> = HashMap::new();
    for r in runs {
        let what = || format!("{}: drawing", r.source.display());
        let df = &r.chunks;
        let f = df
            .column("file")
            .and_then(|c| c.u32())
            .map_err(polars_err(what()))?;
        let c = df
            .column("chunk")
            .and_then(|c| c.u64())
            .map_err(polars_err(what()))?;
        let t = df
            .column("first_ns")
            .and_then(|c| c.u64())
            .map_err(polars_err(what()))?;
        let pts: Vec<(u32, u64, u64)> = f
            .into_no_null_iter()
            .zip(c.into_no_null_iter())
            .zip(t.into_no_null_iter())
            .map(|((f, c), t)| (f, c, t))
            .collect();
        for &(f, _, t) in &pts {
            let e = first_touch.entry(f).or_insert(t);
            *e = (*e).min(t);
        }
        points.push(pts);
    }
    let arr = arrivals(plan, index, bandwidth_bytes_per_s);
    for &((f, _), at, _) in &arr {
        first_touch.entry(f).or_insert(at);
    }
    let mut order: Vec<(u32, u64)> = first_touch.into_iter().collect();
    order.sort_by_key(|&(f, t)| (t, f));
    let mut bands: HashMap<u32, Band> = HashMap::new();
    let mut base = 0.0;
    for &(f, _) in &order {
        let file = &index.files[f as usize];
        let size_mib = (file.size as f64 / f64::from(1 << 20)).max(cs_mib);
        bands.insert(
            f,
            Band {
                base_mib: base,
                size_mib,
                name: file.path.clone(),
            },
        );
        base += size_mib;
    }
    let y = |f: u32, c: u64| {
        bands
            .get(&f)
            .map_or(0.0, |b| b.base_mib + c as f64 * cs_mib)
    };
    let max_ms = points
        .iter()
        .flatten()
        .map(|p| p.2)
        .chain(arr.iter().map(|a| a.1))
        .max()
        .unwrap_or(0) as f64
        / 1e6;
    let x_max = (max_ms * 1.05).max(1.0);
    let y_max = base.max(cs_mib);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "{} runs, plan {:.1} MiB in {} ranges at {:.0} Mbit/s",
                    runs.len(),
                    plan.total_bytes as f64 / f64::from(1 << 20),
                    plan.entries.len(),
                    bandwidth_bytes_per_s * 8.0 / 1e6
                ),
                ("sans-serif", 22),
            )
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(|e| draw_err(e.to_string()))?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("time since start (ms)")
            .y_desc("files stacked in order of first touch (MiB)")
            .draw()
            .map_err(|e| draw_err(e.to_string()))?;
        // File bands: a line at each file's start, names on the largest.
        let mut largest: Vec<&Band> = bands.values().collect();
        largest.sort_by(|a, b| b.size_mib.total_cmp(&a.size_mib));
        chart
            .draw_series(bands.values().map(|b| {
                PathElement::new(
                    vec![(0.0, b.base_mib), (x_max, b.base_mib)],
                    RGBColor(220, 220, 220),
                )
            }))
            .map_err(|e| draw_err(e.to_string()))?;
        chart
            .draw_series(largest.iter().take(LABELED_FILES).map(|b| {
                let name = b.name.rsplit('/').next().unwrap_or(&b.name).to_string();
                Text::new(
                    name,
                    (x_max * 0.78, b.base_mib + b.size_mib / 2.0),
                    ("sans-serif", 12),
                )
            }))
            .map_err(|e| draw_err(e.to_string()))?;
        for (i, pts) in points.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(
                    pts.iter().map(|&(f, c, t)| {
                        Circle::new((t as f64 / 1e6, y(f, c)), 2, color.filled())
                    }),
                )
                .map_err(|e| draw_err(e.to_string()))?
                .label(
                    runs[i]
                        .source
                        .file_name()
                        .map_or_else(|| format!("run {i}"), |n| n.to_string_lossy().into_owned()),
                )
                .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
        }
        chart
            .draw_series(arr.iter().map(|&((f, c), at, _)| {
                let (x, yv) = (at as f64 / 1e6, y(f, c));
                PathElement::new(vec![(x, yv), (x, yv + cs_mib)], BLACK.stroke_width(2))
            }))
            .map_err(|e| draw_err(e.to_string()))?
            .label("plan: arrival of each chunk")
            .legend(|(x, y)| PathElement::new(vec![(x + 10, y - 5), (x + 10, y + 5)], BLACK));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| draw_err(e.to_string()))?;
        root.present().map_err(|e| draw_err(e.to_string()))?;
    }
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let io = |error| PlannerError::Io {
        path: out.to_path_buf(),
        error,
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    std::io::Write::write_all(&mut tmp, svg.as_bytes()).map_err(io)?;
    tmp.persist(out).map_err(|e| io(e.error))?;
    Ok(())
}
