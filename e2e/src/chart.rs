//! The Helm chart (helm/ferry) as tests use it: helm built by scripts/build-helm.sh
//! ($FERRY_HELM), rendered with the values a test gives.
use anyhow::{Context, Result, ensure};
use std::path::PathBuf;
use std::process::{Command, Output};

pub const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../helm/ferry");
pub const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
/// Any PEM-shaped text will do for rendering; no apiserver in these tests calls the
/// webhook with it.
pub const CLIENT_CA: &str = "tls.webhookClientCA=-----BEGIN CERTIFICATE-----";

pub fn helm() -> Result<PathBuf> {
    let p = std::env::var_os("FERRY_HELM")
        .context("FERRY_HELM unset: source /var/cache/ferry/env.sh (scripts/install-deps.sh)")?;
    Ok(p.into())
}

pub fn run(cmd: &mut Command) -> Result<Output> {
    cmd.output().with_context(|| format!("running {cmd:?}"))
}

/// `helm template ferry helm/ferry -n ferry-system --include-crds EXTRA...`.
pub fn template(extra: &[&str]) -> Result<Output> {
    run(Command::new(helm()?)
        .args([
            "template",
            "ferry",
            CHART,
            "-n",
            "ferry-system",
            "--include-crds",
        ])
        .args(extra))
}

/// The chart rendered with the required values only.
pub fn rendered() -> Result<String> {
    let out = template(&["--set", CLIENT_CA])?;
    ensure!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// The documents of a multi-document YAML stream as helm writes it.
pub fn docs(text: &str) -> Result<Vec<serde_yaml::Value>> {
    // Helm separates documents with a line "---".
    let mut v = vec![];
    for part in text.split("\n---\n") {
        let doc: serde_yaml::Value = serde_yaml::from_str(part)?;
        if !doc.is_null() {
            v.push(doc);
        }
    }
    Ok(v)
}
