//! Transfer certificates for test daemons: one CA per test process, and per node a
//! directory laid out like the mounted Secret `ferry-node --tls-dir` reads (`tls.crt`,
//! `tls.key`, `ca.crt`), with the node's IP in the certificate.
use anyhow::{Context, Result};
use ferry_proto::node::v1::node_agent_client::NodeAgentClient;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

fn ca() -> &'static CertifiedIssuer<'static, KeyPair> {
    static CA: OnceLock<CertifiedIssuer<'static, KeyPair>> = OnceLock::new();
    CA.get_or_init(|| {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(DnType::CommonName, "ferry test node CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        CertifiedIssuer::self_signed(params, key).expect("CA certificate")
    })
}

/// The name the controller's certificate carries (`ferry-node --controller-name`'s
/// default).
pub const CONTROLLER_NAME: &str = "ferry-controller";

/// Writes `dir/{tls.crt,tls.key,ca.crt}` for the controller (a client certificate
/// naming [`CONTROLLER_NAME`]); returns `dir`.
pub fn controller_tls_dir(dir: &Path) -> Result<PathBuf> {
    let mut params = CertificateParams::new(vec![CONTROLLER_NAME.to_string()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, CONTROLLER_NAME);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    write_identity(dir, params)
}

/// The test CA as PEM (certificate, private key): e.g. the `ferry-ca` Secret that makes
/// installs of several clusters one cluster set.
pub fn ca_pem() -> (String, String) {
    (ca().pem(), ca().key().serialize_pem())
}

/// Signs `params` with the test CA and writes `dir/{tls.crt,tls.key,ca.crt}`.
fn write_identity(dir: &Path, params: CertificateParams) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca())?;
    std::fs::write(dir.join("tls.crt"), cert.pem())?;
    std::fs::write(dir.join("tls.key"), key.serialize_pem())?;
    std::fs::write(dir.join("ca.crt"), ca().pem())?;
    Ok(dir.to_path_buf())
}

/// A control-API client of the daemon at `endpoint` (`https://IP:PORT`) with the
/// identity in `tls_dir` (see [`controller_tls_dir`]).
pub async fn control_client_with(
    endpoint: &str,
    tls_dir: &Path,
) -> Result<NodeAgentClient<Channel>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let read = |f: &str| std::fs::read(tls_dir.join(f));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.crt")?))
        .identity(Identity::from_pem(read("tls.crt")?, read("tls.key")?));
    let channel = Channel::from_shared(endpoint.to_string())?
        .tls_config(tls)?
        .connect()
        .await
        .with_context(|| format!("connecting to {endpoint}"))?;
    Ok(NodeAgentClient::new(channel))
}

/// A control-API client with this process's controller identity (made once, in a
/// temporary directory).
pub async fn control_client(endpoint: &str) -> Result<NodeAgentClient<Channel>> {
    // Made under a lock: two tests of one process asking at once would otherwise both
    // write the directory, and one's key could end up beside the other's certificate.
    static DIR: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);
    let dir = {
        let mut dir = DIR.lock().expect("controller TLS lock");
        match &*dir {
            Some(d) => d.clone(),
            None => {
                let d = std::env::temp_dir()
                    .join(format!("ferry-controller-tls-{}", std::process::id()));
                controller_tls_dir(&d)?;
                dir.insert(d).clone()
            }
        }
    };
    control_client_with(endpoint, &dir).await
}

/// Writes `dir/{tls.crt,tls.key,ca.crt}` for a node reachable at `ip`; returns `dir`.
pub fn node_tls_dir(dir: &Path, node_name: &str, ip: &str) -> Result<PathBuf> {
    let mut params = CertificateParams::new(vec![node_name.to_string(), ip.to_string()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, node_name);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    write_identity(dir, params)
}
