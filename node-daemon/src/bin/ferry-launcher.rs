//! ferry-launcher: runs one QEMU guest for a VM pod. Never talks to the Kubernetes API.
//!
//! Signal forwarding is done by `exec`: after building the argument vector the launcher
//! replaces itself with QEMU (same PID), so SIGTERM from the kubelet reaches QEMU directly
//! and QEMU shuts the guest down; no relay process can lose or delay the signal.
#![forbid(unsafe_code)]
use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use ferry_node::launcher::{Accel, GuestSpec};
use ferry_node::vm_registry::{self, VmRecord};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AccelArg {
    Kvm,
    Tcg,
    /// TCG unless FERRY_ACCEL=kvm (nested /dev/kvm here hangs Linux guests).
    Auto,
}

#[derive(Parser, Debug)]
#[command(about = "Run one QEMU guest with a QMP socket for ferry's node daemon")]
struct Args {
    #[arg(long)]
    kernel: PathBuf,
    #[arg(long)]
    initrd: Option<PathBuf>,
    #[arg(long, default_value = "console=ttyS0 quiet panic=-1")]
    append: String,
    #[arg(long, default_value_t = 512)]
    memory_mib: u32,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    #[arg(long, value_enum, default_value = "auto")]
    accel: AccelArg,
    /// QMP socket (default: in the VM's registry directory).
    #[arg(long)]
    qmp: Option<PathBuf>,
    /// Serial console log (default: in the VM's registry directory).
    #[arg(long)]
    serial_log: Option<PathBuf>,
    /// Register the guest under this VM root for the node daemon (needs --namespace and
    /// --pod). Without it the guest runs unregistered (raw baselines, debugging).
    #[arg(long, env = "FERRY_VM_ROOT")]
    vm_root: Option<PathBuf>,
    /// The pod this guest belongs to.
    #[arg(long)]
    namespace: Option<String>,
    #[arg(long)]
    pod: Option<String>,
    #[arg(long, default_value = "")]
    pod_uid: String,
    /// Destination mode: start with `-incoming defer`.
    #[arg(long)]
    incoming: bool,
    #[arg(long, env = "FERRY_QEMU", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
}

fn main() -> Result<()> {
    let a = Args::parse();
    for (what, p) in [("kernel", Some(&a.kernel)), ("initrd", a.initrd.as_ref())] {
        if let Some(p) = p
            && !p.is_file()
        {
            bail!(
                "{what} {} does not exist (build it with scripts/build-test-guest.sh)",
                p.display()
            );
        }
    }
    if a.memory_mib < 16 || a.vcpus == 0 {
        bail!("memory_mib must be >= 16 and vcpus >= 1");
    }
    let accel = match a.accel {
        AccelArg::Kvm => Accel::Kvm,
        AccelArg::Tcg => Accel::Tcg,
        AccelArg::Auto => Accel::auto_from_env(std::env::var("FERRY_ACCEL").ok().as_deref()),
    };
    let registration = match (&a.vm_root, &a.namespace, &a.pod) {
        (Some(root), Some(ns), Some(pod)) => Some(vm_registry::dir_for(root, ns, pod)),
        (None, _, _) => None,
        _ => bail!("--vm-root needs --namespace and --pod"),
    };
    let in_registry = |file: &str| registration.as_ref().map(|d| d.join(file));
    let (Some(qmp_socket), Some(serial_log)) = (
        a.qmp.clone().or_else(|| in_registry("qmp.sock")),
        a.serial_log.clone().or_else(|| in_registry("serial.log")),
    ) else {
        bail!("give --qmp and --serial-log, or --vm-root with --namespace and --pod");
    };
    let spec = GuestSpec {
        kernel: a.kernel,
        initrd: a.initrd,
        append: a.append,
        memory_mib: a.memory_mib,
        vcpus: a.vcpus,
        accel,
        qmp_socket,
        serial_log,
        incoming: a.incoming,
    };
    if let (Some(root), Some(namespace), Some(pod_name)) = (a.vm_root, a.namespace, a.pod) {
        // Registered before exec: QEMU keeps this PID, so the record names the guest.
        let rec = VmRecord {
            namespace,
            pod_name,
            pod_uid: a.pod_uid,
            pid: std::process::id(),
            spec: spec.clone(),
        };
        vm_registry::register(&root, &rec)
            .with_context(|| format!("registering the VM under {}", root.display()))?;
    }
    let err = std::process::Command::new(&a.qemu)
        .args(spec.qemu_args())
        .exec();
    Err(err).with_context(|| format!("exec {}", a.qemu.display()))
}
