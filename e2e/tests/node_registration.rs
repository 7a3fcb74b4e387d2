//! A node daemon announces itself on its own Node with the chart's ferry-node
//! ServiceAccount (a token bound to that Node, as the kubelet gives a DaemonSet pod),
//! reports ready and its metrics, removes its endpoint when stopped; the chart's
//! ValidatingAdmissionPolicy refuses that identity every other change, on any Node.
use anyhow::{Context, Result, ensure};
use ferry_e2e::chart::rendered;
use ferry_testkit::process::ChildGuard;
use ferry_testkit::testenv::TestEnv;
use ferry_testkit::{free_port, workspace_bin};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const ANNOTATION: &str = "ferry.dev/node-daemon";

fn ok(out: Output, what: &str) -> Result<String> {
    ensure!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// A copy of the admin kubeconfig whose user is `token`.
fn token_kubeconfig(env: &TestEnv, dir: &Path, token: &str) -> Result<PathBuf> {
    let path = dir.join(format!("kubeconfig-{}", &token[token.len() - 8..]));
    std::fs::copy(&env.cluster("east").kubeconfig, &path)?;
    for args in [
        vec!["config", "set-credentials", "ferry-node", "--token", token],
        vec!["config", "set-context", "--current", "--user", "ferry-node"],
    ] {
        ok(
            env.kubectl("east")
                .arg("--kubeconfig")
                .arg(&path)
                .args(&args)
                .output()?,
            "kubectl config",
        )?;
    }
    Ok(path)
}

fn token(env: &TestEnv, bound_node: Option<&str>) -> Result<String> {
    let mut cmd = env.kubectl("east");
    cmd.args(["create", "token", "ferry-node", "-n", "ferry-system"]);
    if let Some(n) = bound_node {
        cmd.args(["--bound-object-kind", "Node", "--bound-object-name", n]);
    }
    Ok(ok(cmd.output()?, "kubectl create token")?
        .trim()
        .to_string())
}

fn annotation(env: &TestEnv, node: &str) -> Result<String> {
    let path = "jsonpath={.metadata.annotations.ferry\\.dev/node-daemon}";
    ok(
        env.kubectl("east")
            .args(["get", "node", node, "-o", path])
            .output()?,
        "kubectl get node",
    )
}

fn wait_until(what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f()? {
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// `GET path` on the daemon's plain-HTTP health endpoint: (status, body).
fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    ferry_e2e::http::get(addr, path, Duration::from_secs(5))
}

/// A merge patch of Node `node` as the identity in `kc` (straight to the API: kubectl
/// would read the Node first, which that identity may not).
fn patch_as(kc: &Path, node: &str, patch: &str) -> Result<std::result::Result<(), String>> {
    patch_with(kc, node, patch, kube::api::PatchParams::default())
}

/// [`patch_as`] with the apiserver's dry run: admission judges it, nothing is stored.
fn dry_patch_as(kc: &Path, node: &str, patch: &str) -> Result<std::result::Result<(), String>> {
    patch_with(kc, node, patch, kube::api::PatchParams::default().dry_run())
}

fn patch_with(
    kc: &Path,
    node: &str,
    patch: &str,
    params: kube::api::PatchParams,
) -> Result<std::result::Result<(), String>> {
    let body: serde_json::Value = serde_json::from_str(patch)?;
    tokio::runtime::Runtime::new()?.block_on(async {
        let client = ferry_testkit::testenv::client_for(kc).await?;
        let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
        Ok(nodes
            .patch(node, &params, &kube::api::Patch::Merge(&body))
            .await
            .map(drop)
            .map_err(|e| e.to_string()))
    })
}

fn refused(out: std::result::Result<(), String>, want: &str, what: &str) -> Result<()> {
    match out {
        Err(e) if e.contains(want) => Ok(()),
        other => anyhow::bail!("{what}: expected a refusal naming {want:?}, got {other:?}"),
    }
}

fn refused_cli(out: Output, want: &str, what: &str) -> Result<()> {
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains(want),
        "{what}: expected a refusal naming {want:?}, got {}: {err}",
        out.status
    );
    Ok(())
}

#[test]
fn a_daemon_registers_on_its_own_node_only() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let env = TestEnv::start_in(dir.path(), &["east"])?;
    ok(
        env.kubectl("east")
            .args(["create", "namespace", "ferry-system"])
            .output()?,
        "create namespace",
    )?;
    let manifest = dir.path().join("ferry.yaml");
    std::fs::write(&manifest, rendered()?)?;
    ok(
        env.kubectl("east")
            .args(["apply", "--server-side", "-f"])
            .arg(&manifest)
            .output()?,
        "applying the rendered chart",
    )?;
    for n in ["n1", "n2"] {
        let node = format!(
            r#"{{"apiVersion":"v1","kind":"Node","metadata":{{"name":"{n}","labels":{{"zone":"a"}},"annotations":{{"keep":"me"}}}}}}"#
        );
        let file = dir.path().join(format!("{n}.json"));
        std::fs::write(&file, node)?;
        ok(
            env.kubectl("east")
                .arg("create")
                .arg("-f")
                .arg(&file)
                .output()?,
            "create node",
        )?;
    }
    let kc = token_kubeconfig(&env, dir.path(), &token(&env, Some("n1"))?)?;
    // The apiserver enforces a new ValidatingAdmissionPolicy once it has loaded it and
    // its binding, a moment after they are stored: wait until a dry run of a change it
    // must refuse is refused, so that what follows meets the policy, not that moment.
    let own = "ferry-node may change only its own Node";
    let endpoint_patch =
        format!(r#"{{"metadata":{{"annotations":{{"{ANNOTATION}":"https://10.0.0.9:7070"}}}}}}"#);
    wait_until("the node restriction policy to be enforced", || {
        Ok(dry_patch_as(&kc, "n2", &endpoint_patch)?.is_err_and(|e| e.contains(own)))
    })?;

    // The real daemon, with that identity, on loopback.
    let (listen, transfer, health) = (free_port()?, free_port()?, free_port()?);
    let tls = ferry_testkit::pki::node_tls_dir(&dir.path().join("tls"), "n1", "127.0.0.1")?;
    let mut cmd = Command::new(workspace_bin("ferry-node")?);
    cmd.arg("--listen")
        .arg(listen.to_string())
        .args(["--advertise-ip", "127.0.0.1", "--node-name", "n1"])
        // No image checks here: no Pod comes to this node.
        .args(["--crictl", "/bin/true"])
        .arg("--transfer-port")
        .arg(transfer.port().to_string())
        .arg("--health-addr")
        .arg(health.to_string())
        .arg("--tls-dir")
        .arg(&tls)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--vm-root")
        .arg(dir.path().join("vms"))
        .arg("--register-node")
        .arg("--kubeconfig")
        .arg(&kc)
        .stdout(std::fs::File::create(dir.path().join("ferry-node.log"))?)
        .stderr(std::fs::File::create(dir.path().join("ferry-node.err"))?);
    let mut daemon = ChildGuard::spawn("ferry-node", cmd)?;
    let endpoint = format!("https://127.0.0.1:{}", listen.port());
    let log = || {
        ["ferry-node.log", "ferry-node.err"]
            .map(|f| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default())
            .concat()
    };
    wait_until("the daemon's endpoint on n1", || {
        Ok(annotation(&env, "n1")? == endpoint)
    })
    .with_context(|| format!("ferry-node's log:\n{}", log()))?;
    wait_until("/readyz", || {
        Ok(get(health, "/readyz").is_ok_and(|(s, _)| s == 200))
    })?;
    ensure!(get(health, "/healthz")?.0 == 200);
    let (status, metrics) = get(health, "/metrics")?;
    ensure!(status == 200, "/metrics answered {status}");
    ensure!(
        metrics.contains("ferry_node_registered 1"),
        "not registered in /metrics:\n{metrics}"
    );
    // The other Node, and its annotation, untouched; n1's other metadata kept.
    ensure!(annotation(&env, "n2")?.is_empty());
    let keep = ok(
        env.kubectl("east")
            .args([
                "get",
                "node",
                "n1",
                "-o",
                "jsonpath={.metadata.annotations.keep}",
            ])
            .output()?,
        "get node",
    )?;
    ensure!(keep == "me", "n1's own annotation became {keep:?}");

    // What the daemon's identity may not do, each refused by the policy's message.
    let only = "may change only the ferry.dev/node-daemon annotation";
    refused(
        patch_as(&kc, "n2", &endpoint_patch)?,
        own,
        "pointing n2 at itself",
    )?;
    refused(
        patch_as(&kc, "n1", r#"{"metadata":{"labels":{"zone":"b"}}}"#)?,
        only,
        "relabelling n1",
    )?;
    refused(
        patch_as(&kc, "n1", r#"{"spec":{"unschedulable":true}}"#)?,
        only,
        "cordoning n1",
    )?;
    refused(
        patch_as(&kc, "n1", r#"{"metadata":{"annotations":{"keep":null}}}"#)?,
        only,
        "removing n1's other annotation",
    )?;
    // RBAC gives the identity nothing but patch.
    let out = env
        .kubectl("east")
        .arg("--kubeconfig")
        .arg(&kc)
        .args(["delete", "node", "n2"])
        .output()?;
    refused_cli(out, "forbidden", "deleting n2")?;
    // A token bound to no Node may not even change n1's endpoint.
    let unbound = token_kubeconfig(&env, dir.path(), &token(&env, None)?)?;
    refused(
        patch_as(&unbound, "n1", &endpoint_patch)?,
        "its token is bound to no node",
        "an unbound token",
    )?;
    ensure!(annotation(&env, "n1")? == endpoint);

    // Stopped the way the kubelet stops it (SIGTERM): the endpoint leaves n1.
    daemon.stop(Duration::from_secs(10));
    ensure!(
        annotation(&env, "n1")?.is_empty(),
        "n1 still names the stopped daemon; its log:\n{}",
        std::fs::read_to_string(dir.path().join("ferry-node.err")).unwrap_or_default()
    );
    Ok(())
}
