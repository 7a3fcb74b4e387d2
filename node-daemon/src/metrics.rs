//! The daemon's Prometheus metrics: each long operation counted when it ends, by
//! runtime, operation and outcome, with its duration and the bytes it moved.
use crate::runtime::{OpState, Progress};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// `containers`, `qemu`.
    pub runtime: String,
    /// `prepare`, `checkpoint`, `restore`.
    pub operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub runtime: String,
    pub operation: String,
    /// `succeeded`, `failed`, `aborted`.
    pub outcome: String,
}

#[derive(Clone)]
pub struct Metrics {
    pub operations: Family<OutcomeLabels, Counter>,
    pub running: Family<OpLabels, Gauge>,
    pub duration: Family<OpLabels, Histogram>,
    /// State bytes moved (before compression) and bytes on the network.
    pub bytes: Family<OpLabels, Counter>,
    pub wire_bytes: Family<OpLabels, Counter>,
    /// Downtime a destination measured (freeze at the source to running here).
    pub downtime: Family<OpLabels, Histogram>,
    /// 1 while this daemon's endpoint is on its Node (or registration is off).
    pub registered: Gauge,
}

fn seconds() -> Histogram {
    Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0])
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            operations: Family::default(),
            running: Family::default(),
            duration: Family::new_with_constructor(seconds),
            bytes: Family::default(),
            wire_bytes: Family::default(),
            downtime: Family::new_with_constructor(|| {
                Histogram::new([0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
            }),
            registered: Gauge::default(),
        }
    }
}

impl Metrics {
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::default();
        let r = registry.sub_registry_with_prefix("ferry_node");
        r.register(
            "operations",
            "Long operations that ended, by runtime, operation and outcome",
            self.operations.clone(),
        );
        r.register(
            "operations_running",
            "Long operations running now",
            self.running.clone(),
        );
        r.register(
            "operation_duration_seconds",
            "Time from an operation's start to its end",
            self.duration.clone(),
        );
        r.register(
            "state_bytes",
            "Workload state moved by ended operations, before compression",
            self.bytes.clone(),
        );
        r.register(
            "wire_bytes",
            "Bytes ended operations sent on the network",
            self.wire_bytes.clone(),
        );
        r.register(
            "downtime_seconds",
            "Downtime measured by restores here (source freeze to running here)",
            self.downtime.clone(),
        );
        r.register(
            "registered",
            "1 while the daemon's endpoint is announced on its Node",
            self.registered.clone(),
        );
        registry
    }

    pub fn started(&self, runtime: &str, operation: &str) {
        self.running
            .get_or_create(&labels(runtime, operation))
            .inc();
    }

    /// Counts an operation that ended with `p` as its last progress.
    pub fn ended(&self, runtime: &str, operation: &str, p: &Progress) {
        let l = labels(runtime, operation);
        self.running.get_or_create(&l).dec();
        let outcome = match p.state {
            OpState::Succeeded => "succeeded",
            OpState::Failed => "failed",
            // Still Running: Fence or Abort cancelled its task mid-way.
            OpState::Aborted | OpState::Running => "aborted",
        };
        self.operations
            .get_or_create(&OutcomeLabels {
                runtime: runtime.into(),
                operation: operation.into(),
                outcome: outcome.into(),
            })
            .inc();
        self.duration
            .get_or_create(&l)
            .observe(p.elapsed_ms as f64 / 1000.0);
        self.bytes.get_or_create(&l).inc_by(p.bytes_done);
        self.wire_bytes.get_or_create(&l).inc_by(p.wire_bytes);
        if p.state == OpState::Succeeded && p.downtime_ms > 0 {
            self.downtime
                .get_or_create(&l)
                .observe(p.downtime_ms as f64 / 1000.0);
        }
    }
}

fn labels(runtime: &str, operation: &str) -> OpLabels {
    OpLabels {
        runtime: runtime.into(),
        operation: operation.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &Metrics) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &m.registry()).unwrap();
        s
    }

    #[test]
    fn an_ended_operation_is_counted_with_its_outcome_bytes_and_downtime() {
        let m = Metrics::default();
        m.started("containers", "restore");
        let p = Progress {
            state: OpState::Succeeded,
            bytes_done: 1000,
            wire_bytes: 400,
            downtime_ms: 250,
            elapsed_ms: 1500,
            ..Default::default()
        };
        m.ended("containers", "restore", &p);
        let t = text(&m);
        for want in [
            r#"ferry_node_operations_total{runtime="containers",operation="restore",outcome="succeeded"} 1"#,
            r#"ferry_node_operations_running{runtime="containers",operation="restore"} 0"#,
            r#"ferry_node_state_bytes_total{runtime="containers",operation="restore"} 1000"#,
            r#"ferry_node_wire_bytes_total{runtime="containers",operation="restore"} 400"#,
            r#"ferry_node_downtime_seconds_sum{runtime="containers",operation="restore"} 0.25"#,
            r#"ferry_node_operation_duration_seconds_sum{runtime="containers",operation="restore"} 1.5"#,
        ] {
            assert!(t.contains(want), "no {want} in\n{t}");
        }
    }

    #[test]
    fn a_failed_operation_reports_no_downtime() {
        let m = Metrics::default();
        m.started("qemu", "checkpoint");
        let p = Progress {
            state: OpState::Failed,
            downtime_ms: 40,
            ..Default::default()
        };
        m.ended("qemu", "checkpoint", &p);
        let t = text(&m);
        assert!(t.contains(
            r#"ferry_node_operations_total{runtime="qemu",operation="checkpoint",outcome="failed"} 1"#
        ));
        assert!(!t.contains("ferry_node_downtime_seconds_count"), "{t}");
    }
}
