//! Host-side plumbing of real test nodes: the node's cgroup root, pod routes between
//! nodes, and tearing a node down so that nothing it started stays running or mounted.
use super::KubeNode;
use crate::netns::ip;
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Creates `/sys/fs/cgroup/<h>/<name>` in every cgroup v1 hierarchy (and `unified`): the
/// kubelet's cgroupRoot must exist in all of them. cpuset gets its parent's cpus/mems.
pub(super) fn create_cgroup(name: &str) -> Result<()> {
    let base = Path::new("/sys/fs/cgroup");
    let unified = base.join("cgroup.controllers").exists(); // pure cgroup v2
    let dirs: Vec<_> = if unified {
        vec![base.to_path_buf()]
    } else {
        std::fs::read_dir(base)
            .context("listing /sys/fs/cgroup")?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect()
    };
    for h in dirs {
        let dir = h.join(name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating cgroup {}", dir.display()))?;
        for f in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(v) = std::fs::read_to_string(h.join(f)) {
                std::fs::write(dir.join(f), v.trim())
                    .with_context(|| format!("writing {}", dir.join(f).display()))?;
            }
        }
    }
    Ok(())
}

/// VmRSS of a process in bytes (0 if gone).
pub(super) fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Routes every node's pod CIDR to that node's IP in every other node's namespace and
/// in the host namespace (ip_forward on), so pod IPs route between nodes and clusters.
/// Nodes on another LAN are reached through the host (the LAN's `.1`).
pub fn route_pod_networks(nodes: &[&KubeNode]) -> Result<()> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enabling ip_forward")?;
    let same_lan = |a: &KubeNode, b: &KubeNode| a.ip.octets()[..3] == b.ip.octets()[..3];
    for n in nodes {
        ip(&["route", "replace", &n.pod_cidr, "via", &n.ip.to_string()])?;
        let ok = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", n.ns))
            .args(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            .status()
            .context("running nsenter sysctl")?
            .success();
        if !ok {
            bail!("sysctl net.ipv4.ip_forward=1 in {} failed", n.ns);
        }
        for m in nodes.iter().filter(|m| m.name != n.name) {
            let via = if same_lan(n, m) {
                m.ip
            } else {
                let [a, b, c, _] = n.ip.octets();
                std::net::Ipv4Addr::new(a, b, c, 1)
            };
            ip(&[
                "-n",
                &n.ns,
                "route",
                "replace",
                &m.pod_cidr,
                "via",
                &via.to_string(),
            ])?;
        }
    }
    Ok(())
}

/// Stops everything in the right order; best effort, never panics.
pub(super) fn teardown(n: &mut KubeNode) {
    // 1. The kubelet first, so it does not restart what we remove.
    if let Some(mut k) = n.kubelet.take() {
        k.stop(Duration::from_secs(5));
    }
    // 2. Every pod sandbox (stops containers, CNI DEL, unmounts) while containerd runs.
    if n.containerd.as_mut().is_some_and(|c| !c.exited()) {
        let _ = n
            .crictl()
            .args(["--timeout", "20s", "rmp", "--force", "--all"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    if let Some(mut c) = n.containerd.take() {
        c.stop(Duration::from_secs(5));
    }
    // 3. Shims run in their own process groups: kill those of this containerd, then any
    //    container left under the node's runc roots.
    let sock = n.layout.socket.to_string_lossy().into_owned();
    for pid in shims_of(&sock) {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
    for root in [n.runc_root(), n.ferry_runc_root()] {
        for c in crate::containers::runc_list(&root).unwrap_or_default() {
            if let Some(id) = c["id"].as_str() {
                let _ = Command::new(&n.layout.runc)
                    .arg("--root")
                    .arg(&root)
                    .args(["delete", "--force", id])
                    .output();
            }
        }
    }
    // 4. Mounts under the node dir, deepest first: the kubelet's self bind mount of its
    //    root dir, pod volumes, container rootfs and shm, pod netns bind mounts.
    let dir = n.dir.to_string_lossy().into_owned();
    let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(unescape))
        .filter(|m| m == &dir || m.starts_with(&format!("{dir}/")))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    mounts.dedup();
    for m in mounts {
        let _ = Command::new("umount")
            .args(["-l", &m])
            .stderr(Stdio::null())
            .status();
    }
    // 5. The host route to this node's pods (node namespaces take theirs with them).
    let _ = Command::new("ip")
        .args(["route", "del", &n.pod_cidr, "via", &n.ip.to_string()])
        .stderr(Stdio::null())
        .status();
    // 6. The cgroups (CgroupGuard removes the whole tree in every hierarchy).
    drop(n.cgroup.take());
}

/// PIDs of `containerd-shim-runc-v2 ... -address <sock>` processes.
fn shims_of(sock: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_shim = args
            .first()
            .is_some_and(|a| a.ends_with(b"containerd-shim-runc-v2"));
        if is_shim
            && args
                .windows(2)
                .any(|w| w[0] == b"-address" && w[1] == sock.as_bytes())
        {
            pids.push(pid);
        }
    }
    pids
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let oct: String = chars.by_ref().take(3).collect();
            if let Ok(v) = u8::from_str_radix(&oct, 8) {
                out.push(v as char);
                continue;
            }
            out.push('\\');
            out.push_str(&oct);
        } else {
            out.push(c);
        }
    }
    out
}
