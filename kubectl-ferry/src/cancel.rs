//! `kubectl ferry cancel NAME`: a Migration is cancelled by deleting it (its finalizer
//! rolls the move back: the target copy goes, the source runs on). Waits until the
//! controller has let go of it unless `--wait=false`.
use crate::{Global, connect};
use anyhow::{Context, Result, bail};
use ferry_crds::{Migration, Phase};
use kube::api::{Api, DeleteParams};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct Args {
    pub name: String,
    /// Wait until the controller has rolled the move back and the Migration is gone.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub wait: bool,
    /// How long to wait, in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

pub async fn run(g: &Global, a: Args) -> Result<ExitCode> {
    let (client, ns) = connect(g).await?;
    let api: Api<Migration> = Api::namespaced(client, &ns);
    let m = api
        .get(&a.name)
        .await
        .with_context(|| format!("getting Migration {ns}/{}", a.name))?;
    let status = m.status.clone().unwrap_or_default();
    if let Some(p) = status.phase.filter(|p| p.is_terminal()) {
        bail!(
            "Migration {ns}/{} already ended ({p}); nothing to cancel (`kubectl delete migration {}` removes it)",
            a.name,
            a.name
        );
    }
    if status.committed {
        eprintln!(
            "Migration {ns}/{} is past its point of no return (status.committed): the controller completes it before the Migration goes",
            a.name
        );
    }
    api.delete(&a.name, &DeleteParams::default())
        .await
        .with_context(|| format!("deleting Migration {ns}/{}", a.name))?;
    if !a.wait {
        println!("migration.ferry.dev/{} cancel requested", a.name);
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let mut last_phase: Option<Phase> = status.phase;
    while let Some(m) = api.get_opt(&a.name).await? {
        last_phase = m.status.and_then(|s| s.phase).or(last_phase);
        if Instant::now() > deadline {
            bail!(
                "Migration {ns}/{} still there after {}s (phase {}): the controller has not finished its cleanup; is it running?",
                a.name,
                a.timeout,
                last_phase.map(Phase::as_str).unwrap_or("Pending")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let what = match last_phase {
        Some(Phase::Succeeded) => "it had completed: the workload runs at the target",
        _ if status.committed => "it was completed first",
        _ => "the workload runs at the source",
    };
    println!("migration.ferry.dev/{} cancelled: {what}", a.name);
    Ok(ExitCode::SUCCESS)
}
