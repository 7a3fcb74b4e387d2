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
use crate::criu::{Criu, PageServerOpts};
use crate::error::RuntimeError;
use crate::runc::{CheckpointOpts, RestoreOpts, Runc, RuncContainer, rss_bytes};
use crate::runtime::*;
use crate::wire::{self, BundleHeader, BundleListener};
use futures::future::{BoxFuture, FutureExt, try_join_all};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
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
}

enum Migration {
    Source {
        ids: Vec<String>,
        resumable: bool,
    },
    Dest {
        info: ReceiverInfo,
        dir: PathBuf,
        page_server_pids: Vec<u32>,
        arrivals: Option<mpsc::Receiver<Result<BundleHeader, RuntimeError>>>,
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
        let listener = BundleListener::bind(&self.cfg.advertise_ip).await?;
        let info = ReceiverInfo {
            receive_endpoint: listener.endpoint(),
            page_servers,
        };
        let (tx, rx) = mpsc::channel(plan.workload.containers.len());
        tokio::spawn(receive_bundles(
            listener,
            dir.clone(),
            plan.workload.containers.len(),
            tx,
        ));
        self.migrations.lock().unwrap().insert(
            plan.migration_id.clone(),
            Migration::Dest {
                info: info.clone(),
                dir,
                page_server_pids: pids,
                arrivals: Some(rx),
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
            if !plan.page_servers.iter().any(|(n, _)| n == c.name()) {
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
        self.migrations.lock().unwrap().insert(
            plan.migration_id.clone(),
            Migration::Source {
                ids: ids.clone(),
                resumable: true,
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
        let result = try_join_all(containers.iter().map(|c| {
            let ps = plan
                .page_servers
                .iter()
                .find(|(n, _)| n == c.name())
                .map(|(_, e)| e.clone());
            self.checkpoint_one(&plan, &dir, c, ps, frozen_at_ms, &progress)
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
        plan: &CheckpointPlan,
        dir: &Path,
        c: &RuncContainer,
        page_server: Option<String>,
        frozen_at_ms: u64,
        progress: &ProgressSink,
    ) -> Result<(), RuntimeError> {
        let name = c.name().to_string();
        let images = dir.join(&name).join("images");
        let work = dir.join(&name).join("work");
        for d in [&images, &work] {
            let _ = std::fs::remove_dir_all(d);
            std::fs::create_dir_all(d).map_err(RuntimeError::io("creating checkpoint dir"))?;
        }
        let opts = CheckpointOpts {
            image_path: images.clone(),
            work_path: work.clone(),
            leave_running: plan.leave_running,
            tcp_established: true,
            page_server,
            lazy_pages: false,
            status_fd: None,
        };
        let args = self.cfg.runc.checkpoint_args(&c.id, &opts);
        self.cfg
            .runc
            .run(args, Some(&work.join("dump.log")))
            .await?;

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
            frozen_at_ms,
        };
        let sent = wire::send(&plan.receive_endpoint, &header, &mut out).await;
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
        progress.add_bytes(sent);
        tracing::info!(container = %name, bytes = sent, "bundle sent");
        Ok(())
    }

    async fn restore(
        &self,
        migration_id: &str,
        target: &WorkloadRef,
        progress: ProgressSink,
    ) -> Result<(), RuntimeError> {
        let (mut arrivals, dir, expected, restored) = {
            let mut m = self.migrations.lock().unwrap();
            match m.get_mut(migration_id) {
                Some(Migration::Dest {
                    arrivals,
                    dir,
                    expected,
                    restored,
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
            tasks.push(self.restore_one(&dir, header, target, restored.clone()));
        }
        let result = try_join_all(tasks).await;
        if let Err(e) = result {
            // Leave nothing half-restored behind; the source is still resumable.
            let ids: Vec<String> = restored.lock().unwrap().drain(..).collect();
            for id in ids {
                let _ = self.cfg.runc.delete_force(&id).await;
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
        let opts = RestoreOpts {
            image_path: bundle.join("images"),
            work_path: work.clone(),
            bundle: bundle.clone(),
            tcp_established: true,
            lazy_pages: false,
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
        } else {
            restored.lock().unwrap().push(header.container_id.clone());
        }
        r.map(drop)
    }

    async fn finalize_mig(&self, migration_id: &str) -> Result<(), RuntimeError> {
        let entry = self.migrations.lock().unwrap().remove(migration_id);
        let dir = self.mig_dir(migration_id)?;
        match entry {
            Some(Migration::Source { ids, .. }) => {
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
                ..
            }) => {
                kill_all(&page_server_pids);
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
            Some(Migration::Source { ids, resumable }) => {
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
                ..
            }) => {
                kill_all(&page_server_pids);
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
    listener: BundleListener,
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
