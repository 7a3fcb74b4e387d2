//! `ferry-bench`: runs benchmark suites, each case beside its same-run baseline, and
//! prints a table (and JSON with `--json FILE`). Build with `--release` for numbers.
use clap::{Parser, ValueEnum};
use ferry_bench::Measurement;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Suite {
    /// Direct streams vs raw TCP, S3 vs plain MinIO PUT/GET.
    Transfer,
    /// VM migration through ferry vs raw QEMU-to-QEMU migration.
    Vm,
    /// Container migration through the controller on real nodes vs raw runc + CRIU.
    Containers,
}

#[derive(Parser)]
#[command(
    about = "ferry benchmarks: downtime, total time and throughput against same-run baselines"
)]
struct Args {
    /// Suites to run (default: all).
    #[arg(value_enum)]
    suites: Vec<Suite>,
    /// Small sizes and one repetition: checks that every case runs.
    #[arg(long)]
    quick: bool,
    /// Migrations of each size on each path in the VM suite (default: 1 with --quick,
    /// else 3); its p95 rows need 10 or more to mean a p95. The other suites ignore it.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    vm_runs: Option<u16>,
    /// Pod sizes (MiB) for the containers suite, repeatable (default: 64 with --quick,
    /// else 64 and 1024). The other suites ignore it.
    #[arg(long = "container-mib", value_parser = clap::value_parser!(u64).range(1..))]
    container_mib: Vec<u64>,
    /// Runs of the containers suite's Service case, each a gated and an ungated move
    /// (default: 1 with --quick, else 2). The other suites ignore it.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    service_runs: Option<u16>,
    /// Also write the measurements as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Also draw the measurements (SVG and PNG) into this directory.
    #[arg(long)]
    plots: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    let args = Args::parse();
    let suites = if args.suites.is_empty() {
        vec![Suite::Transfer, Suite::Vm, Suite::Containers]
    } else {
        args.suites
    };
    let mut all: Vec<Measurement> = vec![];
    let mut failed = vec![];
    for suite in suites {
        eprintln!("== {suite:?}");
        let result = match suite {
            Suite::Transfer => ferry_bench::transfer::run(args.quick),
            Suite::Vm => ferry_bench::vm::run(args.quick, args.vm_runs.map(usize::from)),
            Suite::Containers => ferry_bench::containers::run(
                args.quick,
                &args.container_mib,
                args.service_runs.map(usize::from),
            ),
        };
        match result {
            Ok(ms) => all.extend(ms),
            Err(e) => {
                eprintln!("{suite:?} failed: {e:#}");
                failed.push(suite);
            }
        }
    }
    println!(
        "{:<40} {:<22} {:>12} {:>12} {:>7}  baseline",
        "case", "metric", "ferry", "baseline", "ratio"
    );
    for m in &all {
        println!(
            "{:<40} {:<22} {:>12.1} {:>12.1} {:>7.2}  {}",
            m.case,
            m.metric,
            m.ferry,
            m.baseline,
            m.ratio(),
            m.baseline_name
        );
    }
    // Where a container migration's downtime went, when the controller reports steps.
    let steps = ferry_bench::containers::step_breakdown(&all);
    if !steps.is_empty() {
        println!();
        print!("{steps}");
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&all)?)?;
    }
    if let Some(dir) = &args.plots {
        for f in ferry_bench::plot::write_all(&all, dir)? {
            eprintln!("wrote {}", f.display());
        }
    }
    if !failed.is_empty() {
        anyhow::bail!("suites failed: {failed:?}");
    }
    Ok(())
}
