//! Pending: whether the Migration can run at all (the Pod, its node and daemon, the
//! target, competing Migrations, object-store access), and the claim on the source Pod
//! that makes one Migration at a time move it.
use super::*;
use crate::{owner, policy, volumes};
use ferry_crds::Strategy;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};

impl Reconciler<'_> {
    // ---- Pending: validate -------------------------------------------------------

    pub(super) async fn validate(&mut self) -> Result<Outcome, Error> {
        let spec = &self.m.spec;
        let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let pod_name = &spec.workload.pod;
        let Some(pod) = pods.get_opt(pod_name).await? else {
            return Ok(self.invalid(
                "PodNotFound",
                format!("pod {}/{pod_name} not found", self.ns),
            ));
        };
        if pod.metadata.deletion_timestamp.is_some() {
            return Ok(self.invalid(
                "PodTerminating",
                format!("pod {}/{pod_name} is being deleted", self.ns),
            ));
        }
        let Some(source_node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            return Ok(self.invalid(
                "PodNotScheduled",
                format!("pod {}/{pod_name} is not on a node yet", self.ns),
            ));
        };
        let pod_phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if pod_phase != "Running" {
            return Ok(self.invalid(
                "PodNotRunning",
                format!("pod {}/{pod_name} is {pod_phase}, not Running", self.ns),
            ));
        }
        if let Some(why) = placement::unsupported(&pod) {
            return Ok(self.invalid(
                "NotMigratable",
                format!("pod {}/{pod_name}: {why}", self.ns),
            ));
        }
        if let Some(other) = self.competing_migration().await? {
            return Ok(self.invalid(
                "AlreadyMigrating",
                format!("Migration {other} is already moving pod {pod_name}"),
            ));
        }
        let target_cluster = spec.target.cluster.clone().filter(|c| !c.is_empty());
        let target_client = match self.ctx.clusters.client(target_cluster.as_deref()).await {
            Ok(c) => c,
            Err(e @ ClusterError::Api(..)) => return Err(e.into()),
            Err(e) => {
                let reason = if matches!(e, ClusterError::NoCredentials(..)) {
                    "NoClusterCredentials"
                } else {
                    "UnknownCluster"
                };
                return Ok(self.invalid(reason, e.to_string()));
            }
        };
        let same_cluster = target_cluster.is_none();
        let nodes = Api::<Node>::all(target_client.clone())
            .list(&ListParams::default())
            .await?
            .items;
        let mut load = BTreeMap::new();
        for p in Api::<Pod>::all(target_client.clone())
            .list(&ListParams::default())
            .await?
            .items
        {
            if let Some(n) = p.spec.and_then(|s| s.node_name) {
                *load.entry(n).or_insert(0usize) += 1;
            }
        }
        let exclude = same_cluster.then_some(source_node.as_str());
        let target_node =
            match placement::choose_node(&nodes, &load, spec.target.node.as_deref(), exclude) {
                Ok(n) => n,
                Err(e) => return Ok(self.invalid(placement_reason(&e), e.to_string())),
            };
        if spec.transfer.mode == TransferMode::ObjectStore
            && let Err(message) = self.object_store_access().await?
        {
            return Ok(self.invalid("ObjectStoreCredentials", message));
        }
        let source_ref = NodeRef {
            cluster: None,
            node: source_node.clone(),
        };
        let pod_id = PodId {
            namespace: self.ns.clone(),
            name: pod_name.clone(),
            uid: pod.uid().unwrap_or_default(),
        };
        let info = match self.ctx.agent.describe(&source_ref, &pod_id).await {
            Ok(info) => info,
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(e) => return Ok(self.invalid("NotMigratable", e.to_string())),
        };
        let policy = crate::drain::selecting_policy(&self.ctx.client, &pod).await?;
        let settings = policy::settings(&self.m.spec, policy.as_ref(), info.memory_bytes);
        if spec.transfer.mode == TransferMode::ObjectStore && settings.strategy != Strategy::Cold {
            return Ok(self.invalid(
                "InvalidSettings",
                "transfer.mode ObjectStore moves containers with strategy Cold only".to_string(),
            ));
        }
        self.status.settings = Some(settings);
        let vm = info.kind == ferry_crds::WorkloadKind::VirtualMachine;
        let claims = self.claims(&pod).await?;
        if let Some(why) = volumes::not_movable(&pod, vm, !same_cluster, &claims) {
            return Ok(self.invalid(
                "VolumeNotMovable",
                format!("pod {}/{pod_name}: {why}", self.ns),
            ));
        }
        if let Err(why) = self.adoption(&pod, same_cluster).await? {
            return Ok(self.invalid(
                "UnsupportedOwner",
                format!("pod {}/{pod_name}: {why}", self.ns),
            ));
        }
        let target_display = target_cluster
            .clone()
            .unwrap_or_else(|| self.ctx.cluster_name.clone());
        self.status.workload_kind = Some(info.kind);
        self.status.source = Some(Placement {
            cluster: None,
            node: source_node.clone(),
            namespace: self.ns.clone(),
            pod: pod_name.clone(),
            uid: pod.uid(),
            display: format!("{}/{source_node}", self.ctx.cluster_name),
        });
        self.status.target = Some(Placement {
            cluster: target_cluster,
            node: target_node.clone(),
            namespace: self.ns.clone(),
            pod: placement::target_pod_name(
                pod_name,
                same_cluster,
                &self.m.uid().unwrap_or_default(),
            ),
            uid: None,
            display: format!("{target_display}/{target_node}"),
        });
        // Valid: it starts now only if the limits on migrations at once allow.
        if let Err(why) = self.admit(&source_node).await? {
            if self.status.queued.as_ref() != Some(&why) {
                info!(%why, "queued");
            }
            self.status.queued = Some(why);
            return Ok(Outcome::Queued);
        }
        if self.status.queued.take().is_some() {
            // An attempt's clock starts when it leaves the queue.
            let t = self.status.timings.get_or_insert_with(Timings::default);
            t.started_at = Some(now());
            t.started_at_ms = Some(now_ms());
        }
        // Last, once nothing else refuses: of two Migrations validated at once, only
        // the one whose claim the apiserver accepts goes on.
        if let Some(other) = self.claim(&pod).await? {
            return Ok(self.invalid(
                "AlreadyMigrating",
                format!("Migration {other} is already moving pod {pod_name}"),
            ));
        }
        Ok(Outcome::Validated)
    }

    /// How the target joins the source's ReplicaSet (`owner.rs`), or why it cannot.
    pub(super) async fn adoption(
        &self,
        pod: &Pod,
        same_cluster: bool,
    ) -> Result<Result<Option<owner::Adoption>, String>, Error> {
        let rs = match owner::controller_of(pod) {
            Some(o) if o.kind == "ReplicaSet" => {
                Api::<ReplicaSet>::namespaced(self.ctx.client.clone(), &self.ns)
                    .get_opt(&o.name)
                    .await?
            }
            _ => None,
        };
        Ok(owner::adoption(pod, rs.as_ref(), !same_cluster))
    }

    /// The PVCs the Pod's volumes name and the PersistentVolumes bound to them.
    async fn claims(&self, pod: &Pod) -> Result<volumes::Claims, Error> {
        let mut c = volumes::Claims::default();
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let pvs: Api<PersistentVolume> = Api::all(self.ctx.client.clone());
        for name in volumes::claim_names(pod) {
            let Some(pvc) = pvcs.get_opt(&name).await? else {
                continue;
            };
            if let Some(pv) = pvc.spec.as_ref().and_then(|s| s.volume_name.clone())
                && let Some(v) = pvs.get_opt(&pv).await?
            {
                c.volumes.insert(pv, v);
            }
            c.claims.insert(name, pvc);
        }
        Ok(c)
    }

    /// Claims the source Pod for this Migration: the annotation
    /// [`CLAIM_ANNOTATION`] `<name>/<uid>`, written with the Pod's resourceVersion as
    /// a precondition (optimistic concurrency on the apiserver, not a cache check).
    /// Returns the other Migration holding a live claim, if one does. A claim by a
    /// Migration that finished or no longer exists is stale and taken over. A lost
    /// race (409 Conflict) is an error: the reconcile runs again and sees the winner.
    pub(super) async fn claim(&self, pod: &Pod) -> Result<Option<String>, Error> {
        let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let me = format!("{}/{}", self.m.name_any(), self.m.uid().unwrap_or_default());
        let mut pod = pod.clone();
        // Twice at most: a conflict means the Pod changed; read it again, and if a live
        // claim made it change, that Migration won.
        for _ in 0..2 {
            if let Some(held) = pod.annotations().get(CLAIM_ANNOTATION) {
                if *held == me {
                    return Ok(None);
                }
                if let Some(other) = self.live_claim(held).await? {
                    return Ok(Some(other));
                }
            }
            let patch = serde_json::json!({"metadata": {
                "resourceVersion": pod.resource_version(),
                "annotations": {CLAIM_ANNOTATION: me},
            }});
            match pods
                .patch(
                    &pod.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => return Ok(None),
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    pod = pods.get(&pod.name_any()).await?
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Conflict(format!(
            "pod {}/{} keeps changing while this Migration claims it; trying again",
            self.ns,
            pod.name_any()
        )))
    }

    /// The name of the Migration behind a claim, when it still exists and is unfinished.
    pub(super) async fn live_claim(&self, held: &str) -> Result<Option<String>, Error> {
        let Some((name, uid)) = held.split_once('/') else {
            return Ok(None);
        };
        let api: Api<Migration> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let live = api.get_opt(name).await?.is_some_and(|m| {
            m.uid().as_deref() == Some(uid)
                && !m
                    .status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(Phase::is_terminal)
        });
        Ok(live.then(|| name.to_string()))
    }

    /// Another unfinished Migration that already claimed the same Pod.
    pub(super) async fn competing_migration(&self) -> Result<Option<String>, Error> {
        let api: Api<Migration> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let me = self.m.uid();
        Ok(api
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .find_map(|other| {
                let active = other
                    .status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(|p| p != Phase::Pending && !p.is_terminal());
                (other.uid() != me && active && other.spec.workload.pod == self.m.spec.workload.pod)
                    .then(|| other.name_any())
            }))
    }

    /// The bucket credentials from the Secret the spec names (Err: what is wrong).
    pub(super) async fn object_store_access(
        &self,
    ) -> Result<Result<Option<ObjectStoreAccess>, String>, Error> {
        let Some(os) = &self.m.spec.transfer.object_store else {
            return Ok(Ok(None));
        };
        let secrets: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let Some(secret) = secrets.get_opt(&os.credentials_secret).await? else {
            return Ok(Err(format!(
                "Secret {}/{} (transfer.objectStore.credentialsSecret) not found",
                self.ns, os.credentials_secret
            )));
        };
        let data = secret.data.unwrap_or_default();
        let key = |k: &str| {
            data.get(k)
                .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        };
        let (Some(id), Some(secret_key)) = (key("accessKeyId"), key("secretAccessKey")) else {
            return Ok(Err(format!(
                "Secret {}/{} needs keys accessKeyId and secretAccessKey",
                self.ns, os.credentials_secret
            )));
        };
        Ok(Ok(Some(ObjectStoreAccess {
            endpoint: os.endpoint.clone().unwrap_or_default(),
            bucket: os.bucket.clone(),
            region: os.region.clone().unwrap_or_else(|| "us-east-1".into()),
            prefix: os.prefix.clone().unwrap_or_default(),
            access_key_id: id,
            secret_access_key: secret_key,
        })))
    }
}
