//! The container benchmark in quick mode: a 64 MiB memhog Pod moved Cold and Live by
//! ferry's controller between real nodes, beside the same container moved by hand with
//! runc + CRIU; moved Cold through a MinIO bucket beside the Direct move and a plain
//! PUT + GET; Cold as four 16 MiB containers beside the one 64 MiB; and Cold within east
//! while a client calls it through its Service (kube-proxy), the client's gap beside
//! the Migration's downtime; then the 64 MiB Cold move through ferry installed with
//! Helm on clusters of its own, beside the Direct one. Proves every case runs and
//! yields numbers, and that they plot; asserts nothing about speed.
#[test]
fn containers_bench_quick_runs() {
    // FERRY_BENCH_FULL=1 runs the full sizes (use with --release for real numbers).
    let full = std::env::var("FERRY_BENCH_FULL").is_ok_and(|v| v == "1");
    let ms = ferry_bench::containers::run(!full, &[], None).expect(
        "containers bench (needs scripts/install-deps.sh and `cargo build --workspace --bins`)",
    );
    for m in &ms {
        eprintln!("{m}");
    }
    eprint!("{}", ferry_bench::containers::step_breakdown(&ms));
    for case in [
        "containers/cold-64MiB",
        "containers/live-64MiB",
        "containers/objectstore-cold-64MiB",
        "containers/cold-4x16MiB",
        "containers/installed-cold-64MiB",
    ] {
        for metric in ["downtime_ms", "total_ms"] {
            let m = ms
                .iter()
                .find(|m| m.case == case && m.metric == metric)
                .unwrap_or_else(|| {
                    panic!(
                        "{case} {metric} missing from {:?}",
                        ms.iter().map(|m| (&m.case, &m.metric)).collect::<Vec<_>>()
                    )
                });
            assert!(
                m.ferry > 0.0 && m.baseline > 0.0 && m.ferry.is_finite() && m.baseline.is_finite(),
                "{m:?}"
            );
        }
    }
    // The client behind the Service was answered before and after the move, and waited
    // through the move: no copy answers while the workload is frozen, so its longest
    // wait is of the order of the downtime (half of it, to leave the clocks' skew out).
    let gap = ms
        .iter()
        .find(|m| m.case == "containers/service-cold-64MiB" && m.metric == "client_gap_ms")
        .unwrap_or_else(|| panic!("no client gap in {ms:?}"));
    assert!(gap.ferry.is_finite() && gap.baseline > 0.0, "{gap:?}");
    assert!(gap.ferry >= gap.baseline / 2.0, "{gap:?}");
    assert!(gap.details["calls_answered"].as_u64() > Some(0), "{gap:?}");
    assert_eq!(gap.details["readiness_gate"], true, "{gap:?}");
    // The calls that timed out with the gate, beside the same move without it.
    let calls = ms
        .iter()
        .find(|m| m.case == "containers/service-cold-64MiB" && m.metric == "calls_timed_out")
        .unwrap_or_else(|| panic!("no timed-out calls in {ms:?}"));
    assert_eq!(
        calls.details["with_gate"]["readiness_gate"], true,
        "{calls:?}"
    );
    assert_eq!(
        calls.details["without_gate"]["readiness_gate"], false,
        "{calls:?}"
    );
    assert!(
        calls.details["without_gate"]["calls_answered"].as_u64() > Some(0),
        "{calls:?}"
    );
    // The baseline's own steps add up to its downtime (the clock runs from the
    // checkpoint's start to the restore's return, step after step).
    for case in ["containers/cold-64MiB", "containers/live-64MiB"] {
        let m = ms
            .iter()
            .find(|m| m.case == case && m.metric == "downtime_ms")
            .unwrap();
        let steps = m.details["baseline_steps"]
            .as_array()
            .unwrap_or_else(|| panic!("{case}: no baseline_steps in {:?}", m.details));
        let names: Vec<&str> = steps.iter().filter_map(|s| s["name"].as_str()).collect();
        for want in ["dump", "copy", "restore"] {
            assert!(
                names.contains(&want),
                "{case}: no baseline step {want}: {names:?}"
            );
        }
        let within_downtime: f64 = steps
            .iter()
            .filter(|s| s["name"] != "pages")
            .map(|s| s["durationMs"].as_f64().unwrap())
            .sum();
        assert!(
            within_downtime > 0.0 && within_downtime <= m.baseline + 1.0,
            "{case}: baseline steps {within_downtime} ms vs downtime {} ms",
            m.baseline
        );
    }
    // The plots of these measurements: one per metric, one per case's steps, each
    // naming every case it shows.
    let dir = tempfile::tempdir().unwrap();
    ferry_bench::plot::write_all(&ms, dir.path()).expect("plots");
    for metric in ["downtime_ms", "total_ms"] {
        let svg = std::fs::read_to_string(dir.path().join(format!("containers-{metric}.svg")))
            .expect("the metric's plot");
        for case in ["containers/cold-64MiB", "containers/live-64MiB"] {
            assert!(svg.contains(case), "{case} not in the {metric} plot");
        }
    }
    let steps = std::fs::read_to_string(dir.path().join("steps-containers-cold-64MiB.svg"))
        .expect("the cold case's step plot");
    assert!(steps.contains("dump/"), "no dump step in the step plot");
    assert!(
        steps.contains("baseline: dump on east-1"),
        "no baseline step in the step plot"
    );
}
