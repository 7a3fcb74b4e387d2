//! ferry's images (testkit/src/oci/ferry.rs) are reproducible and run under a real
//! kubelet + containerd: the node image's ferry-node, CRIU, runc and the ferry-runtime
//! it carries for the host, the controller image as the chart runs it (non-root,
//! read-only root filesystem). Built from the workspace's debug binaries here;
//! `scripts/build-images.sh` builds the release images the same way.
use anyhow::{Context, Result, bail, ensure};
use ferry_testkit::kube_node::{KubeNode, NodeOptions, pod_cidr_for};
use ferry_testkit::netns::Lan;
use ferry_testkit::oci::ferry::{self, NodeTools};
use ferry_testkit::testenv::{Options, TestEnv};
use ferry_testkit::workspace_bin;
use std::time::{Duration, Instant};

fn pod(tag: &str) -> String {
    let node = format!("ferry.dev/ferry-node:{tag}");
    let controller = format!("ferry.dev/ferry-controller:{tag}");
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "images", "namespace": "default"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {"name": "node", "image": node, "imagePullPolicy": "Never", "args": ["--version"]},
                {"name": "criu", "image": node, "imagePullPolicy": "Never",
                 "command": ["/usr/local/sbin/criu", "--version"]},
                {"name": "runc", "image": node, "imagePullPolicy": "Never",
                 "command": ["/usr/sbin/runc", "--version"]},
                // The installer's copy for the host: a runc wrapper, so runc's own
                // --version answers through it.
                {"name": "runtime", "image": node, "imagePullPolicy": "Never",
                 "command": ["/opt/ferry/node/ferry-runtime", "--version"]},
                {"name": "controller", "image": controller, "imagePullPolicy": "Never",
                 "args": ["--version"],
                 "securityContext": {"runAsUser": 65532, "runAsNonRoot": true,
                     "readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
                     "capabilities": {"drop": ["ALL"]}}}
            ]
        }
    })
    .to_string()
}

#[test]
fn images_are_reproducible_and_run_under_a_kubelet() -> Result<()> {
    ferry_testkit::install_crypto_provider();
    let work = tempfile::Builder::new()
        .prefix("ferry-img-")
        .tempdir_in("/tmp")?;
    let bin_dir = workspace_bin("ferry-node")?
        .parent()
        .context("the binaries' directory")?
        .to_path_buf();
    let tools = NodeTools::from_host()?;
    let tag = ferry::version();
    let t = Instant::now();
    let built = ferry::build_all(&bin_dir, tag, &tools, &work.path().join("a"))?;
    let took = t.elapsed();
    for b in &built {
        eprintln!(
            "{} {} {:.1} MiB (debug binaries)",
            b.reference,
            &b.digest[..19],
            b.bytes as f64 / (1 << 20) as f64
        );
    }
    eprintln!("3 images written in {:.1}s", took.as_secs_f64());
    // The same inputs give the same bytes.
    let again = ferry::build_all(&bin_dir, tag, &tools, &work.path().join("b"))?;
    for (a, b) in built.iter().zip(&again) {
        ensure!(a.digest == b.digest, "{} is not reproducible", a.reference);
    }

    let lan = Lan::create()?;
    let env = TestEnv::start_with(
        &["east"],
        &Options {
            bind_ip: Some(lan.host_ip()),
            nodes: true,
        },
    )?;
    let n = lan.add_node("i1")?;
    let mut o = NodeOptions::new("east-1", &pod_cidr_for(&n), &work.path().join("east-1"));
    o.images = built
        .iter()
        .filter(|b| !b.reference.contains("launcher"))
        .map(|b| b.archive.clone())
        .collect();
    let _node = KubeNode::start(&n, env.cluster("east"), o)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !env
        .kubectl("east")
        .args(["get", "serviceaccount", "default"])
        .output()?
        .status
        .success()
    {
        ensure!(Instant::now() < deadline, "no default ServiceAccount");
        std::thread::sleep(Duration::from_millis(200));
    }
    let manifest = work.path().join("pod.json");
    std::fs::write(&manifest, pod(tag))?;
    let out = env
        .kubectl("east")
        .arg("apply")
        .arg("-f")
        .arg(&manifest)
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let out = env
            .kubectl("east")
            .args(["get", "pod", "images", "-o", "jsonpath={.status.phase}"])
            .output()?;
        let phase = String::from_utf8_lossy(&out.stdout).to_string();
        if phase == "Succeeded" {
            break;
        }
        if phase == "Failed" || Instant::now() > deadline {
            let desc = env
                .kubectl("east")
                .args(["describe", "pod", "images"])
                .output()?;
            bail!(
                "the images' pod ended {phase:?}:\n{}",
                String::from_utf8_lossy(&desc.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    for (container, want) in [
        ("node", format!("ferry-node {tag}")),
        ("criu", "Version: 4.".to_string()),
        ("runc", "runc version".to_string()),
        ("runtime", "runc version".to_string()),
        ("controller", format!("ferry-controller {tag}")),
    ] {
        let out = env
            .kubectl("east")
            .args(["logs", "images", "-c", container])
            .output()?;
        let log = String::from_utf8_lossy(&out.stdout);
        ensure!(
            log.contains(&want),
            "{container}: no {want:?} in its log: {log:?}"
        );
    }
    Ok(())
}
