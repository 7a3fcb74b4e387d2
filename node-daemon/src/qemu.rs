//! QEMU backend: drives live migration of a guest over its QMP socket (the `qapi` crate's
//! async client). Both ends use it: the destination QEMU (started `-incoming defer`) gets
//! `migrate-incoming`, the source gets parameters, capabilities and `migrate`.
use qapi::futures::{QapiService, QmpStreamTokio};
use qapi::qmp;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::WriteHalf;
use tokio::net::UnixStream;

type Service = QapiService<QmpStreamTokio<WriteHalf<UnixStream>>>;

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("connecting to QMP socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("QMP command {command} failed: {source}")]
    Command {
        command: &'static str,
        source: qapi::ExecuteError,
    },
    #[error("migration failed: {0}")]
    MigrationFailed(String),
    #[error("migration did not finish within {0:?}")]
    Timeout(Duration),
}

/// Migration tuning applied on the source before `migrate`.
#[derive(Debug, Clone)]
pub struct MigrationTuning {
    /// Bytes per second. Always set explicitly: QEMU's default cap (~128 MiB/s) would
    /// otherwise silently bound every migration.
    pub max_bandwidth: u64,
    /// Maximum tolerated stop-and-copy pause.
    pub downtime_limit: Duration,
    pub postcopy_ram: bool,
}

impl Default for MigrationTuning {
    fn default() -> Self {
        MigrationTuning {
            max_bandwidth: 10 << 30,
            downtime_limit: Duration::from_millis(300),
            postcopy_ram: false,
        }
    }
}

/// A snapshot of `query-migrate`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MigrationProgress {
    /// QEMU's status name ("active", "completed", "cancelled", "failed", ...).
    pub status: String,
    pub transferred_bytes: u64,
    pub remaining_bytes: u64,
    pub total_bytes: u64,
    pub expected_downtime_ms: Option<u64>,
    /// Only once completed: the measured guest pause.
    pub downtime_ms: Option<u64>,
    pub total_time_ms: Option<u64>,
    pub error: Option<String>,
}

impl MigrationProgress {
    pub fn is_finished(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "cancelled")
    }

    fn from_info(info: qmp::MigrationInfo) -> Self {
        let status = info
            .status
            .map(|s| qapi::Enum::name(&s).to_string())
            .unwrap_or_else(|| "none".to_string());
        let ram = info.ram.as_ref();
        MigrationProgress {
            status,
            transferred_bytes: ram.map(|r| r.transferred.max(0) as u64).unwrap_or(0),
            remaining_bytes: ram.map(|r| r.remaining.max(0) as u64).unwrap_or(0),
            total_bytes: ram.map(|r| r.total.max(0) as u64).unwrap_or(0),
            expected_downtime_ms: info.expected_downtime.map(|v| v.max(0) as u64),
            downtime_ms: info.downtime.map(|v| v.max(0) as u64),
            total_time_ms: info.total_time.map(|v| v.max(0) as u64),
            error: info.error_desc,
        }
    }
}

/// A QMP connection to one QEMU.
pub struct QemuBackend {
    qmp: Service,
    _events: tokio::task::JoinHandle<()>,
}

impl QemuBackend {
    /// Connects and negotiates capabilities; retries while QEMU is still creating the
    /// socket (a freshly started launcher).
    pub async fn connect(path: &Path, wait: Duration) -> Result<Self, QemuError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match Self::try_connect(path).await {
                Ok(b) => return Ok(b),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(QemuError::Connect {
                        path: path.to_owned(),
                        source: e,
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn try_connect(path: &Path) -> std::io::Result<Self> {
        let stream = QmpStreamTokio::open_uds(path).await?;
        let stream = stream.negotiate().await?;
        let (qmp, events) = stream.into_parts();
        let events = events.spawn_tokio();
        Ok(QemuBackend {
            qmp,
            _events: events,
        })
    }

    async fn exec<C: qmp::QmpCommand>(&self, command: C) -> Result<C::Ok, QemuError> {
        let name = C::NAME;
        tracing::debug!(command = name, "qmp");
        self.qmp
            .execute(command)
            .await
            .map_err(|source| QemuError::Command {
                command: name,
                source,
            })
    }

    /// Destination: start listening for the migration stream on `uri` (e.g. `tcp:IP:PORT`).
    pub async fn migrate_incoming(&self, uri: &str) -> Result<(), QemuError> {
        self.exec(qmp::migrate_incoming {
            uri: Some(uri.to_string()),
            channels: None,
            exit_on_error: None,
        })
        .await?;
        Ok(())
    }

    /// Applies parameters and capabilities. Capabilities must match on both ends for
    /// post-copy, so call this on the destination too when `postcopy_ram` is set.
    pub async fn configure(&self, t: &MigrationTuning) -> Result<(), QemuError> {
        self.exec(qmp::migrate_set_capabilities {
            capabilities: vec![qmp::MigrationCapabilityStatus {
                capability: qmp::MigrationCapability::postcopy_ram,
                state: t.postcopy_ram,
            }],
        })
        .await?;
        let params = qmp::MigrateSetParameters {
            max_bandwidth: Some(t.max_bandwidth),
            downtime_limit: Some(t.downtime_limit.as_millis() as u64),
            ..Default::default()
        };
        self.exec(qmp::migrate_set_parameters(params)).await?;
        Ok(())
    }

    /// Source: start migrating to `uri`; returns at once (follow with [`Self::progress`]).
    pub async fn migrate(&self, uri: &str) -> Result<(), QemuError> {
        self.exec(qmp::migrate {
            uri: Some(uri.to_string()),
            channels: None,
            detach: None,
            resume: None,
        })
        .await?;
        Ok(())
    }

    pub async fn progress(&self) -> Result<MigrationProgress, QemuError> {
        Ok(MigrationProgress::from_info(
            self.exec(qmp::query_migrate {}).await?,
        ))
    }

    /// Polls until the migration finishes; `completed` is Ok, anything else an error.
    pub async fn wait_finished(
        &self,
        poll: Duration,
        timeout: Duration,
        mut on_progress: impl FnMut(&MigrationProgress),
    ) -> Result<MigrationProgress, QemuError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let p = self.progress().await?;
            on_progress(&p);
            if p.is_finished() {
                return if p.status == "completed" {
                    Ok(p)
                } else {
                    Err(QemuError::MigrationFailed(format!(
                        "{}: {}",
                        p.status,
                        p.error.unwrap_or_default()
                    )))
                };
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(QemuError::Timeout(timeout));
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Cancels an outgoing migration; the source guest resumes running.
    pub async fn migrate_cancel(&self) -> Result<(), QemuError> {
        self.exec(qmp::migrate_cancel {}).await?;
        Ok(())
    }

    /// The VM run state ("running", "postmigrate", "inmigrate", ...).
    pub async fn run_state(&self) -> Result<String, QemuError> {
        let s = self.exec(qmp::query_status {}).await?;
        Ok(qapi::Enum::name(&s.status).to_string())
    }

    pub async fn quit(&self) -> Result<(), QemuError> {
        self.exec(qmp::quit {}).await?;
        Ok(())
    }
}

// Run control used by the node daemon's VM runtime (cold strategy and rollback).
impl QemuBackend {
    /// Pauses the guest's vCPUs.
    pub async fn stop(&self) -> Result<(), QemuError> {
        self.exec(qmp::stop {}).await?;
        Ok(())
    }

    /// Resumes the guest, also from "postmigrate" after a completed outgoing migration
    /// (how a source rolls back when the destination fails after the copy).
    pub async fn cont(&self) -> Result<(), QemuError> {
        self.exec(qmp::cont {}).await?;
        Ok(())
    }
}
