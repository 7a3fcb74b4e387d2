//! The daemon's ports answer only whom they should. The control API: only the
//! controller; a real `ferry-node` in a network
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

/// The transfer port admits a migration's connections only from the source the
/// controller named, with the token this daemon minted for that migration: not with a
/// peer certificate of the same CA, nor a wrong token, nor another migration's token,
/// nor once the migration was aborted. (ferry-transfer's own tests cover the mechanism;
/// this shows the daemon grants and revokes as it should.)
#[tokio::test]
async fn only_the_named_source_with_the_migrations_token_may_send() -> Result<()> {
    use ferry_transfer::{Endpoint, RetryPolicy, Sender, TlsIdentity};
    let tmp = tempfile::tempdir()?;
    let lan = Lan::create()?;
    let bin = ferry_testkit::workspace_bin("ferry-node")?;
    let d = Daemon::start(&lan, "tk", tmp.path(), &bin)?;
    let mut c = ferry_testkit::pki::control_client(&d.endpoint).await?;
    const SOURCE: &str = "10.0.0.1";
    // Two VM migrations this node receives, both from SOURCE (a VM receiver waits for
    // its target pod's guest; nothing here starts one).
    let prepare = |id: &str, uid: &str| {
        pb::PrepareReceiverRequest {
        migration_id: id.into(),
        workload: Some(pb::WorkloadDescription {
            workload: Some(pb::WorkloadRef {
                namespace: "default".into(),
                pod_name: "vm-x".into(),
                pod_uid: String::new(),
            }),
            kind: pb::WorkloadKind::VirtualMachine as i32,
            memory_bytes: 64 << 20,
            runtime_spec: br#"{"kernel":"/k","initrd":null,"append":"","memory_mib":64,"vcpus":1,"accel":"tcg"}"#.to_vec(),
            runtime: "qemu".into(),
            ..Default::default()
        }),
        target: Some(pb::WorkloadRef {
            namespace: "default".into(),
            pod_name: format!("vm-{id}"),
            pod_uid: uid.into(),
        }),
        strategy: pb::Strategy::PreCopy as i32,
        source_peer: SOURCE.into(),
        ..Default::default()
    }
    };
    const UID_ONE: &str = "00000000-0000-4000-8000-000000000001";
    let one = c
        .prepare_receiver(prepare("m-one", UID_ONE))
        .await?
        .into_inner();
    let two = c
        .prepare_receiver(prepare("m-two", "00000000-0000-4000-8000-000000000002"))
        .await?
        .into_inner();
    assert!(
        one.token.len() >= 32 && one.token != two.token,
        "tokens: {one:?} {two:?}"
    );
    // A repeated PrepareReceiver answers the same token.
    let again = c
        .prepare_receiver(prepare("m-one", UID_ONE))
        .await?
        .into_inner();
    assert_eq!(again.token, one.token);
    // And the same token once the restore started: a controller that restarted before it
    // recorded the start asks again, and the source's next pipe must still get through.
    c.start_restore(pb::StartRestoreRequest {
        migration_id: "m-two".into(),
        target: None,
    })
    .await?;
    let restoring = c
        .prepare_receiver(prepare("m-two", "00000000-0000-4000-8000-000000000002"))
        .await?
        .into_inner();
    assert_eq!(restoring.token, two.token);

    let sender = |name: &str, ip: &str| -> Result<Sender> {
        let dir = ferry_testkit::pki::node_tls_dir(&tmp.path().join(name), name, ip)?;
        let id = TlsIdentity::from_pem_files(
            &dir.join("tls.crt"),
            &dir.join("tls.key"),
            &dir.join("ca.crt"),
        )?;
        Ok(Sender::new(id)?)
    };
    let source = sender("source", SOURCE)?;
    let stranger = sender("stranger", "10.0.0.9")?;
    let (host, _) = one.receive_endpoint.rsplit_once(':').expect("host:port");
    let ep = |token: &str| Endpoint::new(one.receive_endpoint.clone(), host).with_token(token);
    let once = RetryPolicy {
        max_retries: 0,
        ..Default::default()
    };
    let refused = |r: Result<ferry_transfer::Pipe, ferry_transfer::TransferError>, why: &str| {
        let e = r.expect_err("must be refused").to_string();
        assert!(e.contains(why), "expected {why:?} in: {e}");
    };
    refused(
        stranger
            .connect_pipe(&ep(&one.token), "m-one/ram", &once)
            .await,
        "does not name it",
    );
    refused(
        source.connect_pipe(&ep("guess"), "m-one/ram", &once).await,
        "wrong token",
    );
    refused(
        source
            .connect_pipe(&ep(&two.token), "m-one/ram", &once)
            .await,
        "wrong token",
    );
    // The granted source with the token gets through (its pipe waits for the guest).
    source
        .connect_pipe(&ep(&one.token), "m-one/ram", &once)
        .await?;
    let ep_two = Endpoint::new(two.receive_endpoint.clone(), host).with_token(&two.token);
    source.connect_pipe(&ep_two, "m-two/ram", &once).await?;
    // Aborted: nothing of m-one is admitted any more.
    c.abort(pb::MigrationRef {
        migration_id: "m-one".into(),
    })
    .await?;
    refused(
        source
            .connect_pipe(&ep(&one.token), "m-one/ram", &once)
            .await,
        "no migration on this node expects",
    );
    // A migration id without a receiver here is refused likewise.
    refused(
        source
            .connect_pipe(&ep(&one.token), "m-three/ram", &once)
            .await,
        "no migration on this node expects",
    );
    Ok(())
}
