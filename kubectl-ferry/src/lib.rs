//! The plugin's commands, one module each; kubectl's global flags and output formats.
#![forbid(unsafe_code)]
use anyhow::{Context, Result};
use kube::config::{KubeConfigOptions, Kubeconfig};
use std::path::PathBuf;

pub mod cancel;
pub mod link;
pub mod migrate;
pub mod render;
pub mod status;

/// kubectl's connection flags, accepted before or after the subcommand.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Global {
    /// The namespace (default: the context's, else "default").
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Path to the kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
}

/// `-o`: kubectl's machine-readable formats.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Yaml,
    Json,
}

impl Output {
    pub fn print<T: serde::Serialize>(self, value: &T) -> Result<()> {
        match self {
            Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
            Output::Yaml => print!("{}", serde_yaml::to_string(value)?),
        }
        Ok(())
    }
}

/// A client for the chosen context, and the namespace commands act in.
pub async fn connect(g: &Global) -> Result<(kube::Client, String)> {
    connect_to(
        g.kubeconfig.as_deref(),
        g.context.as_deref(),
        g.namespace.as_deref(),
    )
    .await
}

pub async fn connect_to(
    kubeconfig: Option<&std::path::Path>,
    context: Option<&str>,
    namespace: Option<&str>,
) -> Result<(kube::Client, String)> {
    let config = load(kubeconfig, context).await?;
    let ns = namespace
        .map(String::from)
        .unwrap_or_else(|| config.default_namespace.clone());
    Ok((kube::Client::try_from(config)?, ns))
}

/// The client configuration of `context` (default: the current one) in `kubeconfig`.
pub async fn load(
    kubeconfig: Option<&std::path::Path>,
    context: Option<&str>,
) -> Result<kube::Config> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let opts = KubeConfigOptions {
        context: context.map(String::from),
        ..Default::default()
    };
    let config = match kubeconfig {
        // $KUBECONFIG may list several files; kube merges them like kubectl.
        Some(path) if path.to_string_lossy().contains(':') => {
            kube::Config::from_kubeconfig(&opts).await
        }
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &opts).await
        }
        None => kube::Config::from_kubeconfig(&opts).await,
    }
    .context("loading the kubeconfig")?;
    Ok(config)
}
