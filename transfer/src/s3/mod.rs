//! The object-store backend: S3 (or MinIO) multipart uploads through `rust-s3`.
//!
//! Layout for stream `id` under the configured prefix: `<prefix>/<id>/data` (the bytes,
//! uploaded in parts) and `<prefix>/<id>/manifest.json` (size, part size, each part's
//! sha256, and the stream digest), written only after the multipart upload completed:
//! a reader that finds no manifest finds no stream, so a half-uploaded stream is never
//! taken for a whole one. An empty `<prefix>/<id>/upload` marker, written before the
//! upload starts, lets [`S3Store::unfinished_uploads`] find an upload nobody finished.
//!
//! The stream digest is the sha256 of the concatenated per-part sha256s (not of the
//! bytes themselves) so that an upload resumed in another process, which never saw
//! the earlier parts' bytes, can still produce it.
//!
//! With an encryption key the parts are stored encrypted ([`at_rest`]): the part hashes
//! and lengths in the manifest are those of the stored (encrypted) bytes, the manifest's
//! size that of the stream.
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use backon::Retryable;
use bytes::Bytes;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use s3::Bucket;
use s3::creds::Credentials;
use s3::region::Region;
use s3::serde_types::Part;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;
use tracing::{Instrument, info_span, warn};

use crate::{RetryPolicy, Side, TransferError, hex};

mod at_rest;
mod streamed;
pub use at_rest::Encryption;
use at_rest::{PartKey, TAG_LEN};

/// Access to a bucket. In a cluster the controller fills it from a Secret.
#[derive(Clone, Serialize, Deserialize)]
pub struct S3Credentials {
    pub access_key: String,
    pub secret_key: String,
    #[serde(default)]
    pub session_token: Option<String>,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never log secrets.
        f.debug_struct("S3Credentials")
            .field("access_key", &self.access_key)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct S3Config {
    /// e.g. `http://127.0.0.1:9000` or `https://s3.eu-west-1.amazonaws.com`.
    pub endpoint: String,
    /// e.g. `us-east-1` (MinIO accepts any).
    pub region: String,
    pub bucket: String,
    /// Key prefix for all streams, e.g. `ferry`; may be empty.
    pub prefix: String,
    pub credentials: S3Credentials,
    /// Path-style URLs (`endpoint/bucket/key`), needed for MinIO and most non-AWS stores.
    pub path_style: bool,
    /// Per-request timeout.
    pub request_timeout: Duration,
}

impl S3Config {
    /// The config for `bucket` at `endpoint` as a Migration names them: no endpoint is
    /// AWS S3 in `region` (default `us-east-1`), virtual-host style there and path
    /// style elsewhere (MinIO and most other stores need it). Err: what is wrong, for a
    /// message naming the field.
    pub fn locate(
        endpoint: &str,
        region: &str,
        bucket: &str,
        prefix: &str,
        credentials: S3Credentials,
    ) -> Result<S3Config, String> {
        let region = if region.is_empty() {
            "us-east-1"
        } else {
            region
        };
        let aws = format!("https://s3.{region}.amazonaws.com");
        let endpoint = match endpoint.trim_end_matches('/') {
            "" => aws.as_str(),
            e => e,
        };
        let host = match endpoint.split_once("://") {
            Some(("http" | "https", rest)) if !rest.is_empty() => rest,
            _ => return Err(format!("endpoint {endpoint:?} is not an http(s) URL")),
        };
        if bucket.is_empty() || bucket.len() > 63 {
            return Err(format!("bucket name {bucket:?} is not 1-63 characters"));
        }
        if credentials.access_key.is_empty() || credentials.secret_key.is_empty() {
            return Err("the credentials Secret gave no access key".into());
        }
        let host = host.split(['/', ':']).next().unwrap_or("");
        Ok(S3Config {
            endpoint: endpoint.to_string(),
            region: region.to_string(),
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            credentials,
            path_style: !host.ends_with(".amazonaws.com"),
            request_timeout: Duration::from_secs(30),
        })
    }
}

#[derive(Debug, Clone)]
pub struct S3SendOptions {
    /// Bytes per multipart part; S3 requires at least 5 MiB (except the last part).
    pub part_size: usize,
    /// Parts uploaded at the same time (memory use is about `part_size * parallel`).
    pub parallel: usize,
    /// Per-request retries.
    pub retry: RetryPolicy,
    /// Seals the manifest with this key (see [`ReceiveOptions::seal_key`]).
    pub seal_key: Option<Vec<u8>>,
    /// Encrypts every part with a key derived from this secret (see [`at_rest`]); the
    /// receiver needs the same secret.
    pub encryption_key: Option<Vec<u8>>,
}

impl Default for S3SendOptions {
    fn default() -> Self {
        Self {
            part_size: 16 << 20,
            parallel: 4,
            retry: RetryPolicy::default(),
            seal_key: None,
            encryption_key: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// Parts downloaded at the same time (ranged GETs, delivered in order).
    pub parallel: usize,
    pub retry: RetryPolicy,
    /// A key only sender and receiver hold (ferry: the migration's token): the manifest
    /// must carry a seal made with it, checked before any byte is handed out. Without
    /// one, whoever may write the bucket may write the stream; with one, changing any
    /// byte, part hash or size fails the seal or the part's hash.
    pub seal_key: Option<Vec<u8>>,
    /// The secret the sender encrypted with. With one, a stream stored unencrypted is
    /// refused (it was not written by a sender holding the secret); without one, an
    /// encrypted stream is refused (its bytes would be noise).
    pub encryption_key: Option<Vec<u8>>,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        Self {
            parallel: 4,
            retry: RetryPolicy::default(),
            seal_key: None,
            encryption_key: None,
        }
    }
}

/// A completed part of an upload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DonePart {
    pub number: u32,
    pub etag: String,
    /// Stored bytes (with encryption: the part's bytes and its tag).
    pub len: u64,
    /// Hex sha256 of the part's stored bytes.
    pub sha256: String,
}

/// The resumable state of a multipart upload: the parts that completed, in order from
/// the first, and the stream offset after them. Serializable so a daemon can keep it
/// (e.g. in the Migration status) and resume after its own restart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UploadCheckpoint {
    pub id: String,
    pub key: String,
    pub upload_id: String,
    pub part_size: usize,
    pub parts: Vec<DonePart>,
    /// Stream bytes covered by `parts`: resume by passing a reader positioned here.
    pub offset: u64,
    /// How the parts are encrypted, when they are (the key is not here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    size: u64,
    part_size: usize,
    parts: Vec<DonePart>,
    /// sha256 over the concatenated per-part sha256s (raw bytes), hex.
    digest: String,
    /// HMAC-SHA256 of size, part size and digest under the sender's seal key, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    encryption: Option<Encryption>,
    /// [`LAYOUT_PARTS`] for a stream of one object per part (`streamed.rs`); absent for
    /// a multipart upload's `data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    layout: Option<String>,
}

const LAYOUT_PARTS: &str = "parts";

fn seal_mac(key: &[u8], size: u64, part_size: usize, digest: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(format!("ferry-s3-seal v1 {size} {part_size} {digest}").as_bytes());
    mac
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    s.len()
        .is_multiple_of(2)
        .then(|| {
            (0..s.len() / 2)
                .map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
                .collect()
        })
        .flatten()
}

#[derive(Debug, Clone, Default)]
pub struct S3SendReport {
    pub key: String,
    /// Stream length.
    pub bytes: u64,
    /// Bytes uploaded by this call (less than `bytes` after a resume).
    pub bytes_uploaded: u64,
    pub parts: usize,
    /// Hex stream digest as in the manifest.
    pub digest: String,
    pub elapsed: Duration,
}

/// A bucket (and key prefix) holding migration streams.
pub struct S3Store {
    bucket: Box<Bucket>,
    prefix: String,
}

fn s3_err(
    side: Side,
    op: &'static str,
    key: &str,
    offset: u64,
    reason: impl std::fmt::Display,
) -> TransferError {
    TransferError::S3 {
        side,
        op,
        key: key.to_string(),
        offset,
        reason: reason.to_string(),
        checkpoint: None,
    }
}

fn ok_status(code: u16, body: &[u8]) -> Result<(), String> {
    if (200..300).contains(&code) {
        Ok(())
    } else {
        Err(format!(
            "HTTP {code}: {}",
            String::from_utf8_lossy(&body[..body.len().min(512)])
        ))
    }
}

impl S3Store {
    pub fn new(cfg: &S3Config) -> Result<S3Store, TransferError> {
        let c = &cfg.credentials;
        let creds = Credentials::new(
            Some(&c.access_key),
            Some(&c.secret_key),
            None,
            c.session_token.as_deref(),
            None,
        )
        .map_err(|e| TransferError::Invalid(format!("S3 credentials: {e}")))?;
        let region = Region::Custom {
            region: cfg.region.clone(),
            endpoint: cfg.endpoint.clone(),
        };
        let mut bucket = Bucket::new(&cfg.bucket, region, creds)
            .map_err(|e| TransferError::Invalid(format!("S3 bucket {:?}: {e}", cfg.bucket)))?;
        if cfg.path_style {
            bucket = bucket.with_path_style();
        }
        bucket = bucket
            .with_request_timeout(cfg.request_timeout)
            .map_err(|e| TransferError::Invalid(format!("S3 request timeout: {e}")))?;
        // rust-s3's own retries (a process-wide setting) would multiply with ours and
        // hide the attempt count from our logs: backon decides.
        s3::set_retries(0);
        Ok(S3Store {
            bucket,
            prefix: cfg.prefix.trim_matches('/').to_string(),
        })
    }

    fn base(&self, id: &str) -> String {
        if self.prefix.is_empty() {
            id.to_string()
        } else {
            format!("{}/{id}", self.prefix)
        }
    }
    fn data_key(&self, id: &str) -> String {
        format!("{}/data", self.base(id))
    }
    fn manifest_key(&self, id: &str) -> String {
        format!("{}/manifest.json", self.base(id))
    }
    /// Written before a multipart upload starts: unfinished uploads are found through
    /// it, since not every store lists them by prefix (MinIO lists only by exact key).
    fn marker_key(&self, id: &str) -> String {
        format!("{}/upload", self.base(id))
    }

    /// Uploads everything `reader` yields as stream `id` (replacing an earlier one).
    /// On failure the error's [`TransferError::checkpoint`] can be passed to
    /// [`S3Store::resume_stream`].
    pub async fn send_stream<R: AsyncRead + Unpin>(
        &self,
        id: &str,
        reader: R,
        opts: &S3SendOptions,
    ) -> Result<S3SendReport, TransferError> {
        crate::frame::check_id(id)
            .map_err(|e| TransferError::Invalid(format!("stream id {id:?}: {e}")))?;
        if opts.part_size < (5 << 20) || opts.parallel == 0 {
            return Err(TransferError::Invalid(
                "part_size must be >= 5 MiB and parallel >= 1".into(),
            ));
        }
        let key = self.data_key(id);
        let span = info_span!("s3_send", %id, %key);
        async {
            // A manifest left from an earlier attempt must not vouch for new bytes.
            self.delete_key(&self.manifest_key(id), &opts.retry).await?;
            self.put_small(&self.marker_key(id), b"", &opts.retry)
                .await
                .map_err(|e| s3_err(Side::Receiver, "write upload marker", &key, 0, e))?;
            let upload_id = (|| async { self.bucket.initiate_multipart_upload(&key, "application/octet-stream").await })
                .retry(opts.retry.backoff())
                .sleep(tokio::time::sleep)
                .notify(|e, d| warn!(error = %e, delay = ?d, "initiating multipart upload failed; retrying"))
                .await
                .map_err(|e| s3_err(Side::Sender, "initiate multipart upload", &key, 0, e))?
                .upload_id;
            let cp = UploadCheckpoint {
                id: id.to_string(),
                key: key.clone(),
                upload_id,
                part_size: opts.part_size,
                parts: Vec::new(),
                offset: 0,
                encryption: opts.encryption_key.as_ref().map(|_| Encryption::fresh()),
            };
            self.upload_from(cp, reader, opts).await
        }
        .instrument(span)
        .await
    }

    /// Continues an interrupted upload: `reader` must yield the stream from
    /// `checkpoint.offset` on. Parts before it are not uploaded again.
    pub async fn resume_stream<R: AsyncRead + Unpin>(
        &self,
        checkpoint: UploadCheckpoint,
        reader: R,
        opts: &S3SendOptions,
    ) -> Result<S3SendReport, TransferError> {
        let opts = S3SendOptions {
            part_size: checkpoint.part_size,
            ..opts.clone()
        };
        let span = info_span!("s3_resume", id = %checkpoint.id, offset = checkpoint.offset);
        self.upload_from(checkpoint, reader, &opts)
            .instrument(span)
            .await
    }

    async fn upload_from<R: AsyncRead + Unpin>(
        &self,
        mut cp: UploadCheckpoint,
        reader: R,
        opts: &S3SendOptions,
    ) -> Result<S3SendReport, TransferError> {
        let started = Instant::now();
        let start_offset = cp.offset;
        let key = cp.key.clone();
        let upload_id = cp.upload_id.clone();
        let first_part = cp.parts.len() as u32 + 1;
        let part_key = match (&cp.encryption, &opts.encryption_key) {
            (None, _) => None,
            (Some(enc), Some(secret)) => {
                Some(PartKey::derive(secret, &cp.id, enc).ok_or_else(|| {
                    TransferError::Invalid(format!("unknown at-rest cipher {:?}", enc.cipher))
                })?)
            }
            (Some(_), None) => {
                return Err(TransferError::Invalid(
                    "the upload is encrypted: resuming it needs its encryption key".into(),
                ));
            }
        };
        let overhead = if part_key.is_some() {
            TAG_LEN as u64
        } else {
            0
        };
        // Parts are read in order and uploaded `parallel` at a time; `buffered` yields
        // results in part order, so the completed prefix is always known.
        let parts = parts_of(reader, first_part, cp.offset, opts.part_size);
        let mut uploads = Box::pin(parts)
            .map(|p| {
                let (key, upload_id, part_key) = (&key, &upload_id, &part_key);
                async move {
                    let (n, off, bytes) = p.map_err(|(off, e)| (off, format!("reading the source: {e}"), Side::Sender))?;
                    let mut bytes = bytes.to_vec();
                    if let Some(k) = part_key {
                        k.seal(n, &mut bytes);
                    }
                    let sha = hex(&Sha256::digest(&bytes));
                    let len = bytes.len() as u64;
                    let part = (|| async {
                        self.bucket.put_multipart_chunk(bytes.clone(), key, n, upload_id, "application/octet-stream").await
                    })
                    .retry(opts.retry.backoff())
                    .sleep(tokio::time::sleep)
                    .notify(|e, d| warn!(error = %e, delay = ?d, part = n, "part upload failed; retrying"))
                    .await
                    .map_err(|e| (off, format!("uploading part {n} (gave up after {} retries): {e}", opts.retry.max_retries), Side::Receiver))?;
                    Ok::<_, (u64, String, Side)>(DonePart { number: n, etag: part.etag, len, sha256: sha })
                }
            })
            .buffered(opts.parallel);
        while let Some(r) = uploads.next().await {
            match r {
                Ok(p) => {
                    cp.offset += p.len - overhead;
                    cp.parts.push(p);
                }
                Err((off, reason, side)) => {
                    drop(uploads);
                    return Err(TransferError::S3 {
                        side,
                        op: "multipart upload",
                        key: key.clone(),
                        offset: off,
                        reason,
                        checkpoint: Some(Box::new(cp)),
                    });
                }
            }
        }
        drop(uploads);
        let fail = |op, reason: String, cp: &UploadCheckpoint| TransferError::S3 {
            side: Side::Receiver,
            op,
            key: key.clone(),
            offset: cp.offset,
            reason,
            checkpoint: Some(Box::new(cp.clone())),
        };
        let s3_parts: Vec<Part> = cp
            .parts
            .iter()
            .map(|p| Part {
                part_number: p.number,
                etag: p.etag.clone(),
            })
            .collect();
        (|| async {
            let r = self
                .bucket
                .complete_multipart_upload(&key, &upload_id, s3_parts.clone())
                .await
                .map_err(|e| e.to_string())?;
            ok_status(r.status_code(), r.as_slice())
        })
        .retry(opts.retry.backoff())
        .sleep(tokio::time::sleep)
        .notify(
            |e, d| warn!(error = %e, delay = ?d, "completing multipart upload failed; retrying"),
        )
        .await
        .map_err(|e| fail("complete multipart upload", e, &cp))?;

        let digest = parts_digest(&cp.parts);
        let seal = opts.seal_key.as_ref().map(|k| {
            hex(&seal_mac(k, cp.offset, cp.part_size, &digest)
                .finalize()
                .into_bytes())
        });
        let manifest = Manifest {
            version: 1,
            size: cp.offset,
            part_size: cp.part_size,
            parts: cp.parts.clone(),
            digest: digest.clone(),
            seal,
            encryption: cp.encryption.clone(),
            layout: None,
        };
        let body = serde_json::to_vec(&manifest).expect("manifest serializes");
        let mkey = self.manifest_key(&cp.id);
        self.put_small(&mkey, &body, &opts.retry)
            .await
            .map_err(|e| fail("write manifest", e, &cp))?;
        Ok(S3SendReport {
            key: key.clone(),
            bytes: cp.offset,
            bytes_uploaded: cp.offset - start_offset,
            parts: cp.parts.len(),
            digest,
            elapsed: started.elapsed(),
        })
    }

    async fn put_small(&self, key: &str, body: &[u8], retry: &RetryPolicy) -> Result<(), String> {
        (|| async {
            let r = self
                .bucket
                .put_object(key, body)
                .await
                .map_err(|e| e.to_string())?;
            ok_status(r.status_code(), r.as_slice())
        })
        .retry(retry.backoff())
        .sleep(tokio::time::sleep)
        .notify(|e, d| warn!(error = %e, delay = ?d, %key, "put failed; retrying"))
        .await
    }

    async fn delete_key(&self, key: &str, retry: &RetryPolicy) -> Result<(), TransferError> {
        (|| async {
            let r = self
                .bucket
                .delete_object(key)
                .await
                .map_err(|e| e.to_string())?;
            // Deleting what is not there is success.
            if r.status_code() == 404 {
                Ok(())
            } else {
                ok_status(r.status_code(), r.as_slice())
            }
        })
        .retry(retry.backoff())
        .sleep(tokio::time::sleep)
        .notify(|e, d| warn!(error = %e, delay = ?d, %key, "delete failed; retrying"))
        .await
        .map_err(|e| s3_err(Side::Sender, "delete", key, 0, e))
    }

    /// Reads a key that does not exist under the prefix: the store answers NoSuchKey
    /// when the endpoint, bucket and credentials are right, and says what is wrong
    /// otherwise (403 for credentials, NoSuchBucket). Nothing is written.
    pub async fn check_access(&self) -> Result<(), TransferError> {
        let key = self.base(".ferry-access-check");
        let (code, body) = match self.bucket.get_object(&key).await {
            Ok(r) => (r.status_code(), r.to_vec()),
            Err(s3::error::S3Error::HttpFailWithBody(code, body)) => (code, body.into_bytes()),
            Err(e) => return Err(s3_err(Side::Receiver, "access check", &key, 0, e)),
        };
        let text = String::from_utf8_lossy(&body);
        if (code == 404 && text.contains("NoSuchKey")) || (200..300).contains(&code) {
            return Ok(());
        }
        let reason = match text
            .split("<Code>")
            .nth(1)
            .and_then(|t| t.split('<').next())
        {
            Some(what) => format!("HTTP {code} {what}"),
            None => format!("HTTP {code}"),
        };
        Err(s3_err(Side::Receiver, "access check", &key, 0, reason))
    }

    /// Whether stream `id` is complete in the bucket (its manifest exists).
    pub async fn has_stream(&self, id: &str) -> Result<bool, TransferError> {
        let mkey = self.manifest_key(id);
        match self.bucket.head_object(&mkey).await {
            Ok((_, code)) if (200..300).contains(&code) => Ok(true),
            Ok((_, 404)) => Ok(false),
            Err(s3::error::S3Error::HttpFailWithBody(404, _)) => Ok(false),
            Ok((_, code)) => Err(s3_err(
                Side::Receiver,
                "head manifest",
                &mkey,
                0,
                format!("HTTP {code}"),
            )),
            Err(e) => Err(s3_err(Side::Receiver, "head manifest", &mkey, 0, e)),
        }
    }

    /// Reads stream `id` (downloaded in parallel ranged GETs, delivered in order). Every
    /// part's sha256 is checked before its bytes are handed out, and the reader gets
    /// end-of-stream only after the last part and the stream digest checked out.
    pub async fn receive_stream(
        &self,
        id: &str,
        opts: &ReceiveOptions,
    ) -> Result<IncomingObject, TransferError> {
        let mkey = self.manifest_key(id);
        let body = (|| async {
            let r = self
                .bucket
                .get_object(&mkey)
                .await
                .map_err(|e| e.to_string())?;
            ok_status(r.status_code(), r.as_slice())?;
            Ok::<_, String>(r.to_vec())
        })
        .retry(opts.retry.backoff())
        .sleep(tokio::time::sleep)
        .when(|e: &String| !e.starts_with("HTTP 404"))
        .await
        .map_err(|e| {
            s3_err(
                Side::Receiver,
                "read manifest (no completed stream?)",
                &mkey,
                0,
                e,
            )
        })?;
        let manifest: Manifest = serde_json::from_slice(&body)
            .map_err(|e| s3_err(Side::Receiver, "parse manifest", &mkey, 0, e))?;
        if manifest.layout.is_some() {
            return Err(s3_err(
                Side::Receiver,
                "check manifest",
                &mkey,
                0,
                "a stream of separate parts: read it with receive_streamed",
            ));
        }
        let overhead = if manifest.encryption.is_some() {
            TAG_LEN as u64
        } else {
            0
        };
        if parts_digest(&manifest.parts) != manifest.digest
            || manifest.parts.iter().map(|p| p.len).sum::<u64>()
                != manifest.size + overhead * manifest.parts.len() as u64
        {
            return Err(s3_err(
                Side::Receiver,
                "check manifest",
                &mkey,
                0,
                "manifest is inconsistent",
            ));
        }
        if let Some(k) = &opts.seal_key {
            let sealed = manifest.seal.as_deref().and_then(unhex).is_some_and(|s| {
                seal_mac(k, manifest.size, manifest.part_size, &manifest.digest)
                    .verify_slice(&s)
                    .is_ok()
            });
            if !sealed {
                return Err(s3_err(
                    Side::Receiver,
                    "check manifest seal",
                    &mkey,
                    0,
                    "the manifest is not sealed with this migration's key: written by \
                     someone else, or altered in the bucket",
                ));
            }
        }
        let refuse = |why: &str| Err(s3_err(Side::Receiver, "check encryption", &mkey, 0, why));
        let part_key = match (&manifest.encryption, &opts.encryption_key) {
            (None, None) => None,
            (Some(enc), Some(secret)) => match PartKey::derive(secret, id, enc) {
                Some(k) => Some(k),
                None => return refuse(&format!("unknown at-rest cipher {:?}", enc.cipher)),
            },
            (Some(_), None) => {
                return refuse("the stream is encrypted at rest and no key was given");
            }
            (None, Some(_)) => {
                return refuse(
                    "the stream is stored unencrypted, though its sender encrypts: written by \
                     someone else, or replaced in the bucket",
                );
            }
        };
        let (tx, rx) = mpsc::channel(2);
        let bucket = self.bucket.clone();
        let key = self.data_key(id);
        let opts = opts.clone();
        let size = manifest.size;
        let task = tokio::spawn(
            async move {
                let mut ranges = Vec::new();
                let mut off = 0u64;
                for p in &manifest.parts {
                    ranges.push((off, p.clone()));
                    off += p.len;
                }
                let mut parts = futures::stream::iter(ranges)
                    .map(|(off, p)| {
                        let (bucket, key, retry, part_key) =
                            (&bucket, &key, &opts.retry, &part_key);
                        async move {
                            let stored = fetch_part(bucket, key, off, &p, retry).await?;
                            let sha = Sha256::digest(&stored);
                            let Some(k) = part_key else {
                                return Ok((sha, stored));
                            };
                            match k.open(p.number, stored.to_vec()) {
                                Some(plain) => Ok((sha, Bytes::from(plain))),
                                None => Err(s3_err(
                                    Side::Receiver,
                                    "decrypt part",
                                    key,
                                    off,
                                    format!("part {} does not decrypt with this key", p.number),
                                )),
                            }
                        }
                    })
                    .buffered(opts.parallel.max(1));
                let mut hashes = Sha256::new();
                while let Some(r) = parts.next().await {
                    match r {
                        Ok((sha, b)) => {
                            hashes.update(sha);
                            if tx.send(Ok(b)).await.is_err() {
                                return; // reader gone
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    }
                }
                let digest = hex(&hashes.finalize());
                if digest != manifest.digest {
                    let _ = tx
                        .send(Err(s3_err(
                            Side::Receiver,
                            "verify digest",
                            &key,
                            size,
                            format!(
                                "stream digest {digest} differs from manifest {}",
                                manifest.digest
                            ),
                        )))
                        .await;
                    return;
                }
                let _ = tx.send(Ok(Bytes::new())).await; // end marker
            }
            .instrument(info_span!("s3_receive", %id)),
        );
        Ok(IncomingObject {
            rx,
            current: Bytes::new(),
            offset: 0,
            size,
            done: false,
            task,
            key: self.data_key(id),
        })
    }

    /// Deletes stream `id` (manifest first, so it stops counting as complete at once).
    pub async fn delete_stream(&self, id: &str, retry: &RetryPolicy) -> Result<(), TransferError> {
        self.delete_key(&self.manifest_key(id), retry).await?;
        self.delete_key(&self.data_key(id), retry).await
    }

    /// Abandons an interrupted upload, releasing its parts in the store.
    pub async fn abort_upload(&self, checkpoint: &UploadCheckpoint) -> Result<(), TransferError> {
        self.bucket
            .abort_upload(&checkpoint.key, &checkpoint.upload_id)
            .await
            .map_err(|e| {
                s3_err(
                    Side::Sender,
                    "abort multipart upload",
                    &checkpoint.key,
                    checkpoint.offset,
                    e,
                )
            })
    }

    /// Multipart uploads under `id_prefix` that were started and never completed or
    /// aborted (key, upload id): the store keeps their parts, and no object listing
    /// shows them.
    pub async fn unfinished_uploads(
        &self,
        id_prefix: &str,
        retry: &RetryPolicy,
    ) -> Result<Vec<(String, String)>, TransferError> {
        let mut data_keys: Vec<String> = self
            .list_keys(id_prefix, retry)
            .await?
            .iter()
            .filter_map(|k| {
                k.strip_suffix("/upload")
                    .or_else(|| k.strip_suffix("/data"))
            })
            .map(|base| format!("{base}/data"))
            .collect();
        data_keys.sort();
        data_keys.dedup();
        let mut out = Vec::new();
        for key in data_keys {
            let pages = (|| async { self.bucket.list_multiparts_uploads(Some(&key), None).await })
                .retry(retry.backoff())
                .sleep(tokio::time::sleep)
                .await
                .map_err(|e| s3_err(Side::Sender, "list multipart uploads", &key, 0, e))?;
            out.extend(
                pages
                    .into_iter()
                    .flat_map(|pg| pg.uploads)
                    .filter(|u| u.key == key)
                    .map(|u| (u.key, u.id)),
            );
        }
        Ok(out)
    }

    async fn list_keys(
        &self,
        id_prefix: &str,
        retry: &RetryPolicy,
    ) -> Result<Vec<String>, TransferError> {
        let p = self.base(id_prefix);
        let pages = (|| async { self.bucket.list(p.clone(), None).await })
            .retry(retry.backoff())
            .sleep(tokio::time::sleep)
            .await
            .map_err(|e| s3_err(Side::Sender, "list", &p, 0, e))?;
        Ok(pages
            .into_iter()
            .flat_map(|pg| pg.contents)
            .map(|o| o.key)
            .collect())
    }

    /// Deletes every stream whose id starts with `id_prefix` (e.g. `"<migration-id>/"`),
    /// as done after a migration, and aborts its unfinished uploads (a sender that lost
    /// the store mid-upload could not). Returns how many objects and uploads went.
    pub async fn delete_prefix(
        &self,
        id_prefix: &str,
        retry: &RetryPolicy,
    ) -> Result<usize, TransferError> {
        let unfinished = self.unfinished_uploads(id_prefix, retry).await?;
        for (key, upload_id) in &unfinished {
            (|| async { self.bucket.abort_upload(key, upload_id).await })
                .retry(retry.backoff())
                .sleep(tokio::time::sleep)
                .await
                .map_err(|e| s3_err(Side::Sender, "abort multipart upload", key, 0, e))?;
        }
        let mut keys = self.list_keys(id_prefix, retry).await?;
        // Manifests first: a stream must stop counting as complete before its data goes.
        keys.sort_by_key(|k| !k.ends_with("/manifest.json"));
        for k in &keys {
            self.delete_key(k, retry).await?;
        }
        Ok(keys.len() + unfinished.len())
    }
}

fn parts_digest(parts: &[DonePart]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        let raw: Vec<u8> = (0..p.sha256.len() / 2)
            .map(|i| {
                u8::from_str_radix(p.sha256.get(2 * i..2 * i + 2).unwrap_or("zz"), 16).unwrap_or(0)
            })
            .collect();
        h.update(&raw);
    }
    hex(&h.finalize())
}

async fn fetch_part(
    bucket: &Bucket,
    key: &str,
    off: u64,
    p: &DonePart,
    retry: &RetryPolicy,
) -> Result<Bytes, TransferError> {
    let end = off + p.len;
    (|| async {
        if p.len == 0 {
            return Ok(Bytes::new());
        }
        let r = bucket
            .get_object_range(key, off, Some(end - 1))
            .await
            .map_err(|e| e.to_string())?;
        ok_status(r.status_code(), r.as_slice())?;
        let b = r.bytes().clone();
        if b.len() as u64 != p.len {
            return Err(format!(
                "part {} returned {} bytes, expected {}",
                p.number,
                b.len(),
                p.len
            ));
        }
        let sha = hex(&Sha256::digest(&b));
        if sha != p.sha256 {
            return Err(format!(
                "part {} sha256 {sha} differs from manifest {}",
                p.number, p.sha256
            ));
        }
        Ok(b)
    })
    .retry(retry.backoff())
    .sleep(tokio::time::sleep)
    .notify(|e, d| warn!(error = %e, delay = ?d, part = p.number, "part download failed; retrying"))
    .await
    .map_err(|e| s3_err(Side::Receiver, "download part", key, off, e))
}

/// The parts of `reader`, numbered from `first` at stream offset `offset`: (number,
/// offset, bytes), `part_size` each but the last (an empty stream is one empty part).
/// A read error ends the stream with the offset it happened at.
fn parts_of<R: AsyncRead + Unpin>(
    reader: R,
    first: u32,
    offset: u64,
    part_size: usize,
) -> impl futures::Stream<Item = Result<(u32, u64, Bytes), (u64, io::Error)>> {
    futures::stream::unfold(
        (reader, first, offset, false),
        move |(mut reader, n, off, done)| async move {
            if done {
                return None;
            }
            match crate::read_full(&mut reader, part_size).await {
                Ok(b) if b.is_empty() && n > 1 => None,
                Ok(b) => {
                    let len = b.len() as u64;
                    // A short part is the last one.
                    let last = b.len() < part_size;
                    Some((Ok((n, off, b)), (reader, n + 1, off + len, last)))
                }
                Err(e) => Some((Err((off, e)), (reader, n, off, true))),
            }
        },
    )
}

/// A stream downloaded from S3; see [`S3Store::receive_stream`].
pub struct IncomingObject {
    rx: mpsc::Receiver<Result<Bytes, TransferError>>,
    current: Bytes,
    offset: u64,
    size: u64,
    done: bool,
    task: tokio::task::JoinHandle<()>,
    key: String,
}

impl IncomingObject {
    /// Stream length from the manifest.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Drop for IncomingObject {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AsyncRead for IncomingObject {
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
            if this.done {
                return Poll::Ready(Ok(()));
            }
            match this.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(b))) if b.is_empty() => this.done = true,
                Poll::Ready(Some(Ok(b))) => this.current = b,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.into())),
                Poll::Ready(None) => {
                    let e = s3_err(
                        Side::Receiver,
                        "download",
                        &this.key,
                        this.offset,
                        "download task ended early",
                    );
                    return Poll::Ready(Err(e.into()));
                }
            }
        }
    }
}
