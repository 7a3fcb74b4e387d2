//! Test harness shared by ferry's integration tests, benchmarks and the demo:
//! network namespaces that play nodes and clusters, and child processes that never
//! outlive the test.
#![forbid(unsafe_code)]

pub mod netns;
pub mod process;
pub mod minio;
pub mod containers;
pub mod kubelet;
pub mod testenv;

/// Selects rustls' ring provider for the process. Some dependencies enable both ring and
/// aws-lc-rs, and rustls then refuses to guess; calling this first settles it.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
