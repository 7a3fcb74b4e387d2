//! Child processes owned by a test: killed with their whole process group when the
//! guard drops, so a failing test leaves nothing running.
use anyhow::{Context, Result};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct ChildGuard {
    name: String,
    child: Option<Child>,
}

impl ChildGuard {
    /// Spawns `cmd` as the leader of a new process group.
    pub fn spawn(name: &str, mut cmd: Command) -> Result<ChildGuard> {
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(ChildGuard {
            name: name.to_string(),
            child: Some(child),
        })
    }

    /// Takes the child's stdout pipe (when spawned with `Stdio::piped()`).
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.as_mut().and_then(|c| c.stdout.take())
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Whether the process has exited (and reaps it if so).
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// SIGTERM to the group, then SIGKILL after `grace`. `kill` stays quiet: a group
    /// that is already gone is the expected case, not an error.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pgid = format!("-{}", child.id());
        let _ = Command::new("kill")
            .args(["-TERM", "--", &pgid])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(name = %self.name, "did not stop in {grace:?}; killing");
        let _ = Command::new("kill")
            .args(["-KILL", "--", &pgid])
            .stderr(Stdio::null())
            .status();
        let _ = child.wait();
    }

    /// Stops the whole group (SIGSTOP) until the guard is dropped: the processes keep
    /// their sockets and answer nothing, as on a host that froze.
    pub fn suspend(&self) -> Result<Stopped> {
        let group = format!("-{}", self.id());
        anyhow::ensure!(self.id() != 0, "{} is not running", self.name);
        signal(&group, "STOP")?;
        Ok(Stopped {
            target: group,
            name: self.name.clone(),
        })
    }

    /// SIGKILL to the group at once (a crash, for failure tests).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .stderr(Stdio::null())
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// A process (or group) stopped with SIGSTOP ([`ChildGuard::suspend`],
/// [`crate::testenv::TestEnv::stop_apiserver`]); continued (SIGCONT) when dropped.
pub struct Stopped {
    target: String,
    name: String,
}

impl Stopped {
    /// Stops process `pid` (not its group) until the guard drops.
    pub fn pid(pid: u32, name: &str) -> Result<Stopped> {
        let target = pid.to_string();
        signal(&target, "STOP")?;
        Ok(Stopped {
            target,
            name: name.to_string(),
        })
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Err(e) = signal(&self.target, "CONT") {
            tracing::warn!("continuing {} ({}): {e:#}", self.name, self.target);
        }
    }
}

/// `kill -SIG` to a pid, or to a process group as `-PGID`.
fn signal(target: &str, sig: &str) -> Result<()> {
    let out = Command::new("kill")
        .args([&format!("-{sig}"), "--", target])
        .output()
        .context("running kill")?;
    anyhow::ensure!(
        out.status.success(),
        "kill -{sig} {target}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}
