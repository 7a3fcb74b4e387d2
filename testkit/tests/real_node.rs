//! Real nodes end to end: one testenv cluster (`--nodes`, apiserver on a LAN address),
//! two real containerd + kubelet nodes in network namespaces, pods started by the
//! scheduler and kubelet from locally built OCI images. Prints the numbers the design
//! depends on (node Ready time, pod start latency, memory per node).
//!
//! Needs root and what scripts/install-deps.sh builds (the control plane, the node stack,
//! busybox-static, runc, gcc); a missing piece fails the test and names its script.
use anyhow::{Context, Result, bail};
use ferry_testkit::kube_node::{self, KubeNode, NodeOptions, pod_cidr_for};
use ferry_testkit::netns::Lan;
use ferry_testkit::oci;
use ferry_testkit::testenv::{Options, TestEnv};
use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const COUNTER: &str = r#"
apiVersion: v1
kind: Pod
metadata: { name: counter }
spec:
  nodeSelector: { kubernetes.io/hostname: east-1 }
  terminationGracePeriodSeconds: 2
  containers:
  - name: counter
    image: docker.io/library/busybox:ferry
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", "trap 'exit 0' TERM; nc -ll -p 8080 -e echo hello-from-counter & i=0; while true; do echo count $i; i=$((i+1)); sleep 1; done"]
"#;

const CLIENT: &str = r#"
apiVersion: v1
kind: Pod
metadata: { name: client }
spec:
  nodeSelector: { kubernetes.io/hostname: east-2 }
  runtimeClassName: ferry
  terminationGracePeriodSeconds: 2
  containers:
  - name: client
    image: docker.io/library/busybox:ferry
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]
"#;

/// Runs `cmd`, killing it after `limit` (a hung exec stream must not hang the test).
fn run(mut cmd: Command, stdin: Option<&str>, limit: Duration) -> Result<Output> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(input.as_bytes())?;
    }
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("{cmd:?} did not finish in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child.wait_with_output()?)
}

/// Polls `f` every 100 ms until it returns Some, or fails after `limit`.
fn poll<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The pod's IP once it is Running with its container started.
fn running_ip(env: &TestEnv, pod: &str) -> Result<Option<String>> {
    let mut cmd = env.kubectl("east");
    cmd.args(["get", "pod", pod, "-o", "json"]);
    let out = run(cmd, None, Duration::from_secs(10))?;
    if !out.status.success() {
        return Ok(None);
    }
    let p: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let started = p["status"]["containerStatuses"][0]["state"]["running"].is_object();
    let ip = p["status"]["podIP"].as_str().map(str::to_string);
    Ok((p["status"]["phase"] == "Running" && started)
        .then_some(ip)
        .flatten())
}

fn apply(env: &TestEnv, manifest: &str) -> Result<()> {
    let mut cmd = env.kubectl("east");
    cmd.args(["apply", "-f", "-"]);
    let out = run(cmd, Some(manifest), Duration::from_secs(20))?;
    if !out.status.success() {
        bail!("kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

#[test]
fn real_nodes_run_pods() -> Result<()> {
    ferry_testkit::install_crypto_provider();
    // Short: containerd's socket path must fit in 108 bytes. Dropped last.
    let work = tempfile::Builder::new()
        .prefix("ferry-rn-")
        .tempdir_in("/tmp")?;
    let images = vec![oci::busybox_image()?];
    let lan = Lan::create()?;
    let opts = Options {
        bind_ip: Some(lan.host_ip()),
        nodes: true,
    };
    let t = Instant::now();
    let env = TestEnv::start_with(&["east"], &opts)?;
    eprintln!("control plane ready in {:.2} s", t.elapsed().as_secs_f64());
    let cluster = env.cluster("east").clone();
    assert!(
        cluster.server.contains(&lan.host_ip().to_string()),
        "{}",
        cluster.server
    );

    let (n1, n2) = (lan.add_node("e1")?, lan.add_node("e2")?);
    let t = Instant::now();
    let mut o1 = NodeOptions::new("east-1", &pod_cidr_for(&n1), &work.path().join("east-1"));
    o1.images = images.clone();
    let k1 = KubeNode::start(&n1, &cluster, o1)?;
    let ready1 = t.elapsed();
    let t = Instant::now();
    let mut o2 = NodeOptions::new("east-2", &pod_cidr_for(&n2), &work.path().join("east-2"));
    o2.images = images;
    // The "ferry" handler with plain runc as its binary: a pass-through wrapper.
    o2.ferry_runtime = Some("/usr/sbin/runc".into());
    o2.labels = vec![("ferry.dev/test".into(), "real-node".into())];
    let k2 = KubeNode::start(&n2, &cluster, o2)?;
    let ready2 = t.elapsed();
    eprintln!(
        "node Ready (start -> Ready, untainted): east-1 {:.2} s, east-2 {:.2} s",
        ready1.as_secs_f64(),
        ready2.as_secs_f64()
    );
    kube_node::route_pod_networks(&[&k1, &k2])?;
    tokio::runtime::Runtime::new()?.block_on(async {
        kube_node::create_ferry_runtime_class(&env.client("east").await?).await
    })?;

    // The namespace's ServiceAccount comes from the controller manager, shortly after start.
    poll(
        "ServiceAccount default/default",
        Duration::from_secs(30),
        || {
            let mut cmd = env.kubectl("east");
            cmd.args(["get", "serviceaccount", "default"]);
            Ok(run(cmd, None, Duration::from_secs(10))?
                .status
                .success()
                .then_some(()))
        },
    )?;

    let t = Instant::now();
    apply(&env, COUNTER)?;
    let ip1 = poll("counter Running", Duration::from_secs(60), || {
        running_ip(&env, "counter")
    })?;
    let start_counter = t.elapsed();
    eprintln!(
        "pod start (kubectl apply -> Running): counter {:.2} s, IP {ip1}",
        start_counter.as_secs_f64()
    );

    poll("counter's log", Duration::from_secs(20), || {
        let mut cmd = env.kubectl("east");
        cmd.args(["logs", "counter"]);
        let out = run(cmd, None, Duration::from_secs(10))?;
        Ok(stdout(&out).contains("count 1").then_some(()))
    })?;
    let mut cmd = env.kubectl("east");
    cmd.args([
        "exec",
        "counter",
        "--",
        "sh",
        "-c",
        "echo exec-ok; ls -d /data",
    ]);
    let out = run(cmd, None, Duration::from_secs(20))?;
    assert!(
        out.status.success() && stdout(&out) == "exec-ok\n/data\n",
        "kubectl exec: {:?} {}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );

    let t = Instant::now();
    apply(&env, CLIENT)?;
    let ip2 = poll("client Running", Duration::from_secs(60), || {
        running_ip(&env, "client")
    })?;
    eprintln!(
        "pod start (kubectl apply -> Running): client (RuntimeClass ferry) {:.2} s, IP {ip2}",
        t.elapsed().as_secs_f64()
    );
    let ferry_containers = ferry_testkit::containers::runc_list(&k2.ferry_runc_root())?;
    assert!(
        !ferry_containers.is_empty(),
        "no container under the ferry handler's runc root {}",
        k2.ferry_runc_root().display()
    );
    // Pod to pod across nodes, no NAT: the client reaches the counter's pod IP.
    poll("client -> counter pod IP", Duration::from_secs(30), || {
        let mut cmd = env.kubectl("east");
        cmd.args(["exec", "client", "--", "nc", "-w", "2", &ip1, "8080"]);
        let out = run(cmd, None, Duration::from_secs(10))?;
        Ok(stdout(&out).contains("hello-from-counter").then_some(()))
    })?;

    let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
    eprintln!(
        "memory (containerd + kubelet RSS): east-1 {:.0} MiB (1 pod), east-2 {:.0} MiB (1 pod)",
        mb(k1.rss_bytes()),
        mb(k2.rss_bytes())
    );

    // Deleting the Pod removes its container from the node.
    let running = |k: &KubeNode| -> Result<String> {
        let mut cmd = k.crictl();
        cmd.args(["ps", "-q", "--name", "counter"]);
        let out = run(cmd, None, Duration::from_secs(20))?;
        if !out.status.success() {
            bail!("crictl ps: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(stdout(&out).trim().to_string())
    };
    assert!(
        !running(&k1)?.is_empty(),
        "crictl ps shows no counter container"
    );
    let t = Instant::now();
    let mut cmd = env.kubectl("east");
    cmd.args(["delete", "pod", "counter", "--wait=false"]);
    assert!(run(cmd, None, Duration::from_secs(20))?.status.success());
    poll(
        "counter's container gone from crictl ps",
        Duration::from_secs(30),
        || Ok(running(&k1)?.is_empty().then_some(())),
    )?;
    eprintln!(
        "pod delete -> container gone: {:.2} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
