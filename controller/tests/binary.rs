//! The `ferry-controller` binary as deployed: real process, real apiserver, gRPC agent
//! (no daemon on the nodes here), `/healthz` and `/metrics`.
mod common;

use common::*;
use ferry_crds::Phase;
use ferry_testkit::process::ChildGuard;
use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn the_binary_serves_health_and_metrics_and_explains_missing_daemons() -> anyhow::Result<()> {
    let w = World::new("binary").await?;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry-controller"));
    cmd.arg("--kubeconfig")
        .arg(&env().cluster("east").kubeconfig)
        .args([
            "--namespace",
            &w.ns,
            "--watch-namespace",
            &w.ns,
            "--cluster-name",
            "east",
        ])
        .args([
            "--metrics-addr",
            &addr,
            "--lease-seconds",
            "3",
            "--identity",
            "bin-1",
        ])
        .arg("--tls-dir")
        .arg(ferry_testkit::pki::controller_tls_dir(
            &std::env::temp_dir().join(format!("ferry-binary-tls-{}", std::process::id())),
        )?);
    let _controller = ChildGuard::spawn("ferry-controller", cmd)?;
    wait_for(Duration::from_secs(30), "/healthz", || async {
        Ok(http_get(&addr, "/healthz")?.ends_with("ok"))
    })
    .await?;

    w.pod("web").await?;
    w.migration(
        "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata: {name: nodaemon}\nspec:\n  workload: {pod: web}\n  target: {node: binary-east-2}\n",
    )
    .await?;
    let m = w.wait_phase("nodaemon", Phase::Failed).await?;
    let failure = m.status.unwrap().failure.unwrap();
    assert_eq!(failure.reason, "NotMigratable");
    assert!(
        failure.message.contains("ferry.dev/node-daemon is missing"),
        "{}",
        failure.message
    );

    let metrics = http_get(&addr, "/metrics")?;
    assert!(
        metrics.contains("ferry_controller_reconciles_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"ferry_controller_migrations_finished_total{phase="Failed"} 1"#),
        "{metrics}"
    );
    Ok(())
}
