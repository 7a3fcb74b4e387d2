//! runc, driven through typed invocations (checkpoint, list, state, pause/resume).
//! Pod discovery on top of `runc list` lives in `pod.rs`.
use super::criu;
use crate::error::RuntimeError;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokio::process::Command;

/// One entry of `runc list --format json`.
#[derive(Debug, Clone, Deserialize)]
pub struct RuncContainer {
    pub id: String,
    pub pid: u32,
    pub status: String,
    pub bundle: PathBuf,
    #[serde(default)]
    pub annotations: Option<HashMap<String, String>>,
}

impl RuncContainer {
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }
}

/// Options of `runc checkpoint` we use.
#[derive(Debug, Clone, Default)]
pub struct CheckpointOpts {
    pub image_path: PathBuf,
    pub work_path: PathBuf,
    pub leave_running: bool,
    pub tcp_established: bool,
    /// `--file-locks` (held file locks are dumped).
    pub file_locks: bool,
    /// `--ext-unix-sk` (unix sockets connected outside the container).
    pub ext_unix_sk: bool,
    /// host:port of a CRIU page server that receives the memory pages as they are dumped.
    pub page_server: Option<String>,
    pub lazy_pages: bool,
    /// fd (in runc's process) where CRIU writes a byte once lazy dump is ready.
    pub status_fd: Option<i32>,
}

/// Options of `runc restore` we use.
#[derive(Debug, Clone, Default)]
pub struct RestoreOpts {
    pub image_path: PathBuf,
    pub work_path: PathBuf,
    pub bundle: PathBuf,
    pub tcp_established: bool,
    pub lazy_pages: bool,
}

/// A runc binary plus the root (state directory) it manages.
#[derive(Debug, Clone)]
pub struct Runc {
    pub binary: PathBuf,
    pub root: PathBuf,
}

impl Runc {
    pub fn new(binary: impl Into<PathBuf>, root: impl Into<PathBuf>) -> Runc {
        Runc {
            binary: binary.into(),
            root: root.into(),
        }
    }

    /// `--root ROOT`: the flags every call starts with.
    pub fn base_args(&self) -> Vec<String> {
        vec!["--root".into(), self.root.display().to_string()]
    }

    pub fn list_args(&self) -> Vec<String> {
        let mut a = self.base_args();
        a.extend(["list".into(), "--format".into(), "json".into()]);
        a
    }

    pub fn checkpoint_args(&self, id: &str, o: &CheckpointOpts) -> Vec<String> {
        let mut a = self.base_args();
        a.push("checkpoint".into());
        a.extend(["--image-path".into(), o.image_path.display().to_string()]);
        a.extend(["--work-path".into(), o.work_path.display().to_string()]);
        if o.leave_running {
            a.push("--leave-running".into());
        }
        if o.tcp_established {
            a.push("--tcp-established".into());
        }
        if o.file_locks {
            a.push("--file-locks".into());
        }
        if o.ext_unix_sk {
            a.push("--ext-unix-sk".into());
        }
        if let Some(ps) = &o.page_server {
            a.extend(["--page-server".into(), ps.clone()]);
        }
        if o.lazy_pages {
            a.push("--lazy-pages".into());
        }
        if let Some(fd) = o.status_fd {
            a.extend(["--status-fd".into(), fd.to_string()]);
        }
        a.push(id.into());
        a
    }

    pub fn restore_args(&self, id: &str, o: &RestoreOpts) -> Vec<String> {
        let mut a = self.base_args();
        a.extend(["restore".into(), "--detach".into()]);
        a.extend(["--image-path".into(), o.image_path.display().to_string()]);
        a.extend(["--work-path".into(), o.work_path.display().to_string()]);
        a.extend(["--bundle".into(), o.bundle.display().to_string()]);
        if o.tcp_established {
            a.push("--tcp-established".into());
        }
        if o.lazy_pages {
            a.push("--lazy-pages".into());
        }
        a.push(id.into());
        a
    }

    pub fn simple_args(&self, verb: &str, id: &str, extra: &[&str]) -> Vec<String> {
        let mut a = self.base_args();
        a.push(verb.into());
        a.extend(extra.iter().map(|s| s.to_string()));
        a.push(id.into());
        a
    }

    /// Runs runc with `args`; on failure the error carries stderr and, when `criu_log`
    /// names a CRIU log, an excerpt of it.
    pub async fn run(
        &self,
        args: Vec<String>,
        criu_log: Option<&Path>,
    ) -> Result<Vec<u8>, RuntimeError> {
        tracing::debug!(runc = %self.binary.display(), ?args, "runc");
        let out = Command::new(&self.binary)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| {
                RuntimeError::command(
                    &self.binary.display().to_string(),
                    &args,
                    None,
                    e.to_string().as_bytes(),
                    String::new(),
                )
            })?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        let log = criu_log.map(criu::log_excerpt).unwrap_or_default();
        Err(RuntimeError::command(
            "runc",
            &args,
            Some(out.status),
            &out.stderr,
            log,
        ))
    }

    /// Starts runc without waiting (a lazy-pages checkpoint keeps serving pages after the
    /// dump): stdout and stderr piped, in its own process group so [`kill_group`] also
    /// stops the CRIU it started.
    pub fn spawn(
        &self,
        args: &[String],
        env: &[(&str, &Path)],
    ) -> Result<tokio::process::Child, RuntimeError> {
        tracing::debug!(runc = %self.binary.display(), ?args, ?env, "runc (spawned)");
        Command::new(&self.binary)
            .args(args)
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| {
                RuntimeError::command(
                    &self.binary.display().to_string(),
                    args,
                    None,
                    e.to_string().as_bytes(),
                    String::new(),
                )
            })
    }

    /// Waits for a [`Runc::spawn`]ed runc; a failure carries stderr and the CRIU log.
    pub async fn finish(
        &self,
        child: tokio::process::Child,
        args: &[String],
        criu_log: Option<&Path>,
    ) -> Result<(), RuntimeError> {
        let out = child
            .wait_with_output()
            .await
            .map_err(RuntimeError::io("waiting for runc"))?;
        if out.status.success() {
            return Ok(());
        }
        let log = criu_log.map(criu::log_excerpt).unwrap_or_default();
        Err(RuntimeError::command(
            "runc",
            args,
            Some(out.status),
            &out.stderr,
            log,
        ))
    }

    pub async fn list(&self) -> Result<Vec<RuncContainer>, RuntimeError> {
        if !self.root.exists() {
            return Ok(Vec::new());
        }
        let out = self.run(self.list_args(), None).await?;
        let text = String::from_utf8_lossy(&out);
        // runc prints `null` for an empty root.
        if text.trim() == "null" || text.trim().is_empty() {
            return Ok(Vec::new());
        }
        serde_json::from_str(&text).map_err(|e| {
            RuntimeError::FailedPrecondition(format!("cannot parse `runc list` output: {e}"))
        })
    }

    pub async fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        self.run(self.simple_args("pause", id, &[]), None)
            .await
            .map(drop)
    }

    pub async fn resume(&self, id: &str) -> Result<(), RuntimeError> {
        self.run(self.simple_args("resume", id, &[]), None)
            .await
            .map(drop)
    }

    /// `runc delete --force`: kills what is left and removes the state.
    pub async fn delete_force(&self, id: &str) -> Result<(), RuntimeError> {
        self.run(self.simple_args("delete", id, &["--force"]), None)
            .await
            .map(drop)
    }
}

/// SIGKILL to the process group `pgid` (a [`Runc::spawn`]ed runc and its CRIU).
pub fn kill_group(pgid: u32) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Resident memory of a process, from /proc (0 when it cannot be read).
pub fn rss_bytes(pid: u32) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_args_carry_every_option() {
        let r = Runc::new("runc", "/run/r");
        let a = r.checkpoint_args(
            "c1",
            &CheckpointOpts {
                image_path: "/i".into(),
                work_path: "/w".into(),
                leave_running: true,
                tcp_established: true,
                file_locks: true,
                ext_unix_sk: false,
                page_server: Some("10.0.0.2:5000".into()),
                lazy_pages: false,
                status_fd: None,
            },
        );
        assert_eq!(
            a.join(" "),
            "--root /run/r checkpoint --image-path /i --work-path /w --leave-running \
             --tcp-established --file-locks --page-server 10.0.0.2:5000 c1"
        );
    }

    #[test]
    fn lazy_checkpoint_and_restore_args() {
        let r = Runc::new("runc", "/run/r");
        let a = r.checkpoint_args(
            "c1",
            &CheckpointOpts {
                image_path: "/i".into(),
                work_path: "/w".into(),
                leave_running: true,
                tcp_established: false,
                page_server: Some("10.0.0.1:5000".into()),
                lazy_pages: true,
                status_fd: Some(1),
                ..Default::default()
            },
        );
        assert_eq!(
            a.join(" "),
            "--root /run/r checkpoint --image-path /i --work-path /w --leave-running \
             --page-server 10.0.0.1:5000 --lazy-pages --status-fd 1 c1"
        );
        let a = r.restore_args(
            "c1",
            &RestoreOpts {
                image_path: "/i".into(),
                work_path: "/w".into(),
                bundle: "/b".into(),
                tcp_established: true,
                lazy_pages: true,
            },
        );
        assert_eq!(
            a.join(" "),
            "--root /run/r restore --detach --image-path /i --work-path /w --bundle /b \
             --tcp-established --lazy-pages c1"
        );
    }
}
