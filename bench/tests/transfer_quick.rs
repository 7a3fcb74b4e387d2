//! The transfer benchmark in quick mode: proves the cases run end to end against real
//! sockets and a real MinIO. Prints the numbers; asserts nothing about speed.
#[test]
fn transfer_bench_quick_runs() {
    // FERRY_BENCH_FULL=1 runs the full sizes (use with --release for real numbers).
    let full = std::env::var("FERRY_BENCH_FULL").is_ok_and(|v| v == "1");
    let ms =
        ferry_bench::transfer::run(!full).expect("transfer bench (needs scripts/build-minio.sh)");
    for m in &ms {
        eprintln!("{m}");
        assert!(m.ferry > 0.0 && m.baseline > 0.0, "{m:?}");
    }
    for case in [
        "direct-stream",
        "direct-pipe",
        "tls-ceiling",
        "link-1000mbit-stream",
        "s3-upload",
        "s3-download",
    ] {
        assert!(
            ms.iter().any(|m| m.case.contains(case)),
            "case {case} missing from {:?}",
            ms.iter().map(|m| &m.case).collect::<Vec<_>>()
        );
    }
}
