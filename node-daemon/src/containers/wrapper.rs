//! `ferry-runtime`: the OCI runtime containerd's runc shim runs for the `ferry`
//! RuntimeClass (handler option `BinaryName`), the way nvidia-container-runtime wraps
//! runc. Every call goes straight to runc (`exec`), except for a container marked as a
//! migration target (see `staging.rs`):
//!
//! - `create` waits, bounded, for the checkpoint the node daemon staged for this Pod
//!   UID and container, applies the source's writable-layer changes to the rootfs
//!   containerd prepared, and runs `runc restore --detach` into the sandbox the kubelet
//!   made, with the pid file the shim asked for; the restored process becomes the
//!   shim's child (the shim is a subreaper), so the kubelet owns it like any container;
//! - the following `start` finds the container already running and does nothing.
//!
//! Configuration: `ferry-runtime.json` next to the binary (see [`WrapperConfig`]).
use super::rootfs;
use super::staging::{self, CriuOptions, RestorePlan, Restored, StageDir};
use serde::Deserialize;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// `ferry-runtime.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WrapperConfig {
    /// The real runc.
    #[serde(default = "default_runc")]
    pub runc: PathBuf,
    /// CRIU for `runc restore` (runc's `--criu`).
    #[serde(default)]
    pub criu: Option<PathBuf>,
    /// The node daemon's state dir (where it stages checkpoints).
    #[serde(default = "default_state")]
    pub state_dir: PathBuf,
    /// Longest a `create` waits for the staged checkpoint (keep it well below the
    /// kubelet's runtimeRequestTimeout).
    #[serde(default = "default_wait")]
    pub create_wait_seconds: u64,
}

fn default_runc() -> PathBuf {
    "runc".into()
}
fn default_state() -> PathBuf {
    "/var/lib/ferry".into()
}
fn default_wait() -> u64 {
    90
}

impl WrapperConfig {
    /// Reads `<dir of exe>/ferry-runtime.json`; defaults when it does not exist.
    pub fn load(exe: &Path) -> Result<WrapperConfig, String> {
        let path = exe.with_file_name("ferry-runtime.json");
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(serde_json::from_str("{}").expect("defaults"))
            }
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }
}

/// runc's global flags that take a value (everything before the command).
const GLOBAL_WITH_VALUE: &[&str] = &["--root", "--log", "--log-format", "--criu", "--rootless"];

/// A runc command line split into global flags, the command and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuncCall {
    pub global: Vec<String>,
    pub command: String,
    pub args: Vec<String>,
}

impl RuncCall {
    pub fn parse(argv: &[String]) -> Option<RuncCall> {
        let mut i = 0;
        while i < argv.len() {
            let a = &argv[i];
            if !a.starts_with('-') {
                return Some(RuncCall {
                    global: argv[..i].to_vec(),
                    command: a.clone(),
                    args: argv[i + 1..].to_vec(),
                });
            }
            i += if !a.contains('=') && GLOBAL_WITH_VALUE.contains(&a.as_str()) {
                2
            } else {
                1
            };
        }
        None
    }

    /// The value of a global flag (`--log F` or `--log=F`).
    pub fn global_value(&self, flag: &str) -> Option<String> {
        flag_value(&self.global, flag)
    }

    pub fn arg_value(&self, flags: &[&str]) -> Option<String> {
        flags.iter().find_map(|f| flag_value(&self.args, f))
    }

    /// The container id: the last argument.
    pub fn id(&self) -> Option<&str> {
        self.args.last().map(String::as_str)
    }
}

fn flag_value(args: &[String], flag: &str) -> Option<String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == flag {
            return it.next().cloned();
        }
        if let Some(v) = a.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            return Some(v.to_string());
        }
    }
    None
}

/// Entry point: returns only when it does not `exec` runc.
pub fn main(argv: Vec<String>) -> i32 {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from(&argv[0]));
    let cfg = match WrapperConfig::load(&exe) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry-runtime: {e}");
            return 1;
        }
    };
    let rest: Vec<String> = argv[1..].to_vec();
    let call = RuncCall::parse(&rest);
    let outcome = match &call {
        Some(c) if c.command == "create" => create(&cfg, c),
        Some(c) if c.command == "start" => start(&cfg, c),
        _ => Pass,
    };
    match outcome {
        Pass => {
            let err = Command::new(&cfg.runc).args(&rest).exec();
            eprintln!("ferry-runtime: exec {}: {err}", cfg.runc.display());
            127
        }
        Done => 0,
        Fail(msg) => {
            report_error(call.as_ref(), &msg);
            1
        }
    }
}

enum Outcome {
    Pass,
    Done,
    Fail(String),
}
use Outcome::*;

/// The error where containerd looks for it (runc's JSON `--log` file) and on stderr.
fn report_error(call: Option<&RuncCall>, msg: &str) {
    eprintln!("ferry-runtime: {msg}");
    if let Some(log) = call.and_then(|c| c.global_value("--log"))
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
    {
        let line = serde_json::json!({"level": "error", "msg": format!("ferry-runtime: {msg}"),
            "time": chrono_like_now()});
        let _ = writeln!(f, "{line}");
    }
}

/// RFC 3339 UTC, as containerd parses runc's log lines.
fn chrono_like_now() -> String {
    rfc3339(crate::runtime::unix_ms() / 1000)
}

fn rfc3339(secs: u64) -> String {
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// What the bundle's OCI config says about the container.
struct Marked {
    migration_id: String,
    stage: StageDir,
    bundle: PathBuf,
    config: serde_json::Value,
}

fn marked(cfg: &WrapperConfig, call: &RuncCall) -> Result<Option<Marked>, String> {
    let bundle = PathBuf::from(
        call.arg_value(&["--bundle", "-b"])
            .unwrap_or_else(|| ".".into()),
    );
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let config: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let ann = |k: &str| config["annotations"][k].as_str().map(str::to_string);
    let Some(migration_id) = ann(staging::MIGRATION_ANNOTATION) else {
        return Ok(None);
    };
    // The sandbox and ferry's own gate (an init container) start normally.
    if ann(staging::ANN_CONTAINER_TYPE).as_deref() != Some("container")
        || ann(staging::ANN_CONTAINER_NAME).as_deref() == Some(staging::GATE_CONTAINER)
    {
        return Ok(None);
    }
    let uid = ann(staging::ANN_SANDBOX_UID).unwrap_or_default();
    let name = ann(staging::ANN_CONTAINER_NAME).unwrap_or_default();
    let stage = StageDir::new(&cfg.state_dir, &uid, &name).ok_or_else(|| {
        format!("container annotations name no valid pod ({uid:?}) or container ({name:?})")
    })?;
    Ok(Some(Marked {
        migration_id,
        stage,
        bundle,
        config,
    }))
}

fn create(cfg: &WrapperConfig, call: &RuncCall) -> Outcome {
    let m = match marked(cfg, call) {
        Ok(Some(m)) => m,
        Ok(None) => return Pass,
        Err(e) => return Fail(e),
    };
    let st = &m.stage;
    if st.has(staging::CONSUMED) {
        return Pass; // a restart after the restore: a fresh start, like any restart
    }
    if let Some(why) = st.read(staging::FAILED) {
        return Fail(format!(
            "the restore of this container failed before: {why}"
        ));
    }
    let started = Instant::now();
    // Tells the daemon the kubelet got this far: the cut need not wait any longer.
    let _ = st.mark(staging::WAITING, b"");
    let plan = match wait_ready(cfg, st, &m.migration_id) {
        Ok(p) => p,
        Err(e) => {
            let _ = st.mark(staging::FAILED, e.as_bytes());
            return Fail(e);
        }
    };
    // The last word before the restore, against the daemon's Abort: whichever decides
    // first holds, so an Abort that won knows this container never runs here.
    match st.decide(staging::Decision::Restore) {
        Ok(staging::Decision::Restore) => {}
        Ok(staging::Decision::Abort) => {
            return Fail(format!(
                "migration {} was aborted; not restoring",
                m.migration_id
            ));
        }
        Err(e) => {
            let e = format!("deciding to restore: {e}");
            let _ = st.mark(staging::FAILED, e.as_bytes());
            return Fail(e);
        }
    }
    // Its emptyDirs before the restore: a process may hold their files open.
    let deadline = started + Duration::from_secs(cfg.create_wait_seconds);
    let pod_stages = st.dir.parent().unwrap_or(&st.dir);
    if let Err(e) = super::volumes::fill(pod_stages, &m.config, &plan.empty_dirs, deadline) {
        let _ = st.mark(staging::FAILED, e.as_bytes());
        return Fail(e);
    }
    let waited = started.elapsed();
    let restore_start = crate::runtime::unix_ms();
    match restore(cfg, call, &m, &plan) {
        Ok(pid) => {
            let r = Restored {
                pid,
                started_unix_ms: restore_start,
                at_unix_ms: crate::runtime::unix_ms(),
            };
            let _ = st.mark(staging::RESTORED, &serde_json::to_vec(&r).expect("json"));
            let _ = st.mark(staging::CONSUMED, b"");
            log_line(
                cfg,
                &format!(
                    "restored {} (migration {}) as pid {pid}; waited {waited:?} for the checkpoint",
                    st.dir.display(),
                    m.migration_id
                ),
            );
            Done
        }
        Err(e) => {
            let _ = st.mark(staging::FAILED, e.as_bytes());
            if let Some(id) = call.id() {
                // runc may leave a half-created container behind.
                let _ = Command::new(&cfg.runc)
                    .args(&call.global)
                    .args(["delete", "--force", id])
                    .output();
            }
            Fail(e)
        }
    }
}

/// Waits for `ready` (or `aborted`), bounded by the plan's deadline.
fn wait_ready(
    cfg: &WrapperConfig,
    st: &StageDir,
    migration_id: &str,
) -> Result<RestorePlan, String> {
    // The kubelet's runtime request timeout (2 minutes by default) runs from the
    // create call: give up well before it, with a reason the kubelet shows.
    let deadline = Instant::now() + Duration::from_secs(cfg.create_wait_seconds);
    loop {
        if st.has(staging::ABORTED) {
            return Err(format!(
                "migration {migration_id} was aborted; not restoring"
            ));
        }
        let plan = st.plan().ok();
        if let Some(p) = &plan
            && p.migration_id != migration_id
        {
            return Err(format!(
                "staged checkpoint belongs to migration {}, the pod names {migration_id}",
                p.migration_id
            ));
        }
        if st.has(staging::READY)
            && let Some(p) = plan
        {
            return Ok(p);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no checkpoint for migration {migration_id} staged in {} in time",
                st.dir.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn restore(
    cfg: &WrapperConfig,
    call: &RuncCall,
    m: &Marked,
    plan: &RestorePlan,
) -> Result<u32, String> {
    let id = call.id().ok_or("create without a container id")?;
    let rootfs = {
        let root = m.config["root"]["path"].as_str().unwrap_or("rootfs");
        let p = Path::new(root);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            m.bundle.join(p)
        }
    };
    rootfs::apply_diff(
        &rootfs,
        &m.stage.path(staging::ROOTFS_DIFF),
        &m.stage.path(staging::DELETED),
    )
    .map_err(|e| {
        format!(
            "applying the source's writable layer to {}: {e}",
            rootfs.display()
        )
    })?;
    let criu_conf = m.stage.path("criu-restore.conf");
    std::fs::write(&criu_conf, criu_config(&plan.criu))
        .map_err(|e| format!("writing {}: {e}", criu_conf.display()))?;
    // runc hands the file this annotation names to CRIU as its configuration.
    let mut config = m.config.clone();
    config["annotations"]["org.criu.config"] = criu_conf.display().to_string().into();
    let cfg_path = m.bundle.join("config.json");
    std::fs::write(&cfg_path, serde_json::to_vec(&config).expect("json"))
        .map_err(|e| format!("writing {}: {e}", cfg_path.display()))?;

    let pid_file = call
        .arg_value(&["--pid-file"])
        .map(PathBuf::from)
        .unwrap_or_else(|| m.bundle.join("init.pid"));
    let args = restore_args(
        call,
        id,
        &m.bundle,
        &m.stage,
        &pid_file,
        plan,
        cfg.criu.as_deref(),
    );
    // runc restore must keep this process's stdio: the shim passed the container's
    // stdout/stderr pipes here, and runc hands them to the restored process in place
    // of the source's (CRIU's inherit-fd). Capturing them would swallow the
    // container's log and never see EOF; runc's own errors go to its --log file.
    let status = Command::new(&cfg.runc)
        .args(&args)
        .status()
        .map_err(|e| format!("running {}: {e}", cfg.runc.display()))?;
    if !status.success() {
        let log =
            crate::containers::criu::log_excerpt(&m.stage.path(staging::WORK).join("restore.log"));
        let runc_log = call
            .global_value("--log")
            .map(|l| last_error(Path::new(&l)))
            .unwrap_or_default();
        return Err(format!(
            "runc restore failed ({status}): {runc_log}{}",
            if log.is_empty() {
                String::new()
            } else {
                format!("\n{log}")
            }
        ));
    }
    let pid = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| format!("runc restore wrote no pid to {}", pid_file.display()))?;
    Ok(pid)
}

/// The last error runc wrote to its JSON log.
fn last_error(log: &Path) -> String {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["level"] == "error")
        .and_then(|v| v["msg"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The CRIU configuration file of a restore (one option per line).
pub fn criu_config(o: &CriuOptions) -> String {
    let mut s = String::from("# written by ferry-runtime\n");
    if !o.tcp_keep {
        // The pod IP changes with the node: connections cannot continue; the peer
        // sees them closed and reconnects.
        s.push_str("tcp-close\n");
    }
    s
}

/// `runc restore` for a `create` call: the shim's global flags (root, log), the
/// bundle and pid file it asked for, and the staged images.
pub fn restore_args(
    call: &RuncCall,
    id: &str,
    bundle: &Path,
    st: &StageDir,
    pid_file: &Path,
    plan: &RestorePlan,
    criu: Option<&Path>,
) -> Vec<String> {
    let mut a = call.global.clone();
    if let Some(c) = criu
        && call.global_value("--criu").is_none()
    {
        a.extend(["--criu".into(), c.display().to_string()]);
    }
    a.extend(["restore".into(), "--detach".into(), "--no-subreaper".into()]);
    a.extend(["--bundle".into(), bundle.display().to_string()]);
    a.extend([
        "--image-path".into(),
        st.path(staging::IMAGES).display().to_string(),
    ]);
    a.extend([
        "--work-path".into(),
        st.path(staging::WORK).display().to_string(),
    ]);
    a.extend(["--pid-file".into(), pid_file.display().to_string()]);
    if call.args.iter().any(|x| x == "--no-pivot") {
        a.push("--no-pivot".into());
    }
    if plan.lazy {
        a.push("--lazy-pages".into());
    }
    if plan.criu.tcp_keep {
        a.push("--tcp-established".into());
    }
    if plan.criu.file_locks {
        a.push("--file-locks".into());
    }
    if plan.criu.external_unix_sockets {
        a.push("--ext-unix-sk".into());
    }
    a.push(id.into());
    a
}

/// `start` of a restored container: it already runs.
fn start(cfg: &WrapperConfig, call: &RuncCall) -> Outcome {
    let Some(id) = call.id() else { return Pass };
    let out = Command::new(&cfg.runc)
        .args(&call.global)
        .args(["state", id])
        .output();
    let running = out.ok().filter(|o| o.status.success()).is_some_and(|o| {
        serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .ok()
            .is_some_and(|v| v["status"] == "running")
    });
    if running { Done } else { Pass }
}

fn log_line(cfg: &WrapperConfig, msg: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(cfg.state_dir.join("ferry-runtime.log"))
    {
        let _ = writeln!(f, "{} {msg}", crate::runtime::unix_ms());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn log_times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_796_160_733), "2026-12-01T21:32:13Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn parses_the_shims_create() {
        let c = RuncCall::parse(&v(
            "--root /run/r/k8s.io --log /b/log.json --log-format json create --bundle /b --pid-file /b/init.pid abc",
        ))
        .unwrap();
        assert_eq!(c.command, "create");
        assert_eq!(
            c.global,
            v("--root /run/r/k8s.io --log /b/log.json --log-format json")
        );
        assert_eq!(c.arg_value(&["--bundle", "-b"]).as_deref(), Some("/b"));
        assert_eq!(c.global_value("--log").as_deref(), Some("/b/log.json"));
        assert_eq!(c.id(), Some("abc"));
        let c = RuncCall::parse(&v("--root=/r --systemd-cgroup kill abc 9")).unwrap();
        assert_eq!(c.command, "kill");
        assert!(RuncCall::parse(&v("--version")).is_none());
    }

    #[test]
    fn restore_keeps_the_shims_root_log_and_pid_file() {
        let c = RuncCall::parse(&v(
            "--root /r --log /b/log.json --log-format json create --bundle /b --pid-file /b/init.pid --no-pivot abc",
        ))
        .unwrap();
        let st = StageDir::new(Path::new("/s"), "uid", "app").unwrap();
        let plan = RestorePlan {
            migration_id: "m".into(),
            lazy: true,
            criu: CriuOptions {
                file_locks: true,
                external_unix_sockets: false,
                tcp_keep: false,
            },
            ..Default::default()
        };
        let a = restore_args(
            &c,
            "abc",
            Path::new("/b"),
            &st,
            Path::new("/b/init.pid"),
            &plan,
            Some(Path::new("/criu")),
        );
        assert_eq!(
            a.join(" "),
            "--root /r --log /b/log.json --log-format json --criu /criu restore --detach --no-subreaper \
             --bundle /b --image-path /s/restore/uid/app/images --work-path /s/restore/uid/app/work \
             --pid-file /b/init.pid --no-pivot --lazy-pages --file-locks abc"
        );
        assert!(criu_config(&plan.criu).contains("tcp-close"));
        let keep = CriuOptions {
            tcp_keep: true,
            ..Default::default()
        };
        assert!(!criu_config(&keep).contains("tcp-close"));
    }
}
