//! Shared test helpers: seeded random streams and a TCP proxy that can cut, stall or
//! corrupt connections between a sender and a receiver.
#![allow(dead_code)]
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// `len` bytes from a seeded PRNG (fast enough for 1 GiB in a debug build: the
/// generator runs inside `rand`, built optimized).
pub struct RandomReader {
    rng: rand::rngs::SmallRng,
    left: u64,
    pub hasher: Sha256,
}

impl RandomReader {
    pub fn new(seed: u64, len: u64) -> Self {
        Self {
            rng: rand::rngs::SmallRng::seed_from_u64(seed),
            left: len,
            hasher: Sha256::new(),
        }
    }
}

impl AsyncRead for RandomReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = (buf.remaining() as u64).min(self.left) as usize;
        if n > 0 {
            let dst = buf.initialize_unfilled_to(n);
            self.rng.fill_bytes(dst);
            let this = &mut *self;
            this.hasher.update(&dst[..n]);
            buf.advance(n);
            self.left -= n as u64;
        }
        Poll::Ready(Ok(()))
    }
}

/// The sha256 and length of a seeded random stream.
pub fn random_digest(seed: u64, len: u64) -> [u8; 32] {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        rng.fill_bytes(&mut buf[..n]);
        h.update(&buf[..n]);
        left -= n as u64;
    }
    h.finalize().into()
}

/// The XXH3-128 (big endian) of a seeded random stream, computed here with the xxhash
/// crate directly: what the direct protocol must report.
pub fn random_xxh3(seed: u64, len: u64) -> [u8; 16] {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        rng.fill_bytes(&mut buf[..n]);
        h.update(&buf[..n]);
        left -= n as u64;
    }
    h.digest128().to_be_bytes()
}

/// Reads `r` to the end, returning (length, sha256).
pub async fn drain<R: AsyncRead + Unpin>(mut r: R) -> std::io::Result<(u64, [u8; 32])> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf).await?;
        if k == 0 {
            return Ok((n, h.finalize().into()));
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum CutMode {
    /// Close both sockets (a killed peer).
    Close,
    /// Stop forwarding but keep the sockets open (a pulled cable): only timeouts notice.
    Blackhole,
}

/// A loopback TCP proxy in front of `target`.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    ctl: Arc<Ctl>,
    stop: CancellationToken,
}

struct Ctl {
    target: std::net::SocketAddr,
    /// Client-to-server bytes forwarded over all connections.
    forwarded: AtomicU64,
    cut_at: AtomicU64,
    cut_mode: Mutex<CutMode>,
    flip_at: AtomicU64,
    cuts: AtomicU32,
    flips: AtomicU32,
    cut: Mutex<CancellationToken>,
    graveyard: Mutex<Vec<TcpStream>>,
}

impl Proxy {
    pub async fn start(target: std::net::SocketAddr) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let ctl = Arc::new(Ctl {
            target,
            forwarded: AtomicU64::new(0),
            cut_at: AtomicU64::new(u64::MAX),
            cut_mode: Mutex::new(CutMode::Close),
            flip_at: AtomicU64::new(u64::MAX),
            cuts: AtomicU32::new(0),
            flips: AtomicU32::new(0),
            cut: Mutex::new(CancellationToken::new()),
            graveyard: Mutex::new(Vec::new()),
        });
        let stop = CancellationToken::new();
        let (c, s) = (ctl.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    _ = s.cancelled() => return,
                    c = l.accept() => c,
                };
                let Ok((client, _)) = conn else { continue };
                tokio::spawn(serve(c.clone(), client));
            }
        });
        Proxy { addr, ctl, stop }
    }

    /// Cut every connection once `at` client-to-server bytes have been forwarded.
    pub fn cut_at(&self, at: u64, mode: CutMode) {
        *self.ctl.cut_mode.lock().unwrap() = mode;
        self.ctl.cut_at.store(at, Ordering::SeqCst);
    }

    /// Flip one bit of the client-to-server byte number `at` (counted over all
    /// connections), once.
    pub fn flip_at(&self, at: u64) {
        self.ctl.flip_at.store(at, Ordering::SeqCst);
    }

    pub fn cuts(&self) -> u32 {
        self.ctl.cuts.load(Ordering::SeqCst)
    }
    pub fn flips(&self) -> u32 {
        self.ctl.flips.load(Ordering::SeqCst)
    }
    pub fn forwarded(&self) -> u64 {
        self.ctl.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.ctl.cut.lock().unwrap().cancel();
    }
}

async fn serve(ctl: Arc<Ctl>, client: TcpStream) {
    let Ok(server) = TcpStream::connect(ctl.target).await else {
        return;
    };
    let token = ctl.cut.lock().unwrap().clone();
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let c2s = {
        let ctl = ctl.clone();
        let (cr, sw) = (&mut cr, &mut sw);
        async move {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match cr.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let start = ctl.forwarded.fetch_add(n as u64, Ordering::SeqCst);
                let end = start + n as u64;
                let flip = ctl.flip_at.load(Ordering::SeqCst);
                if flip >= start && flip < end {
                    ctl.flip_at.store(u64::MAX, Ordering::SeqCst);
                    ctl.flips.fetch_add(1, Ordering::SeqCst);
                    buf[(flip - start) as usize] ^= 0x10;
                }
                let cut = ctl.cut_at.load(Ordering::SeqCst);
                if cut < end {
                    ctl.cut_at.store(u64::MAX, Ordering::SeqCst);
                    ctl.cuts.fetch_add(1, Ordering::SeqCst);
                    let mut t = ctl.cut.lock().unwrap();
                    t.cancel();
                    *t = CancellationToken::new();
                    return;
                }
                if sw.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    let s2c = async {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
    };
    tokio::select! {
        _ = c2s => {}
        _ = s2c => {}
        _ = token.cancelled() => {}
    }
    let mode = *ctl.cut_mode.lock().unwrap();
    if mode == CutMode::Blackhole && token.is_cancelled() {
        // Keep the sockets open without forwarding: the peers see a silent link.
        let mut g = ctl.graveyard.lock().unwrap();
        g.push(cr.reunite(cw).unwrap());
        g.push(sr.reunite(sw).unwrap());
    }
}
