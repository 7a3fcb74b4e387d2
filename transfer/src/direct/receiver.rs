//! The listening side of the direct backend, run by the receiving node daemon.
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::{TlsAcceptor, TlsStream};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use super::StreamDigest;
use super::pipe::Pipe;
use super::{read_frame_exact, write_frame};
use crate::frame::{Codec, Digest, Frame, FrameCodec, Mode};
use crate::{Side, TlsIdentity, TransferError};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Chunks queued for the reading application before the connection stops reading
/// (and so stops acknowledging: backpressure reaches the sender).
const QUEUE_CHUNKS: usize = 8;

/// Listens for direct streams and pipes from peer daemons. Dropping it closes the
/// listener and every connection; readers of unfinished streams then get an error.
pub struct Receiver {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: tokio::task::JoinHandle<()>,
}

struct Shared {
    acceptor: TlsAcceptor,
    /// Scope (an id's first `/`-separated segment: the migration) → who may send.
    grants: Mutex<HashMap<String, Grant>>,
    streams: Mutex<HashMap<String, Arc<Slot>>>,
    pipes: Mutex<HashMap<String, PipeSlot>>,
    shutdown: CancellationToken,
}

enum PipeSlot {
    Waiting(oneshot::Sender<Pipe>),
    Ready(Box<Pipe>),
}

/// One incoming stream id; outlives connections so a reconnecting sender resumes.
struct Slot {
    /// Cancels the connection currently serving this id, when a newer one arrives.
    current: Mutex<CancellationToken>,
    state: tokio::sync::Mutex<SlotState>,
    reader: Mutex<Option<mpsc::Receiver<Msg>>>,
}

struct SlotState {
    tx: Option<mpsc::Sender<Msg>>,
    /// Bytes delivered to the reader's queue (and acknowledged).
    offset: u64,
    hasher: StreamDigest,
    /// Set once the digest has been verified.
    done: Option<Digest>,
}

enum Msg {
    Data(Bytes),
    End,
    Err(TransferError),
}

impl Receiver {
    /// Listens on `addr` (e.g. `"0.0.0.0:7443"`, or port 0 for any free port).
    pub async fn bind(
        addr: impl ToSocketAddrs,
        identity: TlsIdentity,
    ) -> Result<Receiver, TransferError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| TransferError::Bind {
                addr: "requested address".into(),
                source,
            })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| TransferError::Bind {
                addr: "bound socket".into(),
                source,
            })?;
        let shared = Arc::new(Shared {
            acceptor: TlsAcceptor::from(identity.server.clone()),
            grants: Mutex::default(),
            streams: Mutex::default(),
            pipes: Mutex::default(),
            shutdown: CancellationToken::new(),
        });
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Receiver {
            local_addr,
            shared,
            accept_task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The stream `id` as an `AsyncRead`. Can be called before or after the sender
    /// connects. The reader gets end-of-stream only after the whole-stream digest was
    /// verified; any failure (digest mismatch, receiver shut down before the end) is a
    /// read error. A stream id can be accepted once; later calls return a reader that
    /// fails. The reader waits for a (re)connecting sender indefinitely: wrap reads in
    /// your own deadline.
    pub async fn accept_stream(&self, id: &str) -> IncomingStream {
        let slot = self.shared.slot(id);
        let rx = slot.reader.lock().unwrap().take();
        IncomingStream {
            id: id.to_string(),
            rx,
            current: Bytes::new(),
            offset: 0,
            finished: false,
        }
    }

    /// Waits for a peer to [`crate::Sender::connect_pipe`] with `id` and returns the
    /// pipe. A peer that connected first is kept until accepted.
    pub async fn accept_pipe(&self, id: &str) -> Result<Pipe, TransferError> {
        let rx = {
            let mut pipes = self.shared.pipes.lock().unwrap();
            match pipes.remove(id) {
                Some(PipeSlot::Ready(p)) => return Ok(*p),
                _ => {
                    let (tx, rx) = oneshot::channel();
                    pipes.insert(id.to_string(), PipeSlot::Waiting(tx));
                    rx
                }
            }
        };
        rx.await
            .map_err(|_| TransferError::stream(Side::Receiver, id, 0, "receiver shut down"))
    }

    /// Forgets a finished stream id (its resume state), e.g. after the migration ends.
    pub fn forget(&self, id: &str) {
        self.shared.streams.lock().unwrap().remove(id);
    }

    /// Lets `grant.peer`, presenting `grant.token`, send the streams and pipes whose ids
    /// start with `scope/` (a migration's). Every other connection is refused after the
    /// handshake, with an Error frame that names the reason: the CA alone admits no one.
    /// A later grant of the same scope replaces the earlier one.
    pub fn grant(&self, scope: &str, grant: Grant) {
        self.shared
            .grants
            .lock()
            .unwrap()
            .insert(scope.to_string(), grant);
    }

    /// Ends a scope's grant and forgets its streams' resume state; connections already
    /// serving it run on.
    pub fn revoke(&self, scope: &str) {
        self.shared.grants.lock().unwrap().remove(scope);
        let prefix = format!("{scope}/");
        self.shared
            .streams
            .lock()
            .unwrap()
            .retain(|id, _| !id.starts_with(&prefix));
        self.shared
            .pipes
            .lock()
            .unwrap()
            .retain(|id, _| !id.starts_with(&prefix));
    }
}

/// Who may send one scope's streams and pipes: the holder of a secret, and only from
/// one certificate name. Both are needed: the token alone would admit anyone who read
/// it (it travels through the controller), the name alone any migration of that peer.
#[derive(Clone, PartialEq, Eq)]
pub struct Grant {
    /// The secret the sender puts in its Hello ([`crate::Endpoint::token`]).
    pub token: String,
    /// An IP address or DNS name the sender's (CA-verified) certificate must carry.
    pub peer: String,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never log the token.
        f.debug_struct("Grant")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Grant {
    /// A grant for `peer` with a fresh 256-bit token.
    pub fn mint(peer: impl Into<String>) -> Grant {
        let bytes: [u8; 32] = rand::random();
        Grant {
            token: crate::hex(&bytes),
            peer: peer.into(),
        }
    }
}

/// The scope of a stream or pipe id: its first `/`-separated segment.
pub fn scope_of(id: &str) -> &str {
    id.split_once('/').map_or(id, |(scope, _)| scope)
}

impl Shared {
    /// Whether the connection may open `id`: a grant for its scope, the grant's token
    /// (compared in constant time), and a client certificate that names the grant's peer.
    fn authorize(
        &self,
        id: &str,
        token: &str,
        certs: Option<&[rustls_pki_types::CertificateDer<'static>]>,
    ) -> Result<(), String> {
        let scope = scope_of(id);
        let Some(grant) = self.grants.lock().unwrap().get(scope).cloned() else {
            return Err(format!(
                "no migration on this node expects {id:?} (nothing granted for {scope:?})"
            ));
        };
        if !constant_time_eq(grant.token.as_bytes(), token.as_bytes()) {
            return Err(format!("wrong token for {scope:?}"));
        }
        let leaf = certs
            .and_then(|c| c.first())
            .ok_or("no client certificate")?;
        if !crate::tls::cert_names(leaf, &grant.peer) {
            return Err(format!(
                "{scope:?} is granted to {}; this client certificate does not name it",
                grant.peer
            ));
        }
        Ok(())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
        self.accept_task.abort();
        // Readers of unfinished streams must see an error, not a clean end.
        for (_, slot) in self.shared.streams.lock().unwrap().drain() {
            if let Ok(mut st) = slot.state.try_lock() {
                st.tx = None;
            }
        }
    }
}

impl Shared {
    fn slot(&self, id: &str) -> Arc<Slot> {
        let mut streams = self.streams.lock().unwrap();
        streams
            .entry(id.to_string())
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(QUEUE_CHUNKS);
                Arc::new(Slot {
                    current: Mutex::new(CancellationToken::new()),
                    state: tokio::sync::Mutex::new(SlotState {
                        tx: Some(tx),
                        offset: 0,
                        hasher: StreamDigest::default(),
                        done: None,
                    }),
                    reader: Mutex::new(Some(rx)),
                })
            })
            .clone()
    }

    fn deliver_pipe(&self, pipe: Pipe) {
        let mut pipes = self.pipes.lock().unwrap();
        let pipe = match pipes.remove(&pipe.id) {
            Some(PipeSlot::Waiting(tx)) => match tx.send(pipe) {
                Ok(()) => return,
                Err(pipe) => pipe,
            },
            _ => pipe,
        };
        pipes.insert(pipe.id.clone(), PipeSlot::Ready(Box::new(pipe)));
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let span = info_span!("transfer_conn", %peer);
        tokio::spawn(
            async move {
                let stop = shared.shutdown.clone();
                tokio::select! {
                    _ = stop.cancelled() => {}
                    r = handle_conn(shared, tcp) => if let Err(e) = r {
                        warn!(error = %e, "direct transfer connection ended with an error");
                    }
                }
            }
            .instrument(span),
        );
    }
}

async fn handle_conn(shared: Arc<Shared>, tcp: TcpStream) -> Result<(), String> {
    tcp.set_nodelay(true).ok();
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, shared.acceptor.accept(tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS handshake refused: {e}"))?;
    let certs = tls.get_ref().1.peer_certificates().map(|c| c.to_vec());
    let mut tls = TlsStream::Server(tls);
    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame_exact(&mut tls))
        .await
        .map_err(|_| "no Hello within the handshake timeout".to_string())?
        .map_err(|e| format!("reading Hello: {e}"))?;
    if let Frame::Hello { id, token, .. } = &hello
        && let Err(why) = shared.authorize(id, token, certs.as_deref())
    {
        let refusal = Frame::Error {
            retryable: false,
            offset: 0,
            message: format!("refused: {why}"),
        };
        let _ = write_frame(&mut tls, &refusal).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
        return Err(format!("refused a sender: {why}"));
    }
    match hello {
        Frame::Hello {
            mode: Mode::Pipe,
            id,
            ..
        } => {
            write_frame(&mut tls, &Frame::HelloAck { resume_offset: 0 })
                .await
                .map_err(|e| e.to_string())?;
            debug!(%id, "pipe connected");
            shared.deliver_pipe(Pipe { id, inner: tls });
            Ok(())
        }
        Frame::Hello {
            mode: Mode::Stream,
            id,
            ..
        } => {
            let slot = shared.slot(&id);
            let token = {
                let mut cur = slot.current.lock().unwrap();
                cur.cancel();
                *cur = CancellationToken::new();
                cur.clone()
            };
            tokio::select! {
                _ = token.cancelled() => Err(format!("stream {id:?}: superseded by a newer connection")),
                r = serve_stream(&slot, &id, tls) => r.map_err(|e| format!("stream {id:?}: {e}")),
            }
        }
        other => Err(format!("expected Hello, got {other:?}")),
    }
}

/// Serves Data/End frames of one connection. Errors are returned after being reported
/// to the sender in an Error frame where possible.
async fn serve_stream(slot: &Slot, id: &str, mut tls: TlsStream<TcpStream>) -> Result<(), String> {
    let mut st = slot.state.lock().await;
    let resume_offset = st.offset;
    write_frame(&mut tls, &Frame::HelloAck { resume_offset })
        .await
        .map_err(|e| e.to_string())?;
    debug!(resume_offset, "stream connected");
    let (rd, mut wr) = tokio::io::split(tls);
    let mut frames = FramedRead::with_capacity(rd, FrameCodec, 2 << 20);
    loop {
        let frame = match frames.next().await {
            None => {
                return Err(format!(
                    "sender closed the connection at byte {}",
                    st.offset
                ));
            }
            Some(Err(e)) => return Err(format!("reading at byte {}: {e}", st.offset)),
            Some(Ok(f)) => f,
        };
        match frame {
            Frame::Data {
                offset,
                raw_len,
                crc32c,
                codec,
                payload,
            } => {
                let end = offset + raw_len as u64;
                if st.done.is_some() || end <= st.offset {
                    // Already delivered (re-sent after a lost acknowledgement).
                    send(&mut wr, Frame::Ack { offset: st.offset }).await?;
                    continue;
                }
                if offset != st.offset {
                    return fail(
                        &mut wr,
                        true,
                        st.offset,
                        format!("chunk at byte {offset}, expected byte {}", st.offset),
                    )
                    .await;
                }
                let actual = crc32c::crc32c(&payload);
                if actual != crc32c {
                    // Not delivered: the sender reconnects and re-sends from st.offset.
                    return fail(&mut wr, true, st.offset, format!("crc32c mismatch in chunk at byte {offset}: got {actual:08x}, frame says {crc32c:08x}")).await;
                }
                let raw = match codec {
                    Codec::None => payload,
                    Codec::Zstd => match zstd::bulk::decompress(&payload, raw_len as usize) {
                        Ok(v) if v.len() == raw_len as usize => Bytes::from(v),
                        Ok(v) => return fail(&mut wr, false, st.offset, format!("chunk at byte {offset} decompressed to {} bytes, expected {raw_len}", v.len())).await,
                        Err(e) => return fail(&mut wr, false, st.offset, format!("chunk at byte {offset} does not decompress: {e}")).await,
                    },
                };
                let Some(tx) = st.tx.as_ref() else {
                    return fail(
                        &mut wr,
                        false,
                        st.offset,
                        "the stream already failed on the receiving side",
                    )
                    .await;
                };
                if tx.send(Msg::Data(raw.clone())).await.is_err() {
                    return fail(
                        &mut wr,
                        false,
                        st.offset,
                        "the receiving application closed the stream",
                    )
                    .await;
                }
                // Not cancellable between the send above and these two lines: no await.
                st.hasher.update(&raw);
                st.offset = end;
                send(&mut wr, Frame::Ack { offset: st.offset }).await?;
            }
            Frame::End {
                total,
                digest: theirs,
            } => {
                if let Some(done) = st.done {
                    if done == theirs && total == st.offset {
                        send(&mut wr, Frame::Done { total }).await?;
                        return Ok(());
                    }
                    return fail(
                        &mut wr,
                        false,
                        st.offset,
                        "End does not match the completed stream",
                    )
                    .await;
                }
                if total != st.offset {
                    let reason = format!(
                        "sender ended at byte {total} but {} bytes arrived",
                        st.offset
                    );
                    poison(&mut st, id, &reason);
                    return fail(&mut wr, false, st.offset, reason).await;
                }
                let digest = st.hasher.finish();
                if digest != theirs {
                    let reason = format!(
                        "stream digest (XXH3-128) mismatch over {total} bytes: received {}, sender has {}",
                        crate::hex(&digest),
                        crate::hex(&theirs)
                    );
                    poison(&mut st, id, &reason);
                    return fail(&mut wr, false, st.offset, reason).await;
                }
                st.done = Some(digest);
                if let Some(tx) = st.tx.take() {
                    // The reader may be gone already; the sender still learns success
                    // only because every byte was queued for it.
                    let _ = tx.send(Msg::End).await;
                }
                send(&mut wr, Frame::Done { total }).await?;
                return Ok(());
            }
            other => {
                return fail(
                    &mut wr,
                    false,
                    st.offset,
                    format!("unexpected frame {other:?}"),
                )
                .await;
            }
        }
    }
}

fn poison(st: &mut SlotState, id: &str, reason: &str) {
    if let Some(tx) = st.tx.take() {
        let _ = tx.try_send(Msg::Err(TransferError::stream(
            Side::Receiver,
            id,
            st.offset,
            reason,
        )));
    }
}

async fn send<W: AsyncWrite + Unpin>(wr: &mut W, f: Frame) -> Result<(), String> {
    write_frame(wr, &f)
        .await
        .map_err(|e| format!("writing {f:?}: {e}"))
}

async fn fail<W: AsyncWrite + Unpin>(
    wr: &mut W,
    retryable: bool,
    offset: u64,
    message: impl Into<String>,
) -> Result<(), String> {
    let message = message.into();
    let _ = write_frame(
        wr,
        &Frame::Error {
            retryable,
            offset,
            message: message.clone(),
        },
    )
    .await;
    Err(message)
}

/// An incoming direct stream; see [`Receiver::accept_stream`].
pub struct IncomingStream {
    id: String,
    rx: Option<mpsc::Receiver<Msg>>,
    current: Bytes,
    offset: u64,
    finished: bool,
}

impl IncomingStream {
    pub fn id(&self) -> &str {
        &self.id
    }
    /// Bytes handed to the reader so far.
    pub fn bytes_read(&self) -> u64 {
        self.offset
    }
}

impl AsyncRead for IncomingStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.current.is_empty() {
                let n = this.current.len().min(buf.remaining());
                buf.put_slice(&this.current.split_to(n));
                this.offset += n as u64;
                return Poll::Ready(Ok(()));
            }
            if this.finished {
                return Poll::Ready(Ok(()));
            }
            let Some(rx) = this.rx.as_mut() else {
                let e = TransferError::stream(
                    Side::Receiver,
                    &this.id,
                    this.offset,
                    "stream was already accepted",
                );
                return Poll::Ready(Err(e.into()));
            };
            match rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Msg::Data(b))) => this.current = b,
                Poll::Ready(Some(Msg::End)) => this.finished = true,
                Poll::Ready(Some(Msg::Err(e))) => return Poll::Ready(Err(e.into())),
                Poll::Ready(None) => {
                    let e = TransferError::stream(
                        Side::Receiver,
                        &this.id,
                        this.offset,
                        "receiver shut down before the stream was complete",
                    );
                    return Poll::Ready(Err(e.into()));
                }
            }
        }
    }
}
