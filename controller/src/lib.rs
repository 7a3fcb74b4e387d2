//! ferry controller: reconciles `Migration`s. It decides cluster-wide (validation,
//! target placement, the phase machine, rollback) and delegates node-local work to the
//! node daemons through [`agent::NodeAgent`]. It never carries workload bytes.
#![forbid(unsafe_code)]

pub mod agent;
pub mod clusters;
pub mod drain;
pub mod format;
pub mod leader;
pub mod metrics;
pub mod owner;
pub mod placement;
pub mod policy;
pub mod queue;
pub mod reconcile;
pub mod server;
pub mod serving;
pub mod state;
pub mod volumes;
pub mod wake;

use futures::StreamExt;
use kube::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Controller, watcher};
use std::sync::Arc;
use std::time::Duration;

pub use reconcile::Context;

/// Settings of one controller instance.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The controller's namespace: its Lease and the linked-cluster Secrets live here.
    pub namespace: String,
    /// This cluster's name in placements and Events.
    pub cluster_name: String,
    /// This replica's identity for leader election and Events.
    pub identity: String,
    pub lease_duration: Duration,
    pub poll_interval: Duration,
    /// Watch Migrations in this namespace only (None: all namespaces).
    pub watch_namespace: Option<String>,
    /// How target Pods are shaped (RuntimeClass, gate image).
    pub target_shape: placement::TargetShape,
    /// How long a failed migration's objects stay in its bucket before they are removed.
    pub failed_object_retention: Duration,
    /// How many migrations run at once, in the cluster and from one node.
    pub limits: queue::Limits,
}

impl Settings {
    pub fn new(namespace: &str, cluster_name: &str, identity: &str) -> Self {
        Settings {
            namespace: namespace.into(),
            cluster_name: cluster_name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            poll_interval: Duration::from_secs(1),
            watch_namespace: None,
            target_shape: placement::TargetShape::default(),
            failed_object_retention: Duration::from_secs(24 * 3600),
            limits: queue::Limits::default(),
        }
    }
}

/// Selects rustls' ring provider for the process (several dependencies enable both ring
/// and aws-lc-rs, and rustls then refuses to guess). Call before creating clients.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn context(
    client: kube::Client,
    agent: Arc<dyn agent::NodeAgent>,
    settings: &Settings,
) -> Arc<Context> {
    let reporter = Reporter {
        controller: "ferry-controller".into(),
        instance: Some(settings.identity.clone()),
    };
    Arc::new(Context {
        clusters: Arc::new(clusters::Clusters::new(client.clone(), &settings.namespace)),
        recorder: Recorder::new(client.clone(), reporter),
        client,
        agent,
        metrics: metrics::Metrics::default(),
        cluster_name: settings.cluster_name.clone(),
        poll_interval: settings.poll_interval,
        target_shape: settings.target_shape.clone(),
        tokens: Default::default(),
        failed_object_retention: settings.failed_object_retention,
        limits: settings.limits,
        admission: Default::default(),
        watch_namespace: settings.watch_namespace.clone(),
        wakeups: Default::default(),
    })
}

/// Runs the Migration controller until the watch ends (it does not end on its own).
pub async fn run_controller(ctx: Arc<Context>, watch_namespace: Option<&str>) {
    let migrations: Api<ferry_crds::Migration> = match watch_namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let mut controller = Controller::new(migrations, watcher::Config::default());
    // Operations that end ask for their Migration's reconcile at once (`wake.rs`).
    if let Some(wakeups) = ctx.wakeups.stream() {
        controller = controller.reconcile_on(wakeups);
    }
    controller
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!("controller: {e}");
            }
        })
        .await;
}

/// Runs the controller only while this replica holds the leader Lease; returns when
/// leadership is lost (the binary then exits and restarts as a candidate).
pub async fn run_with_leader_election(
    ctx: Arc<Context>,
    settings: &Settings,
) -> leader::LeadershipLost {
    let elector = leader::LeaderElector::new(
        ctx.client.clone(),
        &settings.namespace,
        "ferry-controller",
        &settings.identity,
        settings.lease_duration,
    );
    // The leader also keeps the disruption budgets that guard must-migrate Pods while
    // no controller answers the eviction webhook.
    let guard = drain::guard::run(ctx.client.clone(), settings.watch_namespace.clone());
    // And gives gated Pods their first `ferry.dev/serving` value (`serving.rs`).
    let serving = serving::keep(ctx.client.clone(), settings.watch_namespace.clone());
    let controller = run_controller(ctx, settings.watch_namespace.as_deref());
    elector
        .run_as_leader(async move {
            tokio::join!(controller, guard, serving);
        })
        .await
}
