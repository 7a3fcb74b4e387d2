//! Real Kubernetes control planes for tests: starts `ferry-testenv up` (built by
//! `scripts/build-testenv.sh`) and hands out clients; everything stops on drop.
//! [`Options`] prepares clusters for real kubelets (`crate::kube_node`).
use crate::process::{ChildGuard, Stopped};
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Directory with the control-plane binaries: `$FERRY_TESTENV_BIN`, else the cache.
pub fn bin_dir() -> Result<PathBuf> {
    let dir = std::env::var_os("FERRY_TESTENV_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/ferry/testenv/bin"));
    if !dir.join("ferry-testenv").exists() || !dir.join("kube-apiserver").exists() {
        bail!(
            "no control-plane binaries in {}: run scripts/build-testenv.sh (or set FERRY_TESTENV_BIN)",
            dir.display()
        );
    }
    Ok(dir)
}

#[derive(Debug, Clone, Deserialize)]
pub struct ClusterInfo {
    pub name: String,
    pub kubeconfig: PathBuf,
    pub server: String,
    /// The cluster CA (signed the apiserver's serving certificate); with
    /// [`Options::bind_ip`] or [`Options::nodes`] only.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The CA kubelets trust for client certificates (the apiserver's kubelet client
    /// certificate is signed by it); with [`Options::nodes`] only.
    #[serde(default, rename = "kubeletClientCA")]
    pub kubelet_client_ca: Option<PathBuf>,
}

/// How to start the control planes; the default is loopback-only, fake nodes.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// kube-apiserver listens and advertises here (`--bind-ip`), e.g. a
    /// `netns::Lan::host_ip()` that node namespaces reach; default 127.0.0.1.
    pub bind_ip: Option<std::net::Ipv4Addr>,
    /// Real kubelets will join (`--nodes`): node lifecycle controller on, kubelet client
    /// certificate for logs/exec.
    pub nodes: bool,
}

/// Running clusters; stopped (all processes) when dropped.
pub struct TestEnv {
    pub clusters: Vec<ClusterInfo>,
    _child: ChildGuard,
}

#[derive(Deserialize)]
struct Ready {
    clusters: Vec<ClusterInfo>,
}

impl TestEnv {
    /// Starts one control plane per name in a temporary directory.
    pub fn start(names: &[&str]) -> Result<TestEnv> {
        // ferry-testenv deletes the directory when it stops, which also covers a test
        // binary that never drops its shared TestEnv.
        let dir = tempfile::Builder::new()
            .prefix("ferry-testenv-")
            .tempdir()?
            .keep();
        Self::spawn(&dir, names, true, &Options::default())
    }

    /// [`TestEnv::start`] with [`Options`] (e.g. for clusters with real kubelets).
    pub fn start_with(names: &[&str], opts: &Options) -> Result<TestEnv> {
        let dir = tempfile::Builder::new()
            .prefix("ferry-testenv-")
            .tempdir()?
            .keep();
        Self::spawn(&dir, names, true, opts)
    }

    /// Starts control planes with state under `dir` (kept after stop, for the demo).
    pub fn start_in(dir: &Path, names: &[&str]) -> Result<TestEnv> {
        Self::spawn(dir, names, false, &Options::default())
    }

    /// [`TestEnv::start_in`] with [`Options`].
    pub fn start_in_with(dir: &Path, names: &[&str], opts: &Options) -> Result<TestEnv> {
        Self::spawn(dir, names, false, opts)
    }

    fn spawn(dir: &Path, names: &[&str], remove_dir: bool, opts: &Options) -> Result<TestEnv> {
        let bin = bin_dir()?;
        let mut cmd = Command::new(bin.join("ferry-testenv"));
        cmd.arg("up").arg("--dir").arg(dir).arg("--bin").arg(&bin);
        if remove_dir {
            cmd.arg("--remove-dir");
        }
        if let Some(ip) = opts.bind_ip {
            cmd.arg("--bind-ip").arg(ip.to_string());
        }
        if opts.nodes {
            cmd.arg("--nodes");
        }
        cmd.args(names);
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = ChildGuard::spawn("ferry-testenv", cmd)?;
        let stdout = child.take_stdout().context("ferry-testenv stdout")?;
        // The first stdout line is the ready report; anything else means it failed.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(240))
            .context("control planes not ready within 240 s")?;
        if line.trim().is_empty() {
            bail!(
                "ferry-testenv exited before the clusters were ready (see its log above; \
                 `flag provided but not defined` means an old runner: run scripts/build-testenv.sh)"
            );
        }
        let ready: Ready =
            serde_json::from_str(line.trim()).with_context(|| format!("ready line: {line}"))?;
        Ok(TestEnv {
            clusters: ready.clusters,
            _child: child,
        })
    }

    pub fn cluster(&self, name: &str) -> &ClusterInfo {
        self.clusters
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no cluster {name}"))
    }

    /// A client for a cluster, from its kubeconfig.
    pub async fn client(&self, name: &str) -> Result<kube::Client> {
        client_for(&self.cluster(name).kubeconfig).await
    }

    /// Stops cluster `name`'s kube-apiserver (SIGSTOP) until the guard is dropped
    /// (SIGCONT): meanwhile it accepts connections and answers nothing, as an apiserver
    /// whose host froze. Its kubelets, controllers and clients all wait on it.
    pub fn stop_apiserver(&self, name: &str) -> Result<Stopped> {
        let pki = self
            .cluster(name)
            .kubeconfig
            .parent()
            .context("kubeconfig has no directory")?
            .join("pki");
        let want = format!("--cert-dir={}", pki.display());
        let mut found = None;
        for entry in std::fs::read_dir("/proc")? {
            let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let is_apiserver = args.first().is_some_and(|a| a.ends_with(b"kube-apiserver"));
            if is_apiserver && args.contains(&want.as_bytes()) {
                found = Some(pid);
            }
        }
        let pid = found.with_context(|| format!("no kube-apiserver of {name} ({want})"))?;
        Stopped::pid(pid, &format!("kube-apiserver of {name}"))
    }

    /// `kubectl` (the testenv build) against one cluster.
    pub fn kubectl(&self, name: &str) -> Command {
        let mut cmd = Command::new(bin_dir().expect("checked at start").join("kubectl"));
        cmd.arg("--kubeconfig").arg(&self.cluster(name).kubeconfig);
        cmd
    }
}

pub async fn client_for(kubeconfig: &Path) -> Result<kube::Client> {
    crate::install_crypto_provider();
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
}
