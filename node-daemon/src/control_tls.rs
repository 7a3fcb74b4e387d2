//! Mutual TLS on the control API: the daemon serves gRPC with its node identity and
//! answers only a client whose certificate chains to the cluster-set CA *and* names the
//! controller (a DNS subject alternative name, `ferry-controller` by default). A peer
//! daemon's certificate comes from the same CA but does not name the controller, so
//! peers reach only the transfer port, never the control API.
use std::path::Path;

use rustls_pki_types::CertificateDer;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// The name the controller's client certificate carries unless told otherwise.
pub const CONTROLLER_NAME: &str = "ferry-controller";

/// The server side, from a directory laid out like a mounted kubernetes.io/tls Secret
/// plus the CA (`tls.crt`, `tls.key`, `ca.crt`). A client without a certificate from
/// that CA fails the handshake.
pub fn server_config(tls_dir: &Path) -> std::io::Result<ServerTlsConfig> {
    // tonic's TLS takes the process-wide provider; several may be compiled in.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let read = |f: &str| {
        let p = tls_dir.join(f);
        std::fs::read(&p)
            .map_err(|e| std::io::Error::new(e.kind(), format!("reading {}: {e}", p.display())))
    };
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(read("tls.crt")?, read("tls.key")?))
        .client_ca_root(Certificate::from_pem(read("ca.crt")?)))
}

/// A gRPC interceptor admitting only the controller: the handshake already checked the
/// chain; this checks whom the leaf certificate names.
pub fn only(controller: String) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |req: Request<()>| {
        let certs = req
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        if names(leaf, &controller) {
            Ok(req)
        } else {
            Err(Status::permission_denied(format!(
                "the control API serves only the controller ({controller}); this client \
                 certificate does not name it"
            )))
        }
    }
}

/// Whether the certificate is valid for the DNS name `name` (the check the transfer
/// listener makes of its peers, too).
pub fn names(cert: &CertificateDer<'_>, name: &str) -> bool {
    ferry_transfer::cert_names(cert, name)
}
