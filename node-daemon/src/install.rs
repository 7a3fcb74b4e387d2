//! Installing ferry's node pieces on the host, the way kata-deploy installs Kata's: the
//! ferry-node DaemonSet's init container copies `ferry-runtime` (the `ferry` runtime
//! handler's binary, which containerd's shim runs on the host) and its
//! `ferry-runtime.json` into a host directory, adds the handler to containerd through a
//! drop-in file, and restarts containerd so it loads it. Removal undoes all three.
//!
//! The drop-in needs a containerd 2.x whose config imports it (`containerd config
//! default` imports `/etc/containerd/conf.d/*.toml`) and that merges a drop-in's runtime
//! into the main config's plugin section instead of replacing the section (2.4 does;
//! tested here). Every host path is reached under `host_root` (the host's directories
//! are mounted below `/host` in the pod); the files written name the host's own paths.
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The runtime handler's name: containerd's `runtimes.ferry`, the `ferry` RuntimeClass.
pub const HANDLER: &str = "ferry";

/// Where and how the node pieces go. All paths but `host_root` are the host's.
#[derive(Debug, Clone)]
pub struct HostInstall {
    /// Where the host's filesystem is reached from here ("/" when run on the host).
    pub host_root: PathBuf,
    /// Directory for ferry-runtime and ferry-runtime.json.
    pub bin_dir: PathBuf,
    /// containerd drop-in file that declares the handler.
    pub dropin: PathBuf,
    /// The host's runc, which ferry-runtime passes every call to.
    pub runc: PathBuf,
    /// The host's CRIU, for `runc restore`.
    pub criu: PathBuf,
    /// ferry-node's --state-dir (the wrapper finds staged checkpoints there).
    pub state_dir: PathBuf,
    /// runc root of the handler (ferry-node's --restore-runc-root, without `/k8s.io`).
    pub runc_root: PathBuf,
    /// How long a target container's `create` waits for its state.
    pub create_wait_seconds: u64,
}

/// How containerd is made to load the changed drop-in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// `systemctl restart containerd` in the host's namespaces (PID 1's). Running
    /// containers survive it: their shims do not restart.
    Systemd,
    /// Nothing: whoever runs containerd restarts it (nodes without systemd).
    None,
}

impl std::str::FromStr for Restart {
    type Err = String;
    fn from_str(s: &str) -> Result<Restart, String> {
        match s {
            "systemd" => Ok(Restart::Systemd),
            "none" => Ok(Restart::None),
            _ => Err(format!(
                "restart must be \"systemd\" or \"none\", not {s:?}"
            )),
        }
    }
}

/// What an install or removal changed on the host.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Files written or removed (host paths).
    pub files: Vec<PathBuf>,
    /// Whether containerd's configuration changed (it must restart to see it).
    pub containerd_config: bool,
    /// Files kept because containers still run under the handler (host paths).
    pub kept: Vec<PathBuf>,
}

impl HostInstall {
    fn host(&self, p: &Path) -> PathBuf {
        self.host_root.join(p.strip_prefix("/").unwrap_or(p))
    }

    pub fn runtime_binary(&self) -> PathBuf {
        self.bin_dir.join("ferry-runtime")
    }

    /// The drop-in's text: one runc-v2 runtime whose binary is ferry-runtime, with its
    /// own runc root, passed the pods' `ferry.dev/*` annotations (the target marker).
    pub fn dropin_toml(&self) -> String {
        let t = format!("plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.{HANDLER}");
        let mut s = String::from(
            "# Written by ferry-install (the ferry-node DaemonSet); removed when ferry is uninstalled.\nversion = 3\n\n",
        );
        let _ = write!(
            s,
            "[{t}]\n  runtime_type = 'io.containerd.runc.v2'\n  pod_annotations = ['ferry.dev/*']\n\
             [{t}.options]\n  BinaryName = {bin}\n  Root = {root}\n  SystemdCgroup = false\n",
            bin = toml_str(&self.runtime_binary()),
            root = toml_str(&self.runc_root),
        );
        s
    }

    /// ferry-runtime.json (`containers::wrapper::WrapperConfig`).
    pub fn runtime_json(&self) -> String {
        let v = serde_json::json!({
            "runc": self.runc,
            "criu": self.criu,
            "stateDir": self.state_dir,
            "createWaitSeconds": self.create_wait_seconds,
        });
        serde_json::to_string_pretty(&v).expect("JSON") + "\n"
    }

    /// Puts the pieces in place; files already holding the same bytes are left alone
    /// (a restarted DaemonSet pod changes nothing, so containerd need not restart).
    pub fn install(&self, runtime_source: &Path) -> io::Result<Changes> {
        let mut c = Changes::default();
        let binary =
            std::fs::read(runtime_source).map_err(|e| annotate(e, "reading", runtime_source))?;
        for (path, body, mode) in [
            (self.runtime_binary(), binary, 0o755),
            (
                self.bin_dir.join("ferry-runtime.json"),
                self.runtime_json().into_bytes(),
                0o644,
            ),
            (self.dropin.clone(), self.dropin_toml().into_bytes(), 0o644),
        ] {
            if self.put(&path, &body, mode)? {
                c.containerd_config |= path == self.dropin;
                c.files.push(path);
            }
        }
        Ok(c)
    }

    /// Removes the drop-in, then the binary and its config unless containers still run
    /// under the handler: their shims run ferry-runtime again to stop and delete them,
    /// so it stays until they are gone (a later removal takes it).
    pub fn remove(&self) -> io::Result<Changes> {
        let mut c = Changes::default();
        if remove_file(&self.host(&self.dropin))? {
            c.containerd_config = true;
            c.files.push(self.dropin.clone());
        }
        let rest = [
            self.runtime_binary(),
            self.bin_dir.join("ferry-runtime.json"),
        ];
        if self.containers_running()? {
            c.kept
                .extend(rest.into_iter().filter(|p| self.host(p).exists()));
            return Ok(c);
        }
        for p in rest {
            if remove_file(&self.host(&p))? {
                c.files.push(p);
            }
        }
        // The directory too, when ferry-install made it and nothing else is in it.
        let _ = std::fs::remove_dir(self.host(&self.bin_dir));
        Ok(c)
    }

    /// Whether the handler's runc root holds containers (runc keeps one state
    /// directory per container under `<root>/<namespace>/`).
    fn containers_running(&self) -> io::Result<bool> {
        let root = self.host(&self.runc_root);
        let namespaces = match std::fs::read_dir(&root) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(annotate(e, "reading", &root)),
        };
        for ns in namespaces {
            let ns = ns?.path();
            if ns.is_dir() && std::fs::read_dir(&ns)?.next().is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Writes `body` to the host path `path` through a temporary file and a rename, so
    /// that a shim starting ferry-runtime meanwhile runs the old or the new file, never
    /// half of one. Returns false when the file already held `body`.
    fn put(&self, path: &Path, body: &[u8], mode: u32) -> io::Result<bool> {
        use std::os::unix::fs::PermissionsExt;
        let target = self.host(path);
        if std::fs::read(&target).is_ok_and(|b| b == body) {
            return Ok(false);
        }
        let dir = target.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir).map_err(|e| annotate(e, "creating", dir))?;
        let tmp = target.with_extension("ferry-install.tmp");
        std::fs::write(&tmp, body).map_err(|e| annotate(e, "writing", &tmp))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, &target).map_err(|e| annotate(e, "renaming onto", &target))?;
        Ok(true)
    }
}

/// Restarts containerd as `how` says, when the configuration changed.
pub fn restart_containerd(how: Restart) -> io::Result<()> {
    match how {
        Restart::None => Ok(()),
        Restart::Systemd => {
            // The pod runs with hostPID: PID 1 is the host's init.
            let out = Command::new("nsenter")
                .args([
                    "--target", "1", "--mount", "--uts", "--ipc", "--net", "--pid",
                ])
                .args(["--", "systemctl", "restart", "containerd"])
                .output()
                .map_err(|e| io::Error::new(e.kind(), format!("running nsenter: {e}")))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(io::Error::other(format!(
                    "systemctl restart containerd: {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                )))
            }
        }
    }
}

fn remove_file(p: &Path) -> io::Result<bool> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(annotate(e, "removing", p)),
    }
}

fn annotate(e: io::Error, what: &str, p: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
}

/// A TOML basic string (JSON's escaping is a subset TOML accepts).
fn toml_str(p: &Path) -> String {
    serde_json::to_string(&p.to_string_lossy()).expect("a string serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn install(root: &Path) -> HostInstall {
        HostInstall {
            host_root: root.to_path_buf(),
            bin_dir: "/opt/ferry/bin".into(),
            dropin: "/etc/containerd/conf.d/ferry.toml".into(),
            runc: "/usr/sbin/runc".into(),
            criu: "/usr/local/sbin/criu".into(),
            state_dir: "/var/lib/ferry".into(),
            runc_root: "/run/ferry/runc".into(),
            create_wait_seconds: 90,
        }
    }

    #[test]
    fn dropin_declares_the_handler_with_host_paths() {
        let t = install(Path::new("/host")).dropin_toml();
        assert!(t.contains("version = 3"), "{t}");
        assert!(
            t.contains(
                "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.ferry.options]"
            ),
            "{t}"
        );
        assert!(
            t.contains(r#"BinaryName = "/opt/ferry/bin/ferry-runtime""#),
            "{t}"
        );
        assert!(t.contains(r#"Root = "/run/ferry/runc""#), "{t}");
        assert!(!t.contains("/host"), "the drop-in names host paths: {t}");
    }

    #[test]
    fn runtime_json_is_what_the_wrapper_reads() {
        let j = install(Path::new("/host")).runtime_json();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ferry-runtime.json"), &j).unwrap();
        let cfg =
            crate::containers::wrapper::WrapperConfig::load(&dir.path().join("ferry-runtime"))
                .unwrap();
        assert_eq!(cfg.runc, Path::new("/usr/sbin/runc"));
        assert_eq!(cfg.state_dir, Path::new("/var/lib/ferry"));
        assert_eq!(cfg.create_wait_seconds, 90);
    }

    #[test]
    fn install_is_idempotent_and_removal_undoes_it() {
        let root = tempfile::tempdir().unwrap();
        let src = root.path().join("src-runtime");
        std::fs::write(&src, b"binary").unwrap();
        let i = install(root.path());
        let first = i.install(&src).unwrap();
        assert_eq!(first.files.len(), 3);
        assert!(first.containerd_config);
        assert_eq!(
            std::fs::read(root.path().join("opt/ferry/bin/ferry-runtime")).unwrap(),
            b"binary"
        );
        let again = i.install(&src).unwrap();
        assert_eq!(again, Changes::default(), "nothing changed the second time");

        let removed = i.remove().unwrap();
        assert!(removed.containerd_config);
        assert_eq!(removed.files.len(), 3);
        assert!(
            !root
                .path()
                .join("etc/containerd/conf.d/ferry.toml")
                .exists()
        );
        assert!(!root.path().join("opt/ferry/bin").exists());
    }

    #[test]
    fn removal_keeps_the_binary_while_containers_run_under_it() {
        let root = tempfile::tempdir().unwrap();
        let src = root.path().join("src-runtime");
        std::fs::write(&src, b"binary").unwrap();
        let i = install(root.path());
        i.install(&src).unwrap();
        std::fs::create_dir_all(root.path().join("run/ferry/runc/k8s.io/abc")).unwrap();
        let c = i.remove().unwrap();
        assert!(c.containerd_config, "the handler goes: no new pod gets it");
        assert_eq!(c.kept.len(), 2, "{c:?}");
        assert!(root.path().join("opt/ferry/bin/ferry-runtime").exists());
        std::fs::remove_dir(root.path().join("run/ferry/runc/k8s.io/abc")).unwrap();
        let c = i.remove().unwrap();
        assert!(c.kept.is_empty() && c.files.len() == 2, "{c:?}");
    }
}
