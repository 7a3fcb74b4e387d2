//! The files a real test node runs from: containerd's config (version 3), the CNI
//! bridge conflist and the kubelet's KubeletConfiguration. Pure text; `super` writes
//! them. Every path is private to the node, so nodes of all clusters share one host.
use super::Layout;
use std::fmt::Write;

/// containerd config v3 for one node (see docs/testenv.md for why each setting is there).
pub(super) fn containerd_toml(l: &Layout, sandbox_image: &str) -> String {
    let q = |p: &std::path::Path| toml_str(&p.to_string_lossy());
    let mut s = format!(
        r#"version = 3
# Drop-ins, as `containerd config default` imports /etc/containerd/conf.d/*.toml
# (ferry-install adds the ferry handler there).
imports = [{imports}]
root = {root}
state = {state}

[grpc]
  address = {sock}

[ttrpc]
  address = {ttrpc}

[plugins]
  [plugins.'io.containerd.internal.v1.opt']
    path = {opt}

  # NRI's socket (/var/run/nri/nri.sock) would be shared by every node.
  [plugins.'io.containerd.nri.v1.nri']
    disable = true

  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = {sandbox}

  [plugins.'io.containerd.cri.v1.runtime']
    # Without CAP_SYS_RESOURCE runc cannot lower oom_score_adj ("can't get final
    # child's PID from pipe" on every sandbox).
    restrict_oom_score_adj = true
    # Pod network namespaces under this node's state dir, not the shared /run/netns.
    netns_mounts_under_state_dir = true
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = [{cni_bin}]
      conf_dir = {cni_conf}
      max_conf_num = 1
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
"#,
        imports = toml_str(&format!("{}/*.toml", l.containerd.join("conf.d").display())),
        root = q(&l.containerd.join("root")),
        state = q(&l.containerd.join("state")),
        sock = q(&l.socket),
        ttrpc = toml_str(&format!("{}.ttrpc", l.socket.display())),
        opt = q(&l.containerd.join("opt")),
        sandbox = toml_str(sandbox_image),
        cni_bin = q(&l.bin),
        cni_conf = q(&l.cni_conf),
    );
    runtime(&mut s, "runc", &l.runc, &l.runc_root, &[]);
    if let Some(wrapper) = &l.ferry_runtime {
        runtime(
            &mut s,
            "ferry",
            wrapper,
            &l.ferry_runc_root,
            &["ferry.dev/*"],
        );
    }
    s
}

fn runtime(
    s: &mut String,
    name: &str,
    binary: &std::path::Path,
    root: &std::path::Path,
    pod_annotations: &[&str],
) {
    let t = format!("plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.{name}");
    let annotations: Vec<String> = pod_annotations.iter().map(|a| toml_str(a)).collect();
    let _ = write!(
        s,
        r#"      [{t}]
        runtime_type = 'io.containerd.runc.v2'
        pod_annotations = [{annotations}]
        [{t}.options]
          BinaryName = {binary}
          Root = {root}
          SystemdCgroup = false
"#,
        annotations = annotations.join(", "),
        binary = toml_str(&binary.to_string_lossy()),
        root = toml_str(&root.to_string_lossy()),
    );
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// The node's pod network: a bridge (gateway .1 of the pod CIDR) with host-local
/// addresses; no masquerading, so pod IPs route between nodes and clusters as they are.
pub(super) fn cni_conflist(l: &Layout, bridge: &str, pod_cidr: &str) -> String {
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "ferry-pods",
        "plugins": [{
            "type": "bridge",
            "bridge": bridge,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "dataDir": l.cni_ipam,
                "ranges": [[{ "subnet": pod_cidr }]],
                "routes": [{ "dst": "0.0.0.0/0" }],
            },
        }],
    });
    serde_json::to_string_pretty(&conf).expect("JSON")
}

/// KubeletConfiguration (v1beta1) as JSON (which is YAML).
pub(super) fn kubelet_config(
    l: &Layout,
    cgroup_root: &str,
    client_ca: &std::path::Path,
    runtime_request_timeout: std::time::Duration,
    feature_gates: &std::collections::BTreeMap<String, bool>,
) -> String {
    let mut conf = serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        // PID 1 is not systemd; the host is cgroup v1.
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": false,
        "failSwapOn": false,
        // Two kubelets with the default root would fight over /kubepods.
        "cgroupRoot": cgroup_root,
        "containerRuntimeEndpoint": format!("unix://{}", l.socket.display()),
        "runtimeRequestTimeout": format!("{}s", runtime_request_timeout.as_secs().max(1)),
        "podLogsDir": l.pod_logs,
        "authentication": {
            "anonymous": { "enabled": false },
            "webhook": { "enabled": true },
            "x509": { "clientCAFile": client_ca },
        },
        "authorization": { "mode": "Webhook" },
        "readOnlyPort": 0,
        // Test pods are never evicted or their images collected because the shared
        // disk is fuller than a production node would be.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
            "imagefs.inodesFree": "1%",
        },
        "serializeImagePulls": false,
    });
    if !feature_gates.is_empty() {
        conf["featureGates"] = serde_json::json!(feature_gates);
    }
    serde_json::to_string_pretty(&conf).expect("JSON")
}

/// `Name=true,Other=false` as feature gates; an empty list, a missing `=`, a value
/// other than `true` or `false`, or an empty name is refused.
pub(super) fn parse_feature_gates(
    spec: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, bool>> {
    let mut gates = std::collections::BTreeMap::new();
    for pair in spec.split(',').map(str::trim) {
        let Some((name, value)) = pair.split_once('=') else {
            anyhow::bail!("{pair:?} is not Name=true|false");
        };
        let value = match value.trim() {
            "true" => true,
            "false" => false,
            v => anyhow::bail!("{name}: {v:?} is neither true nor false"),
        };
        let name = name.trim();
        anyhow::ensure!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric()),
            "{name:?} is not a feature gate name"
        );
        gates.insert(name.to_string(), value);
    }
    Ok(gates)
}

#[cfg(test)]
mod tests {
    use super::parse_feature_gates;

    #[test]
    fn feature_gates_are_name_bool_pairs_or_refused() {
        let g = parse_feature_gates("EventedPLEG=true, Other=false").unwrap();
        assert_eq!(g.len(), 2);
        assert!(g["EventedPLEG"]);
        assert!(!g["Other"]);
        for bad in [
            "",
            "EventedPLEG",
            "EventedPLEG=yes",
            "=true",
            "Evented PLEG=true",
        ] {
            assert!(parse_feature_gates(bad).is_err(), "{bad:?} accepted");
        }
    }
}
