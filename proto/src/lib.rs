//! Generated gRPC types for ferry's node daemon API (`proto/ferry/node/v1/node.proto`).
//! Conversions to domain types live with their users, in one module each.

pub mod node {
    pub mod v1 {
        tonic::include_proto!("ferry.node.v1");
    }
}
