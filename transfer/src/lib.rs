//! Moving migration state between node daemons: direct streams and S3 object storage.
//!
//! Two backends with the same shape, "send this byte stream under an id" and "give me
//! the byte stream with that id as an `AsyncRead`":
//!
//! * **direct** ([`Receiver`], [`Sender`]): a framed protocol over TCP + mutual TLS
//!   (rustls) between two node daemons. A receiver admits a connection only for an id
//!   whose migration it [`Receiver::grant`]ed, from the granted peer's certificate with
//!   the grant's token. Chunks carry a crc32c, the whole stream an
//!   XXH3-128 digest checked before the reader sees end-of-stream; chunks are optionally zstd
//!   compressed; the receiver acknowledges chunks and the sender keeps at most
//!   [`SendOptions::window`] unacknowledged bytes, which it re-sends after a dropped
//!   connection (resume from the last acknowledged offset). Bandwidth can be capped.
//!   The same listener also serves raw byte pipes ([`Sender::connect_pipe`],
//!   [`Receiver::accept_pipe`]) for QEMU's migration stream, where latency matters
//!   more than chunking.
//! * **object store** ([`S3Store`]): S3 multipart upload with parallel parts,
//!   resumable from an [`UploadCheckpoint`], a manifest (size, sha256, per-part crc32c)
//!   written last so a stream without a manifest is never read as complete, and
//!   verification of every part and the digest on download.
//!
//! Every error says which side failed and at which byte offset ([`TransferError`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), ferry_transfer::TransferError> {
//! use ferry_transfer::{Endpoint, Grant, Receiver, SendOptions, Sender, TestPki};
//! let pki = TestPki::generate()?;
//! let rx = Receiver::bind("127.0.0.1:0", pki.issue("node-b", &["127.0.0.1"])?).await?;
//! // Only node-a, presenting this token, may send mig-1's streams.
//! let grant = Grant::mint("node-a");
//! let ep = Endpoint::new(rx.local_addr().to_string(), "node-b").with_token(&grant.token);
//! rx.grant("mig-1", grant);
//! let mut incoming = rx.accept_stream("mig-1/rootfs").await;
//! let tx = Sender::new(pki.issue("node-a", &[])?)?;
//! let data: &[u8] = b"state bytes";
//! let report = tx.send_stream(&ep, "mig-1/rootfs", data, &SendOptions::default()).await?;
//! let mut out = Vec::new();
//! tokio::io::AsyncReadExt::read_to_end(&mut incoming, &mut out).await.unwrap();
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod direct;
mod error;
pub mod frame;
mod s3;
mod tls;

use std::time::Duration;

pub use direct::{
    Carried, Grant, IncomingStream, Moved, OnSent, OutgoingStream, Pacer, Pipe, Receiver,
    ResumeRecord, SendOptions, SendReport, Sender, Shaping, carry, into_pipe, out_of_pipe,
    scope_of,
};
pub use error::{Side, TransferError};
pub use s3::{
    IncomingObject, ReceiveOptions, S3Config, S3Credentials, S3SendOptions, S3SendReport, S3Store,
    UploadCheckpoint,
};
pub use tls::{TestPki, TlsIdentity, cert_names};

/// Where a peer's receiver listens: a `host:port` to connect to, the name its
/// certificate must carry (a DNS name or IP address in its subjectAltName), and the
/// token its [`Grant`] for the migration holds.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: String,
    pub server_name: String,
    pub token: String,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never log the token.
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    pub fn new(addr: impl Into<String>, server_name: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            server_name: server_name.into(),
            token: String::new(),
        }
    }

    /// The same endpoint, presenting `token` in every Hello.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = token.into();
        self
    }
}

/// How often and how patiently to retry a failed connection or request
/// (exponential backoff with jitter, through `backon`).
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts after the first failure before giving up.
    pub max_retries: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 6,
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    pub(crate) fn backoff(&self) -> backon::ExponentialBuilder {
        backon::ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(self.max_retries)
            .with_jitter()
    }
}

/// Lowercase hex of a digest, for logs, manifests and error messages.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads up to `size` bytes, short only at end of input: one chunk of a direct stream,
/// one part of an S3 upload.
pub(crate) async fn read_full<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
    size: usize,
) -> std::io::Result<bytes::Bytes> {
    use tokio::io::AsyncReadExt;
    let mut buf = bytes::BytesMut::with_capacity(size);
    while buf.len() < size {
        let n = (&mut *reader)
            .take((size - buf.len()) as u64)
            .read_buf(&mut buf)
            .await?;
        if n == 0 {
            break;
        }
    }
    Ok(buf.freeze())
}
