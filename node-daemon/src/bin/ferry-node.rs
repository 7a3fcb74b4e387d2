//! `ferry-node`: the per-node daemon serving the NodeAgent gRPC API.
use anyhow::Context;
use clap::Parser;
use ferry_node::containers::criu::Criu;
use ferry_node::containers::runc::Runc;
use ferry_node::containers::{ContainerRuntime, ContainersConfig, Cri};
use ferry_node::control_tls;
use ferry_node::health::{self, Readiness};
use ferry_node::metrics::Metrics;
use ferry_node::register::Registration;
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
    /// The target Pod's containers may wait in `create` for the state once at most
    /// this much is still to arrive before the restore (writable layers, plus memory
    /// for Cold; a Cold move's pages are counted as they arrive); until then the gate
    /// holds them back (the kubelet's runtime request timeout bounds a create's wait:
    /// pick a size the link moves well within it).
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
    /// Announce this daemon on its own Node (the `ferry.dev/node-daemon` annotation,
    /// which the controller dials) while it serves, and remove it on shutdown. Needs
    /// --node-name and a client allowed to patch that Node.
    #[arg(long, env = "FERRY_REGISTER_NODE", requires = "node_name")]
    register_node: bool,
    /// The endpoint to announce. Default: https://ADVERTISE_IP:LISTEN_PORT.
    #[arg(long, env = "FERRY_ADVERTISE_ENDPOINT")]
    advertise_endpoint: Option<String>,
    /// Kubeconfig for --register-node. Unset: the pod's ServiceAccount.
    #[arg(long, env = "FERRY_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Plain-HTTP /healthz, /readyz and /metrics. Unauthenticated, hence loopback by
    /// default; they expose counters, never workload data.
    #[arg(long, env = "FERRY_HEALTH_ADDR", default_value = "127.0.0.1:7071")]
    health_addr: std::net::SocketAddr,
}

impl Args {
    fn endpoint(&self) -> String {
        if let Some(e) = &self.advertise_endpoint {
            return e.clone();
        }
        let host = match self.advertise_ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]"),
            _ => self.advertise_ip.clone(),
        };
        format!("https://{host}:{}", self.listen.port())
    }
}

/// SIGTERM (the kubelet stopping the pod) or SIGINT.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let a = Args::parse();
    // kube's client and the transfers share one rustls provider; pick it before either.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let metrics = Arc::new(Metrics::default());
    let readiness = Arc::new(Readiness::new(a.register_node));
    if !a.register_node {
        metrics.registered.set(1);
    }
    let health = tokio::net::TcpListener::bind(a.health_addr)
        .await
        .with_context(|| format!("binding the health endpoint {}", a.health_addr))?;
    tokio::spawn({
        let (metrics, readiness) = (metrics.clone(), readiness.clone());
        async move {
            if let Err(e) = health::serve(health, &metrics, readiness).await {
                tracing::error!(error = %e, "the health endpoint stopped");
            }
        }
    });
    let registration = match a.register_node {
        true => Some(Arc::new(
            Registration::new(
                a.kubeconfig.as_deref(),
                a.node_name.clone().expect("clap requires --node-name"),
                a.endpoint(),
            )
            .await?,
        )),
        false => None,
    };
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
    let svc = NodeService::new(
        vec![Arc::new(containers), Arc::new(vm)],
        transport.clone(),
        metrics.clone(),
    );
    let tls = control_tls::server_config(&a.tls_dir).context("the control API's TLS")?;
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("binding the control API {}", a.listen))?;
    readiness.set_serving();
    tracing::info!(listen = %a.listen, transfer = %transport.endpoint(), controller = %a.controller_name, health = %a.health_addr, "ferry-node serving");
    // Announced only once the control API is bound: the controller may dial at once.
    let announcer = registration.clone().map(|r| {
        let (metrics, readiness) = (metrics.clone(), readiness.clone());
        tokio::spawn(async move {
            tracing::info!(endpoint = r.endpoint(), "announcing the daemon on its Node");
            r.keep_announced(|ok| {
                metrics.registered.set(ok as i64);
                readiness.set_registered(ok);
            })
            .await
        })
    });
    let served = tonic::transport::Server::builder()
        .tls_config(tls)
        .context("the control API's TLS")?
        .add_service(NodeAgentServer::with_interceptor(
            svc,
            control_tls::only(a.controller_name.clone()),
        ))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown_signal(),
        )
        .await
        .context("serving gRPC");
    if let (Some(r), Some(announcer)) = (registration, announcer) {
        announcer.abort();
        // Bounded: a pod being stopped has its grace period, an unreachable apiserver
        // must not use it up (the controller then finds the endpoint dead instead).
        match tokio::time::timeout(std::time::Duration::from_secs(3), r.withdraw()).await {
            Ok(Ok(())) => tracing::info!("the daemon's endpoint is off its Node"),
            Ok(Err(e)) => tracing::warn!(error = %e, "removing the daemon's endpoint"),
            Err(_) => tracing::warn!("removing the daemon's endpoint timed out"),
        }
    }
    served
}
