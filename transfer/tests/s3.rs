//! S3 backend against a real MinIO (built by scripts/build-minio.sh).
mod common;

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use common::{RandomReader, drain, random_digest};
use ferry_testkit::minio::{ACCESS_KEY, MinioServer, SECRET_KEY};
use ferry_transfer::{
    ReceiveOptions, RetryPolicy, S3Config, S3Credentials, S3SendOptions, S3Store, Side,
    TransferError,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::sync::oneshot;

const BUCKET: &str = "ferry-test";

async fn minio() -> (MinioServer, S3Store) {
    let m = MinioServer::start().expect("MinIO (run scripts/build-minio.sh)");
    m.create_bucket(BUCKET).await.unwrap();
    let store = S3Store::new(&S3Config {
        endpoint: m.endpoint(),
        region: "us-east-1".into(),
        bucket: BUCKET.into(),
        prefix: "ferry".into(),
        credentials: S3Credentials {
            access_key: ACCESS_KEY.into(),
            secret_key: SECRET_KEY.into(),
            session_token: None,
        },
        path_style: true,
        request_timeout: Duration::from_secs(30),
    })
    .unwrap();
    (m, store)
}

fn quick_retry() -> RetryPolicy {
    RetryPolicy {
        max_retries: 3,
        min_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(400),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_random_stream_round_trips_through_minio_and_is_deleted() {
    const LEN: u64 = 1 << 30;
    let (m, store) = minio().await;
    let started = Instant::now();
    let report = store
        .send_stream(
            "mig-1/memory",
            RandomReader::new(11, LEN),
            &S3SendOptions::default(),
        )
        .await
        .unwrap();
    let up = started.elapsed();
    assert_eq!(report.bytes, LEN);
    assert_eq!(report.bytes_uploaded, LEN);
    assert_eq!(report.parts, 64);
    let started = Instant::now();
    let incoming = store
        .receive_stream("mig-1/memory", &ReceiveOptions::default())
        .await
        .unwrap();
    assert_eq!(incoming.size(), LEN);
    let (n, digest) = drain(incoming).await.unwrap();
    eprintln!(
        "1 GiB via MinIO (debug build): upload {up:?}, download {:?}",
        started.elapsed()
    );
    assert_eq!((n, digest), (LEN, random_digest(11, LEN)));

    // Cleanup after a successful migration removes every object of the migration.
    let deleted = store.delete_prefix("mig-1/", &quick_retry()).await.unwrap();
    assert_eq!(deleted, 3, "upload marker, manifest, data");
    let listed = m
        .bucket(BUCKET)
        .unwrap()
        .list("ferry/".into(), None)
        .await
        .unwrap();
    assert!(
        listed.iter().all(|p| p.contents.is_empty()),
        "objects left after cleanup"
    );
    let gone = store
        .receive_stream(
            "mig-1/memory",
            &ReceiveOptions {
                retry: quick_retry(),
                ..Default::default()
            },
        )
        .await;
    assert!(gone.is_err());
}

/// A source that fails on its first read.
struct Failing;

impl AsyncRead for Failing {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Ready(Err(std::io::Error::other("the source broke")))
    }
}

/// Fires `tx` once `at` bytes have been read through it.
struct Tripwire<R> {
    inner: R,
    read: u64,
    at: u64,
    tx: Option<oneshot::Sender<()>>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Tripwire<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        if self.read >= self.at
            && let Some(tx) = self.tx.take()
        {
            let _ = tx.send(());
        }
        r
    }
}

/// MinIO dies mid-upload: the upload retries, then fails with a clear error and a
/// checkpoint; nothing counts as uploaded. After MinIO is back the upload resumes from
/// the checkpoint without re-uploading completed parts (encrypted, as ferry uploads:
/// the checkpoint carries the upload's salt, so the resumed parts share its key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minio_stopped_mid_upload_fails_clearly_then_resumes() {
    const LEN: u64 = 128 << 20;
    const PART: usize = 8 << 20;
    let (mut m, store) = minio().await;
    let opts = S3SendOptions {
        part_size: PART,
        parallel: 4,
        retry: quick_retry(),
        seal_key: None,
        encryption_key: Some(b"resume secret".to_vec()),
    };
    let (tx, rx) = oneshot::channel();
    let reader = Tripwire {
        inner: RandomReader::new(12, LEN),
        read: 0,
        at: 96 << 20,
        tx: Some(tx),
    };
    let upload = store.send_stream("mig-2/rootfs", reader, &opts);
    let killer = async {
        rx.await.unwrap();
        m.kill();
    };
    let (result, ()) = tokio::join!(upload, killer);
    let err = result.unwrap_err();
    eprintln!("upload error: {err}");
    let TransferError::S3 {
        side, ref reason, ..
    } = err
    else {
        panic!("not an S3 error: {err}")
    };
    assert_eq!(side, Side::Receiver);
    assert!(reason.contains("uploading part"), "{reason}");
    let cp = err.checkpoint().expect("a resumable checkpoint").clone();
    // With 4 parts in flight, reading byte 96 MiB means parts up to 64 MiB completed.
    assert!(cp.offset >= 64 << 20 && cp.offset < LEN, "{cp:?}");
    assert_eq!(cp.offset, cp.parts.len() as u64 * PART as u64);

    m.restart().unwrap();
    // The store still holds the unfinished upload (no object listing shows it).
    let unfinished = store
        .unfinished_uploads("mig-2/", &quick_retry())
        .await
        .unwrap();
    assert_eq!(unfinished, [(cp.key.clone(), cp.upload_id.clone())]);
    // Not complete: a reader must not find a stream.
    let early = store
        .receive_stream(
            "mig-2/rootfs",
            &ReceiveOptions {
                retry: quick_retry(),
                ..Default::default()
            },
        )
        .await;
    assert!(early.is_err(), "an interrupted upload was readable");

    let mut reader = RandomReader::new(12, LEN);
    tokio::io::copy(&mut (&mut reader).take(cp.offset), &mut tokio::io::sink())
        .await
        .unwrap();
    let report = store
        .resume_stream(cp.clone(), reader, &opts)
        .await
        .unwrap();
    assert_eq!(report.bytes, LEN);
    assert_eq!(report.bytes_uploaded, LEN - cp.offset);
    let (n, digest) = drain(
        store
            .receive_stream(
                "mig-2/rootfs",
                &ReceiveOptions {
                    encryption_key: Some(b"resume secret".to_vec()),
                    ..Default::default()
                },
            )
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!((n, digest), (LEN, random_digest(12, LEN)));

    // Removing the migration's objects also aborts an upload nobody finished: one whose
    // source failed after its first part.
    let failing = RandomReader::new(15, 6 << 20).chain(Failing);
    let orphan = store
        .send_stream(
            "mig-2/orphan",
            failing,
            &S3SendOptions {
                part_size: 5 << 20,
                ..opts
            },
        )
        .await;
    assert!(orphan.is_err(), "a failing source uploaded a stream");
    let deleted = store.delete_prefix("mig-2/", &quick_retry()).await.unwrap();
    // rootfs: marker, manifest, data; orphan: marker and its unfinished upload.
    assert_eq!(deleted, 5);
    let unfinished = store
        .unfinished_uploads("mig-2/", &quick_retry())
        .await
        .unwrap();
    assert!(unfinished.is_empty(), "{unfinished:?}");
}

/// Bytes changed in the bucket after upload are caught on download: the reader gets an
/// error naming the part, never a clean end-of-stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_object_fails_download() {
    const LEN: u64 = 12 << 20;
    let (m, store) = minio().await;
    let opts = S3SendOptions {
        part_size: 5 << 20,
        ..Default::default()
    };
    store
        .send_stream("mig-3/x", RandomReader::new(13, LEN), &opts)
        .await
        .unwrap();
    // Overwrite the data object with same-length bytes that differ in one place.
    let bucket = m.bucket(BUCKET).unwrap();
    let mut data = bucket
        .get_object("ferry/mig-3/x/data")
        .await
        .unwrap()
        .to_vec();
    assert_eq!(data.len() as u64, LEN);
    data[7 << 20] ^= 1;
    bucket
        .put_object("ferry/mig-3/x/data", &data)
        .await
        .unwrap();

    let incoming = store
        .receive_stream(
            "mig-3/x",
            &ReceiveOptions {
                retry: quick_retry(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let err = drain(incoming).await.unwrap_err();
    eprintln!("download error: {err}");
    let msg = err.to_string();
    assert!(msg.contains("part 2 sha256"), "{msg}");
    assert!(msg.contains("at byte 5242880"), "{msg}");
}

/// A sealed stream (ferry seals with the migration's token) reads back with the key;
/// is refused before any byte with another key or when the manifest lost its seal;
/// `has_stream` tells a finished stream from one not there yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_stream_reads_only_with_its_key() {
    const LEN: u64 = 6 << 20;
    let (m, store) = minio().await;
    assert!(!store.has_stream("mig-4/x").await.unwrap());
    let key = b"the migration's token".to_vec();
    let opts = S3SendOptions {
        part_size: 5 << 20,
        seal_key: Some(key.clone()),
        ..Default::default()
    };
    store
        .send_stream("mig-4/x", RandomReader::new(14, LEN), &opts)
        .await
        .unwrap();
    assert!(store.has_stream("mig-4/x").await.unwrap());
    let with = |k: &[u8]| ReceiveOptions {
        retry: quick_retry(),
        seal_key: Some(k.to_vec()),
        ..Default::default()
    };
    let got = drain(store.receive_stream("mig-4/x", &with(&key)).await.unwrap())
        .await
        .unwrap();
    assert_eq!(got, (LEN, random_digest(14, LEN)));

    let refused = |r: Result<ferry_transfer::IncomingObject, TransferError>| {
        let e = r.err().expect("must be refused").to_string();
        assert!(e.contains("not sealed with this migration's key"), "{e}");
    };
    refused(store.receive_stream("mig-4/x", &with(b"another key")).await);
    // Someone with write access to the bucket rewrites the manifest without the seal.
    let bucket = m.bucket(BUCKET).unwrap();
    let manifest = bucket
        .get_object("ferry/mig-4/x/manifest.json")
        .await
        .unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(manifest.as_slice()).unwrap();
    v.as_object_mut().unwrap().remove("seal");
    bucket
        .put_object(
            "ferry/mig-4/x/manifest.json",
            &serde_json::to_vec(&v).unwrap(),
        )
        .await
        .unwrap();
    refused(store.receive_stream("mig-4/x", &with(&key)).await);
}

/// `check_access` passes with the right credentials and bucket and fails, with the
/// store's answer, with wrong credentials or a missing bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_access_tells_wrong_credentials_and_missing_buckets() {
    let (m, store) = minio().await;
    store.check_access().await.unwrap();
    let cfg = |bucket: &str, secret: &str| S3Config {
        endpoint: m.endpoint(),
        region: "us-east-1".into(),
        bucket: bucket.into(),
        prefix: "ferry".into(),
        credentials: S3Credentials {
            access_key: ACCESS_KEY.into(),
            secret_key: secret.into(),
            session_token: None,
        },
        path_style: true,
        request_timeout: Duration::from_secs(30),
    };
    let e = S3Store::new(&cfg(BUCKET, "wrong-secret"))
        .unwrap()
        .check_access()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("403"), "{e}");
    let e = S3Store::new(&cfg("no-such-bucket", SECRET_KEY))
        .unwrap()
        .check_access()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("404") || e.contains("NoSuchBucket"), "{e}");
}

/// Encrypted at rest: what the bucket holds is not the stream (a plaintext marker
/// repeated through it appears nowhere in the stored object), the stream reads back
/// only with its secret, and a reader without one, or with another, gets no byte of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_stream_is_unreadable_in_the_bucket_without_its_key() {
    const MARKER: &[u8] = b"ferry plaintext marker ";
    let plain: Vec<u8> = MARKER.iter().copied().cycle().take(7 << 20).collect();
    let (m, store) = minio().await;
    let secret = b"the migration's token".to_vec();
    let opts = S3SendOptions {
        part_size: 5 << 20,
        seal_key: Some(secret.clone()),
        encryption_key: Some(secret.clone()),
        ..Default::default()
    };
    store
        .send_stream("mig-5/x", &plain[..], &opts)
        .await
        .unwrap();
    let stored = m
        .bucket(BUCKET)
        .unwrap()
        .get_object("ferry/mig-5/x/data")
        .await
        .unwrap()
        .to_vec();
    // Two parts, each with its 16-byte tag.
    assert_eq!(stored.len(), plain.len() + 2 * 16);
    assert!(
        !stored.windows(MARKER.len()).any(|w| w == MARKER),
        "the bucket holds plaintext"
    );
    let with = |k: Option<&[u8]>| ReceiveOptions {
        retry: quick_retry(),
        seal_key: Some(secret.clone()),
        encryption_key: k.map(<[u8]>::to_vec),
        ..Default::default()
    };
    let mut got = Vec::new();
    store
        .receive_stream("mig-5/x", &with(Some(&secret)))
        .await
        .unwrap()
        .read_to_end(&mut got)
        .await
        .unwrap();
    assert!(got == plain, "decrypted stream differs");

    let e = store
        .receive_stream("mig-5/x", &with(None))
        .await
        .err()
        .expect("an encrypted stream read without a key")
        .to_string();
    assert!(e.contains("encrypted at rest and no key"), "{e}");
    // Another secret (the seal is checked with the right one): no byte comes out.
    let mut r = store
        .receive_stream("mig-5/x", &with(Some(b"another secret")))
        .await
        .unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let e = r
        .read(&mut buf)
        .await
        .expect_err("read with another key")
        .to_string();
    assert!(e.contains("does not decrypt with this key"), "{e}");
}

/// A streamed upload is read while it is being uploaded: with the source holding back
/// after 12 MiB (three 4 MiB parts), the receiver gets those 12 MiB before the upload can
/// finish, then the rest, bit-identical, and end-of-stream once the sealed manifest
/// lists the parts it read. A multipart reader refuses the layout; a part changed in
/// the bucket does not decrypt; a reader with another seal key finds no upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_stream_is_read_while_it_uploads() {
    const LEN: usize = 20 << 20;
    const HELD: usize = 12 << 20;
    let (m, store) = minio().await;
    let mut data = vec![0u8; LEN];
    RandomReader::new(16, LEN as u64)
        .read_exact(&mut data)
        .await
        .unwrap();
    let secret = b"the migration's token".to_vec();
    let opts = S3SendOptions {
        part_size: 4 << 20,
        seal_key: Some(secret.clone()),
        encryption_key: Some(secret.clone()),
        ..Default::default()
    };
    let with = |seal: &[u8]| ReceiveOptions {
        retry: quick_retry(),
        seal_key: Some(seal.to_vec()),
        encryption_key: Some(secret.clone()),
        ..Default::default()
    };
    let (mut source, upload_reads) = tokio::io::duplex(1 << 20);
    let upload = store.send_streamed("mig-6/x", upload_reads, &opts);
    let follow = async {
        let mut incoming = store
            .receive_streamed("mig-6/x", &with(&secret))
            .await
            .unwrap();
        source.write_all(&data[..HELD]).await.unwrap();
        let mut got = vec![0u8; HELD];
        tokio::time::timeout(Duration::from_secs(60), incoming.read_exact(&mut got))
            .await
            .expect("the first 12 MiB did not arrive while the upload was held back")
            .unwrap();
        assert!(got[..] == data[..HELD], "the first parts arrived changed");
        source.write_all(&data[HELD..]).await.unwrap();
        drop(source);
        let mut rest = Vec::new();
        incoming.read_to_end(&mut rest).await.unwrap();
        assert!(rest[..] == data[HELD..], "the rest arrived changed");
    };
    let (report, ()) = tokio::join!(upload, follow);
    let report = report.unwrap();
    assert_eq!((report.bytes, report.parts), (LEN as u64, 5));

    let e = store
        .receive_stream("mig-6/x", &with(&secret))
        .await
        .err()
        .expect("a multipart reader read a streamed layout")
        .to_string();
    assert!(e.contains("receive_streamed"), "{e}");
    // Another seal key: no marker verifies, so nothing is handed out.
    let another = with(b"another key");
    let other = store.receive_streamed("mig-6/x", &another);
    assert!(
        tokio::time::timeout(Duration::from_secs(2), other)
            .await
            .is_err(),
        "a reader with another key found an upload"
    );
    // Part 2 replaced in the bucket: the reader fails there, never ends cleanly.
    let bucket = m.bucket(BUCKET).unwrap();
    bucket
        .put_object("ferry/mig-6/x/part-000002", &vec![7u8; (4 << 20) + 16])
        .await
        .unwrap();
    let mut r = store
        .receive_streamed("mig-6/x", &with(&secret))
        .await
        .unwrap();
    let mut sink = Vec::new();
    let e = r.read_to_end(&mut sink).await.unwrap_err().to_string();
    assert!(e.contains("does not decrypt"), "{e}");
    assert_eq!(sink.len(), 4 << 20, "only part 1 is handed out");
}
