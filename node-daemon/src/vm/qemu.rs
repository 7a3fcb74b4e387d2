//! QMP client: drives live migration of a guest over its QMP socket (the `qapi` crate's
//! async client). Both ends use it: the destination QEMU (started `-incoming defer`) gets
//! `migrate-incoming`, the source gets parameters, capabilities and `migrate`.
//! [`QemuBackend::follow`] watches the migration and applies the [`ConvergencePolicy`].
mod convergence;

use convergence::decide;
pub use convergence::{ConvergencePolicy, StallRule, Switch};
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
    #[error("bad migration tuning: {0}")]
    InvalidTuning(String),
}

/// Migration tuning applied on the source before `migrate`.
#[derive(Debug, Clone)]
pub struct MigrationTuning {
    /// Bytes per second. Always set explicitly: QEMU's default cap (~128 MiB/s) would
    /// otherwise silently bound every migration.
    pub max_bandwidth: u64,
    /// Maximum tolerated stop-and-copy pause.
    pub downtime_limit: Duration,
    /// Enables the `postcopy-ram` capability even when the policy does not need it (the
    /// caller then decides itself when to call [`QemuBackend::start_postcopy`]).
    pub postcopy_ram: bool,
    /// What [`QemuBackend::follow`] does when pre-copy does not converge. Post-copy
    /// policies need [`QemuBackend::configure`] on both ends.
    pub policy: ConvergencePolicy,
    pub stall: StallRule,
    /// Parallel migration channels (`multifd`), set on both ends. Each channel is its own
    /// connection to the destination URI, so a forwarder must accept several. Off by
    /// default: with 2 channels a busy 512 MiB TCG guest on this 2-core host took 0.8-1.6 s
    /// (downtime 36-166 ms) against 1.2-3.5 s (33-85 ms) without, which is noise rather
    /// than a win; and QEMU 10.0 refuses it together with `postcopy-ram` ("Postcopy is
    /// not yet compatible with multifd").
    pub multifd_channels: Option<u8>,
    /// Post-copy's background page push in bytes/s; QEMU's default 0 means unlimited.
    pub max_postcopy_bandwidth: Option<u64>,
}

impl Default for MigrationTuning {
    fn default() -> Self {
        MigrationTuning {
            max_bandwidth: 10 << 30,
            downtime_limit: Duration::from_millis(300),
            postcopy_ram: false,
            policy: ConvergencePolicy::None,
            stall: StallRule::default(),
            multifd_channels: None,
            max_postcopy_bandwidth: None,
        }
    }
}

/// Throttle profile for [`ConvergencePolicy::AutoConverge`]: before the switch QEMU may
/// throttle, but only by 1% plus 1% per step (the capability cannot wait to be turned on);
/// the switch raises the step. QEMU raises the throttle at most every other pass (it wants
/// two passes in a row that dirtied more than half of what they sent), so a 40% step
/// reaches its 99% cap in ~6 passes; 25% took ~12 in the TCG test, where the guest still
/// out-ran the link at 76%.
const GENTLE_THROTTLE: (u8, u8) = (1, 1);
const SWITCHED_THROTTLE_INCREMENT: u8 = 40;

/// Which phase the migration is in, from QEMU's own report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MigrationMode {
    #[default]
    PreCopy,
    /// Pre-copy with the guest's vCPUs throttled (auto-converge at work).
    Throttled,
    PostCopy,
}

impl MigrationMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationMode::PreCopy => "pre-copy",
            MigrationMode::Throttled => "pre-copy (throttled)",
            MigrationMode::PostCopy => "post-copy",
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
    /// Completed dirty-bitmap syncs: 1 during the first full pass, +1 per later pass.
    pub dirty_sync_count: u64,
    /// Pages per second the guest dirtied in the last pass.
    pub dirty_pages_rate: u64,
    /// Bytes per page of the counters above.
    pub page_size: u64,
    /// Current vCPU throttle in percent (auto-converge), when throttling.
    pub cpu_throttle_percent: Option<u64>,
    /// Pages the destination requested on fault during post-copy.
    pub postcopy_requests: u64,
    /// Bytes sent after the switch to post-copy; non-zero once post-copy ran, and still
    /// reported after completion (unlike `mode`, which a poll can miss).
    pub postcopy_bytes: u64,
    pub mode: MigrationMode,
    /// Set by [`QemuBackend::follow`] once its policy switched the migration (this sample
    /// and every later one).
    pub switched_to: Option<Switch>,
}

impl MigrationProgress {
    /// What the guest dirtied per second in the last pass, in bytes.
    pub fn dirty_bytes_per_sec(&self) -> u64 {
        self.dirty_pages_rate.saturating_mul(self.page_size)
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "cancelled")
    }

    /// Post-copy lost its connection: the guest's state is split between both ends, the
    /// source cannot resume it, and only `migrate` with `resume` could continue it.
    pub fn is_postcopy_broken(&self) -> bool {
        matches!(
            self.status.as_str(),
            "postcopy-paused" | "postcopy-recover-setup" | "postcopy-recover"
        )
    }

    fn from_info(info: qmp::MigrationInfo) -> Self {
        let status = info
            .status
            .map(|s| qapi::Enum::name(&s).to_string())
            .unwrap_or_else(|| "none".to_string());
        let ram = info.ram.as_ref();
        let throttle = info.cpu_throttle_percentage.filter(|&v| v > 0);
        let mode = if status.starts_with("postcopy") {
            MigrationMode::PostCopy
        } else if throttle.is_some() {
            MigrationMode::Throttled
        } else {
            MigrationMode::PreCopy
        };
        MigrationProgress {
            status,
            transferred_bytes: ram.map(|r| r.transferred.max(0) as u64).unwrap_or(0),
            remaining_bytes: ram.map(|r| r.remaining.max(0) as u64).unwrap_or(0),
            total_bytes: ram.map(|r| r.total.max(0) as u64).unwrap_or(0),
            expected_downtime_ms: info.expected_downtime.map(|v| v.max(0) as u64),
            downtime_ms: info.downtime.map(|v| v.max(0) as u64),
            total_time_ms: info.total_time.map(|v| v.max(0) as u64),
            error: info.error_desc,
            dirty_sync_count: ram.map(|r| r.dirty_sync_count.max(0) as u64).unwrap_or(0),
            dirty_pages_rate: ram.map(|r| r.dirty_pages_rate.max(0) as u64).unwrap_or(0),
            page_size: ram.map(|r| r.page_size.max(0) as u64).unwrap_or(0),
            cpu_throttle_percent: throttle.map(|v| v as u64),
            postcopy_requests: ram.map(|r| r.postcopy_requests.max(0) as u64).unwrap_or(0),
            postcopy_bytes: ram.map(|r| r.postcopy_bytes).unwrap_or(0),
            mode,
            switched_to: None,
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
    /// The greeting is awaited within `wait` too: QEMU serves one QMP client at a time,
    /// and a connection queued behind another client would otherwise wait forever.
    pub async fn connect(path: &Path, wait: Duration) -> Result<Self, QemuError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let attempt = tokio::time::timeout_at(
                deadline.max(tokio::time::Instant::now() + Duration::from_millis(500)),
                Self::try_connect(path),
            )
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no QMP greeting (another client holds the monitor?)",
                ))
            });
            match attempt {
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

    /// Applies parameters and capabilities. `postcopy-ram` and `multifd` must match on
    /// both ends, so call this on the destination too (before `migrate-incoming`).
    pub async fn configure(&self, t: &MigrationTuning) -> Result<(), QemuError> {
        if t.multifd_channels == Some(0) {
            return Err(QemuError::InvalidTuning(
                "multifd_channels must be at least 1".into(),
            ));
        }
        let cap = |capability, state| qmp::MigrationCapabilityStatus { capability, state };
        self.exec(qmp::migrate_set_capabilities {
            capabilities: vec![
                cap(
                    qmp::MigrationCapability::postcopy_ram,
                    t.postcopy_ram || t.policy.needs_postcopy_ram(),
                ),
                cap(
                    qmp::MigrationCapability::auto_converge,
                    t.policy.needs_auto_converge(),
                ),
                cap(
                    qmp::MigrationCapability::multifd,
                    t.multifd_channels.is_some(),
                ),
            ],
        })
        .await?;
        let mut params = qmp::MigrateSetParameters {
            max_bandwidth: Some(t.max_bandwidth),
            downtime_limit: Some(t.downtime_limit.as_millis() as u64),
            multifd_channels: t.multifd_channels,
            max_postcopy_bandwidth: t.max_postcopy_bandwidth,
            ..Default::default()
        };
        if t.policy.needs_auto_converge() {
            params.cpu_throttle_initial = Some(GENTLE_THROTTLE.0);
            params.cpu_throttle_increment = Some(GENTLE_THROTTLE.1);
        }
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

    /// Source: switch a running pre-copy migration to post-copy (needs `postcopy-ram` on
    /// both ends). From here on the destination runs the guest.
    pub async fn start_postcopy(&self) -> Result<(), QemuError> {
        self.exec(qmp::migrate_start_postcopy {}).await?;
        Ok(())
    }

    /// Source: make auto-converge's throttle climb fast (the capability must already be
    /// on, see [`ConvergencePolicy::AutoConverge`]). Parameters may change mid-migration;
    /// QEMU applies the step at the next pass.
    pub async fn escalate_throttle(&self) -> Result<(), QemuError> {
        self.exec(qmp::migrate_set_parameters(qmp::MigrateSetParameters {
            cpu_throttle_initial: Some(SWITCHED_THROTTLE_INCREMENT),
            cpu_throttle_increment: Some(SWITCHED_THROTTLE_INCREMENT),
            ..Default::default()
        }))
        .await?;
        Ok(())
    }

    /// Source: follows the migration until it finishes, applying `t.policy` (switch to
    /// post-copy or escalate auto-converge, at most once). Every sample goes to
    /// `on_progress` with [`MigrationProgress::switched_to`] filled in. `completed` is Ok;
    /// failed, cancelled, or post-copy broken (destination/link lost after the switch) is
    /// an error; on timeout the migration is left running for the caller to cancel.
    pub async fn follow(
        &self,
        t: &MigrationTuning,
        poll: Duration,
        timeout: Duration,
        on_progress: impl FnMut(&MigrationProgress),
    ) -> Result<MigrationProgress, QemuError> {
        self.follow_guarded(t, poll, timeout, |_| true, on_progress)
            .await
    }

    /// [`QemuBackend::follow`], asking `may_switch` right before a switch: the
    /// post-copy switch is the source's point of no return, which a rollback may have
    /// fenced (`Handover`); a refused switch is not made and pre-copy goes on.
    pub async fn follow_guarded(
        &self,
        t: &MigrationTuning,
        poll: Duration,
        timeout: Duration,
        mut may_switch: impl FnMut(Switch) -> bool,
        mut on_progress: impl FnMut(&MigrationProgress),
    ) -> Result<MigrationProgress, QemuError> {
        let limit_ms = t.downtime_limit.as_millis() as u64;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut history: Vec<MigrationProgress> = Vec::new();
        let mut switched = None;
        loop {
            let mut p = self.progress().await?;
            p.switched_to = switched;
            if switched.is_none() && t.policy != ConvergencePolicy::None {
                history.push(p.clone());
                if let Some(s) = decide(t.policy, &t.stall, limit_ms, &history)
                    && may_switch(s)
                {
                    tracing::info!(
                        switch = s.as_str(),
                        passes = p.dirty_sync_count,
                        expected_downtime_ms = ?p.expected_downtime_ms,
                        "pre-copy not converging; switching"
                    );
                    let r = match s {
                        Switch::PostCopy => self.start_postcopy().await,
                        Switch::AutoConverge => self.escalate_throttle().await,
                    };
                    match r {
                        Ok(()) => {
                            switched = Some(s);
                            p.switched_to = switched;
                            history = Vec::new();
                        }
                        // It may have completed between the sample and the command.
                        Err(e) if self.progress().await?.is_finished() => {
                            tracing::debug!(error = %e, "switch raced with the end");
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            on_progress(&p);
            if p.is_finished() || p.is_postcopy_broken() {
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

    /// Polls until the migration finishes; `completed` is Ok, anything else an error
    /// (also a broken post-copy, which would otherwise wait for a `resume` forever).
    /// [`Self::follow`] without a convergence policy.
    pub async fn wait_finished(
        &self,
        poll: Duration,
        timeout: Duration,
        on_progress: impl FnMut(&MigrationProgress),
    ) -> Result<MigrationProgress, QemuError> {
        let plain = MigrationTuning {
            policy: ConvergencePolicy::None,
            ..Default::default()
        };
        self.follow(&plain, poll, timeout, on_progress).await
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

    /// Ends QEMU. For QEMUs a test or benchmark started itself: the daemon never quits a
    /// pod's guest (its kubelet would restart the container and boot a second copy).
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
