//! Generated gRPC types for ferry's node daemon API (`proto/ferry/node/v1/node.proto`).
//! Conversions to domain types live with their users, in one module each.

/// The Node annotation through which a node's daemon announces its control endpoint
/// (`https://IP:PORT`): the daemon writes it on its own Node (`ferry-node
/// --register-node`), the controller reads it to dial the node.
pub const DAEMON_ANNOTATION: &str = "ferry.dev/node-daemon";

pub mod node {
    pub mod v1 {
        tonic::include_proto!("ferry.node.v1");
    }
}
