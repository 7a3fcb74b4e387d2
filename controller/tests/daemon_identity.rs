//! The controller finds a node's daemon through the Node annotation
//! `ferry.dev/node-daemon`, which anyone allowed to patch Nodes can change. The
//! annotation says only where to dial: the daemon must prove that it is that Node's (its
//! certificate names the Node), so a redirected annotation cannot send the controller,
//! and with it a workload's state, to another node's daemon. A real `ferry-node` in a
//! network namespace, a real kube-apiserver, the controller's gRPC agent.
mod common;

use anyhow::{Result, ensure};
use common::env;
use ferry_controller::agent::grpc::{DAEMON_ANNOTATION, GrpcAgent, client_tls};
use ferry_controller::agent::{AgentError, NodeAgent, NodeRef};
use ferry_controller::clusters::Clusters;
use ferry_testkit::containers::Daemon;
use ferry_testkit::netns::Lan;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use serde_json::json;
use std::sync::Arc;

#[tokio::test]
async fn a_redirected_node_annotation_reaches_no_other_nodes_daemon() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let client = env().client("east").await?;
    let lan = Lan::create()?;
    let bin = ferry_testkit::workspace_bin("ferry-node")?;
    // Its certificate names the node "ident-a".
    let d = Daemon::start(&lan, "ident-a", tmp.path(), &bin)?;
    let nodes: Api<Node> = Api::all(client.clone());
    // ident-a's annotation points at its own daemon; ident-b's (patched by someone who
    // may patch Nodes) at ident-a's.
    for name in ["ident-a", "ident-b"] {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": {DAEMON_ANNOTATION: d.endpoint}}
        }))?;
        nodes.create(&PostParams::default(), &node).await?;
    }
    let tls_dir = ferry_testkit::pki::controller_tls_dir(&tmp.path().join("controller"))?;
    let agent = GrpcAgent::new(
        Arc::new(Clusters::new(client, "ferry-system")),
        client_tls(&tls_dir)?,
    );
    let node = |name: &str| NodeRef {
        cluster: None,
        node: name.into(),
    };

    // The daemon that is ident-a's answers as ident-a.
    agent.receiving_runtimes(&node("ident-a")).await?;

    // The same daemon, dialled as ident-b's: the handshake fails on the name, and the
    // error says so.
    match agent.receiving_runtimes(&node("ident-b")).await {
        Err(AgentError::Unavailable { message, .. }) => ensure!(
            message.contains("not valid for name") && message.contains("ident-b"),
            "the refusal does not say why: {message}"
        ),
        other => anyhow::bail!("ident-a's daemon answered as ident-b: {other:?}"),
    }
    Ok(())
}
