//! Streams a receiver reads while they are being uploaded, so that the download overlaps
//! the upload: part N is downloaded while part N+1 is uploaded, and the bucket path costs
//! little more than the slower of the two.
//!
//! S3 does not let anyone read the parts of an unfinished multipart upload, so here each
//! part is an object of its own:
//!
//! ```text
//! <prefix>/<id>/upload          marker: part size, cipher and salt, sealed (written first)
//! <prefix>/<id>/part-000001 ... each part encrypted (ChaCha20-Poly1305, AAD = its number)
//! <prefix>/<id>/manifest.json   as for multipart streams, sealed (written last)
//! ```
//!
//! A receiver may use a part before the manifest exists only because encryption is
//! authenticated: a part that opens under the stream's key and its own number was
//! written by the holder of the secret for this place in this stream. So a streamed
//! upload needs both keys. The receiver waits for a marker whose seal verifies (a
//! marker of an earlier upload under another secret is not one), reads the parts in
//! order as they appear, and gives end-of-stream only once the sealed manifest lists
//! exactly the parts it read. The sender deletes an earlier upload's parts before it
//! writes its marker, so every part a receiver finds after a valid marker is new.
use super::*;

/// How often a receiver looks again for a part, the marker or the manifest.
const POLL: Duration = Duration::from_millis(25);
/// Parts read ahead of the consumer.
const READ_AHEAD: usize = 2;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Marker {
    version: u32,
    part_size: usize,
    encryption: Encryption,
    /// HMAC-SHA256 under the seal key of id, part size, cipher and salt, hex.
    seal: String,
}

fn marker_mac(key: &[u8], id: &str, part_size: usize, enc: &Encryption) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(
        format!(
            "ferry-s3-marker v1 {id} {part_size} {} {}",
            enc.cipher, enc.salt
        )
        .as_bytes(),
    );
    mac
}

fn part_key_name(base: &str, n: u32) -> String {
    format!("{base}/part-{n:06}")
}

impl S3Store {
    /// Uploads what `reader` yields as stream `id`, each part an object of its own that
    /// [`S3Store::receive_streamed`] can read while later parts are still uploading.
    /// Needs `seal_key` and `encryption_key`. Parts as small as 1 MiB are allowed (they
    /// are objects, not multipart parts); `parallel` of them upload at once.
    pub async fn send_streamed<R: AsyncRead + Unpin>(
        &self,
        id: &str,
        reader: R,
        opts: &S3SendOptions,
    ) -> Result<S3SendReport, TransferError> {
        crate::frame::check_id(id)
            .map_err(|e| TransferError::Invalid(format!("stream id {id:?}: {e}")))?;
        let (Some(seal_key), Some(secret)) = (&opts.seal_key, &opts.encryption_key) else {
            return Err(TransferError::Invalid(
                "a streamed upload needs seal_key and encryption_key: its parts are read \
                 before the manifest vouches for them"
                    .into(),
            ));
        };
        if opts.part_size < (1 << 20) || opts.parallel == 0 {
            return Err(TransferError::Invalid(
                "part_size must be >= 1 MiB and parallel >= 1".into(),
            ));
        }
        let started = Instant::now();
        let base = self.base(id);
        let span = info_span!("s3_send_streamed", %id);
        async {
            // An earlier upload's manifest and parts must not pass for this one's.
            self.delete_key(&self.manifest_key(id), &opts.retry).await?;
            let old = self.list_keys(&format!("{id}/"), &opts.retry).await?;
            for k in old
                .iter()
                .filter(|k| k.starts_with(&format!("{base}/part-")))
            {
                self.delete_key(k, &opts.retry).await?;
            }
            let enc = Encryption::fresh();
            let key = PartKey::derive(secret, id, &enc).expect("a fresh cipher is known");
            let marker = Marker {
                version: 1,
                part_size: opts.part_size,
                seal: hex(&marker_mac(seal_key, id, opts.part_size, &enc)
                    .finalize()
                    .into_bytes()),
                encryption: enc.clone(),
            };
            let body = serde_json::to_vec(&marker).expect("marker serializes");
            let mkey = self.marker_key(id);
            self.put_small(&mkey, &body, &opts.retry)
                .await
                .map_err(|e| s3_err(Side::Receiver, "write upload marker", &mkey, 0, e))?;

            let part_size = opts.part_size;
            let parts = parts_of(reader, 1, 0, part_size);
            let mut uploads = Box::pin(parts)
                .map(|p| {
                    let (key, base) = (&key, &base);
                    async move {
                        let (n, off, plain) = p.map_err(|(off, e)| {
                            s3_err(Side::Sender, "read the source", base, off, e)
                        })?;
                        let mut bytes = plain.to_vec();
                        key.seal(n, &mut bytes);
                        let sha = hex(&Sha256::digest(&bytes));
                        let k = part_key_name(base, n);
                        self.put_small(&k, &bytes, &opts.retry).await.map_err(|e| {
                            s3_err(
                                Side::Receiver,
                                "upload part",
                                &k,
                                off,
                                format!(
                                    "part {n} (gave up after {} retries): {e}",
                                    opts.retry.max_retries
                                ),
                            )
                        })?;
                        Ok::<_, TransferError>((
                            plain.len() as u64,
                            DonePart {
                                number: n,
                                etag: String::new(),
                                len: bytes.len() as u64,
                                sha256: sha,
                            },
                        ))
                    }
                })
                .buffered(opts.parallel);
            let mut done = Vec::new();
            let mut size = 0u64;
            while let Some(r) = uploads.next().await {
                let (plain, part) = r?;
                size += plain;
                done.push(part);
            }
            drop(uploads);
            let digest = parts_digest(&done);
            let manifest = Manifest {
                version: 1,
                size,
                part_size,
                parts: done.clone(),
                digest: digest.clone(),
                seal: Some(hex(&seal_mac(seal_key, size, part_size, &digest)
                    .finalize()
                    .into_bytes())),
                encryption: Some(enc),
                layout: Some(LAYOUT_PARTS.into()),
            };
            let body = serde_json::to_vec(&manifest).expect("manifest serializes");
            let mk = self.manifest_key(id);
            self.put_small(&mk, &body, &opts.retry)
                .await
                .map_err(|e| s3_err(Side::Receiver, "write manifest", &mk, size, e))?;
            Ok::<_, TransferError>(S3SendReport {
                key: base.clone(),
                bytes: size,
                bytes_uploaded: size,
                parts: done.len(),
                digest,
                elapsed: started.elapsed(),
            })
        }
        .instrument(span)
        .await
    }

    /// Reads stream `id` of [`S3Store::send_streamed`] while it is being uploaded: waits
    /// for its sealed marker, then hands out each part once it is there and opens under
    /// the stream's key; end-of-stream only after the sealed manifest listed exactly
    /// the parts read. Waits as long as the upload takes: drop the reader (or the
    /// future) to stop.
    pub async fn receive_streamed(
        &self,
        id: &str,
        opts: &ReceiveOptions,
    ) -> Result<IncomingObject, TransferError> {
        let (Some(seal_key), Some(secret)) = (&opts.seal_key, &opts.encryption_key) else {
            return Err(TransferError::Invalid(
                "a streamed download needs seal_key and encryption_key".into(),
            ));
        };
        let mkey = self.marker_key(id);
        let marker = loop {
            let found = self
                .get_opt(&mkey, &opts.retry)
                .await
                .map_err(|e| s3_err(Side::Receiver, "read upload marker", &mkey, 0, e))?;
            // A marker that does not verify is not this upload's (an earlier one under
            // another secret, or written by someone else): wait for the right one.
            let valid = found
                .and_then(|b| serde_json::from_slice::<Marker>(&b).ok())
                .filter(|m| {
                    unhex(&m.seal).is_some_and(|s| {
                        marker_mac(seal_key, id, m.part_size, &m.encryption)
                            .verify_slice(&s)
                            .is_ok()
                    })
                });
            if let Some(m) = valid {
                break m;
            }
            tokio::time::sleep(POLL).await;
        };
        let key = PartKey::derive(secret, id, &marker.encryption).ok_or_else(|| {
            s3_err(
                Side::Receiver,
                "check encryption",
                &mkey,
                0,
                format!("unknown at-rest cipher {:?}", marker.encryption.cipher),
            )
        })?;
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        let store = S3Store {
            bucket: self.bucket.clone(),
            prefix: self.prefix.clone(),
        };
        let (id_owned, seal_key, retry) = (id.to_string(), seal_key.clone(), opts.retry.clone());
        let base = self.base(id);
        let task = tokio::spawn(
            async move {
                let r = store
                    .follow_parts(&id_owned, &base, &key, &seal_key, &retry, &tx)
                    .await;
                let _ = tx
                    .send(r.map(|()| Bytes::new())) // empty: the end marker
                    .await;
            }
            .instrument(info_span!("s3_receive_streamed", %id)),
        );
        Ok(IncomingObject {
            rx,
            current: Bytes::new(),
            offset: 0,
            size: 0,
            done: false,
            task,
            key: self.base(id),
        })
    }

    /// Sends each part into `tx` as it appears; Ok once the manifest closed the stream.
    async fn follow_parts(
        &self,
        id: &str,
        base: &str,
        key: &PartKey,
        seal_key: &[u8],
        retry: &RetryPolicy,
        tx: &mpsc::Sender<Result<Bytes, TransferError>>,
    ) -> Result<(), TransferError> {
        let mkey = self.manifest_key(id);
        let mut read: Vec<String> = Vec::new();
        let mut offset = 0u64;
        loop {
            let n = read.len() as u32 + 1;
            let pkey = part_key_name(base, n);
            let got = self
                .get_opt(&pkey, retry)
                .await
                .map_err(|e| s3_err(Side::Receiver, "download part", &pkey, offset, e))?;
            if let Some(stored) = got {
                read.push(hex(&Sha256::digest(&stored)));
                let plain = key.open(n, stored).ok_or_else(|| {
                    s3_err(
                        Side::Receiver,
                        "decrypt part",
                        &pkey,
                        offset,
                        format!("part {n} does not decrypt with this migration's key"),
                    )
                })?;
                offset += plain.len() as u64;
                // An empty chunk would read as the end: an empty part (an empty
                // stream's only one) has nothing to hand out anyway.
                if !plain.is_empty() && tx.send(Ok(Bytes::from(plain))).await.is_err() {
                    return Ok(()); // the reader is gone
                }
                continue;
            }
            // No part n: the stream ended if the manifest says so, else wait for it.
            let Some(body) = self
                .get_opt(&mkey, retry)
                .await
                .map_err(|e| s3_err(Side::Receiver, "read manifest", &mkey, offset, e))?
            else {
                tokio::time::sleep(POLL).await;
                continue;
            };
            let bad = |why: &str| s3_err(Side::Receiver, "check manifest", &mkey, offset, why);
            let m: Manifest = serde_json::from_slice(&body).map_err(|e| bad(&e.to_string()))?;
            let sealed = m.seal.as_deref().and_then(unhex).is_some_and(|s| {
                seal_mac(seal_key, m.size, m.part_size, &m.digest)
                    .verify_slice(&s)
                    .is_ok()
            });
            if !sealed {
                return Err(bad(
                    "the manifest is not sealed with this migration's key: written by someone \
                     else, or altered in the bucket",
                ));
            }
            if m.parts.len() > read.len() {
                // Written after our look for part n: that part is there now.
                continue;
            }
            let listed: Vec<&str> = m.parts.iter().map(|p| p.sha256.as_str()).collect();
            if listed != read || parts_digest(&m.parts) != m.digest || m.size != offset {
                return Err(bad(
                    "the parts read are not the ones the manifest lists (changed in the bucket)",
                ));
            }
            return Ok(());
        }
    }

    /// GET `key`; `None` when it does not exist.
    async fn get_opt(&self, key: &str, retry: &RetryPolicy) -> Result<Option<Vec<u8>>, String> {
        (|| async {
            let (code, body) = match self.bucket.get_object(key).await {
                Ok(r) => (r.status_code(), r.to_vec()),
                Err(s3::error::S3Error::HttpFailWithBody(code, body)) => (code, body.into_bytes()),
                Err(e) => return Err(e.to_string()),
            };
            match code {
                404 => Ok(None),
                c => ok_status(c, &body).map(|()| Some(body)),
            }
        })
        .retry(retry.backoff())
        .sleep(tokio::time::sleep)
        .notify(|e, d| warn!(error = %e, delay = ?d, %key, "get failed; retrying"))
        .await
    }
}
