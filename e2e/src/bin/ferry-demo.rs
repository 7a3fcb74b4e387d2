//! `ferry-demo`: two local clusters of real nodes (kubelet + containerd in network
//! namespaces), ferry installed in each with its Helm chart from images built here,
//! the clusters linked with `kubectl ferry link`, a container and a VM migrated between
//! them with `kubectl ferry migrate`, the measured downtimes printed. Run by
//! `scripts/demo.sh`.
use anyhow::{Context, Result, bail};
use clap::Parser;
use ferry_e2e::installed::{Installed, NS as FERRY_NS, wait_until};
use ferry_e2e::world::{counter_pod, numbers};
use ferry_testkit::guest::{last_count, launcher_image, vm_pod_manifest};
use std::path::{Path, PathBuf};
use std::time::Duration;

const NS: &str = "demo";

#[derive(Parser)]
#[command(
    about = "Run ferry's local demo: two clusters with ferry installed by helm, one container migration and one VM migration"
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

/// Prints `$ kubectl --kubeconfig K ARGS` and what it printed.
fn show(w: &Installed, cluster: &str, args: &[&str]) -> Result<()> {
    println!(
        "\n$ kubectl --kubeconfig {} {}",
        w.env.cluster(cluster).kubeconfig.display(),
        args.join(" ")
    );
    print!("{}", w.kubectl(cluster, args)?);
    Ok(())
}

fn apply(w: &Installed, dir: &Path, manifest: serde_json::Value) -> Result<()> {
    let f = dir.join("manifest.json");
    std::fs::write(&f, manifest.to_string())?;
    w.kubectl("east", &["apply", "-f", &f.to_string_lossy()])?;
    Ok(())
}

fn migrate(w: &Installed, args: &[&str]) -> Result<()> {
    println!(
        "\n$ kubectl ferry -n {NS} migrate {} --wait",
        args.join(" ")
    );
    print!("{}", w.migrate(NS, args)?);
    Ok(())
}

/// A Migration's measured downtime and total, as the daemons and controller wrote them.
fn timings(w: &Installed, name: &str) -> Result<String> {
    let t = w.kubectl(
        "east",
        &[
            "get",
            "migration",
            "-n",
            NS,
            name,
            "-o",
            "jsonpath=downtime {.status.timings.downtimeMs} ms, total {.status.timings.totalMs} ms",
        ],
    )?;
    Ok(t)
}

fn counter_logs(w: &Installed, cluster: &str) -> Result<Vec<u64>> {
    Ok(numbers(&w.kubectl(
        cluster,
        &["logs", "-n", NS, "counter", "-c", "app"],
    )?))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    ferry_testkit::install_crypto_provider();
    let args = Args::parse();
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(args.dir.join("n"))
        .stderr(std::process::Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir)?;
    say(
        "starting clusters east and west, each: etcd, kube-apiserver, controller-manager, scheduler, and 2 nodes (kubelet + containerd); building ferry's images",
    );
    say(
        "in each cluster: helm install ferry helm/ferry -n ferry-system (one cluster set: the same ferry-ca); then kubectl ferry link west --home east",
    );
    let w = Installed::start_cluster_set(
        &args.dir,
        &[
            ("east", &["east-1", "east-2"]),
            ("west", &["west-1", "west-2"]),
        ],
        &[launcher_image()?],
    )
    .context("setting up the clusters")?;
    show(&w, "east", &["-n", FERRY_NS, "get", "pods", "-o", "wide"])?;
    for c in ["east", "west"] {
        w.kubectl(c, &["create", "namespace", NS])?;
    }

    say("kubectl apply: pod demo/counter on east-1 (busybox, counts every 50 ms)");
    let mut pod = counter_pod("counter", "east-1", &["app"]);
    pod["apiVersion"] = "v1".into();
    pod["kind"] = "Pod".into();
    pod["metadata"]["namespace"] = NS.into();
    apply(&w, &args.dir, pod)?;
    wait_until(
        Duration::from_secs(60),
        "the counter to count",
        || Ok(counter_logs(&w, "east").map(|n| n.len()).unwrap_or(0) > 20),
        String::new,
    )?;
    say("migrating pod counter → cluster west, node west-1 (CRIU, cold)");
    migrate(
        &w,
        &[
            "counter",
            "--to",
            "west/west-1",
            "--cold",
            "--name",
            "counter",
        ],
    )?;
    let first = counter_logs(&w, "west")?.first().copied().unwrap_or(0);
    std::thread::sleep(Duration::from_secs(1));
    let now = counter_logs(&w, "west")?.last().copied().unwrap_or(0);
    say(format!(
        "`kubectl logs` at west-1: the restored container went on from {first} (its source printed {}), now {now}; restarts: 0",
        first.saturating_sub(1)
    ));

    let mut manifest = vm_pod_manifest("guest", 256, &w.vm_root());
    manifest["metadata"]["namespace"] = NS.into();
    manifest["spec"]["nodeSelector"] = serde_json::json!({"kubernetes.io/hostname": "east-1"});
    apply(&w, &args.dir, manifest)?;
    let src = w.vm_serial("east", NS, "guest")?;
    wait_until(
        Duration::from_secs(180),
        "the guest to count",
        || Ok(last_count(&src).unwrap_or(0) > 1),
        String::new,
    )?;
    let before = last_count(&src).unwrap_or(0);
    say(format!(
        "pod demo/guest runs a 256 MiB QEMU guest (TCG) under ferry-launcher on east-1; its counter is at {before}"
    ));
    say(
        "migrating pod guest → cluster west, node west-1 (QEMU live migration over the daemons' mutual-TLS pipe)",
    );
    migrate(
        &w,
        &["guest", "--to", "west/west-1", "--live", "--name", "guest"],
    )?;
    let dst = w.vm_serial("west", NS, "guest")?;
    let at = last_count(&dst).unwrap_or(before);
    wait_until(
        Duration::from_secs(60),
        "the moved guest to count on",
        || Ok(last_count(&dst).unwrap_or(0) > at),
        String::new,
    )?;
    let vm_now = last_count(&dst).unwrap_or(0);
    say(format!(
        "the guest counted {before} on east-1 and counts on at west-1 without rebooting: now {vm_now}"
    ));

    show(&w, "east", &["-n", NS, "get", "migrations", "-o", "wide"])?;
    show(&w, "west", &["-n", NS, "get", "pods", "-o", "wide"])?;
    println!();
    say("measured by the node daemons:");
    println!(
        "  container (CRIU, cold) east-1 → west-1: {}",
        timings(&w, "counter")?
    );
    println!(
        "  VM (QEMU live migration, 256 MiB guest) east-1 → west-1: {}",
        timings(&w, "guest")?
    );
    if args.keep {
        say(format!(
            "clusters stay up; try: kubectl --kubeconfig {} -n {NS} get pods -o wide   (Ctrl-C ends)",
            w.env.cluster("west").kubeconfig.display()
        ));
        let (tx, rx) = std::sync::mpsc::channel();
        ctrlc_wait(tx);
        let _ = rx.recv();
    }
    if first <= 1 || now <= first || vm_now <= before {
        bail!("the demo workloads did not continue at the target");
    }
    Ok(())
}

/// Sends on `tx` at SIGINT.
fn ctrlc_wait(tx: std::sync::mpsc::Sender<()>) {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
        let _ = tx.send(());
    });
}
