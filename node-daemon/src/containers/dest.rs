//! The destination side of a container migration: stage what arrives for the target
//! Pod, open its gate, and wait until `ferry-runtime` has restored every container.
use super::criu::{LazyPagesOpts, PageServerOpts};
use super::gate::Release;
use super::source::LAZY_SOURCE_FILE;
use super::staging::{self, RestorePlan, StageDir};
use super::wire::{BundleHeader, BundleListener};
use super::{ContainerRuntime, Migration, free_port, kill_all, wait_gone};
use crate::error::RuntimeError;
use crate::relay::{self, Relay};
use crate::runtime::*;
use crate::transport::{self, Transport};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// How long the restores may take once every container's state is staged (the
/// wrapper's own create wait is shorter).
const RESTORE_WAIT: Duration = Duration::from_secs(180);
/// How long prepare waits for the first target container's create to reach the wrapper.
const CREATE_WAIT: Duration = Duration::from_secs(10);

pub struct DestState {
    info: ReceiverInfo,
    stages: Vec<StageDir>,
    page_server_pids: Vec<u32>,
    /// Post-copy: the `criu lazy-pages` daemons (they exit once all pages are in).
    lazy_pids: Arc<Mutex<Vec<u32>>>,
    /// The page relays (Cold: pipe → local page server; Live: local lazy-pages →
    /// pipe to the source), ended with the migration.
    relays: Arc<Mutex<Vec<Relay>>>,
    /// Receives, unpacks and marks ready; aborted with the migration.
    receiving: tokio::task::AbortHandle,
    gate: tokio::task::AbortHandle,
    /// When the gate was opened (unix ms), once it was.
    gate_opened: Arc<Mutex<Option<u64>>>,
    /// One entry per staged bundle.
    arrivals: Option<mpsc::Receiver<Result<Arrival, RuntimeError>>>,
}

/// A bundle staged for one container.
struct Arrival {
    /// When the source froze (unix ms), from the bundle's header.
    frozen_at_ms: u64,
    /// `receive/<container>`: from the connection to the stage marked ready.
    step: Step,
}

impl ContainerRuntime {
    pub(super) async fn prepare(&self, plan: ReceiverPlan) -> Result<ReceiverInfo, RuntimeError> {
        if let Some(Migration::Dest(d)) = self.migrations.lock().unwrap().get(&plan.migration_id) {
            return Ok(d.info.clone()); // repeated call
        }
        let Some(restore_root) = self.cfg.restore_root.clone() else {
            return Err(RuntimeError::Unavailable(
                "this node has no ferry runtime (containerd handler `ferry` with ferry-runtime): \
                 containers cannot be restored here; install ferry's node pieces"
                    .into(),
            ));
        };
        self.check_strategy(plan.strategy)?;
        if plan.workload.containers.is_empty() {
            return Err(RuntimeError::InvalidArgument(
                "workload has no containers".into(),
            ));
        }
        if let Some(cri) = &self.cfg.cri {
            super::images::check(cri, &plan.images).await?;
        }
        let uid = &plan.target.pod_uid;
        let lazy = plan.strategy == Strategy::PostCopy;
        let bucket = match &plan.bucket {
            Some(_) if lazy => return Err(super::source::lazy_needs_direct()),
            Some(cfg) => Some(Arc::new(super::source::open_bucket(cfg).await?)),
            None => None,
        };
        let volumes = super::volumes::PodVolumes::parse(&plan.workload.runtime_spec)
            .map_err(RuntimeError::InvalidArgument)?;
        if let Some((vol, c)) = volumes
            .empty_dirs
            .iter()
            .find(|(_, c)| !plan.workload.containers.iter().any(|w| &w.name == *c))
        {
            return Err(RuntimeError::InvalidArgument(format!(
                "emptyDir {vol} is carried by container {c}, which the workload does not have"
            )));
        }
        let mut stages = Vec::new();
        let mut page_servers = Vec::new();
        let mut pids = Vec::new();
        let relays = Arc::new(Mutex::new(Vec::new()));
        // Counts the pages arriving for the page servers, for the gate (`gate.rs`).
        let (pages_tx, pages_rx) = watch::channel(0u64);
        let pages_tx = Arc::new(pages_tx);
        let counted = ferry_transfer::Shaping {
            on_received: Some(ferry_transfer::OnSent(Arc::new(move |m| {
                pages_tx.send_modify(|n| *n += m.raw)
            }))),
            ..plan.shaping.clone()
        };
        for c in &plan.workload.containers {
            let stage = StageDir::new(&self.cfg.state_dir, uid, &c.name).ok_or_else(|| {
                RuntimeError::InvalidArgument(format!(
                    "bad target pod uid {uid:?} or container name {:?}",
                    c.name
                ))
            })?;
            let _ = std::fs::remove_dir_all(&stage.dir);
            for d in [staging::IMAGES, staging::WORK] {
                std::fs::create_dir_all(stage.path(d))
                    .map_err(RuntimeError::io("creating the stage dir"))?;
            }
            let rp = RestorePlan {
                migration_id: plan.migration_id.clone(),
                lazy,
                criu: plan.criu.clone(),
                empty_dirs: volumes.empty_dirs.clone(),
            };
            stage
                .mark(staging::PLAN, &serde_json::to_vec(&rp).expect("json"))
                .map_err(RuntimeError::io("writing the restore plan"))?;
            if !lazy && bucket.is_none() {
                // On loopback only: the source's pages arrive through the relay.
                let port = free_port("127.0.0.1")?;
                let opts = PageServerOpts {
                    images_dir: stage.path(staging::IMAGES),
                    address: "127.0.0.1".into(),
                    port,
                    pidfile: stage.path(staging::WORK).join("page-server.pid"),
                    log_file: stage.path(staging::WORK).join("page-server.log"),
                    lazy_pages: false,
                };
                match self.cfg.criu.start_page_server(&opts).await {
                    Ok(pid) => pids.push(pid),
                    Err(e) => {
                        kill_all(&pids);
                        return Err(e);
                    }
                }
                let pipe = relay::pages_pipe(&plan.migration_id, &c.name);
                let r = relay::inbound(
                    self.cfg.transport.clone(),
                    pipe.clone(),
                    port,
                    counted.clone(),
                );
                relays.lock().unwrap().push(r);
                page_servers.push((c.name.clone(), pipe));
            }
            stages.push(stage);
        }
        // The relays hold the counter now: it closes when they end.
        drop(counted);
        let names: Vec<String> = plan
            .workload
            .containers
            .iter()
            .map(|c| c.name.clone())
            .collect();
        let listener = match &bucket {
            Some(store) => BundleListener::from_bucket(
                &self.cfg.transport,
                store.clone(),
                &plan.token,
                &plan.migration_id,
                &names,
            ),
            None => BundleListener::new(&self.cfg.transport, &plan.migration_id, &names),
        };
        let info = ReceiverInfo {
            receive_endpoint: listener.endpoint(),
            page_servers,
            token: plan.token.clone(),
        };
        let (tx, rx) = mpsc::channel(names.len());
        let (staged_tx, staged_rx) = watch::channel(0usize);
        let lazy_pids = Arc::new(Mutex::new(Vec::new()));
        let lazy_ctx = lazy.then(|| LazyCtx {
            criu: self.cfg.criu.clone(),
            pids: lazy_pids.clone(),
            transport: self.cfg.transport.clone(),
            migration_id: plan.migration_id.clone(),
            source_peer: plan.source_peer.clone(),
            token: plan.token.clone(),
            shaping: plan.shaping.clone(),
            relays: relays.clone(),
        });
        let corrupt = self.cfg.test_corrupt_staged_namespace.as_deref()
            == Some(plan.target.namespace.as_str());
        let receiving = tokio::spawn(receive(
            listener,
            stages.clone(),
            lazy_ctx,
            corrupt,
            tx,
            staged_tx,
        ))
        .abort_handle();
        // The writable layers always move before the restore; memory too unless
        // post-copy fetches it later.
        let writable: u64 = plan
            .workload
            .containers
            .iter()
            .map(|c| c.writable_bytes)
            .sum();
        let release = Release::choose(
            writable,
            if lazy { 0 } else { plan.workload.memory_bytes },
            !lazy && bucket.is_none(),
            self.cfg.early_release_bytes,
        );
        let early = release == Release::Now;
        let gate_opened = Arc::new(Mutex::new(None));
        let gate = tokio::spawn(super::gate::open(
            restore_root,
            uid.clone(),
            release,
            (stages.len(), staged_rx),
            pages_rx,
            gate_opened.clone(),
        ))
        .abort_handle();
        let first_stage = stages[0].clone();
        self.migrations.lock().unwrap().insert(
            plan.migration_id.clone(),
            Migration::Dest(DestState {
                info: info.clone(),
                stages,
                page_server_pids: pids,
                lazy_pids,
                relays,
                receiving,
                gate,
                gate_opened,
                arrivals: Some(rx),
            }),
        );
        if early {
            // Return (and let the source freeze) once the first container's create
            // waits for the state: the kubelet notices the gate's exit only at its next
            // relist (up to a second), which would otherwise add to the downtime.
            let deadline = Instant::now() + CREATE_WAIT;
            while !first_stage.has(staging::WAITING) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if !first_stage.has(staging::WAITING) {
                tracing::warn!(pod_uid = %uid, "no container create waits yet; going on");
            }
        }
        Ok(info)
    }

    pub(super) async fn restore(
        &self,
        migration_id: &str,
        progress: ProgressSink,
    ) -> Result<(), RuntimeError> {
        let (mut arrivals, stages, gate_opened) = {
            let mut m = self.migrations.lock().unwrap();
            match m.get_mut(migration_id) {
                Some(Migration::Dest(d)) => (
                    d.arrivals.take().ok_or_else(|| {
                        RuntimeError::FailedPrecondition(format!(
                            "restore of {migration_id} already started"
                        ))
                    })?,
                    d.stages.clone(),
                    d.gate_opened.clone(),
                ),
                _ => {
                    return Err(RuntimeError::NotFound(format!(
                        "migration {migration_id} has no receiver on this node; call PrepareReceiver first"
                    )));
                }
            }
        };
        progress.stage(Stage::Restoring, "waiting for the state");
        let mut frozen_at = 0;
        for _ in 0..stages.len() {
            let a = arrivals
                .recv()
                .await
                .ok_or_else(|| RuntimeError::Transfer("bundle receiver stopped early".into()))??;
            frozen_at = a.frozen_at_ms;
            progress.step_measured(a.step);
        }
        progress.stage(
            Stage::Restoring,
            "state staged; the target Pod's containers restore it",
        );
        let deadline = Instant::now() + RESTORE_WAIT;
        let mut last = 0;
        for st in &stages {
            loop {
                if let Some(r) = st.restored() {
                    last = last.max(r.at_unix_ms);
                    if r.started_unix_ms > 0 {
                        progress.step_measured(Step {
                            name: format!("restore/{}", st.container()),
                            start_unix_ms: r.started_unix_ms,
                            duration_ms: r.at_unix_ms.saturating_sub(r.started_unix_ms),
                        });
                    }
                    break;
                }
                if let Some(why) = st.read(staging::FAILED) {
                    return Err(RuntimeError::FailedPrecondition(format!(
                        "restoring {} failed: {why}",
                        st.dir.display()
                    )));
                }
                if st.has(staging::ABORTED) {
                    return Err(RuntimeError::Aborted("migration aborted".into()));
                }
                if Instant::now() > deadline {
                    return Err(RuntimeError::FailedPrecondition(format!(
                        "the target Pod's container did not restore {} within {RESTORE_WAIT:?}: \
                         is the Pod running with RuntimeClass ferry?",
                        st.dir.display()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        if frozen_at > 0 {
            progress.downtime_ms(last.saturating_sub(frozen_at));
        }
        // `gate`: how long after the freeze the creates were held back (a gate opened
        // before the freeze, as for small workloads, held nothing back).
        let opened = *gate_opened.lock().unwrap();
        if let Some(at) = opened.filter(|&at| frozen_at > 0 && at > frozen_at) {
            progress.step_measured(Step {
                name: "gate".into(),
                start_unix_ms: frozen_at,
                duration_ms: at - frozen_at,
            });
        }
        progress.stage(
            Stage::Restoring,
            "every container restored and running in the target Pod",
        );
        Ok(())
    }

    pub(super) async fn finalize_dest(&self, d: DestState) {
        d.receiving.abort();
        d.gate.abort();
        kill_all(&d.page_server_pids);
        // Lazy-pages daemons exit by themselves once every page is in (the source's
        // checkpoint succeeded only then); give stragglers a moment.
        let lazy: Vec<u32> = d.lazy_pids.lock().unwrap().drain(..).collect();
        wait_gone(&lazy, Duration::from_secs(10)).await;
        kill_all(&lazy);
        d.relays.lock().unwrap().clear();
        for st in &d.stages {
            st.drop_payload(false);
        }
    }

    /// Ends the receiving side. [`Left::NoCopy`] when every container's restore was
    /// refused before it began (this Abort decided first), so no copy runs here.
    pub(super) async fn abort_dest(&self, d: DestState) -> Left {
        let left = abort_stages(&d.stages);
        d.receiving.abort();
        d.gate.abort();
        kill_all(&d.page_server_pids);
        kill_all(&d.lazy_pids.lock().unwrap().drain(..).collect::<Vec<_>>());
        d.relays.lock().unwrap().clear();
        drop_payloads(&d.stages);
        left
    }

    /// Abort of a migration this daemon received before it restarted: only its stages
    /// on disk are left (the receiver, gate and page servers died with the old
    /// process). They are decided and marked as a live Abort would, so a restore the
    /// kubelet starts later fails, and an Abort that decided first for every container
    /// still vouches that no copy runs here. Nothing on disk: nothing to vouch for.
    pub(super) fn abort_staged(&self, migration_id: &str) -> Left {
        let stages = staging::stages_of(&self.cfg.state_dir, migration_id);
        if stages.is_empty() {
            return Left::MayRun;
        }
        let left = abort_stages(&stages);
        drop_payloads(&stages);
        left
    }
}

/// Decides every stage "abort" and marks it aborted; [`Left::NoCopy`] when this call
/// decided for all of them (no restore began, none can begin).
fn abort_stages(stages: &[StageDir]) -> Left {
    let mut left = Left::NoCopy;
    for st in stages {
        match st.decide(staging::Decision::Abort) {
            Ok(staging::Decision::Abort) => {}
            Ok(staging::Decision::Restore) | Err(_) => left = Left::MayRun,
        }
        // A create still waiting fails now; a later one never starts fresh.
        let _ = st.mark(staging::ABORTED, b"");
    }
    left
}

fn drop_payloads(stages: &[StageDir]) {
    for st in stages {
        // CRIU's logs stay for the post-mortem of a failed migration.
        st.drop_payload(true);
    }
}

/// What a post-copy destination needs to start a container's lazy-pages daemon.
#[derive(Clone)]
struct LazyCtx {
    criu: super::criu::Criu,
    pids: Arc<Mutex<Vec<u32>>>,
    transport: Arc<Transport>,
    migration_id: String,
    /// The only peer the lazy pages are fetched from (what the controller named).
    source_peer: String,
    token: String,
    shaping: ferry_transfer::Shaping,
    relays: Arc<Mutex<Vec<Relay>>>,
}

/// Accepts one bundle per stage, unpacks it and marks the stage ready (Live: after
/// starting its lazy-pages daemon).
async fn receive(
    mut listener: BundleListener,
    stages: Vec<StageDir>,
    lazy: Option<LazyCtx>,
    corrupt: bool,
    tx: mpsc::Sender<Result<Arrival, RuntimeError>>,
    staged: watch::Sender<usize>,
) {
    let mut unpacks = tokio::task::JoinSet::new();
    for _ in 0..stages.len() {
        let (header, mut body) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        let Some(stage) = stages
            .iter()
            .find(|s| s.dir.ends_with(&header.container))
            .cloned()
        else {
            let _ = tx
                .send(Err(RuntimeError::Transfer(format!(
                    "unexpected bundle for {}",
                    header.container
                ))))
                .await;
            return;
        };
        let (tx, staged, lazy) = (tx.clone(), staged.clone(), lazy.clone());
        unpacks.spawn(async move {
            let start = unix_ms();
            let r = stage_bundle(&stage, &header, &mut body, lazy.as_ref(), corrupt).await;
            if r.is_ok() {
                staged.send_modify(|n| *n += 1);
            }
            let r = r.map(|()| Arrival {
                frozen_at_ms: header.frozen_at_ms,
                step: Step {
                    name: format!("receive/{}", header.container),
                    start_unix_ms: start,
                    duration_ms: unix_ms().saturating_sub(start),
                },
            });
            let _ = tx.send(r).await;
        });
    }
    while unpacks.join_next().await.is_some() {}
}

async fn stage_bundle(
    stage: &StageDir,
    _header: &BundleHeader,
    body: &mut (impl tokio::io::AsyncRead + Unpin),
    lazy: Option<&LazyCtx>,
    corrupt: bool,
) -> Result<(), RuntimeError> {
    unpack(&stage.dir, body).await?;
    if corrupt {
        let pstree = stage.path(staging::IMAGES).join("pstree.img");
        tracing::warn!(path = %pstree.display(), "test fault injection: corrupting the staged images");
        std::fs::write(&pstree, b"garbage").map_err(RuntimeError::io(
            "test fault injection: corrupting pstree.img",
        ))?;
    }
    if let Some(lazy) = lazy {
        // The userfaultfd daemon must listen in the restore's work dir first. It asks
        // the source for pages through a relay: loopback here, the pipe between nodes.
        let images = stage.path(staging::IMAGES);
        let source = lazy_source(&images, &lazy.source_peer)?;
        let pipe = relay::lazy_pipe(&lazy.migration_id, &stage.container());
        let peer = transport::peer(&source, &lazy.token)?;
        let (local, relay) =
            relay::outbound(lazy.transport.clone(), peer, pipe, lazy.shaping.clone()).await?;
        lazy.relays.lock().unwrap().push(relay);
        let opts = LazyPagesOpts {
            images_dir: images,
            work_dir: stage.path(staging::WORK),
            source_address: local.ip().to_string(),
            source_port: local.port(),
            pidfile: stage.path(staging::WORK).join("lazy-pages.pid"),
            log_file: stage.path(staging::WORK).join("lazy-pages.log"),
        };
        let pid = lazy.criu.start_lazy_pages(&opts).await?;
        lazy.pids.lock().unwrap().push(pid);
    }
    stage
        .mark(staging::READY, b"")
        .map_err(RuntimeError::io("marking the stage ready"))
}

/// Unpacks a received bundle with [`super::unpack`] (nothing in it is trusted), on this
/// thread with the async body bridged: the stream's digest check runs as it is read.
async fn unpack(
    dest: &Path,
    body: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<(), RuntimeError> {
    tokio::task::block_in_place(|| {
        super::unpack::unpack(dest, tokio_util::io::SyncIoBridge::new(body))
    })
    .map(|_| ())
    .map_err(|e| RuntimeError::Transfer(format!("receiving bundle into {}: {e}", dest.display())))
}

/// Where the source serves a post-copy bundle's pages: the transfer endpoint the bundle
/// names, accepted only on the host the controller named as the source (a bundle
/// cannot send this node's page requests anywhere else).
fn lazy_source(images: &Path, source_peer: &str) -> Result<String, RuntimeError> {
    let file = images.join(LAZY_SOURCE_FILE);
    let text = std::fs::read_to_string(&file).map_err(|e| {
        RuntimeError::FailedPrecondition(format!(
            "post-copy bundle lacks the source's transfer endpoint ({}): {e}",
            file.display()
        ))
    })?;
    let endpoint = text.trim();
    let bad = || {
        RuntimeError::FailedPrecondition(format!(
            "post-copy bundle names {endpoint:?} as its page source; this migration's \
             source is {source_peer}"
        ))
    };
    match transport::host_port(endpoint) {
        Ok((host, _)) if host == source_peer => Ok(endpoint.to_string()),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lazy_source_must_be_the_named_source() {
        let dir = tempfile::tempdir().unwrap();
        let write = |s: &str| std::fs::write(dir.path().join(LAZY_SOURCE_FILE), s).unwrap();
        write("10.0.0.1:7443\n");
        assert_eq!(
            lazy_source(dir.path(), "10.0.0.1").unwrap(),
            "10.0.0.1:7443"
        );
        assert!(lazy_source(dir.path(), "10.0.0.9").is_err());
        write("10.0.0.1");
        assert!(lazy_source(dir.path(), "10.0.0.1").is_err());
        write("--root=/x:1");
        assert!(lazy_source(dir.path(), "10.0.0.1").is_err());
    }
}
