//! `/healthz`, `/readyz` and `/metrics` over plain HTTP, for the kubelet's probes and
//! Prometheus. They carry no workload data and change nothing; the daemon binds them to
//! loopback unless told otherwise (the DaemonSet runs on the host network, where the
//! kubelet probes loopback).
use crate::metrics::Metrics;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::{Router, extract::State, routing::get};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// What `/readyz` answers: the control API is bound and, when the daemon registers
/// itself, its endpoint is on its Node (before that the controller cannot reach it).
#[derive(Default)]
pub struct Readiness {
    serving: AtomicBool,
    registered: AtomicBool,
}

impl Readiness {
    /// `registering`: false when the daemon does not announce itself.
    pub fn new(registering: bool) -> Readiness {
        Readiness {
            serving: AtomicBool::new(false),
            registered: AtomicBool::new(!registering),
        }
    }

    pub fn set_serving(&self) {
        self.serving.store(true, Ordering::Relaxed);
    }

    pub fn set_registered(&self, yes: bool) {
        self.registered.store(yes, Ordering::Relaxed);
    }

    /// Why the daemon is not ready, or None.
    pub fn not_ready(&self) -> Option<&'static str> {
        if !self.serving.load(Ordering::Relaxed) {
            Some("the control API is not serving yet")
        } else if !self.registered.load(Ordering::Relaxed) {
            Some("the daemon's endpoint is not on its Node yet")
        } else {
            None
        }
    }
}

struct Shared {
    registry: Registry,
    readiness: Arc<Readiness>,
}

pub fn router(metrics: &Metrics, readiness: Arc<Readiness>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(Arc::new(Shared {
            registry: metrics.registry(),
            readiness,
        }))
}

async fn readyz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    match s.readiness.not_ready() {
        None => (StatusCode::OK, "ok".to_string()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}")),
    }
}

async fn metrics_text(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        body = format!("# encoding failed: {e}\n");
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: &Metrics,
    readiness: Arc<Readiness>,
) -> std::io::Result<()> {
    axum::serve(listener, router(metrics, readiness)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_serving_and_registered() {
        let r = Readiness::new(true);
        assert_eq!(r.not_ready(), Some("the control API is not serving yet"));
        r.set_serving();
        assert_eq!(
            r.not_ready(),
            Some("the daemon's endpoint is not on its Node yet")
        );
        r.set_registered(true);
        assert_eq!(r.not_ready(), None);
        let unregistered = Readiness::new(false);
        unregistered.set_serving();
        assert_eq!(unregistered.not_ready(), None);
    }
}
