//! Making the kubelet's stop signal visible on a frozen source.
//!
//! `finalize` ends a frozen source copy only once its kubelet has begun stopping it (a
//! signal pending on each container's init), so that the kubelet never restarts a
//! container it still believes should run. But a container's init is the init of its
//! PID namespace, and the kernel drops a signal sent from outside the namespace to an
//! init that has no handler for it (`sig_task_ignored`, kernel/signal.c). Most
//! workloads have none for SIGTERM, so nothing was pending until the kubelet's SIGKILL,
//! which it sends no sooner than 2 s after the SIGTERM whatever the Pod asks for
//! (`minimumGracePeriodInSeconds`, pkg/kubelet/kuberuntime): every move's Completing
//! waited those 2 s.
//!
//! A traced task's signals are never dropped when sent (`sig_ignored`: "tracers may
//! want to know about even ignored signal"). So while the source is frozen, a
//! [`StopSignalHold`] holds each init with `PTRACE_SEIZE`, which neither stops nor
//! changes the task, and the kubelet's SIGTERM stays pending where finalize sees it at
//! once. The hold is released (its thread exits, which detaches) before anything thaws
//! or kills the tasks, and by itself as soon as one of them changes state (dies, or
//! stops because something else thawed it), so that nothing the kubelet or the
//! containerd shim waits for ever waits on ferry. A signal the hold kept pending is
//! then delivered as it would have been: an init without a handler ignores it.
use super::pod::traced;
use nix::sys::ptrace;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the holding thread looks at its tracees.
const CHECK: Duration = Duration::from_millis(20);

/// The seized inits of a frozen source; dropping it releases them.
pub(super) struct StopSignalHold {
    release: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    held: Vec<u32>,
}

impl StopSignalHold {
    /// Seizes every pid it can (a tracer is a thread: one thread holds them all until
    /// the hold is dropped). Returns the hold and the pids it could not seize, with why
    /// (one already traced, as by a CRIU still serving lazy pages, or a daemon without
    /// `CAP_SYS_PTRACE`): for those, finalize waits for the kubelet's SIGKILL as before.
    pub(super) fn seize(pids: &[u32]) -> (StopSignalHold, Vec<(u32, String)>) {
        let (release, released) = mpsc::channel::<()>();
        let (report, seized) = mpsc::channel();
        let pids = pids.to_vec();
        let all = pids.clone();
        let spawned = std::thread::Builder::new()
            .name("ferry-stop-signal-hold".into())
            .spawn(move || hold(pids, report, released));
        let thread = match spawned {
            Ok(t) => t,
            Err(e) => {
                let why = format!("no thread to hold them: {e}");
                let failed = all.into_iter().map(|p| (p, why.clone())).collect();
                return (StopSignalHold::none(), failed);
            }
        };
        let (held, failed) = seized.recv().unwrap_or_else(|_| {
            let why = "the holding thread ended".to_string();
            (
                Vec::new(),
                all.into_iter().map(|p| (p, why.clone())).collect(),
            )
        });
        (
            StopSignalHold {
                release: Some(release),
                thread: Some(thread),
                held,
            },
            failed,
        )
    }

    /// A hold of nothing.
    fn none() -> StopSignalHold {
        StopSignalHold {
            release: None,
            thread: None,
            held: Vec::new(),
        }
    }
}

impl Drop for StopSignalHold {
    /// Returns once the tasks are untraced, so that what comes next (a thaw, a kill)
    /// meets them as the kubelet does.
    fn drop(&mut self) {
        drop(self.release.take());
        if let Some(t) = self.thread.take() {
            // Quick: the thread wakes at the channel's close.
            let _ = t.join();
        }
        // The kernel detaches a thread's tracees late in its exit, after the wakeup
        // that ends the join.
        let deadline = std::time::Instant::now() + RELEASE_WAIT;
        while self.held.iter().any(|p| traced(*p)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// How long a release waits for the kernel to detach (it takes microseconds).
const RELEASE_WAIT: Duration = Duration::from_secs(1);

/// What the holding thread reports: the pids it holds, and those it could not seize
/// with why.
type Seized = (Vec<u32>, Vec<(u32, String)>);

/// The holding thread: seize, report, then keep the tracees until released or until one
/// of them changes state; returning detaches them all.
fn hold(pids: Vec<u32>, report: mpsc::Sender<Seized>, released: mpsc::Receiver<()>) {
    let (mut held, mut failed) = (Vec::new(), Vec::new());
    for p in pids {
        match ptrace::seize(Pid::from_raw(p as i32), ptrace::Options::empty()) {
            Ok(()) => held.push(p),
            Err(e) => failed.push((p, e.desc().to_string())),
        }
    }
    let _ = report.send((held.clone(), failed));
    if held.is_empty() {
        return;
    }
    let flags = WaitPidFlag::WNOHANG | WaitPidFlag::__WALL;
    loop {
        match released.recv_timeout(CHECK) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        // A tracee that died or stopped is the kernel's to hand on (to its parent, or
        // to its signal's delivery) once we detach: waiting on it here reports it to
        // its real parent as well, it does not reap it.
        if held.iter().any(|p| {
            let status = waitpid(Pid::from_raw(*p as i32), Some(flags));
            !matches!(status, Ok(WaitStatus::StillAlive))
        }) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::containers::alive;
    use crate::containers::pod::{Freezer, signal_pending};
    use std::process::{Child, Command};

    /// A `sleep` as the init of its own PID namespace (as a container's init is),
    /// frozen in a cgroup of its own.
    struct FrozenInit {
        unshare: Child,
        init: u32,
        freezer: Freezer,
        dir: std::path::PathBuf,
    }

    impl FrozenInit {
        async fn start(name: &str) -> FrozenInit {
            let unshare = Command::new("unshare")
                .args(["--fork", "--pid", "--mount-proc", "sleep", "1000"])
                .spawn()
                .expect("unshare");
            let children = format!("/proc/{}/task/{}/children", unshare.id(), unshare.id());
            let init = wait_until(Duration::from_secs(10), || {
                std::fs::read_to_string(&children)
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
            })
            .expect("the namespace's init");
            let cgroup = format!("ferry-test-{name}-{}", std::process::id());
            let freezer = Freezer::for_cgroup(&cgroup);
            let dir = freezer.dir().to_path_buf();
            std::fs::create_dir_all(&dir).expect("a freezer cgroup");
            std::fs::write(dir.join("cgroup.procs"), init.to_string()).expect("into it");
            freezer
                .freeze(Duration::from_secs(10))
                .await
                .expect("frozen");
            FrozenInit {
                unshare,
                init,
                freezer,
                dir,
            }
        }

        fn term(&self) {
            nix::sys::signal::kill(
                Pid::from_raw(self.init as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .expect("SIGTERM");
        }
    }

    impl Drop for FrozenInit {
        fn drop(&mut self) {
            let _ = self.freezer.thaw();
            let _ = self.unshare.kill();
            let _ = nix::sys::signal::kill(
                Pid::from_raw(self.init as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = self.unshare.wait();
            let _ = wait_until(Duration::from_secs(10), || {
                std::fs::remove_dir(&self.dir).ok()
            });
        }
    }

    fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(v) = f() {
                return Some(v);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[tokio::test]
    async fn a_held_frozen_init_keeps_the_stop_signal_pending() {
        // Unheld: the kernel drops the SIGTERM (the premise of this module).
        let bare = FrozenInit::start("unheld").await;
        bare.term();
        assert!(
            !signal_pending(bare.init),
            "an unheld namespace init kept a SIGTERM"
        );

        let w = FrozenInit::start("held").await;
        let (h, failed) = StopSignalHold::seize(&[w.init]);
        assert!(failed.is_empty(), "could not seize: {failed:?}");
        w.term();
        assert!(
            signal_pending(w.init),
            "the held init's SIGTERM was dropped"
        );
        // Released, then thawed: the init ignores the SIGTERM as it would have, and
        // runs on untraced.
        drop(h);
        assert!(!traced(w.init), "still traced after the release");
        w.freezer.thaw().expect("thaw");
        std::thread::sleep(Duration::from_millis(200));
        assert!(alive(w.init), "the released init did not run on");
    }

    #[tokio::test]
    async fn a_hold_lets_go_of_a_dying_init() {
        let mut w = FrozenInit::start("dying").await;
        let (h, failed) = StopSignalHold::seize(&[w.init]);
        assert!(failed.is_empty(), "could not seize: {failed:?}");
        // What the kubelet's SIGKILL does through runc: kill, then thaw.
        nix::sys::signal::kill(
            Pid::from_raw(w.init as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        w.freezer.thaw().unwrap();
        // Its parent (unshare) reaps it and exits while the hold is still in scope.
        let exited = wait_until(Duration::from_secs(10), || {
            w.unshare.try_wait().ok().flatten()
        });
        assert!(
            exited.is_some(),
            "the dead init was kept from its parent by the hold"
        );
        assert!(!alive(w.init));
        drop(h);
    }

    #[test]
    fn seizing_nothing_that_exists_reports_it() {
        let (_h, failed) = StopSignalHold::seize(&[u32::MAX >> 1]);
        assert_eq!(failed.len(), 1, "{failed:?}");
    }
}
