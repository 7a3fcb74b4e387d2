//! `ferry-node`: the per-node daemon serving the NodeAgent gRPC API.
use anyhow::Context;
use clap::Parser;
use ferry_node::containers::criu::Criu;
use ferry_node::containers::runc::Runc;
use ferry_node::containers::{ContainerRuntime, ContainersConfig, Cri};
use ferry_node::control_tls;
use ferry_node::server::NodeService;
use ferry_node::transport::Transport;
use ferry_node::vm::qemu::MigrationTuning;
use ferry_node::vm::{VmConfig, VmRuntime};
use ferry_proto::node::v1::node_agent_server::NodeAgentServer;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(version, about = "ferry node daemon")]
struct Args {
    /// gRPC listen address of the control API (mutual TLS with the --tls-dir identity;
    /// only a client certificate naming --controller-name is served).
    #[arg(long, env = "FERRY_NODE_LISTEN", default_value = "0.0.0.0:7070")]
    listen: std::net::SocketAddr,
    /// This node's IP that peer daemons reach (page servers and bundle listeners bind here).
    #[arg(long, env = "FERRY_NODE_IP")]
    advertise_ip: String,
    /// runc root of containerd's default runtime handler, where source containers run
    /// (the shim passes `--root <Root>/<namespace>`: `/run/containerd/runc/k8s.io`).
    #[arg(
        long,
        env = "FERRY_RUNC_ROOT",
        default_value = "/run/containerd/runc/k8s.io"
    )]
    runc_root: PathBuf,
    /// runc root of containerd's `ferry` handler (ferry-runtime), where restored
    /// containers run. Unset: this node has no ferry runtime and receives no containers.
    #[arg(long, env = "FERRY_RESTORE_RUNC_ROOT")]
    restore_runc_root: Option<PathBuf>,
    /// Migrations that must move at most this much before the restore (writable
    /// layers, plus memory for Cold) let the target Pod's containers wait in `create`
    /// for the state; larger ones are staged first (the kubelet's runtime request
    /// timeout bounds a create's wait: pick a size the link moves well within it).
    #[arg(long, env = "FERRY_EARLY_RELEASE_MIB", default_value_t = 1024)]
    early_release_mib: u64,
    /// Test-only fault injection, never for production: after unpacking a bundle for a
    /// target pod in this namespace, overwrite its staged pstree.img, so that its
    /// restore fails for real (the e2e rollback test needs that failure every time).
    #[arg(long, env = "FERRY_TEST_CORRUPT_STAGED_NAMESPACE", hide = true)]
    test_corrupt_staged_namespace: Option<String>,
    /// This node's CRI endpoint, to check that an incoming pod's images are here.
    #[arg(
        long,
        env = "FERRY_CRI_ENDPOINT",
        default_value = "unix:///run/containerd/containerd.sock"
    )]
    cri_endpoint: String,
    /// crictl, for the image check ("" skips the check).
    #[arg(long, env = "FERRY_CRICTL", default_value = "crictl")]
    crictl: PathBuf,
    #[arg(long, env = "FERRY_RUNC", default_value = "runc")]
    runc: PathBuf,
    #[arg(long, env = "FERRY_CRIU", default_value = "criu")]
    criu: PathBuf,
    /// Staging for checkpoints going out and restores coming in (ferry-runtime's
    /// `stateDir` must name the same directory).
    #[arg(long, env = "FERRY_STATE_DIR", default_value = "/var/lib/ferry")]
    state_dir: PathBuf,
    /// The node's identity for the control API and transfers, laid out like a mounted
    /// kubernetes.io/tls Secret plus the CA: tls.crt (must name --advertise-ip), tls.key,
    /// ca.crt (peers and the controller must present certificates from it).
    #[arg(long, env = "FERRY_TLS_DIR")]
    tls_dir: PathBuf,
    /// The DNS name the controller's client certificate carries; the control API
    /// refuses every other certificate (peer daemons included). Node certificates must
    /// never carry it.
    #[arg(long, env = "FERRY_CONTROLLER_NAME", default_value = control_tls::CONTROLLER_NAME)]
    controller_name: String,
    /// Port of the mutual-TLS transfer listener (on --advertise-ip).
    #[arg(long, env = "FERRY_TRANSFER_PORT", default_value_t = 7443)]
    transfer_port: u16,
    /// Where ferry-launcher registers the node's VMs: a hostPath mounted at this same
    /// path into VM pods.
    #[arg(long, env = "FERRY_VM_ROOT", default_value = "/run/ferry/vms")]
    vm_root: PathBuf,
    /// This node's name (Downward API spec.nodeName): only VMs registered for it are
    /// claimed. Unset: every VM under --vm-root.
    #[arg(long, env = "FERRY_NODE_NAME")]
    node_name: Option<String>,
    /// How long a destination waits for the target pod's incoming guest to register.
    #[arg(
        long,
        env = "FERRY_VM_TARGET_WAIT_SECS",
        default_value_t = VmConfig::DEFAULT_TARGET_WAIT.as_secs()
    )]
    vm_target_wait_secs: u64,
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
    let mut roots = vec![Runc::new(&a.runc, &a.runc_root)];
    let restore_root = a.restore_runc_root.as_ref().map(|r| Runc::new(&a.runc, r));
    roots.extend(restore_root.clone());
    let containers = ContainerRuntime::new(ContainersConfig {
        roots,
        restore_root,
        criu: Criu { binary: a.criu },
        state_dir: a.state_dir.clone(),
        advertise_ip: a.advertise_ip.clone(),
        transport: transport.clone(),
        early_release_bytes: a.early_release_mib << 20,
        test_corrupt_staged_namespace: a.test_corrupt_staged_namespace.clone(),
        cri: (!a.crictl.as_os_str().is_empty()).then(|| Cri {
            crictl: a.crictl.clone(),
            endpoint: a.cri_endpoint.clone(),
        }),
    })
    .await;
    std::fs::create_dir_all(&a.vm_root)
        .with_context(|| format!("creating {}", a.vm_root.display()))?;
    let vm = VmRuntime::new(
        VmConfig {
            vm_root: a.vm_root,
            node_name: a.node_name,
            target_wait: std::time::Duration::from_secs(a.vm_target_wait_secs),
            tuning: MigrationTuning {
                max_bandwidth: a.vm_max_bandwidth,
                ..Default::default()
            },
            state_dir: a.state_dir.clone(),
        },
        transport.clone(),
    );
    let svc = NodeService::new(vec![Arc::new(containers), Arc::new(vm)], transport.clone());
    let tls = control_tls::server_config(&a.tls_dir).context("the control API's TLS")?;
    tracing::info!(listen = %a.listen, transfer = %transport.endpoint(), controller = %a.controller_name, "ferry-node serving");
    tonic::transport::Server::builder()
        .tls_config(tls)
        .context("the control API's TLS")?
        .add_service(NodeAgentServer::with_interceptor(
            svc,
            control_tls::only(a.controller_name.clone()),
        ))
        .serve_with_shutdown(a.listen, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving gRPC")?;
    Ok(())
}
