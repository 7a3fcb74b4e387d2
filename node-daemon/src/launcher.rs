//! ferry-launcher's core: a typed builder for one QEMU guest's command line.
//!
//! The launcher is deliberately thin (KubeVirt's virt-launcher, minus the Kubernetes API):
//! it turns a small spec into QEMU arguments, exposes QMP on a unix socket for the node
//! daemon, and in destination mode starts QEMU with `-incoming defer` so the daemon picks
//! the migration address later with `migrate-incoming`.
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Which accelerator runs the guest. `--accel auto` is resolved before the spec is built,
/// by booting the guest under KVM once per node (`crate::accel_probe`): on nested hosts
/// /dev/kvm opens but a Linux guest hangs, so only a guest that runs proves KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_qemu(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Everything needed to start one guest. Serialized into the VM registry and sent to
/// the destination daemon, which starts the same guest in incoming mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestSpec {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub append: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub accel: Accel,
    pub qmp_socket: PathBuf,
    /// Where the guest's serial console (ttyS0) is written.
    pub serial_log: PathBuf,
    /// Destination mode: wait for `migrate-incoming` instead of booting.
    pub incoming: bool,
}

impl GuestSpec {
    /// The QEMU argument vector (without the program name).
    pub fn qemu_args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |k: &str, v: String| {
            a.push(k.to_string());
            a.push(v);
        };
        push("-accel", self.accel.as_qemu().to_string());
        // A fixed machine type: source and destination must agree on it for migration.
        push("-machine", "pc".to_string());
        push("-m", format!("{}M", self.memory_mib));
        push("-smp", self.vcpus.to_string());
        push("-kernel", self.kernel.display().to_string());
        if let Some(initrd) = &self.initrd {
            push("-initrd", initrd.display().to_string());
        }
        push("-append", self.append.clone());
        push("-display", "none".to_string());
        push("-monitor", "none".to_string());
        push("-serial", format!("file:{}", self.serial_log.display()));
        // No NIC: the test guest needs none, and an absent device is identical on both ends.
        push("-nic", "none".to_string());
        push(
            "-qmp",
            format!("unix:{},server=on,wait=off", self.qmp_socket.display()),
        );
        if self.incoming {
            push("-incoming", "defer".to_string());
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(incoming: bool) -> GuestSpec {
        GuestSpec {
            kernel: "/g/vmlinuz".into(),
            initrd: Some("/g/initramfs.gz".into()),
            append: "console=ttyS0 quiet panic=-1".into(),
            memory_mib: 256,
            vcpus: 1,
            accel: Accel::Tcg,
            qmp_socket: "/run/q.sock".into(),
            serial_log: "/run/serial.log".into(),
            incoming,
        }
    }

    fn value_of<'a>(args: &'a [String], key: &str) -> Option<&'a str> {
        args.windows(2).find(|w| w[0] == key).map(|w| w[1].as_str())
    }

    #[test]
    fn source_args() {
        let a = spec(false).qemu_args();
        assert_eq!(value_of(&a, "-accel"), Some("tcg"));
        assert_eq!(value_of(&a, "-m"), Some("256M"));
        assert_eq!(value_of(&a, "-kernel"), Some("/g/vmlinuz"));
        assert_eq!(value_of(&a, "-initrd"), Some("/g/initramfs.gz"));
        assert_eq!(
            value_of(&a, "-append"),
            Some("console=ttyS0 quiet panic=-1")
        );
        assert_eq!(value_of(&a, "-serial"), Some("file:/run/serial.log"));
        assert_eq!(
            value_of(&a, "-qmp"),
            Some("unix:/run/q.sock,server=on,wait=off")
        );
        assert!(!a.iter().any(|x| x == "-incoming"));
    }

    #[test]
    fn incoming_args() {
        let a = spec(true).qemu_args();
        assert_eq!(value_of(&a, "-incoming"), Some("defer"));
    }
}
