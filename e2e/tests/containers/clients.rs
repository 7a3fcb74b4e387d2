//! What a workload's clients meet while it moves: a connection waiting in a frozen
//! listener's accept queue, and ferry's readiness gate (`ferry.dev/serving`), which takes
//! a frozen source out of its Service's endpoints and puts the target in.
use super::{migration, run, target_pod};
use anyhow::{Context, Result, ensure};
use ferry_e2e::world::{World, counter_pod, rolled_back, succeeded, wait_for};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A static program that listens on 8080 and never accepts: a connection made to it
/// waits, handshake done, in the accept queue, as one made to a frozen server does.
const LISTEN_C: &str = r#"
#include <netinet/in.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>
int main(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(8080)};
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 8)) { perror("listen"); return 1; }
    printf("listening\n");
    fflush(stdout);
    for (;;) pause();
}
"#;
const LISTENER_IMAGE: &str = "docker.io/library/listener:ferry";

/// The image of [`LISTEN_C`], built under `dir`.
pub(super) fn listener_image(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let bin = ferry_testkit::oci::static_binary(dir, "listen", LISTEN_C)?;
    let image = dir.join("listener.tar");
    let mut b = ferry_testkit::oci::ImageBuilder::new(LISTENER_IMAGE);
    b.file(&bin, "/listen", 0o755).entrypoint(&["/listen"]);
    b.write(&image)?;
    Ok(image)
}

/// A listener with a connection waiting in its accept queue at the freeze, as a client
/// that connects while a server is frozen leaves it. CRIU cannot move such a
/// connection and fails the dump unless told to skip it. The Pod moves Cold within
/// east, once, and its listener takes connections at the new pod IP.
pub(super) async fn queued_connection(w: &World) -> Result<()> {
    let ns = "queued-conn";
    let pod = serde_json::json!({
        "metadata": {"name": "listener"},
        "spec": {"nodeSelector": {"kubernetes.io/hostname": "east-1"},
                 "terminationGracePeriodSeconds": 2,
                 "containers": [{"name": "app", "image": LISTENER_IMAGE,
                                 "imagePullPolicy": "Never"}]}
    });
    w.create_pod(ns, pod).await?;
    wait_for(
        Duration::from_secs(30),
        "the listener to listen",
        || async { Ok(w.logs("east", ns, "listener", "app")?.contains("listening")) },
    )
    .await?;
    let listener = |ip: String| -> Result<std::net::TcpStream> {
        let addr: std::net::SocketAddr = format!("{ip}:8080").parse()?;
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to the listener at {addr}"))
    };
    // Held open through the move: it stays in the source's accept queue.
    let _queued = listener(pod_ip(w, ns, "listener").await?)?;
    let m = run(
        w,
        ns,
        "m",
        &migration("m", "listener", "{node: east-2}", "Cold"),
    )
    .await?;
    succeeded(&m)?;
    let target = target_pod(&m);
    wait_for(
        Duration::from_secs(30),
        "the source's container to be gone",
        || async { Ok(w.running_copies(ns, "listener")?.is_empty()) },
    )
    .await?;
    let copies = w.running_copies(ns, &target)?;
    ensure!(
        copies == [("east-2".to_string(), "app".to_string())],
        "running copies: {copies:?}"
    );
    listener(pod_ip(w, ns, &target).await?).context("the restored listener")?;
    Ok(())
}

async fn pod_ip(w: &World, ns: &str, pod: &str) -> Result<String> {
    Api::<Pod>::namespaced(w.east.clone(), ns)
        .get(pod)
        .await?
        .status
        .and_then(|s| s.pod_ip)
        .with_context(|| format!("{ns}/{pod} has no IP"))
}

/// ferry's readiness gate on a Pod manifest.
fn gated(mut pod: serde_json::Value) -> serde_json::Value {
    pod["spec"]["readinessGates"] = serde_json::json!([{"conditionType": GATE}]);
    pod
}

const GATE: &str = ferry_crds::SERVING_CONDITION;

/// A condition's status and reason, if the Pod has it.
fn condition(pod: &Pod, kind: &str) -> Option<(String, String)> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| (c.status.clone(), c.reason.clone().unwrap_or_default()))
}

/// Waits until `pod` (in `cluster`) is Ready with the gate True for `reason`.
async fn ready_by_gate(w: &World, cluster: &str, ns: &str, pod: &str, reason: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(w.client(cluster).clone(), ns);
    let want = ("True".to_string(), reason.to_string());
    let seen = std::cell::RefCell::new(None);
    let waited = wait_for(
        Duration::from_secs(30),
        &format!("{cluster} {ns}/{pod} to be Ready with {GATE} True ({reason})"),
        || async {
            let p = pods.get(pod).await?;
            let ready = condition(&p, "Ready").is_some_and(|(s, _)| s == "True");
            let gate = condition(&p, GATE);
            let done = ready && gate.as_ref() == Some(&want);
            *seen.borrow_mut() = gate;
            Ok(done)
        },
    )
    .await;
    waited.with_context(|| format!("{GATE} was {:?}", seen.borrow()))
}

/// Every state a Service's endpoints were seen in: (Pod UID, ready, terminating).
#[derive(Default, Clone)]
struct Seen(Arc<Mutex<Vec<(String, bool, bool)>>>);

impl Seen {
    /// Watches the EndpointSlices of Service `service` until the task is aborted.
    fn watch(api: Api<EndpointSlice>, service: &str) -> (Seen, tokio::task::JoinHandle<()>) {
        let seen = Seen::default();
        let s = seen.clone();
        let cfg =
            watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
        let task = tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher(api, cfg));
            while let Some(event) = events.next().await {
                let Ok(watcher::Event::Apply(slice) | watcher::Event::InitApply(slice)) = event
                else {
                    continue;
                };
                let mut s = s.0.lock().unwrap();
                for e in &slice.endpoints {
                    let uid = e.target_ref.as_ref().and_then(|r| r.uid.clone());
                    let c = e.conditions.clone().unwrap_or_default();
                    s.push((
                        uid.unwrap_or_default(),
                        c.ready == Some(true),
                        c.terminating == Some(true),
                    ));
                }
            }
        });
        (seen, task)
    }

    fn any(&self, f: impl Fn(&(String, bool, bool)) -> bool) -> bool {
        self.0.lock().unwrap().iter().any(f)
    }

    /// Whether Pod `uid` was seen not ready and not terminating after it was seen ready.
    fn left_while_alive(&self, uid: &str) -> bool {
        let seen = self.0.lock().unwrap();
        let mut mine = seen.iter().filter(|(u, _, _)| u == uid);
        mine.any(|(_, ready, _)| *ready) && mine.any(|(_, ready, term)| !ready && !term)
    }
}

/// A gated Pod behind a Service moves Cold within east. ferry makes it Ready (the gate
/// had no value), takes it out of the Service's ready endpoints while it is frozen and
/// still exists (not ready and not terminating: the gate, not the deletion, did it),
/// and the target joins the Service, Ready through its own gate.
pub(super) async fn gated_service(w: &World) -> Result<()> {
    let ns = "serving";
    let mut pod = gated(serde_json::json!({
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {"nodeSelector": {"kubernetes.io/hostname": "east-1"},
                 "terminationGracePeriodSeconds": 2,
                 "containers": [{"name": "app", "image": LISTENER_IMAGE,
                                 "imagePullPolicy": "Never"}]}
    }));
    pod["spec"]["containers"][0]["ports"] = serde_json::json!([{"containerPort": 8080}]);
    let source = w.create_pod(ns, pod).await?;
    let source_uid = source.uid().context("the source Pod's UID")?;
    ready_by_gate(w, "east", ns, "web", "NotMigrating").await?;
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}
    }))?;
    Api::<Service>::namespaced(w.east.clone(), ns)
        .create(&PostParams::default(), &svc)
        .await?;
    let (seen, task) = Seen::watch(Api::namespaced(w.east.clone(), ns), "web");
    wait_for(
        Duration::from_secs(30),
        "the source to be a ready endpoint of its Service",
        || async { Ok(seen.any(|(uid, ready, _)| *uid == source_uid && *ready)) },
    )
    .await?;
    // Capped, the freeze lasts seconds (what the listener holds crosses at 1 MiB/s), so
    // the EndpointSlice controller of a busy machine cannot fold the gate's update into
    // the deletion's: the window this test looks into is not a race.
    let yaml =
        migration("m", "web", "{node: east-2}", "Cold") + "  transfer: {bandwidthLimitMiBps: 1}\n";
    let m = run(w, ns, "m", &yaml).await?;
    succeeded(&m)?;
    let downtime = m
        .status
        .as_ref()
        .and_then(|s| s.timings.as_ref()?.downtime_ms)
        .unwrap_or_default();
    eprintln!("[{ns}] downtime {downtime} ms");
    let target = target_pod(&m);
    ready_by_gate(w, "east", ns, &target, "MigrationTarget").await?;
    let target_uid = Api::<Pod>::namespaced(w.east.clone(), ns)
        .get(&target)
        .await?
        .uid()
        .context("the target Pod's UID")?;
    let joined = wait_for(
        Duration::from_secs(30),
        "the target to be a ready endpoint of the Service",
        || async { Ok(seen.any(|(uid, ready, _)| *uid == target_uid && *ready)) },
    )
    .await;
    task.abort();
    joined?;
    ensure!(
        seen.left_while_alive(&source_uid),
        "the frozen source never left the Service's ready endpoints before its deletion: \
         seen {:?}",
        seen.0.lock().unwrap()
    );
    Ok(())
}

/// A gated counter Pod whose move fails (the daemons corrupt what they stage in this
/// namespace): rolled back, it runs once at the source and is Ready again, its gate
/// True for `Resumed`: it was taken out at the freeze and put back.
pub(super) async fn gated_rollback(w: &World) -> Result<()> {
    let ns = "rollback";
    w.create_pod(ns, gated(counter_pod("gated", "east-1", &["app"])))
        .await?;
    ready_by_gate(w, "east", ns, "gated", "NotMigrating").await?;
    let yaml = migration("gated", "gated", "{cluster: west, node: west-1}", "Cold");
    w.apply_migration(ns, &yaml).await?;
    let m = w
        .follow(ns, "gated", Duration::from_secs(180), |_| {})
        .await?;
    rolled_back(&m)?;
    w.check_runs_once_at_source(ns, "gated").await?;
    ready_by_gate(w, "east", ns, "gated", "Resumed").await
}
