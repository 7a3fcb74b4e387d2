//! The standard test images, each built once per content into `$FERRY_CACHE/images`
//! (write-then-rename, so parallel test processes may race safely): the sandbox
//! ("pause") image and a busybox image for test workloads.
use super::{ImageBuilder, sha256};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where built images (and the pause binary) are cached: `$FERRY_CACHE/images`.
fn cache_dir() -> PathBuf {
    std::env::var_os("FERRY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/ferry".into())
        .join("images")
}

/// `b` written once per content to `$FERRY_CACHE/images/<stem>-<hash>.tar`.
fn cached(b: &ImageBuilder, stem: &str) -> Result<PathBuf> {
    let (archive, digest) = b.build()?;
    let out = cache_dir().join(format!("{stem}-{}.tar", &digest[7..23]));
    if !out.exists() {
        let tmp = out.with_extension(format!("tmp{}", std::process::id()));
        std::fs::create_dir_all(cache_dir())?;
        std::fs::write(&tmp, &archive).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &out)?;
    }
    Ok(out)
}

/// The static pause binary, compiled from `testkit/images/pause.c` with `gcc -static`
/// once per source version.
pub fn pause_binary() -> Result<PathBuf> {
    const SRC: &str = include_str!("../../images/pause.c");
    let hash = &sha256(SRC.as_bytes())[7..23];
    let dir = cache_dir().join(format!("pause-{hash}"));
    let bin = dir.join("pause");
    if bin.exists() {
        return Ok(bin);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let src = dir.join(format!("pause-{}.c", std::process::id()));
    std::fs::write(&src, SRC)?;
    let tmp = dir.join(format!("pause.{}", std::process::id()));
    let out = Command::new("gcc")
        .args(["-static", "-O2", "-s", "-o"])
        .arg(&tmp)
        .arg(&src)
        .output()
        .context("running gcc (scripts/install-deps.sh installs gcc and libc6-dev)")?;
    let _ = std::fs::remove_file(&src);
    if !out.status.success() {
        bail!(
            "gcc -static pause.c failed (scripts/install-deps.sh installs gcc and libc6-dev): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    std::fs::rename(&tmp, &bin)?;
    Ok(bin)
}

/// The sandbox image: ref "registry.k8s.io/pause:3.10" (kubelet 1.34's default sandbox
/// image, pinned in each node's containerd config), entrypoint /pause.
pub fn pause_image() -> Result<PathBuf> {
    let mut b = ImageBuilder::new(PAUSE_IMAGE);
    b.file(&pause_binary()?, "/pause", 0o755)
        .entrypoint(&["/pause"]);
    cached(&b, "pause")
}

/// The pause image's ref.
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10";
/// The busybox image's ref.
pub const BUSYBOX_IMAGE: &str = "docker.io/library/busybox:ferry";

/// ref "docker.io/library/busybox:ferry": /bin/busybox (Debian's busybox-static), applet
/// symlinks for what tests run, and /tmp, /data. No entrypoint: pods give the command.
pub fn busybox_image() -> Result<PathBuf> {
    let busybox = Path::new("/bin/busybox");
    // `ldd` fails on a static binary ("not a dynamic executable").
    let dynamic = Command::new("ldd")
        .arg(busybox)
        .output()
        .is_ok_and(|o| o.status.success());
    if !busybox.is_file() || dynamic {
        bail!(
            "/bin/busybox is missing or not static: scripts/install-deps.sh installs busybox-static"
        );
    }
    let mut b = ImageBuilder::new(BUSYBOX_IMAGE);
    b.file(busybox, "/bin/busybox", 0o755);
    for applet in [
        "sh", "sleep", "usleep", "nc", "echo", "cat", "seq", "date", "ls", "head", "tail", "wc",
        "dd", "md5sum", "mkdir", "rm", "touch", "kill", "ps",
    ] {
        b.symlink(&format!("/bin/{applet}"), "busybox");
    }
    b.dir("/tmp").dir("/data");
    cached(&b, "busybox")
}
