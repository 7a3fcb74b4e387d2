//! CRIU, driven through typed invocations: the page server the destination runs, feature
//! probes, and log excerpts for errors. (runc drives `criu dump`/`restore` itself; the
//! benchmark's raw baseline uses [`DumpOpts`]/[`RestoreOpts`] directly.)
use crate::error::RuntimeError;
use crate::runtime::{Strategy, StrategySupport};
use std::path::{Path, PathBuf};
use tokio::process::Command;

/// The last lines of a CRIU log that matter: every `Error`/`Warn` line plus the tail.
pub fn log_excerpt(path: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut picked: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.contains("Error"))
        .collect();
    picked.truncate(10);
    let tail = &lines[lines.len().saturating_sub(5)..];
    for l in tail {
        if !picked.contains(l) {
            picked.push(l);
        }
    }
    format!("({})\n{}", path.display(), picked.join("\n"))
}

#[derive(Debug, Clone)]
pub struct Criu {
    pub binary: PathBuf,
}

impl Default for Criu {
    fn default() -> Self {
        Criu {
            binary: "criu".into(),
        }
    }
}

/// `criu page-server`: receives pages of one dump into `images_dir`.
#[derive(Debug, Clone)]
pub struct PageServerOpts {
    pub images_dir: PathBuf,
    pub address: String,
    pub port: u16,
    pub pidfile: PathBuf,
    pub log_file: PathBuf,
    /// Serve pages to a `criu lazy-pages` daemon instead of receiving them.
    pub lazy_pages: bool,
}

/// `criu dump` of a process tree (the baseline; runc builds its own for containers).
#[derive(Debug, Clone, Default)]
pub struct DumpOpts {
    pub pid: u32,
    pub images_dir: PathBuf,
    pub log_file: PathBuf,
    pub shell_job: bool,
    pub tcp_established: bool,
    pub leave_running: bool,
    pub page_server: Option<(String, u16)>,
    pub lazy_pages: bool,
}

#[derive(Debug, Clone, Default)]
pub struct RestoreOpts {
    pub images_dir: PathBuf,
    pub log_file: PathBuf,
    pub shell_job: bool,
    pub tcp_established: bool,
    pub detach: bool,
    pub lazy_pages: bool,
    pub pidfile: Option<PathBuf>,
}

impl Criu {
    pub fn page_server_args(o: &PageServerOpts) -> Vec<String> {
        let mut a = vec![
            "page-server".into(),
            "--daemon".into(),
            "--images-dir".into(),
            o.images_dir.display().to_string(),
            "--address".into(),
            o.address.clone(),
            "--port".into(),
            o.port.to_string(),
            "--pidfile".into(),
            o.pidfile.display().to_string(),
            "-o".into(),
            o.log_file.display().to_string(),
            "-v4".into(),
        ];
        if o.lazy_pages {
            a.push("--lazy-pages".into());
        }
        a
    }

    pub fn dump_args(o: &DumpOpts) -> Vec<String> {
        let mut a = vec![
            "dump".into(),
            "--tree".into(),
            o.pid.to_string(),
            "--images-dir".into(),
            o.images_dir.display().to_string(),
            "-o".into(),
            o.log_file.display().to_string(),
            "-v4".into(),
        ];
        for (on, flag) in [
            (o.shell_job, "--shell-job"),
            (o.tcp_established, "--tcp-established"),
            (o.leave_running, "--leave-running"),
            (o.lazy_pages, "--lazy-pages"),
        ] {
            if on {
                a.push(flag.into());
            }
        }
        if let Some((addr, port)) = &o.page_server {
            a.extend([
                "--page-server".into(),
                "--address".into(),
                addr.clone(),
                "--port".into(),
                port.to_string(),
            ]);
        }
        a
    }

    pub fn restore_args(o: &RestoreOpts) -> Vec<String> {
        let mut a = vec![
            "restore".into(),
            "--images-dir".into(),
            o.images_dir.display().to_string(),
            "-o".into(),
            o.log_file.display().to_string(),
            "-v4".into(),
        ];
        for (on, flag) in [
            (o.shell_job, "--shell-job"),
            (o.tcp_established, "--tcp-established"),
            (o.detach, "--restore-detached"),
            (o.lazy_pages, "--lazy-pages"),
        ] {
            if on {
                a.push(flag.into());
            }
        }
        if let Some(p) = &o.pidfile {
            a.extend(["--pidfile".into(), p.display().to_string()]);
        }
        a
    }

    /// Runs criu; failures carry stderr and the log excerpt of `log`.
    pub async fn run(
        &self,
        args: Vec<String>,
        log: Option<&Path>,
    ) -> Result<Vec<u8>, RuntimeError> {
        tracing::debug!(?args, "criu");
        let bin = self.binary.display().to_string();
        let out = Command::new(&self.binary)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| {
                RuntimeError::command(&bin, &args, None, e.to_string().as_bytes(), String::new())
            })?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        Err(RuntimeError::command(
            &bin,
            &args,
            Some(out.status),
            &out.stderr,
            log.map(log_excerpt).unwrap_or_default(),
        ))
    }

    /// Starts a page server; returns once it listens (`--daemon` forks after bind) with
    /// the daemon's pid.
    pub async fn start_page_server(&self, o: &PageServerOpts) -> Result<u32, RuntimeError> {
        self.run(Self::page_server_args(o), Some(&o.log_file))
            .await?;
        let pid = std::fs::read_to_string(&o.pidfile)
            .map_err(RuntimeError::io("reading page-server pidfile"))?;
        pid.trim().parse().map_err(|_| {
            RuntimeError::FailedPrecondition(format!("bad page-server pidfile {:?}", pid))
        })
    }

    async fn feature(&self, name: &str) -> Result<(), String> {
        let args = vec!["check".to_string(), "--feature".into(), name.into()];
        match Command::new(&self.binary).args(&args).output().await {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(format!(
                "`criu check --feature {name}` failed: {}",
                String::from_utf8_lossy(&o.stdout).trim().to_string()
                    + String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Err(format!("cannot run {}: {e}", self.binary.display())),
        }
    }

    /// What this node can do, probed once at daemon start.
    pub async fn probe(&self) -> Vec<StrategySupport> {
        let base = match Command::new(&self.binary).arg("check").output().await {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(format!(
                "`criu check` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Err(format!(
                "criu not usable ({}): {e}; run scripts/install-criu.sh",
                self.binary.display()
            )),
        };
        let support = |strategy, r: Result<(), String>| StrategySupport {
            strategy,
            available: r.is_ok(),
            reason: r.err().unwrap_or_default(),
        };
        // Post-copy needs userfaultfd with non-cooperative events (fork, remap) in the kernel.
        let uffd = match &base {
            Ok(()) => self
                .feature("uffd-noncoop")
                .await
                .map_err(|e| format!("kernel lacks userfaultfd: {e}")),
            Err(e) => Err(e.clone()),
        };
        // Pre-copy needs soft-dirty tracking (or the pagemap scan ioctl).
        let dirty = match &base {
            Ok(()) => self.feature("mem_dirty_track").await,
            Err(e) => Err(e.clone()),
        };
        let post = uffd.and(Err(
            "post-copy (lazy pages) is not implemented in ferry-node yet".to_string(),
        ));
        let pre = dirty.and(Err(
            "pre-copy (iterative pre-dump) is not implemented in ferry-node yet".to_string(),
        ));
        vec![
            support(Strategy::Cold, base),
            support(Strategy::PreCopy, pre),
            support(Strategy::PostCopy, post),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_server_args() {
        let a = Criu::page_server_args(&PageServerOpts {
            images_dir: "/i".into(),
            address: "10.0.0.2".into(),
            port: 4000,
            pidfile: "/p".into(),
            log_file: "/l".into(),
            lazy_pages: false,
        });
        assert_eq!(
            a.join(" "),
            "page-server --daemon --images-dir /i --address 10.0.0.2 --port 4000 --pidfile /p -o /l -v4"
        );
    }

    #[test]
    fn excerpt_keeps_errors_and_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dump.log");
        std::fs::write(&p, "a\nError (x.c:1): boom\nb\nc\nd\ne\nf\ng\n").unwrap();
        let e = log_excerpt(&p);
        assert!(e.contains("boom") && e.contains("g") && !e.contains("\na\n"));
    }
}
