//! The restore markers are ferry's controller's to set: a real kube-apiserver with
//! `crds/yaml/admission.yaml` applied refuses a Pod that carries `ferry.dev/migration`
//! or `ferry.dev/incoming` from anyone without the `restore` verb on Migrations, with a
//! message that says what to do, and lets everything else about such Pods through.
mod common;

use anyhow::{Context as _, Result, bail, ensure};
use common::{env, wait_for};
use ferry_crds::{INCOMING_ANNOTATION, MIGRATION_ANNOTATION};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use std::time::Duration;

const NS: &str = "admission";

/// A client for `west` acting as `user` (impersonated by the admin identity).
async fn client_as(user: &str) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(&env().cluster("west").kubeconfig)?;
    let mut config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    config.auth_info.impersonate = Some(user.into());
    config.auth_info.impersonate_groups = Some(vec!["system:authenticated".into()]);
    Ok(kube::Client::try_from(config)?)
}

fn pod(name: &str, annotations: serde_json::Value) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]}
    }))?)
}

/// The apiserver's refusal of `r`: 403 naming the marker, the user and the RBAC verb.
fn expect_refused<T: std::fmt::Debug>(r: kube::Result<T>, marker: &str) -> Result<()> {
    match r {
        Err(kube::Error::Api(s)) if s.code == 403 => {
            for part in [marker, "alice", "verb \"restore\"", "ferry-restore"] {
                ensure!(
                    s.message.contains(part),
                    "refusal does not name {part}: {}",
                    s.message
                );
            }
            Ok(())
        }
        other => bail!("expected a 403 refusal naming {marker}, got {other:?}"),
    }
}

#[tokio::test]
async fn only_the_controller_may_mark_a_pod_for_restore() -> Result<()> {
    let admin = env().client("west").await?;
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NS}}))?;
    Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    // alice may manage Pods in the namespace, as a developer would.
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "pods"},
        "rules": [{"apiGroups": [""], "resources": ["pods"],
                   "verbs": ["get", "create", "update", "patch", "delete"]}]
    }))?;
    Api::<Role>::namespaced(admin.clone(), NS)
        .create(&PostParams::default(), &role)
        .await?;
    let binding = |name: &str, kind: &str, role: &str| -> Result<RoleBinding> {
        Ok(serde_json::from_value(json!({
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}]
        }))?)
    };
    let bindings: Api<RoleBinding> = Api::namespaced(admin.clone(), NS);
    bindings
        .create(
            &PostParams::default(),
            &binding("alice-pods", "Role", "pods")?,
        )
        .await?;

    let alice: Api<Pod> = Api::namespaced(client_as("alice").await?, NS);
    let admin_pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let pp = PostParams::default();

    // The policy was applied with the CRDs; wait until the apiserver enforces it (a
    // Pod that got through before that is deleted and the attempt repeated).
    let mut attempt = 0;
    wait_for(
        Duration::from_secs(60),
        "the restore-marker policy in force",
        || {
            attempt += 1;
            let name = format!("probe-{attempt}");
            let alice = alice.clone();
            async move {
                let marked = pod(&name, json!({MIGRATION_ANNOTATION: "someone-elses-uid"}))?;
                match alice.create(&PostParams::default(), &marked).await {
                    Ok(_) => {
                        alice.delete(&name, &DeleteParams::default()).await?;
                        Ok(false)
                    }
                    Err(kube::Error::Api(s)) if s.code == 403 => Ok(true),
                    Err(e) => Err(e.into()),
                }
            }
        },
    )
    .await?;

    // Creating a Pod with either marker is refused, with what to do.
    expect_refused(
        alice
            .create(&pp, &pod("steal", json!({MIGRATION_ANNOTATION: "uid-1"}))?)
            .await,
        MIGRATION_ANNOTATION,
    )?;
    expect_refused(
        alice
            .create(
                &pp,
                &pod("steal-vm", json!({INCOMING_ANNOTATION: "uid-1"}))?,
            )
            .await,
        INCOMING_ANNOTATION,
    )?;
    // So is adding one to a Pod alice made without.
    alice
        .create(&pp, &pod("plain", json!({"team": "a"}))?)
        .await
        .context("a Pod without markers")?;
    let add = Patch::Merge(json!({"metadata": {"annotations": {MIGRATION_ANNOTATION: "uid-1"}}}));
    expect_refused(
        alice.patch("plain", &PatchParams::default(), &add).await,
        MIGRATION_ANNOTATION,
    )?;

    // A target Pod made by an identity with the verb (here the admin, as the
    // controller) passes; alice may then change other things about it, or remove the
    // marker, but not point it at another migration.
    admin_pods
        .create(&pp, &pod("target", json!({MIGRATION_ANNOTATION: "uid-1"}))?)
        .await
        .context("the controller's target Pod")?;
    let relabel = Patch::Merge(json!({"metadata": {"labels": {"tier": "web"}}}));
    alice
        .patch("target", &PatchParams::default(), &relabel)
        .await
        .context("a label on a marked Pod, the marker unchanged")?;
    let repoint =
        Patch::Merge(json!({"metadata": {"annotations": {MIGRATION_ANNOTATION: "uid-2"}}}));
    expect_refused(
        alice
            .patch("target", &PatchParams::default(), &repoint)
            .await,
        MIGRATION_ANNOTATION,
    )?;
    let remove = Patch::Merge(json!({"metadata": {"annotations": {MIGRATION_ANNOTATION: null}}}));
    let p = alice
        .patch("target", &PatchParams::default(), &remove)
        .await
        .context("removing the marker")?;
    ensure!(
        !p.metadata
            .annotations
            .unwrap_or_default()
            .contains_key(MIGRATION_ANNOTATION),
        "the marker is still there"
    );

    // The verb is what counts: bound to ferry-restore, alice may mark Pods too (this is
    // how the controller's own identity gets it).
    bindings
        .create(
            &pp,
            &binding("alice-restore", "ClusterRole", ferry_crds::RESTORE_ROLE)?,
        )
        .await?;
    wait_for(
        Duration::from_secs(30),
        "alice's restore binding in force",
        || {
            let alice = alice.clone();
            async move {
                let marked = pod("allowed", json!({MIGRATION_ANNOTATION: "uid-3"}))?;
                match alice.create(&PostParams::default(), &marked).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.code == 403 => Ok(false),
                    Err(e) => Err(e.into()),
                }
            }
        },
    )
    .await?;
    Ok(())
}
