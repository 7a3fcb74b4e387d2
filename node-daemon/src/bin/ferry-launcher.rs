//! ferry-launcher: runs one QEMU guest for a VM pod. Never talks to the Kubernetes API.
//!
//! Signal forwarding is done by `exec`: after building the argument vector the launcher
//! replaces itself with QEMU (same PID), so SIGTERM from the kubelet reaches QEMU directly
//! and QEMU shuts the guest down; no relay process can lose or delay the signal.
#![forbid(unsafe_code)]
use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use ferry_node::launcher::{Accel, GuestSpec};
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
    #[arg(long)]
    qmp: PathBuf,
    #[arg(long)]
    serial_log: PathBuf,
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
    let spec = GuestSpec {
        kernel: a.kernel,
        initrd: a.initrd,
        append: a.append,
        memory_mib: a.memory_mib,
        vcpus: a.vcpus,
        accel,
        qmp_socket: a.qmp,
        serial_log: a.serial_log,
        incoming: a.incoming,
    };
    let err = std::process::Command::new(&a.qemu)
        .args(spec.qemu_args())
        .exec();
    Err(err).with_context(|| format!("exec {}", a.qemu.display()))
}
