//! Human-readable forms of status fields for `kubectl get` columns.

/// Bytes in binary units, as Kubernetes quantities write them: `512Mi`, `1.5Gi`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["", "Ki", "Mi", "Gi", "Ti"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 || v >= 100.0 || v.fract() < 0.05 {
        format!("{:.0}{}", v, UNITS[unit])
    } else {
        format!("{:.1}{}", v, UNITS[unit])
    }
}

/// `done/total (pct%)`, or just `done` while the total is unknown.
pub fn progress(done: u64, total: u64) -> String {
    if total == 0 {
        return bytes(done);
    }
    let pct = (done as f64 * 100.0 / total as f64).min(100.0);
    format!("{}/{} ({:.0}%)", bytes(done), bytes(total), pct)
}

/// `done/total (pct%) at rate/s` while moving; the rate is left out once it is done.
pub fn progress_at(done: u64, total: u64, bytes_per_second: Option<u64>) -> String {
    match bytes_per_second {
        Some(r) if total == 0 || done < total => {
            format!("{} {}/s", progress(done, total), bytes(r))
        }
        _ => progress(done, total),
    }
}

/// `850ms`, `1.25s`, `2m5s`.
pub fn millis(ms: u64) -> String {
    match ms {
        0..1000 => format!("{ms}ms"),
        1000..60_000 => format!("{:.2}s", ms as f64 / 1000.0),
        _ => format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_kubectl_users_expect() {
        assert_eq!(bytes(512), "512");
        assert_eq!(bytes(512 << 20), "512Mi");
        assert_eq!(bytes(3 << 29), "1.5Gi");
        assert_eq!(progress(512 << 20, 1 << 30), "512Mi/1Gi (50%)");
        assert_eq!(progress(7 << 20, 0), "7Mi");
        assert_eq!(
            progress_at(512 << 20, 1 << 30, Some(40 << 20)),
            "512Mi/1Gi (50%) 40Mi/s"
        );
        assert_eq!(progress_at(7 << 20, 0, Some(1 << 20)), "7Mi 1Mi/s");
        assert_eq!(
            progress_at(1 << 30, 1 << 30, Some(40 << 20)),
            "1Gi/1Gi (100%)"
        );
        assert_eq!(progress_at(1 << 20, 1 << 30, None), "1Mi/1Gi (0%)");
        assert_eq!(millis(42), "42ms");
        assert_eq!(millis(1250), "1.25s");
        assert_eq!(millis(125_000), "2m5s");
    }
}
