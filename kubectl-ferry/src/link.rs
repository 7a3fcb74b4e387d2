//! `kubectl ferry link NAME --peer-kubeconfig F`: lets ferry in this (home) cluster
//! migrate Pods into the peer cluster NAME. In the peer it takes a long-lived token for
//! the ServiceAccount `ferry-peer`, which ferry's chart creates there with only what a
//! home controller needs (helm/ferry/templates/rbac-peer.yaml); here it stores a
//! kubeconfig with that token as the Secret the controller looks up (labelled
//! `ferry.dev/cluster: NAME`). The kubeconfig carries a bearer token and the peer's CA,
//! never a command: the controller refuses exec credential plugins.
use crate::{Global, connect, load};
use anyhow::{Context, Result, bail};
use base64::Engine;
use ferry_crds::CLUSTER_LABEL;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::{Api, ListParams, Patch, PatchParams};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const PEER_SA: &str = "ferry-peer";
const MANAGER: &str = "kubectl-ferry";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The peer's name here: what Migrations put in spec.target.cluster.
    pub name: String,
    /// Kubeconfig that reaches the peer cluster (an admin's: it creates a token there).
    #[arg(long)]
    pub peer_kubeconfig: Option<PathBuf>,
    /// Context of the peer cluster (in --peer-kubeconfig, else in --kubeconfig).
    #[arg(long)]
    pub peer_context: Option<String>,
    /// The peer's apiserver URL as ferry's controller reaches it (default: the one in
    /// the peer's kubeconfig).
    #[arg(long)]
    pub server: Option<String>,
    /// Where ferry is installed here (the controller reads link Secrets there).
    #[arg(long, default_value = "ferry-system")]
    pub ferry_namespace: String,
    /// Where ferry is installed in the peer (its ferry-peer ServiceAccount).
    #[arg(long, default_value = "ferry-system")]
    pub peer_ferry_namespace: String,
    /// This cluster's name in the peer, to name the token there (one per linked home).
    #[arg(long, default_value = "home")]
    pub home: String,
}

/// The kubeconfig stored for the controller: one cluster, one token user.
pub fn kubeconfig_yaml(name: &str, server: &str, ca_pem: &[u8], token: &str) -> Result<String> {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let kc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server, "certificate-authority-data": ca}}],
        "users": [{"name": PEER_SA, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": PEER_SA}}],
        "current-context": name,
    });
    Ok(serde_yaml::to_string(&kc)?)
}

pub async fn run(g: &Global, a: Args) -> Result<ExitCode> {
    let (home, _) = connect(g).await?;
    let peer_kc = a.peer_kubeconfig.clone().or(g.kubeconfig.clone());
    if a.peer_kubeconfig.is_none() && a.peer_context.is_none() {
        bail!("say how to reach the peer: --peer-kubeconfig and/or --peer-context");
    }
    let peer_config = load(peer_kc.as_deref(), a.peer_context.as_deref()).await?;
    let server = match &a.server {
        Some(s) => s.clone(),
        None => peer_config.cluster_url.to_string(),
    };
    let peer = kube::Client::try_from(peer_config)?;

    let sas: Api<ServiceAccount> = Api::namespaced(peer.clone(), &a.peer_ferry_namespace);
    if sas.get_opt(PEER_SA).await?.is_none() {
        bail!(
            "the peer has no ServiceAccount {}/{PEER_SA}: install ferry's chart there first (helm install ferry helm/ferry -n {} --create-namespace; peer.enabled creates it)",
            a.peer_ferry_namespace,
            a.peer_ferry_namespace
        );
    }
    // A long-lived token: a TokenRequest's would expire under the controller.
    let token_name = format!("{PEER_SA}-token-{}", a.home);
    let secrets: Api<Secret> = Api::namespaced(peer.clone(), &a.peer_ferry_namespace);
    let want = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": token_name, "annotations": {"kubernetes.io/service-account.name": PEER_SA},
                     "labels": {"app.kubernetes.io/name": "ferry", "ferry.dev/linked-by": a.home}},
        "type": "kubernetes.io/service-account-token",
    });
    secrets
        .patch(
            &token_name,
            &PatchParams::apply(MANAGER),
            &Patch::Apply(&want),
        )
        .await
        .context("creating the peer's token Secret")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let (token, ca) = loop {
        let s = secrets.get(&token_name).await?;
        let data = s.data.unwrap_or_default();
        if let (Some(t), Some(ca)) = (data.get("token"), data.get("ca.crt")) {
            break (String::from_utf8(t.0.clone())?, ca.0.clone());
        }
        if Instant::now() > deadline {
            bail!(
                "the peer's controller-manager did not fill the token Secret {token_name} in 30 s"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let kubeconfig = kubeconfig_yaml(&a.name, &server, &ca, &token)?;

    // Check it before storing it: the controller would only find out on a migration.
    let kc = kube::config::Kubeconfig::from_yaml(&kubeconfig)?;
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?,
    )?;
    let nodes = Api::<k8s_openapi::api::core::v1::Node>::all(client)
        .list_metadata(&ListParams::default())
        .await
        .with_context(|| format!("the peer's token does not work against {server}"))?;

    let home_secrets: Api<Secret> = Api::namespaced(home, &a.ferry_namespace);
    let secret_name = format!("ferry-cluster-{}", a.name);
    let others = home_secrets
        .list_metadata(&ListParams::default().labels(&format!("{CLUSTER_LABEL}={}", a.name)))
        .await
        .context("listing link Secrets")?;
    if let Some(o) = others
        .items
        .iter()
        .find(|o| o.metadata.name.as_deref() != Some(&secret_name))
    {
        bail!(
            "Secret {}/{} already links cluster {:?}: delete it first",
            a.ferry_namespace,
            o.metadata.name.as_deref().unwrap_or_default(),
            a.name
        );
    }
    let link = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": secret_name, "labels": {CLUSTER_LABEL: a.name, "app.kubernetes.io/name": "ferry"}},
        "type": "Opaque",
        "stringData": {"kubeconfig": kubeconfig},
    });
    home_secrets
        .patch(
            &secret_name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&link),
        )
        .await
        .context("storing the link Secret")?;
    println!(
        "cluster {:?} linked: secret/{secret_name} in {} holds ServiceAccount {}/{PEER_SA}'s token for {server} ({} nodes visible)",
        a.name,
        a.ferry_namespace,
        a.peer_ferry_namespace,
        nodes.items.len()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_kubeconfig_carries_a_token_and_the_ca_and_no_command() {
        let y = kubeconfig_yaml("west", "https://10.0.0.1:6443", b"PEM", "tok").unwrap();
        let kc = kube::config::Kubeconfig::from_yaml(&y).unwrap();
        assert_eq!(kc.current_context.as_deref(), Some("west"));
        let user = kc.auth_infos[0].auth_info.as_ref().unwrap();
        assert!(user.exec.is_none() && user.auth_provider.is_none());
        let cluster = kc.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://10.0.0.1:6443"));
        assert_eq!(cluster.certificate_authority_data.as_deref(), Some("UEVN"));
    }
}
