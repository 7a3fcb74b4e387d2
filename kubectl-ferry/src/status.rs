//! `kubectl ferry status [NAME]`: the Migrations of a namespace as a table, or one in
//! detail; `--watch` follows one, a line per change, until it ends.
use crate::{Global, Output, connect, render};
use anyhow::{Context, Result};
use ferry_crds::{Migration, Phase};
use futures::StreamExt;
use kube::api::{Api, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use std::process::ExitCode;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A Migration's name; without it, every Migration in the namespace.
    pub name: Option<String>,
    /// Follow the Migration until it ends (exit 1 unless it Succeeded).
    #[arg(short = 'w', long, requires = "name")]
    pub watch: bool,
    /// Every namespace (without NAME).
    #[arg(short = 'A', long, conflicts_with = "name")]
    pub all_namespaces: bool,
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<Output>,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub async fn run(g: &Global, a: Args) -> Result<ExitCode> {
    let (client, ns) = connect(g).await?;
    let Some(name) = a.name else {
        let api: Api<Migration> = if a.all_namespaces {
            Api::all(client)
        } else {
            Api::namespaced(client, &ns)
        };
        let list = api
            .list(&ListParams::default())
            .await
            .context("listing Migrations")?;
        match a.output {
            Some(o) => o.print(&list)?,
            None if list.items.is_empty() => {
                let scope = if a.all_namespaces {
                    "any namespace".into()
                } else {
                    format!("namespace {ns}")
                };
                eprintln!("No Migrations in {scope}.");
            }
            None => print!("{}", render::table(&list.items, now_ms(), a.all_namespaces)),
        }
        return Ok(ExitCode::SUCCESS);
    };
    if a.watch {
        return follow(&client, &ns, &name).await;
    }
    let api: Api<Migration> = Api::namespaced(client, &ns);
    let m = api
        .get(&name)
        .await
        .with_context(|| format!("getting Migration {ns}/{name}"))?;
    match a.output {
        Some(o) => o.print(&m)?,
        None => print!("{}", render::detail(&m, now_ms())),
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a line whenever the Migration's phase or progress changes, then its detail
/// once it has ended; exit 0 only for Succeeded.
pub async fn follow(client: &kube::Client, ns: &str, name: &str) -> Result<ExitCode> {
    let api: Api<Migration> = Api::namespaced(client.clone(), ns);
    let started = Instant::now();
    let mut last = String::new();
    let mut stream = watcher(
        api,
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .applied_objects()
    .boxed();
    while let Some(event) = stream.next().await {
        let m = event.with_context(|| format!("watching Migration {ns}/{name}"))?;
        let line = render::progress_line(&m);
        if line != last {
            println!("{:>8.2}s  {line}", started.elapsed().as_secs_f64());
            last = line;
        }
        let phase = m.status.as_ref().and_then(|s| s.phase);
        if phase.is_some_and(Phase::is_terminal) {
            print!("{}", render::detail(&m, now_ms()));
            return Ok(if phase == Some(Phase::Succeeded) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
    }
    anyhow::bail!("the watch on Migration {ns}/{name} ended before the migration did")
}
