//! The baseline: the same memhog container moved by hand with runc and CRIU, its
//! source in the source node's network namespace and its destination in the
//! target's (see the parent module's docs for what each case measures).
use super::{SOURCE_NODE, TARGET_NODE, ms, wait_resident};
use anyhow::{Context, Result, bail, ensure};
use ferry_e2e::world::World;
use ferry_testkit::containers::{CgroupGuard, RuncRoot};
use std::io::Read;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A by-hand move's steps, one after the other, in the shape the controller reports
/// ferry's (`status.timings.steps`: name, node, startMs, durationMs), so the two plot
/// side by side; times are ms since the move began.
struct StepClock {
    t0: Instant,
    last: Instant,
    steps: Vec<serde_json::Value>,
}

impl StepClock {
    fn new(t0: Instant) -> StepClock {
        StepClock {
            t0,
            last: t0,
            steps: vec![],
        }
    }

    /// Records the step that ran from the previous one's end until now.
    fn step(&mut self, name: &str, node: &str) {
        let now = Instant::now();
        self.steps.push(serde_json::json!({
            "name": name,
            "node": node,
            "startMs": (self.last - self.t0).as_secs_f64() * 1e3,
            "durationMs": (now - self.last).as_secs_f64() * 1e3,
        }));
        self.last = now;
    }

    fn steps(self) -> serde_json::Value {
        self.steps.into()
    }
}

/// One node of the by-hand path: its network namespace and a runc root of its own.
struct RawNode {
    netns: String,
    ip: Ipv4Addr,
    /// Force-deletes what is left under the root when dropped.
    runc: RuncRoot,
}

/// The baseline: runc and CRIU driven by hand (see the module docs).
pub(super) struct Raw {
    dir: PathBuf,
    memhog: PathBuf,
    runc: PathBuf,
    criu: PathBuf,
    src: RawNode,
    dst: RawNode,
    /// Parent of every baseline container's cgroup; removed on drop.
    cgroup: CgroupGuard,
}

impl Raw {
    pub(super) fn new(w: &World, dir: &Path, memhog: &Path) -> Result<Raw> {
        std::fs::create_dir_all(dir)?;
        let node = |name: &str, root: &str| {
            let kube = &w.node(name).kube;
            RawNode {
                netns: kube.netns().to_string(),
                ip: kube.ip(),
                runc: RuncRoot {
                    root: dir.join(root),
                },
            }
        };
        Ok(Raw {
            dir: dir.to_path_buf(),
            memhog: memhog.to_path_buf(),
            // The runc ferry-runtime is configured with (e2e/src/world.rs).
            runc: ["/usr/sbin/runc", "/usr/bin/runc"]
                .into_iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
                .context("runc not installed")?,
            criu: ferry_testkit::containers::criu()?,
            src: node(SOURCE_NODE, "runc-src"),
            dst: node(TARGET_NODE, "runc-dst"),
            cgroup: CgroupGuard::new("bench"),
        })
    }

    /// runc with `node`'s root and our CRIU, inside `node`'s network namespace
    /// (`nsenter --net` execs runc, so runc's stdio is what we give this Command).
    fn runc(&self, node: &RawNode) -> Command {
        let mut c = self.in_netns(node, &self.runc);
        c.arg("--root")
            .arg(&node.runc.root)
            .arg("--criu")
            .arg(&self.criu);
        c
    }

    fn in_netns(&self, node: &RawNode, prog: &Path) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", node.netns)).arg(prog);
        c
    }

    /// A bundle of `memhog MIB --devnull`, run under the source root; returns the
    /// bundle once the heap is resident.
    fn start(&self, id: &str, mib: u64) -> Result<PathBuf> {
        let bundle = self.dir.join(id).join("bundle");
        let rootfs = bundle.join("rootfs");
        for d in ["proc", "dev", "tmp"] {
            std::fs::create_dir_all(rootfs.join(d))?;
        }
        std::fs::copy(&self.memhog, rootfs.join("memhog"))?;
        let mut spec = Command::new(&self.runc);
        spec.args(["spec", "--bundle"]).arg(&bundle);
        run_ok(spec, "runc spec", None)?;
        let path = bundle.join("config.json");
        let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        c["process"]["terminal"] = false.into();
        c["process"]["args"] = serde_json::json!(["/memhog", mib.to_string(), "--devnull"]);
        c["linux"]["cgroupsPath"] = format!("/{}/src/{id}", self.cgroup.0).into();
        // Keep the mounts CRIU handles without extra options (no sysfs/cgroup/mqueue).
        let keep = ["/proc", "/dev", "/dev/pts", "/dev/shm"];
        let mounts: Vec<serde_json::Value> = c["mounts"]
            .as_array()
            .context("runc spec has mounts")?
            .iter()
            .filter(|m| keep.contains(&m["destination"].as_str().unwrap_or("")))
            .cloned()
            .collect();
        c["mounts"] = mounts.into();
        std::fs::write(&path, serde_json::to_vec_pretty(&c)?)?;

        let err_path = self.dir.join(id).join("run.stderr");
        let st = self
            .runc(&self.src)
            .args(["run", "--detach", "--bundle"])
            .arg(&bundle)
            .arg(id)
            // The container inherits runc's stdio: a pipe here would never reach EOF.
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err_path)?)
            .status()?;
        ensure!(
            st.success(),
            "runc run {id}: {}",
            std::fs::read_to_string(&err_path).unwrap_or_default()
        );
        wait_resident(mib, || self.pid(&self.src, id))?;
        Ok(bundle)
    }

    fn state(&self, node: &RawNode, id: &str) -> Result<serde_json::Value> {
        let mut c = self.runc(node);
        c.args(["state", id]);
        Ok(serde_json::from_slice(&run_ok(c, "runc state", None)?)?)
    }

    fn pid(&self, node: &RawNode, id: &str) -> Result<u32> {
        let s = self.state(node, id)?;
        s["pid"]
            .as_u64()
            .filter(|&p| p > 0)
            .map(|p| p as u32)
            .context("runc state: no pid")
    }

    /// The restored copy runs (checked after the clock stopped).
    fn check_restored(&self, id: &str) -> Result<()> {
        let s = self.state(&self.dst, id)?;
        ensure!(s["status"] == "running", "restored {id} is {}", s["status"]);
        Ok(())
    }

    /// The copy must not share the source's cgroup (the source is gone by then, but
    /// keep the two apart as two nodes would).
    fn retarget_cgroup(&self, bundle: &Path, id: &str) -> Result<()> {
        let path = bundle.join("config.json");
        let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        c["linux"]["cgroupsPath"] = format!("/{}/dst/{id}", self.cgroup.0).into();
        std::fs::write(&path, serde_json::to_vec(&c)?)?;
        Ok(())
    }

    fn restore(&self, id: &str, img: &Path, work: &Path, bundle: &Path, lazy: bool) -> Result<()> {
        let mut c = self.runc(&self.dst);
        c.args(["restore", "--detach", "--image-path"])
            .arg(img)
            .arg("--work-path")
            .arg(work)
            .arg("--bundle")
            .arg(bundle);
        if lazy {
            c.arg("--lazy-pages");
        }
        c.arg(id);
        run_ok(c, "runc restore", Some(&work.join("restore.log"))).map(drop)
    }

    /// The directories of one by-hand move: the source's images and work dir, their
    /// copies at the destination, and the copied bundle (created where runc needs it).
    fn raw_dirs(&self, id: &str) -> Result<RawDirs> {
        let d = self.dir.join(id);
        let dirs = RawDirs {
            img: d.join("img"),
            work: d.join("work"),
            img2: d.join("img2"),
            work2: d.join("work2"),
            bundle2: d.join("bundle2"),
            d,
        };
        for p in [&dirs.img, &dirs.work, &dirs.work2] {
            std::fs::create_dir_all(p)?;
        }
        Ok(dirs)
    }

    /// The copy step of a by-hand move: images and bundle to the destination's side,
    /// the bundle pointed at the destination's cgroup.
    fn copy_to_destination(
        &self,
        id: &str,
        img: &Path,
        bundle: &Path,
        img2: &Path,
        bundle2: &Path,
    ) -> Result<()> {
        cp(img, img2)?;
        cp(bundle, bundle2)?;
        self.retarget_cgroup(bundle2, id)
    }

    /// Cold by hand; returns the downtime in ms and its steps.
    pub(super) fn cold(&self, mib: u64, run: usize) -> Result<(f64, serde_json::Value)> {
        self.removing(&format!("raw-cold-{mib}-{run}"), |id| {
            self.cold_inner(id, mib)
        })
    }

    fn cold_inner(&self, id: &str, mib: u64) -> Result<(f64, serde_json::Value)> {
        let bundle = self.start(id, mib)?;
        let RawDirs {
            img,
            work,
            img2,
            work2,
            bundle2,
            ..
        } = self.raw_dirs(id)?;
        let t0 = Instant::now();
        let mut clock = StepClock::new(t0);
        let mut c = self.runc(&self.src);
        c.args(["checkpoint", "--image-path"])
            .arg(&img)
            .arg("--work-path")
            .arg(&work)
            .arg(id);
        run_ok(c, "runc checkpoint", Some(&work.join("dump.log")))?;
        clock.step("dump", SOURCE_NODE);
        self.copy_to_destination(id, &img, &bundle, &img2, &bundle2)?;
        clock.step("copy", "-");
        self.restore(id, &img2, &work2, &bundle2, false)?;
        clock.step("restore", TARGET_NODE);
        let downtime = ms(t0);
        self.check_restored(id)?;
        Ok((downtime, clock.steps()))
    }

    /// Lazy pages by hand; returns (downtime ms, until every page arrived ms, steps).
    pub(super) fn lazy(&self, mib: u64, run: usize) -> Result<(f64, f64, serde_json::Value)> {
        self.removing(&format!("raw-lazy-{mib}-{run}"), |id| {
            self.lazy_inner(id, mib)
        })
    }

    /// Runs one by-hand move of container `id`, then removes what it left, whether it
    /// succeeded or not.
    fn removing<T>(&self, id: &str, run: impl FnOnce(&str) -> Result<T>) -> Result<T> {
        let result = run(id);
        self.remove(id);
        result
    }

    fn lazy_inner(&self, id: &str, mib: u64) -> Result<(f64, f64, serde_json::Value)> {
        let bundle = self.start(id, mib)?;
        let RawDirs {
            d,
            img,
            work,
            img2,
            work2,
            bundle2,
        } = self.raw_dirs(id)?;
        // A port the kernel just called free (on the host; the node's namespace has
        // only ferry-node's and the kubelet's listeners, on fixed ports).
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let t0 = Instant::now();
        let mut clock = StepClock::new(t0);
        let mut c = self.runc(&self.src);
        c.args(["checkpoint", "--image-path"])
            .arg(&img)
            .arg("--work-path")
            .arg(&work)
            .arg("--page-server")
            .arg(format!("{}:{port}", self.src.ip))
            // CRIU writes one byte to fd 1 once its lazy page server listens.
            .args(["--lazy-pages", "--status-fd", "1"])
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(d.join("checkpoint.stderr"))?);
        let mut dump = Group::spawn(c)?;
        let dump_log = work.join("dump.log");
        let mut byte = [0u8; 1];
        if dump.stdout()?.read(&mut byte)? != 1 {
            let st = dump.wait(Duration::from_secs(10))?;
            bail!(
                "raw lazy dump ended ({st}) before its page server started: {}{}",
                std::fs::read_to_string(d.join("checkpoint.stderr")).unwrap_or_default(),
                log_tail(&dump_log)
            );
        }
        clock.step("dump", SOURCE_NODE);
        self.copy_to_destination(id, &img, &bundle, &img2, &bundle2)?;
        clock.step("copy", "-");
        // The destination's userfaultfd daemon; `--daemon` returns once its socket (in
        // the restore's work dir) is ready, and it exits once every page is in.
        let mut lp = self.in_netns(&self.dst, &self.criu);
        lp.args(["lazy-pages", "--daemon", "--page-server", "--address"])
            .arg(self.src.ip.to_string())
            .arg("--port")
            .arg(port.to_string())
            .arg("--images-dir")
            .arg(&img2)
            .arg("--work-dir")
            .arg(&work2)
            .arg("--pidfile")
            .arg(work2.join("lazy.pid"))
            .arg("-o")
            .arg(work2.join("lazy.log"))
            .arg("-v4");
        run_ok(lp, "criu lazy-pages", Some(&work2.join("lazy.log")))?;
        clock.step("lazy-pages daemon", TARGET_NODE);
        self.restore(id, &img2, &work2, &bundle2, true)?;
        clock.step("restore", TARGET_NODE);
        let downtime = ms(t0);
        // The source CRIU exits (and runc checkpoint with it) once the last page went.
        let st = dump.wait(Duration::from_secs(120 + mib / 4))?;
        clock.step("pages", "-");
        let total = ms(t0);
        ensure!(
            st.success(),
            "runc checkpoint --lazy-pages: {st}: {}{}",
            std::fs::read_to_string(d.join("checkpoint.stderr")).unwrap_or_default(),
            log_tail(&dump_log)
        );
        self.check_restored(id)?;
        Ok((downtime, total, clock.steps()))
    }

    /// Ends both copies of `id` and removes its files (errors ignored: best effort).
    fn remove(&self, id: &str) {
        for node in [&self.src, &self.dst] {
            let mut c = self.runc(node);
            c.args(["delete", "--force", id]);
            let _ = c.output();
        }
        // A lazy-pages daemon is gone by now unless the run failed half way.
        let pidfile = self.dir.join(id).join("work2").join("lazy.pid");
        if let Some(pid) = std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = std::fs::remove_dir_all(self.dir.join(id));
    }
}

/// One by-hand move's directories: its images and CRIU work dirs on each side, and the
/// restored bundle.
struct RawDirs {
    d: PathBuf,
    img: PathBuf,
    work: PathBuf,
    img2: PathBuf,
    work2: PathBuf,
    bundle2: PathBuf,
}

/// A spawned process group (runc and the CRIU it starts); killed on drop unless it
/// was waited for.
struct Group(Option<Child>);

impl Group {
    fn spawn(mut cmd: Command) -> Result<Group> {
        cmd.process_group(0);
        Ok(Group(Some(
            cmd.spawn().with_context(|| format!("starting {cmd:?}"))?,
        )))
    }

    fn stdout(&mut self) -> Result<&mut std::process::ChildStdout> {
        self.0
            .as_mut()
            .and_then(|c| c.stdout.as_mut())
            .context("no stdout pipe")
    }

    /// Its exit status; polls often, the return is on the clock of the lazy baseline.
    fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.0.as_mut().context("already waited")?;
        loop {
            if let Some(st) = child.try_wait()? {
                self.0 = None;
                return Ok(st);
            }
            ensure!(Instant::now() < deadline, "still running after {timeout:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = c.wait();
        }
    }
}

/// Runs `cmd` (stdin from /dev/null) and returns its stdout; a failure carries stderr
/// and the end of the CRIU log `log`.
fn run_ok(mut cmd: Command, what: &str, log: Option<&Path>) -> Result<Vec<u8>> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    ensure!(
        out.status.success(),
        "{what}: {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim(),
        log.map(log_tail).unwrap_or_default()
    );
    Ok(out.stdout)
}

/// The last lines of a CRIU log, for an error message.
fn log_tail(path: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(12)..].join("\n");
    format!("\n--- {} (end) ---\n{tail}", path.display())
}

fn cp(from: &Path, to: &Path) -> Result<()> {
    let st = Command::new("cp").arg("-a").arg(from).arg(to).status()?;
    ensure!(
        st.success(),
        "cp -a {} {} failed",
        from.display(),
        to.display()
    );
    Ok(())
}
