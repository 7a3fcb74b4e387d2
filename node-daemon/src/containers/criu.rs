//! CRIU, driven through typed invocations: the page server and the lazy-pages daemon the
//! destination runs, feature probes, and log excerpts for errors. (runc drives `criu dump`/`restore` itself; the
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

/// The Migration setting that would let a dump pass, when CRIU's dump log says why it
/// failed for want of an option.
pub fn option_hint(dump_log: &str) -> Option<&'static str> {
    if dump_log.contains("--file-locks") || dump_log.contains("file locks") {
        Some("the workload holds file locks: set spec.criu.fileLocks: true on the Migration")
    } else if dump_log.contains("--ext-unix-sk") || dump_log.contains("External socket") {
        Some(
            "the workload has a unix socket connected outside its container: set \
             spec.criu.externalUnixSockets: true on the Migration",
        )
    } else {
        None
    }
}

/// The options file of a dump (`CRIU_CONFIG_FILE`; CRIU reads it before the request
/// runc sends, which does not override these): what runc's `checkpoint` has no flag for.
pub fn dump_config(lazy: bool) -> String {
    // A connection a client opened while the pod was frozen waits, handshake done, in
    // its listener's accept queue: CRIU cannot move it and would fail the whole dump
    // ("In-flight connection"), so a busy server could never move. Skipped, it is
    // dropped with the source, as every connection to the source's pod IP is.
    let mut c = String::from("skip-in-flight\n");
    if lazy {
        // CRIU's RPC takes only the port of a lazy page server and listens on every
        // address; this keeps it on loopback, where the relay reaches it (relay.rs).
        // The e2e test lists CRIU's sockets to hold this.
        c.push_str("address 127.0.0.1\n");
    }
    c
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

/// `criu lazy-pages`: the destination's userfaultfd daemon. A restore started with
/// `--lazy-pages` hands it the restored tasks' userfaultfds (through
/// `lazy-pages.socket` in `work_dir`, which must be the restore's work dir); it fetches
/// every missing page from the source's lazy page server, first the ones faulted on,
/// then the rest in the background, and exits when all are in.
#[derive(Debug, Clone)]
pub struct LazyPagesOpts {
    pub images_dir: PathBuf,
    pub work_dir: PathBuf,
    /// The source's lazy page server (`runc checkpoint --lazy-pages`).
    pub source_address: String,
    pub source_port: u16,
    pub pidfile: PathBuf,
    pub log_file: PathBuf,
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

    pub fn lazy_pages_args(o: &LazyPagesOpts) -> Vec<String> {
        vec![
            "lazy-pages".into(),
            "--daemon".into(),
            "--page-server".into(),
            "--address".into(),
            o.source_address.clone(),
            "--port".into(),
            o.source_port.to_string(),
            "--images-dir".into(),
            o.images_dir.display().to_string(),
            "--work-dir".into(),
            o.work_dir.display().to_string(),
            "--pidfile".into(),
            o.pidfile.display().to_string(),
            "-o".into(),
            o.log_file.display().to_string(),
            "-v4".into(),
        ]
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

    /// Starts the lazy-pages daemon; returns its pid once its socket is ready (`--daemon`
    /// forks after that), so a `runc restore --lazy-pages` may start right away.
    pub async fn start_lazy_pages(&self, o: &LazyPagesOpts) -> Result<u32, RuntimeError> {
        self.run(Self::lazy_pages_args(o), Some(&o.log_file))
            .await?;
        let pid = std::fs::read_to_string(&o.pidfile)
            .map_err(RuntimeError::io("reading lazy-pages pidfile"))?;
        pid.trim().parse().map_err(|_| {
            RuntimeError::FailedPrecondition(format!("bad lazy-pages pidfile {:?}", pid))
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
        let post = uffd.and_then(|()| {
            lazy_pipe_check(
                read_pipe_max_size(),
                has_cap_sys_resource(
                    &std::fs::read_to_string("/proc/self/status").unwrap_or_default(),
                ),
            )
        });
        let pre = match dirty {
            Err(e) if e.contains("mem_dirty_track") => Err(
                "the kernel has no soft-dirty memory tracking (CONFIG_MEM_SOFT_DIRTY is off; \
                 `criu check --feature mem_dirty_track`: \"Dirty tracking is OFF\"): CRIU \
                 pre-dump needs it (runc checkpoint --pre-dump: \"CRIU is missing features\")"
                    .to_string(),
            ),
            Err(e) => Err(e),
            Ok(()) => Err(
                "pre-copy (iterative pre-dump) is not implemented in ferry-node: it could not \
                 be tested on a kernel without soft-dirty tracking"
                    .to_string(),
            ),
        };
        vec![
            support(Strategy::Cold, base),
            support(Strategy::PreCopy, pre),
            support(Strategy::PostCopy, post),
        ]
    }
}

/// The pipe size CRIU's lazy page server asks for (`pipe_read_dest_init`: PIPE_MAX_SIZE
/// pages = 819 pages of 4 KiB, which the kernel rounds up to 1024 pages).
pub const LAZY_PIPE_BYTES: u64 = 4 << 20;

fn read_pipe_max_size() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// CAP_SYS_RESOURCE (bit 24) in the `CapEff:` line of /proc/self/status.
fn has_cap_sys_resource(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

/// CRIU's lazy page server (the source side of post-copy) grows a pipe to
/// [`LAZY_PIPE_BYTES`] and ignores a failure, so without CAP_SYS_RESOURCE and with
/// `fs.pipe-max-size` below that its sink fd stays -1 and the first page request fails
/// with `page-pipe: splice: -1: Bad file descriptor` ("Lazy pages transfer FAILED").
fn lazy_pipe_check(pipe_max: Option<u64>, cap_sys_resource: bool) -> Result<(), String> {
    match pipe_max {
        _ if cap_sys_resource => Ok(()),
        Some(n) if n >= LAZY_PIPE_BYTES => Ok(()),
        n => Err(format!(
            "CRIU's lazy page server needs {LAZY_PIPE_BYTES}-byte pipes: this daemon lacks \
             CAP_SYS_RESOURCE and fs.pipe-max-size is {}; without it the source fails with \
             `page-pipe: splice: -1: Bad file descriptor` (run `sysctl -w \
             fs.pipe-max-size={LAZY_PIPE_BYTES}`, as scripts/install-criu.sh does)",
            n.map_or("unreadable".to_string(), |n| n.to_string())
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dump_skips_queued_connections_and_a_lazy_one_serves_on_loopback() {
        assert_eq!(dump_config(false), "skip-in-flight\n");
        assert_eq!(dump_config(true), "skip-in-flight\naddress 127.0.0.1\n");
    }

    #[test]
    fn lazy_pipe_needs_cap_or_sysctl() {
        assert!(lazy_pipe_check(Some(1 << 20), true).is_ok());
        assert!(lazy_pipe_check(Some(4 << 20), false).is_ok());
        let e = lazy_pipe_check(Some(1 << 20), false).unwrap_err();
        assert!(
            e.contains("fs.pipe-max-size is 1048576") && e.contains("splice"),
            "{e}"
        );
        assert!(has_cap_sys_resource("CapEff:\t000001ffffffffff\n"));
        assert!(!has_cap_sys_resource("CapEff:\t000001fffeffffff\n"));
    }

    #[test]
    fn lazy_pages_args() {
        let a = Criu::lazy_pages_args(&LazyPagesOpts {
            images_dir: "/i".into(),
            work_dir: "/w".into(),
            source_address: "10.0.0.1".into(),
            source_port: 5000,
            pidfile: "/p".into(),
            log_file: "/l".into(),
        });
        assert_eq!(
            a.join(" "),
            "lazy-pages --daemon --page-server --address 10.0.0.1 --port 5000 --images-dir /i \
             --work-dir /w --pidfile /p -o /l -v4"
        );
    }

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
    fn dump_failures_name_the_option_that_helps() {
        let locks =
            "Error (criu/file-lock.c:123): Some file locks are hold without --file-locks option";
        assert!(option_hint(locks).unwrap().contains("spec.criu.fileLocks"));
        let sk = "Error (criu/sk-unix.c:1): External socket is used. Consider using --ext-unix-sk option.";
        assert!(option_hint(sk).unwrap().contains("externalUnixSockets"));
        assert_eq!(option_hint("Error: something else"), None);
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
