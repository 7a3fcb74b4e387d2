//! What a client sees: a memhog Pod serving TCP behind a Service, called through the
//! Service's ClusterIP from a client host of east (`World::start_client_host`:
//! kube-proxy in iptables mode, as on any node) while a Cold Migration moves the Pod
//! from east-1 to east-2. The target Pod carries the source's labels, so it joins the
//! Service once its kubelet reports it Ready. The source leaves it at the freeze when
//! it declares ferry's readiness gate (`ferry.dev/serving`, the controller's
//! `serving.rs`), else only when it is deleted: each run moves a gated Pod and an
//! ungated one, and the calls that timed out (sent to the frozen source) are compared.
//!
//! The client gap is the longest time between two answered calls, from the Migration's
//! creation to the end: what the client waited for. Its baseline is the same
//! Migration's own `downtimeMs` (freeze to restored-and-running); the goal is
//! a gap of at most that plus 100 ms. Every call is a fresh connection (as a client
//! behind kube-proxy makes), several calls in flight at once, each given up after
//! [`CALL_TIMEOUT`]: a call that kube-proxy sends to the frozen source connects (the
//! kernel still accepts into the frozen listener's queue) and then times out. Those
//! queued connections are in the source's dump; CRIU is told to skip them
//! (`criu::dump_config`), or the dump fails.
//!
//! Where the gap goes beyond the downtime, from the clocks of one machine: the last
//! answer before the freeze (the daemons' `freeze` step), the restore's end (the last
//! `restore/` step) to the target's endpoint turning ready in the Service's
//! EndpointSlice (watched: the kubelet reporting the Pod Ready, then the EndpointSlice
//! controller), and from there to the first answer (kube-proxy's rules, one call).
use super::{SOURCE_NODE, cleanup, timings, wait_resident};
use crate::Measurement;
use anyhow::{Context, Result, bail};
use ferry_e2e::world::World;
use ferry_testkit::netns;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// ferry's readiness gate.
const GATE: &str = ferry_crds::SERVING_CONDITION;
/// The node the Pod moves to, in the source's own cluster (the Service is east's).
const TARGET_NODE: &str = "east-2";
const PORT: u16 = 8080;
/// How long one call may take. Short, so that a call kube-proxy sent to the frozen
/// source does not hide the moment the target answers; the callers overlap.
const CALL_TIMEOUT: Duration = Duration::from_millis(50);
/// Callers: each makes one call after another.
const CALLERS: usize = 4;
/// How long a caller waits after a call that did not time out. While the Service has
/// no ready endpoint, kube-proxy rejects each call with an ICMP port-unreachable, and
/// the kernel sends at most `net.ipv4.icmp_msgs_per_sec` (1000) of those a second,
/// machine-wide: a call whose ICMP it drops waits out its timeout as if it had reached
/// a frozen process. With 2 ms, 4 callers made ~1900 calls a second and ~1 in 25 timed
/// out that way; at 5 ms they stay under the limit (`icmp_rate_limited` counts any).
const PAUSE: Duration = Duration::from_millis(5);
/// How long the callers keep calling once the moved Pod answered after the Migration
/// ended.
const AFTER: Duration = Duration::from_secs(2);

/// One run of the case.
pub(super) struct GapRun {
    pub gap_ms: f64,
    /// The Migration's own `downtimeMs`.
    pub downtime_ms: f64,
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// The ready addresses behind the Service each time they changed (Unix ms).
type History = Vec<(f64, BTreeSet<String>)>;

/// One move called through the Service; `gated`: the Pod declares ferry's readiness
/// gate (`ferry.dev/serving`), which takes the source out of the endpoints at the freeze.
pub(super) async fn client_gap(
    w: &World,
    client: &netns::Node,
    mib: u64,
    run: usize,
    gated: bool,
) -> Result<GapRun> {
    let ns = format!("service-{mib}-{run}{}", if gated { "-gated" } else { "" });
    w.namespace(&ns).await?;
    let result = measure(w, client, &ns, mib, gated).await;
    cleanup(w, &ns).await;
    result
}

async fn measure(
    w: &World,
    client: &netns::Node,
    ns: &str,
    mib: u64,
    gated: bool,
) -> Result<GapRun> {
    let mut pod = super::memhog_pod(mib, 1);
    pod["spec"]["containers"][0]["args"] =
        serde_json::json!([mib.to_string(), "--serve", PORT.to_string()]);
    pod["spec"]["containers"][0]["ports"] = serde_json::json!([{"containerPort": PORT}]);
    if gated {
        pod["spec"]["readinessGates"] = serde_json::json!([{"conditionType": GATE}]);
    }
    let source = w.create_pod(ns, pod).await?;
    let source_ip = source
        .status
        .and_then(|s| s.pod_ip)
        .context("the source Pod has no IP")?;
    tokio::task::block_in_place(|| {
        wait_resident(mib, || w.container_pid(SOURCE_NODE, ns, "memhog", "hog"))
    })?;
    let endpoints = Endpoints::watch(Api::namespaced(w.east.clone(), ns));
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "memhog"},
        "spec": {"selector": {"app": "memhog"}, "ports": [{"port": 80, "targetPort": PORT}]}
    }))?;
    let svc = Api::<Service>::namespaced(w.east.clone(), ns)
        .create(&PostParams::default(), &svc)
        .await?;
    let ip = svc
        .spec
        .and_then(|s| s.cluster_ip)
        .context("the Service got no ClusterIP")?;
    let addr: SocketAddr = format!("{ip}:80").parse()?;
    // kube-proxy writes the Service's rules once its EndpointSlice names the Pod.
    let icmp_limited = icmp_rate_limited(client);
    let callers = Callers::start(client, addr)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !callers.answered_since(0.0) {
        if Instant::now() > deadline {
            let calls = callers.stop()?;
            let n = |o: Outcome| calls.iter().filter(|c| c.outcome == o).count();
            bail!(
                "no call through the Service {addr} was answered in 30 s: {} timed out, \
                 {} refused",
                n(Outcome::TimedOut),
                n(Outcome::Refused)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let yaml = format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata: {{name: m}}\nspec:\n  \
         workload: {{pod: memhog}}\n  target: {{node: {TARGET_NODE}}}\n  strategy: Cold\n"
    );
    let created = unix_ms();
    w.apply_migration(ns, &yaml).await?;
    let m = w.follow(ns, "m", super::MIGRATION_TIMEOUT, |_| {}).await;
    // The gap ends with the target's first answer, which may come after the Migration
    // ended (kube-proxy routes to it once its endpoint is ready): call on until then.
    let ended = unix_ms();
    let deadline = Instant::now() + Duration::from_secs(60);
    while m.is_ok() && !callers.answered_since(ended) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if m.is_ok() && !callers.answered_since(ended) {
        callers.stop()?;
        bail!("the moved Pod did not answer through the Service {addr} within 60 s");
    }
    tokio::time::sleep(AFTER).await;
    let calls = callers.stop()?;
    let icmp_limited = match (icmp_limited, icmp_rate_limited(client)) {
        (Some(before), Some(after)) => serde_json::json!(after - before),
        _ => serde_json::Value::Null,
    };
    let history = endpoints.stop();
    let (downtime, _total, steps) = timings(&m?)?;
    let (last, first) = longest_gap(&calls, created).with_context(|| {
        format!(
            "calls through the Service: {} answered, {} before the Migration",
            calls.iter().filter(|c| c.answered()).count(),
            calls
                .iter()
                .filter(|c| c.answered() && c.end < created)
                .count()
        )
    })?;
    let mut details = serde_json::Map::new();
    details.insert("rss_mib".into(), mib.into());
    details.insert("strategy".into(), "Cold".into());
    details.insert(
        "route".into(),
        format!("{SOURCE_NODE} -> {TARGET_NODE} (same cluster), called through the Service").into(),
    );
    details.insert("goal_ms".into(), (downtime + 100.0).into());
    details.insert("readiness_gate".into(), gated.into());
    // Rejections the kernel did not send (each one a call that timed out instead).
    details.insert("icmp_rate_limited".into(), icmp_limited);
    let after: Vec<&Call> = calls.iter().filter(|c| c.end >= created).collect();
    for (key, what) in [
        ("calls_answered", Outcome::Answered),
        ("calls_timed_out", Outcome::TimedOut),
        ("calls_refused", Outcome::Refused),
    ] {
        let n = after.iter().filter(|c| c.outcome == what).count();
        details.insert(key.into(), n.into());
    }
    let steps = steps.unwrap_or_default();
    let moments = Moments {
        freeze: step_edge(&steps, |n| n == "freeze", false),
        restored: step_edge(&steps, |n| n.starts_with("restore/"), true),
        target_ready: history
            .iter()
            .find(|(_, ready)| ready.iter().any(|a| *a != source_ip))
            .map(|(t, _)| *t),
        source_left: history
            .iter()
            .find(|(t, ready)| *t > created && !ready.contains(&source_ip))
            .map(|(t, _)| *t),
    };
    details.insert("breakdown".into(), moments.breakdown(last, first));
    details.insert("timed_out_by_window".into(), moments.timed_out(&after));
    Ok(GapRun {
        gap_ms: first - last,
        downtime_ms: downtime,
        details,
    })
}

/// When things happened during one move, in Unix ms (all on this machine's clock).
struct Moments {
    /// The daemons froze the source.
    freeze: Option<f64>,
    /// The last container's restore returned: the target runs.
    restored: Option<f64>,
    /// An address other than the source's turned ready in the Service's EndpointSlice.
    target_ready: Option<f64>,
    /// The source's address left the ready ones.
    source_left: Option<f64>,
}

impl Moments {
    /// The client's gap (from the answer at `last` to the one at `first`), cut at
    /// these moments: each figure in ms, absent where a moment was not seen.
    fn breakdown(&self, last: f64, first: f64) -> serde_json::Value {
        let span = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => serde_json::json!(b - a),
            _ => serde_json::Value::Null,
        };
        serde_json::json!({
            "last_answer_to_freeze_ms": span(Some(last), self.freeze),
            "freeze_to_restored_ms": span(self.freeze, self.restored),
            "restored_to_target_endpoint_ready_ms": span(self.restored, self.target_ready),
            "target_endpoint_ready_to_first_answer_ms": span(self.target_ready, Some(first)),
            "restored_to_source_endpoint_gone_ms": span(self.restored, self.source_left),
            // Negative with the gate: ferry takes the source out just before the freeze.
            "freeze_to_source_endpoint_gone_ms": span(self.freeze, self.source_left),
        })
    }

    /// The calls that timed out, by when they started: before the source left the
    /// ready endpoints, from then until the target's endpoint was ready, and after.
    fn timed_out(&self, calls: &[&Call]) -> serde_json::Value {
        let started = |c: &&&Call| c.end - CALL_TIMEOUT.as_secs_f64() * 1000.0;
        let timed_out: Vec<f64> = calls
            .iter()
            .filter(|c| c.outcome == Outcome::TimedOut)
            .map(|c| started(&c))
            .collect();
        let (left, ready) = (
            self.source_left.unwrap_or(f64::INFINITY),
            self.target_ready.unwrap_or(f64::INFINITY),
        );
        let count = |f: &dyn Fn(f64) -> bool| timed_out.iter().filter(|&&t| f(t)).count();
        serde_json::json!({
            "source_in_endpoints": count(&|t| t < left.min(ready)),
            "neither_ready": count(&|t| t >= left && t < ready),
            "target_ready": count(&|t| t >= ready),
        })
    }
}

/// The start (or with `end`, the latest end) of the steps whose name `pick` accepts.
fn step_edge(steps: &serde_json::Value, pick: impl Fn(&str) -> bool, end: bool) -> Option<f64> {
    steps
        .as_array()?
        .iter()
        .filter(|s| s["name"].as_str().is_some_and(&pick))
        .filter_map(|s| {
            let start = s["startMs"].as_f64()?;
            Some(if end {
                start + s["durationMs"].as_f64()?
            } else {
                start
            })
        })
        .reduce(f64::max)
}

/// The kernel's count of ICMP messages it did not send for its rate limit, in the
/// client host's namespace (`/proc/net/snmp`, kernels from 6.0 on; `None` where absent).
fn icmp_rate_limited(client: &netns::Node) -> Option<i64> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", client.name(), "cat", "/proc/net/snmp"])
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let mut icmp = text.lines().filter(|l| l.starts_with("Icmp:"));
    let (names, values) = (icmp.next()?, icmp.next()?);
    let counts: Vec<i64> = names
        .split_whitespace()
        .zip(values.split_whitespace())
        .filter(|(n, _)| n.starts_with("OutRateLimit"))
        .map(|(_, v)| v.parse::<i64>().ok())
        .collect::<Option<_>>()?;
    (!counts.is_empty()).then(|| counts.iter().sum())
}

fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// The ready addresses behind the Service, each time they changed (Unix ms), from a
/// watch of its EndpointSlices.
struct Endpoints {
    history: Arc<Mutex<History>>,
    task: tokio::task::JoinHandle<()>,
}

impl Endpoints {
    fn watch(api: Api<EndpointSlice>) -> Endpoints {
        let history = Arc::new(Mutex::new(Vec::new()));
        let h = history.clone();
        let task = tokio::spawn(async move {
            let cfg = watcher::Config::default().labels("kubernetes.io/service-name=memhog");
            let mut slices: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            let mut events = std::pin::pin!(watcher(api, cfg));
            while let Some(event) = events.next().await {
                let (name, ready) = match event {
                    Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => {
                        (s.name_any(), ready_addresses(&s))
                    }
                    Ok(watcher::Event::Delete(s)) => (s.name_any(), BTreeSet::new()),
                    _ => continue,
                };
                slices.insert(name, ready);
                let all: BTreeSet<String> = slices.values().flatten().cloned().collect();
                let mut h = h.lock().unwrap();
                if h.last().is_none_or(|(_, last)| *last != all) {
                    h.push((unix_ms(), all));
                }
            }
        });
        Endpoints { history, task }
    }

    fn stop(self) -> History {
        self.task.abort();
        std::mem::take(&mut *self.history.lock().unwrap())
    }
}

/// The addresses of a slice's endpoints that are ready (what kube-proxy routes to).
fn ready_addresses(s: &EndpointSlice) -> BTreeSet<String> {
    s.endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .flat_map(|e| e.addresses.iter().cloned())
        .collect()
}

/// The case's measurements: the gap of the best gated run beside its Migration's
/// downtime, and the calls that timed out (sent to the frozen source) with the gate
/// beside the same move without it.
pub(super) fn measurements(
    mib: u64,
    runs: usize,
    gated: Option<GapRun>,
    ungated: Option<GapRun>,
) -> Vec<Measurement> {
    let (Some(gated), Some(ungated)) = (gated, ungated) else {
        return Vec::new();
    };
    let case = format!("containers/service-cold-{mib}MiB");
    let timed_out = |r: &GapRun| r.details["calls_timed_out"].as_f64().unwrap_or(0.0);
    let mut details = serde_json::Map::new();
    details.insert("runs".into(), runs.into());
    details.insert("with_gate".into(), gated.details.clone().into());
    details.insert("without_gate".into(), ungated.details.clone().into());
    let calls = Measurement {
        case: case.clone(),
        metric: "calls_timed_out".into(),
        ferry: timed_out(&gated),
        baseline: timed_out(&ungated),
        baseline_name: "the same move of a Pod without ferry's readiness gate".into(),
        details,
    };
    let GapRun {
        gap_ms: gap,
        downtime_ms: downtime,
        mut details,
    } = gated;
    details.insert("runs".into(), runs.into());
    let gap = Measurement {
        case,
        metric: "client_gap_ms".into(),
        ferry: gap,
        baseline: downtime,
        baseline_name: "its Migration's downtime (freeze to restored)".into(),
        details,
    };
    vec![gap, calls]
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Outcome {
    Answered,
    TimedOut,
    /// Refused or reset: no endpoint behind the ClusterIP, or none listening.
    Refused,
}

#[derive(Debug)]
struct Call {
    /// When it returned, in Unix ms.
    end: f64,
    outcome: Outcome,
}

impl Call {
    fn answered(&self) -> bool {
        self.outcome == Outcome::Answered
    }
}

/// The two answered calls with the longest time between them, the later one after
/// `from` (Unix ms): when they returned.
fn longest_gap(calls: &[Call], from: f64) -> Result<(f64, f64)> {
    let mut ends: Vec<f64> = calls
        .iter()
        .filter(|c| c.answered())
        .map(|c| c.end)
        .collect();
    ends.sort_by(f64::total_cmp);
    if !ends.iter().any(|&e| e < from) {
        bail!("no call was answered before the Migration");
    }
    if ends.last().is_none_or(|&last| last < from) {
        bail!("no call was answered after the Migration was created");
    }
    let gap = |p: &&[f64]| p[1] - p[0];
    let widest = ends
        .windows(2)
        .filter(|p| p[1] >= from)
        .max_by(|a, b| gap(a).total_cmp(&gap(b)))
        .expect("an answer before and one after");
    Ok((widest[0], widest[1]))
}

/// Threads in the client host's namespace, each calling `addr` until stopped.
struct Callers {
    stop: Arc<AtomicBool>,
    /// When the last answered call returned (Unix ms, as f64 bits; 0 before any).
    last_answer: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Result<Vec<Call>>>>,
}

impl Callers {
    fn start(client: &netns::Node, addr: SocketAddr) -> Result<Callers> {
        let stop = Arc::new(AtomicBool::new(false));
        let last_answer = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for _ in 0..CALLERS {
            let netns = std::fs::File::open(format!("/run/netns/{}", client.name()))
                .with_context(|| format!("opening the namespace of {}", client.name()))?;
            let (stop, last_answer) = (stop.clone(), last_answer.clone());
            threads.push(std::thread::spawn(move || {
                // This thread only: the rest of the bench stays in the host namespace.
                nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .context("entering the client host's namespace")?;
                let mut calls = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let outcome = call(addr);
                    let end = unix_ms();
                    if outcome == Outcome::Answered {
                        last_answer.fetch_max(end.to_bits(), Ordering::Relaxed);
                    }
                    calls.push(Call { end, outcome });
                    if outcome != Outcome::TimedOut {
                        // A refused call returns at once; do not spin on it.
                        std::thread::sleep(PAUSE);
                    }
                }
                Ok(calls)
            }));
        }
        Ok(Callers {
            stop,
            last_answer,
            threads,
        })
    }

    /// Whether a call answered after `t` (Unix ms).
    fn answered_since(&self, t: f64) -> bool {
        // Positive f64s order as their bits do.
        f64::from_bits(self.last_answer.load(Ordering::Relaxed)) > t
    }

    fn stop(self) -> Result<Vec<Call>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.threads {
            all.extend(
                t.join()
                    .map_err(|_| anyhow::anyhow!("a caller panicked"))??,
            );
        }
        Ok(all)
    }
}

/// One call: connect, read the one line the workload writes, check it.
fn call(addr: SocketAddr) -> Outcome {
    let timed_out = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        )
    };
    let started = Instant::now();
    let mut s = match TcpStream::connect_timeout(&addr, CALL_TIMEOUT) {
        Ok(s) => s,
        Err(e) if timed_out(&e) => return Outcome::TimedOut,
        Err(_) => return Outcome::Refused,
    };
    let left = CALL_TIMEOUT.saturating_sub(started.elapsed());
    if s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
        .is_err()
    {
        return Outcome::Refused;
    }
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) if got == b"memhog\n" => Outcome::Answered,
        Ok(_) => Outcome::Refused,
        Err(e) if timed_out(&e) => Outcome::TimedOut,
        Err(_) => Outcome::Refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: f64, answered: bool) -> Call {
        Call {
            end: ms,
            outcome: if answered {
                Outcome::Answered
            } else {
                Outcome::TimedOut
            },
        }
    }

    #[test]
    fn the_gap_is_the_longest_wait_between_answers_after_the_start() {
        // A long wait before the Migration (ms 0..400) does not count; the one across
        // it (500..900) does, unanswered calls in between or not.
        let calls = [
            at(950.0, true),
            at(0.0, true),
            at(400.0, true),
            at(500.0, true),
            at(600.0, false),
            at(900.0, true),
        ];
        assert_eq!(longest_gap(&calls, 450.0).unwrap(), (500.0, 900.0));
    }

    #[test]
    fn no_answer_on_one_side_of_the_start_is_an_error() {
        let before = [at(0.0, true), at(900.0, false)];
        let err = longest_gap(&before, 450.0).unwrap_err();
        assert!(err.to_string().contains("after"), "{err}");
        let after = [at(900.0, true)];
        let err = longest_gap(&after, 450.0).unwrap_err();
        assert!(err.to_string().contains("before"), "{err}");
    }

    #[test]
    fn the_breakdown_cuts_the_gap_at_the_moments_seen() {
        let m = Moments {
            freeze: Some(110.0),
            restored: Some(700.0),
            target_ready: Some(950.0),
            source_left: None,
        };
        let b = m.breakdown(100.0, 990.0);
        assert_eq!(b["last_answer_to_freeze_ms"], 10.0);
        assert_eq!(b["freeze_to_restored_ms"], 590.0);
        assert_eq!(b["restored_to_target_endpoint_ready_ms"], 250.0);
        assert_eq!(b["target_endpoint_ready_to_first_answer_ms"], 40.0);
        assert!(b["restored_to_source_endpoint_gone_ms"].is_null());
    }

    #[test]
    fn steps_give_the_freeze_and_the_last_restore() {
        let steps = serde_json::json!([
            {"name": "freeze", "startMs": 100, "durationMs": 2},
            {"name": "restore/a", "startMs": 500, "durationMs": 100},
            {"name": "restore/b", "startMs": 520, "durationMs": 120},
        ]);
        assert_eq!(step_edge(&steps, |n| n == "freeze", false), Some(100.0));
        assert_eq!(
            step_edge(&steps, |n| n.starts_with("restore/"), true),
            Some(640.0)
        );
        assert_eq!(step_edge(&steps, |n| n == "nothing", false), None);
    }
}
