//! What a migration's transfer settings do to its bytes on the wire: a bandwidth cap
//! shared by every stream and pipe of the migration ([`Pacer`]), and zstd compression
//! of raw pipes ([`carry`]), which otherwise pass CRIU's and QEMU's bytes as they are.
//!
//! Pipes carry request/response protocols (CRIU's lazy pages, QEMU's post-copy page
//! requests), so compression must not hold bytes back: each chunk read from one side is
//! compressed and *flushed* (a zstd block boundary) before the next read. zstd keeps its
//! window across flushes, so bulk data still compresses as one stream.
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use zstd::stream::raw::{Decoder, Encoder, InBuffer, Operation, OutBuffer};

use super::pipe::Pipe;

/// A cap on bytes per second, shared by everything that sends for one migration: N
/// streams in parallel get N shares of one budget, not N budgets. Strict (no credit
/// saved while idle): a chunk waits until the previous chunks' time has passed.
#[derive(Debug)]
pub struct Pacer {
    bytes_per_sec: u64,
    next_free: Mutex<Option<Instant>>,
}

impl Pacer {
    /// `None` for 0 (unlimited).
    pub fn new(bytes_per_sec: u64) -> Option<Arc<Pacer>> {
        (bytes_per_sec > 0).then(|| {
            Arc::new(Pacer {
                bytes_per_sec,
                next_free: Mutex::new(None),
            })
        })
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec
    }

    /// Waits until `n` more bytes may go out.
    pub async fn pace(&self, n: u64) {
        let start = {
            let mut next = self.next_free.lock().unwrap();
            let now = Instant::now();
            let start = next.map_or(now, |t| t.max(now));
            *next = Some(start + Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64));
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

/// How one migration's pipes treat their bytes. Both ends of a pipe must agree on
/// `compress` (each learns it from the controller's TransferSpec).
#[derive(Debug, Clone, Default)]
pub struct Shaping {
    /// zstd level for what this side writes into pipes (the peer decompresses); `None`
    /// sends bytes as they are.
    pub zstd_level: Option<i32>,
    /// Caps what this side writes into the network.
    pub pacer: Option<Arc<Pacer>>,
    /// Told of each chunk this side writes into a pipe, as it goes: progress for
    /// streams whose length nobody knows beforehand (CRIU's pages).
    pub on_sent: Option<OnSent>,
    /// Told of each chunk this side takes out of a pipe (`raw` as handed on, `wire` as
    /// it arrived): what has arrived of a stream whose length nobody announced.
    pub on_received: Option<OnSent>,
}

/// A callback for [`Shaping::on_sent`] and [`Shaping::on_received`]: the chunk's bytes
/// as the local side sees them and as on the wire.
#[derive(Clone)]
pub struct OnSent(pub Arc<dyn Fn(Moved) + Send + Sync>);

impl std::fmt::Debug for OnSent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnSent")
    }
}

/// Bytes [`carry`] moved, each way: as the local side saw them and on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carried {
    pub sent: u64,
    pub sent_wire: u64,
    pub received: u64,
    pub received_wire: u64,
}

/// Reads per chunk: the streams are hundreds of MiB and every write is a TLS record.
const CHUNK: usize = 256 << 10;
/// A peer's zstd frames may not ask for more than 8 MiB of window (the encoder's
/// levels used here need far less): a decoder's memory is bounded by what we allow.
const WINDOW_LOG_MAX: u32 = 23;

/// Relays `local` and `pipe` both ways until both directions end, like
/// `tokio::io::copy_bidirectional`, compressing and pacing what goes into the pipe and
/// decompressing what comes out of it as `shaping` says. Each direction ends with a
/// shutdown of its writer; a compressed direction that ends mid-frame is an error.
pub async fn carry<L>(local: L, pipe: Pipe, shaping: &Shaping) -> io::Result<Carried>
where
    L: AsyncRead + AsyncWrite + Send + Unpin,
{
    let (local_r, local_w) = tokio::io::split(local);
    let (pipe_r, pipe_w) = tokio::io::split(pipe);
    let (sent, received) = tokio::try_join!(
        into_pipe(local_r, pipe_w, shaping),
        out_of_pipe(pipe_r, local_w, shaping),
    )?;
    Ok(Carried {
        sent: sent.raw,
        sent_wire: sent.wire,
        received: received.raw,
        received_wire: received.wire,
    })
}

/// One direction's bytes: as the local side saw them, and on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    pub raw: u64,
    pub wire: u64,
}

/// One direction of [`carry`], local → pipe, for callers that end the two directions
/// apart: compresses and paces as `shaping` says, then shuts `to` down at `from`'s end.
pub async fn into_pipe(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    shaping: &Shaping,
) -> io::Result<Moved> {
    let mut enc = shaping.zstd_level.map(Encoder::new).transpose()?;
    let mut buf = vec![0u8; CHUNK];
    let mut packed = Vec::with_capacity(CHUNK);
    let (mut raw, mut wire) = (0u64, 0u64);
    loop {
        let n = from.read(&mut buf).await?;
        packed.clear();
        let out: &[u8] = match enc.as_mut() {
            Some(e) if n == 0 => {
                finish(e, &mut packed)?;
                &packed
            }
            Some(e) => {
                compress(e, &buf[..n], &mut packed)?;
                &packed
            }
            None => &buf[..n],
        };
        if !out.is_empty() {
            if let Some(p) = &shaping.pacer {
                p.pace(out.len() as u64).await;
            }
            to.write_all(out).await?;
            to.flush().await?;
        }
        if let Some(OnSent(f)) = &shaping.on_sent
            && (n > 0 || !out.is_empty())
        {
            f(Moved {
                raw: n as u64,
                wire: out.len() as u64,
            });
        }
        raw += n as u64;
        wire += out.len() as u64;
        if n == 0 {
            to.shutdown().await?;
            return Ok(Moved { raw, wire });
        }
    }
}

/// The other direction of [`carry`], pipe → local: decompresses when `shaping` says the
/// peer compresses, then shuts `to` down at `from`'s end.
pub async fn out_of_pipe(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    shaping: &Shaping,
) -> io::Result<Moved> {
    let mut dec = if shaping.zstd_level.is_some() {
        let mut d = Decoder::new()?;
        d.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(WINDOW_LOG_MAX))?;
        Some(d)
    } else {
        None
    };
    // Nothing received yet counts as a complete (empty) stream.
    let mut frame_open = false;
    let mut buf = vec![0u8; CHUNK];
    let mut unpacked = Vec::with_capacity(CHUNK);
    let (mut raw, mut wire) = (0u64, 0u64);
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            if frame_open {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer's compressed stream ended mid-frame",
                ));
            }
            to.shutdown().await?;
            return Ok(Moved { raw, wire });
        }
        wire += n as u64;
        let out: &[u8] = match dec.as_mut() {
            Some(d) => {
                unpacked.clear();
                frame_open = decompress(d, &buf[..n], &mut unpacked)?;
                &unpacked
            }
            None => &buf[..n],
        };
        to.write_all(out).await?;
        to.flush().await?;
        raw += out.len() as u64;
        if let Some(OnSent(f)) = &shaping.on_received {
            f(Moved {
                raw: out.len() as u64,
                wire: n as u64,
            });
        }
    }
}

/// Appends `input` compressed and flushed (decodable in full on its own arrival).
fn compress(e: &mut Encoder<'_>, input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    let mut tmp = vec![0u8; zstd::zstd_safe::CCtx::out_size()];
    let mut inb = InBuffer::around(input);
    while inb.pos() < input.len() {
        let mut o = OutBuffer::around(&mut tmp[..]);
        e.run(&mut inb, &mut o)?;
        let n = o.pos();
        out.extend_from_slice(&tmp[..n]);
    }
    loop {
        let mut o = OutBuffer::around(&mut tmp[..]);
        let left = e.flush(&mut o)?;
        let n = o.pos();
        out.extend_from_slice(&tmp[..n]);
        if left == 0 {
            return Ok(());
        }
    }
}

/// Appends the end of the zstd frame.
fn finish(e: &mut Encoder<'_>, out: &mut Vec<u8>) -> io::Result<()> {
    let mut tmp = vec![0u8; zstd::zstd_safe::CCtx::out_size()];
    loop {
        let mut o = OutBuffer::around(&mut tmp[..]);
        let left = e.finish(&mut o, true)?;
        let n = o.pos();
        out.extend_from_slice(&tmp[..n]);
        if left == 0 {
            return Ok(());
        }
    }
}

/// Appends everything `input` decodes to; true while a frame is still open.
fn decompress(d: &mut Decoder<'_>, input: &[u8], out: &mut Vec<u8>) -> io::Result<bool> {
    let mut tmp = vec![0u8; zstd::zstd_safe::DCtx::out_size()];
    let mut inb = InBuffer::around(input);
    loop {
        let mut o = OutBuffer::around(&mut tmp[..]);
        let hint = d.run(&mut inb, &mut o)?;
        let n = o.pos();
        out.extend_from_slice(&tmp[..n]);
        // Done when the input is used up and the decoder had no more to give (a full
        // output buffer may mean more is waiting inside it).
        if inb.pos() == input.len() && n < tmp.len() {
            return Ok(hint != 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushed_chunks_decode_on_arrival_and_the_end_closes_the_frame() {
        let mut e = Encoder::new(3).unwrap();
        let mut d = Decoder::new().unwrap();
        let text = b"ferry ferry ferry ferry ".repeat(1000);
        for part in text.chunks(7000) {
            let mut wire = Vec::new();
            compress(&mut e, part, &mut wire).unwrap();
            let mut got = Vec::new();
            // Each flushed chunk decodes completely by itself: nothing is held back.
            let open = decompress(&mut d, &wire, &mut got).unwrap();
            assert_eq!(got, part);
            assert!(open, "the frame stays open until finish");
        }
        let mut end = Vec::new();
        finish(&mut e, &mut end).unwrap();
        let mut got = Vec::new();
        assert!(!decompress(&mut d, &end, &mut got).unwrap());
        assert!(got.is_empty());
    }

    #[test]
    fn garbage_is_an_error_not_output() {
        let mut d = Decoder::new().unwrap();
        let mut got = Vec::new();
        assert!(decompress(&mut d, b"not zstd at all", &mut got).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_shared_pacer_spreads_all_senders_over_one_budget() {
        let p = Pacer::new(1 << 20).unwrap();
        let t0 = Instant::now();
        // Two senders, 1 MiB each in 256 KiB chunks, on one 1 MiB/s budget: the last
        // chunk may start only once 1.75 MiB went before it.
        let send = |p: Arc<Pacer>| async move {
            for _ in 0..4 {
                p.pace(256 << 10).await;
            }
        };
        tokio::join!(send(p.clone()), send(p.clone()));
        assert_eq!(t0.elapsed(), Duration::from_millis(1750));
        assert!(Pacer::new(0).is_none());
    }
}
