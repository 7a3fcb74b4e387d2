//! The daemon's end of ferry-transfer: one mutual-TLS listener per node for everything
//! peers send here (container bundles as verified streams, QEMU migration streams and
//! CRIU's pages as raw pipes) and a sender for what this node sends. The listener admits
//! a migration's connections only from the peer it was granted to, with the
//! migration's token (the server grants at PrepareReceiver and StartCheckpoint).
//!
//! Certificates come from a directory laid out like a Kubernetes TLS Secret mounted into
//! the daemon's pod (`tls.crt`, `tls.key`, `ca.crt`). A node's certificate must name its
//! advertised IP: peers verify it against the IP in the endpoint they were given.
use crate::error::RuntimeError;
use ferry_transfer::{Endpoint, Receiver, Sender, TlsIdentity};
use std::path::Path;

pub struct Transport {
    pub receiver: Receiver,
    pub sender: Sender,
    advertise_ip: String,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("endpoint", &self.endpoint())
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// Loads the identity from `tls_dir` and listens on `advertise_ip:port` (0: any).
    pub async fn start(
        tls_dir: &Path,
        advertise_ip: &str,
        port: u16,
    ) -> Result<Transport, RuntimeError> {
        let identity = TlsIdentity::from_pem_files(
            &tls_dir.join("tls.crt"),
            &tls_dir.join("tls.key"),
            &tls_dir.join("ca.crt"),
        )
        .map_err(|e| {
            RuntimeError::InvalidArgument(format!(
                "loading the transfer TLS identity from {} (tls.crt, tls.key, ca.crt): {e}",
                tls_dir.display()
            ))
        })?;
        Self::with_identity(identity, advertise_ip, port).await
    }

    pub async fn with_identity(
        identity: TlsIdentity,
        advertise_ip: &str,
        port: u16,
    ) -> Result<Transport, RuntimeError> {
        let sender = Sender::new(identity.clone())
            .map_err(|e| RuntimeError::InvalidArgument(format!("transfer TLS client: {e}")))?;
        let receiver = Receiver::bind((advertise_ip, port), identity)
            .await
            .map_err(|e| {
                RuntimeError::Transfer(format!("listening on {advertise_ip}:{port}: {e}"))
            })?;
        Ok(Transport {
            receiver,
            sender,
            advertise_ip: advertise_ip.to_string(),
        })
    }

    /// What peers put in `receive_endpoint` to reach this node: `IP:PORT`.
    pub fn endpoint(&self) -> String {
        format!(
            "{}:{}",
            self.advertise_ip,
            self.receiver.local_addr().port()
        )
    }
}

/// A peer's transfer endpoint (`host:port`) as a TLS endpoint of one migration: the
/// peer's certificate must carry the host part, and each connection presents `token`.
pub fn peer(receive_endpoint: &str, token: &str) -> Result<Endpoint, RuntimeError> {
    let (host, _) = host_port(receive_endpoint)?;
    Ok(Endpoint::new(receive_endpoint, host).with_token(token))
}

/// The host (brackets removed) and port (1 to 65535) of a `host:port`.
pub fn host_port(endpoint: &str) -> Result<(String, u16), RuntimeError> {
    let bad = || RuntimeError::InvalidArgument(format!("endpoint {endpoint:?} is not host:port"));
    let (host, port) = endpoint.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match port.parse::<u16>() {
        Ok(port) if port != 0 && !host.is_empty() => Ok((host.to_string(), port)),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_names_the_host() {
        let ep = peer("10.213.0.2:7443", "t").unwrap();
        assert_eq!(ep.addr, "10.213.0.2:7443");
        assert_eq!(ep.server_name, "10.213.0.2");
        assert_eq!(ep.token, "t");
        assert!(peer("10.213.0.2", "t").is_err());
        assert!(peer(":7443", "t").is_err());
        assert!(peer("h:notaport", "t").is_err());
        assert_eq!(host_port("[::1]:7443").unwrap(), ("::1".to_string(), 7443));
        assert_eq!(
            host_port("10.213.0.2:4000").unwrap(),
            ("10.213.0.2".to_string(), 4000)
        );
        assert!(host_port("h:0").is_err());
        assert!(host_port("[]:80").is_err());
    }
}
