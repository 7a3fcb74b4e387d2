//! `kubectl drain` on real nodes with ferry's eviction webhook: Pods labelled
//! `ferry.dev/eviction-strategy` move instead of dying, the others are evicted as usual.
//!
//! First a Pod that must move (`LiveMigrate`) but cannot (it has a terminal): drain
//! waits and says why, the Pod runs on untouched; relabelled `None`, drain evicts it.
//! Then east-1 runs four Pods that must move (a VM, one container, three containers,
//! and one whose strategy comes from a MigrationPolicy), one that may
//! (`LiveMigrateIfPossible`) but cannot, and an unlabelled one: drain completes; the
//! four run elsewhere (east-2; the policy's to west-1 in the other cluster) with their
//! counts continued (at most two moved at once), the
//! other two were evicted.
use anyhow::{Context, Result, bail, ensure};
use ferry_controller::drain::{EVICTED_FROM_LABEL, guard};
use ferry_crds::{EVICTION_STRATEGY_LABEL, Migration, MigrationPolicy, Phase, Strategy};
use ferry_e2e::world::{World, WorldOptions, counter_pod, numbers, wait_for};
use ferry_testkit::guest::{
    first_count, last_count, launcher_image, sums, vm_pod_manifest, wait_count_above,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams, PostParams};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_moves_the_pods_that_ask_to_move() -> Result<()> {
    let _ = tracing_subscriber::fmt().with_env_filter("warn").try_init();
    let dir = tempfile::Builder::new()
        .prefix("ferry-e2e-drain-")
        .tempdir_in("/tmp")?;
    let opts = WorldOptions {
        images: vec![launcher_image()?],
        ..Default::default()
    };
    let mut w = World::start(dir.path(), opts).await?;
    w.start_controller();
    w.serve_eviction_webhook().await?;
    let r = scenarios(&mut w).await;
    if r.is_err() {
        eprintln!("logs kept in {}", dir.keep().display());
    }
    r
}

async fn scenarios(w: &mut World) -> Result<()> {
    let ns = "drain";
    w.namespace(ns).await?;
    only_the_apiserver_is_answered(w).context("who the webhook answers")?;
    eprintln!("scenario ok: the webhook answers only the apiserver's webhook client certificate");
    must_move_but_cannot(w, ns)
        .await
        .context("a LiveMigrate pod that cannot move")?;
    eprintln!("scenario ok: a pod that must move but cannot holds drain back, with the reason");
    no_target(w, "drain-homeless")
        .await
        .context("a LiveMigrate pod with no node to go to")?;
    eprintln!(
        "scenario ok: a pod that must move with no possible target holds drain back, with the reason"
    );
    outage(w, "drain-outage")
        .await
        .context("drain while no controller answers")?;
    eprintln!(
        "scenario ok: while no controller answers, drain evicts the others and waits for the pod that must move"
    );
    drain_moves_and_evicts(w, ns).await.context("drain")?;
    eprintln!("scenario ok: drain moves the pod that must move, evicts the others");
    Ok(())
}

/// The webhook's port answers only the apiserver's webhook client certificate: no
/// certificate, or another one from the same cluster CA (the apiserver's kubelet
/// client, `system:masters`), gets no HTTP answer; the right one does.
fn only_the_apiserver_is_answered(w: &World) -> Result<()> {
    let (addr, tls) = w.webhook_endpoint().context("no webhook")?;
    let pki = w.pki_dir("east")?;
    let url = format!("https://{addr}/validate-eviction");
    let curl = |cert: Option<&str>| -> Result<std::process::Output> {
        let mut c = std::process::Command::new("curl");
        c.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .arg("--cacert")
        .arg(tls.join("ca.crt"))
        .args([
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            "{}",
        ]);
        if let Some(name) = cert {
            c.arg("--cert")
                .arg(pki.join(format!("{name}.crt")))
                .arg("--key")
                .arg(pki.join(format!("{name}.key")));
        }
        Ok(c.arg(&url).output()?)
    };
    for who in [None, Some("kubelet-client")] {
        let out = curl(who)?;
        let code = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            !out.status.success() && code == "000",
            "{who:?} got an HTTP answer {code} from the webhook"
        );
    }
    let out = curl(Some("webhook-client"))?;
    let code = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success() && code != "000",
        "the apiserver's webhook client got no answer: {code} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn labelled(mut pod: serde_json::Value, strategy: &str) -> serde_json::Value {
    pod["metadata"]["labels"][EVICTION_STRATEGY_LABEL] = strategy.into();
    pod
}

/// A counter with a terminal attached (ferry moves only detached containers).
fn with_tty(mut pod: serde_json::Value) -> serde_json::Value {
    pod["spec"]["containers"][0]["tty"] = true.into();
    pod
}

/// `kubectl drain east-1` with `timeout`; its output, and whether it succeeded.
async fn drain(w: &World, timeout: &str) -> Result<(bool, String)> {
    let mut cmd = w.kubectl("east");
    cmd.args([
        "drain",
        "east-1",
        "--ignore-daemonsets",
        "--force",
        "--delete-emptydir-data",
        &format!("--timeout={timeout}"),
    ]);
    let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

async fn must_move_but_cannot(w: &World, ns: &str) -> Result<()> {
    let pod = labelled(
        with_tty(counter_pod("stuck", "east-1", &["app"])),
        "LiveMigrate",
    );
    w.create_pod(ns, pod).await?;
    let (ok, out) = drain(w, "20s").await?;
    ensure!(
        !ok,
        "drain succeeded with a pod that must move and cannot:\n{out}"
    );
    ensure!(
        out.contains("must migrate") && out.contains("terminal"),
        "drain did not say why it waits:\n{out}"
    );
    let pods: Api<Pod> = Api::namespaced(w.east.clone(), ns);
    let cs = w.container_statuses("east", ns, "stuck").await?;
    ensure!(
        cs.len() == 1
            && cs[0].restart_count == 0
            && cs[0].state.as_ref().is_some_and(|s| s.running.is_some()),
        "the pod that must move was touched: {cs:?}"
    );
    // What the refusal suggests: label it None, and drain evicts it.
    let out = w
        .kubectl("east")
        .args(["label", "pod", "stuck", "-n", ns, "--overwrite"])
        .arg(format!("{EVICTION_STRATEGY_LABEL}=None"))
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, out) = drain(w, "60s").await?;
    ensure!(ok, "drain after relabelling failed:\n{out}");
    ensure!(
        pods.get_opt("stuck").await?.is_none(),
        "the relabelled pod was not evicted"
    );
    uncordon(w)
}

/// Every other node of the cluster cordoned: the Migration drain starts finds no
/// target, drain waits and prints why, and the pod runs on untouched.
async fn no_target(w: &World, ns: &str) -> Result<()> {
    w.namespace(ns).await?;
    let cordon = |verb: &str| -> Result<()> {
        let out = w.kubectl("east").args([verb, "east-2"]).output()?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    cordon("cordon")?;
    w.create_pod(
        ns,
        labelled(counter_pod("homeless", "east-1", &["app"]), "LiveMigrate"),
    )
    .await?;
    // Time for the webhook's Migration to fail with NoTargetNode and for drain's retry
    // (every 5 s) to print it, on a busy machine.
    let (ok, out) = drain(w, "30s").await?;
    cordon("uncordon")?;
    ensure!(
        !ok,
        "drain succeeded with a pod that had nowhere to go:\n{out}"
    );
    ensure!(
        out.contains("NoTargetNode") && out.contains("no ready, schedulable node"),
        "drain did not say why it waits:\n{out}"
    );
    let cs = w.container_statuses("east", ns, "homeless").await?;
    ensure!(
        cs.len() == 1
            && cs[0].restart_count == 0
            && cs[0].state.as_ref().is_some_and(|s| s.running.is_some()),
        "the pod with nowhere to go was touched: {cs:?}"
    );
    w.check_runs_once_on(ns, "homeless", "east-1").await?;
    // Out of the way of the next drains.
    for m in drain_migrations(w, ns).await? {
        Api::<Migration>::namespaced(w.east.clone(), ns)
            .delete(&kube::ResourceExt::name_any(&m), &Default::default())
            .await?;
    }
    let pods: Api<Pod> = Api::namespaced(w.east.clone(), ns);
    pods.delete("homeless", &Default::default()).await?;
    wait_for(Duration::from_secs(60), "homeless to be gone", || async {
        Ok(pods.get_opt("homeless").await?.is_none())
    })
    .await?;
    uncordon(w)
}

fn uncordon(w: &World) -> Result<()> {
    let out = w.kubectl("east").args(["uncordon", "east-1"]).output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Three counters that must move (the per-node limit is 2: one waits), one that may
/// but cannot, one unlabelled.
async fn drain_moves_and_evicts(w: &World, ns: &str) -> Result<()> {
    const MOVERS: [&str; 4] = ["mover", "mover-b", "mover-c", "guest"];
    // A VM (TCG): booted first, it counts on its serial console and prints the
    // checksum of memory it never changes.
    let mut vm = labelled(vm_pod_manifest("guest", 256, &w.vm_root), "LiveMigrate");
    vm["spec"]["nodeSelector"] = serde_json::json!({"kubernetes.io/hostname": "east-1"});
    let guest = w.create_pod(ns, vm).await?;
    let serial_of =
        |uid: Option<String>| w.vm_root.join(uid.unwrap_or_default()).join("serial.log");
    let guest_before = wait_count_above(
        &serial_of(guest.metadata.uid.clone()),
        2,
        Duration::from_secs(120),
    )
    .await?;
    let guest_sum = sums(&serial_of(guest.metadata.uid.clone()))
        .first()
        .cloned()
        .context("the guest printed no memory checksum")?;
    // mover: one container; mover-b: three; mover-c asks through a MigrationPolicy,
    // not its label, and moves Cold to the other cluster as the policy says.
    w.create_pod(
        ns,
        labelled(counter_pod("mover", "east-1", &["app"]), "LiveMigrate"),
    )
    .await?;
    w.create_pod(
        ns,
        labelled(
            counter_pod("mover-b", "east-1", &["app", "side", "third"]),
            "LiveMigrate",
        ),
    )
    .await?;
    let policy: MigrationPolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "MigrationPolicy",
        "metadata": {"name": "drain-movers"},
        "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                 "podSelector": {"matchLabels": {"app": "mover-c"}},
                 "evictionStrategy": "LiveMigrate", "strategy": "Cold",
                 "drainTarget": {"cluster": "west", "node": "west-1"}},
    }))?;
    Api::<MigrationPolicy>::all(w.east.clone())
        .create(&PostParams::default(), &policy)
        .await?;
    w.create_pod(ns, counter_pod("mover-c", "east-1", &["app"]))
        .await?;
    w.create_pod(
        ns,
        labelled(
            with_tty(counter_pod("maybe", "east-1", &["app"])),
            "LiveMigrateIfPossible",
        ),
    )
    .await?;
    w.create_pod(ns, counter_pod("plain", "east-1", &["app"]))
        .await?;
    w.counting(ns, "mover", &["app"]).await?;
    w.counting(ns, "mover-b", &["app", "side", "third"]).await?;
    w.counting(ns, "mover-c", &["app"]).await?;
    let mut before = vec![];
    for name in MOVERS {
        before.push(if name == "guest" {
            guest_before
        } else {
            w.last_count("east", ns, name, "app")?
        });
    }
    let started = std::time::Instant::now();
    let (ok, out) = drain(w, "300s").await?;
    let took = started.elapsed();
    eprintln!("[drain] kubectl drain east-1 ({took:?}):\n{out}");
    ensure!(ok, "drain failed");
    // Each pod that must move did, through the Migration drain's eviction started.
    let migs = drain_migrations(w, ns).await?;
    ensure!(
        migs.len() == MOVERS.len(),
        "Migrations drain started: {}",
        migs.len()
    );
    for (name, before) in MOVERS.iter().zip(before) {
        let m = migs
            .iter()
            .find(|m| m.spec.workload.pod == *name)
            .with_context(|| format!("no Migration moved {name}"))?;
        // The eviction succeeds once the source Pod is removed, which Completing does
        // before it records Succeeded: drain may return in between.
        let m = &w
            .follow(
                ns,
                m.metadata.name.as_deref().unwrap_or_default(),
                Duration::from_secs(60),
                |_| {},
            )
            .await?;
        let settings = m.status.as_ref().and_then(|s| s.settings.clone());
        let (policy, strategy) = settings
            .map(|s| (s.policy, s.strategy))
            .context("no settings")?;
        if *name == "mover-c" {
            ensure!(
                policy.as_deref() == Some("drain-movers") && strategy == Strategy::Cold,
                "mover-c moved with policy {policy:?}, strategy {strategy:?}"
            );
        } else {
            ensure!(
                policy.is_none() && strategy == Strategy::Live,
                "{name} moved with policy {policy:?}"
            );
        }
        let containers: &[&str] = match *name {
            "mover-b" => &["app", "side", "third"],
            "guest" => &["compute"],
            _ => &["app"],
        };
        // The policy sends mover-c to the other cluster.
        let (cluster, node) = if *name == "mover-c" {
            ("west", "west-1")
        } else {
            ("east", "east-2")
        };
        let moved = moved_to(w, ns, m, node, containers).await?;
        if *name == "guest" {
            // The guest counts on from where it was, its memory intact: not rebooted.
            let uid = Api::<Pod>::namespaced(w.east.clone(), ns)
                .get(&moved)
                .await?
                .metadata
                .uid;
            let serial = serial_of(uid);
            let at_cut = last_count(&serial).unwrap_or(before);
            wait_count_above(&serial, at_cut, Duration::from_secs(60)).await?;
            let first = first_count(&serial).context("no count at the target")?;
            ensure!(
                first >= before,
                "the guest rebooted: first count {first} < {before}"
            );
            ensure!(
                sums(&serial).iter().all(|s| *s == guest_sum),
                "the guest's memory checksum changed"
            );
            continue;
        }
        for c in containers {
            let first = *numbers(&w.logs(cluster, ns, &moved, c)?)
                .first()
                .with_context(|| format!("{name}/{c}: the moved counter printed nothing"))?;
            ensure!(
                first > 1,
                "{name}/{c}: the moved counter restarted (its log starts at {first})"
            );
        }
        let first = *numbers(&w.logs(cluster, ns, &moved, "app")?)
            .first()
            .context("the moved counter printed nothing")?;
        ensure!(
            first > before,
            "{name}: the moved counter restarted: {first} after {before}"
        );
    }
    at_most_two_at_once(&migs)?;
    let sum: u64 = migs
        .iter()
        .filter_map(|m| m.status.as_ref()?.timings.as_ref()?.total_ms)
        .sum();
    eprintln!("[drain] drain took {took:?}; its migrations {sum} ms together");
    // The others were evicted as usual.
    let pods: Api<Pod> = Api::namespaced(w.east.clone(), ns);
    for name in MOVERS.iter().chain(&["maybe", "plain"]) {
        if pods.get_opt(name).await?.is_some() {
            bail!("pod {name} is still on the drained node");
        }
    }
    uncordon(w)
}

/// From their timestamps: never more than two of them past Pending at once (the
/// per-node limit), and all three existed before the first finished (else the limit
/// was never in the way and this shows nothing).
fn at_most_two_at_once(migs: &[Migration]) -> Result<()> {
    let mut spans = vec![];
    for m in migs {
        let t = m
            .status
            .as_ref()
            .and_then(|s| s.timings.clone())
            .unwrap_or_default();
        let at = |p: Phase| {
            t.phases
                .iter()
                .find(|x| x.phase == p)
                .and_then(|x| x.entered_at_ms)
        };
        let start = at(Phase::Preparing).context("never Preparing")?;
        let end = at(Phase::Succeeded).context("never Succeeded")?;
        let created = m
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|c| c.0.as_millisecond() as u64)
            .unwrap_or(0);
        spans.push((created, start, end));
    }
    let first_end = spans.iter().map(|s| s.2).min().unwrap_or(0);
    ensure!(
        spans.iter().all(|s| s.0 <= first_end),
        "the migrations did not overlap: {spans:?}"
    );
    for &(_, start, _) in &spans {
        let running = spans.iter().filter(|s| s.1 <= start && start < s.2).count();
        ensure!(running <= 2, "{running} ran at once: {spans:?}");
    }
    Ok(())
}

/// While no controller answers the webhook (failure policy Ignore), drain evicts the
/// Pods ferry does not manage and waits on the one that must move, which the
/// disruption budget the controller keeps for it protects; once the controller answers
/// again, the next drain moves it.
async fn outage(w: &mut World, ns: &str) -> Result<()> {
    w.namespace(ns).await?;
    w.create_pod(
        ns,
        labelled(counter_pod("guarded", "east-1", &["app"]), "LiveMigrate"),
    )
    .await?;
    w.create_pod(ns, counter_pod("other", "east-1", &["app"]))
        .await?;
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(w.east.clone(), ns);
    wait_for(
        Duration::from_secs(30),
        "the must-migrate budget",
        || async { Ok(budgets.get_opt(guard::BUDGET).await?.is_some()) },
    )
    .await?;
    w.stop_eviction_webhook();
    let (ok, out) = drain(w, "20s").await?;
    ensure!(!ok, "drain succeeded while no controller answered:\n{out}");
    ensure!(
        out.contains("disruption budget"),
        "drain did not wait on the budget:\n{out}"
    );
    let pods: Api<Pod> = Api::namespaced(w.east.clone(), ns);
    ensure!(
        pods.get_opt("other").await?.is_none(),
        "the unmanaged pod was not evicted"
    );
    let cs = w.container_statuses("east", ns, "guarded").await?;
    ensure!(
        cs.len() == 1 && cs[0].restart_count == 0,
        "the pod that must move was touched: {cs:?}"
    );
    let migs: Api<Migration> = Api::namespaced(w.east.clone(), ns);
    ensure!(
        migs.list(&ListParams::default()).await?.items.is_empty(),
        "a Migration started without the webhook"
    );
    w.restart_eviction_webhook().await?;
    let before = w.last_count("east", ns, "guarded", "app")?;
    let (ok, out) = drain(w, "240s").await?;
    ensure!(ok, "drain after the outage failed:\n{out}");
    let moved = moved_by_drain(w, ns, "guarded").await?;
    let first = *numbers(&w.logs("east", ns, &moved, "app")?)
        .first()
        .context("the moved counter printed nothing")?;
    ensure!(
        first > before,
        "the moved counter restarted: {first} after {before}"
    );
    uncordon(w)
}

/// The Migrations drain started in `ns` (labelled with the drained node).
async fn drain_migrations(w: &World, ns: &str) -> Result<Vec<Migration>> {
    let migs: Api<Migration> = Api::namespaced(w.east.clone(), ns);
    Ok(migs
        .list(&ListParams::default().labels(&format!("{EVICTED_FROM_LABEL}=east-1")))
        .await?
        .items)
}

/// The one Migration drain started in `ns`: it moved `pod` to east-2; returns the
/// target Pod's name.
async fn moved_by_drain(w: &World, ns: &str, pod: &str) -> Result<String> {
    let started = drain_migrations(w, ns).await?;
    ensure!(
        started.len() == 1,
        "Migrations drain started: {}",
        started.len()
    );
    ensure!(
        started[0].spec.workload.pod == pod,
        "moved {}",
        started[0].spec.workload.pod
    );
    moved_to(w, ns, &started[0], "east-2", &["app"]).await
}

/// `m` Succeeded, its Pod's one copy runs on east-2 and its source Pod is gone;
/// returns the target Pod's name.
/// `m` moved its Pod to `node`: one copy of each of `containers` runs there, the
/// source Pod is gone.
async fn moved_to(
    w: &World,
    ns: &str,
    m: &Migration,
    node: &str,
    containers: &[&str],
) -> Result<String> {
    let s = m.status.clone().unwrap_or_default();
    ensure!(
        s.phase == Some(Phase::Succeeded),
        "{:?}: {:?}",
        s.phase,
        s.failure
    );
    let target = s.target.context("no target")?;
    ensure!(target.node == node, "moved to {}, not {node}", target.node);
    let mut copies = w.running_copies(ns, &target.pod)?;
    copies.sort();
    let mut want: Vec<_> = containers
        .iter()
        .map(|c| (node.to_string(), c.to_string()))
        .collect();
    want.sort();
    ensure!(copies == want, "copies of {}: {copies:?}", target.pod);
    let pods: Api<Pod> = Api::namespaced(w.east.clone(), ns);
    let pod = &m.spec.workload.pod;
    ensure!(
        pods.get_opt(pod).await?.is_none(),
        "the source pod {pod} remains"
    );
    Ok(target.pod)
}
