//! ferry node daemon: node-local checkpoint, restore and live migration.
//! The controller decides; this crate does the work on one node.
#![forbid(unsafe_code)]

// The workload-generic runtime trait, its errors and the gRPC layer around it.
pub mod atomic;
pub mod convert;
pub mod error;
pub mod runtime;
pub mod server;
pub mod validate;
// The control API's mutual TLS: only the controller may call it.
pub mod control_tls;
// Announcing the daemon on its own Node; its health and metrics endpoints.
pub mod health;
pub mod metrics;
pub mod register;
// Putting the node pieces (ferry-runtime, containerd's `ferry` handler) on the host.
pub mod install;
// Containers run by containerd, checkpointed with CRIU and restored by ferry-runtime.
pub mod containers;
// Virtual machines: ferry-launcher runs one QEMU guest in a VM pod; the daemon migrates it over QMP.
pub mod vm;
// Moving bytes to and from peer daemons (ferry-transfer with the node's TLS identity).
/// CRIU's page traffic relayed through the daemons' mutual TLS.
pub mod relay;
pub mod transport;
