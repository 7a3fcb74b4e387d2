//! Push instead of polling. While a Migration waits for a daemon's operation (the
//! checkpoint, the restore, the source's finalize), a task follows that operation's
//! progress stream (`WatchProgress`) and asks the controller to reconcile the Migration
//! the moment the operation ends, instead of at its next poll. Polling stays as the
//! fallback (a daemon that cannot be reached, a stream that breaks): a wakeup only ever
//! brings a reconcile forward, and a reconcile is idempotent.
use crate::agent::{NodeAgent, NodeRef};
use ferry_crds::Migration;
use futures::Stream;
use kube::runtime::reflector::ObjectRef;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// The reconciles that operations' ends ask for, and the operations followed now.
pub struct Wakeups {
    tx: mpsc::UnboundedSender<ObjectRef<Migration>>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<ObjectRef<Migration>>>>,
    /// (migration UID, node): one follower per operation, however often it is polled.
    following: Arc<Mutex<HashSet<(String, NodeRef)>>>,
}

impl Default for Wakeups {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Wakeups {
            tx,
            rx: Mutex::new(Some(rx)),
            following: Default::default(),
        }
    }
}

impl Wakeups {
    /// The Migrations to reconcile now; for `Controller::reconcile_on`. Only the first
    /// caller gets it (one controller runs per context).
    pub fn stream(&self) -> Option<impl Stream<Item = ObjectRef<Migration>> + Send + 'static> {
        let rx = self.rx.lock().unwrap().take()?;
        Some(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|r| (r, rx))
        }))
    }

    /// Follows the operation of migration `uid` on `node` until it ends, then asks for
    /// a reconcile of `migration`. A second call for the same operation while the
    /// first follows it does nothing.
    pub fn follow(
        &self,
        agent: Arc<dyn NodeAgent>,
        node: NodeRef,
        uid: String,
        migration: ObjectRef<Migration>,
    ) {
        let key = (uid, node);
        if !self.following.lock().unwrap().insert(key.clone()) {
            return;
        }
        let (tx, following) = (self.tx.clone(), self.following.clone());
        tokio::spawn(async move {
            let settled = agent.operation_settled(&key.1, &key.0).await;
            following.lock().unwrap().remove(&key);
            match settled {
                Ok(()) => {
                    tracing::debug!(node = %key.1, migration = %migration, "operation ended; reconciling now");
                    let _ = tx.send(migration);
                }
                // Polling carries on where the stream could not.
                Err(e) => tracing::debug!(node = %key.1, "following the operation: {e}"),
            }
        });
    }
}
