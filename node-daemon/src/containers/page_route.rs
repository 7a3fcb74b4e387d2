//! Where one container's dump sends its memory pages, opened before the pod freezes.
//!
//! CRIU's page connection stays on this node's loopback; the daemons carry it
//! (`crate::relay`). Cold: CRIU connects to a relay port whose pipe to the destination's
//! page server is already dialled, so the mutual-TLS handshake happens while the pod
//! still runs, not inside its downtime. Live: this dump's lazy page server will listen
//! on a loopback port, and the destination's pipe is relayed to it once the destination
//! restores. Through a bucket: no page server; CRIU writes the pages among its images,
//! and they travel in the bundle.
use super::free_port;
use crate::error::RuntimeError;
use crate::relay::{self, Relay};
use crate::runtime::{CheckpointPlan, ProgressSink, Strategy};
use crate::transport::{self, Transport};
use std::sync::Arc;

/// A container's page route: the address its `runc checkpoint --page-server` uses
/// (none through a bucket) and the relay that carries it (ended when dropped).
pub(super) struct PageRoute {
    pub addr: Option<String>,
    pub relay: Option<Relay>,
}

pub(super) async fn open(
    transport: &Arc<Transport>,
    plan: &CheckpointPlan,
    container: &str,
    through_bucket: bool,
    progress: &ProgressSink,
) -> Result<PageRoute, RuntimeError> {
    if through_bucket {
        return Ok(PageRoute {
            addr: None,
            relay: None,
        });
    }
    let metered = progress.metered(&plan.shaping);
    if plan.strategy == Strategy::PostCopy {
        let port = free_port("127.0.0.1")?;
        let pipe = relay::lazy_pipe(&plan.migration_id, container);
        return Ok(PageRoute {
            addr: Some(format!("127.0.0.1:{port}")),
            relay: Some(relay::inbound(transport.clone(), pipe, port, metered)),
        });
    }
    let pipe = plan
        .page_servers
        .iter()
        .find(|(n, _)| n == container)
        .map(|(_, e)| e.clone())
        .ok_or_else(|| {
            RuntimeError::InvalidArgument(format!("no page server given for container {container}"))
        })?;
    let peer = transport::peer(&plan.receive_endpoint, &plan.token)?;
    let (addr, relay) = relay::outbound(transport.clone(), peer, pipe, metered).await?;
    Ok(PageRoute {
        addr: Some(addr.to_string()),
        relay: Some(relay),
    })
}
