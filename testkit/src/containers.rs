//! runc containers and `ferry-node` daemons on simulated nodes, for end-to-end tests and
//! the demo: busybox bundles annotated the way the CRI annotates them, containers run in
//! a node's network namespace, daemons serving the node API. Guards tear everything
//! down, even when a test fails.
use crate::netns::{Lan, Node};
use crate::process::ChildGuard;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// CRIU built by scripts/install-criu.sh (Debian 12's own CRIU does not work here).
pub fn criu() -> Result<PathBuf> {
    let p = std::env::var_os("FERRY_CRIU")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/local/sbin/criu".into());
    let ok = Command::new(&p)
        .arg("check")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(ok, Ok(s) if s.success()) {
        bail!(
            "CRIU 4.x not usable at {} (`criu check` fails): run scripts/install-criu.sh",
            p.display()
        );
    }
    Ok(p)
}

/// The pod a container belongs to, as the CRI annotations name it.
#[derive(Debug, Clone)]
pub struct PodLabels {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// A minimal rootfs made of the static busybox.
pub fn busybox_rootfs(dir: &Path) -> Result<()> {
    for d in ["bin", "proc", "dev", "tmp", "data"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox"))
        .context("copying /bin/busybox (install busybox-static)")?;
    for app in ["sh", "sleep", "usleep", "nc", "echo", "cat", "seq"] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(app))?;
    }
    Ok(())
}

/// An OCI bundle at `dir` running `script` under `sh -c`, annotated as container `name`
/// of `pod` the way the CRI does, in cgroup `cgroup`.
pub fn write_bundle(
    dir: &Path,
    pod: &PodLabels,
    name: &str,
    script: &str,
    cgroup: &str,
) -> Result<()> {
    busybox_rootfs(&dir.join("rootfs"))?;
    let out = Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(dir)
        .output()?;
    if !out.status.success() {
        bail!("runc spec: {}", String::from_utf8_lossy(&out.stderr));
    }
    let path = dir.join("config.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    c["process"]["terminal"] = false.into();
    c["process"]["args"] = serde_json::json!(["/bin/sh", "-c", script]);
    c["root"]["readonly"] = false.into();
    c["linux"]["cgroupsPath"] = cgroup.into();
    c["annotations"] = serde_json::json!({
        "io.kubernetes.pod.namespace": pod.namespace,
        "io.kubernetes.pod.name": pod.name,
        "io.kubernetes.pod.uid": pod.uid,
        "io.kubernetes.container.name": name,
    });
    // Keep the mounts CRIU handles without extra options (no sysfs/cgroup bind mounts).
    let keep = ["/proc", "/dev", "/dev/pts", "/dev/shm"];
    let mounts: Vec<serde_json::Value> = c["mounts"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .filter(|m| keep.contains(&m["destination"].as_str().unwrap_or("")))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    c["mounts"] = mounts.into();
    std::fs::write(&path, serde_json::to_vec_pretty(&c)?)?;
    Ok(())
}

/// A command run inside `node`'s network namespace without remounting /sys (unlike
/// `ip netns exec`), so runc and CRIU still see the host's cgroup mounts.
pub fn in_node(node: &Node, prog: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{}", node.name())).arg(prog);
    c
}

pub fn runc_list(root: &Path) -> Result<Vec<serde_json::Value>> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    let out = Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(["list", "--format", "json"])
        .output()?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// Every container under a runc root; all force-deleted on drop (including those a
/// daemon restored there).
pub struct RuncRoot {
    pub root: PathBuf,
}

impl RuncRoot {
    pub fn run(&self, node: &Node, bundle: &Path, id: &str) -> Result<()> {
        let out = in_node(node, "runc")
            .arg("--root")
            .arg(&self.root)
            .args(["run", "--detach", "--bundle"])
            .arg(bundle)
            .arg(id)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!("runc run {id}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    pub fn list(&self) -> Result<Vec<serde_json::Value>> {
        runc_list(&self.root)
    }
}

impl Drop for RuncRoot {
    fn drop(&mut self) {
        for c in runc_list(&self.root).unwrap_or_default() {
            if let Some(id) = c["id"].as_str() {
                let _ = Command::new("runc")
                    .arg("--root")
                    .arg(&self.root)
                    .args(["delete", "--force", id])
                    .output();
            }
        }
    }
}

/// A simulated node running `ferry-node` (the binary at `daemon_bin`) on port 7070.
pub struct Daemon {
    pub node: Node,
    pub runc: RuncRoot,
    pub state_dir: PathBuf,
    /// Where launchers on this node register their VMs (`ferry-node --vm-root`).
    pub vm_root: PathBuf,
    pub endpoint: String,
    child: ChildGuard,
    /// How it was started, for [`Daemon::restart`].
    args: Vec<std::ffi::OsString>,
    bin: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// The name this daemon's certificate carries (its node's IP): what the controller
    /// passes as `PrepareReceiverRequest.source_peer` when this daemon is the source.
    pub fn peer_name(&self) -> String {
        self.node.ip().to_string()
    }

    pub fn start(lan: &Lan, label: &str, base: &Path, daemon_bin: &Path) -> Result<Daemon> {
        Self::start_with(lan, label, base, daemon_bin, &[])
    }

    /// [`Daemon::start`] with extra `ferry-node` flags.
    pub fn start_with(
        lan: &Lan,
        label: &str,
        base: &Path,
        daemon_bin: &Path,
        extra_args: &[&str],
    ) -> Result<Daemon> {
        let criu = criu()?;
        let node = lan.add_node(label)?;
        let runc_root = base.join(format!("runc-{label}"));
        let state_dir = base.join(format!("state-{label}"));
        let tls_dir = crate::pki::node_tls_dir(
            &base.join(format!("tls-{label}")),
            label,
            &node.ip().to_string(),
        )?;
        let mut args: Vec<std::ffi::OsString> = vec![
            "--listen".into(),
            format!("{}:7070", node.ip()).into(),
            "--advertise-ip".into(),
            node.ip().to_string().into(),
            "--runc-root".into(),
            runc_root.clone().into(),
            "--criu".into(),
            criu.into(),
            "--state-dir".into(),
            state_dir.clone().into(),
            "--tls-dir".into(),
            tls_dir.into(),
            "--vm-root".into(),
            base.join(format!("vms-{label}")).into(),
        ];
        args.extend(extra_args.iter().map(Into::into));
        // The daemon logs to stdout: keep it beside its state for post-mortems.
        let log = base.join(format!("ferry-node-{label}.log"));
        let child = spawn_daemon(&node, daemon_bin, &args, &log)?;
        Ok(Daemon {
            endpoint: format!("https://{}:7070", node.ip()),
            node,
            runc: RuncRoot { root: runc_root },
            state_dir,
            vm_root: base.join(format!("vms-{label}")),
            child,
            args,
            bin: daemon_bin.to_path_buf(),
            log,
        })
    }

    /// Kills the daemon (SIGKILL, its process group: a crash) and starts it again with
    /// the same flags and state dir; returns once it listens. It logs on after the
    /// previous run's lines.
    pub fn restart(&mut self) -> Result<()> {
        self.child.kill();
        self.child = spawn_daemon(&self.node, &self.bin, &self.args, &self.log)?;
        Ok(())
    }
}

fn spawn_daemon(
    node: &Node,
    bin: &Path,
    args: &[std::ffi::OsString],
    log: &Path,
) -> Result<ChildGuard> {
    let mut cmd = in_node(node, bin);
    cmd.args(args).stdout(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?,
    );
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "warn");
    }
    let label = log
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("ferry-node");
    let child = ChildGuard::spawn(label, cmd)?;
    let addr = format!("{}:7070", node.ip());
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect_timeout(&addr.parse()?, Duration::from_millis(200)).is_err()
    {
        if Instant::now() > deadline {
            bail!("{label} not listening on {addr} after 20 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(child)
}

/// A unique cgroup parent; removed (in every controller hierarchy) on drop.
pub struct CgroupGuard(pub String);

static CGROUP_SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl CgroupGuard {
    /// A name no other guard in any process uses: label, pid, sequence number.
    pub fn new(label: &str) -> CgroupGuard {
        let seq = CGROUP_SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        CgroupGuard(format!("ferry-{label}-{}-{seq}", std::process::id()))
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        fn rmdir_tree(p: &Path) {
            if let Ok(rd) = std::fs::read_dir(p) {
                for e in rd.flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        rmdir_tree(&e.path());
                    }
                }
                let _ = std::fs::remove_dir(p);
            }
        }
        rmdir_tree(&Path::new("/sys/fs/cgroup").join(&self.0));
        for ctrl in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            rmdir_tree(&ctrl.path().join(&self.0));
        }
    }
}
