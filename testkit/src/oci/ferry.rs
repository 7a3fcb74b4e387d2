//! ferry's own images, built like the test images (no Docker engine, no registry,
//! deterministic bytes: the same binaries give the same digest) from a directory of
//! built binaries (`target/release` for a release, the workspace's debug binaries in
//! tests), tagged with the version: `ferry.dev/ferry-controller:VERSION`,
//! `ferry.dev/ferry-node:VERSION`, `ferry.dev/ferry-launcher:VERSION`. Import them into
//! each node's containerd (`ctr -n k8s.io images import ARCHIVE`) or push them to a
//! registry with any OCI tool; the chart's `image.*` values name them.
use super::{ImageBuilder, add_with_libs};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

pub const REGISTRY: &str = "ferry.dev";

/// One written image.
#[derive(Debug, Clone)]
pub struct Built {
    /// e.g. `ferry.dev/ferry-node:0.1.0`.
    pub reference: String,
    pub archive: PathBuf,
    /// The manifest digest (`sha256:...`).
    pub digest: String,
    /// Size of the archive (one uncompressed layer).
    pub bytes: u64,
}

/// The version images are tagged with: the workspace's.
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

fn reference(name: &str, tag: &str) -> String {
    format!("{REGISTRY}/{name}:{tag}")
}

/// The controller: one binary and its libraries. It runs as a non-root user with a
/// read-only root (the chart's securityContext), so it needs nothing writable.
pub fn controller(bin_dir: &Path, tag: &str) -> Result<ImageBuilder> {
    let mut b = ImageBuilder::new(&reference("ferry-controller", tag));
    add_with_libs(
        &mut b,
        &bin_dir.join("ferry-controller"),
        "/usr/local/bin/ferry-controller",
    )?;
    b.entrypoint(&["/usr/local/bin/ferry-controller"]);
    Ok(b)
}

/// What the node image carries besides ferry's binaries.
#[derive(Debug, Clone)]
pub struct NodeTools {
    /// CRIU 4.x (scripts/install-criu.sh).
    pub criu: PathBuf,
    /// runc, which ferry-node drives for checkpoints and ferry-runtime wraps.
    pub runc: PathBuf,
    /// crictl, for ferry-node's check that an incoming pod's images are on the node.
    pub crictl: PathBuf,
    /// nsenter, for ferry-install's `systemctl restart containerd` in the host's namespaces.
    pub nsenter: PathBuf,
    /// iptables-restore (xtables' multi-call binary) and its match modules: CRIU locks a
    /// container's network with it while it dumps.
    pub iptables: PathBuf,
    pub xtables_modules: PathBuf,
    /// tar, gzip and a /bin/sh: CRIU packs the contents of a container's tmpfs mounts
    /// with `tar --gzip`, which runs gzip through `/bin/sh -c`.
    pub tar: PathBuf,
    pub gzip: PathBuf,
    pub sh: PathBuf,
}

impl NodeTools {
    /// This machine's: `$FERRY_CRIU` (else `criu` on PATH) and `runc` on PATH.
    pub fn from_host() -> Result<NodeTools> {
        let criu = match std::env::var_os("FERRY_CRIU") {
            Some(p) => PathBuf::from(p),
            None => crate::guest::which("criu")?,
        };
        let crictl = match crate::guest::which("crictl") {
            Ok(p) => p,
            Err(_) => crate::kube_node::nodestack_bin()?.join("crictl"),
        };
        Ok(NodeTools {
            criu,
            runc: crate::guest::which("runc")?,
            crictl,
            nsenter: crate::guest::which("nsenter")?,
            iptables: crate::guest::which("iptables-restore")?.canonicalize()?,
            xtables_modules: ["/usr/lib/x86_64-linux-gnu/xtables", "/usr/lib/xtables"]
                .into_iter()
                .map(PathBuf::from)
                .find(|d| d.is_dir())
                .context("no xtables modules directory (Debian's iptables package)")?,
            tar: crate::guest::which("tar")?,
            gzip: crate::guest::which("gzip")?,
            sh: crate::guest::which("sh")?.canonicalize()?,
        })
    }
}

/// The node daemon: ferry-node (the entrypoint), ferry-install, CRIU, runc, crictl,
/// nsenter, iptables-restore (CRIU's network lock), tar, gzip and sh (CRIU's tmpfs contents)
/// with their libraries, and
/// under /opt/ferry/node what a node installer copies onto the host (ferry-runtime,
/// the `ferry` runtime handler's binary, which containerd runs on the host).
pub fn node(bin_dir: &Path, tag: &str, tools: &NodeTools) -> Result<ImageBuilder> {
    let mut b = ImageBuilder::new(&reference("ferry-node", tag));
    add_with_libs(
        &mut b,
        &bin_dir.join("ferry-node"),
        "/usr/local/bin/ferry-node",
    )?;
    add_with_libs(&mut b, &tools.criu, "/usr/local/sbin/criu")?;
    add_with_libs(&mut b, &tools.runc, "/usr/sbin/runc")?;
    add_with_libs(&mut b, &tools.crictl, "/usr/local/bin/crictl")?;
    add_with_libs(&mut b, &tools.nsenter, "/usr/bin/nsenter")?;
    // Called by these names (argv[0] picks the multi-call binary's mode).
    add_with_libs(&mut b, &tools.iptables, "/usr/sbin/iptables-restore")?;
    add_with_libs(&mut b, &tools.iptables, "/usr/sbin/ip6tables-restore")?;
    add_with_libs(&mut b, &tools.tar, "/usr/bin/tar")?;
    add_with_libs(&mut b, &tools.gzip, "/usr/bin/gzip")?;
    add_with_libs(&mut b, &tools.sh, "/bin/sh")?;
    // Loaded with dlopen (ldd cannot see them), at the path libxtables was built with.
    let modules = tools.xtables_modules.to_string_lossy().to_string();
    b.tree(&tools.xtables_modules, &modules);
    // The DaemonSet's init container and preStop hook (ferry_node::install).
    add_with_libs(
        &mut b,
        &bin_dir.join("ferry-install"),
        "/usr/local/bin/ferry-install",
    )?;
    add_with_libs(
        &mut b,
        &bin_dir.join("ferry-runtime"),
        "/opt/ferry/node/ferry-runtime",
    )?;
    b.dir("/tmp")
        .dir("/var/lib/ferry")
        .env("FERRY_CRIU=/usr/local/sbin/criu")
        .env("FERRY_RUNC=/usr/sbin/runc")
        .entrypoint(&["/usr/local/bin/ferry-node"]);
    Ok(b)
}

/// The VM launcher: ferry-launcher and QEMU (see `guest::launcher_builder`).
pub fn launcher(bin_dir: &Path, tag: &str) -> Result<ImageBuilder> {
    crate::guest::launcher_builder(
        &bin_dir.join("ferry-launcher"),
        &reference("ferry-launcher", tag),
    )
}

/// ferry's binaries in an image, by the name `bin_dir` holds them under.
const BINARIES: &[&str] = &[
    "ferry-controller",
    "ferry-node",
    "ferry-install",
    "ferry-runtime",
    "ferry-launcher",
];

/// Copies ferry's binaries from `bin_dir` into `staged` without their debug info
/// (`strip --strip-debug`: symbols stay, so backtraces still name functions). The
/// release profile keeps line tables, which are most of a binary's size.
fn strip_binaries(bin_dir: &Path, staged: &Path) -> Result<()> {
    for name in BINARIES {
        let out = std::process::Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(staged.join(name))
            .arg(bin_dir.join(name))
            .output()
            .context("running strip (binutils)")?;
        anyhow::ensure!(
            out.status.success(),
            "strip {}: {}",
            bin_dir.join(name).display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Writes the three images to `out_dir/NAME-TAG.tar`, from the binaries in `bin_dir`
/// stripped of their debug info.
pub fn build_all(
    bin_dir: &Path,
    tag: &str,
    tools: &NodeTools,
    out_dir: &Path,
) -> Result<Vec<Built>> {
    let staged = tempfile::tempdir()?;
    strip_binaries(bin_dir, staged.path())?;
    let bin_dir = staged.path();
    let mut built = vec![];
    for (name, b) in [
        ("ferry-controller", controller(bin_dir, tag)?),
        ("ferry-node", node(bin_dir, tag, tools)?),
        ("ferry-launcher", launcher(bin_dir, tag)?),
    ] {
        let archive = out_dir.join(format!("{name}-{tag}.tar"));
        let digest = b
            .write(&archive)
            .with_context(|| format!("writing {}", archive.display()))?;
        built.push(Built {
            reference: reference(name, tag),
            bytes: std::fs::metadata(&archive)?.len(),
            archive,
            digest,
        });
    }
    Ok(built)
}
