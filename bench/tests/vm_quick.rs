//! The VM benchmark in quick mode: a 256 MiB TCG guest migrated pre-copy by two ferry
//! daemons (QEMU → unix socket → mutual-TLS pipe → QEMU) beside the same guest migrated
//! straight from QEMU to QEMU over TCP. Proves the case runs and yields numbers with
//! their baseline beside them; asserts nothing about speed.
#[test]
fn vm_bench_quick_runs() {
    let ms = ferry_bench::vm::run(true, None).expect(
        "VM bench (needs scripts/install-deps.sh, scripts/build-test-guest.sh and \
         `cargo build --workspace --bins`)",
    );
    for m in &ms {
        eprintln!("{m}");
    }
    let get = |metric: &str| {
        ms.iter()
            .find(|m| m.case == "vm/live-256MiB" && m.metric == metric)
            .unwrap_or_else(|| panic!("vm/live-256MiB {metric} missing from {ms:?}"))
    };
    for (downtime, total) in [
        ("downtime_ms", "total_ms"),
        ("downtime_p95_ms", "total_p95_ms"),
    ] {
        let (d, t) = (get(downtime), get(total));
        assert!(t.ferry > 0.0 && t.baseline > 0.0, "{t:?}");
        // QEMU's downtime is part of the migration the total time measured, on each path.
        assert!(
            (0.0..=t.ferry).contains(&d.ferry) && (0.0..=t.baseline).contains(&d.baseline),
            "downtime outside the total: {d:?} {t:?}"
        );
    }
    // The guest's memory crossed: at least what it touched (its heartbeat program and
    // kernel), so a migration that moved nothing would fail here.
    let bytes = get("total_ms").details["bytes"].as_u64().unwrap_or(0);
    assert!(
        bytes > 1 << 20,
        "ferry moved {bytes} bytes of a 256 MiB guest"
    );
}
