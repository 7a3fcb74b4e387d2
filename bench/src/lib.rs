//! Benchmarks for ferry. Every case is measured beside its raw baseline in the same run
//! (raw TCP copy, raw runc + CRIU, raw QEMU migration) and reported as a ratio, because the
//! machine is shared and noisy: absolute numbers from different runs do not compare.
#![forbid(unsafe_code)]

mod bucket;
pub mod containers;
pub mod link;
pub mod plot;
pub mod transfer;
pub mod vm;

use serde::Serialize;

/// One measured case next to its same-run baseline.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    /// Suite and case, e.g. "transfer/direct-1GiB".
    pub case: String,
    /// What is measured: "throughput_mib_s", "downtime_ms", "total_ms", ...
    pub metric: String,
    pub ferry: f64,
    pub baseline: f64,
    /// What the baseline is, e.g. "raw TCP copy".
    pub baseline_name: String,
    /// Extra facts: bytes moved, sizes, strategy.
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl Measurement {
    /// ferry / baseline: above 1 means ferry took more (time) or moved more (rate).
    pub fn ratio(&self) -> f64 {
        if self.baseline == 0.0 {
            f64::NAN
        } else {
            self.ferry / self.baseline
        }
    }

    /// The `downtime_ms` and `total_ms` rows of one migration case, ferry's and the
    /// baseline's (downtime, total) side by side.
    pub fn downtime_and_total(
        case: &str,
        baseline_name: &str,
        details: &serde_json::Map<String, serde_json::Value>,
        ferry: (f64, f64),
        baseline: (f64, f64),
    ) -> Vec<Measurement> {
        [
            ("downtime_ms", ferry.0, baseline.0),
            ("total_ms", ferry.1, baseline.1),
        ]
        .into_iter()
        .map(|(metric, f, b)| Measurement {
            case: case.into(),
            metric: metric.into(),
            ferry: f,
            baseline: b,
            baseline_name: baseline_name.into(),
            details: details.clone(),
        })
        .collect()
    }
}

/// One line for a test's log: the case, its metric (whose name carries the unit), ferry's
/// figure beside the baseline's, and their ratio.
impl std::fmt::Display for Measurement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: ferry {:.0}, baseline {:.0} ({}), ratio {:.2}",
            self.case,
            self.metric,
            self.ferry,
            self.baseline,
            self.baseline_name,
            self.ratio()
        )
    }
}
