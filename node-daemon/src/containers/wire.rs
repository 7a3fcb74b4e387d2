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
//!
//! Through a bucket (`transfer.mode: ObjectStore`) each bundle is instead one S3 stream
//! with the same id and the same contents (pages included: no page server then),
//! sealed with the migration's token so that only the source's upload is accepted
//! (`ferry_transfer::ReceiveOptions::seal_key`) and encrypted at rest with a key derived
//! from it (the token reaches the daemons only over the control channel, never the
//! bucket). It is a streamed upload (`S3Store::send_streamed`: one object per 4 MiB
//! part), so the destination reads each part as soon as it is there: the download
//! overlaps the upload.
use crate::error::RuntimeError;
use crate::transport::{self, Transport};
use ferry_transfer::{Moved, ReceiveOptions, S3SendOptions, S3Store, SendOptions, Shaping};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::sync::mpsc;

/// Sent before each container's bundle. Nothing in it names anything on the
/// destination: the runc id and the runtime config come from the target Pod's own
/// container (containerd's create), never from the sender.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BundleHeader {
    pub migration_id: String,
    /// CRI container name.
    pub container: String,
    /// When the source froze the pod (Unix ms), so the destination can measure downtime.
    pub frozen_at_ms: u64,
}

/// A header line longer than this is refused before it is parsed (a real one is ~150 B).
const MAX_HEADER: u64 = 4096;

/// Parts of a bundle in the bucket: small enough that the destination starts reading
/// soon after the source started writing.
const BUCKET_PART: usize = 4 << 20;

fn stream_id(migration_id: &str, container: &str) -> String {
    format!("{migration_id}/bundle/{container}")
}

/// Sends one bundle to the daemon at `endpoint`; returns the body's bytes (and what
/// crossed the wire for the whole stream) once the receiver has verified it.
pub async fn send(
    transport: &Transport,
    endpoint: &str,
    token: &str,
    shaping: &Shaping,
    header: &BundleHeader,
    body: &mut (impl AsyncRead + Unpin),
) -> Result<Moved, RuntimeError> {
    let ep = transport::peer(endpoint, token)?;
    let mut line = serde_json::to_vec(header).expect("header serializes");
    line.push(b'\n');
    let id = stream_id(&header.migration_id, &header.container);
    // Compressed chunk by chunk (the receiver decodes each frame as it says), paced by
    // the migration's one pacer together with its page pipes.
    let opts = SendOptions {
        zstd_level: shaping.zstd_level,
        pacer: shaping.pacer.clone(),
        ..Default::default()
    };
    let report = transport
        .sender
        .send_stream(&ep, &id, (&line[..]).chain(body), &opts)
        .await
        .map_err(|e| {
            RuntimeError::Transfer(format!("sending {} to {endpoint}: {e}", header.container))
        })?;
    Ok(Moved {
        raw: report.bytes.saturating_sub(line.len() as u64),
        wire: report.wire_bytes_sent,
    })
}

/// Sends one bundle through the migration's bucket, sealed and encrypted with `token`; returns the
/// body's bytes and what was uploaded once the stream is complete there.
pub async fn upload(
    store: &S3Store,
    token: &str,
    header: &BundleHeader,
    body: impl AsyncRead + Unpin,
) -> Result<Moved, RuntimeError> {
    let mut line = serde_json::to_vec(header).expect("header serializes");
    line.push(b'\n');
    let id = stream_id(&header.migration_id, &header.container);
    let opts = S3SendOptions {
        seal_key: Some(token.as_bytes().to_vec()),
        encryption_key: Some(token.as_bytes().to_vec()),
        part_size: BUCKET_PART,
        ..Default::default()
    };
    let head = line.len() as u64;
    let sent = store
        .send_streamed(&id, std::io::Cursor::new(line).chain(body), &opts)
        .await;
    let report =
        sent.map_err(|e| RuntimeError::Transfer(format!("uploading {}: {e}", header.container)))?;
    Ok(Moved {
        raw: report.bytes.saturating_sub(head),
        wire: report.bytes_uploaded,
    })
}

/// A bundle's body, after its header line.
pub type BundleBody = BufReader<Box<dyn AsyncRead + Send + Unpin>>;

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
            let mid = migration_id.to_string();
            tasks.spawn(async move {
                let stream = transport.receiver.accept_stream(&id).await;
                let _ = tx
                    .send(read_header(Box::new(stream), &mid, &container).await)
                    .await;
            });
        }
        BundleListener {
            transport: transport.clone(),
            ids,
            arrivals,
            tasks,
        }
    }

    /// Waits for the bundles of `containers` of `migration_id` to be complete in the
    /// bucket (polled), sealed with `token`, and reads them from there.
    pub fn from_bucket(
        transport: &Arc<Transport>,
        store: Arc<S3Store>,
        token: &str,
        migration_id: &str,
        containers: &[String],
    ) -> BundleListener {
        let (tx, arrivals) = mpsc::channel(containers.len().max(1));
        let mut tasks = tokio::task::JoinSet::new();
        for container in containers {
            let id = stream_id(migration_id, container);
            let (store, tx, container) = (store.clone(), tx.clone(), container.clone());
            let mid = migration_id.to_string();
            let opts = ReceiveOptions {
                seal_key: Some(token.as_bytes().to_vec()),
                encryption_key: Some(token.as_bytes().to_vec()),
                ..Default::default()
            };
            tasks.spawn(async move {
                // Waits for the source's upload and reads its parts as they come.
                let arrival = store.receive_streamed(&id, &opts);
                let r = match arrival.await {
                    Ok(o) => read_header(Box::new(o), &mid, &container).await,
                    Err(e) => Err(RuntimeError::Transfer(format!(
                        "fetching the bundle of {container} from the bucket: {e}"
                    ))),
                };
                let _ = tx.send(r).await;
            });
        }
        BundleListener {
            transport: transport.clone(),
            // Nothing granted on the transfer port: nothing to forget.
            ids: Vec::new(),
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

async fn read_header(
    stream: Box<dyn AsyncRead + Send + Unpin>,
    migration_id: &str,
    container: &str,
) -> Arrival {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    (&mut reader)
        .take(MAX_HEADER + 1)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| RuntimeError::Transfer(format!("receiving the bundle of {container}: {e}")))?;
    let header = parse_header(&line, migration_id, container)
        .map_err(|e| RuntimeError::Transfer(format!("bad bundle header for {container}: {e}")))?;
    Ok((header, reader))
}

/// The header line as received (with its newline), checked against what this node
/// expects on that stream.
fn parse_header(line: &[u8], migration_id: &str, container: &str) -> Result<BundleHeader, String> {
    let Some(json) = line.strip_suffix(b"\n") else {
        return Err(if line.len() as u64 > MAX_HEADER {
            format!("no end of line within {MAX_HEADER} bytes")
        } else {
            "the stream ended inside the header".into()
        });
    };
    let header: BundleHeader = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    if header.migration_id != migration_id {
        return Err(format!(
            "it belongs to migration {:?}, not {migration_id:?}",
            header.migration_id
        ));
    }
    if header.container != container {
        return Err(format!("it carries the bundle of {:?}", header.container));
    }
    Ok(header)
}

impl Drop for BundleListener {
    fn drop(&mut self) {
        self.tasks.abort_all();
        for id in &self.ids {
            self.transport.receiver.forget(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(v: serde_json::Value) -> Vec<u8> {
        let mut l = serde_json::to_vec(&v).unwrap();
        l.push(b'\n');
        l
    }

    #[test]
    fn a_header_is_what_the_stream_was_granted_for_or_refused() {
        let good = serde_json::json!({"migration_id": "m1", "container": "app", "frozen_at_ms": 7});
        assert_eq!(
            parse_header(&line(good.clone()), "m1", "app"),
            Ok(BundleHeader {
                migration_id: "m1".into(),
                container: "app".into(),
                frozen_at_ms: 7
            })
        );
        let cases = [
            (line(good.clone()), "m2", "app", "belongs to migration"),
            (line(good.clone()), "m1", "db", "carries the bundle of"),
            (
                line(
                    serde_json::json!({"migration_id": "m1", "container": "app", "frozen_at_ms": 7, "container_id": "x"}),
                ),
                "m1",
                "app",
                "unknown field",
            ),
            (
                b"{\"migration_id\": \"m1\"".to_vec(),
                "m1",
                "app",
                "ended inside",
            ),
            (
                vec![b' '; MAX_HEADER as usize + 1],
                "m1",
                "app",
                "no end of line",
            ),
            (b"not json\n".to_vec(), "m1", "app", "expected"),
        ];
        for (l, mid, c, why) in cases {
            let e = parse_header(&l, mid, c).expect_err(why);
            assert!(e.contains(why), "{why:?} not in {e:?}");
        }
    }
}
