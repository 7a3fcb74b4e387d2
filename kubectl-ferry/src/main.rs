//! `kubectl ferry`: a kubectl plugin (any `kubectl-ferry` on PATH) for ferry's Migrations.
//! It only reads and writes API objects, as kubectl does: the controller does the work.
use clap::{Parser, Subcommand};
use kubectl_ferry::{Global, cancel, link, migrate, status};

#[derive(Parser)]
#[command(
    name = "kubectl ferry",
    version,
    about = "Move running Pods between nodes and clusters with ferry"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a Migration that moves POD to another cluster or node.
    Migrate(migrate::Args),
    /// Show Migrations, or one in detail with its progress and phase timings.
    Status(status::Args),
    /// Cancel a Migration: the workload stays (or goes back) where it ran.
    Cancel(cancel::Args),
    /// Link a peer cluster: ferry here may then migrate Pods into it.
    Link(link::Args),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Migrate(a) => migrate::run(&cli.global, a).await,
        Command::Status(a) => status::run(&cli.global, a).await,
        Command::Cancel(a) => cancel::run(&cli.global, a).await,
        Command::Link(a) => link::run(&cli.global, a).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
