//! Direct backend over real loopback sockets and real mutual TLS.
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{CutMode, Proxy, RandomReader, drain, random_digest, random_xxh3};
use ferry_transfer::{
    Endpoint, Grant, Receiver, RetryPolicy, SendOptions, Sender, Side, TestPki, TlsIdentity,
    TransferError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Pair {
    pki: TestPki,
    rx: Receiver,
    tx: Sender,
}

async fn pair() -> Pair {
    let pki = TestPki::generate().unwrap();
    let rx = Receiver::bind("127.0.0.1:0", pki.issue("node-b", &["127.0.0.1"]).unwrap())
        .await
        .unwrap();
    let tx = Sender::new(pki.issue("node-a", &[]).unwrap()).unwrap();
    open(&rx);
    Pair { pki, rx, tx }
}

/// The token the tests' migrations were granted.
const TOKEN: &str = "test-token-0123456789";

/// Grants the scopes these tests use (`mig-0` … `mig-19`) to node-a with [`TOKEN`].
fn open(rx: &Receiver) {
    for i in 0..20 {
        rx.grant(
            &format!("mig-{i}"),
            Grant {
                token: TOKEN.into(),
                peer: "node-a".into(),
            },
        );
    }
}

fn ep(addr: std::net::SocketAddr) -> Endpoint {
    Endpoint::new(addr.to_string(), "node-b").with_token(TOKEN)
}

fn quick_retry() -> RetryPolicy {
    RetryPolicy {
        max_retries: 3,
        min_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(200),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_random_stream_arrives_bit_identical() {
    const LEN: u64 = 1 << 30;
    let p = pair().await;
    let incoming = p.rx.accept_stream("mig-1/memory").await;
    let reader = tokio::spawn(drain(incoming));
    let started = Instant::now();
    let report =
        p.tx.send_stream(
            &ep(p.rx.local_addr()),
            "mig-1/memory",
            RandomReader::new(1, LEN),
            &SendOptions::default(),
        )
        .await
        .unwrap();
    let (n, digest) = reader.await.unwrap().unwrap();
    eprintln!("1 GiB direct (debug build): {:?}", started.elapsed());
    assert_eq!(n, LEN);
    assert_eq!(digest, random_digest(1, LEN));
    // The protocol's own digest (XXH3-128) agrees with an independent one over the source.
    assert_eq!(report.digest, random_xxh3(1, LEN));
    assert_eq!(report.bytes, LEN);
    assert_eq!(report.resent_bytes, 0);
    assert_eq!(report.reconnects, 0);
}

/// The connection is cut (closed, as when the receiving peer's process or proxy dies)
/// at about half of the stream; the sender reconnects and resumes where the receiver
/// left off, re-sending only what was in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connection_resumes_without_resending_acknowledged_bytes() {
    cut_and_resume(CutMode::Close).await;
}

/// As above, but the "cable is pulled": the connection goes silent without closing,
/// and only the sender's io timeout notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_link_loss_resumes_after_timeout() {
    cut_and_resume(CutMode::Blackhole).await;
}

async fn cut_and_resume(mode: CutMode) {
    const LEN: u64 = 64 << 20;
    let p = pair().await;
    let proxy = Proxy::start(p.rx.local_addr()).await;
    proxy.cut_at(LEN / 2, mode);
    let incoming = p.rx.accept_stream("mig-2/rootfs").await;
    let reader = tokio::spawn(drain(incoming));
    let opts = SendOptions {
        window: 8 << 20,
        io_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let report =
        p.tx.send_stream(
            &ep(proxy.addr),
            "mig-2/rootfs",
            RandomReader::new(2, LEN),
            &opts,
        )
        .await
        .unwrap();
    let (n, digest) = reader.await.unwrap().unwrap();
    assert_eq!(proxy.cuts(), 1);
    assert_eq!((n, digest), (LEN, random_digest(2, LEN)));
    assert_eq!(report.reconnects, 1, "{report:?}");
    let r = report.resumes[0];
    // Resumed at or after everything that had been acknowledged, and near the cut.
    assert!(r.resumed_from >= r.acked_before, "{r:?}");
    assert!(
        r.resumed_from > LEN / 4 && r.resumed_from <= LEN / 2 + (1 << 20),
        "{r:?}"
    );
    // Only unacknowledged bytes (at most one window) went twice.
    assert!(report.resent_bytes <= opts.window as u64, "{report:?}");
    assert_eq!(report.data_bytes_sent, LEN + report.resent_bytes);
    assert_eq!(report.data_bytes_sent - report.resent_bytes, LEN);
}

/// One flipped byte on the wire: TLS rejects the record, the connection drops, the
/// sender resumes and the receiver still gets exactly the original bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_byte_is_detected_and_resent() {
    const LEN: u64 = 16 << 20;
    let p = pair().await;
    let proxy = Proxy::start(p.rx.local_addr()).await;
    proxy.flip_at(10 << 20);
    let incoming = p.rx.accept_stream("mig-3/pages").await;
    let reader = tokio::spawn(drain(incoming));
    let report =
        p.tx.send_stream(
            &ep(proxy.addr),
            "mig-3/pages",
            RandomReader::new(3, LEN),
            &SendOptions::default(),
        )
        .await
        .unwrap();
    let (n, digest) = reader.await.unwrap().unwrap();
    assert_eq!(proxy.flips(), 1);
    assert_eq!((n, digest), (LEN, random_digest(3, LEN)));
    assert!(
        report.reconnects >= 1,
        "corruption went unnoticed: {report:?}"
    );
}

/// The receiving application goes away mid-stream: the sender fails, naming the
/// receiver side and the byte offset, instead of reporting success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_closing_mid_stream_fails_loudly() {
    const LEN: u64 = 64 << 20;
    let p = pair().await;
    let mut incoming = p.rx.accept_stream("mig-4/x").await;
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < (8 << 20) {
            got += incoming.read(&mut buf).await.unwrap();
        }
        drop(incoming);
        got
    });
    let err =
        p.tx.send_stream(
            &ep(p.rx.local_addr()),
            "mig-4/x",
            RandomReader::new(4, LEN),
            &SendOptions::default(),
        )
        .await
        .unwrap_err();
    let got = reader.await.unwrap();
    eprintln!("{err}");
    assert_eq!(err.side(), Some(Side::Receiver));
    let off = err.offset().unwrap();
    assert!(off >= got as u64 && off < LEN, "offset {off}");
    assert!(err.to_string().contains("closed the stream"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_compresses_on_the_wire_and_writer_api_works() {
    let p = pair().await;
    let incoming = p.rx.accept_stream("mig-5/log").await;
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        let mut incoming = incoming;
        incoming.read_to_end(&mut out).await.map(|_| out)
    });
    let opts = SendOptions {
        zstd_level: Some(3),
        ..Default::default()
    };
    let mut w =
        p.tx.stream_writer(&ep(p.rx.local_addr()), "mig-5/log", &opts);
    let mut expected = Vec::new();
    for i in 0..200_000u32 {
        let line = format!("line {i}: the same words again and again\n");
        expected.extend_from_slice(line.as_bytes());
        w.write_all(line.as_bytes()).await.unwrap();
    }
    let report = w.finish().await.unwrap();
    let got = reader.await.unwrap().unwrap();
    assert_eq!(got, expected);
    assert_eq!(report.bytes, expected.len() as u64);
    assert!(report.wire_bytes_sent * 4 < report.bytes, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_limit_paces_the_sender() {
    const LEN: u64 = 6 << 20;
    let p = pair().await;
    let reader = tokio::spawn(drain(p.rx.accept_stream("mig-6/x").await));
    let opts = SendOptions {
        pacer: ferry_transfer::Pacer::new(12 << 20),
        chunk_size: 256 << 10,
        ..Default::default()
    };
    let started = Instant::now();
    p.tx.send_stream(
        &ep(p.rx.local_addr()),
        "mig-6/x",
        RandomReader::new(6, LEN),
        &opts,
    )
    .await
    .unwrap();
    let took = started.elapsed();
    assert_eq!(reader.await.unwrap().unwrap().0, LEN);
    // 6 MiB at 12 MiB/s cannot take less than ~0.5 s (a lower bound, not a benchmark).
    assert!(took >= Duration::from_millis(450), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipe_carries_bytes_both_ways() {
    let p = Arc::new(pair().await);
    let p2 = p.clone();
    let server = tokio::spawn(async move {
        let mut pipe = p2.rx.accept_pipe("mig-7/qemu").await.unwrap();
        let mut buf = vec![0u8; 5];
        pipe.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"QEVM\x01");
        pipe.write_all(b"ok").await.unwrap();
        pipe.flush().await.unwrap();
        // Then a bulk transfer to end-of-stream.
        let (n, d) = drain(&mut pipe).await.unwrap();
        (n, d)
    });
    let mut pipe =
        p.tx.connect_pipe(&ep(p.rx.local_addr()), "mig-7/qemu", &quick_retry())
            .await
            .unwrap();
    pipe.write_all(b"QEVM\x01").await.unwrap();
    pipe.flush().await.unwrap();
    let mut ok = [0u8; 2];
    pipe.read_exact(&mut ok).await.unwrap();
    assert_eq!(&ok, b"ok");
    tokio::io::copy(&mut RandomReader::new(7, 8 << 20), &mut pipe)
        .await
        .unwrap();
    pipe.shutdown().await.unwrap();
    let (n, d) = server.await.unwrap();
    assert_eq!((n, d), (8 << 20, random_digest(7, 8 << 20)));
}

async fn expect_refused(tx: &Sender, endpoint: &Endpoint) -> TransferError {
    let opts = SendOptions {
        retry: quick_retry(),
        ..Default::default()
    };
    let err = tx
        .send_stream(endpoint, "mig-8/x", RandomReader::new(8, 1 << 20), &opts)
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert_eq!(err.side(), Some(Side::Sender));
    let pipe = tx
        .connect_pipe(endpoint, "mig-8/pipe", &quick_retry())
        .await;
    assert!(pipe.is_err());
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_from_another_ca_is_refused() {
    let p = pair().await;
    // Trusts our CA (so it accepts the receiver) but its own cert is from another CA.
    let (cert, key) = TestPki::generate()
        .unwrap()
        .issue_pem("node-a", &[])
        .unwrap();
    let id =
        TlsIdentity::from_pem(cert.as_bytes(), key.as_bytes(), p.pki.ca_pem().as_bytes()).unwrap();
    let stranger = Sender::new(id).unwrap();
    let err = expect_refused(&stranger, &ep(p.rx.local_addr())).await;
    // Refused by the receiver: it sent the alert (both test CAs share a subject name,
    // so the receiver finds the signature wrong and answers DecryptError).
    assert!(err.to_string().contains("received fatal alert"), "{err}");
    // Nothing reached the stream.
    let mut incoming = p.rx.accept_stream("mig-8/x").await;
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_millis(300), incoming.read(&mut b)).await;
    assert!(r.is_err(), "stranger's bytes were delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_certificate_from_another_ca_is_refused() {
    let p = pair().await;
    let fake = Receiver::bind(
        "127.0.0.1:0",
        TestPki::generate()
            .unwrap()
            .issue("node-b", &["127.0.0.1"])
            .unwrap(),
    )
    .await
    .unwrap();
    expect_refused(&p.tx, &ep(fake.local_addr())).await;
    // And a right-CA certificate for another name is refused too.
    let other = Receiver::bind("127.0.0.1:0", p.pki.issue("node-c", &[]).unwrap())
        .await
        .unwrap();
    expect_refused(&p.tx, &ep(other.local_addr())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_certificate_is_refused() {
    use ferry_transfer::frame::{Frame, Mode};
    use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
    let p = pair().await;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(p.pki.ca_pem().as_bytes()).unwrap())
        .unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(p.rx.local_addr())
        .await
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    // TLS 1.3: the client may finish its half of the handshake; the server's refusal
    // arrives as an alert on the first read.
    let result: std::io::Result<Vec<u8>> = async {
        let mut tls = connector
            .connect(ServerName::try_from("node-b").unwrap(), tcp)
            .await?;
        let mut hello = bytes::BytesMut::new();
        Frame::Hello {
            mode: Mode::Stream,
            id: "mig-9/x".into(),
            token: TOKEN.into(),
        }
        .encode(&mut hello);
        tls.write_all(&hello).await?;
        tls.flush().await?;
        let mut out = Vec::new();
        tls.read_to_end(&mut out).await?;
        Ok(out)
    }
    .await;
    match result {
        Err(e) => eprintln!("refused: {e}"),
        Ok(bytes) => assert!(
            bytes.is_empty(),
            "server answered an unauthenticated client: {bytes:?}"
        ),
    }
}

/// The receiving daemon dies mid-stream (its resume state with it) and a new one comes
/// up on the same address: the old reader gets an error, and the sender refuses to
/// continue into a receiver that lost acknowledged bytes, naming the offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_receiver_that_lost_state_fails_loudly() {
    const LEN: u64 = 256 << 20;
    let pki = TestPki::generate().unwrap();
    let rx = Receiver::bind("127.0.0.1:0", pki.issue("node-b", &["127.0.0.1"]).unwrap())
        .await
        .unwrap();
    let addr = rx.local_addr();
    let tx = Sender::new(pki.issue("node-a", &[]).unwrap()).unwrap();
    open(&rx);
    let mut incoming = rx.accept_stream("mig-10/x").await;
    let opts = SendOptions {
        window: 4 << 20,
        retry: quick_retry(),
        ..Default::default()
    };
    let send = tokio::spawn(async move {
        tx.send_stream(&ep(addr), "mig-10/x", RandomReader::new(10, LEN), &opts)
            .await
    });
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    while got < (32 << 20) {
        got += incoming.read(&mut buf).await.unwrap() as u64;
    }
    drop(rx); // the "process" dies
    let old_reader_result = drain(incoming).await;
    assert!(
        old_reader_result.is_err(),
        "a dead receiver's stream ended cleanly"
    );
    // A fresh receiver on the same port (bind may need a moment after the abort).
    let mut rx2 = None;
    for _ in 0..50 {
        match Receiver::bind(addr, pki.issue("node-b", &["127.0.0.1"]).unwrap()).await {
            Ok(r) => {
                // Granted again (as a restarted daemon's PrepareReceiver would): the
                // refusal must come from the lost offsets, not from a missing grant.
                open(&r);
                rx2 = Some(r);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let _rx2 = rx2.expect("rebinding the receiver port");
    let err = send.await.unwrap().unwrap_err();
    eprintln!("{err}");
    assert_eq!(err.side(), Some(Side::Receiver));
    assert!(err.to_string().contains("lost state"), "{err}");
}

/// A certificate of the right CA is not enough: a sender needs its migration's grant
/// (scope, token and its own certificate name). Each refusal is immediate (not retried)
/// and names the reason, and none of the refused bytes reach a reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_granted_peer_with_the_token_may_send() {
    let p = pair().await;
    let addr = p.rx.local_addr();
    let mut incoming = p.rx.accept_stream("mig-12/x").await;
    let quick = SendOptions {
        retry: quick_retry(),
        ..Default::default()
    };
    let refused = |e: TransferError, why: &str| {
        let text = e.to_string();
        assert!(text.contains(why), "expected {why:?} in: {text}");
    };
    // Wrong token, from the granted peer.
    let started = Instant::now();
    let e =
        p.tx.send_stream(
            &Endpoint::new(addr.to_string(), "node-b").with_token("guess"),
            "mig-12/x",
            &b"forged"[..],
            &quick,
        )
        .await
        .unwrap_err();
    refused(e, "wrong token");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a refusal was retried"
    );
    // The right token from another node of the same CA (as a peer that read the token
    // from a leaked log or another migration's request would hold it).
    let stranger = Sender::new(p.pki.issue("node-c", &[]).unwrap()).unwrap();
    let e = stranger
        .send_stream(&ep(addr), "mig-12/x", &b"forged"[..], &quick)
        .await
        .unwrap_err();
    refused(e, "does not name it");
    let e = stranger
        .connect_pipe(&ep(addr), "mig-12/pages", &quick_retry())
        .await
        .unwrap_err();
    refused(e, "does not name it");
    // A scope nobody granted, and one revoked.
    let e =
        p.tx.send_stream(&ep(addr), "mig-99/x", &b"forged"[..], &quick)
            .await
            .unwrap_err();
    refused(e, "no migration on this node expects");
    p.rx.revoke("mig-13");
    let e =
        p.tx.connect_pipe(&ep(addr), "mig-13/pages", &quick_retry())
            .await
            .unwrap_err();
    refused(e, "no migration on this node expects");
    // Nothing of the refused senders reached the reader; the granted one still can.
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_millis(300), incoming.read(&mut b)).await;
    assert!(r.is_err(), "a refused sender's bytes were delivered");
    let granted = ep(addr);
    let send =
        p.tx.send_stream(&granted, "mig-12/x", &b"granted"[..], &quick);
    let (sent, got) = tokio::join!(send, async {
        let mut out = Vec::new();
        incoming.read_to_end(&mut out).await.map(|_| out)
    });
    sent.unwrap();
    assert_eq!(got.unwrap(), b"granted");
}

/// Two pipes of one migration carried with `carry`, as the daemons relay CRIU's and
/// QEMU's sockets: each end's local side is one half of an in-memory duplex.
async fn carried_pipe(
    p: &Arc<Pair>,
    id: &str,
    client: ferry_transfer::Shaping,
    server: ferry_transfer::Shaping,
) -> (
    tokio::io::DuplexStream,
    tokio::io::DuplexStream,
    tokio::task::JoinHandle<std::io::Result<ferry_transfer::Carried>>,
    tokio::task::JoinHandle<std::io::Result<ferry_transfer::Carried>>,
) {
    let (p2, id2) = (p.clone(), id.to_string());
    let (server_app, server_local) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(async move {
        let pipe = p2.rx.accept_pipe(&id2).await.unwrap();
        ferry_transfer::carry(server_local, pipe, &server).await
    });
    let pipe =
        p.tx.connect_pipe(&ep(p.rx.local_addr()), id, &quick_retry())
            .await
            .unwrap();
    let (client_app, client_local) = tokio::io::duplex(1 << 20);
    let client =
        tokio::spawn(async move { ferry_transfer::carry(client_local, pipe, &client).await });
    (client_app, server_app, client, server)
}

/// A callback for `Shaping::on_sent`/`on_received` that adds up what it is told.
fn meter() -> (
    Arc<std::sync::Mutex<ferry_transfer::Moved>>,
    ferry_transfer::OnSent,
) {
    let total = Arc::new(std::sync::Mutex::new(ferry_transfer::Moved::default()));
    let t = total.clone();
    let f = ferry_transfer::OnSent(Arc::new(move |m| {
        let mut c = t.lock().unwrap();
        c.raw += m.raw;
        c.wire += m.wire;
    }));
    (total, f)
}

/// Compression on a request/response pipe (CRIU's lazy pages, QEMU's post-copy): a
/// small request gets through at once, 4 MiB of compressible reply arrives complete
/// while the pipe stays open (nothing is held back for a better ratio), and far fewer
/// bytes crossed the wire than were carried. The sending side's `on_sent` and the
/// receiving side's `on_received` count the reply while the pipe is still open
/// (progress for pages nobody announced; what has arrived of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carry_compresses_a_pipe_without_holding_bytes_back() {
    let p = Arc::new(pair().await);
    let zstd = ferry_transfer::Shaping {
        zstd_level: Some(3),
        ..Default::default()
    };
    let (counted, on_sent) = meter();
    let server_shaping = ferry_transfer::Shaping {
        on_sent: Some(on_sent),
        ..zstd.clone()
    };
    let (arrived, on_received) = meter();
    let client_shaping = ferry_transfer::Shaping {
        on_received: Some(on_received),
        ..zstd
    };
    let (mut client, mut server, c, s) =
        carried_pipe(&p, "mig-8/lazy", client_shaping, server_shaping).await;
    let reply = b"page page page page ".repeat(200 << 10);
    let exchange = async {
        client.write_all(b"give me pages\n").await?;
        let mut req = [0u8; 14];
        server.read_exact(&mut req).await?;
        assert_eq!(&req, b"give me pages\n");
        let (mut sr, mut sw) = tokio::io::split(&mut server);
        let mut got = vec![0u8; reply.len()];
        let (w, r) = tokio::join!(sw.write_all(&reply), client.read_exact(&mut got));
        w?;
        r?;
        assert!(got == reply, "the reply arrived changed");
        // Counted before the pipe ends (the count follows the write it reports).
        while counted.lock().unwrap().raw < reply.len() as u64 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Counted as it was handed on, before the pipe ends.
        while arrived.lock().unwrap().raw < reply.len() as u64 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut none = [0u8; 1];
        // The client ends its side; the server reads the end, then ends its own.
        client.shutdown().await?;
        assert_eq!(sr.read(&mut none).await?, 0);
        sw.shutdown().await?;
        assert_eq!(client.read(&mut none).await?, 0);
        std::io::Result::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(60), exchange)
        .await
        .expect("a compressed pipe held bytes back (the exchange stalled)")
        .unwrap();
    let (c, s) = (c.await.unwrap().unwrap(), s.await.unwrap().unwrap());
    assert_eq!(s.sent, reply.len() as u64);
    assert_eq!(c.received, reply.len() as u64);
    assert_eq!(s.sent_wire, c.received_wire);
    assert!(s.sent_wire * 20 < s.sent, "{s:?}");
    assert_eq!((c.sent, s.received), (14, 14));
    let counted = *counted.lock().unwrap();
    assert_eq!((counted.raw, counted.wire), (s.sent, s.sent_wire));
    let arrived = *arrived.lock().unwrap();
    assert_eq!((arrived.raw, arrived.wire), (c.received, c.received_wire));
}

/// One pacer shared by two pipes caps them together: 2 × 1.5 MiB of random bytes at
/// 6 MiB/s cannot take less than ~0.5 s (a lower bound, not a benchmark).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pacer_caps_a_migrations_pipes_together() {
    const LEN: u64 = 3 << 19;
    let p = Arc::new(pair().await);
    let paced = ferry_transfer::Shaping {
        pacer: ferry_transfer::Pacer::new(6 << 20),
        ..Default::default()
    };
    let started = Instant::now();
    let mut runs = Vec::new();
    for (seed, id) in [(9, "mig-9/pages/a"), (10, "mig-9/pages/b")] {
        let (mut client, server, c, s) =
            carried_pipe(&p, id, paced.clone(), Default::default()).await;
        runs.push(tokio::spawn(async move {
            let reader = tokio::spawn(drain(server));
            tokio::io::copy(&mut RandomReader::new(seed, LEN), &mut client).await?;
            client.shutdown().await?;
            let got = reader.await.unwrap()?;
            assert_eq!(got, (LEN, random_digest(seed, LEN)));
            let (c, s) = (c.await.unwrap()?, s.await.unwrap()?);
            assert_eq!((c.sent_wire, s.received), (LEN, LEN));
            std::io::Result::Ok(())
        }));
    }
    for r in runs {
        r.await.unwrap().unwrap();
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(450), "took {took:?}");
}
