//! The gRPC service: thin handlers that convert (`convert.rs`), pick the runtime and
//! track long operations per migration_id. One `tracing` span per RPC.
use crate::convert::{self as cv};
use crate::error::RuntimeError;
use crate::metrics::Metrics;
use crate::runtime::{
    CheckpointPlan, Left, OpState, Progress, ProgressSink, ReceiverInfo, ReceiverPlan, Runtime,
    Stage,
};
use crate::transport::{self, Transport};
use ferry_proto::node::v1 as pb;
use ferry_proto::node::v1::node_agent_server::NodeAgent;
use ferry_transfer::Grant;
use futures::Stream;
use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::Instrument;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Prepare,
    Checkpoint,
    Restore,
}

impl OpKind {
    fn label(self) -> &'static str {
        match self {
            OpKind::Prepare => "prepare",
            OpKind::Checkpoint => "checkpoint",
            OpKind::Restore => "restore",
        }
    }
}

struct Op {
    kind: OpKind,
    runtime: Arc<dyn Runtime>,
    progress: watch::Receiver<Progress>,
    receiver: Option<ReceiverInfo>,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub struct NodeService {
    runtimes: Vec<Arc<dyn Runtime>>,
    /// The node's transfer listener: the service grants each migration's connections
    /// on it (PrepareReceiver: to the source; StartCheckpoint: to the destination, which
    /// asks for lazy pages) and revokes them when the migration ends here.
    transport: Arc<Transport>,
    ops: Mutex<HashMap<String, Op>>,
    /// Migrations whose PrepareReceiver is running now.
    preparing: Mutex<HashSet<String>>,
    metrics: Arc<Metrics>,
}

/// Counts an operation in the metrics when its task ends, also when Fence or Abort
/// cancel the task mid-way (its future is dropped then, last seen Running).
struct Counted {
    metrics: Arc<Metrics>,
    runtime: &'static str,
    kind: OpKind,
    sink: ProgressSink,
}

impl Counted {
    /// Counts the operation as running until the returned guard drops.
    fn start(
        metrics: &Arc<Metrics>,
        runtime: &'static str,
        kind: OpKind,
        sink: ProgressSink,
    ) -> Self {
        metrics.started(runtime, kind.label());
        Counted {
            metrics: metrics.clone(),
            runtime,
            kind,
            sink,
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.metrics
            .ended(self.runtime, self.kind.label(), &self.sink.latest());
    }
}

/// A migration's claim on its PrepareReceiver; released when the call ends.
struct Preparing<'a> {
    set: &'a Mutex<HashSet<String>>,
    id: String,
}

impl<'a> Preparing<'a> {
    fn claim(set: &'a Mutex<HashSet<String>>, id: &str) -> Result<Preparing<'a>, RuntimeError> {
        if !set.lock().unwrap().insert(id.to_string()) {
            return Err(RuntimeError::Unavailable(format!(
                "a PrepareReceiver for migration {id} is already running here; retry when it answers"
            )));
        }
        Ok(Preparing {
            set,
            id: id.to_string(),
        })
    }
}

impl Drop for Preparing<'_> {
    fn drop(&mut self) {
        self.set.lock().unwrap().remove(&self.id);
    }
}

impl NodeService {
    pub fn new(
        runtimes: Vec<Arc<dyn Runtime>>,
        transport: Arc<Transport>,
        metrics: Arc<Metrics>,
    ) -> NodeService {
        NodeService {
            runtimes,
            transport,
            ops: Mutex::new(HashMap::new()),
            preparing: Default::default(),
            metrics,
        }
    }

    /// The runtime a description names (the one that claimed the pod at the source).
    fn runtime_named(&self, name: &str) -> Result<Arc<dyn Runtime>, RuntimeError> {
        self.runtimes
            .iter()
            .find(|r| r.name() == name)
            .cloned()
            .ok_or_else(|| RuntimeError::Unavailable(format!("this node has no {name:?} runtime")))
    }

    /// The one runtime that claims the pod. Runtimes claim on evidence of their own,
    /// never by order; two claims are an error, not a guess.
    async fn owner_of(
        &self,
        w: &crate::runtime::WorkloadRef,
    ) -> Result<(Arc<dyn Runtime>, crate::runtime::WorkloadDescription), RuntimeError> {
        let mut claims = Vec::new();
        for r in &self.runtimes {
            if let Some(d) = r.describe(w).await? {
                claims.push((r.clone(), d));
            }
        }
        match claims.len() {
            1 => Ok(claims.pop().expect("one")),
            0 => Err(RuntimeError::NotFound(format!(
                "pod {w} runs nothing this node's runtimes ({}) manage",
                self.runtimes
                    .iter()
                    .map(|r| r.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            _ => Err(RuntimeError::FailedPrecondition(format!(
                "pod {w} is claimed by several runtimes ({}); refusing to guess",
                claims
                    .iter()
                    .map(|(r, _)| r.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// The current op of `kind` for the migration, if any (a repeated Start* call).
    fn existing(&self, id: &str, kind: OpKind) -> Option<pb::Operation> {
        let ops = self.ops.lock().unwrap();
        ops.get(id)
            .filter(|o| o.kind == kind)
            .map(|o| cv::operation_pb(&o.progress.borrow()))
    }

    /// Runs `work` in the background as the migration's current operation.
    fn spawn_op<F>(
        &self,
        id: &str,
        kind: OpKind,
        runtime: Arc<dyn Runtime>,
        stage: Stage,
        work: F,
    ) -> pb::Operation
    where
        F: FnOnce(ProgressSink) -> futures::future::BoxFuture<'static, Result<(), RuntimeError>>,
    {
        let (sink, rx) = ProgressSink::new(id, stage);
        let fut = work(sink.clone());
        let span = tracing::info_span!("operation", migration_id = %id, ?kind);
        let counted = Counted::start(&self.metrics, runtime.name(), kind, sink.clone());
        let task = tokio::spawn(
            async move {
                let r = fut.await;
                if let Err(e) = &r {
                    tracing::warn!(error = %e, "operation failed");
                }
                sink.finish(&r);
                drop(counted);
            }
            .instrument(span),
        );
        let op = cv::operation_pb(&rx.borrow());
        let mut ops = self.ops.lock().unwrap();
        // What PrepareReceiver answered outlives its op: a controller that restarted
        // before it recorded the restore's start asks for the receiver again, and must
        // get the same token, not a fresh grant that refuses the source's next pipe.
        let receiver = ops.get(id).and_then(|o| o.receiver.clone());
        ops.insert(
            id.to_string(),
            Op {
                kind,
                runtime,
                progress: rx,
                receiver,
                task: Some(task),
            },
        );
        op
    }

    fn runtime_of(&self, id: &str) -> Option<Arc<dyn Runtime>> {
        let running = self.ops.lock().unwrap().get(id).map(|o| o.runtime.clone());
        running.or_else(|| self.recovered(id))
    }

    /// The runtime holding state for a migration no operation knows of: one a previous
    /// run of this daemon started (its operations died with it).
    fn recovered(&self, id: &str) -> Option<Arc<dyn Runtime>> {
        self.runtimes.iter().find(|r| r.knows(id)).cloned()
    }

    /// Abort's answer: Aborted with `what`, or Failed with why; `no_copy` when the
    /// runtime vouches that no copy of the workload runs on this node.
    fn aborted(id: &str, r: Result<Left, RuntimeError>, what: &str) -> pb::Operation {
        let no_copy = matches!(r, Ok(Left::NoCopy));
        let r = r.and(Err(RuntimeError::Aborted(what.into())));
        pb::Operation {
            no_copy,
            ..Self::done(id, Stage::Aborting, &r)
        }
    }

    fn done(id: &str, stage: Stage, r: &Result<(), RuntimeError>) -> pb::Operation {
        let (sink, _rx) = ProgressSink::new(id, stage);
        sink.finish(r);
        cv::operation_pb(&sink.latest())
    }
}

type OpStream = Pin<Box<dyn Stream<Item = Result<pb::Operation, Status>> + Send>>;

#[tonic::async_trait]
impl NodeAgent for NodeService {
    #[tracing::instrument(skip_all)]
    async fn version(
        &self,
        _: Request<pb::VersionRequest>,
    ) -> Result<Response<pb::VersionResponse>, Status> {
        let support: Vec<_> = self.runtimes.iter().flat_map(|r| r.strategies()).collect();
        let mut strategies: Vec<i32> = support
            .iter()
            .filter(|s| s.available)
            .map(|s| cv::strategy_pb(s.strategy) as i32)
            .collect();
        strategies.dedup();
        Ok(Response::new(pb::VersionResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            runtimes: self.runtimes.iter().map(|r| r.name().to_string()).collect(),
            strategies,
            strategy_support: support.iter().map(cv::support_pb).collect(),
            receiving_runtimes: self
                .runtimes
                .iter()
                .filter(|r| r.receives())
                .map(|r| r.name().to_string())
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(pod))]
    async fn describe_workload(
        &self,
        req: Request<pb::WorkloadRef>,
    ) -> Result<Response<pb::WorkloadDescription>, Status> {
        let w = cv::workload_ref(Some(req.into_inner()), "workload")?;
        tracing::Span::current().record("pod", tracing::field::display(&w));
        let (_, d) = self.owner_of(&w).await?;
        Ok(Response::new(cv::description_pb(&d)))
    }

    #[tracing::instrument(skip_all, fields(migration_id = %req.get_ref().migration_id))]
    async fn prepare_receiver(
        &self,
        req: Request<pb::PrepareReceiverRequest>,
    ) -> Result<Response<pb::PrepareReceiverResponse>, Status> {
        let r = req.into_inner();
        let id = cv::migration_id(&r.migration_id)?;
        // One PrepareReceiver per migration at a time: two (a restarted controller's
        // repeat while its predecessor's call still runs) would each mint a grant, and
        // the source would be handed the token the later grant replaced.
        let _preparing = Preparing::claim(&self.preparing, &id)?;
        if let Some(info) = self
            .ops
            .lock()
            .unwrap()
            .get(&id)
            .and_then(|o| o.receiver.clone())
        {
            return Ok(Response::new(pb::PrepareReceiverResponse {
                receive_endpoint: info.receive_endpoint.clone(),
                page_servers: cv::page_servers_pb(&info.page_servers),
                token: info.token.clone(),
            }));
        }
        let bucket = cv::bucket(r.transfer.as_ref())?;
        let source_peer = cv::source_peer(&r.source_peer)?;
        let workload = cv::description(r.workload)?;
        let target = match r.target {
            Some(t) => cv::workload_ref(Some(t), "target")?,
            None => workload.workload.clone(),
        };
        let runtime = self.runtime_named(&workload.runtime)?;
        // Granted before the runtime prepares: a Cold destination's page relays accept
        // their pipes from then on (the source dials only after this call returns).
        let grant = Grant::mint(&source_peer);
        let plan = ReceiverPlan {
            migration_id: id.clone(),
            workload,
            target,
            strategy: cv::strategy(r.strategy)?,
            criu: cv::criu_options(r.criu),
            images: cv::images(r.images)?,
            source_peer,
            token: grant.token.clone(),
            shaping: cv::shaping(r.transfer.as_ref()),
            bucket,
        };
        self.transport.receiver.grant(&id, grant);
        let (sink, rx) = ProgressSink::new(&id, Stage::Prepared);
        let info = match runtime.prepare_receiver(plan, sink).await {
            Ok(info) => info,
            Err(e) => {
                self.transport.receiver.revoke(&id);
                return Err(e.into());
            }
        };
        self.ops.lock().unwrap().insert(
            id,
            Op {
                kind: OpKind::Prepare,
                runtime,
                progress: rx,
                receiver: Some(info.clone()),
                task: None,
            },
        );
        Ok(Response::new(pb::PrepareReceiverResponse {
            receive_endpoint: info.receive_endpoint,
            page_servers: cv::page_servers_pb(&info.page_servers),
            token: info.token,
        }))
    }

    #[tracing::instrument(skip_all, fields(migration_id = %req.get_ref().migration_id))]
    async fn start_checkpoint(
        &self,
        req: Request<pb::StartCheckpointRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = req.into_inner();
        let id = cv::migration_id(&r.migration_id)?;
        if let Some(op) = self.existing(&id, OpKind::Checkpoint) {
            return Ok(Response::new(op));
        }
        let bucket = cv::bucket(r.transfer.as_ref())?;
        let workload = cv::workload_ref(r.workload, "workload")?;
        // Validate synchronously so bad input is an RPC error, not a failed operation.
        let (runtime, _) = self.owner_of(&workload).await?;
        let strategy = cv::strategy(r.strategy)?;
        if let Some(s) = runtime
            .strategies()
            .into_iter()
            .find(|s| s.strategy == strategy && !s.available)
        {
            return Err(
                RuntimeError::Unavailable(format!("strategy {strategy:?}: {}", s.reason)).into(),
            );
        }
        let receive_endpoint = cv::receive_endpoint(&r.receive_endpoint)?;
        let token = cv::token(&r.token)?;
        let plan = CheckpointPlan {
            migration_id: id.clone(),
            workload,
            strategy,
            page_servers: cv::page_servers(&id, r.page_servers)?,
            token: token.clone(),
            leave_running: r.leave_running,
            criu: cv::criu_options(r.criu),
            receive_endpoint,
            shaping: cv::shaping(r.transfer.as_ref()),
            bucket,
        };
        runtime.check_checkpoint(&plan).await?;
        // The destination dials back for lazy pages: the same token, its certificate.
        let (destination, _) = transport::host_port(&plan.receive_endpoint)?;
        self.transport.receiver.grant(
            &id,
            Grant {
                token,
                peer: destination,
            },
        );
        let rt = runtime.clone();
        let op = self.spawn_op(
            &id,
            OpKind::Checkpoint,
            runtime,
            Stage::Checkpointing,
            move |sink| Box::pin(async move { rt.checkpoint_out(plan, sink).await }),
        );
        Ok(Response::new(op))
    }

    #[tracing::instrument(skip_all, fields(migration_id = %req.get_ref().migration_id))]
    async fn start_restore(
        &self,
        req: Request<pb::StartRestoreRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = req.into_inner();
        let id = cv::migration_id(&r.migration_id)?;
        if let Some(op) = self.existing(&id, OpKind::Restore) {
            return Ok(Response::new(op));
        }
        let target = match r.target {
            Some(t) => cv::workload_ref(Some(t), "target")?,
            None => Default::default(),
        };
        let runtime = self.runtime_of(&id).ok_or_else(|| {
            RuntimeError::NotFound(format!(
                "migration {id} has no receiver here; call PrepareReceiver first"
            ))
        })?;
        let rt = runtime.clone();
        let mid = id.clone();
        let op = self.spawn_op(
            &id,
            OpKind::Restore,
            runtime,
            Stage::Restoring,
            move |sink| Box::pin(async move { rt.restore_in(&mid, &target, sink).await }),
        );
        Ok(Response::new(op))
    }

    #[tracing::instrument(skip_all, fields(migration_id = %req.get_ref().migration_id))]
    async fn finalize(
        &self,
        req: Request<pb::MigrationRef>,
    ) -> Result<Response<pb::Operation>, Status> {
        let id = cv::migration_id(&req.get_ref().migration_id)?;
        let Some(runtime) = self.runtime_of(&id) else {
            // Nothing known: already finalized (idempotent).
            return Ok(Response::new(Self::done(&id, Stage::Finalizing, &Ok(()))));
        };
        let r = runtime.finalize(&id).await;
        if r.is_ok() {
            self.ops.lock().unwrap().remove(&id);
            self.transport.receiver.revoke(&id);
        }
        Ok(Response::new(Self::done(&id, Stage::Finalizing, &r)))
    }

    #[tracing::instrument(skip_all, fields(migration_id = %req.get_ref().migration_id))]
    async fn fence(
        &self,
        req: Request<pb::MigrationRef>,
    ) -> Result<Response<pb::FenceResponse>, Status> {
        let id = cv::migration_id(&req.get_ref().migration_id)?;
        let Some(runtime) = self.runtime_of(&id) else {
            return Ok(Response::new(pb::FenceResponse {
                committed: false,
                message: "nothing of this migration here".into(),
            }));
        };
        let committed = runtime.fence(&id).await?;
        if committed {
            tracing::warn!("fence: past the point of no return; the migration must complete");
            return Ok(Response::new(pb::FenceResponse {
                committed,
                message: "post-copy handed the workload over: the source cannot resume".into(),
            }));
        }
        // Fenced: the running operation can no longer hand anything over; stop it too
        // (its undo is Abort's).
        if let Some(op) = self.ops.lock().unwrap().get_mut(&id)
            && let Some(t) = op.task.take()
        {
            t.abort();
        }
        Ok(Response::new(pb::FenceResponse {
            committed,
            message: "fenced: the source stays resumable and will not hand over".into(),
        }))
    }

    #[tracing::instrument(skip_all, fields(migration_id = %req.get_ref().migration_id))]
    async fn abort(
        &self,
        req: Request<pb::MigrationRef>,
    ) -> Result<Response<pb::Operation>, Status> {
        let id = cv::migration_id(&req.get_ref().migration_id)?;
        // No new connection of an aborted migration is admitted.
        self.transport.receiver.revoke(&id);
        let op = self.ops.lock().unwrap().remove(&id);
        let Some(mut op) = op else {
            if let Some(runtime) = self.recovered(&id) {
                let r = runtime.abort(&id).await;
                return Ok(Response::new(Self::aborted(
                    &id,
                    r,
                    "aborted what a previous run of this daemon started; source resumed / \
                     destination cleaned",
                )));
            }
            return Ok(Response::new(Self::aborted(
                &id,
                Ok(Left::MayRun),
                "nothing to abort",
            )));
        };
        // Stop work in flight first, then undo what it did.
        if let Some(t) = op.task.take() {
            t.abort();
        }
        let r = op.runtime.abort(&id).await;
        Ok(Response::new(Self::aborted(
            &id,
            r,
            "aborted; source resumed / destination cleaned",
        )))
    }

    #[tracing::instrument(skip_all, fields(migration_id = %req.get_ref().migration_id))]
    async fn get_operation(
        &self,
        req: Request<pb::MigrationRef>,
    ) -> Result<Response<pb::Operation>, Status> {
        let id = &req.get_ref().migration_id;
        let ops = self.ops.lock().unwrap();
        let op = ops
            .get(id)
            .ok_or_else(|| RuntimeError::NotFound(format!("no operation for migration {id}")))?;
        Ok(Response::new(cv::operation_pb(&op.progress.borrow())))
    }

    type WatchProgressStream = OpStream;

    #[tracing::instrument(skip_all, fields(migration_id = %req.get_ref().migration_id))]
    async fn watch_progress(
        &self,
        req: Request<pb::MigrationRef>,
    ) -> Result<Response<OpStream>, Status> {
        let id = req.get_ref().migration_id.clone();
        let rx = {
            let ops = self.ops.lock().unwrap();
            ops.get(&id)
                .map(|o| o.progress.clone())
                .ok_or_else(|| RuntimeError::NotFound(format!("no operation for migration {id}")))?
        };
        // The current state, then every change, ending with the first terminal state.
        let stream =
            futures::stream::unfold((rx, false, true), |(mut rx, finished, first)| async move {
                if finished {
                    return None;
                }
                let mut finished = false;
                if !first && rx.changed().await.is_err() {
                    finished = true; // the operation's task is gone: send its last state
                }
                let p = rx.borrow_and_update().clone();
                finished |= p.state != OpState::Running;
                Some((Ok(cv::operation_pb(&p)), (rx, finished, false)))
            });
        Ok(Response::new(Box::pin(stream)))
    }
}
