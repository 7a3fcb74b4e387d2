//! `ferry-demo`: two local clusters, ferry's controller and node daemons, and live
//! migrations between them with the measured downtime printed. Run by `scripts/demo.sh`.
use anyhow::{Context, Result};
use clap::Parser;
use ferry_crds::Migration;
use ferry_e2e::world::{NAMESPACE, World, counter_lines};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    about = "Run ferry's local demo: two clusters, one container migration and one VM migration"
)]
struct Args {
    /// Where cluster state, kubeconfigs and node state go.
    #[arg(long, default_value = "/tmp/ferry-demo")]
    dir: PathBuf,
    /// Keep everything running afterwards (until Ctrl-C) to look around with kubectl.
    #[arg(long)]
    keep: bool,
}

const COUNTER: &str = "exec >/dev/null 2>/dev/null </dev/null; exec 3>/data/count.log; \
     i=0; while true; do i=$((i+1)); echo $i >&3; usleep 50000; done";

fn say(msg: impl AsRef<str>) {
    println!("\x1b[1m[ferry demo]\x1b[0m {}", msg.as_ref());
}

fn last_count(path: &std::path::Path) -> u64 {
    counter_lines(path).last().copied().unwrap_or(0)
}

fn print_phase(started: Instant) -> impl FnMut(&Migration) {
    move |m: &Migration| {
        let s = m.status.clone().unwrap_or_default();
        let phase = s.phase.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        let progress = s.progress.map(|p| p.display).unwrap_or_default();
        println!(
            "  {:>6.2}s  {phase:<14} {progress}",
            started.elapsed().as_secs_f64()
        );
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    let args = Args::parse();
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir)?;

    say(
        "starting two Kubernetes control planes: east and west (etcd, kube-apiserver, controller-manager, scheduler)",
    );
    let mut world = World::start(&args.dir)
        .await
        .context("setting up the clusters")?;
    for n in &world.nodes {
        say(format!(
            "node {}/{} at {} runs ferry-node ({})",
            n.cluster,
            n.name,
            n.daemon.node.ip(),
            n.daemon.endpoint
        ));
    }
    say("cluster west is linked to east by a kubeconfig Secret (ferry.dev/cluster=west)");
    world.start_controller();
    say("ferry-controller runs for east (leader election, gRPC to the daemons)");

    // 1. A container: a counter that keeps its count in memory and in an open file.
    world.container_pod("counter", COUNTER).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    say("pod demo/counter runs a runc container on east-1, counting 20 times a second");
    let yaml = "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata: {name: counter}\nspec:\n  workload: {pod: counter}\n  target: {cluster: west, node: west-1}\n  strategy: Cold\n";
    say("applying Migration counter: pod counter → cluster west, node west-1 (CRIU, cold)");
    println!("{}", indent(yaml));
    let m = world.apply_migration(yaml).await?;
    let done = world
        .follow(
            "counter",
            Duration::from_secs(120),
            print_phase(Instant::now()),
        )
        .await?;
    let status = done.status.clone().unwrap_or_default();
    if let Some(f) = &status.failure {
        say(format!(
            "migration ended {:?}: {}: {}",
            status.phase, f.reason, f.message
        ));
    }
    let at_cut = last_count(&world.bundle_dir("counter").join("rootfs/data/count.log"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let uid = m.metadata.uid.clone().unwrap_or_default();
    let now = last_count(
        &world
            .node("west-1")
            .daemon
            .state_dir
            .join(&uid)
            .join("app/rootfs/data/count.log"),
    );
    say(format!(
        "counter stopped at {at_cut} on east-1 and counts on at west-1: now {now}"
    ));

    // 2. A VM: QEMU run by ferry-launcher, live-migrated over QMP.
    let (_, guest) = world.vm_pod("guest", 256).await?;
    let vm_before = ferry_testkit::guest::last_count(&guest.serial()).unwrap_or(0);
    say(format!(
        "pod demo/guest runs a 256 MiB QEMU guest (TCG) on east-1 via ferry-launcher; its counter is at {vm_before}"
    ));
    let vm_yaml = "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata: {name: guest}\nspec:\n  workload: {pod: guest}\n  target: {cluster: west, node: west-1}\n  strategy: Live\n";
    say(
        "applying Migration guest: pod guest → cluster west, node west-1 (QEMU live migration over the daemons' mTLS pipe)",
    );
    println!("{}", indent(vm_yaml));
    world.apply_migration(vm_yaml).await?;
    let vm_done = world
        .follow(
            "guest",
            Duration::from_secs(180),
            print_phase(Instant::now()),
        )
        .await?;
    let vm_status = vm_done.status.clone().unwrap_or_default();
    if let Some(f) = &vm_status.failure {
        say(format!(
            "migration ended {:?}: {}: {}",
            vm_status.phase, f.reason, f.message
        ));
    }
    let vm_serial = world.vm_serial("west-1", "guest");
    let vm_now =
        ferry_testkit::guest::wait_count_above(&vm_serial, vm_before, Duration::from_secs(30))
            .await
            .unwrap_or(0);
    say(format!(
        "the guest counted {vm_before} on east-1 and counts on at west-1 without rebooting: now {vm_now}"
    ));

    println!(
        "\n$ kubectl --kubeconfig {} -n {NAMESPACE} get migrations -o wide",
        world.env.cluster("east").kubeconfig.display()
    );
    let out = world
        .env
        .kubectl("east")
        .args(["-n", NAMESPACE, "get", "migrations", "-o", "wide"])
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!();
    let downtime = |m: &Migration| {
        m.status
            .as_ref()
            .and_then(|s| s.timings.as_ref())
            .and_then(|t| t.downtime_ms)
            .map(|d| format!("{d} ms"))
            .unwrap_or("n/a".into())
    };
    let total = |m: &Migration| {
        m.status
            .as_ref()
            .and_then(|s| s.timings.as_ref())
            .and_then(|t| t.total_ms)
            .map(|d| format!("{d} ms"))
            .unwrap_or("n/a".into())
    };
    say("measured by the node daemons:");
    println!(
        "  container (runc + CRIU, cold) east-1 → west-1: downtime {}, total {}",
        downtime(&done),
        total(&done)
    );
    println!(
        "  VM (QEMU live migration, 256 MiB guest) east-1 → west-1: downtime {}, total {}",
        downtime(&vm_done),
        total(&vm_done)
    );

    if args.keep {
        say(format!(
            "clusters stay up; try: kubectl --kubeconfig {} -n {NAMESPACE} describe migration counter   (Ctrl-C ends)",
            world.env.cluster("east").kubeconfig.display()
        ));
        tokio::signal::ctrl_c().await?;
    }
    let ok = status.phase == Some(ferry_crds::Phase::Succeeded)
        && now > at_cut
        && vm_status.phase == Some(ferry_crds::Phase::Succeeded)
        && vm_now > vm_before;
    drop(world);
    if !ok {
        anyhow::bail!("the demo migration did not succeed");
    }
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
