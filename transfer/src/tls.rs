//! Mutual TLS for the direct backend: each daemon has a certificate signed by the
//! cluster-set CA (from a Kubernetes Secret in production) and accepts only peers whose
//! certificate chains to that CA. [`TestPki`] makes such a CA and node certificates.
use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::TransferError;

/// A daemon's TLS identity: its certificate chain and key, and the CA its peers'
/// certificates must chain to. Used for both the listening and the connecting side;
/// neither accepts a peer without a certificate from that CA.
#[derive(Clone)]
pub struct TlsIdentity {
    pub(crate) server: Arc<ServerConfig>,
    pub(crate) client: Arc<ClientConfig>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsIdentity{..}")
    }
}

/// Whether a (chain-verified) certificate is valid for `name`, an IP address or a DNS
/// name: how a receiver checks which peer a connection comes from.
pub fn cert_names(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(server_name) = rustls_pki_types::ServerName::try_from(name) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert)
        .is_ok_and(|c| c.verify_is_valid_for_subject_name(&server_name).is_ok())
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> TransferError {
    TransferError::Tls(format!("{what}: {e}"))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    // Explicit provider: other crates in the process may enable aws-lc-rs too, and then
    // rustls cannot pick a default by itself.
    let mut p = rustls::crypto::ring::default_provider();
    // AES-128-GCM first (ring's default puts AES-256 first): 10 instead of 14 AES rounds
    // per block is measurable when a node streams GiBs on two cores, and 128-bit AES is
    // the TLS 1.3 mandatory suite. The others stay as fallbacks.
    p.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        _ => 2,
    });
    Arc::new(p)
}

impl TlsIdentity {
    /// From PEM text: `cert_pem` holds the certificate chain (leaf first), `key_pem` a
    /// PKCS#8, PKCS#1 or SEC1 private key, `ca_pem` one or more trusted CA certificates.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8], ca_pem: &[u8]) -> Result<Self, TransferError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| tls_err("certificate PEM", e))?;
        if chain.is_empty() {
            return Err(TransferError::Tls(
                "certificate PEM contains no certificate".into(),
            ));
        }
        let key =
            PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| tls_err("private key PEM", e))?;
        let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(ca_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| tls_err("CA PEM", e))?;
        let mut roots = RootCertStore::empty();
        for ca in cas {
            roots.add(ca).map_err(|e| tls_err("CA certificate", e))?;
        }
        if roots.is_empty() {
            return Err(TransferError::Tls("CA PEM contains no certificate".into()));
        }
        let roots = Arc::new(roots);

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| tls_err("client verifier", e))?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err("server protocol versions", e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| tls_err("server certificate/key", e))?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err("client protocol versions", e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| tls_err("client certificate/key", e))?;
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// From PEM files, e.g. a mounted Secret's `tls.crt`, `tls.key` and `ca.crt`.
    pub fn from_pem_files(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TransferError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| tls_err(&format!("reading {}", p.display()), e))
        };
        Self::from_pem(&read(cert)?, &read(key)?, &read(ca)?)
    }
}

/// A throwaway certificate authority for tests and demos.
pub struct TestPki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl TestPki {
    pub fn generate() -> Result<Self, TransferError> {
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| tls_err("CA params", e))?;
        params
            .distinguished_name
            .push(DnType::CommonName, "ferry test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().map_err(|e| tls_err("CA key", e))?;
        let ca =
            CertifiedIssuer::self_signed(params, key).map_err(|e| tls_err("CA certificate", e))?;
        Ok(Self { ca })
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A node certificate and key (PEM) for `name`, valid for `name` and `extra_sans`
    /// (DNS names or IP addresses), usable as TLS server and client.
    pub fn issue_pem(
        &self,
        name: &str,
        extra_sans: &[&str],
    ) -> Result<(String, String), TransferError> {
        let mut sans = vec![name.to_string()];
        sans.extend(extra_sans.iter().map(|s| s.to_string()));
        let mut params = CertificateParams::new(sans).map_err(|e| tls_err("node params", e))?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().map_err(|e| tls_err("node key", e))?;
        let cert = params
            .signed_by(&key, &self.ca)
            .map_err(|e| tls_err("node certificate", e))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A ready [`TlsIdentity`] for `name` that trusts this CA.
    pub fn issue(&self, name: &str, extra_sans: &[&str]) -> Result<TlsIdentity, TransferError> {
        let (cert, key) = self.issue_pem(name, extra_sans)?;
        TlsIdentity::from_pem(cert.as_bytes(), key.as_bytes(), self.ca_pem().as_bytes())
    }
}
