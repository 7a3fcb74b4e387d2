//! The daemon announces itself on its own Node: the annotation
//! [`DAEMON_ANNOTATION`] carries its control endpoint, which the controller dials.
//!
//! The DaemonSet's ServiceAccount may patch Nodes, and the chart's
//! ValidatingAdmissionPolicy narrows that to this one annotation on the Node the pod's
//! token is bound to (as the kubelet's NodeRestriction does for kubelets). The daemon
//! writes the annotation when it serves, writes it again every minute (a Node that the
//! kubelet re-creates comes back without it) and removes it when it stops, so that the
//! controller sees at once that this node has no daemon rather than timing out.
use ferry_proto::DAEMON_ANNOTATION;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use std::path::Path;
use std::time::Duration;

/// How often a registered daemon writes its annotation again.
pub const REFRESH: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error("no kubeconfig given and not in a cluster: {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("building the API client: {0}")]
    Client(#[source] kube::Error),
    #[error("patching Node {node}: {source}")]
    Patch { node: String, source: kube::Error },
}

pub struct Registration {
    nodes: Api<Node>,
    node: String,
    endpoint: String,
}

impl Registration {
    /// A client from `kubeconfig`, or the pod's ServiceAccount when there is none.
    pub async fn new(
        kubeconfig: Option<&Path>,
        node: String,
        endpoint: String,
    ) -> Result<Registration, RegisterError> {
        let config = match kubeconfig {
            Some(path) => {
                let bad = |source| RegisterError::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                };
                let kc = kube::config::Kubeconfig::read_from(path).map_err(bad)?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .map_err(bad)?
            }
            None => kube::Config::infer().await?,
        };
        let client = kube::Client::try_from(config).map_err(RegisterError::Client)?;
        Ok(Registration {
            nodes: Api::all(client),
            node,
            endpoint,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Writes the annotation once (a merge patch: the daemon's only field).
    pub async fn announce(&self) -> Result<(), RegisterError> {
        self.patch(serde_json::json!({
            "metadata": { "annotations": { DAEMON_ANNOTATION: self.endpoint } }
        }))
        .await
    }

    /// Removes the annotation if it still names this daemon's endpoint (a daemon that
    /// replaced this one on the node keeps its own): one JSON patch whose `test` makes
    /// the apiserver compare, so the daemon needs no `get` on Nodes.
    pub async fn withdraw(&self) -> Result<(), RegisterError> {
        let path = format!(
            "/metadata/annotations/{}",
            DAEMON_ANNOTATION.replace('/', "~1")
        );
        let ops: json_patch::Patch = serde_json::from_value(serde_json::json!([
            { "op": "test", "path": path, "value": self.endpoint },
            { "op": "remove", "path": path },
        ]))
        .expect("a well-formed JSON patch");
        match self
            .nodes
            .patch(&self.node, &PatchParams::default(), &Patch::Json::<()>(ops))
            .await
        {
            Ok(_) => Ok(()),
            // The test failed: the annotation is gone or names another endpoint.
            Err(kube::Error::Api(e)) if e.code == 422 => Ok(()),
            Err(source) => Err(self.patch_error(source)),
        }
    }

    async fn patch(&self, body: serde_json::Value) -> Result<(), RegisterError> {
        self.nodes
            .patch(&self.node, &PatchParams::default(), &Patch::Merge(body))
            .await
            .map(drop)
            .map_err(|source| self.patch_error(source))
    }

    fn patch_error(&self, source: kube::Error) -> RegisterError {
        RegisterError::Patch {
            node: self.node.clone(),
            source,
        }
    }

    /// Announces until stopped: at once (retrying with backoff until the apiserver
    /// takes it), then every [`REFRESH`]. `registered` is told each outcome.
    pub async fn keep_announced(&self, registered: impl Fn(bool)) {
        let mut backoff = Duration::from_millis(250);
        loop {
            match self.announce().await {
                Ok(()) => {
                    registered(true);
                    backoff = Duration::from_millis(250);
                    tokio::time::sleep(REFRESH).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "announcing the daemon on its Node");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}
