//! How container bundles travel between daemons: the ONE place that moves those bytes.
//!
//! Each container's bundle (CRIU's non-page images, config.json, rootfs as a tar stream)
//! is one ferry-transfer direct stream `<migration>/bundle/<container>` over the
//! daemons' mutual-TLS listener: chunk checksums, a whole-stream digest checked before
//! the reader sees the end, resume after a dropped connection. The stream starts with a
//! JSON header line ([`BundleHeader`]).
//!
//! Memory pages do not go through here: CRIU sends them to a CRIU page server while it
//! dumps, through the daemons' page relays (`relay.rs`).
use crate::error::RuntimeError;
use crate::transport::{self, Transport};
use ferry_transfer::{IncomingStream, SendOptions};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::sync::mpsc;

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

fn stream_id(migration_id: &str, container: &str) -> String {
    format!("{migration_id}/bundle/{container}")
}

/// Sends one bundle to the daemon at `endpoint`; returns the number of body bytes sent
/// once the receiver has verified the whole stream.
pub async fn send(
    transport: &Transport,
    endpoint: &str,
    token: &str,
    header: &BundleHeader,
    body: &mut (impl AsyncRead + Unpin),
) -> Result<u64, RuntimeError> {
    let ep = transport::peer(endpoint, token)?;
    let mut line = serde_json::to_vec(header).expect("header serializes");
    line.push(b'\n');
    let id = stream_id(&header.migration_id, &header.container);
    let report = transport
        .sender
        .send_stream(&ep, &id, (&line[..]).chain(body), &SendOptions::default())
        .await
        .map_err(|e| {
            RuntimeError::Transfer(format!("sending {} to {endpoint}: {e}", header.container))
        })?;
    Ok(report.bytes.saturating_sub(line.len() as u64))
}

/// A bundle's body, after its header line.
pub type BundleBody = BufReader<IncomingStream>;

type Arrival = Result<(BundleHeader, BundleBody), RuntimeError>;

/// The bundles of one migration arriving at this node, in whatever order they come.
/// Dropping it stops waiting and forgets the streams.
pub struct BundleListener {
    transport: Arc<Transport>,
    ids: Vec<String>,
    arrivals: mpsc::Receiver<Arrival>,
    tasks: tokio::task::JoinSet<()>,
}

impl BundleListener {
    /// Waits for the bundles of `containers` of `migration_id`.
    pub fn new(
        transport: &Arc<Transport>,
        migration_id: &str,
        containers: &[String],
    ) -> BundleListener {
        let (tx, arrivals) = mpsc::channel(containers.len().max(1));
        let mut tasks = tokio::task::JoinSet::new();
        let mut ids = Vec::new();
        for container in containers {
            let id = stream_id(migration_id, container);
            ids.push(id.clone());
            let (transport, tx) = (transport.clone(), tx.clone());
            let container = container.clone();
            tasks.spawn(async move {
                let stream = transport.receiver.accept_stream(&id).await;
                let _ = tx.send(read_header(stream, &container).await).await;
            });
        }
        BundleListener {
            transport: transport.clone(),
            ids,
            arrivals,
            tasks,
        }
    }

    pub fn endpoint(&self) -> String {
        self.transport.endpoint()
    }

    /// The next bundle to arrive: its header and a reader of its body.
    pub async fn accept(&mut self) -> Arrival {
        self.arrivals
            .recv()
            .await
            .unwrap_or_else(|| Err(RuntimeError::Transfer("no more bundles expected".into())))
    }
}

async fn read_header(stream: IncomingStream, container: &str) -> Arrival {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .await
        .map_err(|e| RuntimeError::Transfer(format!("receiving the bundle of {container}: {e}")))?;
    let header: BundleHeader = serde_json::from_str(line.trim())
        .map_err(|e| RuntimeError::Transfer(format!("bad bundle header for {container}: {e}")))?;
    if header.container != container {
        return Err(RuntimeError::Transfer(format!(
            "the stream for {container} carries the bundle of {}",
            header.container
        )));
    }
    Ok((header, reader))
}

impl Drop for BundleListener {
    fn drop(&mut self) {
        self.tasks.abort_all();
        for id in &self.ids {
            self.transport.receiver.forget(id);
        }
    }
}
