//! `ferry-demo`: two local clusters of real nodes (kubelet + containerd in network
//! namespaces), ferry's controller and node daemons, a container and a VM migrated
//! between the clusters, the measured downtimes printed. Run by `scripts/demo.sh`.
use anyhow::{Context, Result, bail};
use clap::Parser;
use ferry_crds::{Migration, Phase};
use ferry_e2e::world::{World, WorldOptions, counter_pod, numbers};
use ferry_testkit::guest::{last_count, launcher_image, vm_pod_manifest, wait_count_above};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const NS: &str = "demo";

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

fn say(msg: impl AsRef<str>) {
    println!("\x1b[1m[ferry demo]\x1b[0m {}", msg.as_ref());
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

fn ms(m: &Migration, f: impl Fn(&ferry_crds::Timings) -> Option<u64>) -> String {
    m.status
        .as_ref()
        .and_then(|s| s.timings.as_ref())
        .and_then(f)
        .map(|d| format!("{d} ms"))
        .unwrap_or_else(|| "n/a".into())
}

async fn migrate(w: &World, name: &str, pod: &str, strategy: &str) -> Result<Migration> {
    let yaml = format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata: {{name: {name}}}\nspec:\n  workload: {{pod: {pod}}}\n  target: {{cluster: west, node: west-1}}\n  strategy: {strategy}\n"
    );
    w.apply_migration(NS, &yaml).await?;
    let m = w
        .follow(
            NS,
            name,
            Duration::from_secs(240),
            print_phase(Instant::now()),
        )
        .await?;
    let s = m.status.clone().unwrap_or_default();
    if s.phase != Some(Phase::Succeeded) {
        bail!("migration {name} ended {:?}: {:?}", s.phase, s.failure);
    }
    Ok(m)
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
        "starting clusters east and west, each: etcd, kube-apiserver, controller-manager, scheduler, and 2 nodes (kubelet + containerd + ferry-node)",
    );
    let opts = WorldOptions {
        images: vec![launcher_image()?],
        ..Default::default()
    };
    let mut w = World::start(&args.dir, opts)
        .await
        .context("setting up the clusters")?;
    w.start_controller();
    w.namespace(NS).await?;

    say("kubectl apply: pod demo/counter on east-1 (busybox, counts every 50 ms)");
    w.create_pod(NS, counter_pod("counter", "east-1", &["app"]))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    say("applying Migration counter: pod counter → cluster west, node west-1 (CRIU, cold)");
    let done = migrate(&w, "counter", "counter", "Cold").await?;
    let first = numbers(&w.logs("west", NS, "counter", "app")?)
        .first()
        .copied()
        .unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let now = w.last_count("west", NS, "counter", "app")?;
    say(format!(
        "`kubectl logs` at west-1: the restored container went on from {first} (its source printed {}), now {now}; restarts: 0",
        first.saturating_sub(1)
    ));

    let mut manifest = vm_pod_manifest("guest", 256, &w.vm_root);
    manifest["spec"]["nodeSelector"] = serde_json::json!({"kubernetes.io/hostname": "east-1"});
    let pod = w.create_pod(NS, manifest).await?;
    let src_serial = w
        .vm_root
        .join(pod.metadata.uid.unwrap_or_default())
        .join("serial.log");
    let before = wait_count_above(&src_serial, 1, Duration::from_secs(120)).await?;
    say(format!(
        "pod demo/guest runs a 256 MiB QEMU guest (TCG) under ferry-launcher on east-1; its counter is at {before}"
    ));
    say(
        "applying Migration guest: pod guest → cluster west, node west-1 (QEMU live migration over the daemons' mutual-TLS pipe)",
    );
    let vm_done = migrate(&w, "guest", "guest", "Live").await?;
    let target = Api::<Pod>::namespaced(w.west.clone(), NS)
        .get("guest")
        .await?;
    let dst_serial = w
        .vm_root
        .join(target.metadata.uid.unwrap_or_default())
        .join("serial.log");
    let vm_now = wait_count_above(
        &dst_serial,
        last_count(&dst_serial).unwrap_or(before),
        Duration::from_secs(60),
    )
    .await?;
    say(format!(
        "the guest counted {before} on east-1 and counts on at west-1 without rebooting: now {vm_now}"
    ));

    println!(
        "\n$ kubectl --kubeconfig {} -n {NS} get migrations -o wide",
        w.env.cluster("east").kubeconfig.display()
    );
    let out = w
        .kubectl("east")
        .args(["-n", NS, "get", "migrations", "-o", "wide"])
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!(
        "\n$ kubectl --kubeconfig {} -n {NS} get pods -o wide",
        w.env.cluster("west").kubeconfig.display()
    );
    let out = w
        .kubectl("west")
        .args(["-n", NS, "get", "pods", "-o", "wide"])
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!();
    say("measured by the node daemons:");
    println!(
        "  container (CRIU, cold) east-1 → west-1: downtime {}, total {}",
        ms(&done, |t| t.downtime_ms),
        ms(&done, |t| t.total_ms)
    );
    println!(
        "  VM (QEMU live migration, 256 MiB guest) east-1 → west-1: downtime {}, total {}",
        ms(&vm_done, |t| t.downtime_ms),
        ms(&vm_done, |t| t.total_ms)
    );
    if args.keep {
        say(format!(
            "clusters stay up; try: kubectl --kubeconfig {} -n {NS} get pods -o wide   (Ctrl-C ends)",
            w.env.cluster("west").kubeconfig.display()
        ));
        tokio::signal::ctrl_c().await?;
    }
    if first <= 1 || now <= first || vm_now <= before {
        bail!("the demo workloads did not continue at the target");
    }
    Ok(())
}
