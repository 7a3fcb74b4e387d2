//! Real QEMU (TCG) live migration between two network-namespace "nodes" over QMP, using
//! ferry-launcher to start both guests and `ferry_node::qemu::QemuBackend` to drive them.
//! Needs the test guest from `scripts/build-test-guest.sh` (FERRY_GUEST_DIR or the cache).
use anyhow::{Context, Result, bail, ensure};
use ferry_node::qemu::{MigrationTuning, QemuBackend};
use ferry_testkit::netns::{Lan, Node};
use ferry_testkit::process::ChildGuard;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MEMORY_MIB: &str = "256";

/// Two TCG guests per test already saturate this 2-core machine; run tests one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn guest_dir() -> Result<PathBuf> {
    let hint = "run scripts/build-test-guest.sh (or set FERRY_GUEST_DIR to its output)";
    if let Ok(d) = std::env::var("FERRY_GUEST_DIR") {
        let d = PathBuf::from(d);
        ensure!(
            d.join("vmlinuz").is_file(),
            "FERRY_GUEST_DIR={} has no vmlinuz; {hint}",
            d.display()
        );
        return Ok(d);
    }
    let cache = std::env::var("FERRY_CACHE").unwrap_or_else(|_| "/var/cache/ferry".into());
    let root = Path::new(&cache).join("guest");
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("vmlinuz").is_file() && p.join("initramfs.gz").is_file())
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    found.sort();
    match found.pop() {
        Some((_, p)) => Ok(p),
        None => bail!("test guest missing under {}: {hint}", root.display()),
    }
}

struct Vm {
    guard: ChildGuard,
    qmp: PathBuf,
    serial: PathBuf,
}

fn launch(
    node: &Node,
    dir: &Path,
    name: &str,
    guest: &Path,
    incoming: bool,
    dirty: bool,
) -> Result<Vm> {
    let qmp = dir.join(format!("{name}.qmp"));
    let serial = dir.join(format!("{name}.serial"));
    let mut cmd = node.command(env!("CARGO_BIN_EXE_ferry-launcher"));
    cmd.arg("--kernel")
        .arg(guest.join("vmlinuz"))
        .arg("--initrd")
        .arg(guest.join("initramfs.gz"))
        .args(["--memory-mib", MEMORY_MIB, "--accel", "auto", "--qmp"])
        .arg(&qmp)
        .arg("--serial-log")
        .arg(&serial);
    if dirty {
        cmd.args(["--append", "console=ttyS0 quiet panic=-1 ferry.dirty=1"]);
    }
    if incoming {
        cmd.arg("--incoming");
    }
    let guard = ChildGuard::spawn(name, cmd)?;
    Ok(Vm { guard, qmp, serial })
}

/// The last `count N` the guest printed into a serial log.
fn last_count(serial: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(serial).ok()?;
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("count ")?.trim().parse().ok())
}

async fn wait_count_above(serial: &Path, above: u64, timeout: Duration) -> Result<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(n) = last_count(serial)
            && n > above
        {
            return Ok(n);
        }
        if Instant::now() > deadline {
            let tail = std::fs::read_to_string(serial).unwrap_or_default();
            let tail: String = tail
                .chars()
                .rev()
                .take(400)
                .collect::<String>()
                .chars()
                .rev()
                .collect();
            bail!(
                "{}: no count above {above} in {timeout:?}; log tail: {tail:?}",
                serial.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_exit(vm: &mut Vm, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if vm.guard.exited() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn live_migrates_running_guest_between_nodes() -> Result<()> {
    migrate_case(false, "vma", "vmb").await
}

/// Same with the guest's memory dirtier on. Fails here: with Debian 12's QEMU 7.2 under TCG
/// the destination guest oopses right after migration (page faults / list corruption in
/// the dirtying process), also with `thread=single` and with plain qemu-system-x86_64
/// outside ferry. Needs a newer QEMU or KVM to be checked.
#[tokio::test]
#[ignore = "QEMU 7.2 TCG corrupts a memory-dirtying guest on migration (see comment)"]
async fn live_migrates_memory_dirtying_guest() -> Result<()> {
    migrate_case(true, "vme", "vmf").await
}

async fn migrate_case(dirty: bool, a: &str, b: &str) -> Result<()> {
    let _one = SERIAL.lock().await;
    let guest = guest_dir()?;
    let tmp = tempfile::tempdir()?;
    let lan = Lan::create()?;
    let (na, nb) = (lan.add_node(a)?, lan.add_node(b)?);

    let mut src = launch(&na, tmp.path(), "src", &guest, false, dirty)?;
    let mut dst = launch(&nb, tmp.path(), "dst", &guest, true, dirty)?;
    wait_count_above(&src.serial, 2, Duration::from_secs(60))
        .await
        .context("source boot")?;

    let src_q = QemuBackend::connect(&src.qmp, Duration::from_secs(10)).await?;
    let dst_q = QemuBackend::connect(&dst.qmp, Duration::from_secs(10)).await?;
    assert_eq!(dst_q.run_state().await?, "inmigrate");
    let uri = format!("tcp:{}:4444", nb.ip());
    dst_q.migrate_incoming(&uri).await?;
    src_q.configure(&MigrationTuning::default()).await?;

    let started = Instant::now();
    src_q.migrate(&uri).await?;
    let done = src_q
        .wait_finished(Duration::from_millis(100), Duration::from_secs(120), |p| {
            tracing::info!(?p, "progress")
        })
        .await?;
    let wall = started.elapsed();
    eprintln!(
        "vm migration: status={} downtime={:?}ms total_time={:?}ms transferred={}B wall={wall:?}",
        done.status, done.downtime_ms, done.total_time_ms, done.transferred_bytes
    );
    assert_eq!(done.status, "completed");
    assert!(done.downtime_ms.is_some() && done.total_time_ms.is_some());
    assert!(done.transferred_bytes > 0);

    // The source guest stopped at completion: its last count is final.
    assert_eq!(src_q.run_state().await?, "postmigrate");
    let src_last = last_count(&src.serial).context("source printed no count")?;
    // The destination's guest is the same guest: it continues from where the source stopped.
    let dst_n = wait_count_above(&dst.serial, src_last + 1, Duration::from_secs(30)).await?;
    let first_dst = std::fs::read_to_string(&dst.serial)?
        .lines()
        .find_map(|l| l.trim().strip_prefix("count ")?.trim().parse::<u64>().ok())
        .context("destination printed no count")?;
    eprintln!("source last count {src_last}; destination first {first_dst}, now {dst_n}");
    assert!(
        first_dst > src_last,
        "destination restarted counting ({first_dst} <= {src_last})"
    );
    assert!(
        first_dst <= src_last + 5,
        "counter jumped ({src_last} -> {first_dst})"
    );
    assert_eq!(dst_q.run_state().await?, "running");
    let dst_log = std::fs::read_to_string(&dst.serial)?;
    assert!(
        !dst_log.contains("BUG:") && !dst_log.contains("Oops"),
        "destination guest kernel crashed after migration:\n{dst_log}"
    );

    src_q.quit().await?;
    assert!(
        wait_exit(&mut src, Duration::from_secs(10)).await,
        "source QEMU did not exit after quit"
    );
    dst_q.quit().await?;
    assert!(
        wait_exit(&mut dst, Duration::from_secs(10)).await,
        "destination QEMU did not exit"
    );
    Ok(())
}

#[tokio::test]
async fn cancel_keeps_source_running() -> Result<()> {
    let _one = SERIAL.lock().await;
    let guest = guest_dir()?;
    let tmp = tempfile::tempdir()?;
    let lan = Lan::create()?;
    let (na, nb) = (lan.add_node("vmc")?, lan.add_node("vmd")?);

    let mut src = launch(&na, tmp.path(), "src", &guest, false, false)?;
    let mut dst = launch(&nb, tmp.path(), "dst", &guest, true, false)?;
    wait_count_above(&src.serial, 2, Duration::from_secs(60))
        .await
        .context("source boot")?;
    let src_q = QemuBackend::connect(&src.qmp, Duration::from_secs(10)).await?;
    let dst_q = QemuBackend::connect(&dst.qmp, Duration::from_secs(10)).await?;
    let uri = format!("tcp:{}:4445", nb.ip());
    dst_q.migrate_incoming(&uri).await?;
    // 2 MiB/s: a 256 MiB guest cannot finish before we cancel.
    let slow = MigrationTuning {
        max_bandwidth: 2 << 20,
        ..Default::default()
    };
    src_q.configure(&slow).await?;
    src_q.migrate(&uri).await?;

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = src_q.progress().await?;
        if p.status == "active" && p.transferred_bytes > 0 {
            break;
        }
        ensure!(!p.is_finished(), "migration finished before cancel: {p:?}");
        ensure!(
            Instant::now() < deadline,
            "migration never became active: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    src_q.migrate_cancel().await?;
    let p = src_q
        .wait_finished(Duration::from_millis(100), Duration::from_secs(30), |_| {})
        .await;
    let status = src_q.progress().await?.status;
    assert!(
        p.is_err() && status == "cancelled",
        "after cancel: {p:?} / {status}"
    );
    assert_eq!(src_q.run_state().await?, "running");
    let before = last_count(&src.serial).context("no count")?;
    wait_count_above(&src.serial, before + 1, Duration::from_secs(20))
        .await
        .context("source counter after cancel")?;

    // Destination cleanup: it received a broken stream; whatever state it is in, remove it.
    drop(dst_q);
    dst.guard.kill();
    assert!(dst.guard.exited());
    src_q.quit().await?;
    assert!(wait_exit(&mut src, Duration::from_secs(10)).await);
    Ok(())
}
