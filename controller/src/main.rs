//! `ferry-controller`: watches Migrations in this cluster and drives them.
use anyhow::Context as _;
use clap::Parser;
use ferry_controller::{Settings, agent::grpc::GrpcAgent, clusters::Clusters, server};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Namespace of the leader Lease and of linked-cluster kubeconfig Secrets.
    #[arg(long, env = "FERRY_NAMESPACE", default_value = "ferry-system")]
    namespace: String,
    /// This cluster's name, as placements and Events show it.
    #[arg(long, env = "FERRY_CLUSTER_NAME", default_value = "local")]
    cluster_name: String,
    /// Identity for leader election (default: POD_NAME or the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: std::net::SocketAddr,
    #[arg(long, default_value = "15")]
    lease_seconds: u64,
    /// Watch Migrations in this namespace only (default: all namespaces).
    #[arg(long)]
    watch_namespace: Option<String>,
    /// RuntimeClass of container target Pods (its handler must be ferry-runtime).
    #[arg(long, env = "FERRY_RUNTIME_CLASS", default_value = "ferry")]
    runtime_class: String,
    /// Image of the target Pods' gate init container (runs /pause).
    #[arg(
        long,
        env = "FERRY_GATE_IMAGE",
        default_value = "registry.k8s.io/pause:3.10"
    )]
    gate_image: String,
    /// Kubeconfig file (default: in-cluster or KUBECONFIG).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,
    /// Seconds a failed migration's objects stay in its bucket (transfer.mode
    /// ObjectStore) for a post-mortem before they are removed; 0 removes them at once.
    #[arg(long, default_value = "86400")]
    failed_object_retention: u64,
    /// The controller's identity towards the node daemons (mutual TLS): tls.crt naming
    /// `ferry-controller`, tls.key, and ca.crt, the CA of the daemons' certificates.
    #[arg(long, env = "FERRY_TLS_DIR")]
    tls_dir: std::path::PathBuf,
    /// Serve the `pods/eviction` admission webhook here (drain moves Pods labelled
    /// `ferry.dev/eviction-strategy`); needs --webhook-tls-dir and --webhook-client-ca.
    /// Unset: no webhook.
    #[arg(long, requires_all = ["webhook_tls_dir", "webhook_client_ca"])]
    webhook_addr: Option<std::net::SocketAddr>,
    /// The CA of the client certificate the apiserver shows webhooks (its
    /// AdmissionConfiguration's kubeConfigFile): the webhook answers no one else.
    #[arg(long, env = "FERRY_WEBHOOK_CLIENT_CA")]
    webhook_client_ca: Option<std::path::PathBuf>,
    /// A DNS name (subjectAltName) that certificate must carry; repeat for several.
    #[arg(long, default_value = "kube-apiserver-webhook-client")]
    webhook_client_name: Vec<String>,
    /// The webhook's serving certificate: tls.crt and tls.key (a kubernetes.io/tls
    /// Secret); its CA goes into the ValidatingWebhookConfiguration's caBundle.
    #[arg(long, env = "FERRY_WEBHOOK_TLS_DIR")]
    webhook_tls_dir: Option<std::path::PathBuf>,
    /// Migrations past Pending at once in this cluster; the others wait in Pending
    /// (`status.queued` says why), drain's first, then by `spec.priority`, then oldest.
    #[arg(long, default_value = "5", value_parser = clap::value_parser!(u32).range(1..))]
    parallel_migrations_per_cluster: u32,
    /// Of those, from one source node.
    #[arg(long, default_value = "2", value_parser = clap::value_parser!(u32).range(1..))]
    parallel_outbound_migrations_per_node: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let args = Args::parse();
    ferry_controller::install_crypto_provider();
    let client = match &args.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Client::try_from(
                kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?,
            )?
        }
        None => kube::Client::try_default()
            .await
            .context("no kubeconfig and not in a cluster")?,
    };
    check_crds(&client).await?;
    let identity = args.identity.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "ferry-controller".into())
    });
    let mut settings = Settings::new(&args.namespace, &args.cluster_name, &identity);
    settings.target_shape = ferry_controller::placement::TargetShape {
        runtime_class: args.runtime_class.clone(),
        gate_image: args.gate_image.clone(),
    };
    settings.lease_duration = Duration::from_secs(args.lease_seconds);
    settings.watch_namespace = args.watch_namespace.clone();
    settings.failed_object_retention = Duration::from_secs(args.failed_object_retention);
    settings.limits = ferry_controller::queue::Limits {
        per_cluster: args.parallel_migrations_per_cluster as usize,
        per_node: args.parallel_outbound_migrations_per_node as usize,
    };
    let clusters = Arc::new(Clusters::new(client.clone(), &args.namespace));
    let tls = ferry_controller::agent::grpc::client_tls(&args.tls_dir)
        .context("the control channel's TLS (--tls-dir)")?;
    let agent = Arc::new(GrpcAgent::new(clusters, tls));
    let ctx = ferry_controller::context(client, agent, &settings);

    let mut registry = prometheus_client::registry::Registry::default();
    ctx.metrics.register(&mut registry);
    let registry = Arc::new(registry);
    let addr = args.metrics_addr;
    tokio::spawn(async move {
        if let Err(e) = server::serve(addr, registry).await {
            tracing::error!("metrics server: {e}");
        }
    });
    if let (Some(addr), Some(dir), Some(ca)) = (
        args.webhook_addr,
        args.webhook_tls_dir.clone(),
        args.webhook_client_ca.clone(),
    ) {
        let client = ctx.client.clone();
        let callers = ferry_controller::drain::webhook::Callers {
            ca,
            names: args.webhook_client_name.clone(),
        };
        tokio::spawn(async move {
            if let Err(e) =
                ferry_controller::drain::webhook::serve(addr, &dir, &callers, client).await
            {
                tracing::error!("eviction webhook: {e}");
                std::process::exit(1);
            }
        });
    }
    tokio::select! {
        _ = ferry_controller::run_with_leader_election(ctx, &settings) => {
            anyhow::bail!("lost leadership; exiting so that a restart rejoins as a candidate")
        }
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// Fails early, with the fix, when the CRDs are not installed.
async fn check_crds(client: &kube::Client) -> anyhow::Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: kube::Api<CustomResourceDefinition> = kube::Api::all(client.clone());
    if crds.get_opt("migrations.ferry.dev").await?.is_none() {
        anyhow::bail!("the Migration CRD is not installed: kubectl apply -f crds/yaml/crds.yaml");
    }
    Ok(())
}
