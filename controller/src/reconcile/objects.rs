//! What a migration through a bucket leaves there. The controller owns the objects'
//! lifecycle because only it knows why a migration ended: removed once it succeeded or
//! was cancelled, kept after a failure for `Context::failed_object_retention` (CRIU's
//! images are what a post-mortem needs) and then removed, removed at once when the
//! Migration is deleted. The state lives in `status.objects`, so a restarted controller
//! still collects what an earlier one retained.
use super::*;
use ferry_crds::{ObjectsState, StoredObjects};
use ferry_transfer::{RetryPolicy, S3Config, S3Credentials, S3Store};

/// How long one removal may take before it is tried again later.
const REMOVAL_TIMEOUT: Duration = Duration::from_secs(30);
/// How soon a failed removal is tried again.
const REMOVAL_RETRY: Duration = Duration::from_secs(30);

impl Reconciler<'_> {
    /// Records that the migration puts objects in its bucket (when its checkpoint
    /// starts; a retry's attempt replaces the earlier one's under the same prefix).
    pub(super) fn objects_stored(&mut self) {
        let Some(os) = self.m.spec.transfer.object_store.as_ref() else {
            return;
        };
        if self.m.spec.transfer.mode != TransferMode::ObjectStore {
            return;
        }
        let prefix = os.prefix.as_deref().unwrap_or("").trim_matches('/');
        let uid = self.m.uid().unwrap_or_default();
        let location = match prefix {
            "" => format!("s3://{}/{uid}/", os.bucket),
            p => format!("s3://{}/{p}/{uid}/", os.bucket),
        };
        self.status.objects = Some(StoredObjects {
            state: ObjectsState::Stored,
            location,
            remove_after: None,
            message: None,
        });
    }

    /// For a finished (or deleted) Migration: removes its objects when they are due,
    /// or starts their retention after a failure. Returns when to look again.
    pub(super) async fn tend_objects(&mut self) -> Option<Duration> {
        let phase = self.status.phase?;
        let objects = self.status.objects.as_mut()?;
        let failed = matches!(phase, Phase::Failed | Phase::RolledBack);
        match objects.state {
            ObjectsState::Removed => return None,
            ObjectsState::Stored if failed && !self.deleting => {
                let retention = self.ctx.failed_object_retention;
                if !retention.is_zero() {
                    let until = Timestamp::now()
                        + k8s_openapi::jiff::SignedDuration::try_from(retention)
                            .unwrap_or(k8s_openapi::jiff::SignedDuration::MAX);
                    objects.state = ObjectsState::Retained;
                    objects.remove_after = Some(Time(until));
                    objects.message = Some(format!(
                        "kept for {}s after the failure (--failed-object-retention)",
                        retention.as_secs()
                    ));
                    return Some(retention);
                }
            }
            ObjectsState::Retained if !self.deleting => {
                let left = objects
                    .remove_after
                    .as_ref()
                    .map(|t| t.0.as_millisecond() - Timestamp::now().as_millisecond())
                    .unwrap_or(0);
                if left > 0 {
                    return Some(Duration::from_millis(left as u64));
                }
            }
            _ => {}
        }
        let removed = self.remove_objects().await;
        let objects = self.status.objects.as_mut()?;
        match removed {
            Ok(n) => {
                info!(objects = n, location = %objects.location, "removed the migration's objects");
                objects.state = ObjectsState::Removed;
                objects.remove_after = None;
                objects.message = Some(format!("{n} objects removed"));
                None
            }
            Err(e) => {
                warn!(location = %objects.location, "removing the migration's objects: {e}");
                objects.message = Some(format!("removal failed (retried): {e}"));
                // A deleted Migration does not wait for its bucket: the message is the
                // last word, and the bucket's lifecycle rules the fallback.
                (!self.deleting).then_some(REMOVAL_RETRY)
            }
        }
    }

    /// Deletes every object under the migration's prefix with the credentials of its
    /// Secret; returns how many.
    async fn remove_objects(&self) -> Result<usize, String> {
        let access = match self.object_store_access().await {
            Ok(Ok(Some(a))) => a,
            Ok(Ok(None)) => return Err("the Migration names no objectStore".into()),
            Ok(Err(why)) => return Err(why),
            Err(e) => return Err(e.to_string()),
        };
        let credentials = S3Credentials {
            access_key: access.access_key_id,
            secret_key: access.secret_access_key,
            session_token: None,
        };
        let cfg = S3Config::locate(
            &access.endpoint,
            &access.region,
            &access.bucket,
            &access.prefix,
            credentials,
        )?;
        let store = S3Store::new(&cfg).map_err(|e| e.to_string())?;
        let retry = RetryPolicy {
            max_retries: 3,
            ..Default::default()
        };
        let uid = self.m.uid().unwrap_or_default();
        if uid.is_empty() {
            // Never an empty prefix: that would be every migration's objects.
            return Err("the Migration has no UID".into());
        }
        let prefix = format!("{uid}/");
        match tokio::time::timeout(REMOVAL_TIMEOUT, store.delete_prefix(&prefix, &retry)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {REMOVAL_TIMEOUT:?}")),
        }
    }
}
