//! The source side of a container migration: freeze the pod, dump, send, and end or
//! resume the frozen copy.
use super::criu::{self, option_hint};
use super::page_route::{self, PageRoute};
use super::pod::{self, Freezer, PodContainer};
use super::runc::{CheckpointOpts, kill_group};
use super::staging;
use super::stop_signal::StopSignalHold;
use super::wire::{self, BundleHeader};
use super::{ContainerRuntime, Migration, rootfs, volumes};
use crate::error::RuntimeError;
use crate::runtime::*;
use ferry_transfer::{S3Config, S3Store};
use futures::future::try_join_all;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// Written into a post-copy bundle's `images/`: `host:port` of the source daemon's
/// transfer listener, where the destination opens the lazy pages pipe
/// (`relay::lazy_pipe`) to the source's lazy page server (CRIU ignores files it does
/// not know in an images dir).
pub const LAZY_SOURCE_FILE: &str = "ferry-lazy-source";

/// How long freezing the pod cgroup may take.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `finalize` waits for the kubelet to begin stopping the frozen containers
/// before it ends them anyway.
const STOP_SIGNAL_WAIT: Duration = Duration::from_secs(10);

pub struct SourceState {
    /// The containers' init pids (finalize waits for the kubelet's stop signal on them).
    inits: Vec<u32>,
    /// Each container's own freezer: CRIU needs to thaw and refreeze a container's
    /// cgroup while it seizes the tasks, which a frozen parent would prevent.
    freezers: Vec<Freezer>,
    /// Committed once a post-copy bundle is out (the destination may run the pod, so
    /// the source must never resume); fenced by a rollback before that.
    handover: Arc<Handover>,
    /// Process groups of post-copy `runc checkpoint`s still serving pages.
    serving: Arc<Mutex<Vec<u32>>>,
    /// The frozen inits, held so that the kubelet's SIGTERM stays visible to finalize
    /// (`stop_signal.rs`); released before they are thawed or killed.
    stop_hold: Option<StopSignalHold>,
}

/// What a source keeps on disk (`<state>/out/<migration>/source.json`) from before the
/// freeze until finalize or abort, so that a restarted daemon can still resume or end
/// the frozen copy: its memory of the migration is gone, the frozen pod is not.
#[derive(serde::Serialize, serde::Deserialize)]
struct SourceRecord {
    inits: Vec<u32>,
    freezers: Vec<Freezer>,
    /// False once a post-copy bundle is out (see [`SourceState::resumable`]).
    resumable: bool,
}

const SOURCE_RECORD: &str = "source.json";

fn write_record(dir: &Path, s: &SourceRecord) -> Result<(), RuntimeError> {
    crate::atomic::write_file(dir, SOURCE_RECORD, &serde_json::to_vec(s).expect("json"))
        .map_err(RuntimeError::io("recording the source state"))
}

impl SourceState {
    /// See [`Handover::fence`].
    pub(super) fn fence(&self) -> bool {
        self.handover.fence()
    }

    /// The migrations a previous run of this daemon left as sources: one per record
    /// under `<state>/out`.
    pub(super) fn recover(out_dir: &Path) -> Vec<(String, SourceState)> {
        let mut found = Vec::new();
        for e in std::fs::read_dir(out_dir).into_iter().flatten().flatten() {
            let Ok(text) = std::fs::read(e.path().join(SOURCE_RECORD)) else {
                continue;
            };
            match serde_json::from_slice::<SourceRecord>(&text) {
                Ok(r) => {
                    let id = e.file_name().to_string_lossy().into_owned();
                    tracing::warn!(migration_id = %id, resumable = r.resumable,
                        "recovered a source migration from before a restart: abort resumes it, finalize ends it");
                    let stop_hold = hold_stop_signals(&id, &r.inits, &r.freezers);
                    found.push((
                        id,
                        SourceState {
                            inits: r.inits,
                            freezers: r.freezers,
                            handover: Arc::new(Handover::recovered(r.resumable)),
                            serving: Arc::default(),
                            stop_hold,
                        },
                    ));
                }
                Err(err) => {
                    tracing::error!(path = %e.path().display(), error = %err, "unreadable source record")
                }
            }
        }
        found
    }
}

/// One pod checkpoint's shared state, handed to each container's dump.
struct Cut<'a> {
    plan: &'a CheckpointPlan,
    dir: &'a Path,
    frozen_at_ms: u64,
    progress: &'a ProgressSink,
    serving: &'a Mutex<Vec<u32>>,
    handover: &'a Handover,
    /// For the source record (see [`SourceRecord`]).
    inits: &'a [u32],
    freezers: &'a [Freezer],
    /// `transfer.mode: ObjectStore`: bundles (memory pages included) go here.
    bucket: Option<Arc<S3Store>>,
    /// The pod's emptyDirs: carrier container and host dir of each.
    volumes: BTreeMap<String, (String, std::path::PathBuf)>,
}

impl ContainerRuntime {
    pub(super) fn check_strategy(&self, s: Strategy) -> Result<(), RuntimeError> {
        match self.strategies.iter().find(|x| x.strategy == s) {
            Some(x) if x.available => Ok(()),
            Some(x) => Err(RuntimeError::Unavailable(format!(
                "strategy {s:?} on this node: {}",
                x.reason
            ))),
            None => Err(RuntimeError::Unavailable(format!(
                "strategy {s:?} is unknown to the container runtime"
            ))),
        }
    }

    /// Checks the plan against this node: the pod's running containers, and for a
    /// move through a bucket the bucket, checked with its credentials and returned open.
    pub(super) async fn validate(
        &self,
        plan: &CheckpointPlan,
    ) -> Result<(Vec<PodContainer>, Option<Arc<S3Store>>), RuntimeError> {
        self.check_strategy(plan.strategy)?;
        let containers = match pod::find(&self.cfg.roots, &plan.workload).await? {
            pod::Found::Containers(c) => c,
            pod::Found::VmPod => {
                return Err(RuntimeError::FailedPrecondition(format!(
                    "pod {} hosts a VM; the VM runtime moves it",
                    plan.workload
                )));
            }
            pod::Found::None => {
                return Err(RuntimeError::NotFound(format!(
                    "no container of pod {} runs on this node",
                    plan.workload
                )));
            }
        };
        for c in &containers {
            if c.c.status != "running" {
                return Err(RuntimeError::FailedPrecondition(format!(
                    "container {} of pod {} is {}, not running; nothing was changed",
                    c.name(),
                    plan.workload,
                    c.c.status
                )));
            }
            if plan.strategy != Strategy::PostCopy
                && plan.bucket.is_none()
                && !plan.page_servers.iter().any(|(n, _)| n == c.name())
            {
                return Err(RuntimeError::InvalidArgument(format!(
                    "no page server given for container {}; pass PrepareReceiverResponse.page_servers",
                    c.name()
                )));
            }
        }
        let bucket = match &plan.bucket {
            Some(_) if plan.strategy == Strategy::PostCopy => return Err(lazy_needs_direct()),
            Some(cfg) => Some(Arc::new(open_bucket(cfg).await?)),
            None => None,
        };
        Ok((containers, bucket))
    }

    pub(super) async fn checkpoint(
        &self,
        plan: CheckpointPlan,
        progress: ProgressSink,
    ) -> Result<(), RuntimeError> {
        let dir = self.mig_dir(&plan.migration_id)?;
        let (containers, bucket) = self.validate(&plan).await?;
        // Before the freeze: the page connections' TLS handshakes are not downtime.
        let routes = try_join_all(containers.iter().map(|c| {
            page_route::open(
                &self.cfg.transport,
                &plan,
                c.name(),
                bucket.is_some(),
                &progress,
            )
        }))
        .await?;
        let pod_freezer = Freezer::for_cgroup(&pod::pod_cgroup(&containers)?);
        let freezers = containers
            .iter()
            .map(|c| c.cgroup().map(Freezer::for_cgroup))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                RuntimeError::FailedPrecondition("a container has no cgroup path".into())
            })?;
        let serving = Arc::new(Mutex::new(Vec::new()));
        let handover = Arc::new(Handover::default());
        let inits: Vec<u32> = containers.iter().map(|c| c.c.pid).collect();
        // On disk before the freeze: a daemon that dies from here on finds it again.
        write_record(
            &dir,
            &SourceRecord {
                inits: inits.clone(),
                freezers: freezers.clone(),
                resumable: true,
            },
        )?;
        self.migrations.lock().unwrap().insert(
            plan.migration_id.clone(),
            Migration::Source(SourceState {
                inits: inits.clone(),
                freezers: freezers.clone(),
                handover: handover.clone(),
                serving: serving.clone(),
                stop_hold: None,
            }),
        );
        progress.stage(
            Stage::Checkpointing,
            format!("freezing the pod ({} container(s))", containers.len()),
        );
        let freeze_start = unix_ms();
        let frozen_at_ms = cut(&pod_freezer, &freezers).await?;
        // `freeze`: until the pod cgroup froze; `handover`: until each container's
        // own freezer held it (see `cut`).
        progress.step_measured(Step {
            name: "freeze".into(),
            start_unix_ms: freeze_start,
            duration_ms: frozen_at_ms.saturating_sub(freeze_start),
        });
        progress.step("handover", frozen_at_ms);
        let cut = Cut {
            plan: &plan,
            dir: &dir,
            frozen_at_ms,
            progress: &progress,
            serving: &serving,
            handover: &handover,
            inits: &inits,
            freezers: &freezers,
            bucket,
            volumes: volumes::carriers(containers.iter().map(|c| (c.name(), &c.config))),
        };
        let result = try_join_all(
            containers
                .iter()
                .zip(routes)
                .map(|(c, route)| self.checkpoint_one(&cut, c, route)),
        )
        .await;
        match result {
            Ok(_) => {
                let hold = hold_stop_signals(&plan.migration_id, &inits, &freezers);
                if let Some(Migration::Source(s)) =
                    self.migrations.lock().unwrap().get_mut(&plan.migration_id)
                {
                    s.stop_hold = hold;
                }
                progress.stage(
                    Stage::Transferring,
                    "state sent; the source stays frozen until finalize or abort",
                );
                Ok(())
            }
            Err(e) => {
                stop_serving(&serving);
                if !handover.resumable() {
                    tracing::error!(error = %e, "post-copy failed after a bundle was sent; source left frozen");
                    return Err(e);
                }
                // Rollback: the source continues as if nothing happened.
                if let Err(t) = thaw_all(&freezers) {
                    tracing::error!(error = %t, "could not thaw the source pod");
                }
                Err(e)
            }
        }
    }

    async fn checkpoint_one(
        &self,
        cut: &Cut<'_>,
        c: &PodContainer,
        route: PageRoute,
    ) -> Result<(), RuntimeError> {
        let plan = cut.plan;
        let name = c.name().to_string();
        let cdir = cut.dir.join(&name);
        let images = cdir.join(staging::IMAGES);
        let work = cdir.join(staging::WORK);
        for d in [&images, &work] {
            let _ = std::fs::remove_dir_all(d);
            std::fs::create_dir_all(d).map_err(RuntimeError::io("creating checkpoint dir"))?;
        }
        let lazy = plan.strategy == Strategy::PostCopy;
        let PageRoute {
            addr: page_addr,
            relay,
        } = route;
        let opts = CheckpointOpts {
            image_path: images.clone(),
            work_path: work.clone(),
            // The source stays frozen but resumable until finalize or abort.
            leave_running: true,
            tcp_established: true,
            file_locks: plan.criu.file_locks,
            ext_unix_sk: plan.criu.external_unix_sockets,
            // Live: where this node serves the pages; Cold: the destination's page
            // server that receives them while CRIU dumps.
            page_server: page_addr,
            lazy_pages: lazy,
            // runc writes one byte to its stdout when the lazy page server is up.
            status_fd: lazy.then_some(1),
        };
        let args = c.runc.checkpoint_args(&c.c.id, &opts);
        let dump_log = work.join("dump.log");
        let started = Instant::now();
        let dump_start = unix_ms();
        let (serving, lazy_relay) = if lazy {
            let child = self.lazy_dump(c, &args, &dump_log, cut.serving).await?;
            std::fs::write(images.join(LAZY_SOURCE_FILE), self.cfg.transport.endpoint())
                .map_err(RuntimeError::io("writing lazy source address"))?;
            (Some(child), relay)
        } else {
            let conf = dump_options(&work, false)?;
            c.runc
                .run_env(
                    args.clone(),
                    &[("CRIU_CONFIG_FILE", &conf)],
                    Some(&dump_log),
                )
                .await
                .map_err(|e| with_hint(e, &dump_log))?;
            // The dump ends after the page server acknowledged its last pages, so the
            // relay only has the connection's close left to carry. Its pages were
            // counted as they went (`ProgressSink::metered`).
            if let Some(relay) = relay {
                match relay.finish(Duration::from_secs(5)).await {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => tracing::warn!(container = %name, error = %e, "page relay"),
                    None => {
                        tracing::warn!(container = %name, "page relay still open after the dump")
                    }
                }
            }
            (None, None)
        };
        let dumped = started.elapsed();
        cut.progress.step(format!("dump/{name}"), dump_start);
        let diff_start = unix_ms();
        // The files the container wrote: its overlay upper dir (still frozen).
        let rootfs = c.rootfs();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(RuntimeError::io("reading mountinfo"))?;
        let upper = rootfs::overlay_upper_dir(&mountinfo, &rootfs).ok_or_else(|| {
            RuntimeError::FailedPrecondition(format!(
                "the rootfs of container {name} ({}) is not an overlay mount; ferry moves \
                 containers of containerd's overlayfs snapshotter",
                rootfs.display()
            ))
        })?;
        let stats = rootfs::write_diff(
            &upper,
            &cdir.join(staging::ROOTFS_DIFF),
            &cdir.join(staging::DELETED),
        )
        .map_err(RuntimeError::io(format!(
            "writing the writable-layer diff of {name}"
        )))?;
        cut.progress.step(format!("rootfs/{name}"), diff_start);
        let volumes_start = unix_ms();
        let volume_bytes = volumes::pack(&cut.volumes, &name, &cdir).map_err(RuntimeError::io(
            format!("packing the emptyDir volumes {name} carries"),
        ))?;
        if cdir.join(volumes::VOLUMES).exists() {
            cut.progress.step(format!("volumes/{name}"), volumes_start);
        }
        let send_start = unix_ms();
        let sent = self.send_bundle(cut, c, &cdir).await?;
        cut.progress.add_wire_bytes(sent.wire);
        cut.progress.step(format!("send/{name}"), send_start);
        tracing::info!(container = %name, bytes = sent.raw, wire = sent.wire, ?dumped, files = stats.entries, deleted = stats.deleted, volume_bytes, "bundle sent");
        if let Some(child) = serving {
            cut.progress.stage(
                Stage::Transferring,
                format!("post-copy: {name} restored at the target; serving its memory"),
            );
            // Post-copy: done once the destination has fetched every page.
            let pgid = child.id();
            let r = c.runc.finish(child, &args, Some(&dump_log)).await;
            if let Some(pgid) = pgid {
                cut.serving.lock().unwrap().retain(|p| *p != pgid);
            }
            // CRIU's served pages were counted on their way through the relay.
            if let Some(relay) = lazy_relay {
                let _ = relay.finish(Duration::from_secs(2)).await;
            }
            r?;
            cut.progress.step(format!("pages/{name}"), send_start);
            tracing::info!(container = %name, "lazy pages all fetched by the destination");
        }
        Ok(())
    }

    /// The bundle: CRIU's images, the writable-layer diff and the emptyDirs this
    /// container carries, as one tar stream.
    async fn send_bundle(
        &self,
        cut: &Cut<'_>,
        c: &PodContainer,
        cdir: &Path,
    ) -> Result<ferry_transfer::Moved, RuntimeError> {
        let carried = cdir
            .join(volumes::VOLUMES)
            .exists()
            .then_some(volumes::VOLUMES);
        let args: Vec<String> = ["-c", "-f", "-", "--numeric-owner", "-C"]
            .into_iter()
            .map(String::from)
            .chain([cdir.display().to_string()])
            .chain([staging::IMAGES, staging::ROOTFS_DIFF, staging::DELETED].map(String::from))
            .chain(carried.map(String::from))
            .collect();
        let mut child = Command::new("tar")
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            // A cancelled operation (Abort drops this future) leaves no tar behind.
            .kill_on_drop(true)
            .spawn()
            .map_err(RuntimeError::io("starting tar"))?;
        // Counted as the sender takes it (it reads only as fast as the link carries), so
        // a large bundle shows progress while it moves, not only once it is in: a slow
        // link would otherwise look stuck to the controller's progress timeout.
        let counted = cut.progress.clone();
        let mut out =
            tokio_util::io::InspectReader::new(child.stdout.take().expect("piped"), move |b| {
                counted.add_bytes(b.len() as u64)
            });
        let header = BundleHeader {
            migration_id: cut.plan.migration_id.clone(),
            container: c.name().to_string(),
            frozen_at_ms: cut.frozen_at_ms,
        };
        if cut.plan.strategy == Strategy::PostCopy {
            // From here the destination may restore and run the pod: the point of no
            // return, unless a rollback fenced this source first.
            if !cut.handover.commit() {
                return Err(RuntimeError::Aborted(
                    "fenced by a rollback before the post-copy handover; the source stays \
                     resumable"
                        .into(),
                ));
            }
            cut.progress.committed();
            write_record(
                cut.dir,
                &SourceRecord {
                    inits: cut.inits.to_vec(),
                    freezers: cut.freezers.to_vec(),
                    resumable: false,
                },
            )?;
        }
        let sent = match &cut.bucket {
            Some(store) => wire::upload(store, &cut.plan.token, &header, out).await,
            None => {
                let sent = wire::send(
                    &self.cfg.transport,
                    &cut.plan.receive_endpoint,
                    &cut.plan.token,
                    &cut.plan.shaping,
                    &header,
                    &mut out,
                )
                .await;
                drop(out);
                sent
            }
        };
        // A failed send leaves tar blocked writing into a pipe nobody reads: its read
        // end is closed by now (dropped above, or with the upload's task); end tar too,
        // or waiting for it would hang the operation (a destination that restarted and
        // forgot the migration was only noticed by the controller's progress timeout).
        if sent.is_err() {
            let _ = child.start_kill();
        }
        let status = child
            .wait_with_output()
            .await
            .map_err(RuntimeError::io("waiting for tar"))?;
        let sent = sent?;
        if !status.status.success() {
            return Err(RuntimeError::command(
                "tar",
                &args,
                Some(status.status),
                &status.stderr,
                String::new(),
            ));
        }
        Ok(sent)
    }

    /// Starts a `runc checkpoint --lazy-pages --status-fd 1` and returns once CRIU has
    /// dumped everything but the lazy memory and its page server listens.
    async fn lazy_dump(
        &self,
        c: &PodContainer,
        args: &[String],
        dump_log: &Path,
        serving: &Mutex<Vec<u32>>,
    ) -> Result<tokio::process::Child, RuntimeError> {
        let work = dump_log.parent().unwrap_or(Path::new("."));
        let conf = dump_options(work, true)?;
        let mut child = c.runc.spawn(args, &[("CRIU_CONFIG_FILE", &conf)])?;
        if let Some(pgid) = child.id() {
            serving.lock().unwrap().push(pgid);
        }
        let mut stdout = child.stdout.take().expect("piped");
        let mut byte = [0u8; 1];
        // EOF (or an error) means runc exited before the server came up.
        if !matches!(stdout.read(&mut byte).await, Ok(1)) {
            if let Some(pgid) = child.id() {
                serving.lock().unwrap().retain(|p| *p != pgid);
            }
            c.runc
                .finish(child, args, Some(dump_log))
                .await
                .map_err(|e| with_hint(e, dump_log))?;
            return Err(RuntimeError::FailedPrecondition(format!(
                "runc checkpoint --lazy-pages exited without starting its page server: {}",
                super::criu::log_excerpt(dump_log)
            )));
        }
        Ok(child)
    }

    /// The controller deleted the source Pod: end the frozen copy. The tasks get
    /// SIGKILL while still frozen and die as they thaw, running no more of their own
    /// code; first wait (bounded) until the kubelet has begun stopping them (a signal
    /// pending, which `stop_signal.rs` makes visible for an init without a handler),
    /// so it does not restart a container it still believes should run.
    pub(super) async fn finalize_source(
        &self,
        migration_id: &str,
        mut s: SourceState,
    ) -> Result<(), RuntimeError> {
        stop_serving(&s.serving);
        let inits = &s.inits;
        let deadline = Instant::now() + STOP_SIGNAL_WAIT;
        while !inits
            .iter()
            .all(|p| pod::signal_pending(*p) || !super::alive(*p))
        {
            if Instant::now() > deadline {
                tracing::warn!(
                    ?inits,
                    "the kubelet has not begun stopping the source containers; ending them anyway"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(s.stop_hold.take());
        for f in &s.freezers {
            super::kill_all(&f.pids());
        }
        // A cgroup already removed (its tasks died and runc cleaned up) is what
        // finalize wants: nothing of the source copy is left to thaw.
        let mut r = Ok(());
        for f in &s.freezers {
            if let Err(e) = f.thaw()
                && f.exists()
            {
                r = r.and(Err(e));
            }
        }
        let _ = std::fs::remove_dir_all(self.mig_dir(migration_id)?);
        r
    }

    pub(super) async fn abort_source(
        &self,
        migration_id: &str,
        mut s: SourceState,
    ) -> Result<(), RuntimeError> {
        stop_serving(&s.serving);
        if !s.handover.resumable() {
            // Put it back: a later finalize must still end the frozen copy.
            self.migrations
                .lock()
                .unwrap()
                .insert(migration_id.to_string(), Migration::Source(s));
            return Err(RuntimeError::FailedPrecondition(format!(
                "migration {migration_id}: post-copy already handed the pod to the destination; \
                 the source cannot resume"
            )));
        }
        drop(s.stop_hold.take());
        let r = thaw_all(&s.freezers);
        let _ = std::fs::remove_dir_all(self.mig_dir(migration_id)?);
        r
    }
}

/// Holds a frozen source's inits (`stop_signal.rs`); nothing when a container is not
/// frozen (a record from before the freeze: a running task is not to be traced).
fn hold_stop_signals(id: &str, inits: &[u32], freezers: &[Freezer]) -> Option<StopSignalHold> {
    if !freezers.iter().all(Freezer::is_frozen) {
        return None;
    }
    let (hold, failed) = StopSignalHold::seize(inits);
    if !failed.is_empty() {
        tracing::info!(migration_id = %id, ?failed,
            "could not hold these frozen inits: finalize waits for their kubelet's SIGKILL");
    }
    Some(hold)
}

/// The consistent cut: one write freezes the whole pod cgroup (no container runs after
/// another stopped); each container's own freezer then takes over and the pod cgroup
/// thaws again (only the pause sandbox runs on), because CRIU thaws and refreezes a
/// container's cgroup while it seizes its tasks, which a frozen parent would block.
/// Returns when the pod froze (unix ms).
async fn cut(pod: &Freezer, containers: &[Freezer]) -> Result<u64, RuntimeError> {
    pod.freeze(FREEZE_TIMEOUT).await?;
    let frozen_at_ms = unix_ms();
    let mut r = Ok(());
    for f in containers {
        r = r.and(f.freeze(FREEZE_TIMEOUT).await);
    }
    let thawed = pod.thaw();
    if let Err(e) = r.and(thawed) {
        let _ = thaw_all(containers);
        return Err(e);
    }
    Ok(frozen_at_ms)
}

/// Ends the post-copy `runc checkpoint`s still serving pages (and their CRIUs).
fn stop_serving(serving: &Mutex<Vec<u32>>) {
    for pgid in serving.lock().unwrap().drain(..) {
        kill_group(pgid);
    }
}

fn thaw_all(freezers: &[Freezer]) -> Result<(), RuntimeError> {
    let mut first = Ok(());
    for f in freezers {
        if let Err(e) = f.thaw() {
            first = first.and(Err(e));
        }
    }
    first
}

/// Writes the dump's CRIU options file into its work dir ([`criu::dump_config`]).
fn dump_options(work: &Path, lazy: bool) -> Result<PathBuf, RuntimeError> {
    let conf = work.join("criu-dump.conf");
    std::fs::write(&conf, criu::dump_config(lazy))
        .map_err(RuntimeError::io("writing the dump's CRIU options"))?;
    Ok(conf)
}

/// A failed dump, with the Migration setting that would let it pass when CRIU's log
/// names one.
fn with_hint(e: RuntimeError, dump_log: &Path) -> RuntimeError {
    let log = std::fs::read_to_string(dump_log).unwrap_or_default();
    match option_hint(&log) {
        Some(hint) => RuntimeError::FailedPrecondition(format!("{hint}\n{e}")),
        None => e,
    }
}

/// Live moves a container's memory on demand from the source: no bucket in between.
pub(super) fn lazy_needs_direct() -> RuntimeError {
    RuntimeError::FailedPrecondition(
        "strategy Live fetches a container's memory on demand from the source (CRIU lazy \
         pages), which needs the direct connection: use strategy Cold with transfer.mode \
         ObjectStore, or transfer.mode Direct"
            .into(),
    )
}

/// The migration's bucket, checked to answer with these credentials before anything
/// is frozen or staged.
pub(super) async fn open_bucket(cfg: &S3Config) -> Result<S3Store, RuntimeError> {
    let what = || format!("bucket {:?} at {}", cfg.bucket, cfg.endpoint);
    let store = S3Store::new(cfg)
        .map_err(|e| RuntimeError::InvalidArgument(format!("object store {}: {e}", what())))?;
    store.check_access().await.map_err(|e| {
        RuntimeError::FailedPrecondition(format!(
            "object store {} is not usable with the credentials of transfer.objectStore: {e}",
            what()
        ))
    })?;
    Ok(store)
}
