//! The receiver runs in a network-namespace "node" whose cable is pulled at about half
//! of the stream and plugged back in a few seconds later: the sender notices the silent
//! link by its io timeout, reconnects, and resumes where the receiver left off.
mod common;

use std::os::fd::AsFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use common::{RandomReader, drain, random_digest};
use ferry_testkit::netns::Lan;
use ferry_transfer::{Endpoint, Receiver, RetryPolicy, SendOptions, Sender, TestPki};
use tokio::io::{AsyncRead, ReadBuf};

/// Calls `f` once `at` bytes have been read through it.
struct Tripwire<R, F: FnOnce()> {
    inner: R,
    read: u64,
    at: u64,
    f: Option<F>,
}

impl<R: AsyncRead + Unpin, F: FnOnce() + Unpin> AsyncRead for Tripwire<R, F> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        if self.read >= self.at
            && let Some(f) = self.f.take()
        {
            f();
        }
        r
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_pulled_mid_stream_resumes() {
    const LEN: u64 = 96 << 20;
    let lan = Lan::create().unwrap();
    let node = lan.add_node("rx").unwrap();
    let pki = TestPki::generate().unwrap();
    let node_ip = node.ip().to_string();
    let identity = pki.issue("node-rx", &[&node_ip]).unwrap();

    // The receiver lives on a thread that joined the node's network namespace, so its
    // listening socket (and everything it accepts) is inside the node.
    let ns_path = format!("/run/netns/{}", node.name());
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let receiver_thread = std::thread::spawn(move || {
        let ns = std::fs::File::open(&ns_path).expect("node namespace");
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let rx = Receiver::bind(format!("{node_ip}:0"), identity)
                .await
                .unwrap();
            rx.grant(
                "mig-11",
                ferry_transfer::Grant {
                    token: "t-11".into(),
                    peer: "node-tx".into(),
                },
            );
            let incoming = rx.accept_stream("mig-11/memory").await;
            addr_tx.send(rx.local_addr()).unwrap();
            tokio::time::timeout(Duration::from_secs(120), drain(incoming)).await
        })
    });
    let addr = addr_rx.recv().unwrap();

    let cut_node = node.clone();
    let reader = Tripwire {
        inner: RandomReader::new(11, LEN),
        read: 0,
        at: LEN / 2,
        f: Some(move || {
            cut_node.set_link(false).unwrap();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(4));
                cut_node.set_link(true).unwrap();
            });
        }),
    };
    let tx = Sender::new(pki.issue("node-tx", &[]).unwrap()).unwrap();
    let opts = SendOptions {
        window: 8 << 20,
        io_timeout: Duration::from_secs(2),
        retry: RetryPolicy {
            max_retries: 8,
            min_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(2),
        },
        ..Default::default()
    };
    let report = tx
        .send_stream(
            &Endpoint::new(addr.to_string(), addr.ip().to_string()).with_token("t-11"),
            "mig-11/memory",
            reader,
            &opts,
        )
        .await
        .unwrap();
    let (n, digest) = tokio::task::spawn_blocking(move || receiver_thread.join().unwrap())
        .await
        .unwrap()
        .expect("receiver finished in time")
        .unwrap();
    assert_eq!((n, digest), (LEN, random_digest(11, LEN)));
    assert!(report.reconnects >= 1, "{report:?}");
    for r in &report.resumes {
        assert!(r.resumed_from >= r.acked_before, "{r:?}");
    }
    assert!(
        report.resent_bytes <= opts.window as u64 * report.reconnects as u64,
        "{report:?}"
    );
    eprintln!("{report:?}");
    drop(lan);
}
