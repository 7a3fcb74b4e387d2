//! Plots of a run's measurements (`ferry-bench --plots DIR`), as SVG and PNG: for every
//! suite and metric, ferry's bar beside its same-run baseline's for each case, with the
//! ratio written next to it; for every case whose controller reported steps, where its
//! time went (one bar per step, from its start to its end). Text is drawn with
//! DejaVu Sans (Debian's fonts-dejavu-core, `$FERRY_PLOT_FONT` to use another TTF).
use crate::Measurement;
use anyhow::{Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FERRY: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const BASELINE: RGBColor = RGBColor(0xaa, 0xaa, 0xaa);

/// ab_glyph draws only fonts registered beforehand, from bytes that live forever.
fn register_font() -> Result<()> {
    static DONE: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let path = std::env::var("FERRY_PLOT_FONT").unwrap_or_else(|_| FONT.into());
        let bytes = std::fs::read(&path).map_err(|e| {
            format!("reading the plots' font {path}: {e} (install fonts-dejavu-core or set FERRY_PLOT_FONT)")
        })?;
        plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
            .map_err(|_| format!("{path} is not a font ab_glyph can read"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// Writes the plots into `dir`; returns the files written.
pub fn write_all(ms: &[Measurement], dir: &Path) -> Result<Vec<PathBuf>> {
    register_font()?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut groups: BTreeMap<(String, String), Vec<&Measurement>> = BTreeMap::new();
    for m in ms {
        let suite = m.case.split('/').next().unwrap_or("other").to_string();
        groups.entry((suite, m.metric.clone())).or_default().push(m);
    }
    let mut files = vec![];
    for ((suite, metric), group) in &groups {
        let stem = dir.join(format!("{suite}-{metric}"));
        let chart = Chart::Bars {
            title: format!("{suite}: {metric}, ferry (blue) vs its same-run baseline (grey)"),
            metric,
            ms: group,
        };
        files.extend(both(&stem, 1100, 120 + 70 * group.len() as u32, &chart)?);
    }
    let mut seen = std::collections::HashSet::new();
    for m in ms {
        let Some(steps) = m.details.get("ferry_steps").and_then(|s| s.as_array()) else {
            continue;
        };
        if steps.is_empty() || !seen.insert(m.case.clone()) {
            continue;
        }
        let stem = dir.join(format!("steps-{}", m.case.replace('/', "-")));
        let mut rows = step_rows(steps, "", FERRY);
        if let Some(base) = m.details.get("baseline_steps").and_then(|s| s.as_array()) {
            rows.extend(step_rows(base, "baseline: ", BASELINE));
        }
        let h = 120 + 30 * rows.len() as u32;
        let chart = Chart::Steps {
            case: &m.case,
            rows,
        };
        files.extend(both(&stem, 900, h, &chart)?);
    }
    Ok(files)
}

enum Chart<'a> {
    Bars {
        title: String,
        metric: &'a str,
        ms: &'a [&'a Measurement],
    },
    Steps {
        case: &'a str,
        rows: Vec<StepRow>,
    },
}

fn draw<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, chart: &Chart<'_>) -> Result<()>
where
    DB::ErrorType: 'static,
{
    area.fill(&WHITE)?;
    match chart {
        Chart::Bars { title, metric, ms } => bars(area, title, metric, ms)?,
        Chart::Steps { case, rows } => step_bars(area, case, rows)?,
    }
    area.present()?;
    Ok(())
}

/// Draws one chart into `STEM.svg` and `STEM.png`.
fn both(stem: &Path, w: u32, h: u32, chart: &Chart<'_>) -> Result<Vec<PathBuf>> {
    let svg = stem.with_extension("svg");
    let png = stem.with_extension("png");
    draw(&SVGBackend::new(&svg, (w, h)).into_drawing_area(), chart)
        .with_context(|| format!("drawing {}", svg.display()))?;
    draw(&BitMapBackend::new(&png, (w, h)).into_drawing_area(), chart)
        .with_context(|| format!("drawing {}", png.display()))?;
    Ok(vec![svg, png])
}

/// Horizontal bars: per case, ferry's (blue) over its baseline's (grey).
fn bars<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    metric: &str,
    ms: &[&Measurement],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let max = ms
        .iter()
        .flat_map(|m| [m.ferry, m.baseline])
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max)
        .max(1.0)
        * 1.6; // room for the figures right of the bars
    let n = ms.len() as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(260)
        .build_cartesian_2d(0.0..max, 0.0..n)?;
    let names: Vec<String> = ms.iter().map(|m| m.case.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(ms.len() * 2 + 1)
        .y_label_formatter(&|y| {
            let i = y.floor() as usize;
            if (y - y.floor() - 0.5).abs() < 0.26 {
                names.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_desc(metric)
        .label_style(("sans-serif", 13))
        .draw()?;
    for (i, m) in ms.iter().enumerate() {
        let y = i as f64;
        chart.draw_series([
            Rectangle::new([(0.0, y + 0.52), (m.ferry, y + 0.88)], FERRY.filled()),
            Rectangle::new([(0.0, y + 0.12), (m.baseline, y + 0.48)], BASELINE.filled()),
        ])?;
        let x = m.ferry.max(m.baseline) + max * 0.01;
        let baseline: String = m.baseline_name.chars().take(48).collect();
        chart.draw_series([
            Text::new(
                format!("{:.1} vs {:.1}: {:.2}x", m.ferry, m.baseline, m.ratio()),
                (x, y + 0.8),
                ("sans-serif", 13),
            ),
            Text::new(
                baseline,
                (x, y + 0.4),
                ("sans-serif", 11).into_font().color(&BLACK.mix(0.6)),
            ),
        ])?;
    }
    Ok(())
}

/// One bar of a steps chart: a step of ferry's or of its baseline.
struct StepRow {
    label: String,
    /// ms since the first step of its own side (ferry's steps are wall-clock times
    /// on the nodes, the baseline's times since its start).
    start: f64,
    duration: f64,
    color: RGBColor,
}

/// The rows of one side's steps (`name`, `node`, `startMs`, `durationMs` each).
fn step_rows(steps: &[serde_json::Value], prefix: &str, color: RGBColor) -> Vec<StepRow> {
    let start = |s: &serde_json::Value| s["startMs"].as_f64().unwrap_or(0.0);
    let t0 = steps.iter().map(start).fold(f64::INFINITY, f64::min);
    steps
        .iter()
        .map(|s| StepRow {
            label: format!(
                "{prefix}{} on {}",
                s["name"].as_str().unwrap_or("?"),
                s["node"].as_str().unwrap_or("-")
            ),
            start: start(s) - t0,
            duration: s["durationMs"].as_f64().unwrap_or(0.0),
            color,
        })
        .collect()
}

/// One bar per step, from its start to its end: ferry's (blue), then its baseline's
/// (grey) on the same axis.
fn step_bars<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    case: &str,
    rows: &[StepRow],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let end = rows
        .iter()
        .map(|r| r.start + r.duration)
        .fold(1.0, f64::max)
        * 1.2;
    let n = rows.len() as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{case}: ferry's steps (blue), its baseline's (grey)"),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(230)
        .build_cartesian_2d(0.0..end, 0.0..n)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(rows.len() * 2 + 1)
        .y_label_formatter(&|y| {
            let i = y.floor() as usize;
            if (y - y.floor() - 0.5).abs() < 0.26 {
                rows.get(i).map(|r| r.label.clone()).unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_desc("ms since the first step")
        .label_style(("sans-serif", 12))
        .draw()?;
    for (i, r) in rows.iter().enumerate() {
        let y = i as f64;
        chart.draw_series([Rectangle::new(
            [
                (r.start, y + 0.2),
                (r.start + r.duration.max(end * 0.002), y + 0.8),
            ],
            r.color.filled(),
        )])?;
        chart.draw_series([Text::new(
            format!("{:.0} ms", r.duration),
            (r.start + r.duration + end * 0.01, y + 0.65),
            ("sans-serif", 12),
        )])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(case: &str, metric: &str, ferry: f64, baseline: f64) -> Measurement {
        Measurement {
            case: case.into(),
            metric: metric.into(),
            ferry,
            baseline,
            baseline_name: "raw".into(),
            details: Default::default(),
        }
    }

    #[test]
    fn every_suite_and_metric_gets_an_svg_and_a_png_with_its_cases() {
        let mut steps = m("containers/cold-64MiB", "downtime_ms", 300.0, 250.0);
        steps.details.insert(
            "ferry_steps".into(),
            serde_json::json!([
                {"name": "freeze", "node": "east-1", "startMs": 1000, "durationMs": 2},
                {"name": "dump/app", "node": "east-1", "startMs": 1002, "durationMs": 180},
            ]),
        );
        steps.details.insert(
            "baseline_steps".into(),
            serde_json::json!([
                {"name": "dump", "node": "east-1", "startMs": 0.0, "durationMs": 151.0},
            ]),
        );
        let ms = vec![
            steps,
            m("containers/cold-64MiB", "total_ms", 900.0, 400.0),
            m("vm/live-256MiB", "downtime_ms", 20.0, 18.0),
        ];
        let dir = tempfile::tempdir().unwrap();
        let files = write_all(&ms, dir.path()).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "containers-downtime_ms.svg",
            "containers-downtime_ms.png",
            "containers-total_ms.svg",
            "vm-downtime_ms.svg",
            "steps-containers-cold-64MiB.svg",
            "steps-containers-cold-64MiB.png",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
        }
        let svg = std::fs::read_to_string(dir.path().join("containers-downtime_ms.svg")).unwrap();
        assert!(svg.contains("containers/cold-64MiB"), "case label missing");
        assert!(svg.contains("1.20x"), "ratio missing: {svg}");
        let steps =
            std::fs::read_to_string(dir.path().join("steps-containers-cold-64MiB.svg")).unwrap();
        assert!(steps.contains("dump/app on east-1") && steps.contains("180 ms"));
        assert!(steps.contains("baseline: dump on east-1") && steps.contains("151 ms"));
        let png = std::fs::read(dir.path().join("vm-downtime_ms.png")).unwrap();
        assert_eq!(&png[..4], b"\x89PNG");
    }
}
