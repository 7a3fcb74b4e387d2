//! The Helm chart (helm/ferry): lints, renders, carries the generated CRDs and
//! admission policy (links to crds/yaml), refuses bad values with a message, grants no
//! wildcard, and on a real apiserver gives each ferry ServiceAccount exactly the rights
//! committed in helm/ferry/tests/can-i/ (`kubectl auth can-i --list`).
use anyhow::{Context, Result, bail, ensure};
use ferry_e2e::chart::{CHART, CLIENT_CA, REPO, docs, helm, rendered, run, template};
use ferry_testkit::testenv::TestEnv;
use std::path::Path;
use std::process::Command;

#[test]
fn lints_and_carries_the_generated_api_unchanged() -> Result<()> {
    let out = run(Command::new(helm()?).args(["lint", CHART, "--set", CLIENT_CA]))?;
    ensure!(
        out.status.success(),
        "helm lint: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The chart's CRDs and admission policy are links to what crdgen writes (helm
    // lint, template and package follow them), never a copy that could go stale.
    for (link, generated) in [
        ("helm/ferry/crds/crds.yaml", "crds/yaml/crds.yaml"),
        (
            "helm/ferry/templates/admission.yaml",
            "crds/yaml/admission.yaml",
        ),
    ] {
        let a = Path::new(REPO).join(link).canonicalize()?;
        let b = Path::new(REPO).join(generated).canonicalize()?;
        ensure!(a == b, "{link} is not a link to {generated}");
    }
    let objects = docs(&rendered()?)?;
    let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    for want in [
        "CustomResourceDefinition",
        "Deployment",
        "ValidatingWebhookConfiguration",
        "ValidatingAdmissionPolicy",
        "ClusterRole",
        "Role",
        "ValidatingAdmissionPolicyBinding",
    ] {
        ensure!(kinds.contains(&want), "no {want} rendered: {kinds:?}");
    }
    Ok(())
}

#[test]
fn rbac_has_no_wildcards() -> Result<()> {
    let mut rules = 0;
    for o in docs(&rendered()?)? {
        if !matches!(o["kind"].as_str(), Some("ClusterRole" | "Role")) {
            continue;
        }
        for rule in o["rules"].as_sequence().context("a role without rules")? {
            rules += 1;
            for field in ["apiGroups", "resources", "verbs", "resourceNames"] {
                for v in rule[field].as_sequence().into_iter().flatten() {
                    ensure!(
                        v.as_str() != Some("*"),
                        "{} {}: wildcard in {field}",
                        o["kind"].as_str().unwrap_or_default(),
                        o["metadata"]["name"].as_str().unwrap_or_default()
                    );
                }
            }
        }
    }
    ensure!(rules > 10, "only {rules} rules rendered");
    Ok(())
}

#[test]
fn bad_values_are_refused_with_the_setting_named() -> Result<()> {
    let out = template(&[])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("tls.webhookClientCA"),
        "rendered without tls.webhookClientCA: {err}"
    );
    let out = template(&["--set", CLIENT_CA, "--set", "tls.source=vault"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("tls.source must be"),
        "rendered with tls.source=vault: {err}"
    );
    Ok(())
}

/// What `kubectl auth can-i --list` shows for a ServiceAccount, sorted (its order is
/// the apiserver's, which may change between runs).
fn can_i(env: &TestEnv, sa: &str, ns: &str) -> Result<String> {
    let out = env
        .kubectl("east")
        .args(["auth", "can-i", "--list", "-n", ns])
        .arg(format!("--as=system:serviceaccount:ferry-system:{sa}"))
        .output()?;
    if !out.status.success() {
        bail!("can-i --list: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8(out.stdout)?;
    let mut lines = text.lines();
    let header = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let mut rows: Vec<String> = lines.map(normalize).collect();
    rows.sort();
    Ok(format!("{header}\n{}\n", rows.join("\n")))
}

/// One row with its whitespace collapsed and each `[a b c]` group sorted (the
/// apiserver lists a row's verbs in the order its roles were aggregated).
fn normalize(line: &str) -> String {
    let mut out = vec![];
    let mut rest = line.trim();
    while !rest.is_empty() {
        if let Some(inner) = rest.strip_prefix('[') {
            let end = inner.find(']').unwrap_or(inner.len());
            let mut items: Vec<&str> = inner[..end].split_whitespace().collect();
            items.sort();
            out.push(format!("[{}]", items.join(" ")));
            rest = inner.get(end + 1..).unwrap_or_default().trim_start();
        } else {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            out.push(rest[..end].to_string());
            rest = rest[end..].trim_start();
        }
    }
    out.join(" ")
}

#[test]
fn service_accounts_get_exactly_the_committed_rights() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let env = TestEnv::start_in(dir.path(), &["east"])?;
    let manifest = dir.path().join("ferry.yaml");
    std::fs::write(&manifest, rendered()?)?;
    let out = env
        .kubectl("east")
        .args(["create", "namespace", "ferry-system"])
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = env
        .kubectl("east")
        .args(["apply", "--server-side", "-f"])
        .arg(&manifest)
        .output()?;
    ensure!(
        out.status.success(),
        "applying the rendered chart: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expect_dir = Path::new(CHART).join("tests/can-i");
    let mut diffs = vec![];
    // In ferry's namespace (its Role applies) and in a workload namespace.
    for (sa, ns) in [
        ("ferry-controller", "ferry-system"),
        ("ferry-controller", "default"),
        ("ferry-peer", "default"),
        ("ferry-node", "default"),
        ("ferry-node", "ferry-system"),
        ("ferry-uninstall", "ferry-system"),
    ] {
        let got = can_i(&env, sa, ns)?;
        let file = expect_dir.join(format!("{sa}.{ns}.txt"));
        if std::env::var_os("FERRY_BLESS").is_some() {
            std::fs::create_dir_all(&expect_dir)?;
            std::fs::write(&file, &got)?;
        }
        let want = std::fs::read_to_string(&file)
            .with_context(|| format!("{} (FERRY_BLESS=1 writes it)", file.display()))?;
        if got != want {
            diffs.push(format!(
                "{}:\n--- committed\n{want}--- now\n{got}",
                file.display()
            ));
        }
    }
    ensure!(
        diffs.is_empty(),
        "rights differ from the committed ones:\n{}",
        diffs.join("\n")
    );
    Ok(())
}
