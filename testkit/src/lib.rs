//! Test harness shared by ferry's integration tests, benchmarks and the demo:
//! network namespaces that play nodes and clusters, and child processes that never
//! outlive the test.
#![forbid(unsafe_code)]

pub mod containers;
pub mod gate;
pub mod guest;
pub mod kube_node;
pub mod kubelet;
pub mod minio;
pub mod netns;
pub mod oci;
pub mod pki;
pub mod process;
pub mod testenv;

/// Selects rustls' ring provider for the process. Some dependencies enable both ring and
/// aws-lc-rs, and rustls then refuses to guess; calling this first settles it.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A loopback address whose port was free a moment ago (for a child to bind).
pub fn free_port() -> anyhow::Result<std::net::SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A binary of this workspace, next to the running executable's target directory
/// (`target/debug/deps/x` → `target/debug/NAME`).
pub fn workspace_bin(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    anyhow::bail!(
        "{name} not found next to {}: build it first (`cargo build --workspace --bins`)",
        exe.display()
    )
}
