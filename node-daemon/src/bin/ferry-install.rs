//! `ferry-install`: puts ferry's node pieces on the host and takes them away again
//! (`ferry_node::install`). The ferry-node DaemonSet runs `install` as its init
//! container and `remove-if-uninstalled` as its preStop hook, which removes the pieces
//! only when the DaemonSet itself is gone (`helm uninstall`), not on an upgrade or a
//! restarted pod. The chart's pre-delete hook runs `delete-daemonset` first, so that
//! the daemons stop while their RBAC still exists.
#![forbid(unsafe_code)]
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ferry_node::install::{HostInstall, Restart, restart_containerd};
use k8s_openapi::api::apps::v1::DaemonSet;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(version, about = "install or remove ferry's node pieces on the host")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Copy ferry-runtime and its config into place, add the `ferry` handler to
    /// containerd and restart containerd if its configuration changed.
    Install {
        #[command(flatten)]
        host: HostArgs,
        /// The ferry-runtime to copy (the image carries it here).
        #[arg(long, default_value = "/opt/ferry/node/ferry-runtime")]
        source: PathBuf,
    },
    /// Remove the handler, the binary and its config, and restart containerd.
    Remove {
        #[command(flatten)]
        host: HostArgs,
    },
    /// `remove`, but only if the DaemonSet named here is gone or being deleted (so a
    /// rolling upgrade or a restarted pod keeps the node pieces). Its namespace is
    /// $POD_NAMESPACE.
    RemoveIfUninstalled {
        #[command(flatten)]
        host: HostArgs,
        #[arg(long, default_value = "ferry-node")]
        daemonset: String,
    },
    /// Delete the DaemonSet (in $POD_NAMESPACE) and wait until its pods are gone: the
    /// chart's pre-delete hook, so that every daemon withdraws its Node annotation
    /// and removes its node pieces while its RBAC still exists (helm deletes the
    /// RBAC in the same sweep as the DaemonSet).
    DeleteDaemonset {
        #[arg(long, default_value = "ferry-node")]
        daemonset: String,
        #[arg(long, default_value_t = 300)]
        timeout_seconds: u64,
    },
}

#[derive(Args, Debug)]
struct HostArgs {
    /// Where the host's filesystem is mounted in this container.
    #[arg(long, env = "FERRY_HOST_ROOT", default_value = "/host")]
    host_root: PathBuf,
    /// Host directory for ferry-runtime and ferry-runtime.json.
    #[arg(long, env = "FERRY_HOST_BIN_DIR", default_value = "/opt/ferry/bin")]
    bin_dir: PathBuf,
    /// Host path of the containerd drop-in that declares the handler.
    #[arg(
        long,
        env = "FERRY_CONTAINERD_DROPIN",
        default_value = "/etc/containerd/conf.d/ferry.toml"
    )]
    containerd_dropin: PathBuf,
    /// The host's runc (ferry-runtime passes every call to it).
    #[arg(long, env = "FERRY_HOST_RUNC", default_value = "/usr/sbin/runc")]
    runc: PathBuf,
    /// The host's CRIU 4.x (for restores).
    #[arg(long, env = "FERRY_HOST_CRIU", default_value = "/usr/local/sbin/criu")]
    criu: PathBuf,
    /// ferry-node's --state-dir.
    #[arg(long, env = "FERRY_STATE_DIR", default_value = "/var/lib/ferry")]
    state_dir: PathBuf,
    /// The handler's runc root (ferry-node's --restore-runc-root without /k8s.io).
    #[arg(
        long,
        env = "FERRY_HANDLER_RUNC_ROOT",
        default_value = "/run/ferry/runc"
    )]
    handler_runc_root: PathBuf,
    /// How long a restored container's create waits for its state (below the
    /// kubelet's runtimeRequestTimeout).
    #[arg(long, env = "FERRY_CREATE_WAIT_SECONDS", default_value_t = 90)]
    create_wait_seconds: u64,
    /// How containerd reloads its configuration: systemd, or none (its supervisor
    /// restarts it).
    #[arg(long, env = "FERRY_CONTAINERD_RESTART", default_value = "systemd")]
    containerd_restart: Restart,
}

impl HostArgs {
    fn install(&self) -> HostInstall {
        HostInstall {
            host_root: self.host_root.clone(),
            bin_dir: self.bin_dir.clone(),
            dropin: self.containerd_dropin.clone(),
            runc: self.runc.clone(),
            criu: self.criu.clone(),
            state_dir: self.state_dir.clone(),
            runc_root: self.handler_runc_root.clone(),
            create_wait_seconds: self.create_wait_seconds,
        }
    }
}

/// Whether the DaemonSet is gone: deleted, being deleted, or no longer reachable with
/// this pod's identity (helm removes its RBAC in the same sweep). Any other error
/// (the apiserver unreachable) keeps the pieces: removing them by mistake would break
/// the node's ferry pods, keeping them costs nothing.
async fn uninstalled(name: &str) -> anyhow::Result<bool> {
    let ns = std::env::var("POD_NAMESPACE").context("POD_NAMESPACE unset")?;
    let client = kube::Client::try_default().await?;
    let api: kube::Api<DaemonSet> = kube::Api::namespaced(client, &ns);
    match api.get_metadata(name).await {
        Ok(ds) => Ok(ds.metadata.deletion_timestamp.is_some()),
        Err(kube::Error::Api(s)) if [401, 403, 404].contains(&s.code) => {
            tracing::info!(code = s.code, "daemonset {ns}/{name}: {}", s.message);
            Ok(true)
        }
        Err(e) => Err(e.into()),
    }
}

fn report(what: &str, c: &ferry_node::install::Changes) {
    for f in &c.files {
        tracing::info!("{what} {}", f.display());
    }
    for f in &c.kept {
        tracing::warn!(
            "kept {}: containers still run under the ferry handler",
            f.display()
        );
    }
}

fn remove(host: &HostArgs) -> anyhow::Result<()> {
    let c = host.install().remove()?;
    report("removed", &c);
    if c.containerd_config {
        restart_containerd(host.containerd_restart)?;
    }
    Ok(())
}

async fn delete_daemonset(name: &str, timeout: std::time::Duration) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{DeleteParams, ListParams};
    let ns = std::env::var("POD_NAMESPACE").context("POD_NAMESPACE unset")?;
    let client = kube::Client::try_default().await?;
    let api: kube::Api<DaemonSet> = kube::Api::namespaced(client.clone(), &ns);
    let Some(ds) = api.get_opt(name).await? else {
        tracing::info!("daemonset {ns}/{name} is not there");
        return Ok(());
    };
    let selector = ds
        .spec
        .and_then(|s| s.selector.match_labels)
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    anyhow::ensure!(
        !selector.is_empty(),
        "daemonset {ns}/{name} has no matchLabels"
    );
    // Foreground: the DaemonSet stays, marked deleted, until its pods are gone; the
    // pods' preStop hooks see the mark.
    api.delete(name, &DeleteParams::foreground()).await?;
    let pods: kube::Api<Pod> = kube::Api::namespaced(client, &ns);
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = pods
            .list_metadata(&ListParams::default().labels(&selector))
            .await?;
        if left.items.is_empty() && api.get_opt(name).await?.is_none() {
            tracing::info!("daemonset {ns}/{name} and its pods are gone");
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{} pods of daemonset {ns}/{name} still there after {timeout:?}",
            left.items.len()
        );
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    match Cli::parse().command {
        Cmd::Install { host, source } => {
            let c = host.install().install(&source)?;
            report("wrote", &c);
            if c.containerd_config {
                restart_containerd(host.containerd_restart)?;
                tracing::info!(restart = ?host.containerd_restart, "containerd configuration changed");
            }
        }
        Cmd::Remove { host } => remove(&host)?,
        Cmd::DeleteDaemonset {
            daemonset,
            timeout_seconds,
        } => delete_daemonset(&daemonset, std::time::Duration::from_secs(timeout_seconds)).await?,
        Cmd::RemoveIfUninstalled { host, daemonset } => match uninstalled(&daemonset).await {
            Ok(true) => remove(&host)?,
            Ok(false) => tracing::info!("daemonset {daemonset} still there: node pieces stay"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot tell whether ferry is uninstalled: node pieces stay")
            }
        },
    }
    Ok(())
}
