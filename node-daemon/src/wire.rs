//! How container bundles travel between daemons: the ONE place that moves those bytes.
//!
//! Today: plain TCP, one connection per container, a JSON header line and then the tar
//! stream. `ferry-transfer`'s mTLS direct streams (by stream id, as AsyncRead/AsyncWrite)
//! were still being written when this was built; switching means replacing [`send`] and
//! [`BundleListener`] here (same shapes: "send a reader under a name" / "accept the next
//! named reader") and nothing else.
//!
//! Memory pages do not go through here: the source's CRIU sends them straight to a CRIU
//! page server on the destination while it dumps (see `runc_backend.rs`).
use crate::error::RuntimeError;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Sent before each container's bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BundleHeader {
    pub migration_id: String,
    /// CRI container name.
    pub container: String,
    /// runc id on the source (reused on the destination, under another root).
    pub container_id: String,
    /// When the source froze the pod (Unix ms), so the destination can measure downtime.
    pub frozen_at_ms: u64,
}

/// Sends one bundle; returns the number of body bytes sent.
pub async fn send(
    endpoint: &str,
    header: &BundleHeader,
    body: &mut (impl AsyncRead + Unpin),
) -> Result<u64, RuntimeError> {
    let t = |e: std::io::Error| {
        RuntimeError::Transfer(format!("sending {} to {endpoint}: {e}", header.container))
    };
    let mut conn = TcpStream::connect(endpoint).await.map_err(t)?;
    conn.set_nodelay(true).map_err(t)?;
    let mut line = serde_json::to_vec(header).expect("header serializes");
    line.push(b'\n');
    conn.write_all(&line).await.map_err(t)?;
    let n = tokio::io::copy(body, &mut conn).await.map_err(t)?;
    conn.shutdown().await.map_err(t)?;
    Ok(n)
}

pub struct BundleListener {
    listener: TcpListener,
}

impl BundleListener {
    /// Listens on `ip` (a free port).
    pub async fn bind(ip: &str) -> Result<BundleListener, RuntimeError> {
        let listener = TcpListener::bind((ip, 0)).await.map_err(|e| {
            RuntimeError::Transfer(format!("binding a bundle listener on {ip}: {e}"))
        })?;
        Ok(BundleListener { listener })
    }

    pub fn endpoint(&self) -> String {
        self.listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    }

    /// The next bundle: its header and a reader of its body.
    pub async fn accept(
        &self,
    ) -> Result<(BundleHeader, impl AsyncRead + Unpin + use<>), RuntimeError> {
        let t = |e: std::io::Error| RuntimeError::Transfer(format!("receiving a bundle: {e}"));
        let (conn, peer) = self.listener.accept().await.map_err(t)?;
        let mut reader = BufReader::new(conn);
        let mut line = String::new();
        reader.read_line(&mut line).await.map_err(t)?;
        let header: BundleHeader = serde_json::from_str(line.trim())
            .map_err(|e| RuntimeError::Transfer(format!("bad bundle header from {peer}: {e}")))?;
        Ok((header, reader))
    }
}
