//! The text report of where each case's downtime went.
use crate::Measurement;
use std::collections::HashSet;
use std::fmt::Write as _;

/// ferry's per-step breakdown of every case whose details carry `ferry_steps`
/// (`status.timings.steps` of its best run): one line per step with its node, its
/// start as an offset from the first step's, and its duration.
pub fn step_breakdown(ms: &[Measurement]) -> String {
    let mut out = String::new();
    let mut seen = HashSet::new();
    for m in ms {
        let Some(steps) = m.details.get("ferry_steps").and_then(|s| s.as_array()) else {
            continue;
        };
        if !seen.insert(m.case.as_str()) {
            continue; // the downtime and total rows of a case share one run's steps
        }
        let start = |s: &serde_json::Value| s["startMs"].as_f64();
        let t0 = steps.iter().filter_map(start).fold(f64::INFINITY, f64::min);
        let _ = writeln!(out, "ferry steps of {} (its best-downtime run):", m.case);
        let _ = writeln!(
            out,
            "  {:<36} {:<10} {:>10} {:>12}",
            "step", "node", "start_ms", "duration_ms"
        );
        for s in steps {
            let num = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
            let _ = writeln!(
                out,
                "  {:<36} {:<10} {:>10} {:>12}",
                s["name"].as_str().unwrap_or("?"),
                s["node"].as_str().unwrap_or("-"),
                num(start(s).map(|v| v - t0)),
                num(s["durationMs"].as_f64()),
            );
        }
        // ferry's own share: the downtime minus CRIU's dump (which streams the pages
        // for Cold) and restore, each the slowest container's (they run in parallel).
        let slowest = |prefix: &str| {
            steps
                .iter()
                .filter(|s| s["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
                .filter_map(|s| s["durationMs"].as_f64())
                .fold(0.0, f64::max)
        };
        let criu = slowest("dump/") + slowest("restore/");
        if let Some(d) = ms
            .iter()
            .find(|x| x.case == m.case && x.metric == "downtime_ms")
        {
            let _ = writeln!(
                out,
                "  ferry's own share of the {:.0} ms downtime: {:.0} ms (CRIU dump + restore {:.0} ms)",
                d.ferry,
                d.ferry - criu,
                criu
            );
        }
        if let Some(base) = m.details.get("baseline_steps").and_then(|s| s.as_array()) {
            let line = base
                .iter()
                .map(|s| {
                    format!(
                        "{} {:.0} ms",
                        s["name"].as_str().unwrap_or("?"),
                        s["durationMs"].as_f64().unwrap_or(f64::NAN)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(out, "  its baseline's steps: {line}");
        }
    }
    out
}
