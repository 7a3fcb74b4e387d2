//! `--accel auto`: KVM where a guest actually runs, TCG otherwise.
//!
//! "/dev/kvm opens" is not enough: on nested hosts (this project's CI/dev machines) the
//! device opens and tiny guests run, but a Linux kernel hangs in early boot. So the probe
//! boots the *same* kernel and initramfs under KVM, with the same machine type, and
//! accepts KVM only if the kernel reaches userspace ("Run /init as init process" on the
//! serial console) within a timeout. Probing costs up to the timeout, so the outcome is
//! cached per node, keyed by the QEMU version, the host kernel and the guest files.
//!
//! The pure parts (override parsing, serial verdict, cache key and file format) are plain
//! functions; only [`AutoAccel::resolve`] and the probe touch processes and files.
use super::launcher::{Accel, GuestSpec, Launch};
use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where probe outcomes are cached unless `--accel-cache`/`FERRY_ACCEL_CACHE` says otherwise.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/ferry/accel";
/// A guest under working KVM reaches /init in about a second; TCG on a loaded 2-core
/// machine takes ~5 s. 15 s leaves room for a slow but working KVM.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// The probe's own command line: without `quiet` the kernel announces "Run /init as init
/// process", and `panic=-1` + QEMU's `-no-reboot` make a panicking guest end QEMU at once.
pub const PROBE_CMDLINE: &str = "console=ttyS0 panic=-1";
/// Small: the probe only boots to userspace. Memory size does not change whether KVM works.
const PROBE_MEMORY_MIB: u32 = 128;
const CACHE_HEADER: &str = "ferry accel probe v1";

#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error("FERRY_ACCEL={0:?} is not kvm, tcg or auto")]
    BadOverride(String),
    #[error("interrupted by a signal while probing the accelerator")]
    Interrupted,
}

/// `FERRY_ACCEL`: `kvm`/`tcg` force that accelerator, unset/empty/`auto` means probe.
pub(crate) fn parse_override(value: Option<&str>) -> Result<Option<Accel>, AccelError> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) if v.eq_ignore_ascii_case("auto") => Ok(None),
        Some(v) if v.eq_ignore_ascii_case("kvm") => Ok(Some(Accel::Kvm)),
        Some(v) if v.eq_ignore_ascii_case("tcg") => Ok(Some(Accel::Tcg)),
        Some(v) => Err(AccelError::BadOverride(v.to_string())),
    }
}

/// How far a probe boot got, judged from its serial console text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BootProgress {
    /// The guest got to the end of kernel boot; the string says which marker proved it.
    Reached(String),
    /// The kernel panicked before that (the line is kept for the reason).
    Panicked(String),
    /// Nothing conclusive yet.
    Booting,
}

pub(crate) fn judge_serial(text: &str) -> BootProgress {
    let lines = || text.lines().map(str::trim);
    // Printed by the kernel right before it execs init: the guest reaches userspace.
    if let Some(l) = lines().find(|l| l.contains("Run ") && l.contains(" as init process")) {
        return BootProgress::Reached(strip_timestamp(l).to_string());
    }
    // Without an initramfs (and no root= in the probe's cmdline) the kernel ends its
    // boot by failing to mount root: it too ran all the way through under this accelerator.
    if let Some(l) = lines().find(|l| l.contains("VFS: Unable to mount root fs")) {
        return BootProgress::Reached(strip_timestamp(l).to_string());
    }
    if let Some(l) = lines().find(|l| l.contains("Kernel panic")) {
        return BootProgress::Panicked(strip_timestamp(l).to_string());
    }
    BootProgress::Booting
}

/// "[    3.637284] Run /init as init process" -> "Run /init as init process".
fn strip_timestamp(line: &str) -> &str {
    match line.strip_prefix('[').and_then(|r| r.split_once(']')) {
        Some((_, rest)) => rest.trim(),
        None => line,
    }
}

/// Identity of a guest file for the cache key: size and modification time (cheap, and a
/// rebuilt kernel or initramfs changes at least the mtime).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileStamp {
    pub size: u64,
    pub mtime_s: i64,
    pub mtime_ns: i64,
}

impl FileStamp {
    pub fn of(path: &Path) -> std::io::Result<FileStamp> {
        let m = std::fs::metadata(path)?;
        Ok(FileStamp {
            size: m.size(),
            mtime_s: m.mtime(),
            mtime_ns: m.mtime_nsec(),
        })
    }

    fn describe(&self) -> String {
        format!(
            "size={} mtime={}.{:09}",
            self.size, self.mtime_s, self.mtime_ns
        )
    }
}

/// What a probe outcome depends on. The full text is stored in the cache file and compared
/// on read; the file name is only a hash of it, so a hash collision costs a re-probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CacheKey {
    text: String,
}

impl CacheKey {
    pub fn new(
        qemu_version: &str,
        host_kernel: &str,
        kernel: &FileStamp,
        initrd: Option<&FileStamp>,
    ) -> CacheKey {
        let one_line = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        let text = format!(
            "qemu: {}\nhost: {}\nkernel: {}\ninitrd: {}\n",
            one_line(qemu_version),
            one_line(host_kernel),
            kernel.describe(),
            initrd.map_or_else(|| "none".to_string(), FileStamp::describe),
        );
        CacheKey { text }
    }

    pub fn file_name(&self) -> String {
        format!("{:016x}.accel", fnv1a64(self.text.as_bytes()))
    }
}

/// FNV-1a: stable across Rust versions and builds (std's hasher is not), no extra crate.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A probe's result: the accelerator and a one-line reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub accel: Accel,
    pub reason: String,
}

pub(crate) fn format_cache(key: &CacheKey, outcome: &Outcome) -> String {
    let reason = outcome.reason.replace(['\n', '\r'], " ");
    format!(
        "{CACHE_HEADER}\n{}accel: {}\nreason: {reason}\n",
        key.text,
        outcome.accel.as_qemu()
    )
}

/// The cached outcome, or `None` if the file is for another key, truncated or corrupt.
pub(crate) fn parse_cache(key: &CacheKey, text: &str) -> Option<Outcome> {
    let rest = text
        .strip_prefix(CACHE_HEADER)?
        .strip_prefix('\n')?
        .strip_prefix(key.text.as_str())?;
    let mut lines = rest.lines();
    let accel = match lines.next()?.strip_prefix("accel: ")? {
        "kvm" => Accel::Kvm,
        "tcg" => Accel::Tcg,
        _ => return None,
    };
    let reason = lines.next()?.strip_prefix("reason: ")?.to_string();
    // The writer ends with a newline and nothing after it: anything else is damage.
    if lines.next().is_some() || !text.ends_with('\n') {
        return None;
    }
    Some(Outcome { accel, reason })
}

/// The resolved accelerator and how it was chosen (one line, for the launcher's log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub accel: Accel,
    pub how: String,
    /// Whether a probe boot ran now (false: forced, no usable /dev/kvm, or cached).
    pub probed: bool,
}

/// Resolves `--accel auto` for one guest.
#[derive(Debug, Clone)]
pub struct AutoAccel {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cache_dir: PathBuf,
    pub timeout: Duration,
    pub kvm_device: PathBuf,
}

impl AutoAccel {
    pub fn new(qemu: &Path, kernel: &Path, initrd: Option<&Path>, cache_dir: &Path) -> Self {
        AutoAccel {
            qemu: qemu.into(),
            kernel: kernel.into(),
            initrd: initrd.map(Into::into),
            cache_dir: cache_dir.into(),
            timeout: DEFAULT_TIMEOUT,
            kvm_device: "/dev/kvm".into(),
        }
    }

    /// `env_override` is `FERRY_ACCEL`; `cancel` is polled while waiting (the launcher
    /// returns true once SIGTERM arrived) and makes this return `Interrupted`.
    pub fn resolve(
        &self,
        env_override: Option<&str>,
        cancel: &dyn Fn() -> bool,
    ) -> Result<Resolved, AccelError> {
        if let Some(accel) = parse_override(env_override)? {
            return Ok(Resolved {
                accel,
                how: format!("forced by FERRY_ACCEL={}", accel.as_qemu()),
                probed: false,
            });
        }
        let dev = &self.kvm_device;
        if let Err(e) = OpenOptions::new().read(true).write(true).open(dev) {
            return Ok(self.uncached_tcg(format!("cannot open {}: {e}", dev.display())));
        }
        let key = match self.cache_key() {
            Ok(k) => k,
            Err(why) => return Ok(self.uncached_tcg(why)),
        };
        let path = self.cache_dir.join(key.file_name());
        // Serialise concurrent launchers on this node: the second waits and reads the
        // first one's result instead of running a second probe on a busy machine.
        let _lock = match self.lock(&key, cancel)? {
            Ok(lock) => Some(lock),
            Err(why) => {
                let r = self.probe_kvm(cancel)?;
                return Ok(self.probed(r.outcome(), format!("not cached: {why}")));
            }
        };
        if let Some(hit) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| parse_cache(&key, &t))
        {
            return Ok(Resolved {
                accel: hit.accel,
                how: format!("cached probe {}: {}", path.display(), hit.reason),
                probed: false,
            });
        }
        let r = self.probe_kvm(cancel)?;
        let note = if !r.guest_decided {
            "not cached: QEMU failed before the guest ran, retried next launch".to_string()
        } else {
            match write_atomically(&path, &format_cache(&key, &r.outcome())) {
                Ok(()) => format!("cached in {}", path.display()),
                Err(e) => format!("not cached: writing {}: {e}", path.display()),
            }
        };
        Ok(self.probed(r.outcome(), note))
    }

    fn uncached_tcg(&self, why: String) -> Resolved {
        Resolved {
            accel: Accel::Tcg,
            how: why,
            probed: false,
        }
    }

    fn probed(&self, outcome: Outcome, note: String) -> Resolved {
        Resolved {
            accel: outcome.accel,
            how: format!("probed: {}; {note}", outcome.reason),
            probed: true,
        }
    }

    fn cache_key(&self) -> Result<CacheKey, String> {
        let out = Command::new(&self.qemu)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running {} --version: {e}", self.qemu.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} --version: {} {}",
                self.qemu.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_else(|_| "unknown".into());
        let stamp = |p: &Path| FileStamp::of(p).map_err(|e| format!("{}: {e}", p.display()));
        let initrd = self.initrd.as_deref().map(stamp).transpose()?;
        Ok(CacheKey::new(
            &String::from_utf8_lossy(&out.stdout),
            &host,
            &stamp(&self.kernel)?,
            initrd.as_ref(),
        ))
    }

    /// Outer error: interrupted. Inner error: no cache directory (probe without caching).
    fn lock(
        &self,
        key: &CacheKey,
        cancel: &dyn Fn() -> bool,
    ) -> Result<Result<Flock<File>, String>, AccelError> {
        let path = self.cache_dir.join(format!("{}.lock", key.file_name()));
        let file = std::fs::create_dir_all(&self.cache_dir)
            .and_then(|()| OpenOptions::new().create(true).append(true).open(&path));
        let mut file = match file {
            Ok(f) => f,
            Err(e) => return Ok(Err(format!("{}: {e}", path.display()))),
        };
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(Ok(lock)),
                Err((f, nix::errno::Errno::EWOULDBLOCK)) => file = f,
                Err((_, e)) => return Ok(Err(format!("locking {}: {e}", path.display()))),
            }
            if cancel() {
                return Err(AccelError::Interrupted);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Boots the guest under `accel` with the probe's cmdline and watches its serial
    /// console until it reaches userspace, stops, or the timeout passes. `resolve` probes
    /// KVM; tests also run it under TCG to prove the positive path with a real guest.
    /// The probe QEMU is killed on every path (its guard's drop).
    pub fn boot_probe(
        &self,
        accel: Accel,
        cancel: &dyn Fn() -> bool,
    ) -> Result<BootReport, AccelError> {
        let started = Instant::now();
        let name = accel.as_qemu().to_uppercase();
        let secs = |d: Duration| format!("{:.1}s", d.as_secs_f64());
        let report = |runs: bool, guest_decided: bool, reason: String| BootReport {
            runs,
            guest_decided,
            reason,
            took: started.elapsed(),
        };
        let mut vm = match ProbeVm::start(self, accel) {
            Ok(vm) => vm,
            Err(e) => {
                let why = format!("{name} probe QEMU did not start: {e}");
                return Ok(report(false, false, why));
            }
        };
        loop {
            let serial = vm.serial_text();
            match judge_serial(&serial) {
                BootProgress::Reached(marker) => {
                    let why = format!(
                        "a {name} guest reached \"{marker}\" in {}",
                        secs(started.elapsed())
                    );
                    return Ok(report(true, true, why));
                }
                BootProgress::Panicked(line) => {
                    let why = format!("the {name} guest panicked: \"{line}\"");
                    return Ok(report(false, true, why));
                }
                BootProgress::Booting => {}
            }
            if let Some(status) = vm.exited() {
                let qemu = format!("{status}: {}", vm.stderr_tail());
                if serial.trim().is_empty() {
                    let why = format!("{name} probe QEMU ended without output ({qemu})");
                    return Ok(report(false, false, why));
                }
                let why = format!(
                    "the {name} guest stopped before userspace ({qemu}); serial: {}",
                    tail_line(&serial)
                );
                return Ok(report(false, true, why));
            }
            if started.elapsed() >= self.timeout {
                let why = format!(
                    "a {name} guest did not reach userspace in {} (serial {} bytes, last: {}; qemu: {})",
                    secs(self.timeout),
                    serial.len(),
                    tail_line(&serial),
                    vm.stderr_tail()
                );
                return Ok(report(false, true, why));
            }
            if cancel() {
                return Err(AccelError::Interrupted);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn probe_kvm(&self, cancel: &dyn Fn() -> bool) -> Result<BootReport, AccelError> {
        self.boot_probe(Accel::Kvm, cancel)
    }
}

/// What one probe boot showed.
#[derive(Debug, Clone)]
pub struct BootReport {
    /// The guest reached userspace under the probed accelerator.
    pub runs: bool,
    /// The guest itself produced this result (reached userspace, panicked, hung). Only such
    /// results are cached: QEMU failing to start is quick to retry and may be transient
    /// (memory, a busy device).
    pub guest_decided: bool,
    pub reason: String,
    pub took: Duration,
}

impl BootReport {
    fn outcome(&self) -> Outcome {
        Outcome {
            accel: if self.runs { Accel::Kvm } else { Accel::Tcg },
            reason: self.reason.clone(),
        }
    }
}

/// The probe's QEMU and its scratch directory; dropping it kills QEMU and removes the dir.
struct ProbeVm {
    child: Child,
    dir: PathBuf,
}

impl ProbeVm {
    fn start(p: &AutoAccel, accel: Accel) -> Result<ProbeVm, String> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("ferry-accel-probe.{}.{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // Built by the launcher's own builder so the machine type and devices are those
        // of the real guest; only memory, vCPUs and the cmdline are the probe's.
        let spec = GuestSpec {
            kernel: p.kernel.clone(),
            initrd: p.initrd.clone(),
            append: PROBE_CMDLINE.to_string(),
            memory_mib: PROBE_MEMORY_MIB,
            vcpus: 1,
            accel,
        };
        let launch = Launch {
            qmp_socket: dir.join("qmp.sock"),
            serial_log: dir.join("serial.log"),
            incoming: false,
        };
        let stderr = File::create(dir.join("qemu.err"));
        let spawned = stderr.map_err(|e| e.to_string()).and_then(|stderr| {
            Command::new(&p.qemu)
                .args(spec.qemu_args(&launch))
                .arg("-no-reboot")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .map_err(|e| format!("{}: {e}", p.qemu.display()))
        });
        match spawned {
            Ok(child) => Ok(ProbeVm { child, dir }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    fn serial_text(&self) -> String {
        let bytes = std::fs::read(self.dir.join("serial.log")).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("qemu.err")).unwrap_or_default();
        let one = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let skip = one.chars().count().saturating_sub(200);
        let tail: String = one.chars().skip(skip).collect();
        if tail.is_empty() {
            "no stderr".into()
        } else {
            tail
        }
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for ProbeVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tail_line(serial: &str) -> String {
    match serial.lines().map(str::trim).rfind(|l| !l.is_empty()) {
        Some(l) => format!("{:?}", l.chars().take(120).collect::<String>()),
        None => "nothing".into(),
    }
}

fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCG_TAIL: &str = "[    3.608894] Freeing unused kernel image (initmem) memory: 2612K\n\
        [    3.617267] Write protecting the kernel read-only data: 20480k\n\
        [    3.637284] Run /init as init process\n";

    fn stamp(size: u64) -> FileStamp {
        FileStamp {
            size,
            mtime_s: 1_700_000_000,
            mtime_ns: 5,
        }
    }

    fn key() -> CacheKey {
        CacheKey::new(
            "QEMU emulator version 10.0.2\nCopyright (c) 2003-2025",
            "6.1.0-28-cloud-amd64\n",
            &stamp(8_000_000),
            Some(&stamp(1_300_000)),
        )
    }

    #[test]
    fn override_values() {
        assert_eq!(parse_override(None).unwrap(), None);
        assert_eq!(parse_override(Some("")).unwrap(), None);
        assert_eq!(parse_override(Some("AUTO")).unwrap(), None);
        assert_eq!(parse_override(Some("KVM")).unwrap(), Some(Accel::Kvm));
        assert_eq!(parse_override(Some(" tcg ")).unwrap(), Some(Accel::Tcg));
        let err = parse_override(Some("hvf")).unwrap_err().to_string();
        assert!(err.contains("\"hvf\""), "{err}");
    }

    #[test]
    fn serial_verdicts() {
        assert_eq!(
            judge_serial(TCG_TAIL),
            BootProgress::Reached("Run /init as init process".into())
        );
        // Where this machine's nested KVM stops: real-mode setup, nothing after it.
        assert_eq!(
            judge_serial("Probing EDD (edd=off to disable)... ok\n"),
            BootProgress::Booting
        );
        assert_eq!(judge_serial(""), BootProgress::Booting);
        // A partial line (QEMU still writing) is not yet the marker.
        assert_eq!(
            judge_serial("[ 3.6] Run /init as in"),
            BootProgress::Booting
        );
        assert_eq!(
            judge_serial("[ 0.9] Kernel panic - not syncing: Out of memory\n"),
            BootProgress::Panicked("Kernel panic - not syncing: Out of memory".into())
        );
        let no_initrd = "[ 1.2] VFS: Unable to mount root fs on unknown-block(0,0)\n\
            [ 1.2] Kernel panic - not syncing: VFS: Unable to mount root fs\n";
        assert!(matches!(judge_serial(no_initrd), BootProgress::Reached(_)));
        // init ran and then died: userspace was reached all the same.
        let init_died =
            format!("{TCG_TAIL}[ 4.0] Kernel panic - not syncing: Attempted to kill init!\n");
        assert!(matches!(judge_serial(&init_died), BootProgress::Reached(_)));
    }

    #[test]
    fn key_depends_on_every_input() {
        let k = key();
        assert_eq!(k, key(), "deterministic");
        assert_eq!(k.file_name(), key().file_name());
        assert!(k.file_name().ends_with(".accel") && k.file_name().len() == 22);
        let variants = [
            CacheKey::new(
                "QEMU emulator version 9.2.0",
                "6.1.0-28-cloud-amd64",
                &stamp(8_000_000),
                Some(&stamp(1_300_000)),
            ),
            CacheKey::new(
                "QEMU emulator version 10.0.2 Copyright (c) 2003-2025",
                "6.1.0-29-cloud-amd64",
                &stamp(8_000_000),
                Some(&stamp(1_300_000)),
            ),
            CacheKey::new(
                "QEMU emulator version 10.0.2 Copyright (c) 2003-2025",
                "6.1.0-28-cloud-amd64",
                &stamp(8_000_001),
                Some(&stamp(1_300_000)),
            ),
            CacheKey::new(
                "QEMU emulator version 10.0.2 Copyright (c) 2003-2025",
                "6.1.0-28-cloud-amd64",
                &stamp(8_000_000),
                None,
            ),
        ];
        for v in variants {
            assert_ne!(v, k);
            assert_ne!(v.file_name(), k.file_name());
        }
        let mut touched = stamp(1_300_000);
        touched.mtime_ns += 1;
        let k2 = CacheKey::new(
            "QEMU emulator version 10.0.2\nCopyright (c) 2003-2025",
            "6.1.0-28-cloud-amd64",
            &stamp(8_000_000),
            Some(&touched),
        );
        assert_ne!(k2, k);
    }

    #[test]
    fn cache_round_trip() {
        let k = key();
        let o = Outcome {
            accel: Accel::Tcg,
            reason: "a KVM guest did not reach userspace\nin 15.0s".into(),
        };
        let text = format_cache(&k, &o);
        let back = parse_cache(&k, &text).expect("parses");
        assert_eq!(back.accel, Accel::Tcg);
        assert_eq!(back.reason, "a KVM guest did not reach userspace in 15.0s");
        let kvm = Outcome {
            accel: Accel::Kvm,
            reason: "ok".into(),
        };
        assert_eq!(
            parse_cache(&k, &format_cache(&k, &kvm)).unwrap().accel,
            Accel::Kvm
        );
    }

    #[test]
    fn corrupt_or_foreign_cache_is_ignored() {
        let k = key();
        let o = Outcome {
            accel: Accel::Kvm,
            reason: "ok".into(),
        };
        let good = format_cache(&k, &o);
        let other = CacheKey::new("QEMU 1", "h", &stamp(1), None);
        assert_eq!(parse_cache(&other, &good), None, "another key's file");
        assert_eq!(parse_cache(&k, ""), None);
        assert_eq!(parse_cache(&k, &good[..good.len() - 1]), None, "truncated");
        assert_eq!(parse_cache(&k, &good[..good.len() / 2]), None);
        assert_eq!(
            parse_cache(&k, &good.replace("accel: kvm", "accel: hvf")),
            None
        );
        assert_eq!(parse_cache(&k, &format!("{good}junk\n")), None);
        assert_eq!(parse_cache(&k, "\0\0\0garbage"), None);
    }

    #[test]
    fn timestamps_are_stripped() {
        assert_eq!(strip_timestamp("[    3.6] Run /init"), "Run /init");
        assert_eq!(strip_timestamp("Run /init"), "Run /init");
    }
}
