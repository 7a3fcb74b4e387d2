//! [`NodeAgent`] over the node daemon's gRPC API. This module is the one place where
//! proto types turn into domain types and back. A node's daemon announces itself with
//! the Node annotation `ferry.dev/node-daemon: https://IP:PORT` (each daemon writes it on
//! its own Node at start, `ferry-node --register-node`). Every connection is mutual TLS:
//! the daemon's certificate must chain to the cluster-set CA and name the endpoint's
//! host; the controller presents its own, which the daemon requires.
use super::*;
use crate::clusters::Clusters;
use ferry_proto::node::v1 as pb;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use pb::node_agent_client::NodeAgentClient;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::Mutex;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

pub use ferry_proto::DAEMON_ANNOTATION;

pub struct GrpcAgent {
    clusters: Arc<Clusters>,
    tls: ClientTlsConfig,
    /// Per node: the channel to its daemon and the endpoint's host (the name the
    /// daemon's certificate carries).
    channels: Mutex<HashMap<NodeRef, (Channel, String)>>,
}

/// The controller's side of the control channel's mutual TLS, from a directory laid out
/// like a mounted kubernetes.io/tls Secret plus the CA: `tls.crt` (naming the
/// controller, `ferry-controller` unless the daemons are told otherwise), `tls.key`,
/// `ca.crt` (the CA the daemons' certificates chain to).
pub fn client_tls(dir: &std::path::Path) -> std::io::Result<ClientTlsConfig> {
    // tonic's TLS takes the process-wide provider; several may be compiled in.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let read = |f: &str| {
        let p = dir.join(f);
        std::fs::read(&p)
            .map_err(|e| std::io::Error::new(e.kind(), format!("reading {}: {e}", p.display())))
    };
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.crt")?))
        .identity(Identity::from_pem(read("tls.crt")?, read("tls.key")?)))
}

impl GrpcAgent {
    pub fn new(clusters: Arc<Clusters>, tls: ClientTlsConfig) -> Self {
        GrpcAgent {
            clusters,
            tls,
            channels: Mutex::default(),
        }
    }

    async fn client(&self, node: &NodeRef) -> Result<NodeAgentClient<Channel>, AgentError> {
        Ok(self.daemon(node).await?.0)
    }

    /// A client of the node's daemon and the host of its endpoint.
    async fn daemon(
        &self,
        node: &NodeRef,
    ) -> Result<(NodeAgentClient<Channel>, String), AgentError> {
        if let Some((ch, host)) = self.channels.lock().await.get(node) {
            return Ok((NodeAgentClient::new(ch.clone()), host.clone()));
        }
        let unavailable = |message: String| AgentError::Unavailable {
            node: node.to_string(),
            message,
        };
        let client = self
            .clusters
            .client(node.cluster.as_deref())
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let n = Api::<Node>::all(client)
            .get(&node.node)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let endpoint = n
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DAEMON_ANNOTATION))
            .cloned()
            .ok_or_else(|| AgentError::Rejected {
                node: node.to_string(),
                message: format!("no ferry node daemon on this node (Node annotation {DAEMON_ANNOTATION} is missing)"),
            })?;
        if !endpoint.starts_with("https://") {
            return Err(AgentError::Rejected {
                node: node.to_string(),
                message: format!(
                    "the node's daemon endpoint {endpoint:?} ({DAEMON_ANNOTATION}) is not \
                     https://: the control channel is mutual TLS only"
                ),
            });
        }
        let host = endpoint_host(&endpoint).ok_or_else(|| AgentError::Rejected {
            node: node.to_string(),
            message: format!("the node's daemon endpoint {endpoint:?} has no host"),
        })?;
        let channel = Channel::from_shared(endpoint.clone())
            .map_err(|e| unavailable(format!("bad endpoint {endpoint:?}: {e}")))?
            // The daemon must prove it is this Node's: its certificate names the Node.
            // The annotation is only where to dial; whoever may patch Nodes cannot send
            // the controller (and with it a workload's state) to another node's daemon.
            .tls_config(self.tls.clone().domain_name(node.node.clone()))
            .map_err(|e| unavailable(format!("TLS for {endpoint:?}: {e}")))?
            .connect_timeout(std::time::Duration::from_secs(5))
            // Every call is bounded: a hung daemon must not freeze the Migration (and
            // with it its own timeouts). The longest calls wait for the kubelet
            // (PrepareReceiver up to 10 s, Finalize up to 10 s).
            .timeout(CALL_TIMEOUT)
            .connect_lazy();
        self.channels
            .lock()
            .await
            .insert(node.clone(), (channel.clone(), host.clone()));
        Ok((NodeAgentClient::new(channel), host))
    }
}

/// The host of `https://HOST:PORT[/]` (brackets of an IPv6 address removed).
fn endpoint_host(endpoint: &str) -> Option<String> {
    let rest = endpoint.strip_prefix("https://")?.trim_end_matches('/');
    let (host, _port) = rest.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_string())
}

/// The deadline of one call to a daemon.
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

fn status_error(node: &NodeRef, migration_id: &str, s: tonic::Status) -> AgentError {
    use tonic::Code;
    let node = node.to_string();
    match s.code() {
        // tonic reports its own client-side deadline as Cancelled ("Timeout expired").
        Code::Cancelled => AgentError::Unavailable {
            node,
            message: format!("no answer within {CALL_TIMEOUT:?}: {}", s.message()),
        },
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Unknown => AgentError::Unavailable {
            node,
            message: with_causes(&s),
        },
        Code::NotFound if !migration_id.is_empty() && s.message().contains(migration_id) => {
            AgentError::UnknownMigration {
                node,
                migration_id: migration_id.into(),
            }
        }
        _ => AgentError::Rejected {
            node,
            message: format!("{:?}: {}", s.code(), s.message()),
        },
    }
}

/// A status's message with the errors beneath it (a failed handshake says why only
/// there, e.g. "certificate not valid for name").
fn with_causes(s: &tonic::Status) -> String {
    let mut message = s.message().to_string();
    let mut cause = std::error::Error::source(s);
    while let Some(e) = cause {
        message.push_str(": ");
        message.push_str(&e.to_string());
        cause = e.source();
    }
    message
}

fn pod_ref(p: &PodId) -> pb::WorkloadRef {
    pb::WorkloadRef {
        namespace: p.namespace.clone(),
        pod_name: p.name.clone(),
        pod_uid: p.uid.clone(),
    }
}

/// What `Live` means depends on the workload: a VM live-migrates with QEMU's pre-copy
/// (post-copy only when allowed, as the fallback for a guest that does not converge);
/// containers move with CRIU lazy pages, since CRIU's pre-copy needs soft-dirty memory
/// tracking that many kernels lack and would not shorten the final stop much.
fn strategy(plan: &Plan) -> pb::Strategy {
    match (plan.strategy, plan.kind, plan.allow_post_copy) {
        (Strategy::Cold, _, _) => pb::Strategy::Cold,
        (Strategy::Live, WorkloadKind::VirtualMachine, false) => pb::Strategy::PreCopy,
        (Strategy::Live, WorkloadKind::VirtualMachine, true) => pb::Strategy::PostCopy,
        (Strategy::Live, WorkloadKind::Containers, _) => pb::Strategy::PostCopy,
    }
}

fn transfer(plan: &Plan) -> pb::TransferSpec {
    pb::TransferSpec {
        mode: match plan.transfer {
            TransferMode::Direct => pb::TransferMode::Direct,
            TransferMode::ObjectStore => pb::TransferMode::ObjectStore,
        } as i32,
        object_store: plan.object_store.as_ref().map(|o| pb::ObjectStore {
            endpoint: o.endpoint.clone(),
            bucket: o.bucket.clone(),
            region: o.region.clone(),
            prefix: o.prefix.clone(),
            access_key_id: o.access_key_id.clone(),
            secret_access_key: o.secret_access_key.clone(),
        }),
        bandwidth_limit_bytes_per_sec: plan.bandwidth_limit_bytes_per_sec,
        compress: plan.compress,
    }
}

fn criu(plan: &Plan) -> pb::CriuOptions {
    pb::CriuOptions {
        file_locks: plan.criu.file_locks,
        external_unix_sockets: plan.criu.external_unix_sockets,
        tcp_keep: plan.criu.tcp_connections == ferry_crds::TcpConnections::Restore,
    }
}

fn op_status(node: &NodeRef, op: pb::Operation) -> OpStatus {
    let stage = match op.stage() {
        pb::Stage::Checkpointing => OpStage::Checkpointing,
        pb::Stage::Transferring => OpStage::Transferring,
        pb::Stage::Restoring => OpStage::Restoring,
        pb::Stage::Finalizing => OpStage::Finalizing,
        pb::Stage::Aborting => OpStage::Aborting,
        pb::Stage::Prepared | pb::Stage::Unspecified => OpStage::Prepared,
    };
    let state = match op.state() {
        pb::OperationState::Succeeded => OpState::Succeeded,
        pb::OperationState::Failed => OpState::Failed,
        pb::OperationState::Aborted => OpState::Aborted,
        pb::OperationState::Running | pb::OperationState::Unspecified => OpState::Running,
    };
    OpStatus {
        stage,
        state,
        bytes_done: op.bytes_done,
        bytes_total: op.bytes_total,
        wire_bytes: op.wire_bytes,
        dirty_bytes_per_sec: op.dirty_bytes_per_sec,
        downtime_ms: (op.downtime_ms > 0).then_some(op.downtime_ms),
        committed: op.committed,
        no_copy: op.no_copy,
        message: op.message,
        steps: op
            .steps
            .into_iter()
            .map(|s| ferry_crds::StepTiming {
                name: s.name,
                node: node.node.clone(),
                start_ms: s.start_unix_ms,
                duration_ms: s.duration_ms,
            })
            .collect(),
    }
}

#[async_trait::async_trait]
impl NodeAgent for GrpcAgent {
    async fn receiving_runtimes(&self, node: &NodeRef) -> Result<Vec<String>, AgentError> {
        let v = self
            .client(node)
            .await?
            .version(pb::VersionRequest {})
            .await
            .map_err(|s| status_error(node, "", s))?;
        Ok(v.into_inner().receiving_runtimes)
    }

    async fn describe(&self, node: &NodeRef, pod: &PodId) -> Result<WorkloadInfo, AgentError> {
        let d = self
            .client(node)
            .await?
            .describe_workload(pod_ref(pod))
            .await
            .map_err(|s| status_error(node, "", s))?;
        let d = d.into_inner();
        let kind = match d.kind() {
            pb::WorkloadKind::VirtualMachine => WorkloadKind::VirtualMachine,
            _ => WorkloadKind::Containers,
        };
        Ok(WorkloadInfo {
            kind,
            containers: d.containers.into_iter().map(|c| c.name).collect(),
            memory_bytes: d.memory_bytes,
        })
    }

    async fn prepare_receiver(&self, node: &NodeRef, plan: &Plan) -> Result<Receiver, AgentError> {
        // The receiver sizes itself from the source's current description (containers,
        // memory), read now rather than stored, so it matches what will be checkpointed.
        let source = &plan.source_node;
        let (mut source_client, source_peer) = self.daemon(source).await?;
        let description = source_client
            .describe_workload(pod_ref(&plan.source))
            .await
            .map_err(|s| status_error(source, "", s))?
            .into_inner();
        let req = pb::PrepareReceiverRequest {
            migration_id: plan.migration_id.clone(),
            workload: Some(description),
            target: Some(pod_ref(&plan.target)),
            strategy: strategy(plan) as i32,
            transfer: Some(transfer(plan)),
            criu: Some(criu(plan)),
            images: plan
                .images
                .iter()
                .map(|i| pb::ContainerImage {
                    container: i.container.clone(),
                    image: i.image.clone(),
                    image_id: i.image_id.clone(),
                })
                .collect(),
            // Only the source daemon (its certificate names this host) may send.
            source_peer,
        };
        let r = self
            .client(node)
            .await?
            .prepare_receiver(req)
            .await
            .map_err(|s| status_error(node, "", s))?;
        let r = r.into_inner();
        Ok(Receiver {
            endpoint: r.receive_endpoint,
            page_servers: r
                .page_servers
                .into_iter()
                .map(|p| ferry_crds::PageServer {
                    container: p.container,
                    pipe: p.pipe,
                })
                .collect(),
            token: r.token,
        })
    }

    async fn start_checkpoint(
        &self,
        node: &NodeRef,
        plan: &Plan,
        receiver: &Receiver,
    ) -> Result<OpStatus, AgentError> {
        let req = pb::StartCheckpointRequest {
            migration_id: plan.migration_id.clone(),
            workload: Some(pod_ref(&plan.source)),
            strategy: strategy(plan) as i32,
            transfer: Some(transfer(plan)),
            receive_endpoint: receiver.endpoint.clone(),
            leave_running: true,
            page_servers: receiver
                .page_servers
                .iter()
                .map(|p| pb::PageServer {
                    container: p.container.clone(),
                    pipe: p.pipe.clone(),
                })
                .collect(),
            criu: Some(criu(plan)),
            token: receiver.token.clone(),
        };
        let r = self.client(node).await?.start_checkpoint(req).await;
        Ok(op_status(
            node,
            r.map_err(|s| status_error(node, &plan.migration_id, s))?
                .into_inner(),
        ))
    }

    async fn start_restore(&self, node: &NodeRef, plan: &Plan) -> Result<OpStatus, AgentError> {
        let req = pb::StartRestoreRequest {
            migration_id: plan.migration_id.clone(),
            target: Some(pod_ref(&plan.target)),
        };
        let r = self.client(node).await?.start_restore(req).await;
        Ok(op_status(
            node,
            r.map_err(|s| status_error(node, &plan.migration_id, s))?
                .into_inner(),
        ))
    }

    async fn finalize(&self, node: &NodeRef, id: &str) -> Result<OpStatus, AgentError> {
        let r = self
            .client(node)
            .await?
            .finalize(pb::MigrationRef {
                migration_id: id.into(),
            })
            .await;
        Ok(op_status(
            node,
            r.map_err(|s| status_error(node, id, s))?.into_inner(),
        ))
    }

    async fn fence(&self, node: &NodeRef, id: &str) -> Result<bool, AgentError> {
        let r = self
            .client(node)
            .await?
            .fence(pb::MigrationRef {
                migration_id: id.into(),
            })
            .await;
        Ok(r.map_err(|s| status_error(node, id, s))?
            .into_inner()
            .committed)
    }

    async fn abort(&self, node: &NodeRef, id: &str) -> Result<OpStatus, AgentError> {
        let r = self
            .client(node)
            .await?
            .abort(pb::MigrationRef {
                migration_id: id.into(),
            })
            .await;
        Ok(op_status(
            node,
            r.map_err(|s| status_error(node, id, s))?.into_inner(),
        ))
    }

    async fn operation_settled(&self, node: &NodeRef, id: &str) -> Result<(), AgentError> {
        let r = self
            .client(node)
            .await?
            .watch_progress(pb::MigrationRef {
                migration_id: id.into(),
            })
            .await;
        // The current state first, then every change; the stream ends after the first
        // state that is not Running (or when the daemon forgets the operation).
        let mut stream = r.map_err(|s| status_error(node, id, s))?.into_inner();
        while let Some(op) = stream
            .message()
            .await
            .map_err(|s| status_error(node, id, s))?
        {
            if op_status(node, op).state != OpState::Running {
                break;
            }
        }
        Ok(())
    }

    async fn operation(&self, node: &NodeRef, id: &str) -> Result<OpStatus, AgentError> {
        let r = self
            .client(node)
            .await?
            .get_operation(pb::MigrationRef {
                migration_id: id.into(),
            })
            .await;
        Ok(op_status(
            node,
            r.map_err(|s| status_error(node, id, s))?.into_inner(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_host_is_the_name_the_certificate_carries() {
        assert_eq!(
            endpoint_host("https://10.0.0.2:7070").as_deref(),
            Some("10.0.0.2")
        );
        assert_eq!(
            endpoint_host("https://[fd00::2]:7070/").as_deref(),
            Some("fd00::2")
        );
        assert_eq!(endpoint_host("https://:7070"), None);
        assert_eq!(endpoint_host("http://10.0.0.2:7070"), None);
    }

    fn plan(kind: WorkloadKind, strategy: Strategy, allow_post_copy: bool) -> Plan {
        let pod = PodId {
            namespace: "ns".into(),
            name: "p".into(),
            uid: String::new(),
        };
        Plan {
            migration_id: "m".into(),
            source_node: NodeRef {
                cluster: None,
                node: "n".into(),
            },
            source: pod.clone(),
            target: pod,
            kind,
            strategy,
            allow_post_copy,
            transfer: TransferMode::Direct,
            object_store: None,
            compress: false,
            bandwidth_limit_bytes_per_sec: 0,
            criu: Default::default(),
            images: Vec::new(),
        }
    }

    #[test]
    fn live_means_pre_copy_for_vms_and_lazy_pages_for_containers() {
        use WorkloadKind::*;
        let s = |k, st, pc| strategy(&plan(k, st, pc));
        assert_eq!(
            s(VirtualMachine, Strategy::Live, false),
            pb::Strategy::PreCopy
        );
        assert_eq!(
            s(VirtualMachine, Strategy::Live, true),
            pb::Strategy::PostCopy
        );
        assert_eq!(s(Containers, Strategy::Live, false), pb::Strategy::PostCopy);
        assert_eq!(s(Containers, Strategy::Cold, true), pb::Strategy::Cold);
        assert_eq!(s(VirtualMachine, Strategy::Cold, false), pb::Strategy::Cold);
    }
}
