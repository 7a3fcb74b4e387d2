//! Leader election on a coordination.k8s.io Lease, so that of several controller
//! replicas exactly one acts. Writes use the Lease's resourceVersion: two candidates
//! racing for an expired Lease cannot both win.
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use std::time::Duration;

pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
}

impl LeaderElector {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        lease_duration: Duration,
    ) -> Self {
        LeaderElector {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            lease_duration,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// One attempt to acquire or renew; true when this identity holds the Lease after it.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let secs = self.lease_duration.as_secs().max(1) as i32;
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(renewed), Some(d)) => {
                renewed.0.as_millisecond() + d as i64 * 1000 < now.0.as_millisecond()
            }
            _ => true,
        };
        if holder != self.identity {
            if !holder.is_empty() && !expired {
                return Ok(false);
            }
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(secs);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            // Someone else wrote the Lease since we read it.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica leads, then runs `work` while renewing the Lease. Returns
    /// (dropping `work`) as soon as leadership cannot be confirmed within the Lease
    /// duration, so a replica that lost the Lease stops acting before another takes over.
    pub async fn run_as_leader<F: Future<Output = ()>>(&self, work: F) -> LeadershipLost {
        let retry = self.lease_duration / 3;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => tracing::warn!("leader election: {e}"),
            }
            tokio::time::sleep(retry).await;
        }
        tracing::info!(identity = %self.identity, lease = %self.name, "became leader");
        let renew = async {
            let mut last_ok = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(retry).await;
                // Each renewal has its own deadline: a hung apiserver call must not keep
                // a replica acting past its Lease while another takes over.
                match tokio::time::timeout(retry, self.try_acquire_or_renew()).await {
                    Ok(Ok(true)) => last_ok = tokio::time::Instant::now(),
                    Ok(Ok(false)) => return,
                    Ok(Err(e)) => tracing::warn!("renewing lease: {e}"),
                    Err(_) => tracing::warn!("renewing lease: no answer within {retry:?}"),
                }
                // Give up before the Lease can expire for the others.
                if last_ok.elapsed() > self.lease_duration * 2 / 3 {
                    return;
                }
            }
        };
        tokio::select! {
            _ = work => {}
            _ = renew => tracing::warn!(identity = %self.identity, "lost leadership"),
        }
        LeadershipLost
    }
}

/// Returned when a leader stops leading; the binary exits so it restarts as a candidate.
#[derive(Debug)]
pub struct LeadershipLost;
