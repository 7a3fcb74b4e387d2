//! `--accel auto` on this machine, with the real test guest (scripts/build-test-guest.sh).
//!
//! Nothing here hard-codes which accelerator wins. What must hold wherever it runs:
//! the guest, started by ferry-launcher with the chosen accelerator, reaches its workload
//! ("count 1"); if KVM was passed over although /dev/kvm opens, the same guest under KVM
//! indeed does not get there in the probe's time; the second resolution is a cache hit;
//! a cancelled probe leaves no QEMU behind.
use anyhow::{Context, Result, ensure};
use ferry_node::vm::accel_probe::{AccelError, AutoAccel, DEFAULT_TIMEOUT};
use ferry_node::vm::launcher::Accel;
use ferry_testkit::guest::{guest_dir, last_count};
use ferry_testkit::process::ChildGuard;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn qemu() -> PathBuf {
    std::env::var_os("FERRY_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| "qemu-system-x86_64".into())
}

/// Live child processes of this test process (a leaked probe QEMU would be one).
fn children() -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after the ')'.
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let (state, ppid) = (fields.next(), fields.next());
        if ppid == Some(me.as_str()) && state != Some("Z") {
            found.push(head.to_string() + ")");
        }
    }
    found
}

fn cache_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "accel"))
        .collect()
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Result<Duration> {
    let start = Instant::now();
    while !ok() {
        ensure!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(start.elapsed())
}

#[test]
fn auto_accel_runs_the_guest_and_is_cached() -> Result<()> {
    let guest = guest_dir()?;
    let (kernel, initrd) = (guest.join("vmlinuz"), guest.join("initramfs.gz"));
    let tmp = tempfile::tempdir()?;
    let cache = tmp.path().join("accel-cache");
    let kvm_opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let auto = AutoAccel::new(&qemu(), &kernel, Some(&initrd), &cache);

    // The probe's positive path with a real guest: under TCG (which always runs it) it must
    // see userspace, and stop its QEMU. Generous timeout: TCG on a loaded 2-core machine.
    let mut patient = auto.clone();
    patient.timeout = Duration::from_secs(60);
    let tcg = patient.boot_probe(Accel::Tcg, &|| false)?;
    eprintln!("TCG probe boot: {tcg:?}");
    ensure!(tcg.runs && tcg.guest_decided, "{tcg:?}");
    ensure!(tcg.reason.contains("Run /init as init process"), "{tcg:?}");
    ensure!(children().is_empty(), "left behind: {:?}", children());

    // A probe interrupted (the launcher's SIGTERM path) kills its QEMU and caches nothing.
    let start = Instant::now();
    let interrupted = auto.resolve(None, &|| start.elapsed() > Duration::from_millis(800));
    if kvm_opens {
        ensure!(
            matches!(interrupted, Err(AccelError::Interrupted)),
            "expected an interrupted probe, got {interrupted:?}"
        );
    }
    ensure!(children().is_empty(), "left behind: {:?}", children());
    ensure!(
        cache_files(&cache).is_empty(),
        "an interrupted probe cached a result"
    );

    let start = Instant::now();
    let first = auto.resolve(None, &|| false)?;
    let first_took = start.elapsed();
    eprintln!("first resolution in {first_took:?}: {first:?}");
    ensure!(
        children().is_empty(),
        "probe QEMU left running: {:?}",
        children()
    );
    if kvm_opens {
        ensure!(first.probed, "/dev/kvm opens, so the guest must be probed");
        ensure!(cache_files(&cache).len() == 1, "no cache file in {cache:?}");
    } else {
        ensure!(first.accel == Accel::Tcg && !first.probed, "{first:?}");
    }

    let start = Instant::now();
    let second = auto.resolve(None, &|| false)?;
    eprintln!("second resolution in {:?}: {second:?}", start.elapsed());
    ensure!(second.accel == first.accel, "{second:?} vs {first:?}");
    if kvm_opens {
        ensure!(
            !second.probed && second.how.starts_with("cached probe "),
            "second resolution did not hit the cache: {second:?}"
        );
    }
    let forced = auto.resolve(Some("tcg"), &|| false)?;
    ensure!(forced.accel == Accel::Tcg && !forced.probed, "{forced:?}");

    // Independent check when KVM was passed over although it opens: the same guest, its
    // normal command line, under KVM, started now and watched for the probe's timeout.
    let kvm_check = if kvm_opens && first.accel == Accel::Tcg {
        let serial = tmp.path().join("kvm-check.serial");
        let mut cmd = Command::new(qemu());
        cmd.args(["-accel", "kvm", "-machine", "pc", "-m", "256M", "-kernel"])
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", "console=ttyS0 quiet panic=-1", "-no-reboot"])
            .args(["-display", "none", "-monitor", "none", "-nic", "none"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .stderr(Stdio::null());
        Some((ChildGuard::spawn("kvm-check", cmd)?, serial, Instant::now()))
    } else {
        None
    };

    // The launcher, --accel auto with the same cache: it must use the cached outcome and
    // the guest must run its workload on the accelerator it chose.
    let serial = tmp.path().join("guest.serial");
    let launcher_err = tmp.path().join("launcher.err");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry-launcher"));
    cmd.arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--memory-mib", "256", "--accel", "auto", "--qmp"])
        .arg(tmp.path().join("guest.qmp"))
        .arg("--serial-log")
        .arg(&serial)
        .arg("--accel-cache")
        .arg(&cache)
        .env_remove("FERRY_ACCEL")
        .stderr(std::fs::File::create(&launcher_err)?);
    let launched = Instant::now();
    let mut vm = ChildGuard::spawn("launcher", cmd)?;
    let read_err = || std::fs::read_to_string(&launcher_err).unwrap_or_default();
    let line = format!(
        "ferry-launcher: accelerator {}: auto, ",
        first.accel.as_qemu()
    );
    wait_for(
        "the launcher's accelerator line",
        Duration::from_secs(10),
        || read_err().contains(&line),
    )
    .with_context(|| format!("launcher stderr: {}", read_err()))?;
    if kvm_opens {
        ensure!(read_err().contains("cached probe"), "{}", read_err());
    }
    // Exec'd: the launcher's PID is now QEMU, running with the chosen accelerator.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", vm.id()))?;
    let argv: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    ensure!(
        argv.windows(2)
            .any(|w| w[0] == "-accel" && w[1] == first.accel.as_qemu()),
        "QEMU runs with {argv:?}"
    );
    let counted = wait_for("count 1 from the guest", Duration::from_secs(60), || {
        last_count(&serial).is_some_and(|n| n >= 1)
    })
    .with_context(|| std::fs::read_to_string(&serial).unwrap_or_default())?;
    eprintln!(
        "guest under {} printed count 1 after {:?} (launch to count: {:?})",
        first.accel.as_qemu(),
        counted,
        launched.elapsed()
    );
    ensure!(!vm.exited(), "the guest exited");
    vm.stop(Duration::from_secs(5));

    if let Some((mut kvm, kvm_serial, started)) = kvm_check {
        let left = DEFAULT_TIMEOUT.saturating_sub(started.elapsed());
        std::thread::sleep(left);
        let text = std::fs::read_to_string(&kvm_serial).unwrap_or_default();
        kvm.kill();
        ensure!(
            last_count(&kvm_serial).is_none(),
            "the probe chose TCG, but the guest under KVM counted within {DEFAULT_TIMEOUT:?}: {text}"
        );
        eprintln!(
            "independent check: under KVM the guest printed {} bytes and no count in {:?}",
            text.len(),
            started.elapsed()
        );
    }
    Ok(())
}
