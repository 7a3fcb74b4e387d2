//! ferry node daemon: node-local checkpoint, restore and live migration.
//! The controller decides; this crate does the work on one node.
#![forbid(unsafe_code)]

// The workload-generic runtime trait, its errors and the gRPC layer around it.
pub mod convert;
pub mod error;
pub mod runtime;
pub mod server;
// Container runtime: runc containers checkpointed and restored with CRIU.
pub mod criu;
pub mod runc;
pub mod runc_backend;
pub mod wire;
// Virtual machines: ferry-launcher runs one QEMU guest; the qemu backend migrates it over QMP.
pub mod accel_probe;
pub mod launcher;
pub mod qemu;
pub mod vm_backend;
pub mod vm_registry;
// Moving bytes to and from peer daemons (ferry-transfer with the node's TLS identity).
pub mod transport;
