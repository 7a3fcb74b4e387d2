//! `kubectl ferry` (the kubectl-ferry plugin binary) against real apiservers: migrate
//! creates the Migration the flags describe and refuses bad input before creating
//! anything; status renders what a controller wrote (table, detail, -o, --watch until
//! the end); cancel deletes and refuses finished ones; link gives the home cluster a
//! kubeconfig Secret for the peer's ferry-peer ServiceAccount, with its rights only.
//! A migration through the whole system with the plugin is in containers.rs.
use anyhow::{Context, Result, ensure};
use ferry_e2e::chart::rendered;
use ferry_testkit::testenv::TestEnv;
use ferry_testkit::workspace_bin;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(out: Output, what: &str) -> Result<String> {
    ensure!(out.status.success(), "{what}: {}", text(&out));
    Ok(String::from_utf8(out.stdout)?)
}

struct Env {
    env: TestEnv,
    plugin: std::path::PathBuf,
}

impl Env {
    /// `kubectl-ferry --kubeconfig EAST ARGS` (the plugin as kubectl runs it).
    fn ferry(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.plugin);
        c.arg("--kubeconfig")
            .arg(&self.env.cluster("east").kubeconfig)
            .args(args);
        c
    }

    fn kubectl(&self, cluster: &str, args: &[&str]) -> Result<String> {
        ok(
            self.env.kubectl(cluster).args(args).output()?,
            &format!("kubectl {args:?}"),
        )
    }

    fn migration_json(&self, name: &str) -> Result<serde_json::Value> {
        let out = self.kubectl(
            "east",
            &["-n", "demo", "get", "migration", name, "-o", "json"],
        )?;
        Ok(serde_json::from_str(&out)?)
    }

    /// Writes a status as the controller would (the status subresource).
    fn set_status(&self, name: &str, status: serde_json::Value) -> Result<()> {
        let patch = serde_json::json!({ "status": status }).to_string();
        self.kubectl(
            "east",
            &[
                "-n",
                "demo",
                "patch",
                "migration",
                name,
                "--subresource=status",
                "--type=merge",
                "-p",
                &patch,
            ],
        )?;
        Ok(())
    }
}

fn apply(env: &TestEnv, cluster: &str, file: &Path) -> Result<()> {
    ok(
        env.kubectl(cluster)
            .args(["apply", "--server-side", "-f"])
            .arg(file)
            .output()?,
        "kubectl apply",
    )?;
    Ok(())
}

#[test]
fn kubectl_ferry_migrates_shows_cancels_and_links() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let e = Env {
        env: TestEnv::start_in(dir.path(), &["east", "west"])?,
        plugin: workspace_bin("kubectl-ferry")?,
    };
    let chart = dir.path().join("ferry.yaml");
    std::fs::write(&chart, rendered()?)?;
    for c in ["east", "west"] {
        e.kubectl(c, &["create", "namespace", "ferry-system"])?;
        apply(&e.env, c, &chart)?;
    }
    e.kubectl("east", &["create", "namespace", "demo"])?;
    // A Pod to move (no node runs it here: the plugin only needs it to exist).
    e.kubectl(
        "east",
        &[
            "-n",
            "demo",
            "run",
            "counter",
            "--image=busybox",
            "--restart=Never",
        ],
    )?;

    // migrate: the Migration the flags say, named after the Pod.
    let out = ok(
        e.ferry(&[
            "-n",
            "demo",
            "migrate",
            "counter",
            "--to",
            "west/west-1",
            "--cold",
            "--compress",
        ])
        .output()?,
        "kubectl ferry migrate",
    )?;
    let name = out
        .trim()
        .strip_prefix("migration.ferry.dev/")
        .and_then(|s| s.strip_suffix(" created"))
        .with_context(|| format!("migrate printed {out:?}"))?
        .to_string();
    ensure!(name.starts_with("counter-"), "named {name}");
    let m = e.migration_json(&name)?;
    ensure!(
        m["spec"]["workload"]["pod"] == "counter"
            && m["spec"]["target"] == serde_json::json!({"cluster": "west", "node": "west-1"})
            && m["spec"]["strategy"] == "Cold"
            && m["spec"]["transfer"]["compress"] == true,
        "spec: {}",
        m["spec"]
    );
    // -o json prints the created object; /NODE moves within this cluster; no strategy
    // flag leaves the strategy to policies and the CRD's default.
    let out = ok(
        e.ferry(&[
            "-n", "demo", "migrate", "counter", "--to", "/east-2", "--name", "local", "-o", "json",
        ])
        .output()?,
        "migrate -o json",
    )?;
    let created: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(created["metadata"]["name"] == "local");
    ensure!(created["spec"]["target"] == serde_json::json!({"node": "east-2"}));
    ensure!(created["spec"]["strategy"].is_null(), "{}", created["spec"]);

    // Refused before anything is created, with what to fix.
    let before = e.kubectl("east", &["-n", "demo", "get", "migrations", "-o", "name"])?;
    for (args, want) in [
        (
            vec!["migrate", "nope", "--to", "west"],
            "pod demo/nope not found",
        ),
        (
            vec!["migrate", "counter", "--to", "West/x"],
            "is not a cluster name",
        ),
        (vec!["migrate", "counter", "--to", ""], "--to is empty"),
        (
            vec!["migrate", "counter", "--to", "west", "--cold", "--live"],
            "cannot be used with",
        ),
    ] {
        let mut full = vec!["-n", "demo"];
        full.extend(args.iter().copied());
        let out = e.ferry(&full).output()?;
        ensure!(
            !out.status.success() && text(&out).contains(want),
            "{args:?}: want {want:?}, got {}",
            text(&out)
        );
    }
    ensure!(before == e.kubectl("east", &["-n", "demo", "get", "migrations", "-o", "name"])?);

    // status: what the controller wrote, rendered.
    e.set_status(
        &name,
        serde_json::json!({
            "phase": "Transferring",
            "source": {"node": "east-1", "namespace": "demo", "pod": "counter", "display": "east-1"},
            "target": {"cluster": "west", "node": "west-1", "namespace": "demo", "pod": "counter", "display": "west/west-1"},
            "progress": {"bytesTransferred": 25, "bytesTotal": 100, "display": "25/100 (25%)", "bytesPerSecond": 2097152},
            "timings": {"phases": [
                {"phase": "Pending", "enteredAt": "2026-12-04T10:00:00Z", "enteredAtMs": 1000, "durationMs": 60},
                {"phase": "Preparing", "enteredAt": "2026-12-04T10:00:00Z", "enteredAtMs": 1060, "durationMs": 3740},
                {"phase": "Transferring", "enteredAt": "2026-12-04T10:00:04Z", "enteredAtMs": 4800}
            ]}
        }),
    )?;
    let detail = ok(
        e.ferry(&["-n", "demo", "status", &name]).output()?,
        "status NAME",
    )?;
    for want in [
        "Workload:   pod counter on east-1 → west/west-1",
        "Transferring  [######..................]  25%  25/100 (25%)  2.0 MiB/s",
        "  Preparing     3.74s",
        "so far",
    ] {
        ensure!(detail.contains(want), "no {want:?} in\n{detail}");
    }
    let table = ok(e.ferry(&["-n", "demo", "status"]).output()?, "status")?;
    ensure!(
        table
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()[..5]
                == [
                    name.as_str(),
                    "Transferring",
                    "counter",
                    "west/west-1",
                    "25/100"
                ]),
        "{table}"
    );
    let yaml = ok(
        e.ferry(&["-n", "demo", "status", &name, "-o", "yaml"])
            .output()?,
        "-o yaml",
    )?;
    ensure!(yaml.contains("phase: Transferring"), "{yaml}");

    // --watch follows until the end and exits 0 for Succeeded.
    let mut watch = e
        .ferry(&["-n", "demo", "status", &name, "--watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // It must have shown the running phase before the Migration ends: read what it
    // prints as it prints it, and end the Migration only once Transferring is there.
    let printed = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let reader = {
        let printed = printed.clone();
        let mut stdout = watch.stdout.take().context("the watch's stdout")?;
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut stdout, &mut buf) {
                if n == 0 {
                    break;
                }
                printed.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let shown = |what: &str| String::from_utf8_lossy(&printed.lock().unwrap()).contains(what);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !shown("Transferring") {
        if Instant::now() > deadline || watch.try_wait()?.is_some() {
            let _ = watch.kill();
            anyhow::bail!(
                "status --watch did not show Transferring: {}",
                String::from_utf8_lossy(&printed.lock().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    e.set_status(
        &name,
        serde_json::json!({"phase": "Succeeded",
            "progress": {"bytesTransferred": 100, "bytesTotal": 100, "display": "100/100 (100%)"},
            "timings": {"downtimeMs": 420, "downtime": "420ms", "totalMs": 5000}}),
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while watch.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = watch.kill();
            anyhow::bail!("status --watch did not end when the Migration did");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = watch.wait_with_output()?;
    reader.join().expect("the watch's reader");
    let followed = format!(
        "{}{}",
        String::from_utf8_lossy(&printed.lock().unwrap()),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "watch: {followed}");
    ensure!(
        followed.contains("Transferring")
            && followed.contains("Succeeded")
            && followed.contains("Downtime:   420ms (total 5.00s)"),
        "{followed}"
    );

    // cancel: a finished one is refused; a running one is deleted (no controller runs
    // here to hold it with its finalizer, so it goes at once).
    let out = e.ferry(&["-n", "demo", "cancel", &name]).output()?;
    ensure!(
        !out.status.success() && text(&out).contains("already ended (Succeeded)"),
        "{}",
        text(&out)
    );
    let out = ok(
        e.ferry(&["-n", "demo", "cancel", "local"]).output()?,
        "cancel",
    )?;
    ensure!(
        out.contains("cancelled: the workload runs at the source"),
        "{out}"
    );
    let left = e.kubectl("east", &["-n", "demo", "get", "migrations", "-o", "name"])?;
    ensure!(!left.contains("/local"), "{left}");

    // link: west's ferry-peer, reachable from east through a Secret.
    let out = e.ferry(&["link", "west", "--home", "east"]).output()?;
    ensure!(
        !out.status.success() && text(&out).contains("--peer-kubeconfig"),
        "{}",
        text(&out)
    );
    let west_kc = e.env.cluster("west").kubeconfig.clone();
    let out = ok(
        e.ferry(&["link", "west", "--home", "east", "--peer-kubeconfig"])
            .arg(&west_kc)
            .output()?,
        "link",
    )?;
    ensure!(out.contains("cluster \"west\" linked"), "{out}");
    let stored = e.kubectl(
        "east",
        &[
            "-n",
            "ferry-system",
            "get",
            "secret",
            "-l",
            "ferry.dev/cluster=west",
            "-o",
            "go-template={{range .items}}{{.data.kubeconfig | base64decode}}{{end}}",
        ],
    )?;
    ensure!(!stored.is_empty(), "no link Secret for west");
    let linked = dir.path().join("linked-kubeconfig");
    std::fs::write(&linked, stored)?;
    let can = |args: &[&str]| -> Result<String> {
        let out = e
            .env
            .kubectl("west")
            .arg("--kubeconfig")
            .arg(&linked)
            .args(["auth", "can-i"])
            .args(args)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    ensure!(can(&["create", "pods", "-n", "demo"])? == "yes");
    ensure!(can(&["list", "nodes"])? == "yes");
    ensure!(can(&["get", "secrets", "-n", "ferry-system"])? == "no");
    ensure!(can(&["delete", "nodes"])? == "no");
    // Linking again is idempotent.
    ok(
        e.ferry(&["link", "west", "--home", "east", "--peer-kubeconfig"])
            .arg(&west_kc)
            .output()?,
        "link again",
    )?;
    Ok(())
}
