//! Bad requests get clear gRPC errors, and nothing running is touched.
mod containers_support;

use containers_support::*;
use ferry_proto::node::v1 as pb;
use ferry_testkit::netns::Lan;
use ferry_testkit::process::ChildGuard;
use std::time::Duration;
use tonic::Code;

fn checkpoint_req(id: &str, pod: &pb::WorkloadRef) -> pb::StartCheckpointRequest {
    pb::StartCheckpointRequest {
        migration_id: id.into(),
        workload: Some(pod.clone()),
        strategy: pb::Strategy::Cold as i32,
        transfer: None,
        receive_endpoint: "10.213.250.250:1".into(),
        leave_running: true,
        page_servers: vec![pb::PageServer {
            container: "app".into(),
            endpoint: "10.213.250.250:2".into(),
        }],
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_a_clear_error_and_kills_nothing() -> anyhow::Result<()> {
    let criu = require_criu();
    let base = tempfile::tempdir()?;
    let cg = CgroupGuard::new("test");
    let lan = Lan::create()?;
    let mut a = Daemon::start(&lan, "a", base.path(), &criu, &format!("/{}/r", cg.0)).await?;

    // A healthy pod that must survive everything below.
    let live = pod("bystander");
    let bundle = base.path().join("bundle-live");
    write_bundle(
        &bundle,
        &live,
        "app",
        COUNTER_SCRIPT,
        &format!("/{}/a/live", cg.0),
    )?;
    a.containers.run(&a.node, &bundle, "bystander-app")?;
    // A pod whose only container has already exited.
    let gone = pod("gone");
    let gbundle = base.path().join("bundle-gone");
    write_bundle(
        &gbundle,
        &gone,
        "app",
        "exit 0",
        &format!("/{}/a/gone", cg.0),
    )?;
    a.containers.run(&a.node, &gbundle, "gone-app")?;
    // A plain process that is no runc container (what a wrong pod name would point at).
    let mut sleeper = ChildGuard::spawn("sleeper", {
        let mut c = in_node(&a.node, "sleep");
        c.arg("300");
        c
    })?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let unknown = pod("no-such-pod");
    let e = a
        .client
        .describe_workload(unknown.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(
        e.message().contains("default/no-such-pod"),
        "{}",
        e.message()
    );

    let e = a
        .client
        .start_checkpoint(checkpoint_req("m1", &unknown))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // The sleeper runs, but is not a runc container of any pod: NotFound, left alone.
    let e = a
        .client
        .start_checkpoint(checkpoint_req("m2", &pod("sleeper")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(!sleeper.exited(), "a non-runc process is never touched");

    // Container already gone (exited): refused before anything is frozen.
    assert_eq!(
        runc_status(&a.runc_root, "gone-app").as_deref(),
        Some("stopped")
    );
    let e = a
        .client
        .start_checkpoint(checkpoint_req("m3", &gone))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("is stopped, not running"),
        "{}",
        e.message()
    );
    // Missing page server for a container: the request is incomplete.
    let e = a
        .client
        .start_checkpoint(pb::StartCheckpointRequest {
            page_servers: vec![],
            ..checkpoint_req("m6", &live)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    let e = a
        .client
        .start_checkpoint(checkpoint_req("", &live))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = a
        .client
        .start_checkpoint(pb::StartCheckpointRequest {
            workload: None,
            ..checkpoint_req("m4", &live)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Pre-copy (no soft-dirty tracking in this kernel) is reported with its reason, not
    // silently run as something else.
    let v = a.client.version(pb::VersionRequest {}).await?.into_inner();
    let pre = v
        .strategy_support
        .iter()
        .find(|s| s.strategy == pb::Strategy::PreCopy as i32)
        .unwrap();
    assert!(!pre.available && !pre.reason.is_empty(), "{pre:?}");
    let e = a
        .client
        .start_checkpoint(pb::StartCheckpointRequest {
            strategy: pb::Strategy::PreCopy as i32,
            ..checkpoint_req("m5", &live)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");

    let e = a
        .client
        .get_operation(pb::MigrationRef {
            migration_id: "never".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    assert_eq!(
        runc_status(&a.runc_root, "bystander-app").as_deref(),
        Some("running")
    );
    Ok(())
}
