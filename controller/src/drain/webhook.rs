//! The validating admission webhook on `pods/eviction` (`POST /validate-eviction`),
//! served over TLS by every controller replica (it only reads, and creates Migrations
//! by a name that makes a repeat find the first).
//!
//! It trusts nothing in the request but the Pod's name and namespace: it reads the Pod
//! and its Node from the apiserver, and it starts a Migration only for a Pod labelled
//! to move whose node is cordoned (as `kubectl drain` does first). So whoever reaches
//! the port without being the apiserver learns an answer and moves nothing that its
//! owner and the node's operator did not both ask to move.
use super::{
    EVICTED_FROM_LABEL, Verdict, decide, migration_name, not_movable, selecting_policy,
    strategy_label,
};
use crate::policy;
use axum::{Json, Router, extract::State, routing::post};
use ferry_crds::EVICTION_STRATEGY_LABEL;
use ferry_crds::{EvictionStrategy, Migration};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::{Client, ResourceExt};
use std::sync::Arc;
use tracing::{Instrument, info, warn};

pub const PATH: &str = "/validate-eviction";

pub fn router(client: Client) -> Router {
    Router::new().route(PATH, post(validate)).with_state(client)
}

async fn validate(
    State(client): State<Client>,
    Json(review): Json<AdmissionReview<DynamicObject>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let req: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(e) => return Json(AdmissionResponse::invalid(e.to_string()).into_review()),
    };
    let resp = AdmissionResponse::from(&req);
    let is_eviction = req.operation == Operation::Create
        && req.resource.resource == "pods"
        && req.sub_resource.as_deref() == Some("eviction");
    if !is_eviction {
        return Json(resp.into_review());
    }
    let ns = req.namespace.clone().unwrap_or_default();
    let span = tracing::info_span!("eviction", pod = %format!("{ns}/{}", req.name));
    let answer = answer(&client, &ns, &req.name, req.dry_run)
        .instrument(span.clone())
        .await
        // Never let a Pod that may have to move be killed because ferry could not look.
        .unwrap_or_else(|e| Answer::Refuse(format!("ferry could not check this pod: {e}")));
    let _enter = span.enter();
    Json(
        match answer {
            Answer::Allow(why) => {
                info!(%why, "eviction allowed");
                resp
            }
            Answer::Refuse(why) => {
                info!(%why, "eviction refused");
                refuse(resp, why)
            }
        }
        .into_review(),
    )
}

/// 429, as an exhausted disruption budget answers: `kubectl drain` retries.
fn refuse(mut resp: AdmissionResponse, message: String) -> AdmissionResponse {
    resp.allowed = false;
    resp.result = kube::core::Status::failure(&message, "TooManyRequests");
    resp.result.code = 429;
    resp
}

enum Answer {
    Allow(String),
    Refuse(String),
}

async fn answer(
    client: &Client,
    ns: &str,
    name: &str,
    dry_run: bool,
) -> Result<Answer, kube::Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let Some(pod) = pods.get_opt(name).await? else {
        return Ok(Answer::Allow("no such pod".into()));
    };
    // The Pod's label, else the MigrationPolicy that selects it; the policy also says
    // where drain moves it.
    let label = strategy_label(&pod);
    if matches!(label, Ok(Some(EvictionStrategy::None))) {
        return Ok(Answer::Allow("eviction strategy None".into()));
    }
    let chosen = selecting_policy(client, &pod).await?;
    let source = match (&label, &chosen) {
        (Ok(Some(s)), _) => format!("{EVICTION_STRATEGY_LABEL}={s:?}"),
        (_, Some(p)) => format!("MigrationPolicy {}", p.name_any()),
        _ => String::new(),
    };
    let target = chosen.as_ref().and_then(|p| p.spec.drain_target.clone());
    let strategy = match policy::eviction_strategy(label, chosen.as_ref()) {
        Ok(s) => s,
        Err(why) => return Ok(Answer::Refuse(why)),
    };
    if strategy == EvictionStrategy::None {
        return Ok(Answer::Allow("eviction strategy None".into()));
    }
    let uid = pod.uid().unwrap_or_default();
    let mig_name = migration_name(name, &uid);
    let migs: Api<Migration> = Api::namespaced(client.clone(), ns);
    let existing = migs.get_opt(&mig_name).await?;
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    match decide(strategy, not_movable(&pod).as_deref(), existing.as_ref()) {
        Verdict::Allow(why) => return Ok(Answer::Allow(why)),
        Verdict::Refuse(why) => return Ok(Answer::Refuse(why)),
        Verdict::StartMigration => {}
    }
    // Only a start needs the Node: whether its operator cordoned it.
    let cordoned = match &node {
        Some(n) => Api::<Node>::all(client.clone())
            .get_opt(n)
            .await?
            .and_then(|n| n.spec)
            .and_then(|s| s.unschedulable)
            .unwrap_or(false),
        None => false,
    };
    let node = node.unwrap_or_default();
    Ok(if !cordoned {
        Answer::Refuse(format!(
            "the pod asks to be migrated on eviction ({source}); ferry moves it off a \
             cordoned node only: cordon node {node} (kubectl drain does) and evict again"
        ))
    } else if dry_run {
        Answer::Refuse(format!(
            "a Migration {mig_name} would move this pod (dry run)"
        ))
    } else {
        start_migration(&migs, &mig_name, name, &node, target).await?;
        Answer::Refuse(format!(
            "ferry is migrating this pod off node {node} (Migration {mig_name}); the \
             eviction succeeds once it has moved"
        ))
    })
}

async fn start_migration(
    migs: &Api<Migration>,
    name: &str,
    pod: &str,
    node: &str,
    target: Option<ferry_crds::TargetRef>,
) -> Result<(), kube::Error> {
    let m: Migration = serde_json::from_value(serde_json::json!({
        "apiVersion": "ferry.dev/v1alpha1",
        "kind": "Migration",
        "metadata": {"name": name, "labels": {EVICTED_FROM_LABEL: node}},
        // Where the selecting policy's drainTarget says, else within this cluster, to
        // a node ferry picks (never a cordoned one).
        "spec": {"workload": {"pod": pod}, "target": target.unwrap_or_default()},
    }))
    .expect("a Migration");
    match migs.create(&PostParams::default(), &m).await {
        Ok(_) => {
            info!(migration = name, "started a Migration for the eviction");
            Ok(())
        }
        // Another replica, or an earlier retry, was first.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => {
            warn!(migration = name, "creating the Migration: {e}");
            Err(e)
        }
    }
}

/// The ValidatingWebhookConfiguration that sends evictions to the webhook, reached at
/// `client_config` (`{"url": …}` or `{"service": …}`, without the caBundle) and checked
/// against `ca_pem`.
///
/// `failurePolicy: Ignore`: while no controller answers, evictions proceed as if ferry
/// were not installed (a Pod labelled `LiveMigrate` is then evicted like any other;
/// see docs/drain.md). `sideEffects: NoneOnDryRun`: a dry-run eviction creates nothing.
pub fn configuration(client_config: serde_json::Value, ca_pem: &str) -> serde_json::Value {
    use base64::Engine as _;
    let mut client_config = client_config;
    client_config["caBundle"] = base64::engine::general_purpose::STANDARD
        .encode(ca_pem.as_bytes())
        .into();
    serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": "ferry-eviction"},
        "webhooks": [{
            "name": "eviction.ferry.dev",
            "clientConfig": client_config,
            "rules": [{
                "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                "resources": ["pods/eviction"], "scope": "Namespaced",
            }],
            "failurePolicy": "Ignore",
            "sideEffects": "NoneOnDryRun",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 10,
        }],
    })
}

/// Who may call the webhook: the apiserver, by the client certificate its
/// AdmissionConfiguration gives it for webhooks (`kubeConfigFile` of the
/// `ValidatingAdmissionWebhook` plugin): one that chains to `ca` and names one of
/// `names` (a DNS name in its subjectAltName).
#[derive(Debug, Clone)]
pub struct Callers {
    pub ca: std::path::PathBuf,
    pub names: Vec<String>,
}

/// Whether a (chain-verified) client certificate names an allowed caller.
pub fn allowed_caller(cert: &rustls_pki_types::CertificateDer<'_>, names: &[String]) -> bool {
    names.iter().any(|n| ferry_transfer::cert_names(cert, n))
}

/// Serves the webhook on `addr` with the certificate in `tls_dir` (`tls.crt`,
/// `tls.key`): the apiserver verifies it against the webhook configuration's caBundle,
/// and the webhook answers only `callers` (mutual TLS): whoever else reaches the port
/// learns nothing and starts nothing.
pub async fn serve(
    addr: std::net::SocketAddr,
    tls_dir: &std::path::Path,
    callers: &Callers,
    client: Client,
) -> std::io::Result<()> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{what} in {}: {e}", tls_dir.display()),
        )
    };
    let certs = CertificateDer::pem_file_iter(tls_dir.join("tls.crt"))
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad("tls.crt", &e))?;
    let key =
        PrivateKeyDer::from_pem_file(tls_dir.join("tls.key")).map_err(|e| bad("tls.key", &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let bad_ca = |e: &dyn std::fmt::Display| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("the webhook callers' CA {}: {e}", callers.ca.display()),
        )
    };
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&callers.ca).map_err(|e| bad_ca(&e))? {
        roots
            .add(ca.map_err(|e| bad_ca(&e))?)
            .map_err(|e| bad_ca(&e))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| bad_ca(&e))?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("TLS versions", &e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| bad("the certificate", &e))?;
    let listener = TlsListener::start(
        tokio::net::TcpListener::bind(addr).await?,
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        Arc::new(callers.names.clone()),
    )?;
    info!(%addr, "serving the eviction webhook");
    axum::serve(listener, router(client)).await
}

/// A TCP listener whose connections are TLS. Handshakes run side by side (one task
/// each, 5 s at most), so a client that stalls its handshake delays no other caller.
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(TlsStream, std::net::SocketAddr)>,
    local: std::net::SocketAddr,
}

type TlsStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

impl TlsListener {
    fn start(
        tcp: tokio::net::TcpListener,
        tls: tokio_rustls::TlsAcceptor,
        names: Arc<Vec<String>>,
    ) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                // Ends with the server (its receiver dropped), freeing the port.
                let accepted = tokio::select! {
                    _ = tx.closed() => return,
                    a = tcp.accept() => a,
                };
                let (conn, peer) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        warn!("accepting a webhook connection: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (acceptor, sender, names) = (tls.clone(), tx.clone(), names.clone());
                tokio::spawn(async move {
                    let handshake = acceptor.accept(conn);
                    match tokio::time::timeout(std::time::Duration::from_secs(5), handshake).await {
                        Ok(Ok(io)) => {
                            // The chain was verified in the handshake; now the name.
                            let named = io
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .is_some_and(|c| allowed_caller(c, &names));
                            if named {
                                let _ = sender.send((io, peer)).await;
                            } else {
                                warn!(%peer, "webhook caller's certificate names none of {names:?}: refused");
                            }
                        }
                        Ok(Err(e)) => warn!(%peer, "webhook TLS handshake: {e}"),
                        Err(_) => warn!(%peer, "webhook TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accepting task holds the sender until this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod caller_tests {
    use super::*;
    use rustls_pki_types::{CertificateDer, pem::PemObject};

    #[test]
    fn only_the_named_caller_is_allowed() {
        let pki = ferry_transfer::TestPki::generate().unwrap();
        let cert = |name: &str| {
            let (pem, _) = pki.issue_pem(name, &[]).unwrap();
            CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
        };
        let names = vec!["kube-apiserver-webhook-client".to_string()];
        assert!(allowed_caller(
            &cert("kube-apiserver-webhook-client"),
            &names
        ));
        assert!(!allowed_caller(
            &cert("kube-apiserver-kubelet-client"),
            &names
        ));
        assert!(!allowed_caller(&cert("kube-apiserver-webhook-client"), &[]));
    }
}
