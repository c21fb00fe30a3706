//! Medians, the Markdown table and the plot (a hand-written SVG: one horizontal bar per
//! method at its median, a line from min to max, log-scaled seconds).

use std::fmt::Write;

use crate::{Method, Results, Sample, Summary};

const MIB: f64 = 1048576.0;

/// Median seconds of one method's samples, if it ran.
pub fn median_of(samples: &[Sample], method: &str) -> Option<f64> {
    let mut v: Vec<f64> = samples
        .iter()
        .filter(|s| s.method == method)
        .map(|s| s.seconds)
        .collect();
    v.sort_by(f64::total_cmp);
    (!v.is_empty()).then(|| v[v.len() / 2])
}

pub fn summarize(samples: &[Sample], methods: &[Method], ideal: f64) -> Vec<Summary> {
    methods
        .iter()
        .filter_map(|m| {
            let mut v: Vec<&Sample> = samples.iter().filter(|s| s.method == m.label()).collect();
            if v.is_empty() {
                return None;
            }
            v.sort_by(|x, y| x.seconds.total_cmp(&y.seconds));
            let mid = v[v.len() / 2];
            Some(Summary {
                method: m.label(),
                median_s: mid.seconds,
                min_s: v[0].seconds,
                max_s: v[v.len() - 1].seconds,
                bytes_moved: mid.bytes_moved,
                requests: mid.requests,
                ratio_to_ideal: mid.seconds / ideal,
            })
        })
        .collect()
}

fn get(r: &Results, m: Method) -> Option<&Summary> {
    r.summary.iter().find(|s| s.method == m.label())
}

pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let size = |label: &str, bytes: u64| {
        if bytes > 0 {
            format!("; {label} {:.1} MiB", bytes as f64 / MIB)
        } else {
            String::new()
        }
    };
    let _ = writeln!(
        s,
        "**{}, {} ms / {} Mbit/s**, {} rounds (medians), {} UTC start, commit `{}`. Tree {:.1} MiB \
         in {} files; incfs image {:.1} MiB ({} KiB chunks){}{}. Demand set {:.1} MiB stored ({:.1} MiB in the hot-first \
         image) → ideal {:.2} s. Plan from {} recorded from the {}.",
        r.workload,
        r.latency_ms,
        r.bandwidth_mbit,
        r.rounds,
        r.started_utc.trim_end_matches(" UTC"),
        r.git_commit,
        r.tree_bytes as f64 / MIB,
        r.tree_files,
        r.image_bytes as f64 / MIB,
        r.chunk_size / 1024,
        size("tar.zst", r.tar_zst_bytes),
        size("Nydus blob", r.nydus_blob_bytes),
        r.demand_set_stored_bytes as f64 / MIB,
        r.demand_set_hot_stored_bytes as f64 / MIB,
        r.ideal_s,
        r.plan_source,
        r.record_from,
    );
    let mut loads: Vec<f64> = r.samples.iter().map(|x| x.load_avg).collect();
    loads.sort_by(f64::total_cmp);
    if let (Some(lo), Some(hi)) = (loads.first(), loads.last()) {
        let _ = writeln!(
            s,
            "Load average (1 min) at the runs' starts: {lo:.1}–{hi:.1}, median {:.1} (2 cores, shared).",
            loads[loads.len() / 2]
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| method | median s | min–max s | MiB moved | requests | × ideal | ÷ incfs + plan |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    let best = get(r, Method::IncfsPlan).map(|b| b.median_s);
    for x in &r.summary {
        let vs = best.map_or("—".to_string(), |b| format!("{:.1}×", x.median_s / b));
        let name = if x.method == Method::IncfsPlan.label() {
            format!("**{}**", x.method)
        } else {
            x.method.to_string()
        };
        let _ = writeln!(
            s,
            "| {name} | {:.2} | {:.2}–{:.2} | {:.1} | {} | {:.2} | {vs} |",
            x.median_s,
            x.min_s,
            x.max_s,
            x.bytes_moved as f64 / MIB,
            x.requests,
            x.ratio_to_ideal,
        );
    }
    if let Some(p) = get(r, Method::IncfsPlan) {
        let _ = writeln!(s);
        let mut goals = vec![format!(
            "incfs + plan {:.2}× ideal (goal ≤ 1.2)",
            p.ratio_to_ideal
        )];
        let vs = |m: Method, goal: f64| {
            get(r, m).map(|x| {
                format!(
                    "{:.1}× faster than {} (goal ≥ {goal})",
                    x.median_s / p.median_s,
                    m.label()
                )
            })
        };
        goals.extend(
            [
                vs(Method::NydusPrefetch, 4.0),
                vs(Method::NydusLazy, 4.0),
                vs(Method::DownloadTarZst, 10.0),
                vs(Method::DownloadTree, 10.0),
                vs(Method::RcloneFull, 10.0),
                vs(Method::RcloneOff, 10.0),
                vs(Method::IncfsLazy, 5.0),
            ]
            .into_iter()
            .flatten(),
        );
        let _ = writeln!(s, "Ratios: {}.", goals.join("; "));
    }
    if !r.failures.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(s, "Failed runs (left out of the medians):");
        for f in &r.failures {
            let first = f.lines().next().unwrap_or_default();
            let _ = writeln!(s, "- {first}");
        }
    }
    s
}

/// Horizontal bars (median) with min–max lines, seconds on a log scale.
pub fn svg(r: &Results) -> String {
    let rows = &r.summary;
    let (left, right, top, row_h) = (210.0, 40.0, 50.0, 26.0);
    let width = 900.0;
    let plot_w = width - left - right;
    let height = top + row_h * rows.len() as f64 + 50.0;
    let lo = rows
        .iter()
        .map(|x| x.min_s)
        .chain([r.ideal_s])
        .fold(f64::INFINITY, f64::min)
        .max(1e-3);
    let hi = rows.iter().map(|x| x.max_s).fold(r.ideal_s, f64::max);
    let (l0, l1) = (
        lo.log10().floor(),
        hi.log10().ceil().max(lo.log10().floor() + 1.0),
    );
    let x = |v: f64| left + (v.max(1e-3).log10() - l0) / (l1 - l0) * plot_w;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{left}" y="20" font-size="14">{} — {} ms / {} Mbit/s, median of {} (bar), min–max (line), seconds, log scale</text>"#,
        xml(&r.workload),
        r.latency_ms,
        r.bandwidth_mbit,
        r.rounds
    );
    let bottom = top + row_h * rows.len() as f64;
    let mut e = l0;
    while e <= l1 {
        for m in [1.0, 2.0, 5.0] {
            let v = m * 10f64.powf(e);
            if v.log10() > l1 + 1e-9 {
                continue;
            }
            let px = x(v);
            let _ = writeln!(
                s,
                r##"<line x1="{px:.1}" y1="{top}" x2="{px:.1}" y2="{bottom}" stroke="#ddd"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                bottom + 16.0,
                trim(v)
            );
        }
        e += 1.0;
    }
    let ix = x(r.ideal_s);
    let _ = writeln!(
        s,
        r##"<line x1="{ix:.1}" y1="{:.1}" x2="{ix:.1}" y2="{bottom}" stroke="#2a2" stroke-dasharray="4 3"/><text x="{ix:.1}" y="{:.1}" fill="#2a2" text-anchor="middle">ideal {:.2} s</text>"##,
        top - 6.0,
        top - 10.0,
        r.ideal_s
    );
    for (i, row) in rows.iter().enumerate() {
        let y = top + row_h * i as f64;
        let color = if row.method.starts_with("incfs") {
            "#3a6fd8"
        } else {
            "#999"
        };
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text><rect x="{left}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}"/><line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black" stroke-width="1.5"/><text x="{:.1}" y="{:.1}">{:.2}</text>"##,
            left - 8.0,
            y + row_h * 0.65,
            xml(row.method),
            y + 4.0,
            (x(row.median_s) - left).max(1.0),
            row_h - 8.0,
            x(row.min_s),
            y + row_h / 2.0,
            x(row.max_s),
            y + row_h / 2.0,
            x(row.max_s) + 4.0,
            y + row_h * 0.65,
            row.median_s
        );
    }
    s.push_str("</svg>\n");
    s
}

fn trim(v: f64) -> String {
    let t = format!("{v:.3}");
    t.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(method: Method, round: usize, seconds: f64) -> Sample {
        Sample {
            method: method.label(),
            round,
            seconds,
            bytes_moved: round as u64,
            requests: 1,
            load_avg: 1.0,
            unmount_s: None,
        }
    }

    #[test]
    fn medians_ratios_table_and_plot() {
        let samples = vec![
            sample(Method::LocalCold, 0, 0.3),
            sample(Method::LocalCold, 1, 0.2),
            sample(Method::LocalCold, 2, 0.9),
            sample(Method::NydusPrefetch, 0, 8.0),
            sample(Method::IncfsPlan, 0, 2.0),
        ];
        assert_eq!(median_of(&samples, Method::LocalCold.label()), Some(0.3));
        assert_eq!(median_of(&samples, Method::RcloneOff.label()), None);
        let methods = [Method::LocalCold, Method::NydusPrefetch, Method::IncfsPlan];
        let summary = summarize(&samples, &methods, 1.6);
        assert_eq!(summary.len(), 3);
        assert_eq!(
            (summary[0].median_s, summary[0].min_s, summary[0].max_s),
            (0.3, 0.2, 0.9)
        );
        assert_eq!(summary[0].bytes_moved, 0, "the median run's own bytes");
        assert!((summary[2].ratio_to_ideal - 1.25).abs() < 1e-9);
        let r = Results {
            workload: "w <&>".into(),
            latency_ms: 20,
            bandwidth_mbit: 100.0,
            rounds: 3,
            chunk_size: 16384,
            plan_source: "read-log".into(),
            record_from: "local tree".into(),
            git_commit: "abc".into(),
            started_utc: "2026-11-25 14:00 UTC".into(),
            tree_bytes: 1,
            tree_files: 1,
            image_bytes: 1,
            tar_zst_bytes: 1,
            nydus_blob_bytes: 1,
            demand_set_stored_bytes: 1,
            demand_set_hot_stored_bytes: 1,
            ideal_s: 1.6,
            samples,
            summary,
            failures: vec!["round 1, rclone off: boom\nmore".into()],
        };
        let md = markdown(&r);
        assert!(
            md.contains("| **incfs + plan** | 2.00 | 2.00–2.00 |"),
            "{md}"
        );
        assert!(
            md.contains("4.0× faster than nydus + prefetch list (goal ≥ 4)"),
            "{md}"
        );
        assert!(md.contains("- round 1, rclone off: boom\n"), "{md}");
        let svg = svg(&r);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("w &lt;&amp;&gt;") && !svg.contains("w <&>"));
        assert_eq!(svg.matches("<rect x=").count(), 3);
    }
}
