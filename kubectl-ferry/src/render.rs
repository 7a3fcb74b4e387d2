//! What the plugin prints for people: pure functions of Migrations and the time now,
//! so that they are tested without a cluster.
use ferry_crds::{Migration, Phase};
use std::fmt::Write;

const BAR: usize = 24;

/// `[#########...............]  38%` for done/total bytes; None while the total is
/// unknown.
pub fn bar(done: u64, total: u64) -> Option<String> {
    if total == 0 {
        return None;
    }
    let f = (done as f64 / total as f64).clamp(0.0, 1.0);
    let filled = (f * BAR as f64).round() as usize;
    Some(format!(
        "[{}{}] {:>3}%",
        "#".repeat(filled),
        ".".repeat(BAR - filled),
        (f * 100.0).floor() as u64
    ))
}

/// 1.2 s, 340 ms.
pub fn ms(ms: u64) -> String {
    if ms >= 10_000 {
        format!("{:.0}s", ms as f64 / 1000.0)
    } else if ms >= 1000 {
        format!("{:.2}s", ms as f64 / 1000.0)
    } else {
        format!("{ms}ms")
    }
}

fn rate(bytes_per_second: u64) -> String {
    format!("{:.1} MiB/s", bytes_per_second as f64 / (1 << 20) as f64)
}

pub fn phase(m: &Migration) -> &'static str {
    m.status
        .as_ref()
        .and_then(|s| s.phase)
        .map(Phase::as_str)
        .unwrap_or("Pending")
}

/// Where it goes: the controller's resolved target, else what the spec asks.
pub fn target(m: &Migration) -> String {
    if let Some(t) = m.status.as_ref().and_then(|s| s.target.as_ref()) {
        return t.display.clone();
    }
    let t = &m.spec.target;
    match (&t.cluster, &t.node) {
        (Some(c), Some(n)) => format!("{c}/{n}"),
        (Some(c), None) => format!("{c}/(any node)"),
        (None, Some(n)) => n.clone(),
        (None, None) => "(any node)".into(),
    }
}

/// One line: phase, progress bar, bytes, rate. What `--watch` prints on each change.
pub fn progress_line(m: &Migration) -> String {
    let mut line = format!("{:<13}", phase(m));
    let Some(p) = m.status.as_ref().and_then(|s| s.progress.as_ref()) else {
        return line.trim_end().to_string();
    };
    if let Some(b) = bar(p.bytes_transferred, p.bytes_total) {
        let _ = write!(line, " {b}");
    }
    if !p.display.is_empty() {
        let _ = write!(line, "  {}", p.display);
    }
    if let Some(r) = p.bytes_per_second.filter(|r| *r > 0) {
        let _ = write!(line, "  {}", rate(r));
    }
    line
}

/// The detail of one Migration at `now_ms` (Unix milliseconds).
pub fn detail(m: &Migration, now_ms: u64) -> String {
    let mut out = String::new();
    let ns = m.metadata.namespace.as_deref().unwrap_or_default();
    let name = m.metadata.name.as_deref().unwrap_or_default();
    let status = m.status.clone().unwrap_or_default();
    let source = status
        .source
        .as_ref()
        .map(|s| format!(" on {}", s.display))
        .unwrap_or_default();
    let _ = writeln!(out, "Migration:  {ns}/{name}");
    let _ = writeln!(
        out,
        "Workload:   pod {}{source} → {}",
        m.spec.workload.pod,
        target(m)
    );
    if let Some(s) = &status.settings {
        let kind = match status.workload_kind {
            Some(k) => format!("{k:?}, "),
            None => String::new(),
        };
        let _ = writeln!(out, "Strategy:   {kind}{:?}", s.strategy);
    }
    let _ = writeln!(out, "Phase:      {}", progress_line(m));
    if let Some(q) = &status.queued {
        let _ = writeln!(out, "Waiting:    {q}");
    }
    if let Some(t) = &status.timings {
        if !t.phases.is_empty() {
            let _ = writeln!(out, "Phases:");
            for p in &t.phases {
                let took = match (p.duration_ms, p.entered_at_ms) {
                    (Some(d), _) => ms(d),
                    (None, Some(at)) if !p.phase.is_terminal() => {
                        format!("{} so far", ms(now_ms.saturating_sub(at)))
                    }
                    _ => String::new(),
                };
                let _ = writeln!(out, "  {:<13} {took}", p.phase.as_str());
            }
        }
        if let Some(d) = t.downtime_ms {
            let total = t
                .total_ms
                .map(|t| format!(" (total {})", ms(t)))
                .unwrap_or_default();
            let _ = writeln!(out, "Downtime:   {}{total}", ms(d));
        }
        if !t.steps.is_empty() {
            let _ = writeln!(out, "Steps:");
            for s in &t.steps {
                let _ = writeln!(out, "  {:<28} {:<12} {}", s.name, s.node, ms(s.duration_ms));
            }
        }
    }
    if let Some(f) = &status.failure {
        let rolled = if f.rolled_back {
            " (rolled back: the workload runs at the source)"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "Failure:    {} in {}{rolled}: {}",
            f.reason,
            f.phase.as_str(),
            f.message
        );
    }
    out
}

/// `kubectl get migrations`' columns.
pub fn table(items: &[Migration], now_ms: u64, with_namespace: bool) -> String {
    let mut rows = vec![];
    let mut header = vec![
        "NAME", "PHASE", "WORKLOAD", "TARGET", "PROGRESS", "DOWNTIME", "AGE",
    ];
    if with_namespace {
        header.insert(0, "NAMESPACE");
    }
    rows.push(header.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    for m in items {
        let status = m.status.clone().unwrap_or_default();
        let age = m
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| {
                let created = t.0.as_millisecond().max(0) as u64;
                age(now_ms.saturating_sub(created))
            })
            .unwrap_or_default();
        let mut row = vec![
            m.metadata.name.clone().unwrap_or_default(),
            phase(m).to_string(),
            m.spec.workload.pod.clone(),
            target(m),
            status.progress.map(|p| p.display).unwrap_or_default(),
            status.timings.and_then(|t| t.downtime).unwrap_or_default(),
            age,
        ];
        if with_namespace {
            row.insert(0, m.metadata.namespace.clone().unwrap_or_default());
        }
        rows.push(row);
    }
    columns(&rows)
}

/// kubectl's ages: 45s, 3m, 2h, 5d.
fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        let _ = writeln!(out, "{}", line.join("   ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migration(status: serde_json::Value) -> Migration {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "Migration",
            "metadata": {"name": "counter", "namespace": "demo",
                         "creationTimestamp": "2026-12-04T10:00:00Z"},
            "spec": {"workload": {"pod": "counter"}, "target": {"cluster": "west", "node": "west-1"}},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn the_bar_fills_with_the_bytes_moved() {
        assert_eq!(bar(0, 0), None);
        assert_eq!(bar(0, 100).unwrap(), format!("[{}]   0%", ".".repeat(24)));
        assert_eq!(
            bar(50, 100).unwrap(),
            format!("[{}{}]  50%", "#".repeat(12), ".".repeat(12))
        );
        assert_eq!(bar(150, 100).unwrap(), format!("[{}] 100%", "#".repeat(24)));
    }

    #[test]
    fn detail_shows_phases_with_their_times_downtime_steps_and_failure() {
        let m = migration(serde_json::json!({
            "phase": "RolledBack",
            "source": {"node": "east-1", "namespace": "demo", "pod": "counter", "display": "east-1"},
            "target": {"cluster": "west", "node": "west-1", "namespace": "demo", "pod": "counter", "display": "west/west-1"},
            "progress": {"bytesTransferred": 512, "bytesTotal": 1024, "display": "512/1Ki (50%)"},
            "timings": {
                "phases": [
                    {"phase": "Pending", "enteredAt": "2026-12-04T10:00:00Z", "enteredAtMs": 1000, "durationMs": 60},
                    {"phase": "Restoring", "enteredAt": "2026-12-04T10:00:01Z", "enteredAtMs": 2000, "durationMs": 1500},
                    {"phase": "RolledBack", "enteredAt": "2026-12-04T10:00:03Z", "enteredAtMs": 3500}
                ],
                "downtimeMs": 703, "totalMs": 6896,
                "steps": [{"name": "dump/app", "node": "east-1", "startMs": 1, "durationMs": 300}]
            },
            "failure": {"reason": "RestoreFailed", "message": "criu said no", "phase": "Restoring", "rolledBack": true}
        }));
        let d = detail(&m, 10_000);
        for want in [
            "Workload:   pod counter on east-1 → west/west-1",
            "RolledBack",
            "[############............]  50%  512/1Ki (50%)",
            "  Pending       60ms",
            "  Restoring     1.50s",
            "Downtime:   703ms (total 6.90s)",
            "dump/app",
            "Failure:    RestoreFailed in Restoring (rolled back: the workload runs at the source): criu said no",
        ] {
            assert!(d.contains(want), "no {want:?} in\n{d}");
        }
        // A terminal phase has no running clock.
        assert!(!d.contains("so far"), "{d}");
    }

    #[test]
    fn the_current_phase_shows_its_time_so_far() {
        let m = migration(serde_json::json!({
            "phase": "Preparing",
            "timings": {"phases": [
                {"phase": "Pending", "enteredAt": "2026-12-04T10:00:00Z", "enteredAtMs": 1000, "durationMs": 60},
                {"phase": "Preparing", "enteredAt": "2026-12-04T10:00:00Z", "enteredAtMs": 1060}
            ]}
        }));
        assert!(detail(&m, 3060).contains("  Preparing     2.00s so far"));
    }

    #[test]
    fn the_table_has_kubectls_columns() {
        let m = migration(serde_json::json!({
            "phase": "Succeeded",
            "progress": {"bytesTransferred": 1, "bytesTotal": 1, "display": "60Ki"},
            "timings": {"downtime": "703ms"}
        }));
        let created = chrono::DateTime::parse_from_rfc3339("2026-12-04T10:00:00Z")
            .unwrap()
            .timestamp_millis() as u64;
        let t = table(&[m], created + 300_000, false);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            [
                "NAME", "PHASE", "WORKLOAD", "TARGET", "PROGRESS", "DOWNTIME", "AGE"
            ]
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            [
                "counter",
                "Succeeded",
                "counter",
                "west/west-1",
                "60Ki",
                "703ms",
                "5m"
            ]
        );
    }
}
