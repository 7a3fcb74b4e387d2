//! `ferry-node`: the per-node daemon serving the NodeAgent gRPC API.
use anyhow::Context;
use clap::Parser;
use ferry_node::criu::Criu;
use ferry_node::qemu::MigrationTuning;
use ferry_node::runc::Runc;
use ferry_node::runc_backend::{RuncConfig, RuncRuntime};
use ferry_node::server::NodeService;
use ferry_node::transport::Transport;
use ferry_node::vm_backend::{VmConfig, VmRuntime};
use ferry_proto::node::v1::node_agent_server::NodeAgentServer;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(version, about = "ferry node daemon")]
struct Args {
    /// gRPC listen address.
    #[arg(long, env = "FERRY_NODE_LISTEN", default_value = "0.0.0.0:7070")]
    listen: std::net::SocketAddr,
    /// This node's IP that peer daemons reach (page servers and bundle listeners bind here).
    #[arg(long, env = "FERRY_NODE_IP")]
    advertise_ip: String,
    /// runc state root; containerd's CRI uses /run/containerd/runc/k8s.io.
    #[arg(
        long,
        env = "FERRY_RUNC_ROOT",
        default_value = "/run/containerd/runc/k8s.io"
    )]
    runc_root: PathBuf,
    #[arg(long, env = "FERRY_RUNC", default_value = "runc")]
    runc: PathBuf,
    #[arg(long, env = "FERRY_CRIU", default_value = "criu")]
    criu: PathBuf,
    /// Staging for checkpoint images and received bundles (restored rootfs live here too).
    #[arg(long, env = "FERRY_STATE_DIR", default_value = "/var/lib/ferry")]
    state_dir: PathBuf,
    /// Parent cgroup of restored containers.
    #[arg(long, env = "FERRY_CGROUP_PREFIX", default_value = "/ferry")]
    cgroup_prefix: String,
    /// The node's transfer identity, laid out like a mounted kubernetes.io/tls Secret
    /// plus the CA: tls.crt (must name --advertise-ip), tls.key, ca.crt.
    #[arg(long, env = "FERRY_TLS_DIR")]
    tls_dir: PathBuf,
    /// Port of the mutual-TLS transfer listener (on --advertise-ip).
    #[arg(long, env = "FERRY_TRANSFER_PORT", default_value_t = 7443)]
    transfer_port: u16,
    /// Where ferry-launcher registers the node's VMs (a hostPath shared with launchers).
    #[arg(long, env = "FERRY_VM_ROOT", default_value = "/run/ferry/vms")]
    vm_root: PathBuf,
    /// ferry-launcher, for incoming guests (default: next to this binary).
    #[arg(long, env = "FERRY_LAUNCHER")]
    launcher: Option<PathBuf>,
    /// Bandwidth cap of outgoing VM migrations, bytes/s. Set explicitly because QEMU's
    /// own default (~128 MiB/s) would silently bound every migration.
    #[arg(long, env = "FERRY_VM_MAX_BANDWIDTH", default_value_t = 10 << 30)]
    vm_max_bandwidth: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let a = Args::parse();
    std::fs::create_dir_all(&a.state_dir)
        .with_context(|| format!("creating {}", a.state_dir.display()))?;
    let transport = Arc::new(
        Transport::start(&a.tls_dir, &a.advertise_ip, a.transfer_port)
            .await
            .context("starting the transfer listener")?,
    );
    let runc = RuncRuntime::new(RuncConfig {
        runc: Runc::new(a.runc, a.runc_root),
        criu: Criu { binary: a.criu },
        state_dir: a.state_dir.clone(),
        advertise_ip: a.advertise_ip.clone(),
        cgroup_prefix: a.cgroup_prefix,
        transport: transport.clone(),
    })
    .await;
    let launcher = match a.launcher {
        Some(l) => l,
        None => std::env::current_exe()
            .context("locating ferry-launcher")?
            .with_file_name("ferry-launcher"),
    };
    std::fs::create_dir_all(&a.vm_root)
        .with_context(|| format!("creating {}", a.vm_root.display()))?;
    let vm = VmRuntime::new(
        VmConfig {
            vm_root: a.vm_root,
            launcher,
            state_dir: a.state_dir,
            tuning: MigrationTuning {
                max_bandwidth: a.vm_max_bandwidth,
                ..Default::default()
            },
        },
        transport.clone(),
    );
    let svc = NodeService::new(vec![Arc::new(runc), Arc::new(vm)]);
    tracing::info!(listen = %a.listen, transfer = %transport.endpoint(), "ferry-node serving");
    tonic::transport::Server::builder()
        .add_service(NodeAgentServer::new(svc))
        .serve_with_shutdown(a.listen, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving gRPC")?;
    Ok(())
}
