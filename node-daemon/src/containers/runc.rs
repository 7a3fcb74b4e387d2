//! runc, driven through typed invocations (checkpoint, list, state, pause/resume).
//! Pod discovery on top of `runc list` lives in `pod.rs`.
use super::criu;
use crate::error::RuntimeError;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
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
    /// names a CRIU log, an excerpt of it. runc runs in its own process group, which is
    /// killed (runc and the CRIU it started) if this future is dropped before runc
    /// exits: an aborted operation leaves no dump holding the frozen pod's tasks.
    /// `limit` bounds the call; a call that takes longer is killed the same way.
    pub async fn run_within(
        &self,
        args: Vec<String>,
        criu_log: Option<&Path>,
        limit: Option<Duration>,
    ) -> Result<Vec<u8>, RuntimeError> {
        self.exec(args, &[], criu_log, limit).await
    }

    /// [`Runc::run_within`] with `env` added to runc's environment (which the CRIU it
    /// starts inherits: `CRIU_CONFIG_FILE` carries the options runc has no flag for).
    async fn exec(
        &self,
        args: Vec<String>,
        env: &[(&str, &Path)],
        criu_log: Option<&Path>,
        limit: Option<Duration>,
    ) -> Result<Vec<u8>, RuntimeError> {
        tracing::debug!(runc = %self.binary.display(), ?args, ?env, "runc");
        let spawn_err = |e: std::io::Error| {
            RuntimeError::command(
                &self.binary.display().to_string(),
                &args,
                None,
                e.to_string().as_bytes(),
                String::new(),
            )
        };
        let child = Command::new(&self.binary)
            .args(&args)
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(spawn_err)?;
        let group = GroupGuard(child.id());
        let wait = child.wait_with_output();
        let out = match limit {
            None => wait.await,
            Some(limit) => match tokio::time::timeout(limit, wait).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(RuntimeError::command(
                        "runc",
                        &args,
                        None,
                        format!("did not finish within {limit:?}; killed").as_bytes(),
                        criu_log.map(criu::log_excerpt).unwrap_or_default(),
                    ));
                }
            },
        }
        .map_err(spawn_err)?;
        group.disarm();
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

    /// [`Runc::run_within`] without a limit of its own (checkpoints and restores, whose
    /// length scales with the workload: the controller's progress and completion
    /// timeouts bound them, and its Abort drops, and so kills, them).
    pub async fn run(
        &self,
        args: Vec<String>,
        criu_log: Option<&Path>,
    ) -> Result<Vec<u8>, RuntimeError> {
        self.run_within(args, criu_log, None).await
    }

    /// [`Runc::run`] with `env` added to runc's environment (see [`Runc::exec`]).
    pub async fn run_env(
        &self,
        args: Vec<String>,
        env: &[(&str, &Path)],
        criu_log: Option<&Path>,
    ) -> Result<Vec<u8>, RuntimeError> {
        self.exec(args, env, criu_log, None).await
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
        // `runc list` fails outright when a container's state dir vanishes while it
        // reads the root (another Pod on the node being deleted): read it again.
        let mut attempt = 0;
        let out = loop {
            match self
                .run_within(self.list_args(), None, Some(SHORT_CALL))
                .await
            {
                Err(e) if attempt < 5 && e.to_string().contains("no such file or directory") => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "runc list raced a container's removal");
                    tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
                }
                r => break r?,
            }
        };
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
        self.run_within(self.simple_args("pause", id, &[]), None, Some(SHORT_CALL))
            .await
            .map(drop)
    }

    pub async fn resume(&self, id: &str) -> Result<(), RuntimeError> {
        self.run_within(self.simple_args("resume", id, &[]), None, Some(SHORT_CALL))
            .await
            .map(drop)
    }

    /// `runc delete --force`: kills what is left and removes the state.
    pub async fn delete_force(&self, id: &str) -> Result<(), RuntimeError> {
        self.run_within(
            self.simple_args("delete", id, &["--force"]),
            None,
            Some(SHORT_CALL),
        )
        .await
        .map(drop)
    }
}

/// How long `runc list`, `pause`, `resume` and `delete` may take: they do no copying,
/// so one that takes longer is stuck (a freezer that cannot freeze, a task in D state).
pub const SHORT_CALL: Duration = Duration::from_secs(60);

/// Kills a process group when dropped, unless disarmed once its leader exited.
struct GroupGuard(Option<u32>);

impl GroupGuard {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            kill_group(pgid);
        }
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

    /// The recorded pids that still run.
    fn alive(pids: &Path) -> Vec<i32> {
        std::fs::read_to_string(pids)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            // A zombie is dead (killed, not yet reaped by whoever inherited it).
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .ok()
                    .and_then(|st| {
                        st.rsplit(')')
                            .next()
                            .map(|r| !r.trim_start().starts_with('Z'))
                    })
                    .unwrap_or(false)
            })
            .collect()
    }

    /// Whether every recorded pid is gone within 5 s.
    async fn gone(pids: &Path) -> bool {
        for _ in 0..100 {
            if alive(pids).is_empty() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// A "runc" whose `list` fails twice as the real one does when a container's state
    /// dir vanishes mid-read (seen when a Pod beside the migrating one was deleted),
    /// then answers: `list` reads again; any other failure is not retried.
    #[tokio::test]
    async fn list_reads_again_when_a_container_vanished_mid_read() {
        let tmp = tempfile::tempdir().unwrap();
        let fake = tmp.path().join("runc");
        let calls = tmp.path().join("calls");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\necho x >> {c}\nif [ $(wc -l < {c}) -le 2 ]; then\n\
                 echo 'level=error msg=\"stat /run/runc/k8s.io/abc: no such file or directory\"' >&2\n\
                 exit 1\nfi\n\
                 echo '[{{\"id\":\"a\",\"pid\":7,\"status\":\"running\",\"bundle\":\"/b\"}}]'\n",
                c = calls.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let r = Runc::new(&fake, tmp.path());
        let cs = r.list().await.unwrap();
        assert_eq!(cs.len(), 1);
        assert_eq!((cs[0].id.as_str(), cs[0].pid), ("a", 7));
        assert_eq!(std::fs::read_to_string(&calls).unwrap().lines().count(), 3);

        std::fs::write(&fake, "#!/bin/sh\necho 'permission denied' >&2\nexit 1\n").unwrap();
        let e = r.list().await.expect_err("a real failure stays one");
        assert!(e.to_string().contains("permission denied"), "{e}");
    }

    /// A "runc" that starts a helper (as runc starts CRIU) and then hangs: a call over
    /// its limit, or dropped, ends both.
    #[tokio::test]
    async fn a_call_past_its_limit_or_dropped_kills_runc_and_its_children() {
        let tmp = tempfile::tempdir().unwrap();
        let fake = tmp.path().join("runc");
        let pids = tmp.path().join("pids");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\nsleep 1000 & echo $! >> {p}\necho $$ >> {p}\nwait\n",
                p = pids.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let r = Runc::new(&fake, tmp.path());
        let e = r
            .run_within(vec!["pause".into()], None, Some(Duration::from_millis(500)))
            .await
            .expect_err("a hung runc must not succeed");
        assert!(e.to_string().contains("did not finish within"), "{e}");
        assert!(gone(&pids).await, "left running: {:?}", alive(&pids));

        std::fs::remove_file(&pids).unwrap();
        let call = tokio::spawn(async move { r.run(vec!["checkpoint".into()], None).await });
        for _ in 0..100 {
            if alive(&pids).len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            alive(&pids).len(),
            2,
            "the fake runc and its helper started"
        );
        call.abort();
        let _ = call.await;
        assert!(
            gone(&pids).await,
            "left running after abort: {:?}",
            alive(&pids)
        );
    }

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
