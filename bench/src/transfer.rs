//! Transfer throughput, each case beside its raw baseline on the same bytes in the
//! same run:
//! * direct stream (mTLS, chunks, crc32c, XXH3 digest, acks) vs a raw loopback TCP copy
//!   written in 1 MiB blocks;
//! * direct pipe (mTLS only, 256 KiB writes as the daemons relay QEMU) vs the same raw
//!   TCP copy;
//! * "TLS ceiling": the same mTLS pipe written in 1 MiB blocks (encryption and nothing
//!   else, as the stream writes its chunks) vs the same raw TCP copy, so the stream's
//!   ratio can be read against what TLS alone allows on this machine;
//! * S3 multipart upload vs one plain `put_object` of the same bytes to the same MinIO;
//! * S3 verified parallel download vs one plain `get_object`.
//!
//! Every run alternates baseline and ferry and keeps the best of each, because the
//! machine is shared. MinIO comes from `scripts/build-minio.sh`.
//! * link-bound: the same stream vs a raw TCP copy over a rate-shaped veth (`link.rs`).
//!
//! `FERRY_BENCH_TRANSFER=direct` (or `link`, `s3`) runs only those cases.
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use ferry_testkit::minio::{ACCESS_KEY, MinioServer, SECRET_KEY};
use ferry_transfer::{
    Endpoint, ReceiveOptions, Receiver, RetryPolicy, S3Config, S3Credentials, S3SendOptions,
    S3Store, SendOptions, Sender, TestPki,
};
use rand::{RngCore, SeedableRng};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::Measurement;

const MIB: f64 = (1 << 20) as f64;

pub fn run(quick: bool) -> Result<Vec<Measurement>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(quick))
}

async fn run_async(quick: bool) -> Result<Vec<Measurement>> {
    let runs = if quick { 1 } else { 3 };
    let direct_len: u64 = if quick { 128 << 20 } else { 1 << 30 };
    let s3_len: u64 = if quick { 64 << 20 } else { 512 << 20 };
    // One random block served over and over: the source costs nothing measurable.
    let mut block = vec![0u8; 16 << 20];
    rand::rngs::SmallRng::seed_from_u64(7).fill_bytes(&mut block);
    let block: &'static [u8] = Box::leak(block.into_boxed_slice());

    let only = std::env::var("FERRY_BENCH_TRANSFER").unwrap_or_default();
    let mut out = Vec::new();
    if only.is_empty() || only == "direct" {
        out.extend(direct_cases(block, direct_len, runs).await?);
    }
    if only.is_empty() || only == "link" {
        let link_len: u64 = if quick { 32 << 20 } else { 256 << 20 };
        out.extend(crate::link::link_cases(block, link_len, runs, quick).await?);
    }
    if only.is_empty() || only == "s3" {
        out.extend(s3_cases(block, s3_len, runs).await?);
    }
    Ok(out)
}

/// `len` bytes cycling through `block`.
pub(crate) struct Cycle {
    block: &'static [u8],
    pos: u64,
    len: u64,
}

impl Cycle {
    pub(crate) fn new(block: &'static [u8], len: u64) -> Self {
        Cycle { block, pos: 0, len }
    }
}

impl AsyncRead for Cycle {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let at = (self.pos % self.block.len() as u64) as usize;
        let n = (buf.remaining() as u64)
            .min(self.len - self.pos)
            .min((self.block.len() - at) as u64) as usize;
        buf.put_slice(&self.block[at..at + n]);
        self.pos += n as u64;
        Poll::Ready(Ok(()))
    }
}

pub(crate) async fn discard<R: AsyncRead + Unpin>(mut r: R) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf).await?;
        if k == 0 {
            return Ok(n);
        }
        n += k as u64;
    }
}

pub(crate) fn rate(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB / d.as_secs_f64()
}

pub(crate) fn measurement(
    case: String,
    ferry: f64,
    baseline: f64,
    baseline_name: &str,
    bytes: u64,
    runs: usize,
) -> Measurement {
    let mut details = serde_json::Map::new();
    details.insert("bytes".into(), bytes.into());
    details.insert("runs_best_of".into(), runs.into());
    let m = Measurement {
        case,
        metric: "throughput_mib_s".into(),
        ferry,
        baseline,
        baseline_name: baseline_name.into(),
        details,
    };
    tracing::info!(case = %m.case, ferry = m.ferry, baseline = m.baseline, ratio = m.ratio(), "transfer case");
    m
}

pub(crate) fn size_label(len: u64) -> String {
    if len >= 1 << 30 {
        format!("{}GiB", len >> 30)
    } else {
        format!("{}MiB", len >> 20)
    }
}

/// Copies `src` to `dst` in writes of up to `block` bytes.
pub(crate) async fn copy_in_blocks<R: AsyncRead + Unpin, W: tokio::io::AsyncWrite + Unpin>(
    src: R,
    dst: &mut W,
    block: usize,
) -> std::io::Result<u64> {
    let mut src = tokio::io::BufReader::with_capacity(block, src);
    tokio::io::copy_buf(&mut src, dst).await
}

async fn raw_tcp(block: &'static [u8], len: u64) -> Result<Duration> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let server = tokio::spawn(async move {
        let (s, _) = l.accept().await?;
        discard(s).await
    });
    let started = Instant::now();
    let mut c = TcpStream::connect(addr).await?;
    c.set_nodelay(true)?;
    // 1 MiB writes, like the stream's chunks: tokio::io::copy's 8 KiB writes would make
    // a weaker baseline (more syscalls per byte).
    copy_in_blocks(Cycle::new(block, len), &mut c, 1 << 20).await?;
    c.shutdown().await?;
    let got = server.await??;
    let took = started.elapsed();
    if got != len {
        bail!("raw TCP copy delivered {got} of {len} bytes");
    }
    Ok(took)
}

async fn direct_cases(block: &'static [u8], len: u64, runs: usize) -> Result<Vec<Measurement>> {
    let pki = TestPki::generate()?;
    let rx = Receiver::bind("127.0.0.1:0", pki.issue("bench-rx", &["127.0.0.1"])?).await?;
    let tx = Sender::new(pki.issue("bench-tx", &[])?)?;
    let grant = ferry_transfer::Grant::mint("bench-tx");
    let ep = Endpoint::new(rx.local_addr().to_string(), "bench-rx").with_token(&grant.token);
    rx.grant("bench", grant);
    let (mut raw, mut stream, mut pipe, mut tls) =
        (Duration::MAX, Duration::MAX, Duration::MAX, Duration::MAX);
    // CPU seconds (user + system, whole process: both ends) of each case, best run.
    let (mut raw_cpu, mut stream_cpu, mut pipe_cpu, mut tls_cpu) =
        (f64::MAX, f64::MAX, f64::MAX, f64::MAX);
    for run in 0..runs {
        let cpu = cpu_secs();
        raw = raw.min(raw_tcp(block, len).await?);
        raw_cpu = raw_cpu.min(cpu_secs() - cpu);

        let id = format!("bench/stream-{run}");
        let incoming = rx.accept_stream(&id).await;
        let reader = tokio::spawn(discard(incoming));
        let cpu = cpu_secs();
        let started = Instant::now();
        let report = tx
            .send_stream(&ep, &id, Cycle::new(block, len), &SendOptions::default())
            .await?;
        let got = reader.await??;
        stream = stream.min(started.elapsed());
        stream_cpu = stream_cpu.min(cpu_secs() - cpu);
        rx.forget(&id);
        if got != len || report.bytes != len {
            bail!("direct stream delivered {got} of {len} bytes");
        }

        let id = format!("bench/pipe-{run}");
        let cpu = cpu_secs();
        let reader = {
            let p = rx.accept_pipe(&id);
            let started = Instant::now();
            let mut out = tx.connect_pipe(&ep, &id, &RetryPolicy::default()).await?;
            let mut inp = p.await?;
            let reader = tokio::spawn(async move { discard(&mut inp).await });
            // As the daemon relays QEMU's stream: 256 KiB reads, each written at once.
            copy_in_blocks(Cycle::new(block, len), &mut out, 256 << 10).await?;
            out.shutdown().await?;
            (reader, started)
        };
        let got = reader.0.await??;
        pipe = pipe.min(reader.1.elapsed());
        pipe_cpu = pipe_cpu.min(cpu_secs() - cpu);
        if got != len {
            bail!("pipe delivered {got} of {len} bytes");
        }

        // TLS ceiling: the pipe again, written in the stream's chunk size.
        let id = format!("bench/tls-{run}");
        let p = rx.accept_pipe(&id);
        let cpu = cpu_secs();
        let started = Instant::now();
        let mut out = tx.connect_pipe(&ep, &id, &RetryPolicy::default()).await?;
        let mut inp = p.await?;
        let reader = tokio::spawn(async move { discard(&mut inp).await });
        let chunk = SendOptions::default().chunk_size;
        let mut src = Cycle::new(block, len);
        let mut buf = vec![0u8; chunk];
        loop {
            let n = src.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).await?;
        }
        out.shutdown().await?;
        let got = reader.await??;
        tls = tls.min(started.elapsed());
        tls_cpu = tls_cpu.min(cpu_secs() - cpu);
        if got != len {
            bail!("TLS copy delivered {got} of {len} bytes");
        }
    }
    let label = size_label(len);
    let gib = len as f64 / (1u64 << 30) as f64;
    let with_cpu = |mut m: Measurement, cpu: f64| {
        // Load-independent view for a shared machine: CPU per GiB of both ends.
        m.details.insert("cpu_s_per_gib".into(), (cpu / gib).into());
        m.details
            .insert("baseline_cpu_s_per_gib".into(), (raw_cpu / gib).into());
        eprintln!(
            "{}: {:.2} CPU-s/GiB (raw TCP copy {:.2})",
            m.case,
            cpu / gib,
            raw_cpu / gib
        );
        m
    };
    Ok(vec![
        with_cpu(
            measurement(
                format!("transfer/direct-stream-{label}"),
                rate(len, stream),
                rate(len, raw),
                "raw loopback TCP copy (1 MiB writes)",
                len,
                runs,
            ),
            stream_cpu,
        ),
        with_cpu(
            measurement(
                format!("transfer/direct-pipe-{label}"),
                rate(len, pipe),
                rate(len, raw),
                "raw loopback TCP copy (1 MiB writes)",
                len,
                runs,
            ),
            pipe_cpu,
        ),
        with_cpu(
            measurement(
                format!("transfer/tls-ceiling-{label}"),
                rate(len, tls),
                rate(len, raw),
                "raw loopback TCP copy (TLS alone, 1 MiB writes)",
                len,
                runs,
            ),
            tls_cpu,
        ),
    ])
}

/// User + system CPU time of this process so far, from /proc/self/stat (in clock
/// ticks of 1/100 s, Linux's fixed USER_HZ).
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14, 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum::<u64>() as f64 / 100.0
}

async fn s3_cases(block: &'static [u8], len: u64, runs: usize) -> Result<Vec<Measurement>> {
    let minio = MinioServer::start().context("starting MinIO (run scripts/build-minio.sh)")?;
    minio.create_bucket("bench").await?;
    let store = S3Store::new(&S3Config {
        endpoint: minio.endpoint(),
        region: "us-east-1".into(),
        bucket: "bench".into(),
        prefix: "ferry".into(),
        credentials: S3Credentials {
            access_key: ACCESS_KEY.into(),
            secret_key: SECRET_KEY.into(),
            session_token: None,
        },
        path_style: true,
        request_timeout: Duration::from_secs(300),
    })?;
    let raw_bucket = minio.bucket("bench")?;
    let mut body = Vec::with_capacity(len as usize);
    Cycle::new(block, len).read_to_end(&mut body).await?;
    let (mut raw_put, mut put, mut raw_get, mut get) =
        (Duration::MAX, Duration::MAX, Duration::MAX, Duration::MAX);
    for run in 0..runs {
        let started = Instant::now();
        let r = raw_bucket.put_object(format!("raw/{run}"), &body).await?;
        if r.status_code() != 200 {
            bail!("raw PUT: HTTP {}", r.status_code());
        }
        raw_put = raw_put.min(started.elapsed());

        let id = format!("bench/{run}");
        let report = store
            .send_stream(&id, Cycle::new(block, len), &S3SendOptions::default())
            .await?;
        put = put.min(report.elapsed);

        let started = Instant::now();
        let r = raw_bucket.get_object(format!("raw/{run}")).await?;
        if r.status_code() != 200 || r.as_slice().len() as u64 != len {
            bail!(
                "raw GET: HTTP {}, {} bytes",
                r.status_code(),
                r.as_slice().len()
            );
        }
        raw_get = raw_get.min(started.elapsed());
        drop(r);

        let started = Instant::now();
        let got = discard(
            store
                .receive_stream(&id, &ReceiveOptions::default())
                .await?,
        )
        .await?;
        get = get.min(started.elapsed());
        if got != len {
            bail!("S3 download delivered {got} of {len} bytes");
        }
        store.delete_stream(&id, &RetryPolicy::default()).await?;
        raw_bucket.delete_object(format!("raw/{run}")).await?;
    }
    let label = size_label(len);
    Ok(vec![
        measurement(
            format!("transfer/s3-upload-{label}"),
            rate(len, put),
            rate(len, raw_put),
            "single rust-s3 put_object to the same MinIO",
            len,
            runs,
        ),
        measurement(
            format!("transfer/s3-download-{label}"),
            rate(len, get),
            rate(len, raw_get),
            "single rust-s3 get_object from the same MinIO",
            len,
            runs,
        ),
    ])
}
