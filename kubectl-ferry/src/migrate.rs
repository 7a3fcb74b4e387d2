//! `kubectl ferry migrate POD --to CLUSTER[/NODE]`: creates a Migration for the Pod,
//! after checking that the Pod is there, and with `--wait` follows it to its end.
use crate::{Global, Output, connect, status};
use anyhow::{Context, Result, bail};
use ferry_crds::Migration;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, ObjectMeta, PostParams};
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The Pod to move (in --namespace).
    pub pod: String,
    /// Where to: CLUSTER (any ready node there), CLUSTER/NODE, or /NODE (a node of
    /// this cluster).
    #[arg(long)]
    pub to: String,
    /// Stop the workload for the whole copy (default: the MigrationPolicy's, else Live).
    #[arg(long, conflicts_with = "live")]
    pub cold: bool,
    /// Keep the workload running while most state is copied.
    #[arg(long)]
    pub live: bool,
    /// Compress state on the wire (zstd).
    #[arg(long)]
    pub compress: bool,
    /// Cap on what the source sends, MiB/s.
    #[arg(long, value_name = "MIBPS")]
    pub bandwidth_limit: Option<u32>,
    /// The Migration's name (default: POD- and a suffix the apiserver picks).
    #[arg(long)]
    pub name: Option<String>,
    /// Follow the Migration until it ends; exit 1 unless it Succeeded.
    #[arg(long, short = 'w')]
    pub wait: bool,
    /// Print the created Migration instead of its name.
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<Output>,
}

/// `--to`: (cluster, node), each None when not given.
pub fn parse_target(to: &str) -> Result<(Option<String>, Option<String>)> {
    let (cluster, node) = match to.split_once('/') {
        Some((c, n)) => (c, Some(n)),
        None => (to, None),
    };
    let valid = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    };
    let node = match node {
        Some(n) if !valid(n) => {
            bail!("--to {to:?}: {n:?} is not a node name (lowercase letters, digits, '-' and '.')")
        }
        n => n.map(String::from),
    };
    let cluster = match cluster {
        "" if node.is_none() => {
            bail!("--to is empty: give CLUSTER, CLUSTER/NODE or /NODE")
        }
        "" => None,
        c if !valid(c) => bail!(
            "--to {to:?}: {c:?} is not a cluster name (lowercase letters, digits, '-' and '.')"
        ),
        c => Some(c.to_string()),
    };
    Ok((cluster, node))
}

/// The Migration's spec as JSON, with only what the user set (the CRD's defaults and
/// MigrationPolicies fill in the rest).
pub fn spec(a: &Args) -> Result<serde_json::Value> {
    let (cluster, node) = parse_target(&a.to)?;
    let mut target = serde_json::Map::new();
    if let Some(c) = cluster {
        target.insert("cluster".into(), c.into());
    }
    if let Some(n) = node {
        target.insert("node".into(), n.into());
    }
    let mut spec = serde_json::json!({
        "workload": {"pod": a.pod},
        "target": target,
    });
    if a.cold || a.live {
        spec["strategy"] = if a.cold { "Cold" } else { "Live" }.into();
    }
    if a.compress {
        spec["transfer"]["compress"] = true.into();
    }
    if let Some(b) = a.bandwidth_limit {
        spec["transfer"]["bandwidthLimitMiBps"] = b.into();
    }
    Ok(spec)
}

pub async fn run(g: &Global, a: Args) -> Result<ExitCode> {
    let spec = spec(&a)?;
    let (client, ns) = connect(g).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    if pods
        .get_metadata_opt(&a.pod)
        .await
        .with_context(|| format!("looking up pod {ns}/{}", a.pod))?
        .is_none()
    {
        bail!(
            "pod {ns}/{} not found (wrong --namespace or --context?)",
            a.pod
        );
    }
    let ar = ApiResource::erase::<Migration>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
    let mut obj = DynamicObject::new("", &ar).within(&ns);
    obj.metadata = ObjectMeta {
        name: a.name.clone(),
        generate_name: a.name.is_none().then(|| format!("{}-", a.pod)),
        namespace: Some(ns.clone()),
        ..Default::default()
    };
    obj.data = serde_json::json!({ "spec": spec });
    let created = api
        .create(&PostParams::default(), &obj)
        .await
        .context("creating the Migration")?;
    let name = created.metadata.name.clone().unwrap_or_default();
    match a.output {
        Some(o) => o.print(&created)?,
        None => println!("migration.ferry.dev/{name} created"),
    }
    if !a.wait {
        return Ok(ExitCode::SUCCESS);
    }
    status::follow(&client, &ns, &name).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_bad_ones_say_why() {
        let t = |s| parse_target(s).unwrap();
        assert_eq!(t("west"), (Some("west".into()), None));
        assert_eq!(
            t("west/west-1"),
            (Some("west".into()), Some("west-1".into()))
        );
        assert_eq!(t("/east-2"), (None, Some("east-2".into())));
        for (bad, why) in [
            ("", "--to is empty"),
            ("/", "is not a node name"),
            ("West/x", "is not a cluster name"),
            ("west/a/b", "is not a node name"),
        ] {
            let e = parse_target(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
