//! Which clusters the controller can reach: its own, clusters linked by a kubeconfig
//! Secret, and Liqo peers. Liqo's own identity kubeconfig only reaches Liqo's resources,
//! so a Liqo peer also needs a linked kubeconfig Secret; Liqo tells ferry that the peer
//! exists (ForeignCluster) and carries the network between clusters.
use ferry_crds::CLUSTER_LABEL;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use std::collections::HashMap;
use tokio::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "unknown cluster {0:?}: no Liqo ForeignCluster with that clusterID and no Secret labelled {CLUSTER_LABEL}={0} in namespace {1}"
    )]
    Unknown(String, String),
    #[error(
        "cluster {0:?} is a Liqo peer, but ferry has no credentials for it: create a Secret in namespace {1} labelled {CLUSTER_LABEL}={0} with a kubeconfig under the key `kubeconfig`"
    )]
    NoCredentials(String, String),
    #[error("kubeconfig Secret {secret} for cluster {cluster:?} is unusable: {message}")]
    BadKubeconfig {
        cluster: String,
        secret: String,
        message: String,
    },
    #[error("looking up cluster {0:?}: {1}")]
    Api(String, #[source] kube::Error),
}

/// Refuses a kubeconfig whose credentials come from running a command: an `exec`
/// plugin, or an `auth-provider` (kube's gcp provider runs its `cmd-path`). Whoever may
/// write a Secret in ferry's namespace would otherwise run programs in the controller.
pub fn runs_no_command(kc: &kube::config::Kubeconfig) -> Result<(), String> {
    for named in &kc.auth_infos {
        let Some(user) = &named.auth_info else {
            continue;
        };
        let what = if user.exec.is_some() {
            "an exec credential plugin (users[].user.exec)"
        } else if user.auth_provider.is_some() {
            "an auth-provider (users[].user.auth-provider)"
        } else {
            continue;
        };
        return Err(format!(
            "user {:?} gets its credentials from {what}, which would run a command inside ferry's controller: \
             link with a token or a client certificate instead (`kubectl ferry link` writes one)",
            named.name
        ));
    }
    Ok(())
}

/// Resolves cluster names to clients, caching them.
pub struct Clusters {
    local: kube::Client,
    /// Namespace of the linked-cluster Secrets (the controller's own).
    namespace: String,
    cache: Mutex<HashMap<String, kube::Client>>,
}

fn foreign_cluster_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("core.liqo.io", "v1beta1", "ForeignCluster"),
        "foreignclusters",
    )
}

impl Clusters {
    pub fn new(local: kube::Client, namespace: impl Into<String>) -> Self {
        Clusters {
            local,
            namespace: namespace.into(),
            cache: Mutex::default(),
        }
    }

    pub fn local(&self) -> &kube::Client {
        &self.local
    }

    /// The client for `cluster` (None or empty: the local cluster).
    pub async fn client(&self, cluster: Option<&str>) -> Result<kube::Client, ClusterError> {
        let Some(name) = cluster.filter(|c| !c.is_empty()) else {
            return Ok(self.local.clone());
        };
        if let Some(client) = self.cache.lock().await.get(name) {
            return Ok(client.clone());
        }
        let client = match self.linked(name).await? {
            Some(client) => client,
            None if self.is_liqo_peer(name).await? => {
                return Err(ClusterError::NoCredentials(
                    name.into(),
                    self.namespace.clone(),
                ));
            }
            None => return Err(ClusterError::Unknown(name.into(), self.namespace.clone())),
        };
        self.cache
            .lock()
            .await
            .insert(name.to_string(), client.clone());
        Ok(client)
    }

    async fn linked(&self, name: &str) -> Result<Option<kube::Client>, ClusterError> {
        let secrets: Api<Secret> = Api::namespaced(self.local.clone(), &self.namespace);
        let list = secrets
            .list(&ListParams::default().labels(&format!("{CLUSTER_LABEL}={name}")))
            .await
            .map_err(|e| ClusterError::Api(name.into(), e))?;
        let Some(secret) = list.items.into_iter().next() else {
            return Ok(None);
        };
        let secret_name = secret.metadata.name.clone().unwrap_or_default();
        let bad = |message: String| ClusterError::BadKubeconfig {
            cluster: name.into(),
            secret: format!("{}/{secret_name}", self.namespace),
            message,
        };
        let raw = secret
            .data
            .as_ref()
            .and_then(|d| d.get("kubeconfig"))
            .ok_or_else(|| bad("no `kubeconfig` key".into()))?;
        let text = std::str::from_utf8(&raw.0).map_err(|e| bad(e.to_string()))?;
        let kubeconfig =
            kube::config::Kubeconfig::from_yaml(text).map_err(|e| bad(e.to_string()))?;
        runs_no_command(&kubeconfig).map_err(bad)?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .map_err(|e| bad(e.to_string()))?;
        kube::Client::try_from(config)
            .map(Some)
            .map_err(|e| bad(e.to_string()))
    }

    /// Whether a Liqo ForeignCluster with this clusterID exists (false without Liqo).
    async fn is_liqo_peer(&self, name: &str) -> Result<bool, ClusterError> {
        let api: Api<DynamicObject> =
            Api::all_with(self.local.clone(), &foreign_cluster_resource());
        match api.list(&ListParams::default()).await {
            Ok(list) => Ok(list.items.iter().any(|fc| {
                fc.data.pointer("/spec/clusterID").and_then(|v| v.as_str()) == Some(name)
                    || fc.metadata.name.as_deref() == Some(name)
            })),
            // Liqo is not installed.
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
            Err(e) => Err(ClusterError::Api(name.into(), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfigs_that_run_commands_are_refused() {
        let with_user = |user: &str| {
            kube::config::Kubeconfig::from_yaml(&format!(
                "apiVersion: v1\nkind: Config\nusers:\n- name: u\n  user:\n{user}"
            ))
            .unwrap()
        };
        let exec = with_user(
            "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: /bin/sh\n      args: [-c, id]\n",
        );
        let e = runs_no_command(&exec).unwrap_err();
        assert!(
            e.contains("exec credential plugin") && e.contains("\"u\""),
            "{e}"
        );
        let provider =
            with_user("    auth-provider:\n      name: gcp\n      config: {cmd-path: /bin/id}\n");
        assert!(
            runs_no_command(&provider)
                .unwrap_err()
                .contains("auth-provider")
        );
        assert_eq!(runs_no_command(&with_user("    token: abc\n")), Ok(()));
    }
}
