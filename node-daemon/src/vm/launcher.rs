//! ferry-launcher's core: a typed builder for one QEMU guest's command line.
//!
//! The launcher is deliberately thin (KubeVirt's virt-launcher, minus the Kubernetes API):
//! it turns a small spec into QEMU arguments, exposes QMP on a unix socket for the node
//! daemon, and in destination mode starts QEMU with `-incoming defer` so the daemon picks
//! the migration address later with `migrate-incoming`.
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Which accelerator runs the guest. `--accel auto` is resolved before the spec is built,
/// by booting the guest under KVM once per node (`super::accel_probe`): on nested hosts
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

/// The guest itself: what both copies of a migrating VM must agree on. Kept in the VM
/// registry and sent to the destination, which checks it against the target pod's guest.
/// Where a copy puts its sockets is not part of it (see [`Launch`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestSpec {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub append: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub accel: Accel,
}

/// One QEMU process of a guest: its QMP socket, its console, and whether it boots or
/// waits for an incoming migration.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    pub qmp_socket: PathBuf,
    /// Where the guest's serial console (ttyS0) is written.
    pub serial_log: PathBuf,
    /// Destination mode: wait for `migrate-incoming` instead of booting.
    pub incoming: bool,
}

impl GuestSpec {
    /// The QEMU argument vector (without the program name).
    pub fn qemu_args(&self, launch: &Launch) -> Vec<String> {
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
        push("-serial", format!("file:{}", launch.serial_log.display()));
        // No NIC: the test guest needs none, and an absent device is identical on both ends.
        push("-nic", "none".to_string());
        push(
            "-qmp",
            format!("unix:{},server=on,wait=off", launch.qmp_socket.display()),
        );
        if launch.incoming {
            push("-incoming", "defer".to_string());
        }
        a
    }

    /// Why a migration from this guest into `target` cannot work, if it cannot: QEMU
    /// would only fail mid-stream with a device-state error. Kernel paths may differ
    /// (an incoming guest never boots its kernel), and so may the accelerator.
    pub fn mismatch(&self, target: &GuestSpec) -> Option<String> {
        let mut why = Vec::new();
        if self.memory_mib != target.memory_mib {
            why.push(format!(
                "memory {} MiB here, {} MiB at the source",
                target.memory_mib, self.memory_mib
            ));
        }
        if self.vcpus != target.vcpus {
            why.push(format!(
                "{} vCPUs here, {} at the source",
                target.vcpus, self.vcpus
            ));
        }
        (!why.is_empty()).then(|| why.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> GuestSpec {
        GuestSpec {
            kernel: "/g/vmlinuz".into(),
            initrd: Some("/g/initramfs.gz".into()),
            append: "console=ttyS0 quiet panic=-1".into(),
            memory_mib: 256,
            vcpus: 1,
            accel: Accel::Tcg,
        }
    }

    fn launch(incoming: bool) -> Launch {
        Launch {
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
        let a = spec().qemu_args(&launch(false));
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
        let a = spec().qemu_args(&launch(true));
        assert_eq!(value_of(&a, "-incoming"), Some("defer"));
    }

    #[test]
    fn target_must_match_memory_and_vcpus_only() {
        let src = spec();
        let mut dst = spec();
        dst.kernel = "/elsewhere/vmlinuz".into();
        dst.accel = Accel::Kvm;
        assert_eq!(src.mismatch(&dst), None);
        dst.memory_mib = 512;
        dst.vcpus = 2;
        let why = src.mismatch(&dst).expect("differs");
        assert!(why.contains("512 MiB here, 256 MiB at the source"), "{why}");
        assert!(why.contains("2 vCPUs here, 1 at the source"), "{why}");
    }

    #[test]
    fn old_specs_with_launch_fields_still_parse() {
        // Specs written before the launch paths moved out of them.
        let old = r#"{"kernel":"/k","initrd":null,"append":"","memory_mib":64,"vcpus":1,
            "accel":"tcg","qmp_socket":"/q","serial_log":"/s","incoming":false}"#;
        let s: GuestSpec = serde_json::from_str(old).unwrap();
        assert_eq!(s.memory_mib, 64);
    }
}
