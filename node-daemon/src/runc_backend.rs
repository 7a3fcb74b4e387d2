//! The runc + CRIU backend of [`Runtime`].
//!
//! Cold migration of a pod (all its containers at once):
//! 1. destination (`prepare_receiver`): one CRIU page server per container and one
//!    bundle listener;
//! 2. source (`checkpoint_out`): `runc pause` every container (the consistent cut), then
//!    in parallel per container `runc checkpoint --leave-running --page-server DST`, so
//!    memory pages stream to the destination while CRIU dumps, and then the rest of the
//!    bundle (CRIU's small images, config.json, the rootfs) as one tar stream;
//! 3. destination (`restore_in`): each container is restored (`runc restore`) as soon
//!    as its bundle has arrived, all in parallel;
//! 4. `finalize` deletes the frozen source; `abort` resumes it (rollback) or removes
//!    what the destination restored.
//!
//! The source is paused and checkpointed with `--leave-running`: CRIU restores the
//! freezer state it found, so the source stays frozen (never two running copies) yet
//! resumable until finalize.
//!
//! Post-copy (`Strategy::PostCopy`, CRIU lazy pages) reverses the page flow: the source's
//! `runc checkpoint --lazy-pages` dumps everything but the anonymous memory, then serves
//! that memory from a lazy page server on the source; the bundle carries the server's
//! address (file [`LAZY_SOURCE_FILE`] among the images); the destination starts
//! `criu lazy-pages` and `runc restore --lazy-pages`, so the pod runs at once and its
//! pages arrive on fault and in the background. The source's checkpoint ends when the
//! last page has been fetched.
use crate::criu::{Criu, LazyPagesOpts, PageServerOpts};
use crate::error::RuntimeError;
use crate::runc::{CheckpointOpts, RestoreOpts, Runc, RuncContainer, kill_group, rss_bytes};
use crate::runtime::*;
use crate::transport::Transport;
use crate::wire::{self, BundleHeader, BundleListener};
use futures::future::{BoxFuture, FutureExt, try_join_all};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::mpsc;

/// Node-level settings of the backend.
#[derive(Debug, Clone)]
pub struct RuncConfig {
    pub runc: Runc,
    pub criu: Criu,
    /// Staging area for images and received bundles.
    pub state_dir: PathBuf,
    /// This node's address peers reach (page servers and bundle listeners bind to it).
    pub advertise_ip: String,
    /// Parent cgroup path for restored containers (two nodes on one host must differ).
    pub cgroup_prefix: String,
    /// This daemon's mutual-TLS transfer endpoint: bundles travel through it.
    pub transport: Arc<Transport>,
}

/// Written into a post-copy bundle's `images/`: `host:port` of the source's lazy page
/// server (CRIU ignores files it does not know in an images dir).
pub const LAZY_SOURCE_FILE: &str = "ferry-lazy-source";

enum Migration {
    Source {
        ids: Vec<String>,
        resumable: bool,
        /// Process groups of post-copy `runc checkpoint`s still serving pages.
        serving: Arc<Mutex<Vec<u32>>>,
    },
    Dest {
        info: ReceiverInfo,
        dir: PathBuf,
        strategy: Strategy,
        page_server_pids: Vec<u32>,
        /// Post-copy: the `criu lazy-pages` daemons (they exit once all pages are in).
        lazy_pids: Arc<Mutex<Vec<u32>>>,
        arrivals: Option<mpsc::Receiver<Result<BundleHeader, RuntimeError>>>,
        /// Receives and unpacks the bundles; aborted with the migration.
        receiving: tokio::task::AbortHandle,
        expected: usize,
        restored: Arc<Mutex<Vec<String>>>,
    },
}

pub struct RuncRuntime {
    cfg: RuncConfig,
    strategies: Vec<StrategySupport>,
    migrations: Mutex<HashMap<String, Migration>>,
}

impl RuncRuntime {
    /// Probes CRIU once so `strategies` answers from memory.
    pub async fn new(cfg: RuncConfig) -> RuncRuntime {
        let strategies = cfg.criu.probe().await;
        RuncRuntime {
            cfg,
            strategies,
            migrations: Mutex::new(HashMap::new()),
        }
    }

    fn check_strategy(&self, s: Strategy) -> Result<(), RuntimeError> {
        match self.strategies.iter().find(|x| x.strategy == s) {
            Some(x) if x.available => Ok(()),
            Some(x) => Err(RuntimeError::Unavailable(format!(
                "strategy {s:?} on this node: {}",
                x.reason
            ))),
            None => Err(RuntimeError::Unavailable(format!(
                "strategy {s:?} is unknown to the runc backend"
            ))),
        }
    }

    fn mig_dir(&self, migration_id: &str) -> Result<PathBuf, RuntimeError> {
        if migration_id.is_empty() || migration_id.contains('/') || migration_id.starts_with('.') {
            return Err(RuntimeError::InvalidArgument(format!(
                "bad migration_id {migration_id:?}"
            )));
        }
        Ok(self.cfg.state_dir.join(migration_id))
    }

    async fn describe_pod(
        &self,
        pod: &WorkloadRef,
    ) -> Result<Option<WorkloadDescription>, RuntimeError> {
        let found = match self.cfg.runc.pod_containers(pod).await {
            Ok(c) => c,
            Err(RuntimeError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let containers: Vec<ContainerInfo> = found
            .iter()
            .map(|c| ContainerInfo {
                name: c.name().into(),
                id: c.id.clone(),
                pid: c.pid,
                rss_bytes: rss_bytes(c.pid),
            })
            .collect();
        Ok(Some(WorkloadDescription {
            workload: pod.clone(),
            kind: WorkloadKind::Containers,
            memory_bytes: containers.iter().map(|c| c.rss_bytes).sum(),
            containers,
            runtime_spec: Vec::new(),
        }))
    }

    async fn prepare(&self, plan: ReceiverPlan) -> Result<ReceiverInfo, RuntimeError> {
        if let Some(Migration::Dest { info, .. }) =
            self.migrations.lock().unwrap().get(&plan.migration_id)
        {
            return Ok(info.clone()); // repeated call
        }
        self.check_strategy(plan.strategy)?;
        if plan.workload.containers.is_empty() {
            return Err(RuntimeError::InvalidArgument(
                "workload has no containers".into(),
            ));
        }
        let dir = self.mig_dir(&plan.migration_id)?;
        let mut page_servers = Vec::new();
        let mut pids = Vec::new();
        for c in &plan.workload.containers {
            if c.name.is_empty() || c.name.contains('/') {
                return Err(RuntimeError::InvalidArgument(format!(
                    "bad container name {:?}",
                    c.name
                )));
            }
            let cdir = dir.join(&c.name);
            std::fs::create_dir_all(cdir.join("images"))
                .map_err(RuntimeError::io("creating staging dir"))?;
            std::fs::create_dir_all(dir.join("work").join(&c.name))
                .map_err(RuntimeError::io("creating work dir"))?;
            if plan.strategy == Strategy::PostCopy {
                continue; // the source serves the pages
            }
            let port = free_port(&self.cfg.advertise_ip)?;
            let opts = PageServerOpts {
                images_dir: cdir.join("images"),
                address: self.cfg.advertise_ip.clone(),
                port,
                pidfile: dir.join("work").join(&c.name).join("page-server.pid"),
                log_file: dir.join("work").join(&c.name).join("page-server.log"),
                lazy_pages: false,
            };
            pids.push(self.cfg.criu.start_page_server(&opts).await?);
            page_servers.push((c.name.clone(), format!("{}:{port}", self.cfg.advertise_ip)));
        }
        let names: Vec<String> = plan
            .workload
            .containers
            .iter()
            .map(|c| c.name.clone())
            .collect();
        let listener = BundleListener::new(&self.cfg.transport, &plan.migration_id, &names);
        let info = ReceiverInfo {
            receive_endpoint: listener.endpoint(),
            page_servers,
        };
        let (tx, rx) = mpsc::channel(plan.workload.containers.len());
        let receiving = tokio::spawn(receive_bundles(
            listener,
            dir.clone(),
            plan.workload.containers.len(),
            tx,
        ))
        .abort_handle();
        self.migrations.lock().unwrap().insert(
            plan.migration_id.clone(),
            Migration::Dest {
                info: info.clone(),
                dir,
                strategy: plan.strategy,
                page_server_pids: pids,
                lazy_pids: Arc::new(Mutex::new(Vec::new())),
                arrivals: Some(rx),
                receiving,
                expected: plan.workload.containers.len(),
                restored: Arc::new(Mutex::new(Vec::new())),
            },
        );
        Ok(info)
    }

    async fn validate(&self, plan: &CheckpointPlan) -> Result<Vec<RuncContainer>, RuntimeError> {
        self.check_strategy(plan.strategy)?;
        let containers = self.cfg.runc.pod_containers(&plan.workload).await?;
        for c in &containers {
            if c.status != "running" {
                return Err(RuntimeError::FailedPrecondition(format!(
                    "container {} ({}) of pod {} is {}, not running; nothing was changed",
                    c.name(),
                    c.id,
                    plan.workload,
                    c.status
                )));
            }
            let needs_page_server = plan.strategy != Strategy::PostCopy;
            if needs_page_server && !plan.page_servers.iter().any(|(n, _)| n == c.name()) {
                return Err(RuntimeError::InvalidArgument(format!(
                    "no page server given for container {}; pass PrepareReceiverResponse.page_servers",
                    c.name()
                )));
            }
        }
        Ok(containers)
    }

    async fn checkpoint(
        &self,
        plan: CheckpointPlan,
        progress: ProgressSink,
    ) -> Result<(), RuntimeError> {
        self.check_strategy(plan.strategy)?;
        let dir = self.mig_dir(&plan.migration_id)?;
        let containers = self.validate(&plan).await?;
        let ids: Vec<String> = containers.iter().map(|c| c.id.clone()).collect();
        let serving = Arc::new(Mutex::new(Vec::new()));
        self.migrations.lock().unwrap().insert(
            plan.migration_id.clone(),
            Migration::Source {
                ids: ids.clone(),
                resumable: true,
                serving: serving.clone(),
            },
        );

        // The consistent cut: every container frozen before any is dumped.
        progress.stage(
            Stage::Checkpointing,
            format!("freezing {} container(s)", ids.len()),
        );
        let mut paused: Vec<String> = Vec::new();
        for id in &ids {
            if let Err(e) = self.cfg.runc.pause(id).await {
                for p in &paused {
                    let _ = self.cfg.runc.resume(p).await;
                }
                return Err(e);
            }
            paused.push(id.clone());
        }
        let frozen_at_ms = unix_ms();
        // Post-copy: once a bundle is out the destination may already run the pod, so a
        // later failure must not resume the source (two diverging copies).
        let sent_any = AtomicBool::new(false);
        let cp = Checkpoint {
            plan: &plan,
            dir: &dir,
            frozen_at_ms,
            progress: &progress,
            serving: &serving,
            sent_any: &sent_any,
        };
        let result = try_join_all(containers.iter().map(|c| {
            let ps = plan
                .page_servers
                .iter()
                .find(|(n, _)| n == c.name())
                .map(|(_, e)| e.clone());
            self.checkpoint_one(&cp, c, ps)
        }))
        .await;
        match result {
            Ok(_) => {
                if !plan.leave_running {
                    // CRIU killed the tasks; nothing to resume any more.
                    if let Some(Migration::Source { resumable, .. }) =
                        self.migrations.lock().unwrap().get_mut(&plan.migration_id)
                    {
                        *resumable = false;
                    }
                }
                progress.stage(
                    Stage::Transferring,
                    "bundles sent; source frozen until finalize or abort",
                );
                Ok(())
            }
            Err(e) => {
                for pgid in serving.lock().unwrap().drain(..) {
                    kill_group(pgid);
                }
                if plan.strategy == Strategy::PostCopy && sent_any.load(Ordering::SeqCst) {
                    tracing::error!(error = %e, "post-copy failed after a bundle was sent; source left frozen");
                    return Err(e);
                }
                // Rollback: the source continues as if nothing happened.
                if plan.leave_running {
                    for id in &ids {
                        let _ = self.cfg.runc.resume(id).await;
                    }
                }
                Err(e)
            }
        }
    }

    async fn checkpoint_one(
        &self,
        cp: &Checkpoint<'_>,
        c: &RuncContainer,
        page_server: Option<String>,
    ) -> Result<(), RuntimeError> {
        let plan = cp.plan;
        let name = c.name().to_string();
        let images = cp.dir.join(&name).join("images");
        let work = cp.dir.join(&name).join("work");
        for d in [&images, &work] {
            let _ = std::fs::remove_dir_all(d);
            std::fs::create_dir_all(d).map_err(RuntimeError::io("creating checkpoint dir"))?;
        }
        let lazy = plan.strategy == Strategy::PostCopy;
        let lazy_server = if lazy {
            let port = free_port(&self.cfg.advertise_ip)?;
            Some(format!("{}:{port}", self.cfg.advertise_ip))
        } else {
            None
        };
        let opts = CheckpointOpts {
            image_path: images.clone(),
            work_path: work.clone(),
            leave_running: plan.leave_running,
            tcp_established: true,
            // Lazy: where this node serves the pages (CRIU binds the port on every
            // address); otherwise the destination's page server that receives them.
            page_server: lazy_server.clone().or(page_server),
            lazy_pages: lazy,
            // runc writes one byte to its stdout when the lazy page server is up.
            status_fd: lazy.then_some(1),
        };
        let args = self.cfg.runc.checkpoint_args(&c.id, &opts);
        let dump_log = work.join("dump.log");
        let serving = match &lazy_server {
            None => {
                self.cfg.runc.run(args.clone(), Some(&dump_log)).await?;
                None
            }
            Some(server) => {
                let child = self.lazy_dump(&args, &dump_log, cp.serving).await?;
                std::fs::write(images.join(LAZY_SOURCE_FILE), server)
                    .map_err(RuntimeError::io("writing lazy source address"))?;
                Some(child)
            }
        };

        // The rest of the bundle: CRIU's non-page images, config.json and the rootfs.
        let config = c.bundle.join("config.json");
        let rootfs = rootfs_of(&c.bundle)?;
        let mut tar = Command::new("tar");
        tar.args(tar_create_args(&images, &config, &rootfs))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = tar.spawn().map_err(RuntimeError::io("starting tar"))?;
        let mut out = child.stdout.take().expect("piped");
        let header = BundleHeader {
            migration_id: plan.migration_id.clone(),
            container: name.clone(),
            container_id: c.id.clone(),
            frozen_at_ms: cp.frozen_at_ms,
        };
        cp.sent_any.store(true, Ordering::SeqCst);
        let sent = wire::send(
            &self.cfg.transport,
            &plan.receive_endpoint,
            &header,
            &mut out,
        )
        .await;
        let status = child
            .wait_with_output()
            .await
            .map_err(RuntimeError::io("waiting for tar"))?;
        let sent = sent?;
        if !status.status.success() {
            return Err(RuntimeError::command(
                "tar",
                &[],
                Some(status.status),
                &status.stderr,
                String::new(),
            ));
        }
        cp.progress.add_bytes(sent);
        tracing::info!(container = %name, bytes = sent, "bundle sent");
        if let Some(child) = serving {
            cp.progress.stage(
                Stage::Transferring,
                format!("post-copy: {name} bundle sent; serving its memory to the destination"),
            );
            // Post-copy: done once the destination has fetched every page.
            let pgid = child.id();
            let r = self.cfg.runc.finish(child, &args, Some(&dump_log)).await;
            if let Some(pgid) = pgid {
                cp.serving.lock().unwrap().retain(|p| *p != pgid);
            }
            r?;
            tracing::info!(container = %name, "lazy pages all fetched by the destination");
        }
        Ok(())
    }

    /// Starts a `runc checkpoint --lazy-pages --status-fd 1` and returns once CRIU has
    /// dumped everything but the lazy memory and its page server listens (runc writes a
    /// byte to its stdout then), with the still-running runc.
    async fn lazy_dump(
        &self,
        args: &[String],
        dump_log: &Path,
        serving: &Mutex<Vec<u32>>,
    ) -> Result<tokio::process::Child, RuntimeError> {
        let mut child = self.cfg.runc.spawn(args)?;
        if let Some(pgid) = child.id() {
            serving.lock().unwrap().push(pgid);
        }
        let mut stdout = child.stdout.take().expect("piped");
        let mut byte = [0u8; 1];
        // EOF (or an error) means runc exited before the server came up.
        let ready = matches!(stdout.read(&mut byte).await, Ok(1));
        if !ready {
            if let Some(pgid) = child.id() {
                serving.lock().unwrap().retain(|p| *p != pgid);
            }
            self.cfg.runc.finish(child, args, Some(dump_log)).await?;
            return Err(RuntimeError::FailedPrecondition(format!(
                "runc checkpoint --lazy-pages exited without starting its page server: {}",
                crate::criu::log_excerpt(dump_log)
            )));
        }
        Ok(child)
    }

    async fn restore(
        &self,
        migration_id: &str,
        target: &WorkloadRef,
        progress: ProgressSink,
    ) -> Result<(), RuntimeError> {
        let (mut arrivals, dir, expected, restored, lazy) = {
            let mut m = self.migrations.lock().unwrap();
            match m.get_mut(migration_id) {
                Some(Migration::Dest {
                    arrivals,
                    dir,
                    expected,
                    restored,
                    strategy,
                    lazy_pids,
                    ..
                }) => (
                    arrivals.take().ok_or_else(|| {
                        RuntimeError::FailedPrecondition(format!(
                            "restore of {migration_id} already started"
                        ))
                    })?,
                    dir.clone(),
                    *expected,
                    restored.clone(),
                    (*strategy == Strategy::PostCopy).then(|| lazy_pids.clone()),
                ),
                _ => {
                    return Err(RuntimeError::NotFound(format!(
                        "migration {migration_id} has no receiver on this node; call PrepareReceiver first"
                    )));
                }
            }
        };
        progress.stage(Stage::Restoring, "waiting for bundles");
        // Start each container's restore as soon as its bundle is complete.
        let mut tasks = Vec::new();
        let mut frozen_at = 0;
        for _ in 0..expected {
            let header = arrivals
                .recv()
                .await
                .ok_or_else(|| RuntimeError::Transfer("bundle receiver stopped early".into()))??;
            frozen_at = header.frozen_at_ms;
            tasks.push(self.restore_one(&dir, header, target, restored.clone(), lazy.clone()));
        }
        let result = try_join_all(tasks).await;
        if let Err(e) = result {
            // Leave nothing half-restored behind; the source is still resumable.
            let ids: Vec<String> = restored.lock().unwrap().drain(..).collect();
            for id in ids {
                let _ = self.cfg.runc.delete_force(&id).await;
            }
            if let Some(l) = &lazy {
                kill_all(&l.lock().unwrap().drain(..).collect::<Vec<_>>());
            }
            return Err(e);
        }
        if frozen_at > 0 {
            progress.downtime_ms(unix_ms().saturating_sub(frozen_at));
        }
        progress.stage(Stage::Restoring, "all containers restored and running");
        Ok(())
    }

    async fn restore_one(
        &self,
        dir: &Path,
        header: BundleHeader,
        target: &WorkloadRef,
        restored: Arc<Mutex<Vec<String>>>,
        lazy_pids: Option<Arc<Mutex<Vec<u32>>>>,
    ) -> Result<(), RuntimeError> {
        let bundle = dir.join(&header.container);
        let cgroup = format!(
            "{}/{}/{}",
            self.cfg.cgroup_prefix.trim_end_matches('/'),
            header.migration_id,
            header.container
        );
        let work = dir.join("work").join(&header.container);
        std::fs::create_dir_all(&work).map_err(RuntimeError::io("creating work dir"))?;
        let criu_conf = write_criu_restore_conf(&work)?;
        rewrite_config(&bundle.join("config.json"), target, &cgroup, &criu_conf)?;
        let mut lazy_pid = None;
        if let Some(pids) = &lazy_pids {
            // The userfaultfd daemon must listen in the restore's work dir first.
            let opts = lazy_pages_opts(&bundle.join("images"), &work)?;
            let pid = self.cfg.criu.start_lazy_pages(&opts).await?;
            pids.lock().unwrap().push(pid);
            lazy_pid = Some(pid);
        }
        let opts = RestoreOpts {
            image_path: bundle.join("images"),
            work_path: work.clone(),
            bundle: bundle.clone(),
            tcp_established: true,
            lazy_pages: lazy_pids.is_some(),
        };
        let args = self.cfg.runc.restore_args(&header.container_id, &opts);
        let r = self
            .cfg
            .runc
            .run(args, Some(&work.join("restore.log")))
            .await;
        if r.is_err() {
            // runc may leave a half-created container behind.
            let _ = self.cfg.runc.delete_force(&header.container_id).await;
            if let Some(pid) = lazy_pid {
                kill_all(&[pid]);
            }
        } else {
            restored.lock().unwrap().push(header.container_id.clone());
        }
        r.map(drop)
    }

    async fn finalize_mig(&self, migration_id: &str) -> Result<(), RuntimeError> {
        let entry = self.migrations.lock().unwrap().remove(migration_id);
        let dir = self.mig_dir(migration_id)?;
        match entry {
            Some(Migration::Source { ids, serving, .. }) => {
                // Post-copy: the checkpoint ended when the last page was fetched, so
                // nothing should still serve; stop anything left over.
                for pgid in serving.lock().unwrap().drain(..) {
                    kill_group(pgid);
                }
                for id in ids {
                    // The frozen source copy goes away; a container already gone is fine.
                    if let Err(e) = self.cfg.runc.delete_force(&id).await {
                        tracing::warn!(%id, error = %e, "deleting source container");
                    }
                }
                let _ = std::fs::remove_dir_all(&dir);
                Ok(())
            }
            Some(Migration::Dest {
                dir,
                page_server_pids,
                lazy_pids,
                receiving,
                ..
            }) => {
                receiving.abort();
                kill_all(&page_server_pids);
                // Lazy-pages daemons exit by themselves once every page is in (the
                // source's checkpoint succeeded only then); give stragglers a moment.
                let lazy: Vec<u32> = lazy_pids.lock().unwrap().drain(..).collect();
                wait_gone(&lazy, std::time::Duration::from_secs(10)).await;
                kill_all(&lazy);
                // The rootfs of the restored containers lives in the bundle: keep it, drop
                // only the CRIU images.
                for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let _ = std::fs::remove_dir_all(entry.path().join("images"));
                }
                Ok(())
            }
            None => Ok(()), // already finalized
        }
    }

    async fn abort_mig(&self, migration_id: &str) -> Result<(), RuntimeError> {
        let entry = self.migrations.lock().unwrap().remove(migration_id);
        match entry {
            Some(Migration::Source {
                ids,
                resumable,
                serving,
            }) => {
                for pgid in serving.lock().unwrap().drain(..) {
                    kill_group(pgid);
                }
                if !resumable {
                    return Err(RuntimeError::FailedPrecondition(format!(
                        "migration {migration_id} was checkpointed without leave_running; the source cannot resume"
                    )));
                }
                let mut first_err = None;
                for id in &ids {
                    let state = self
                        .cfg
                        .runc
                        .run(self.cfg.runc.simple_args("state", id, &[]), None)
                        .await;
                    let paused = state
                        .map(|s| String::from_utf8_lossy(&s).contains("\"paused\""))
                        .unwrap_or(false);
                    if paused && let Err(e) = self.cfg.runc.resume(id).await {
                        first_err.get_or_insert(e);
                    }
                }
                let _ = std::fs::remove_dir_all(self.mig_dir(migration_id)?);
                first_err.map_or(Ok(()), Err)
            }
            Some(Migration::Dest {
                dir,
                page_server_pids,
                restored,
                lazy_pids,
                receiving,
                ..
            }) => {
                receiving.abort();
                kill_all(&page_server_pids);
                kill_all(&lazy_pids.lock().unwrap().drain(..).collect::<Vec<_>>());
                let ids: Vec<String> = restored.lock().unwrap().drain(..).collect();
                for id in ids {
                    let _ = self.cfg.runc.delete_force(&id).await;
                }
                let _ = std::fs::remove_dir_all(&dir);
                Ok(())
            }
            None => Ok(()),
        }
    }
}

impl Runtime for RuncRuntime {
    fn name(&self) -> &'static str {
        "runc"
    }

    fn strategies(&self) -> Vec<StrategySupport> {
        self.strategies.clone()
    }

    fn describe<'a>(
        &'a self,
        w: &'a WorkloadRef,
    ) -> BoxFuture<'a, Result<Option<WorkloadDescription>, RuntimeError>> {
        self.describe_pod(w).boxed()
    }

    fn prepare_receiver(
        &self,
        plan: ReceiverPlan,
        progress: ProgressSink,
    ) -> BoxFuture<'_, Result<ReceiverInfo, RuntimeError>> {
        async move {
            let r = self.prepare(plan).await;
            if r.is_ok() {
                progress.stage(Stage::Prepared, "page servers and bundle listener ready");
            }
            r
        }
        .boxed()
    }

    fn check_checkpoint<'a>(
        &'a self,
        plan: &'a CheckpointPlan,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        self.validate(plan).map(|r| r.map(drop)).boxed()
    }

    fn checkpoint_out(
        &self,
        plan: CheckpointPlan,
        progress: ProgressSink,
    ) -> BoxFuture<'_, Result<(), RuntimeError>> {
        self.checkpoint(plan, progress).boxed()
    }

    fn restore_in<'a>(
        &'a self,
        migration_id: &'a str,
        target: &'a WorkloadRef,
        progress: ProgressSink,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        self.restore(migration_id, target, progress).boxed()
    }

    fn finalize<'a>(&'a self, migration_id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        self.finalize_mig(migration_id).boxed()
    }

    fn abort<'a>(&'a self, migration_id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        self.abort_mig(migration_id).boxed()
    }
}

/// Accepts `expected` bundles and unpacks each into `dir/<container>/`, reporting each
/// complete one on `tx`.
async fn receive_bundles(
    mut listener: BundleListener,
    dir: PathBuf,
    expected: usize,
    tx: mpsc::Sender<Result<BundleHeader, RuntimeError>>,
) {
    let mut unpacks = tokio::task::JoinSet::new();
    for _ in 0..expected {
        let (header, mut body) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        let dest = dir.join(&header.container);
        let tx = tx.clone();
        unpacks.spawn(async move {
            let r = unpack(&dest, &mut body).await.map(|()| header);
            let _ = tx.send(r).await;
        });
    }
    while unpacks.join_next().await.is_some() {}
}

async fn unpack(
    dest: &Path,
    body: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<(), RuntimeError> {
    std::fs::create_dir_all(dest).map_err(RuntimeError::io("creating bundle dir"))?;
    let args = vec![
        "-x".to_string(),
        "-f".into(),
        "-".into(),
        "-C".into(),
        dest.display().to_string(),
    ];
    let mut child = Command::new("tar")
        .args(&args)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(RuntimeError::io("starting tar"))?;
    let mut stdin = child.stdin.take().expect("piped");
    let copied = tokio::io::copy(body, &mut stdin).await;
    drop(stdin);
    let out = child
        .wait_with_output()
        .await
        .map_err(RuntimeError::io("waiting for tar"))?;
    copied.map_err(|e| {
        RuntimeError::Transfer(format!("receiving bundle into {}: {e}", dest.display()))
    })?;
    if !out.status.success() {
        return Err(RuntimeError::command(
            "tar",
            &args,
            Some(out.status),
            &out.stderr,
            String::new(),
        ));
    }
    Ok(())
}

/// `tar` arguments that put `images/`, `config.json` and `rootfs/` at the top of one
/// stream, whatever the rootfs is called on the source.
pub fn tar_create_args(images: &Path, config: &Path, rootfs: &Path) -> Vec<String> {
    let parent = |p: &Path| p.parent().unwrap_or(Path::new("/")).display().to_string();
    let base = |p: &Path| {
        p.file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    vec![
        "-c".into(),
        "-f".into(),
        "-".into(),
        "--numeric-owner".into(),
        "-C".into(),
        parent(images),
        base(images),
        "-C".into(),
        parent(config),
        base(config),
        "-C".into(),
        rootfs.display().to_string(),
        // Only the rootfs members start with "./"; rename them under rootfs/.
        "--transform".into(),
        "s,^\\./,rootfs/,;s,^\\.$,rootfs,".into(),
        ".".into(),
    ]
}

/// The rootfs directory named by a bundle's config.json.
fn rootfs_of(bundle: &Path) -> Result<PathBuf, RuntimeError> {
    let cfg = read_json(&bundle.join("config.json"))?;
    let root = cfg["root"]["path"].as_str().unwrap_or("rootfs");
    let p = Path::new(root);
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        bundle.join(p)
    })
}

fn read_json(path: &Path) -> Result<serde_json::Value, RuntimeError> {
    let text = std::fs::read_to_string(path)
        .map_err(RuntimeError::io(format!("reading {}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| {
        RuntimeError::FailedPrecondition(format!("{} is not valid JSON: {e}", path.display()))
    })
}

/// Points the received config at the received rootfs, this node's cgroup and the target
/// pod's identity (so the restored containers are found as the target pod's).
fn rewrite_config(
    path: &Path,
    target: &WorkloadRef,
    cgroup: &str,
    criu_conf: &Path,
) -> Result<(), RuntimeError> {
    let mut cfg = read_json(path)?;
    // runc reads extra CRIU options from the file this annotation names.
    cfg["annotations"]["org.criu.config"] = criu_conf.display().to_string().into();
    cfg["root"]["path"] = "rootfs".into();
    cfg["linux"]["cgroupsPath"] = cgroup.into();
    if !target.pod_name.is_empty() {
        let ann = &mut cfg["annotations"];
        ann[crate::runc::ANN_NAMESPACE] = target.namespace.clone().into();
        ann[crate::runc::ANN_POD_NAME] = target.pod_name.clone().into();
        ann[crate::runc::ANN_POD_UID] = target.pod_uid.clone().into();
    }
    let text = serde_json::to_vec_pretty(&cfg).expect("json serializes");
    std::fs::write(path, text).map_err(RuntimeError::io(format!("writing {}", path.display())))
}

/// runc always checkpoints with `--empty-ns network` (it does not manage network
/// devices), and `runc restore` makes a fresh network namespace whose loopback is DOWN,
/// so CRIU cannot reconnect established TCP sockets ("Network is unreachable") and
/// restored listeners are unreachable. A CRIU action script brings `lo` up in the new
/// netns right after CRIU creates the namespaces, before sockets are restored.
fn write_criu_restore_conf(work: &Path) -> Result<PathBuf, RuntimeError> {
    let script = work.join("criu-action.sh");
    let body = "#!/bin/sh\n\
        # Called by CRIU for every action; only namespace setup matters here.\n\
        [ \"$CRTOOLS_SCRIPT_ACTION\" = setup-namespaces ] || exit 0\n\
        exec nsenter --net=/proc/$CRTOOLS_INIT_PID/ns/net ip link set lo up\n";
    std::fs::write(&script, body).map_err(RuntimeError::io("writing CRIU action script"))?;
    let mut perm = std::fs::metadata(&script)
        .map_err(RuntimeError::io("stat action script"))?
        .permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&script, perm).map_err(RuntimeError::io("chmod action script"))?;
    let conf = work.join("criu-restore.conf");
    std::fs::write(&conf, format!("action-script {}\n", script.display()))
        .map_err(RuntimeError::io("writing CRIU config"))?;
    Ok(conf)
}

/// One pod checkpoint's shared state, handed to each container's dump.
struct Checkpoint<'a> {
    plan: &'a CheckpointPlan,
    dir: &'a Path,
    frozen_at_ms: u64,
    progress: &'a ProgressSink,
    serving: &'a Mutex<Vec<u32>>,
    sent_any: &'a AtomicBool,
}

/// The lazy-pages daemon of a received post-copy bundle: it fetches from the source
/// address the bundle names, and listens in `work` (the restore's work dir).
fn lazy_pages_opts(images: &Path, work: &Path) -> Result<LazyPagesOpts, RuntimeError> {
    let file = images.join(LAZY_SOURCE_FILE);
    let text = std::fs::read_to_string(&file).map_err(|e| {
        RuntimeError::FailedPrecondition(format!(
            "post-copy bundle lacks the source's lazy page server ({}): {e}",
            file.display()
        ))
    })?;
    let (address, port) = parse_host_port(text.trim()).ok_or_else(|| {
        RuntimeError::FailedPrecondition(format!(
            "bad lazy page server address {:?} in {}",
            text.trim(),
            file.display()
        ))
    })?;
    Ok(LazyPagesOpts {
        images_dir: images.to_path_buf(),
        work_dir: work.to_path_buf(),
        source_address: address,
        source_port: port,
        pidfile: work.join("lazy-pages.pid"),
        log_file: work.join("lazy-pages.log"),
    })
}

/// `host:port` (IPv4 or a name; `[v6]:port`) into its parts.
fn parse_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().ok()?;
    (!host.is_empty() && port != 0).then(|| (host.to_string(), port))
}

/// Waits until none of `pids` runs any more (daemons are not our children: poll /proc).
async fn wait_gone(pids: &[u32], timeout: std::time::Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while pids.iter().any(|p| alive(*p)) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Whether `pid` exists and is not a zombie (a daemon reparented to a ferry-node running
/// as PID 1 stays a zombie until reaped).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn free_port(ip: &str) -> Result<u16, RuntimeError> {
    // Small race between closing and CRIU binding; acceptable on a node we own.
    let l = std::net::TcpListener::bind((ip, 0))
        .map_err(RuntimeError::io(format!("finding a free port on {ip}")))?;
    Ok(l.local_addr()
        .map_err(RuntimeError::io("local_addr"))?
        .port())
}

fn kill_all(pids: &[u32]) {
    for pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alive_sees_running_not_missing() {
        assert!(alive(std::process::id()));
        assert!(!alive(u32::MAX));
    }

    #[test]
    fn lazy_source_address_parses() {
        assert_eq!(
            parse_host_port("10.213.0.2:4000"),
            Some(("10.213.0.2".into(), 4000))
        );
        assert_eq!(parse_host_port("[::1]:80"), Some(("::1".into(), 80)));
        assert_eq!(parse_host_port("10.0.0.1"), None);
        assert_eq!(parse_host_port(":80"), None);
        assert_eq!(parse_host_port("h:0"), None);
    }

    #[test]
    fn tar_args_put_rootfs_under_rootfs() {
        let a = tar_create_args(
            Path::new("/s/m/app/images"),
            Path::new("/b/config.json"),
            Path::new("/b/fs"),
        );
        assert_eq!(
            a.join(" "),
            "-c -f - --numeric-owner -C /s/m/app images -C /b config.json -C /b/fs \
             --transform s,^\\./,rootfs/,;s,^\\.$,rootfs, ."
        );
    }
}
