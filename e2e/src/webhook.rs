//! East's eviction webhook, served from the test process as `ferry-controller
//! --webhook-addr` serves it, and registered with east's apiserver by URL.
use crate::world::{CONTROLLER_NAMESPACE, World};
use anyhow::{Context, Result, bail};
use ferry_controller::drain::webhook;
use ferry_crds::EVICTION_STRATEGY_LABEL;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use std::time::{Duration, Instant};

impl World {
    /// Serves the webhook on the LAN's host address with a certificate for it, registers
    /// it in east (failure policy and rules as shipped) and returns once east's
    /// apiserver calls it.
    pub async fn serve_eviction_webhook(&mut self) -> Result<()> {
        let ip = self.host_ip().to_string();
        let tls =
            ferry_testkit::pki::node_tls_dir(&self.base.join("webhook-tls"), "ferry-webhook", &ip)?;
        let port = std::net::TcpListener::bind((ip.as_str(), 0))?
            .local_addr()?
            .port();
        let addr: std::net::SocketAddr = format!("{ip}:{port}").parse()?;
        self.webhook = Some(WebhookServer::start(
            addr,
            tls.clone(),
            self.webhook_callers()?,
            self.east.clone(),
        ));
        let ca = std::fs::read_to_string(tls.join("ca.crt"))?;
        let config = webhook::configuration(
            serde_json::json!({"url": format!("https://{addr}{}", webhook::PATH)}),
            &ca,
        );
        let file = self.base.join("webhook.json");
        std::fs::write(&file, serde_json::to_vec(&config)?)?;
        let out = self
            .kubectl("east")
            .arg("apply")
            .arg("-f")
            .arg(&file)
            .output()?;
        if !out.status.success() {
            bail!(
                "registering the webhook: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.await_webhook().await
    }

    /// Stops serving the webhook (a controller outage); its registration stays.
    pub fn stop_eviction_webhook(&mut self) {
        if let Some(w) = &mut self.webhook {
            w.task.abort();
        }
    }

    /// Serves the webhook again where it was registered; returns once it is called.
    pub async fn restart_eviction_webhook(&mut self) -> Result<()> {
        let w = self.webhook.as_mut().context("no webhook was served")?;
        *w = WebhookServer::start(w.addr, w.tls.clone(), w.callers.clone(), self.east.clone());
        self.await_webhook().await
    }

    /// Who may call the webhook: east's apiserver, by the webhook client certificate
    /// testenv gives it (`pki/webhook-client.crt`, signed by the cluster CA).
    pub fn webhook_callers(&self) -> Result<webhook::Callers> {
        Ok(webhook::Callers {
            ca: self.pki_dir("east")?.join("ca.crt"),
            names: vec!["kube-apiserver-webhook-client".into()],
        })
    }

    /// Where the webhook listens and its serving certificate's directory (`ca.crt`).
    pub fn webhook_endpoint(&self) -> Option<(std::net::SocketAddr, std::path::PathBuf)> {
        self.webhook.as_ref().map(|w| (w.addr, w.tls.clone()))
    }

    /// A cluster's certificates, as testenv wrote them.
    pub fn pki_dir(&self, cluster: &str) -> Result<std::path::PathBuf> {
        Ok(self
            .env
            .cluster(cluster)
            .kubeconfig
            .parent()
            .context("kubeconfig has no directory")?
            .join("pki"))
    }

    /// Until the apiserver sends evictions to the webhook: a probe Pod that asks to
    /// move and can never run is refused with the webhook's own reason.
    async fn await_webhook(&self) -> Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.east.clone(), CONTROLLER_NAMESPACE);
        let probe: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "webhook-probe", "labels": {EVICTION_STRATEGY_LABEL: "LiveMigrate"}},
            // No scheduler picks it: it stays Pending, so it is never movable.
            "spec": {"schedulerName": "nobody", "containers": [{"name": "c", "image": crate::world::BUSYBOX}]},
        }))?;
        let eviction =
            format!("/api/v1/namespaces/{CONTROLLER_NAMESPACE}/pods/webhook-probe/eviction");
        let body = self.base.join("probe-eviction.json");
        std::fs::write(
            &body,
            serde_json::to_vec(&serde_json::json!({
                "apiVersion": "policy/v1", "kind": "Eviction",
                "metadata": {"name": "webhook-probe", "namespace": CONTROLLER_NAMESPACE},
            }))?,
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let answer = loop {
            // Without the webhook the eviction deletes the probe: make it again.
            match pods.create(&PostParams::default(), &probe).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
            // kubectl, not kube's client: that retries a 429 by itself for minutes.
            let out = self
                .kubectl("east")
                .args(["create", "--raw", &eviction, "-f"])
                .arg(&body)
                .output()?;
            let said = String::from_utf8_lossy(&out.stderr).into_owned();
            if !out.status.success() && said.contains("cannot") {
                break Ok(());
            }
            if Instant::now() > deadline {
                break Err(said);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let _ = pods
            .delete("webhook-probe", &DeleteParams::default().grace_period(0))
            .await;
        answer
            .map_err(|said| anyhow::anyhow!("east never called the webhook; last eviction: {said}"))
            .context("waiting for the eviction webhook")
    }
}

/// The webhook's server task, where it listens and its certificate.
pub struct WebhookServer {
    task: tokio::task::JoinHandle<()>,
    pub addr: std::net::SocketAddr,
    pub tls: std::path::PathBuf,
    callers: webhook::Callers,
}

impl WebhookServer {
    fn start(
        addr: std::net::SocketAddr,
        tls: std::path::PathBuf,
        callers: webhook::Callers,
        client: kube::Client,
    ) -> Self {
        let (dir, c) = (tls.clone(), callers.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = webhook::serve(addr, &dir, &c, client).await {
                eprintln!("[world] eviction webhook: {e}");
            }
        });
        WebhookServer {
            task,
            addr,
            tls,
            callers,
        }
    }
}

impl Drop for WebhookServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
