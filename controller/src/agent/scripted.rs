//! A scripted [`NodeAgent`] for controller tests: operations advance one stage per poll,
//! can be held (to act mid-flight) or made to fail, and every call is recorded so a test
//! can prove that a step was started exactly once across controller restarts.
use super::*;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

/// Which daemon call an entry of the call log is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Call {
    Describe,
    PrepareReceiver,
    StartCheckpoint,
    StartRestore,
    Finalize,
    Fence,
    Abort,
    Operation,
}

#[derive(Default)]
struct Inner {
    calls: Vec<(Call, NodeRef)>,
    /// Per node and migration: current operation and polls left until it finishes.
    ops: HashMap<(NodeRef, String), (OpStatus, u32)>,
    held: HashSet<Call>,
    failing: HashMap<Call, String>,
    /// `describe` waits here until this many calls meet (see `rendezvous_describes`).
    describe_barrier: Option<std::sync::Arc<tokio::sync::Barrier>>,
    /// Source checkpoints pass the point of no return once transferring.
    commits: bool,
    /// The plans source checkpoints were started with (what a daemon was told).
    checkpoint_plans: Vec<Plan>,
}

pub struct ScriptedAgent {
    inner: Mutex<Inner>,
    polls_per_op: u32,
    kind: WorkloadKind,
}

impl ScriptedAgent {
    pub fn new(polls_per_op: u32) -> Self {
        ScriptedAgent {
            inner: Mutex::default(),
            polls_per_op,
            kind: WorkloadKind::Containers,
        }
    }

    /// The plans source checkpoints were started with, in order.
    pub fn checkpoint_plans(&self) -> Vec<Plan> {
        self.inner.lock().unwrap().checkpoint_plans.clone()
    }

    /// Operations started by `call` stay Running until [`ScriptedAgent::release`].
    pub fn hold(&self, call: Call) {
        self.inner.lock().unwrap().held.insert(call);
    }

    pub fn release(&self, call: Call) {
        self.inner.lock().unwrap().held.remove(&call);
    }

    /// The next `n` `describe` calls wait for each other (up to 10 s), so that `n`
    /// Migrations are inside validation at the same time: races become certain.
    pub fn rendezvous_describes(&self, n: usize) {
        self.inner.lock().unwrap().describe_barrier =
            Some(std::sync::Arc::new(tokio::sync::Barrier::new(n)));
    }

    /// From now on, source checkpoints report the point of no return from their start
    /// (as a post-copy does once its bundle is out), and Fence answers committed.
    pub fn commit_when_transferring(&self) {
        self.inner.lock().unwrap().commits = true;
    }

    /// Operations started by `call` fail with `message`.
    pub fn fail(&self, call: Call, message: &str) {
        self.inner
            .lock()
            .unwrap()
            .failing
            .insert(call, message.to_string());
    }

    pub fn count(&self, call: Call) -> usize {
        self.inner
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|(c, _)| *c == call)
            .count()
    }

    pub fn calls(&self) -> Vec<(Call, NodeRef)> {
        self.inner.lock().unwrap().calls.clone()
    }

    fn record(&self, call: Call, node: &NodeRef) {
        self.inner.lock().unwrap().calls.push((call, node.clone()));
    }

    fn start(&self, call: Call, node: &NodeRef, id: &str, stage: OpStage) -> OpStatus {
        let mut inner = self.inner.lock().unwrap();
        inner.calls.push((call, node.clone()));
        let key = (node.clone(), id.to_string());
        // Idempotent, as the real daemon: a repeated start returns the running operation.
        if let Some((op, _)) = inner.ops.get(&key).filter(|(op, _)| op.stage == stage) {
            return op.clone();
        }
        let failing = inner.failing.get(&call).cloned();
        let op = OpStatus {
            stage,
            state: if failing.is_some() {
                OpState::Failed
            } else {
                OpState::Running
            },
            bytes_done: 0,
            bytes_total: 1 << 30,
            wire_bytes: 0,
            dirty_bytes_per_sec: 0,
            downtime_ms: None,
            message: failing.unwrap_or_default(),
            steps: Vec::new(),
            // A post-copy hands the workload over as soon as its bundle is out.
            committed: call == Call::StartCheckpoint && inner.commits,
            // Unsure, as a daemon that cannot vouch: the rollback removes the target first.
            no_copy: false,
        };
        inner.ops.insert(key, (op.clone(), self.polls_per_op));
        op
    }
}

fn held_call(stage: OpStage) -> Call {
    match stage {
        OpStage::Checkpointing | OpStage::Transferring => Call::StartCheckpoint,
        OpStage::Restoring => Call::StartRestore,
        OpStage::Finalizing => Call::Finalize,
        OpStage::Aborting => Call::Abort,
        OpStage::Prepared => Call::PrepareReceiver,
    }
}

#[async_trait::async_trait]
impl NodeAgent for ScriptedAgent {
    async fn receiving_runtimes(&self, _node: &NodeRef) -> Result<Vec<String>, AgentError> {
        Ok(vec!["containers".into(), "qemu".into()])
    }

    async fn describe(&self, node: &NodeRef, pod: &PodId) -> Result<WorkloadInfo, AgentError> {
        self.record(Call::Describe, node);
        let _ = pod;
        let barrier = self.inner.lock().unwrap().describe_barrier.clone();
        if let Some(b) = barrier {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), b.wait()).await;
        }
        Ok(WorkloadInfo {
            kind: self.kind,
            containers: vec!["main".into()],
            memory_bytes: 1 << 30,
        })
    }

    async fn prepare_receiver(&self, node: &NodeRef, plan: &Plan) -> Result<Receiver, AgentError> {
        self.record(Call::PrepareReceiver, node);
        if let Some(message) = self
            .inner
            .lock()
            .unwrap()
            .failing
            .get(&Call::PrepareReceiver)
        {
            return Err(AgentError::Rejected {
                node: node.to_string(),
                message: message.clone(),
            });
        }
        Ok(Receiver {
            endpoint: format!("scripted://{node}/{}", plan.migration_id),
            page_servers: vec![],
            token: format!("token-of-{}", plan.migration_id),
        })
    }

    async fn start_checkpoint(
        &self,
        node: &NodeRef,
        plan: &Plan,
        _receiver: &Receiver,
    ) -> Result<OpStatus, AgentError> {
        self.inner
            .lock()
            .unwrap()
            .checkpoint_plans
            .push(plan.clone());
        Ok(self.start(
            Call::StartCheckpoint,
            node,
            &plan.migration_id,
            OpStage::Checkpointing,
        ))
    }

    async fn start_restore(&self, node: &NodeRef, plan: &Plan) -> Result<OpStatus, AgentError> {
        Ok(self.start(
            Call::StartRestore,
            node,
            &plan.migration_id,
            OpStage::Restoring,
        ))
    }

    async fn finalize(&self, node: &NodeRef, id: &str) -> Result<OpStatus, AgentError> {
        Ok(self.start(Call::Finalize, node, id, OpStage::Finalizing))
    }

    async fn fence(&self, node: &NodeRef, id: &str) -> Result<bool, AgentError> {
        let mut inner = self.inner.lock().unwrap();
        inner.calls.push((Call::Fence, node.clone()));
        Ok(inner
            .ops
            .get(&(node.clone(), id.to_string()))
            .is_some_and(|(op, _)| op.committed))
    }

    async fn abort(&self, node: &NodeRef, id: &str) -> Result<OpStatus, AgentError> {
        let committed = self
            .inner
            .lock()
            .unwrap()
            .ops
            .get(&(node.clone(), id.to_string()))
            .is_some_and(|(op, _)| op.committed);
        let mut op = self.start(Call::Abort, node, id, OpStage::Aborting);
        if committed {
            // As the daemon: a source past the point of no return cannot resume.
            op.state = OpState::Failed;
            op.committed = true;
            op.message = "post-copy already handed the pod to the destination".into();
        } else {
            op.state = OpState::Aborted;
        }
        let mut inner = self.inner.lock().unwrap();
        inner
            .ops
            .insert((node.clone(), id.to_string()), (op.clone(), 0));
        Ok(op)
    }

    async fn operation(&self, node: &NodeRef, id: &str) -> Result<OpStatus, AgentError> {
        let mut inner = self.inner.lock().unwrap();
        inner.calls.push((Call::Operation, node.clone()));
        let held = inner.held.clone();
        let Some((op, polls_left)) = inner.ops.get_mut(&(node.clone(), id.to_string())) else {
            return Err(AgentError::UnknownMigration {
                node: node.to_string(),
                migration_id: id.into(),
            });
        };
        if op.state == OpState::Running {
            if op.stage == OpStage::Checkpointing {
                op.stage = OpStage::Transferring;
            }
            op.bytes_done = (op.bytes_done + op.bytes_total / 4).min(op.bytes_total);
            if !held.contains(&held_call(op.stage)) {
                *polls_left = polls_left.saturating_sub(1);
                if *polls_left == 0 {
                    op.state = OpState::Succeeded;
                    op.bytes_done = op.bytes_total;
                    op.downtime_ms = Some(42);
                }
            }
        }
        Ok(op.clone())
    }
}
