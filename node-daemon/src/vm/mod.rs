//! Virtual machines. A VM pod's container runs `ferry-launcher`, which registers its
//! guest under the node's VM root ([`registry`]) and execs QEMU ([`launcher`], with the
//! accelerator chosen by [`accel_probe`]); the node daemon's [`VmRuntime`] finds the
//! guest there and live-migrates it over QMP ([`qemu`]). Every copy of a guest is a
//! kubelet-owned Pod: the daemon never starts, quits or kills QEMU.
pub mod accel_probe;
mod backend;
pub mod launcher;
pub mod qemu;
mod record;
pub mod registry;

pub use backend::{INCOMING_READY, VmConfig, VmRuntime};
pub use registry::{ENV_INCOMING, INCOMING_ANNOTATION};
