//! CRIU's page traffic inside the daemons' mutual TLS. CRIU speaks plain, unauthenticated
//! TCP to its page server (`--page-server --address --port`), so each end's CRIU talks
//! only to loopback on its own node, and the two daemons carry the bytes between the
//! nodes in a ferry-transfer pipe of the migration, admitted like its bundles (the
//! granted peer's certificate and the migration's token, `ferry_transfer::Grant`):
//!
//! ```text
//! Cold: source `criu dump` ─lo─▶ outbound ══pipe <mig>/pages/<c>══▶ inbound ─lo─▶ dest `criu page-server`
//! Live: dest `criu lazy-pages` ─lo─▶ outbound ══pipe <mig>/lazy/<c>══▶ inbound ─lo─▶ source dump's lazy page server
//! ```
//!
//! No page port listens beyond loopback. A loopback listener is still reachable by any
//! process in the node's network namespace (host-network pods included), so the
//! outbound side relays the first connection that comes from a root process (CRIU runs
//! as root; the owner is read from `/proc/net/tcp`) and closes all others.
use crate::error::RuntimeError;
use crate::transport::Transport;
use ferry_transfer::{Carried, Endpoint, RetryPolicy, Shaping};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The pipe that carries one container's pages of a cold dump (source → destination).
pub fn pages_pipe(migration_id: &str, container: &str) -> String {
    format!("{migration_id}/pages/{container}")
}

/// The pipe that carries one container's lazy pages (destination asks, source serves).
pub fn lazy_pipe(migration_id: &str, container: &str) -> String {
    format!("{migration_id}/lazy/{container}")
}

/// Bytes relayed each way, as CRIU saw them and on the wire.
pub type Relayed = Result<Carried, RuntimeError>;

/// One relay at work; dropping it ends it (and closes both of its connections).
pub struct Relay(JoinHandle<Relayed>);

impl Relay {
    /// Its result, if it ends within `wait` (else it is ended: `None`).
    pub async fn finish(mut self, wait: std::time::Duration) -> Option<Relayed> {
        match tokio::time::timeout(wait, &mut self.0).await {
            Ok(Ok(r)) => Some(r),
            Ok(Err(join)) => Some(Err(RuntimeError::Transfer(format!("page relay: {join}")))),
            Err(_) => None,
        }
    }

    pub fn abort_handle(&self) -> tokio::task::AbortHandle {
        self.0.abort_handle()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Dials the pipe `id` to `peer` and listens on loopback; the first connection a root
/// process makes there is carried through the pipe. Returns where the local CRIU must
/// connect (`127.0.0.1:port`) once the pipe is up: callers open it before the pod
/// freezes, so the handshake is not downtime. Both ends of a pipe carry it with the
/// migration's `shaping` (compression must match).
pub async fn outbound(
    transport: Arc<Transport>,
    peer: Endpoint,
    id: String,
    shaping: Shaping,
) -> Result<(SocketAddr, Relay), RuntimeError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(RuntimeError::io("binding a loopback port for CRIU's pages"))?;
    let addr = listener
        .local_addr()
        .map_err(RuntimeError::io("loopback port"))?;
    let pipe = transport
        .sender
        .connect_pipe(&peer, &id, &RetryPolicy::default())
        .await
        .map_err(|e| RuntimeError::Transfer(format!("pages pipe {id} to {}: {e}", peer.addr)))?;
    let task = tokio::spawn(async move {
        let local = accept_root(&listener).await?;
        drop(listener);
        splice(local, pipe, &id, &shaping).await
    });
    Ok((addr, Relay(task)))
}

/// Accepts the pipe `id` from the granted peer and carries it to the CRIU that listens
/// on `127.0.0.1:port`.
pub fn inbound(transport: Arc<Transport>, id: String, port: u16, shaping: Shaping) -> Relay {
    Relay(tokio::spawn(async move {
        let pipe = transport
            .receiver
            .accept_pipe(&id)
            .await
            .map_err(|e| RuntimeError::Transfer(format!("pages pipe {id}: {e}")))?;
        let local = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .map_err(RuntimeError::io(format!(
                "connecting pipe {id} to CRIU on 127.0.0.1:{port}"
            )))?;
        splice(local, pipe, &id, &shaping).await
    }))
}

async fn splice(
    local: TcpStream,
    pipe: ferry_transfer::Pipe,
    id: &str,
    shaping: &Shaping,
) -> Relayed {
    local.set_nodelay(true).ok();
    let c = ferry_transfer::carry(local, pipe, shaping)
        .await
        .map_err(|e| RuntimeError::Transfer(format!("relaying pages pipe {id}: {e}")))?;
    tracing::debug!(%id, carried = ?c, "pages relay done");
    Ok(c)
}

/// The first connection whose socket a root process owns; others are closed.
async fn accept_root(listener: &TcpListener) -> Result<TcpStream, RuntimeError> {
    let ours = listener
        .local_addr()
        .map_err(RuntimeError::io("loopback port"))?;
    loop {
        let (conn, from) = listener
            .accept()
            .await
            .map_err(RuntimeError::io("accepting CRIU's page connection"))?;
        let table = std::fs::read_to_string("/proc/net/tcp")
            .map_err(RuntimeError::io("reading /proc/net/tcp"))?;
        match owner_uid(&table, from, ours) {
            Some(0) => return Ok(conn),
            uid => {
                tracing::warn!(%from, ?uid, "refused a page connection not made by root");
            }
        }
    }
}

/// The uid owning the IPv4 socket `local` connected to `remote`, from `/proc/net/tcp`
/// (addresses as the kernel prints them: the raw 32-bit word in host order, the port
/// in host order).
fn owner_uid(table: &str, local: SocketAddr, remote: SocketAddr) -> Option<u32> {
    let key = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => Some(format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        )),
        SocketAddr::V6(_) => None,
    };
    let (l, r) = (key(local)?, key(remote)?);
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 7 && f[1] == l && f[2] == r)
            .then(|| f[7].parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_uid_reads_the_kernels_table() {
        // As the kernel prints it (x86-64, little endian): 127.0.0.1:40000 connected to
        // 127.0.0.1:5000, owned by uid 1000; the listener's own line first.
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1388 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0100007F:9C40 0100007F:1388 01 00000000:00000000 00:00000000 00000000  1000        0 2 1 0000000000000000 20 4 30 10 -1
";
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            owner_uid(table, a("127.0.0.1:40000"), a("127.0.0.1:5000")),
            Some(1000)
        );
        assert_eq!(
            owner_uid(table, a("127.0.0.1:40001"), a("127.0.0.1:5000")),
            None
        );
    }

    /// The real kernel table names this test process (root or not) as the owner of a
    /// connection it made.
    #[tokio::test]
    async fn owner_uid_finds_a_real_connection() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let ours = listener.local_addr().unwrap();
        let _client = TcpStream::connect(ours).await.unwrap();
        let (_conn, from) = listener.accept().await.unwrap();
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        assert_eq!(
            owner_uid(&table, from, ours),
            Some(nix::unistd::geteuid().as_raw())
        );
    }
}
