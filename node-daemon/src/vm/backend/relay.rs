//! QEMU's stream between its unix socket and the mutual-TLS pipe.

use ferry_transfer::{Moved, Shaping};
use tokio::net::UnixStream;

pub(super) fn ram_pipe(migration_id: &str) -> String {
    // Under the migration's scope: only its granted source may open it.
    format!("{migration_id}/ram")
}

/// Copies both ways until either side closes (the return path carries post-copy page
/// requests back to the source).
pub(super) struct Relay {
    /// QEMU's socket → pipe; done once QEMU closed its side and every byte was flushed
    /// into the pipe and the pipe shut down.
    pub(super) outbound: tokio::task::JoinHandle<std::io::Result<Moved>>,
    /// Pipe → QEMU's socket (the return path, or the incoming stream on the destination).
    pub(super) inbound: tokio::task::JoinHandle<std::io::Result<Moved>>,
}

/// The destination's relay, stopped with the migration's task.
pub(super) struct StopOnDrop(pub(super) Relay);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.outbound.abort();
        self.0.inbound.abort();
    }
}

/// Relays a migration stream between a QEMU socket and a transfer pipe, both ways,
/// compressed as the migration says. Not paced here: QEMU paces its own stream
/// (`tuning_for` caps its max-bandwidth), and knowing the rate is how it plans the
/// downtime.
pub(super) fn splice(qemu: UnixStream, pipe: ferry_transfer::Pipe, shaping: &Shaping) -> Relay {
    let (qemu_r, qemu_w) = qemu.into_split();
    let (pipe_r, pipe_w) = tokio::io::split(pipe);
    let shaping = Shaping {
        pacer: None,
        ..shaping.clone()
    };
    let (out, inn) = (shaping.clone(), shaping);
    Relay {
        outbound: tokio::spawn(async move {
            let m = ferry_transfer::into_pipe(qemu_r, pipe_w, &out).await?;
            tracing::debug!(moved = ?m, "migration stream sent");
            Ok(m)
        }),
        inbound: tokio::spawn(async move {
            let m = ferry_transfer::out_of_pipe(pipe_r, qemu_w, &inn).await?;
            tracing::debug!(moved = ?m, "migration stream received");
            Ok(m)
        }),
    }
}
