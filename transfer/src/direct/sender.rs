//! The connecting side of the direct backend.
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use backon::Retryable;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::{TlsConnector, TlsStream};
use tokio_util::codec::FramedRead;
use tracing::{Instrument, debug, info_span, warn};

use super::StreamDigest;
use super::pipe::Pipe;
use super::{ResumeRecord, SendOptions, SendReport, read_frame_exact, write_frame};
use crate::frame::{Codec, Frame, FrameCodec, MAX_CHUNK, Mode, check_id};
use crate::{Endpoint, RetryPolicy, Side, TlsIdentity, TransferError};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends streams and opens pipes to peers' [`crate::Receiver`]s. Cheap to clone.
#[derive(Clone)]
pub struct Sender {
    connector: TlsConnector,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sender{..}")
    }
}

impl Sender {
    pub fn new(identity: TlsIdentity) -> Result<Sender, TransferError> {
        Ok(Sender {
            connector: TlsConnector::from(identity.client.clone()),
        })
    }

    /// TCP connect, TLS handshake, Hello; returns the connection and the receiver's
    /// resume offset.
    async fn connect(
        &self,
        ep: &Endpoint,
        mode: Mode,
        id: &str,
    ) -> io::Result<(TlsStream<TcpStream>, u64)> {
        let name = ServerName::try_from(ep.server_name.clone()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("server name {:?}: {e}", ep.server_name),
            )
        })?;
        let fut = async {
            let tcp = TcpStream::connect(&ep.addr).await?;
            tcp.set_nodelay(true)?;
            let tls = self.connector.connect(name, tcp).await?;
            let mut tls = TlsStream::Client(tls);
            write_frame(
                &mut tls,
                &Frame::Hello {
                    mode,
                    id: id.to_string(),
                    token: ep.token.clone(),
                },
            )
            .await?;
            // With TLS 1.3 a refused client certificate surfaces here, on first read.
            match read_frame_exact(&mut tls).await? {
                Frame::HelloAck { resume_offset } => Ok((tls, resume_offset)),
                // Not granted (wrong token, peer or scope): retrying will not help.
                Frame::Error {
                    retryable: false,
                    message,
                    ..
                } => Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("receiver refused: {message}"),
                )),
                Frame::Error { message, .. } => {
                    Err(io::Error::other(format!("receiver refused: {message}")))
                }
                other => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("expected HelloAck, got {other:?}"),
                )),
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT, fut)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect/handshake timed out"))?
    }

    async fn connect_retrying(
        &self,
        ep: &Endpoint,
        mode: Mode,
        id: &str,
        retry: &RetryPolicy,
    ) -> io::Result<(TlsStream<TcpStream>, u64)> {
        (|| self.connect(ep, mode, id))
            .retry(retry.backoff())
            .sleep(tokio::time::sleep)
            // A bad name or a refused certificate (rustls errors are InvalidData) will not
            // get better by retrying; refused connections and timeouts might.
            .when(|e| {
                !matches!(
                    e.kind(),
                    io::ErrorKind::InvalidInput
                        | io::ErrorKind::InvalidData
                        | io::ErrorKind::PermissionDenied
                )
            })
            .notify(|e, d| warn!(error = %e, delay = ?d, endpoint = %ep.addr, "connect failed; retrying"))
            .await
    }

    /// Opens a raw byte pipe to the peer, which must [`crate::Receiver::accept_pipe`]
    /// the same `id`. Connection attempts are retried per `retry`; a pipe that breaks
    /// later is not re-established (QEMU restarts its migration instead).
    pub async fn connect_pipe(
        &self,
        ep: &Endpoint,
        id: &str,
        retry: &RetryPolicy,
    ) -> Result<Pipe, TransferError> {
        check_id(id).map_err(|e| TransferError::Invalid(format!("pipe id {id:?}: {e}")))?;
        let (tls, _) = self
            .connect_retrying(ep, Mode::Pipe, id, retry)
            .await
            .map_err(|e| {
                TransferError::stream(
                    Side::Sender,
                    id,
                    0,
                    format!("connecting pipe to {}: {e}", ep.addr),
                )
            })?;
        Ok(Pipe {
            id: id.to_string(),
            inner: tls,
        })
    }

    /// Sends everything `reader` yields as stream `id` and returns once the receiver
    /// has verified the whole-stream digest. Dropped connections are re-established
    /// and resumed from the last acknowledged byte.
    pub async fn send_stream<R: AsyncRead + Unpin>(
        &self,
        ep: &Endpoint,
        id: &str,
        reader: R,
        opts: &SendOptions,
    ) -> Result<SendReport, TransferError> {
        check_id(id).map_err(|e| TransferError::Invalid(format!("stream id {id:?}: {e}")))?;
        if opts.chunk_size == 0 || opts.chunk_size > MAX_CHUNK || opts.window < opts.chunk_size {
            return Err(TransferError::Invalid(format!(
                "chunk_size must be in 1..={MAX_CHUNK} and window >= chunk_size (got {} / {})",
                opts.chunk_size, opts.window
            )));
        }
        let span = info_span!("send_stream", %id, endpoint = %ep.addr);
        self.send_inner(ep, id, reader, opts).instrument(span).await
    }

    /// Like [`Sender::send_stream`] but gives an `AsyncWrite`: write the stream, then
    /// call [`OutgoingStream::finish`] for the result. If the transfer fails early,
    /// writes fail with `BrokenPipe` and `finish` returns the real error.
    pub fn stream_writer(&self, ep: &Endpoint, id: &str, opts: &SendOptions) -> OutgoingStream {
        let (writer, reader) = tokio::io::duplex(opts.chunk_size.max(64 << 10));
        let (this, ep, id, opts) = (self.clone(), ep.clone(), id.to_string(), opts.clone());
        let task = tokio::spawn(async move { this.send_stream(&ep, &id, reader, &opts).await });
        OutgoingStream { writer, task }
    }

    async fn send_inner<R: AsyncRead + Unpin>(
        &self,
        ep: &Endpoint,
        id: &str,
        mut reader: R,
        opts: &SendOptions,
    ) -> Result<SendReport, TransferError> {
        let mut out = Outbox::default();
        let mut report = SendReport::default();
        let mut first = true;
        let mut stalls = 0usize;
        loop {
            let (tls, resume) = self
                .connect_retrying(ep, Mode::Stream, id, &opts.retry)
                .await
                .map_err(|e| {
                    TransferError::stream(
                        Side::Sender,
                        id,
                        out.acked,
                        format!("connecting to {}: {e}", ep.addr),
                    )
                })?;
            if !first {
                report.reconnects += 1;
                report.resumes.push(ResumeRecord {
                    acked_before: out.acked,
                    resumed_from: resume,
                });
            }
            first = false;
            if resume > out.read_end {
                return Err(TransferError::stream(
                    Side::Receiver,
                    id,
                    resume,
                    format!(
                        "receiver already has {resume} bytes but only {} were sent: another stream used this id",
                        out.read_end
                    ),
                ));
            }
            if resume < out.buf_start {
                return Err(TransferError::stream(
                    Side::Receiver,
                    id,
                    resume,
                    format!(
                        "receiver resumes at byte {resume} but bytes up to {} were acknowledged and released: \
                         the receiver lost state (restarted?); send the stream again under a new id",
                        out.buf_start
                    ),
                ));
            }
            let acked_at_connect = resume.max(out.acked);
            out.ack(resume);
            debug!(resume, "connected");
            match run_conn(tls, &mut out, &mut reader, resume, opts, &mut report, id).await {
                Ok(()) => return Ok(report),
                Err(ConnError::Fatal(e)) => return Err(e),
                Err(ConnError::Broken(why)) => {
                    if out.acked > acked_at_connect {
                        stalls = 0;
                    } else {
                        stalls += 1;
                    }
                    warn!(acked = out.acked, %why, "connection broke; resuming");
                    if stalls > opts.retry.max_retries {
                        return Err(TransferError::stream(
                            Side::Sender,
                            id,
                            out.acked,
                            format!("{stalls} connections in a row made no progress; last: {why}"),
                        ));
                    }
                    tokio::time::sleep(opts.retry.min_delay).await;
                }
            }
        }
    }
}

/// Chunks read from the source and not yet acknowledged.
#[derive(Default)]
struct Outbox {
    chunks: VecDeque<Bytes>,
    /// Stream offset of `chunks[0]`.
    buf_start: u64,
    /// Bytes read from the source.
    read_end: u64,
    acked: u64,
    /// Highest offset ever sent, to count re-sends.
    max_sent: u64,
    eof: bool,
    hasher: StreamDigest,
}

impl Outbox {
    fn ack(&mut self, offset: u64) {
        self.acked = self.acked.max(offset);
        while let Some(front) = self.chunks.front() {
            if self.buf_start + front.len() as u64 <= self.acked {
                self.buf_start += front.len() as u64;
                self.chunks.pop_front();
            } else {
                break;
            }
        }
    }

    /// The buffered bytes from `pos` to the end of the chunk holding it.
    fn chunk_at(&self, pos: u64) -> Option<Bytes> {
        let mut start = self.buf_start;
        for c in &self.chunks {
            let end = start + c.len() as u64;
            if pos >= start && pos < end {
                return Some(c.slice((pos - start) as usize..));
            }
            start = end;
        }
        None
    }
}

enum ConnError {
    /// The connection is unusable; reconnect and resume.
    Broken(String),
    Fatal(TransferError),
}

#[derive(Clone, Default)]
struct AckState {
    acked: u64,
    done: Option<u64>,
    broken: Option<String>,
    fatal: Option<(u64, String)>,
}

#[allow(clippy::too_many_arguments)]
async fn run_conn<R: AsyncRead + Unpin>(
    tls: TlsStream<TcpStream>,
    out: &mut Outbox,
    reader: &mut R,
    resume: u64,
    opts: &SendOptions,
    report: &mut SendReport,
    id: &str,
) -> Result<(), ConnError> {
    let (rd, mut wr) = tokio::io::split(tls);
    let (ack_tx, mut ack_rx) = watch::channel(AckState {
        acked: resume,
        ..Default::default()
    });
    // Acknowledgements are read by their own task so a blocked write never stops them.
    let ack_task = tokio::spawn(async move {
        let mut frames = FramedRead::new(rd, FrameCodec);
        loop {
            let f = frames.next().await;
            let stop = match f {
                Some(Ok(Frame::Ack { offset })) => {
                    ack_tx.send_modify(|s| s.acked = s.acked.max(offset));
                    false
                }
                Some(Ok(Frame::Done { total })) => {
                    ack_tx.send_modify(|s| s.done = Some(total));
                    true
                }
                Some(Ok(Frame::Error {
                    retryable: true,
                    offset,
                    message,
                })) => {
                    ack_tx.send_modify(|s| {
                        s.broken = Some(format!("receiver at byte {offset}: {message}"))
                    });
                    true
                }
                Some(Ok(Frame::Error {
                    retryable: false,
                    offset,
                    message,
                })) => {
                    ack_tx.send_modify(|s| s.fatal = Some((offset, message)));
                    true
                }
                Some(Ok(other)) => {
                    ack_tx.send_modify(|s| {
                        s.fatal = Some((s.acked, format!("unexpected frame {other:?}")))
                    });
                    true
                }
                Some(Err(e)) => {
                    ack_tx
                        .send_modify(|s| s.broken = Some(format!("reading acknowledgements: {e}")));
                    true
                }
                None => {
                    ack_tx
                        .send_modify(|s| s.broken = Some("receiver closed the connection".into()));
                    true
                }
            };
            if stop {
                break;
            }
        }
    });
    let _abort = AbortOnDrop(ack_task);
    let broken = |why: String| Err(ConnError::Broken(why));
    let mut pos = resume;
    let mut sent_end = false;
    let mut frame_buf = BytesMut::new();
    loop {
        let st = ack_rx.borrow_and_update().clone();
        out.ack(st.acked);
        if let Some((offset, msg)) = st.fatal {
            return Err(ConnError::Fatal(TransferError::stream(
                Side::Receiver,
                id,
                offset,
                msg,
            )));
        }
        if let Some(total) = st.done {
            if !(sent_end && total == out.read_end) {
                return Err(ConnError::Fatal(TransferError::stream(
                    Side::Receiver,
                    id,
                    total,
                    format!(
                        "receiver reported completion at byte {total}, but {} bytes were sent",
                        out.read_end
                    ),
                )));
            }
            report.bytes = total;
            report.digest = out.hasher.finish();
            let _ = wr.shutdown().await;
            return Ok(());
        }
        if let Some(why) = st.broken {
            return broken(why);
        }
        let more = pos < out.read_end || !out.eof;
        if more && pos - out.acked < opts.window as u64 {
            if pos == out.read_end {
                let chunk = crate::read_full(reader, opts.chunk_size)
                    .await
                    .map_err(|e| {
                        ConnError::Fatal(TransferError::stream(
                            Side::Sender,
                            id,
                            out.read_end,
                            format!("reading the source: {e}"),
                        ))
                    })?;
                if chunk.is_empty() {
                    out.eof = true;
                } else {
                    out.hasher.update(&chunk);
                    out.read_end += chunk.len() as u64;
                    out.chunks.push_back(chunk);
                }
                continue;
            }
            let raw = out
                .chunk_at(pos)
                .expect("pos is between acked and read_end, so buffered");
            let (codec, payload) = match opts.zstd_level {
                Some(level) => match zstd::bulk::compress(&raw, level) {
                    Ok(c) if c.len() < raw.len() => (Codec::Zstd, Bytes::from(c)),
                    _ => (Codec::None, raw.clone()),
                },
                None => (Codec::None, raw.clone()),
            };
            let wire = payload.len() as u64;
            if let Some(p) = &opts.pacer {
                // Before the write: the budget is spent when bytes leave, and a
                // flush makes them leave now rather than in a later burst.
                let _ = wr.flush().await;
                p.pace(wire).await;
            }
            // Header and payload written separately: saves copying each chunk into a
            // frame buffer (TLS copies it into records anyway).
            frame_buf.clear();
            let crc32c = crc32c::crc32c(&payload);
            Frame::Data {
                offset: pos,
                raw_len: raw.len() as u32,
                crc32c,
                codec,
                payload: Bytes::new(),
            }
            .encode(&mut frame_buf);
            let body_len = (frame_buf.len() - 5 + payload.len()) as u32;
            frame_buf[1..5].copy_from_slice(&body_len.to_be_bytes());
            let write = async {
                wr.write_all(&frame_buf).await?;
                wr.write_all(&payload).await
            };
            match tokio::time::timeout(opts.io_timeout, write).await {
                Err(_) => return broken(format!("write of chunk at byte {pos} stalled")),
                Ok(Err(e)) => return broken(format!("writing chunk at byte {pos}: {e}")),
                Ok(Ok(())) => {}
            }
            let len = raw.len() as u64;
            let resent = out.max_sent.saturating_sub(pos).min(len);
            report.resent_bytes += resent;
            report.data_bytes_sent += len;
            report.wire_bytes_sent += wire;
            pos += len;
            out.max_sent = out.max_sent.max(pos);
            continue;
        }
        if !more && !sent_end {
            let digest = out.hasher.finish();
            frame_buf.clear();
            Frame::End {
                total: out.read_end,
                digest,
            }
            .encode(&mut frame_buf);
            if let Err(e) = wr.write_all(&frame_buf).await {
                return broken(format!("writing End: {e}"));
            }
            sent_end = true;
        }
        // Window full or everything sent: push out buffered records, wait for acks.
        match tokio::time::timeout(opts.io_timeout, wr.flush()).await {
            Err(_) => return broken("flush stalled".into()),
            Ok(Err(e)) => return broken(format!("flush: {e}")),
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout(opts.io_timeout, ack_rx.changed()).await {
            Err(_) => {
                return broken(format!(
                    "no acknowledgement for {:?} (acked up to byte {})",
                    opts.io_timeout, out.acked
                ));
            }
            Ok(Err(_)) => return broken("acknowledgement reader ended".into()),
            Ok(Ok(())) => {}
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An outgoing direct stream as an `AsyncWrite`; see [`Sender::stream_writer`].
pub struct OutgoingStream {
    writer: DuplexStream,
    task: tokio::task::JoinHandle<Result<SendReport, TransferError>>,
}

impl OutgoingStream {
    /// Ends the stream and waits until the receiver verified it.
    pub async fn finish(mut self) -> Result<SendReport, TransferError> {
        let _ = self.writer.shutdown().await;
        drop(self.writer);
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(TransferError::Invalid(format!(
                "send task panicked or was cancelled: {e}"
            ))),
        }
    }
}

impl AsyncWrite for OutgoingStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_shutdown(cx)
    }
}
