//! Transfer certificates for test daemons: one CA per test process, and per node a
//! directory laid out like the mounted Secret `ferry-node --tls-dir` reads (`tls.crt`,
//! `tls.key`, `ca.crt`), with the node's IP in the certificate.
use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

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

/// Writes `dir/{tls.crt,tls.key,ca.crt}` for a node reachable at `ip`; returns `dir`.
pub fn node_tls_dir(dir: &Path, node_name: &str, ip: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut params = CertificateParams::new(vec![node_name.to_string(), ip.to_string()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, node_name);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca())?;
    std::fs::write(dir.join("tls.crt"), cert.pem())?;
    std::fs::write(dir.join("tls.key"), key.serialize_pem())?;
    std::fs::write(dir.join("ca.crt"), ca().pem())?;
    Ok(dir.to_path_buf())
}
