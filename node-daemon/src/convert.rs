//! The one place where protobuf messages become domain types and back, and where
//! [`RuntimeError`] becomes a gRPC status.
use crate::error::RuntimeError;
use crate::runtime as d;
use crate::validate;
use ferry_proto::node::v1 as pb;
use ferry_transfer::{Pacer, S3Config, S3Credentials, Shaping};
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

fn invalid(why: String) -> RuntimeError {
    RuntimeError::InvalidArgument(why)
}

/// A pod reference: the namespace an RFC 1123 label, the pod name an RFC 1123
/// subdomain, the UID (when given) a lowercase UUID. An empty UID is legitimate: it
/// asks for the pod by namespace and name (DescribeWorkload of a pod found by name, the
/// target of a Migration whose target Pod is not created yet).
pub fn workload_ref(
    w: Option<pb::WorkloadRef>,
    what: &str,
) -> Result<d::WorkloadRef, RuntimeError> {
    let w = w.ok_or_else(|| invalid(format!("{what} is missing")))?;
    let w = d::WorkloadRef {
        namespace: w.namespace,
        pod_name: w.pod_name,
        pod_uid: w.pod_uid,
    };
    check_workload_ref(&w, what)?;
    Ok(w)
}

/// The rules of [`workload_ref`], for a reference already converted (runtimes check
/// again where they build paths from one).
pub fn check_workload_ref(w: &d::WorkloadRef, what: &str) -> Result<(), RuntimeError> {
    validate::namespace(&format!("{what}.namespace"), &w.namespace).map_err(invalid)?;
    validate::pod_name(&format!("{what}.pod_name"), &w.pod_name).map_err(invalid)?;
    if !w.pod_uid.is_empty() {
        validate::pod_uid(&format!("{what}.pod_uid"), &w.pod_uid).map_err(invalid)?;
    }
    Ok(())
}

pub fn workload_ref_pb(w: &d::WorkloadRef) -> pb::WorkloadRef {
    pb::WorkloadRef {
        namespace: w.namespace.clone(),
        pod_name: w.pod_name.clone(),
        pod_uid: w.pod_uid.clone(),
    }
}

/// A migration id: the Migration's UID, or another RFC 1123 label
/// ([`validate::migration_id`]).
pub fn migration_id(id: &str) -> Result<String, RuntimeError> {
    validate::migration_id("migration_id", id).map_err(invalid)?;
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
    let workload = workload_ref(w.workload, "workload.workload")?;
    let mut containers: Vec<d::ContainerInfo> = Vec::with_capacity(w.containers.len());
    for (i, c) in w.containers.into_iter().enumerate() {
        validate::container_name(&format!("workload.containers[{i}].name"), &c.name)
            .map_err(invalid)?;
        if !c.id.is_empty() {
            validate::container_id(&format!("workload.containers[{i}].id"), &c.id)
                .map_err(invalid)?;
        }
        if containers.iter().any(|o| o.name == c.name) {
            return Err(invalid(format!(
                "workload.containers[{i}].name {:?} is given twice; container names in a \
                 pod are unique",
                c.name
            )));
        }
        containers.push(d::ContainerInfo {
            name: c.name,
            id: c.id,
            pid: c.pid,
            rss_bytes: c.rss_bytes,
            writable_bytes: c.writable_bytes,
        });
    }
    Ok(d::WorkloadDescription {
        workload,
        kind,
        containers,
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

/// The page servers of a StartCheckpoint, validated: each container name an RFC 1123
/// label, each pipe the one the destination opens for that container of this migration
/// (`relay::pages_pipe`): nothing else is ever dialled.
pub fn page_servers(
    migration_id: &str,
    v: Vec<pb::PageServer>,
) -> Result<Vec<(String, String)>, RuntimeError> {
    v.into_iter()
        .enumerate()
        .map(|(i, p)| {
            validate::container_name(&format!("page_servers[{i}].container"), &p.container)
                .map_err(invalid)?;
            let expected = crate::relay::pages_pipe(migration_id, &p.container);
            if p.pipe != expected {
                return Err(invalid(format!(
                    "page_servers[{i}].pipe is {:?}; the destination serves the pages of \
                     container {} at {expected:?}",
                    p.pipe, p.container
                )));
            }
            Ok((p.container, p.pipe))
        })
        .collect()
}

/// PrepareReceiverRequest.source_peer: required, an IP address or DNS name.
pub fn source_peer(s: &str) -> Result<String, RuntimeError> {
    validate::peer_name("source_peer", s).map_err(invalid)?;
    Ok(s.to_string())
}

/// StartCheckpointRequest.token: required (PrepareReceiverResponse.token).
pub fn token(s: &str) -> Result<String, RuntimeError> {
    if s.is_empty() || s.len() > ferry_transfer::frame::MAX_TOKEN || !s.is_ascii() {
        return Err(invalid(
            "token must be PrepareReceiverResponse.token (1 to 128 ASCII characters)".into(),
        ));
    }
    Ok(s.to_string())
}

/// The source's images, validated: the container an RFC 1123 label, the image a
/// reference that cannot pass for an option of `crictl` (it becomes its argument), the
/// image id (when known) likewise.
pub fn images(v: Vec<pb::ContainerImage>) -> Result<Vec<d::ContainerImage>, RuntimeError> {
    v.into_iter()
        .enumerate()
        .map(|(i, c)| {
            validate::container_name(&format!("images[{i}].container"), &c.container)
                .map_err(invalid)?;
            validate::image_ref(&format!("images[{i}].image"), &c.image).map_err(invalid)?;
            if !c.image_id.is_empty() {
                validate::image_ref(&format!("images[{i}].image_id"), &c.image_id)
                    .map_err(invalid)?;
            }
            Ok(d::ContainerImage {
                container: c.container,
                image: c.image,
                image_id: c.image_id,
            })
        })
        .collect()
}

/// A peer daemon's `host:port` (StartCheckpointRequest.receive_endpoint).
pub fn receive_endpoint(s: &str) -> Result<String, RuntimeError> {
    validate::endpoint("receive_endpoint", s).map_err(invalid)?;
    Ok(s.to_string())
}

pub fn page_servers_pb(v: &[(String, String)]) -> Vec<pb::PageServer> {
    v.iter()
        .map(|(c, e)| pb::PageServer {
            container: c.clone(),
            pipe: e.clone(),
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
        wire_bytes: p.wire_bytes,
        dirty_bytes_per_sec: p.dirty_bytes_per_sec,
        downtime_ms: p.downtime_ms,
        elapsed_ms: p.elapsed_now(d::unix_ms()),
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
        committed: p.committed,
        no_copy: false,
    }
}

/// The bucket a migration's state goes through (`transfer.mode: ObjectStore`), or None
/// (Direct). Compression and the bandwidth cap apply to the direct path only: with a
/// bucket they are refused rather than ignored.
pub fn bucket(t: Option<&pb::TransferSpec>) -> Result<Option<S3Config>, RuntimeError> {
    let Some(t) = t else { return Ok(None) };
    match pb::TransferMode::try_from(t.mode) {
        Ok(pb::TransferMode::Unspecified | pb::TransferMode::Direct) => return Ok(None),
        Ok(pb::TransferMode::ObjectStore) => {}
        Err(_) => {
            return Err(RuntimeError::InvalidArgument(
                "unknown transfer mode".into(),
            ));
        }
    }
    let bad = |m: &str| {
        Err(RuntimeError::InvalidArgument(format!(
            "transfer.objectStore: {m}"
        )))
    };
    if t.compress || t.bandwidth_limit_bytes_per_sec > 0 {
        return Err(RuntimeError::InvalidArgument(
            "transfer.compress and transfer.bandwidthLimitMiBps apply to Direct transfers; \
             through a bucket the state moves as it is, at the store's pace: unset them"
                .into(),
        ));
    }
    let Some(o) = &t.object_store else {
        return bad("missing (mode ObjectStore needs a bucket)");
    };
    let credentials = S3Credentials {
        access_key: o.access_key_id.clone(),
        secret_key: o.secret_access_key.clone(),
        session_token: None,
    };
    match S3Config::locate(&o.endpoint, &o.region, &o.bucket, &o.prefix, credentials) {
        Ok(cfg) => Ok(Some(cfg)),
        Err(m) => bad(&m),
    }
}

/// zstd's fastest standard level: a migration's memory is large and its downtime
/// counts; level 1 already shrinks the zero-filled and repetitive pages that make
/// compression worth having.
pub const COMPRESS_LEVEL: i32 = 1;

/// What the migration's transfer settings do to the bytes this side sends: compression
/// (the peer decompresses: both sides get the same TransferSpec) and one bandwidth cap
/// for all of its streams and pipes together. Call once per migration per side.
pub fn shaping(t: Option<&pb::TransferSpec>) -> Shaping {
    Shaping {
        zstd_level: t.filter(|t| t.compress).map(|_| COMPRESS_LEVEL),
        pacer: Pacer::new(t.map_or(0, |t| t.bandwidth_limit_bytes_per_sec)),
        on_sent: None,
        on_received: None,
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

    fn wref(namespace: &str, pod_name: &str, pod_uid: &str) -> Option<pb::WorkloadRef> {
        Some(pb::WorkloadRef {
            namespace: namespace.into(),
            pod_name: pod_name.into(),
            pod_uid: pod_uid.into(),
        })
    }

    const UID: &str = "0b7c5a8e-1f0e-4c2a-9d8e-2f3a4b5c6d7e";

    #[test]
    fn workload_ref_refuses_a_namespace_that_leaves_a_directory() {
        let e = workload_ref(wref("../etc", "vm-y", ""), "target").unwrap_err();
        let status = status_of(&e);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains("target.namespace \"../etc\""),
            "{}",
            status.message()
        );
        assert!(
            status.message().contains("RFC 1123 label"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn workload_ref_checks_every_field() {
        let ok = workload_ref(wref("default", "vm-1.web", UID), "target").unwrap();
        assert_eq!(ok.pod_uid, UID);
        // No UID: the pod by namespace and name (DescribeWorkload, a target not created yet).
        assert!(workload_ref(wref("default", "vm-1", ""), "workload").is_ok());
        for (ns, name, uid, field) in [
            ("", "p", "", "target.namespace"),
            ("Default", "p", "", "target.namespace"),
            ("a/b", "p", "", "target.namespace"),
            ("n", "", "", "target.pod_name"),
            ("n", "../../x", "", "target.pod_name"),
            ("n", "a/b", "", "target.pod_name"),
            ("n", "p", "../../etc", "target.pod_uid"),
            ("n", "p", "u1", "target.pod_uid"),
        ] {
            match workload_ref(wref(ns, name, uid), "target") {
                Err(RuntimeError::InvalidArgument(m)) => assert!(m.starts_with(field), "{m}"),
                r => panic!("{ns:?}/{name:?}/{uid:?}: {r:?}"),
            }
        }
    }

    #[test]
    fn migration_ids_are_labels() {
        assert_eq!(migration_id(UID).unwrap(), UID);
        assert_eq!(migration_id("vm-live-1").unwrap(), "vm-live-1");
        for bad in ["", "../x", "a/b", "M", "-x"] {
            match migration_id(bad) {
                Err(RuntimeError::InvalidArgument(m)) => {
                    assert!(m.starts_with("migration_id "), "{m}")
                }
                r => panic!("{bad:?}: {r:?}"),
            }
        }
    }

    fn desc(containers: &[(&str, &str)]) -> Option<pb::WorkloadDescription> {
        Some(pb::WorkloadDescription {
            workload: wref("default", "web", UID),
            kind: pb::WorkloadKind::Containers as i32,
            containers: containers
                .iter()
                .map(|(name, id)| pb::ContainerInfo {
                    name: (*name).into(),
                    id: (*id).into(),
                    ..Default::default()
                })
                .collect(),
            runtime: "containers".into(),
            ..Default::default()
        })
    }

    #[test]
    fn descriptions_check_container_names() {
        let id = "f".repeat(64);
        let d = description(desc(&[("app", &id), ("side-car", "")])).unwrap();
        assert_eq!(d.containers.len(), 2);
        for (bad, field) in [
            (vec![("../x", id.as_str())], "workload.containers[0].name"),
            (vec![("app", "a/b")], "workload.containers[0].id"),
            (
                vec![("app", ""), ("App", "")],
                "workload.containers[1].name",
            ),
            (
                vec![("app", ""), ("app", "")],
                "workload.containers[1].name",
            ),
        ] {
            match description(desc(&bad)) {
                Err(RuntimeError::InvalidArgument(m)) => assert!(m.starts_with(field), "{m}"),
                r => panic!("{bad:?}: {r:?}"),
            }
        }
        let mut d = desc(&[]).unwrap();
        d.workload = wref("default", "..", "");
        assert!(matches!(
            description(Some(d)),
            Err(RuntimeError::InvalidArgument(m)) if m.starts_with("workload.workload.pod_name")
        ));
    }

    #[test]
    fn images_page_servers_and_endpoints() {
        let img = |container: &str, image: &str, image_id: &str| pb::ContainerImage {
            container: container.into(),
            image: image.into(),
            image_id: image_id.into(),
        };
        let ok = images(vec![
            img("app", "busybox:1.36", "sha256:0123"),
            img("b", "x", ""),
        ]);
        assert_eq!(ok.unwrap().len(), 2);
        assert!(images(vec![img("app", "--config=/x", "")]).is_err());
        assert!(images(vec![img("a/b", "busybox", "")]).is_err());
        assert!(images(vec![img("app", "busybox", "-x")]).is_err());
        let ps = |container: &str, pipe: &str| pb::PageServer {
            container: container.into(),
            pipe: pipe.into(),
        };
        assert_eq!(
            page_servers("m-1", vec![ps("app", "m-1/pages/app")]).unwrap(),
            vec![("app".to_string(), "m-1/pages/app".to_string())]
        );
        // Another migration's or container's pipe, a host:port, a bad name.
        assert!(page_servers("m-1", vec![ps("app", "m-2/pages/app")]).is_err());
        assert!(page_servers("m-1", vec![ps("app", "m-1/pages/db")]).is_err());
        assert!(page_servers("m-1", vec![ps("app", "10.0.0.2:5000")]).is_err());
        assert!(page_servers("m-1", vec![ps("../x", "m-1/pages/../x")]).is_err());
        assert!(receive_endpoint("10.0.0.2:7443").is_ok());
        assert!(receive_endpoint("10.0.0.2").is_err());
        assert!(source_peer("10.0.0.2").is_ok());
        assert!(source_peer("node-a.example").is_ok());
        for bad in ["", "10.0.0.2:7443", "a b", "-x/"] {
            assert!(source_peer(bad).is_err(), "{bad:?}");
        }
        assert!(token("").is_err());
        assert!(token(&"f".repeat(64)).is_ok());
        assert!(token(&"f".repeat(129)).is_err());
    }

    #[test]
    fn a_bucket_is_taken_whole_or_refused_with_the_field() {
        let store = |endpoint: &str, bucket: &str| pb::ObjectStore {
            endpoint: endpoint.into(),
            bucket: bucket.into(),
            access_key_id: "id".into(),
            secret_access_key: "secret".into(),
            ..Default::default()
        };
        let spec = |o: pb::ObjectStore| pb::TransferSpec {
            mode: pb::TransferMode::ObjectStore as i32,
            object_store: Some(o),
            ..Default::default()
        };
        assert!(bucket(None).unwrap().is_none());
        let direct = pb::TransferSpec {
            mode: pb::TransferMode::Direct as i32,
            compress: true,
            ..Default::default()
        };
        assert!(bucket(Some(&direct)).unwrap().is_none());
        let minio = bucket(Some(&spec(store("http://10.0.0.1:9000/", "b"))))
            .unwrap()
            .unwrap();
        assert_eq!(minio.endpoint, "http://10.0.0.1:9000");
        assert!(minio.path_style);
        assert_eq!(minio.region, "us-east-1");
        let aws = bucket(Some(&spec(store("", "b")))).unwrap().unwrap();
        assert_eq!(aws.endpoint, "https://s3.us-east-1.amazonaws.com");
        assert!(!aws.path_style);
        let refused = |t: pb::TransferSpec, why: &str| {
            let e = bucket(Some(&t)).unwrap_err().to_string();
            assert!(e.contains(why), "{why:?} not in {e}");
        };
        refused(spec(store("ftp://x", "b")), "not an http(s) URL");
        refused(spec(store("http://x", "")), "bucket name");
        refused(
            spec(pb::ObjectStore {
                secret_access_key: String::new(),
                ..store("http://x", "b")
            }),
            "no access key",
        );
        refused(
            pb::TransferSpec {
                compress: true,
                ..spec(store("http://x", "b"))
            },
            "apply to Direct transfers",
        );
        refused(
            pb::TransferSpec {
                object_store: None,
                ..spec(store("http://x", "b"))
            },
            "needs a bucket",
        );
    }
}
