//! The one place where protobuf messages become domain types and back, and where
//! [`RuntimeError`] becomes a gRPC status.
use crate::error::RuntimeError;
use crate::runtime as d;
use ferry_proto::node::v1 as pb;
use tonic::{Code, Status};

/// Every typed error's gRPC code, decided here only.
pub fn status_of(e: &RuntimeError) -> Status {
    let code = match e {
        RuntimeError::NotFound(_) => Code::NotFound,
        RuntimeError::InvalidArgument(_) => Code::InvalidArgument,
        RuntimeError::FailedPrecondition(_) => Code::FailedPrecondition,
        RuntimeError::Unavailable(_) => Code::Unimplemented,
        RuntimeError::Command { .. } | RuntimeError::Io { .. } => Code::Internal,
        RuntimeError::Transfer(_) => Code::Unavailable,
        RuntimeError::Aborted(_) => Code::Aborted,
    };
    Status::new(code, e.to_string())
}

impl From<RuntimeError> for Status {
    fn from(e: RuntimeError) -> Status {
        status_of(&e)
    }
}

pub fn workload_ref(
    w: Option<pb::WorkloadRef>,
    what: &str,
) -> Result<d::WorkloadRef, RuntimeError> {
    let w = w.ok_or_else(|| RuntimeError::InvalidArgument(format!("{what} is missing")))?;
    if w.namespace.is_empty() || w.pod_name.is_empty() {
        return Err(RuntimeError::InvalidArgument(format!(
            "{what} needs namespace and pod_name"
        )));
    }
    Ok(d::WorkloadRef {
        namespace: w.namespace,
        pod_name: w.pod_name,
        pod_uid: w.pod_uid,
    })
}

pub fn workload_ref_pb(w: &d::WorkloadRef) -> pb::WorkloadRef {
    pb::WorkloadRef {
        namespace: w.namespace.clone(),
        pod_name: w.pod_name.clone(),
        pod_uid: w.pod_uid.clone(),
    }
}

pub fn migration_id(id: &str) -> Result<String, RuntimeError> {
    if id.is_empty() {
        return Err(RuntimeError::InvalidArgument(
            "migration_id is empty".into(),
        ));
    }
    Ok(id.to_string())
}

pub fn strategy(s: i32) -> Result<d::Strategy, RuntimeError> {
    match pb::Strategy::try_from(s) {
        Ok(pb::Strategy::Cold) | Ok(pb::Strategy::Unspecified) => Ok(d::Strategy::Cold),
        Ok(pb::Strategy::PreCopy) => Ok(d::Strategy::PreCopy),
        Ok(pb::Strategy::PostCopy) => Ok(d::Strategy::PostCopy),
        Err(_) => Err(RuntimeError::InvalidArgument(format!(
            "unknown strategy {s}"
        ))),
    }
}

pub fn strategy_pb(s: d::Strategy) -> pb::Strategy {
    match s {
        d::Strategy::Cold => pb::Strategy::Cold,
        d::Strategy::PreCopy => pb::Strategy::PreCopy,
        d::Strategy::PostCopy => pb::Strategy::PostCopy,
    }
}

pub fn support_pb(s: &d::StrategySupport) -> pb::StrategySupport {
    pb::StrategySupport {
        strategy: strategy_pb(s.strategy) as i32,
        available: s.available,
        reason: s.reason.clone(),
    }
}

pub fn description_pb(w: &d::WorkloadDescription) -> pb::WorkloadDescription {
    pb::WorkloadDescription {
        workload: Some(workload_ref_pb(&w.workload)),
        kind: match w.kind {
            d::WorkloadKind::Containers => pb::WorkloadKind::Containers,
            d::WorkloadKind::VirtualMachine => pb::WorkloadKind::VirtualMachine,
        } as i32,
        containers: w
            .containers
            .iter()
            .map(|c| pb::ContainerInfo {
                name: c.name.clone(),
                id: c.id.clone(),
                pid: c.pid,
                rss_bytes: c.rss_bytes,
                writable_bytes: c.writable_bytes,
            })
            .collect(),
        memory_bytes: w.memory_bytes,
        runtime_spec: w.runtime_spec.clone(),
        runtime: w.runtime.clone(),
    }
}

pub fn description(
    w: Option<pb::WorkloadDescription>,
) -> Result<d::WorkloadDescription, RuntimeError> {
    let w =
        w.ok_or_else(|| RuntimeError::InvalidArgument("workload description is missing".into()))?;
    let kind = match pb::WorkloadKind::try_from(w.kind) {
        Ok(pb::WorkloadKind::Containers) => d::WorkloadKind::Containers,
        Ok(pb::WorkloadKind::VirtualMachine) => d::WorkloadKind::VirtualMachine,
        _ => {
            return Err(RuntimeError::InvalidArgument(
                "workload kind is unspecified".into(),
            ));
        }
    };
    Ok(d::WorkloadDescription {
        workload: workload_ref(w.workload, "workload.workload")?,
        kind,
        containers: w
            .containers
            .into_iter()
            .map(|c| d::ContainerInfo {
                name: c.name,
                id: c.id,
                pid: c.pid,
                rss_bytes: c.rss_bytes,
                writable_bytes: c.writable_bytes,
            })
            .collect(),
        memory_bytes: w.memory_bytes,
        runtime_spec: w.runtime_spec,
        runtime: w.runtime,
    })
}

pub fn criu_options(o: Option<pb::CriuOptions>) -> d::CriuOptions {
    let o = o.unwrap_or_default();
    d::CriuOptions {
        file_locks: o.file_locks,
        external_unix_sockets: o.external_unix_sockets,
        tcp_keep: o.tcp_keep,
    }
}

pub fn page_servers(v: Vec<pb::PageServer>) -> Vec<(String, String)> {
    v.into_iter().map(|p| (p.container, p.endpoint)).collect()
}

pub fn page_servers_pb(v: &[(String, String)]) -> Vec<pb::PageServer> {
    v.iter()
        .map(|(c, e)| pb::PageServer {
            container: c.clone(),
            endpoint: e.clone(),
        })
        .collect()
}

pub fn operation_pb(p: &d::Progress) -> pb::Operation {
    pb::Operation {
        migration_id: p.migration_id.clone(),
        stage: match p.stage {
            d::Stage::Unspecified => pb::Stage::Unspecified,
            d::Stage::Prepared => pb::Stage::Prepared,
            d::Stage::Checkpointing => pb::Stage::Checkpointing,
            d::Stage::Transferring => pb::Stage::Transferring,
            d::Stage::Restoring => pb::Stage::Restoring,
            d::Stage::Finalizing => pb::Stage::Finalizing,
            d::Stage::Aborting => pb::Stage::Aborting,
        } as i32,
        state: match p.state {
            d::OpState::Running => pb::OperationState::Running,
            d::OpState::Succeeded => pb::OperationState::Succeeded,
            d::OpState::Failed => pb::OperationState::Failed,
            d::OpState::Aborted => pb::OperationState::Aborted,
        } as i32,
        bytes_done: p.bytes_done,
        bytes_total: p.bytes_total,
        downtime_ms: p.downtime_ms,
        elapsed_ms: p.elapsed_ms,
        message: p.message.clone(),
        steps: p
            .steps
            .iter()
            .map(|s| pb::Step {
                name: s.name.clone(),
                start_unix_ms: s.start_unix_ms,
                duration_ms: s.duration_ms,
            })
            .collect(),
    }
}

/// The daemons move state directly (mutual-TLS streams); the object-store path of
/// ferry-transfer is not wired into them yet, so such a request is refused rather than
/// silently sent another way.
pub fn check_transfer(t: Option<&pb::TransferSpec>) -> Result<(), RuntimeError> {
    match t.map(|t| pb::TransferMode::try_from(t.mode)) {
        None | Some(Ok(pb::TransferMode::Unspecified | pb::TransferMode::Direct)) => Ok(()),
        Some(Ok(pb::TransferMode::ObjectStore)) => Err(RuntimeError::Unavailable(
            "transfer mode ObjectStore: this ferry-node moves state only directly between \
             daemons; use transfer.mode Direct"
                .into(),
        )),
        Some(Err(_)) => Err(RuntimeError::InvalidArgument(
            "unknown transfer mode".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes() {
        assert_eq!(
            status_of(&RuntimeError::NotFound("x".into())).code(),
            Code::NotFound
        );
        assert_eq!(
            status_of(&RuntimeError::FailedPrecondition("x".into())).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            status_of(&RuntimeError::Unavailable("x".into())).code(),
            Code::Unimplemented
        );
    }

    #[test]
    fn missing_pod_name_is_invalid() {
        let r = workload_ref(
            Some(pb::WorkloadRef {
                namespace: "n".into(),
                ..Default::default()
            }),
            "workload",
        );
        assert!(matches!(r, Err(RuntimeError::InvalidArgument(_))));
    }
}
