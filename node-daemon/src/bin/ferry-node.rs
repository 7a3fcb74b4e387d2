//! `ferry-node`: the per-node daemon serving the NodeAgent gRPC API.
use anyhow::Context;
use clap::Parser;
use ferry_node::criu::Criu;
use ferry_node::runc::Runc;
use ferry_node::runc_backend::{RuncConfig, RuncRuntime};
use ferry_node::server::NodeService;
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
    let runc = RuncRuntime::new(RuncConfig {
        runc: Runc::new(a.runc, a.runc_root),
        criu: Criu { binary: a.criu },
        state_dir: a.state_dir,
        advertise_ip: a.advertise_ip,
        cgroup_prefix: a.cgroup_prefix,
    })
    .await;
    let svc = NodeService::new(vec![Arc::new(runc)]);
    tracing::info!(listen = %a.listen, "ferry-node serving");
    tonic::transport::Server::builder()
        .add_service(NodeAgentServer::new(svc))
        .serve_with_shutdown(a.listen, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving gRPC")?;
    Ok(())
}
