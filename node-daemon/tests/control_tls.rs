//! The control API answers only the controller: a real `ferry-node` in a network
//! namespace, called with the controller's certificate, a peer node's certificate from
//! the same CA, no certificate, and plaintext.
use anyhow::Result;
use ferry_proto::node::v1 as pb;
use ferry_proto::node::v1::node_agent_client::NodeAgentClient;
use ferry_testkit::containers::Daemon;
use ferry_testkit::netns::Lan;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

#[tokio::test]
async fn only_the_controller_may_call_the_control_api() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let lan = Lan::create()?;
    let bin = ferry_testkit::workspace_bin("ferry-node")?;
    let d = Daemon::start(&lan, "ct", tmp.path(), &bin)?;

    // The controller's certificate: served.
    let mut c = ferry_testkit::pki::control_client(&d.endpoint).await?;
    let v = c.version(pb::VersionRequest {}).await?.into_inner();
    assert!(!v.version.is_empty(), "{v:?}");

    // A peer daemon's certificate, from the same CA: refused, with the reason.
    let peer = ferry_testkit::pki::node_tls_dir(&tmp.path().join("peer"), "peer", "10.0.0.9")?;
    let mut p = ferry_testkit::pki::control_client_with(&d.endpoint, &peer).await?;
    let e = p
        .version(pb::VersionRequest {})
        .await
        .expect_err("a peer's certificate must be refused");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("only the controller"), "{e:?}");
    // Nor can it start anything.
    let e = p
        .abort(pb::MigrationRef {
            migration_id: "m".into(),
        })
        .await
        .expect_err("a peer must not abort migrations");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

    // TLS without a client certificate: the handshake fails, no call gets through.
    let ca = std::fs::read(peer.join("ca.crt"))?;
    let anonymous = async {
        let ch = Channel::from_shared(d.endpoint.clone())?
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))?
            .connect()
            .await?;
        NodeAgentClient::new(ch)
            .version(pb::VersionRequest {})
            .await?;
        anyhow::Ok(())
    };
    assert!(
        anonymous.await.is_err(),
        "a client without a certificate got an answer"
    );

    // Plaintext: no answer either.
    let plain = d.endpoint.replace("https://", "http://");
    let plaintext = async {
        NodeAgentClient::connect(plain)
            .await?
            .version(pb::VersionRequest {})
            .await?;
        anyhow::Ok(())
    };
    assert!(plaintext.await.is_err(), "a plaintext client got an answer");
    Ok(())
}
