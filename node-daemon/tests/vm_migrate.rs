//! Real QEMU (TCG) live migration between two network-namespace "nodes" over QMP, using
//! ferry-launcher to start both guests and `ferry_node::vm::qemu::QemuBackend` to drive them:
//! a busy guest, non-converging pre-copy rescued by the convergence policy (post-copy,
//! auto-converge), explicit post-copy, cancel, and a destination killed mid-copy.
//!
//! Needs the test guest from `scripts/build-test-guest.sh` (FERRY_GUEST_DIR or the cache)
//! and QEMU >= 8 from `scripts/install-qemu.sh` (7.2 corrupts a busy guest under TCG).
use anyhow::{Context, Result, ensure};
use ferry_node::vm::qemu::{
    ConvergencePolicy, MigrationMode, MigrationProgress, MigrationTuning, QemuBackend, Switch,
};
use ferry_testkit::guest::{first_count, last_count, launcher_command, wait_count_above};
use ferry_testkit::netns::{Lan, Node};
use ferry_testkit::process::ChildGuard;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Two TCG guests per test already saturate this 2-core machine; run tests one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A link the guest's dirtier (64 MiB rewritten several times a second) out-runs: each
/// pre-copy pass takes ~4 s and leaves the whole 64 MiB dirty again, so pre-copy never
/// gets below the downtime limit (expected downtime stays ~4 s against 300 ms).
const SLOW_LINK: u64 = 16 << 20;

/// Debian 12's QEMU 7.2 migrates a memory-dirtying TCG guest corrupted; fail with the fix
/// rather than with a guest oops.
fn require_qemu_8() -> Result<()> {
    let qemu = std::env::var("FERRY_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let out = std::process::Command::new(&qemu)
        .arg("--version")
        .output()
        .with_context(|| format!("running {qemu} --version; run scripts/install-qemu.sh"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let major: u32 = text
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .and_then(|v| v.split('.').next()?.parse().ok())
        .with_context(|| format!("cannot parse QEMU version from {text:?}"))?;
    ensure!(
        major >= 8,
        "{qemu} is QEMU {major}; busy-guest migration needs >= 8: run scripts/install-qemu.sh"
    );
    Ok(())
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
    memory_mib: u32,
    incoming: bool,
    dirty: bool,
) -> Result<Vm> {
    let qmp = dir.join(format!("{name}.qmp"));
    let serial = dir.join(format!("{name}.serial"));
    let launcher = Path::new(env!("CARGO_BIN_EXE_ferry-launcher"));
    let mut cmd = launcher_command(node, launcher, memory_mib, dirty)?;
    cmd.arg("--qmp").arg(&qmp).arg("--serial-log").arg(&serial);
    if incoming {
        cmd.arg("--incoming");
    }
    let guard = ChildGuard::spawn(name, cmd)?;
    Ok(Vm { guard, qmp, serial })
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

/// A source guest booted on one node and an incoming QEMU on another, both on QMP. Drop
/// order cleans up: QMP connections, QEMUs (guards), namespaces, temp dir.
struct Pair {
    src_q: QemuBackend,
    dst_q: QemuBackend,
    src: Vm,
    dst: Vm,
    uri: String,
    _lan: Lan,
    _tmp: tempfile::TempDir,
}

impl Pair {
    /// Boots the source (until its counter runs) and readies the destination with the
    /// same tuning (post-copy and multifd capabilities must match on both ends).
    async fn start(
        label: &str,
        memory_mib: u32,
        dirty: bool,
        tuning: &MigrationTuning,
    ) -> Result<Pair> {
        require_qemu_8()?;
        let tmp = tempfile::tempdir()?;
        let lan = Lan::create()?;
        let na = lan.add_node(&format!("{label}s"))?;
        let nb = lan.add_node(&format!("{label}d"))?;
        let src = launch(&na, tmp.path(), "src", memory_mib, false, dirty)?;
        let dst = launch(&nb, tmp.path(), "dst", memory_mib, true, dirty)?;
        wait_count_above(&src.serial, 2, Duration::from_secs(90))
            .await
            .context("source boot")?;
        if dirty {
            let log = std::fs::read_to_string(&src.serial)?;
            ensure!(
                log.contains("dirtier on"),
                "guest dirtier did not start: {log}"
            );
        }
        let src_q = QemuBackend::connect(&src.qmp, Duration::from_secs(10)).await?;
        let dst_q = QemuBackend::connect(&dst.qmp, Duration::from_secs(10)).await?;
        assert_eq!(dst_q.run_state().await?, "inmigrate");
        src_q.configure(tuning).await?;
        dst_q.configure(tuning).await?;
        let uri = format!("tcp:{}:4444", nb.ip());
        dst_q.migrate_incoming(&uri).await?;
        Ok(Pair {
            src_q,
            dst_q,
            src,
            dst,
            uri,
            _lan: lan,
            _tmp: tmp,
        })
    }

    /// Migrates with `follow` (the policy watcher), recording every progress sample.
    async fn migrate(
        &self,
        tuning: &MigrationTuning,
        timeout: Duration,
    ) -> (Result<MigrationProgress>, Vec<MigrationProgress>) {
        let mut samples = Vec::new();
        let r = async {
            self.src_q.migrate(&self.uri).await?;
            let done = self
                .src_q
                .follow(tuning, Duration::from_millis(100), timeout, |p| {
                    samples.push(p.clone())
                })
                .await?;
            Ok(done)
        }
        .await;
        (r, samples)
    }

    /// After a completed migration: the source is stopped for good, the destination runs
    /// the same guest (its counter continues, its kernel did not oops); both QEMUs quit.
    async fn check_moved_and_quit(mut self) -> Result<()> {
        assert_eq!(self.src_q.run_state().await?, "postmigrate");
        let src_last = last_count(&self.src.serial).context("source printed no count")?;
        let dst_n =
            wait_count_above(&self.dst.serial, src_last + 3, Duration::from_secs(30)).await?;
        let first_dst = first_count(&self.dst.serial).context("destination printed no count")?;
        eprintln!("  source last count {src_last}; destination first {first_dst}, now {dst_n}");
        assert!(
            first_dst > src_last,
            "destination restarted counting ({first_dst} <= {src_last})"
        );
        assert!(
            first_dst <= src_last + 5,
            "counter jumped ({src_last} -> {first_dst})"
        );
        assert_eq!(self.dst_q.run_state().await?, "running");
        let dst_log = std::fs::read_to_string(&self.dst.serial)?;
        for bad in [
            "BUG:",
            "Oops",
            "Kernel panic",
            "segfault",
            "general protection",
        ] {
            assert!(
                !dst_log.contains(bad),
                "destination guest broke after migration ({bad}):\n{dst_log}"
            );
        }
        self.src_q.quit().await?;
        assert!(
            wait_exit(&mut self.src, Duration::from_secs(10)).await,
            "source QEMU did not exit after quit"
        );
        self.dst_q.quit().await?;
        assert!(
            wait_exit(&mut self.dst, Duration::from_secs(10)).await,
            "destination QEMU did not exit"
        );
        Ok(())
    }
}

fn report(name: &str, done: &MigrationProgress, wall: Duration) {
    eprintln!(
        "{name}: status={} switched_to={:?} downtime={:?}ms total_time={:?}ms \
         transferred={}B passes={} postcopy_requests={} postcopy_bytes={} wall={wall:.2?}",
        done.status,
        done.switched_to,
        done.downtime_ms,
        done.total_time_ms,
        done.transferred_bytes,
        done.dirty_sync_count,
        done.postcopy_requests,
        done.postcopy_bytes
    );
}

/// The main case: a 512 MiB guest that keeps rewriting 64 MiB migrates with
/// plain pre-copy at full speed, and keeps counting on the destination.
#[tokio::test]
async fn busy_512mib_guest_migrates_and_keeps_counting() -> Result<()> {
    let _one = SERIAL.lock().await;
    let tuning = MigrationTuning::default();
    let pair = Pair::start("vb", 512, true, &tuning).await?;
    let t0 = Instant::now();
    let (done, samples) = pair.migrate(&tuning, Duration::from_secs(120)).await;
    let done = done?;
    report("busy 512 MiB pre-copy", &done, t0.elapsed());
    assert_eq!(done.status, "completed");
    assert_eq!(done.switched_to, None);
    assert!(done.downtime_ms.is_some() && done.total_time_ms.is_some());
    // The guest really dirtied memory during the copy: pre-copy needed more than one pass.
    assert!(done.dirty_sync_count >= 2, "{done:?}");
    assert!(samples.iter().all(|p| p.mode != MigrationMode::PostCopy));
    assert_eq!(done.postcopy_bytes, 0, "{done:?}");
    pair.check_moved_and_quit().await
}

/// The same busy guest over 2 multifd channels (each its own TCP connection).
#[tokio::test]
async fn busy_512mib_guest_migrates_over_multifd() -> Result<()> {
    let _one = SERIAL.lock().await;
    let tuning = MigrationTuning {
        multifd_channels: Some(2),
        ..Default::default()
    };
    let pair = Pair::start("vm", 512, true, &tuning).await?;
    let t0 = Instant::now();
    let (done, _) = pair.migrate(&tuning, Duration::from_secs(120)).await;
    let done = done?;
    report("busy 512 MiB pre-copy, multifd x2", &done, t0.elapsed());
    assert_eq!(done.status, "completed");
    pair.check_moved_and_quit().await
}

/// Checks a migration the watcher had to rescue: pre-copy was stuck above the downtime
/// limit when the switch happened, and every later sample reports the switch.
fn assert_switched(samples: &[MigrationProgress], to: Switch, limit_ms: u64) {
    let at = samples
        .iter()
        .position(|p| p.switched_to == Some(to))
        .unwrap_or_else(|| panic!("watcher never switched to {to:?}"));
    let before = &samples[..at];
    let last_expected = before
        .iter()
        .rev()
        .find_map(|p| p.expected_downtime_ms)
        .expect("no expected downtime before the switch");
    eprintln!(
        "  switched to {to:?} after {} passes, expected downtime then {last_expected} ms",
        samples[at].dirty_sync_count
    );
    assert!(
        last_expected > limit_ms,
        "switched although pre-copy was converging ({last_expected} ms)"
    );
    assert!(before.iter().all(|p| p.switched_to.is_none()));
    assert!(samples[at..].iter().all(|p| p.switched_to == Some(to)));
}

#[tokio::test]
async fn non_converging_guest_completes_by_switching_to_postcopy() -> Result<()> {
    let _one = SERIAL.lock().await;
    let tuning = MigrationTuning {
        max_bandwidth: SLOW_LINK,
        policy: ConvergencePolicy::PostCopy,
        ..Default::default()
    };
    let pair = Pair::start("vp", 256, true, &tuning).await?;
    let t0 = Instant::now();
    let (done, samples) = pair.migrate(&tuning, Duration::from_secs(150)).await;
    let done = done?;
    report("stalled pre-copy -> post-copy", &done, t0.elapsed());
    assert_eq!(done.status, "completed");
    assert_eq!(done.switched_to, Some(Switch::PostCopy));
    assert_switched(&samples, Switch::PostCopy, 300);
    // That post-copy ran is in what QEMU reports after completion (bytes sent after the
    // switch), not in a progress sample: the post-copy phase can end between two polls.
    assert!(
        done.postcopy_bytes > 0,
        "no bytes sent in post-copy: {done:?}"
    );
    pair.check_moved_and_quit().await
}

#[tokio::test]
async fn non_converging_guest_completes_by_auto_converge() -> Result<()> {
    let _one = SERIAL.lock().await;
    let tuning = MigrationTuning {
        max_bandwidth: SLOW_LINK,
        policy: ConvergencePolicy::AutoConverge,
        ..Default::default()
    };
    let pair = Pair::start("va", 256, true, &tuning).await?;
    let t0 = Instant::now();
    let (done, samples) = pair.migrate(&tuning, Duration::from_secs(150)).await;
    let done = done?;
    report("stalled pre-copy -> auto-converge", &done, t0.elapsed());
    assert_eq!(done.status, "completed");
    assert_eq!(done.switched_to, Some(Switch::AutoConverge));
    assert_switched(&samples, Switch::AutoConverge, 300);
    // The throttle (not post-copy) made it converge.
    let max_throttle = samples
        .iter()
        .filter_map(|p| p.cpu_throttle_percent)
        .max()
        .unwrap_or(0);
    eprintln!("  highest vCPU throttle {max_throttle}%");
    print_passes(&samples);
    assert!(
        max_throttle >= 40,
        "throttle never climbed: {max_throttle}%"
    );
    assert!(samples.iter().all(|p| p.mode != MigrationMode::PostCopy));
    pair.check_moved_and_quit().await
}

#[tokio::test]
async fn explicit_postcopy_after_first_pass() -> Result<()> {
    let _one = SERIAL.lock().await;
    // A link slow enough that the first pass takes a few seconds, so the switch happens
    // mid-copy rather than racing a pre-copy that would finish by itself.
    let tuning = MigrationTuning {
        max_bandwidth: 32 << 20,
        policy: ConvergencePolicy::PostCopyAfterFirstPass,
        ..Default::default()
    };
    let pair = Pair::start("vx", 256, true, &tuning).await?;
    let t0 = Instant::now();
    let (done, samples) = pair.migrate(&tuning, Duration::from_secs(120)).await;
    let done = done?;
    report("explicit post-copy", &done, t0.elapsed());
    assert_eq!(done.status, "completed");
    assert_eq!(done.switched_to, Some(Switch::PostCopy));
    let at = samples
        .iter()
        .position(|p| p.switched_to.is_some())
        .context("never switched")?;
    assert_eq!(
        samples[at].dirty_sync_count, 2,
        "switch not right after pass 1"
    );
    // Post-copy can be over between two polls; QEMU's count of bytes sent after the
    // switch is there after completion.
    assert!(
        done.postcopy_bytes > 0,
        "no bytes sent in post-copy: {done:?}"
    );
    pair.check_moved_and_quit().await
}

/// One line per pre-copy pass (its last sample): how the watcher saw the migration.
fn print_passes(samples: &[MigrationProgress]) {
    for (i, p) in samples.iter().enumerate() {
        let next = samples.get(i + 1);
        if next.is_none_or(|n| n.dirty_sync_count != p.dirty_sync_count) {
            eprintln!(
                "  pass {:>2} until {:>6?} ms: expected downtime {:?} ms, remaining {} KiB, \
                 dirty {} pages/s, throttle {:?}%, {:?}",
                p.dirty_sync_count,
                p.total_time_ms,
                p.expected_downtime_ms,
                p.remaining_bytes >> 10,
                p.dirty_pages_rate,
                p.cpu_throttle_percent,
                p.switched_to
            );
        }
    }
}

/// Waits until the migration is active and has sent something.
async fn wait_active(q: &QemuBackend) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = q.progress().await?;
        if p.status == "active" && p.transferred_bytes > 0 {
            return Ok(());
        }
        ensure!(!p.is_finished(), "migration finished too early: {p:?}");
        ensure!(
            Instant::now() < deadline,
            "migration never became active: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The source guest is running and still counting.
async fn assert_source_alive(pair: &Pair) -> Result<()> {
    assert_eq!(pair.src_q.run_state().await?, "running");
    let before = last_count(&pair.src.serial).context("no count")?;
    wait_count_above(&pair.src.serial, before + 1, Duration::from_secs(20))
        .await
        .context("source counter after the failed migration")?;
    Ok(())
}

#[tokio::test]
async fn cancel_keeps_source_running() -> Result<()> {
    let _one = SERIAL.lock().await;
    // 2 MiB/s: a 256 MiB guest cannot finish before we cancel.
    let slow = MigrationTuning {
        max_bandwidth: 2 << 20,
        ..Default::default()
    };
    let mut pair = Pair::start("vc", 256, false, &slow).await?;
    pair.src_q.migrate(&pair.uri).await?;
    wait_active(&pair.src_q).await?;
    pair.src_q.migrate_cancel().await?;
    let p = pair
        .src_q
        .wait_finished(Duration::from_millis(100), Duration::from_secs(30), |_| {})
        .await;
    let status = pair.src_q.progress().await?.status;
    assert!(
        p.is_err() && status == "cancelled",
        "after cancel: {p:?} / {status}"
    );
    assert_source_alive(&pair).await?;

    // Destination cleanup: it received a broken stream; whatever state it is in, remove it.
    pair.dst.guard.kill();
    assert!(pair.dst.guard.exited());
    pair.src_q.quit().await?;
    assert!(wait_exit(&mut pair.src, Duration::from_secs(10)).await);
    Ok(())
}

#[tokio::test]
async fn destination_killed_mid_migration_keeps_source_running() -> Result<()> {
    let _one = SERIAL.lock().await;
    // A busy guest on a slow link, with the post-copy policy armed: the destination dies
    // during pre-copy, before any switch, so the source still owns the whole guest.
    let tuning = MigrationTuning {
        max_bandwidth: 4 << 20,
        policy: ConvergencePolicy::PostCopy,
        ..Default::default()
    };
    let mut pair = Pair::start("vk", 256, true, &tuning).await?;
    let dst_pid = pair.dst.guard.id();
    let t0 = Instant::now();
    let killer = async {
        wait_active(&pair.src_q).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        // SIGKILL: no goodbye on the stream, like a crashed node.
        kill_group(dst_pid);
        anyhow::Ok(())
    };
    let ((done, samples), killed) =
        tokio::join!(pair.migrate(&tuning, Duration::from_secs(60)), killer);
    killed?;
    let err = done.expect_err("migration to a killed destination succeeded");
    let last = samples.last().context("no progress sample")?;
    eprintln!(
        "destination killed: {err:#} after {:.2?}; last status {}, error {:?}",
        t0.elapsed(),
        last.status,
        last.error
    );
    assert_eq!(last.status, "failed");
    assert!(samples.iter().all(|p| p.switched_to.is_none()));
    assert_source_alive(&pair).await?;
    assert!(pair.dst.guard.exited());
    pair.src_q.quit().await?;
    assert!(wait_exit(&mut pair.src, Duration::from_secs(10)).await);
    Ok(())
}

/// SIGKILL to a process group (its ChildGuard reaps it later).
fn kill_group(pgid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .status();
}

/// After the switch to post-copy the destination runs the guest and the source only holds
/// the pages not yet pulled: killing the destination now loses the guest. What must hold
/// is that the watcher reports it at once (QEMU parks in "postcopy-paused" waiting for a
/// recovery that never comes) instead of following until the timeout, and that the source
/// does not resume a guest it no longer fully owns.
#[tokio::test]
async fn destination_killed_during_postcopy_is_reported_not_hung() -> Result<()> {
    let _one = SERIAL.lock().await;
    // Post-copy's background push held to 1 MiB/s so the post-copy phase lasts a while.
    let tuning = MigrationTuning {
        max_bandwidth: 32 << 20,
        max_postcopy_bandwidth: Some(1 << 20),
        policy: ConvergencePolicy::PostCopyAfterFirstPass,
        ..Default::default()
    };
    let pair = Pair::start("vq", 256, true, &tuning).await?;
    let dst_pid = pair.dst.guard.id();
    let (mut killed_at, t0) = (None, Instant::now());
    let mut samples = Vec::new();
    pair.src_q.migrate(&pair.uri).await?;
    let r = pair
        .src_q
        .follow(
            &tuning,
            Duration::from_millis(100),
            Duration::from_secs(90),
            |p| {
                if p.mode == MigrationMode::PostCopy && killed_at.is_none() {
                    kill_group(dst_pid);
                    killed_at = Some(t0.elapsed());
                }
                samples.push(p.clone());
            },
        )
        .await;
    let killed_at = killed_at.context("migration never entered post-copy")?;
    let err = r.expect_err("post-copy to a killed destination succeeded");
    let last = samples.last().context("no sample")?;
    eprintln!(
        "destination killed in post-copy at {killed_at:.2?}: {err:#} after {:.2?}",
        t0.elapsed()
    );
    assert!(last.is_postcopy_broken(), "last status {}", last.status);
    assert!(
        t0.elapsed() < killed_at + Duration::from_secs(30),
        "watcher took too long to report the broken post-copy"
    );
    let state = pair.src_q.run_state().await?;
    assert_ne!(
        state, "running",
        "source resumed a guest split with a dead destination"
    );
    eprintln!("  source run state {state}");
    // The source QEMU holds half a guest: the caller can only discard it.
    pair.src_q.quit().await?;
    Ok(())
}
