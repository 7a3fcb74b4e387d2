//! The direct backend: framed streams and raw pipes over TCP + mutual TLS.
//!
//! Handshake (both modes): the connecting side sends `Hello{mode, id}`, the listening
//! side answers `HelloAck{resume_offset}`. In stream mode Data/Ack/End/Done frames
//! follow; in pipe mode the TLS connection is handed to both callers as a raw pipe.
mod pipe;
mod receiver;
mod sender;
mod shape;

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use pipe::Pipe;
pub use receiver::{Grant, IncomingStream, Receiver, scope_of};
pub use sender::{OutgoingStream, Sender};
pub use shape::{Carried, Moved, OnSent, Pacer, Shaping, carry, into_pipe, out_of_pipe};

use crate::RetryPolicy;
use crate::frame::{Frame, MAX_FRAME};

/// Tuning of one outgoing direct stream.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// Bytes per Data frame (before compression). At most [`crate::frame::MAX_CHUNK`].
    pub chunk_size: usize,
    /// Most bytes sent but not yet acknowledged; also the memory the sender keeps to
    /// re-send after a dropped connection.
    pub window: usize,
    /// zstd level for chunk compression; `None` sends chunks as they are. A chunk that
    /// does not shrink is sent uncompressed.
    pub zstd_level: Option<i32>,
    /// Caps payload bytes per second on the wire; share one [`Pacer`] between the
    /// streams and pipes of a migration to cap them together. `None` is unlimited.
    pub pacer: Option<std::sync::Arc<Pacer>>,
    /// Reconnect policy after a dropped connection.
    pub retry: RetryPolicy,
    /// A connection that makes no progress (no acknowledgement while data is
    /// outstanding, or a stalled write) for this long is treated as dropped.
    pub io_timeout: Duration,
}

impl Default for SendOptions {
    fn default() -> Self {
        Self {
            chunk_size: 1 << 20,
            window: 16 << 20,
            zstd_level: None,
            pacer: None,
            retry: RetryPolicy::default(),
            io_timeout: Duration::from_secs(20),
        }
    }
}

/// One reconnection of a stream: what the sender knew was acknowledged when the
/// connection dropped, and where the receiver asked it to resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeRecord {
    pub acked_before: u64,
    pub resumed_from: u64,
}

/// Running whole-stream digest (XXH3-128, big endian), fed on both ends.
#[derive(Clone, Default)]
pub(crate) struct StreamDigest(xxhash_rust::xxh3::Xxh3);

impl StreamDigest {
    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    pub(crate) fn finish(&self) -> crate::frame::Digest {
        self.0.digest128().to_be_bytes()
    }
}

/// What a finished direct stream did.
#[derive(Debug, Clone, Default)]
pub struct SendReport {
    /// Stream length (uncompressed).
    pub bytes: u64,
    /// Uncompressed bytes put into Data frames, counting re-sends.
    pub data_bytes_sent: u64,
    /// Payload bytes on the wire (after compression), counting re-sends.
    pub wire_bytes_sent: u64,
    /// Uncompressed bytes sent more than once.
    pub resent_bytes: u64,
    pub reconnects: u32,
    pub resumes: Vec<ResumeRecord>,
    /// Whole-stream digest (XXH3-128), as verified by the receiver.
    pub digest: crate::frame::Digest,
}

/// Reads one frame with exact reads (no read-ahead), so that after the handshake the
/// connection can be handed over as a raw pipe without losing buffered bytes.
pub(crate) async fn read_frame_exact<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Frame> {
    let mut header = [0u8; 5];
    r.read_exact(&mut header).await?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut buf = bytes::BytesMut::with_capacity(5 + len);
    buf.extend_from_slice(&header);
    buf.resize(5 + len, 0);
    r.read_exact(&mut buf[5..]).await?;
    Frame::decode(&mut buf)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "incomplete frame"))
}

pub(crate) async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    f: &Frame,
) -> std::io::Result<()> {
    let mut buf = bytes::BytesMut::new();
    f.encode(&mut buf);
    w.write_all(&buf).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use crate::{Endpoint, Grant, Receiver, RetryPolicy, Sender, TestPki};

    /// Both ends of a real connection agree on AES-128-GCM (cheaper per byte than the
    /// AES-256 that ring's default order would pick), on TLS 1.3.
    #[tokio::test]
    async fn connections_negotiate_aes_128_gcm() {
        let pki = TestPki::generate().unwrap();
        let rx = Receiver::bind("127.0.0.1:0", pki.issue("rx", &["127.0.0.1"]).unwrap())
            .await
            .unwrap();
        let tx = Sender::new(pki.issue("tx", &[]).unwrap()).unwrap();
        let grant = Grant::mint("tx");
        let ep = Endpoint::new(rx.local_addr().to_string(), "rx").with_token(&grant.token);
        rx.grant("suite", grant);
        let accepted = rx.accept_pipe("suite/p");
        let out = tx
            .connect_pipe(&ep, "suite/p", &RetryPolicy::default())
            .await
            .unwrap();
        let inp = accepted.await.unwrap();
        for pipe in [&out, &inp] {
            let conn = pipe.inner.get_ref().1;
            assert_eq!(
                conn.negotiated_cipher_suite().map(|s| s.suite()),
                Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
            );
            assert_eq!(
                conn.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
        }
    }
}
