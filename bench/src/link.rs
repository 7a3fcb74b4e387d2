//! Link-bound transfer cases: the receiver runs on a network-namespace node whose veth
//! is shaped to a fixed rate (tc tbf), so the raw TCP copy and ferry's direct stream
//! are limited by the link, as between two hosts, rather than by memcpy on a shared
//! loopback. The ratio then shows what the protocol itself costs (chunking, the
//! acknowledgement window, TLS record overhead); the loopback cases in `transfer.rs`
//! show the CPU cost. Both ends still share this machine's cores, so at high rates the
//! stream turns CPU-bound again: each rate is reported, not just a flattering one.
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use ferry_testkit::netns::Lan;
use ferry_transfer::{Endpoint, Receiver, SendOptions, Sender, TestPki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::Measurement;
use crate::transfer::{Cycle, copy_in_blocks, discard, measurement, rate, size_label};

/// Link rates in Mbit/s: 1 GbE, 2.5 GbE, 10 GbE.
const RATES: [u32; 3] = [1_000, 2_500, 10_000];

fn stream_id(rate: u32, run: usize) -> String {
    format!("bench/link-{rate}-{run}")
}

pub async fn link_cases(
    block: &'static [u8],
    len: u64,
    runs: usize,
    quick: bool,
) -> Result<Vec<Measurement>> {
    let rates: &[u32] = if quick { &RATES[..1] } else { &RATES };
    let lan = Lan::create()?;
    let node = lan.add_node("bench-rx")?;
    let pki = TestPki::generate()?;
    let node_ip = node.ip().to_string();
    let identity = pki.issue("bench-rx", &[&node_ip])?;
    let grant = ferry_transfer::Grant::mint("bench-tx");
    let token = grant.token.clone();
    let ids: Vec<String> = rates
        .iter()
        .flat_map(|r| (0..runs).map(move |run| stream_id(*r, run)))
        .collect();

    // The receiving "host": a thread inside the node's namespace with its own runtime.
    let ns_path = format!("/run/netns/{}", node.name());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let receiver = std::thread::spawn(move || -> Result<()> {
        let ns = std::fs::File::open(&ns_path).context("node namespace")?;
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let rx = Receiver::bind(format!("{node_ip}:0"), identity).await?;
            rx.grant("bench", grant);
            for id in &ids {
                tokio::spawn(discard(rx.accept_stream(id).await));
            }
            let raw = TcpListener::bind(format!("{node_ip}:0")).await?;
            ready_tx.send((rx.local_addr(), raw.local_addr()?))?;
            let serve_raw = async {
                loop {
                    let (mut s, _) = raw.accept().await?;
                    tokio::spawn(async move {
                        let n = discard(&mut s).await?;
                        s.write_all(&n.to_be_bytes()).await?;
                        s.shutdown().await
                    });
                }
                #[allow(unreachable_code)]
                anyhow::Ok(())
            };
            tokio::select! {
                r = serve_raw => r,
                _ = stop_rx => Ok(()),
            }
        })
    });
    let (ferry_addr, raw_addr) = ready_rx
        .recv_timeout(Duration::from_secs(30))
        .context("receiver thread did not start")?;

    let tx = Sender::new(pki.issue("bench-tx", &[])?)?;
    let ep = Endpoint::new(ferry_addr.to_string(), ferry_addr.ip().to_string()).with_token(token);
    let mut out = Vec::new();
    for &mbit in rates {
        node.shape_ingress(mbit)?;
        let (mut raw, mut stream) = (Duration::MAX, Duration::MAX);
        for run in 0..runs {
            raw = raw.min(raw_copy(raw_addr, block, len).await?);
            let started = Instant::now();
            let report = tx
                .send_stream(
                    &ep,
                    &stream_id(mbit, run),
                    Cycle::new(block, len),
                    &SendOptions::default(),
                )
                .await?;
            stream = stream.min(started.elapsed());
            if report.bytes != len {
                bail!(
                    "stream over the {mbit} Mbit/s link delivered {} of {len} bytes",
                    report.bytes
                );
            }
        }
        let mut m = measurement(
            format!("transfer/link-{mbit}mbit-stream-{}", size_label(len)),
            rate(len, stream),
            rate(len, raw),
            &format!("raw TCP copy over the same {mbit} Mbit/s veth"),
            len,
            runs,
        );
        m.details.insert("link_mbit".into(), mbit.into());
        out.push(m);
    }
    let _ = stop_tx.send(());
    receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver thread panicked"))??;
    Ok(out)
}

/// Copies `len` bytes in 1 MiB writes and waits for the receiver's byte count, so the
/// time covers delivery, not just the sender's buffers.
async fn raw_copy(addr: std::net::SocketAddr, block: &'static [u8], len: u64) -> Result<Duration> {
    let started = Instant::now();
    let mut c = TcpStream::connect(addr).await?;
    c.set_nodelay(true)?;
    copy_in_blocks(Cycle::new(block, len), &mut c, 1 << 20).await?;
    c.shutdown().await?;
    let got = c.read_u64().await?;
    let took = started.elapsed();
    if got != len {
        bail!("raw TCP copy over the link delivered {got} of {len} bytes");
    }
    Ok(took)
}
