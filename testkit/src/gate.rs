//! A TCP proxy that lets a fixed number of client bytes through and then holds every
//! client, so that a test can act "mid-transfer" at a point the transfer cannot run
//! past however fast the machine is (sampling a fast upload for that moment is a
//! timing window: a 64 MiB upload to a local MinIO can finish between two polls).
//!
//! Only client → upstream bytes count and are held; replies always flow, so requests
//! that got through complete. [`GatedProxy::open`] cuts the held connections and lets
//! everything through from then on.
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct GatedProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

struct Shared {
    limit: u64,
    forwarded: AtomicU64,
    /// False while the limit holds; true once [`GatedProxy::open`] was called.
    open: watch::Sender<bool>,
}

impl GatedProxy {
    /// Listens on a free port of `ip` and forwards to `upstream`, at most `limit` client
    /// bytes in all until [`GatedProxy::open`].
    pub async fn start(ip: IpAddr, upstream: SocketAddr, limit: u64) -> Result<GatedProxy> {
        let listener = TcpListener::bind((ip, 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            limit,
            forwarded: AtomicU64::new(0),
            open: watch::channel(false).0,
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, upstream, s.clone()));
            }
        });
        Ok(GatedProxy { addr, shared, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ip:port`, for an S3 endpoint behind the proxy.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until the limit was reached: from then on clients are held.
    pub async fn held(&self) {
        while self.shared.forwarded.load(Ordering::SeqCst) < self.shared.limit {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Cuts the connections the gate holds and forwards without a limit from now on.
    pub fn open(&self) {
        self.shared.open.send_replace(true);
    }
}

impl Drop for GatedProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.shared.open.send_replace(true);
    }
}

async fn relay(client: TcpStream, upstream: SocketAddr, s: Arc<Shared>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return; // the client sees its connection closed, as with nothing listening
    };
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async {
        let mut open = s.open.subscribe();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = cr.read(&mut buf).await?;
            if n == 0 {
                return sw.shutdown().await;
            }
            if !*open.borrow() {
                // Take this chunk's share of what is left under the limit.
                let before = s.forwarded.fetch_add(n as u64, Ordering::SeqCst);
                let allowed = s.limit.saturating_sub(before).min(n as u64) as usize;
                sw.write_all(&buf[..allowed]).await?;
                if allowed < n {
                    // Held: nothing more from this client until the gate opens, and then
                    // this connection ends mid-request.
                    let _ = open.wait_for(|o| *o).await;
                    return Err(std::io::Error::other("cut by the gate"));
                }
            } else {
                sw.write_all(&buf[..n]).await?;
            }
        }
    };
    let down = tokio::io::copy(&mut sr, &mut cw);
    // Either direction ending (an error, the gate, upstream gone) ends the connection.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}
