//! ferry-launcher: runs one QEMU guest as the container of a VM pod. Never talks to the
//! Kubernetes API: the pod's identity comes from Downward API environment variables
//! (`FERRY_POD_NAMESPACE`, `FERRY_POD_NAME`, `FERRY_POD_UID`, `FERRY_NODE_NAME`), and
//! `FERRY_INCOMING` (the pod's `ferry.dev/incoming` annotation) says whether it boots the
//! guest or waits for it to migrate in (`ferry_node::vm::registry`).
//!
//! Signal forwarding is done by `exec`: after building the argument vector the launcher
//! replaces itself with QEMU (same PID), so SIGTERM from the kubelet reaches QEMU directly
//! and QEMU shuts the guest down; no relay process can lose or delay the signal.
//!
//! `--accel auto` may first boot the guest once under KVM to see whether KVM really runs
//! it (`ferry_node::vm::accel_probe`); that happens before registration and exec, with
//! termination signals held in a signalfd so a SIGTERM during the probe kills the probe
//! QEMU and ends the launcher instead of being lost.
#![forbid(unsafe_code)]
use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use ferry_node::vm::accel_probe::{self, AccelError, AutoAccel};
use ferry_node::vm::launcher::{Accel, GuestSpec, Launch};
use ferry_node::vm::registry::{self, VmRecord};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::cell::Cell;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AccelArg {
    Kvm,
    Tcg,
    /// FERRY_ACCEL=kvm|tcg if set; else KVM if /dev/kvm opens and a probe boot of this
    /// guest under KVM reaches userspace (cached per node), TCG otherwise.
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
    /// Register the guest under this VM root for the node daemon, in `<root>/<pod-uid>/`
    /// (needs the pod's namespace, name and UID). The same path as the daemon's: a
    /// hostPath mounted at the same place. Without it the guest runs unregistered (raw
    /// baselines, debugging).
    #[arg(long, env = registry::ENV_VM_ROOT)]
    vm_root: Option<PathBuf>,
    /// The pod this guest belongs to (Downward API: metadata.namespace).
    #[arg(long, env = registry::ENV_POD_NAMESPACE)]
    namespace: Option<String>,
    /// metadata.name
    #[arg(long, env = registry::ENV_POD_NAME)]
    pod: Option<String>,
    /// metadata.uid: names the registry directory.
    #[arg(long, env = registry::ENV_POD_UID)]
    pod_uid: Option<String>,
    /// spec.nodeName: a daemon with a node name claims only its own node's guests.
    #[arg(long, env = registry::ENV_NODE_NAME, default_value = "")]
    node_name: String,
    /// Destination mode: start with `-incoming defer`. Also on whenever FERRY_INCOMING
    /// (the pod's `ferry.dev/incoming` annotation) is not empty.
    #[arg(long)]
    incoming: bool,
    #[arg(long, env = "FERRY_QEMU", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Where `--accel auto` caches its probe outcome (one small file per QEMU/guest).
    #[arg(long, env = "FERRY_ACCEL_CACHE", default_value = accel_probe::DEFAULT_CACHE_DIR)]
    accel_cache: PathBuf,
    /// How long the `--accel auto` probe waits for a KVM guest to reach userspace.
    #[arg(long, default_value_t = accel_probe::DEFAULT_TIMEOUT.as_secs())]
    accel_probe_timeout_secs: u64,
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
    let registration = match (&a.vm_root, &a.namespace, &a.pod, &a.pod_uid) {
        (Some(root), Some(_), Some(_), Some(uid)) => {
            Some(registry::dir_for(root, uid).context("--pod-uid / FERRY_POD_UID")?)
        }
        (None, _, _, _) => None,
        _ => bail!(
            "--vm-root needs the pod's --namespace, --pod and --pod-uid (or {}, {} and {} \
             from the Downward API)",
            registry::ENV_POD_NAMESPACE,
            registry::ENV_POD_NAME,
            registry::ENV_POD_UID
        ),
    };
    let in_registry = |file: &str| registration.as_ref().map(|d| d.join(file));
    let (Some(qmp_socket), Some(serial_log)) = (
        a.qmp.clone().or_else(|| in_registry(registry::QMP_SOCKET)),
        a.serial_log
            .clone()
            .or_else(|| in_registry(registry::SERIAL_LOG)),
    ) else {
        bail!("give --qmp and --serial-log, or --vm-root with the pod's namespace, name and uid");
    };
    let migration =
        registry::incoming_migration(std::env::var(registry::ENV_INCOMING).ok().as_deref());
    let incoming = a.incoming || migration.is_some();
    // After the cheap argument checks: a probe may take seconds.
    let (accel, how) = match a.accel {
        AccelArg::Kvm => (Accel::Kvm, "--accel kvm".to_string()),
        AccelArg::Tcg => (Accel::Tcg, "--accel tcg".to_string()),
        AccelArg::Auto => resolve_auto(&a)?,
    };
    // One line, so an operator sees why a guest runs slowly (TCG) or on KVM.
    eprintln!("ferry-launcher: accelerator {}: {how}", accel.as_qemu());
    let spec = GuestSpec {
        kernel: a.kernel,
        initrd: a.initrd,
        append: a.append,
        memory_mib: a.memory_mib,
        vcpus: a.vcpus,
        accel,
    };
    let launch = Launch {
        qmp_socket,
        serial_log,
        incoming,
    };
    if let (Some(root), Some(namespace), Some(pod_name), Some(pod_uid)) =
        (a.vm_root, a.namespace, a.pod, a.pod_uid)
    {
        // Registered before exec; the daemon takes the guest for live once QMP answers.
        let rec = VmRecord {
            namespace,
            pod_name,
            pod_uid,
            node_name: a.node_name,
            incoming,
            migration_uid: migration.clone().unwrap_or_default(),
            spec: spec.clone(),
        };
        registry::register(&root, &rec)
            .with_context(|| format!("registering the VM under {}", root.display()))?;
    }
    if let Some(m) = &migration {
        eprintln!("ferry-launcher: waiting for incoming migration {m}");
    }
    let err = std::process::Command::new(&a.qemu)
        .args(spec.qemu_args(&launch))
        .exec();
    Err(err).with_context(|| format!("exec {}", a.qemu.display()))
}

/// `--accel auto`. SIGTERM/SIGINT/SIGHUP are held in a signalfd meanwhile: the probe can
/// take seconds, and a pod deleted during it must not leave a probe QEMU behind.
fn resolve_auto(a: &Args) -> Result<(Accel, String)> {
    let mut held = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        held.add(s);
    }
    held.thread_block()
        .context("blocking termination signals")?;
    let sfd = SignalFd::with_flags(&held, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .context("signalfd")?;
    let got = Cell::new(None::<u32>);
    let cancel = || {
        if let Ok(Some(info)) = sfd.read_signal() {
            got.set(Some(info.ssi_signo));
        }
        got.get().is_some()
    };
    let mut auto = AutoAccel::new(&a.qemu, &a.kernel, a.initrd.as_deref(), &a.accel_cache);
    auto.timeout = Duration::from_secs(a.accel_probe_timeout_secs);
    let env = std::env::var("FERRY_ACCEL").ok();
    let resolved = auto.resolve(env.as_deref(), &cancel);
    if let Err(AccelError::Interrupted) = resolved {
        let signo = got.get().unwrap_or(Signal::SIGTERM as u32);
        eprintln!("ferry-launcher: signal {signo} while probing the accelerator; not starting");
        std::process::exit(128 + signo as i32);
    }
    let resolved = resolved?;
    drop(sfd);
    // QEMU (exec'd with this PID) must receive SIGTERM again; one that arrived after the
    // probe is delivered here and ends the launcher, which is what it asked for.
    held.thread_unblock()
        .context("unblocking termination signals")?;
    Ok((resolved.accel, format!("auto, {}", resolved.how)))
}
