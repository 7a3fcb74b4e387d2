//! When the target Pod's gate (its `ferry-restore-gate` init container) opens, letting
//! the kubelet create the app containers, whose `create` then waits in `ferry-runtime`
//! for the state and restores it.
//!
//! A create may wait only as long as the kubelet's runtime request timeout (2 minutes
//! by default): so it may start waiting once what is still to arrive before the
//! restore is at most `--early-release-mib`, a size the link moves well within that.
//! Small workloads qualify at once (the creates wait before the freeze); a Cold move
//! whose pages stream into this node's page servers qualifies once enough of its
//! memory has arrived, so the kubelet's relist (up to a second after the gate exits)
//! and its create run while the rest of the memory streams in; everything else opens
//! once staged.
use super::runc::Runc;
use super::staging;
use crate::runtime::unix_ms;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long the gate container may take to appear once the Pod's sandbox is ready.
const GATE_WAIT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Release {
    /// Before the freeze.
    Now,
    /// Once this many bytes of pages have arrived (or everything is staged).
    AfterPages(u64),
    /// Once every container's state is staged.
    WhenStaged,
}

impl Release {
    /// `writable`: the containers' writable layers (and emptyDirs), which arrive in
    /// the bundles after the pages and are counted as outstanding until staged;
    /// `memory`: what the restore needs of memory before it runs (0 for post-copy);
    /// `pages_stream_here`: the memory arrives through this node's page servers, where
    /// it is counted (not in a bucket's bundles).
    pub(super) fn choose(
        writable: u64,
        memory: u64,
        pages_stream_here: bool,
        limit: u64,
    ) -> Release {
        let before_restore = writable.saturating_add(memory);
        if before_restore <= limit {
            Release::Now
        } else if pages_stream_here && writable <= limit {
            Release::AfterPages(before_restore - limit)
        } else {
            Release::WhenStaged
        }
    }
}

/// Waits for `release` (`staged` counts staged containers, of `stages`; `pages` the
/// bytes of pages arrived), then opens the gate: SIGTERM to its pause process, which
/// exits 0. Notes when in `opened` (unix ms).
pub(super) async fn open(
    root: Runc,
    pod_uid: String,
    release: Release,
    (stages, mut staged): (usize, watch::Receiver<usize>),
    mut pages: watch::Receiver<u64>,
    opened: Arc<Mutex<Option<u64>>>,
) {
    let mut pages_at = match release {
        Release::Now => 0,
        Release::AfterPages(n) => n,
        Release::WhenStaged => u64::MAX,
    };
    let need = if release == Release::Now { 0 } else { stages };
    loop {
        let (s, p) = (*staged.borrow_and_update(), *pages.borrow_and_update());
        if s >= need || p >= pages_at {
            tracing::info!(
                pod_uid,
                ?release,
                staged = s,
                pages_arrived = p,
                "opening the gate"
            );
            break;
        }
        tokio::select! {
            r = staged.changed() => if r.is_err() { return },
            // The counter's sender lives as long as the relays: once they are gone,
            // only staging can open the gate.
            r = pages.changed(), if pages_at != u64::MAX => if r.is_err() {
                pages_at = u64::MAX;
            },
        }
    }
    kill_gate(&root, &pod_uid, &opened).await;
}

async fn kill_gate(root: &Runc, pod_uid: &str, opened: &Mutex<Option<u64>>) {
    let deadline = Instant::now() + GATE_WAIT;
    loop {
        let gate = root.list().await.ok().and_then(|cs| {
            cs.into_iter().find(|c| {
                c.annotation(staging::ANN_SANDBOX_UID) == Some(pod_uid)
                    && c.annotation(staging::ANN_CONTAINER_NAME) == Some(staging::GATE_CONTAINER)
            })
        });
        match gate {
            Some(c) if c.status == "running" => {
                let args = [
                    &root.base_args()[..],
                    &["kill".into(), c.id.clone(), "TERM".into()],
                ]
                .concat();
                match root.run(args, None).await {
                    Ok(_) => {
                        *opened.lock().unwrap() = Some(unix_ms());
                        tracing::info!(pod_uid, "gate opened");
                    }
                    Err(e) => tracing::warn!(pod_uid, error = %e, "could not open the gate"),
                }
                return;
            }
            Some(c) if c.status == "stopped" => return, // already open
            _ if Instant::now() > deadline => {
                tracing::warn!(pod_uid, "the target Pod's gate container never appeared");
                return;
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn what_must_arrive_before_the_restore_decides() {
        // Small: the creates wait before the freeze.
        assert_eq!(Release::choose(0, 64 * MIB, true, 1024 * MIB), Release::Now);
        assert_eq!(
            Release::choose(MIB, 1023 * MIB, true, 1024 * MIB),
            Release::Now
        );
        // Cold, pages streamed here: once at most the limit is still to come.
        assert_eq!(
            Release::choose(0, 1030 * MIB, true, 1024 * MIB),
            Release::AfterPages(6 * MIB)
        );
        assert_eq!(
            Release::choose(4 * MIB, 3 * 1024 * MIB, true, 1024 * MIB),
            Release::AfterPages(2 * 1024 * MIB + 4 * MIB)
        );
        // Through a bucket the pages come in the bundles: staged first.
        assert_eq!(
            Release::choose(0, 2048 * MIB, false, 1024 * MIB),
            Release::WhenStaged
        );
        // Writable layers above the limit arrive last and are not counted as they come.
        assert_eq!(
            Release::choose(20 * MIB, 4 * MIB, true, 8 * MIB),
            Release::WhenStaged
        );
        // Post-copy (memory 0): only the writable layers count.
        assert_eq!(
            Release::choose(20 * MIB, 0, true, 8 * MIB),
            Release::WhenStaged
        );
        assert_eq!(Release::choose(2 * MIB, 0, true, 8 * MIB), Release::Now);
    }
}
