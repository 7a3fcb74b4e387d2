//! OCI image archives built without Docker or a registry, for real test nodes: one
//! uncompressed layer, deterministic bytes (entries sorted, mtime 0, uid/gid 0, no user
//! or group names), in the OCI image-layout tar format that
//! `ctr -n k8s.io images import` reads. Pods use them with `imagePullPolicy: Never`.
//!
//! ```no_run
//! use ferry_testkit::oci::{ImageBuilder, busybox_image};
//! let mut b = ImageBuilder::new("docker.io/library/app:ferry");
//! b.file("/bin/busybox".as_ref(), "/bin/busybox", 0o755)
//!     .symlink("/bin/sh", "busybox")
//!     .entrypoint(&["/bin/sh", "-c", "sleep 1000"]);
//! let digest = b.write("/tmp/app.tar".as_ref())?;
//! let busybox = busybox_image()?; // cached under $FERRY_CACHE/images
//! # anyhow::Ok(())
//! ```
use anyhow::{Context, Result, bail};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";

/// What one `ImageBuilder` call adds; expanded (and host files read) at `write`.
#[derive(Debug, Clone)]
enum Op {
    File {
        host: PathBuf,
        dest: String,
        mode: u32,
    },
    Symlink {
        dest: String,
        target: String,
    },
    Dir {
        dest: String,
    },
    Tree {
        host: PathBuf,
        dest: String,
    },
}

/// One layer entry, keyed by its path inside the image (no leading `/`).
#[derive(Debug, Clone)]
enum Entry {
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
    Dir(u32),
}

/// A single-layer image; see the module docs.
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    name: String,
    ops: Vec<Op>,
    entrypoint: Option<Vec<String>>,
    env: Vec<String>,
}

impl ImageBuilder {
    /// `name` like "docker.io/library/busybox:ferry" (the ref the image gets in containerd).
    pub fn new(name: &str) -> ImageBuilder {
        ImageBuilder {
            name: name.to_string(),
            ops: Vec::new(),
            entrypoint: None,
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
        }
    }

    /// Adds a host file at `dest` (absolute path inside the image) with `mode`.
    pub fn file(&mut self, host: &Path, dest: &str, mode: u32) -> &mut Self {
        self.ops.push(Op::File {
            host: host.to_path_buf(),
            dest: dest.to_string(),
            mode,
        });
        self
    }

    /// Adds a symlink `dest` -> `target`.
    pub fn symlink(&mut self, dest: &str, target: &str) -> &mut Self {
        self.ops.push(Op::Symlink {
            dest: dest.to_string(),
            target: target.to_string(),
        });
        self
    }

    /// Adds an empty directory.
    pub fn dir(&mut self, dest: &str) -> &mut Self {
        self.ops.push(Op::Dir {
            dest: dest.to_string(),
        });
        self
    }

    /// Adds every file under host dir `host` at `dest` (recursively, keeping modes and symlinks).
    pub fn tree(&mut self, host: &Path, dest: &str) -> &mut Self {
        self.ops.push(Op::Tree {
            host: host.to_path_buf(),
            dest: dest.to_string(),
        });
        self
    }

    pub fn entrypoint(&mut self, argv: &[&str]) -> &mut Self {
        self.entrypoint = Some(argv.iter().map(|s| s.to_string()).collect());
        self
    }

    /// Adds `KEY=VALUE` to the image's environment (a default `PATH` is already set;
    /// a later `PATH=...` replaces it).
    pub fn env(&mut self, kv: &str) -> &mut Self {
        let key = kv.split('=').next().unwrap_or(kv);
        self.env.retain(|e| e.split('=').next() != Some(key));
        self.env.push(kv.to_string());
        self
    }

    /// Writes the OCI archive (one layer) to `out`; returns the image's manifest digest.
    pub fn write(&self, out: &Path) -> Result<String> {
        let (archive, digest) = self.build()?;
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // Write-then-rename: a reader never sees half an archive.
        let tmp = out.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, &archive).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display()))?;
        Ok(digest)
    }

    /// The archive's bytes and its manifest digest.
    fn build(&self) -> Result<(Vec<u8>, String)> {
        let layer = layer_tar(&self.entries()?)?;
        let layer_digest = sha256(&layer);
        let mut config = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Env": self.env },
            "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
        });
        if let Some(ep) = &self.entrypoint {
            config["config"]["Entrypoint"] = json!(ep);
        }
        let config = serde_json::to_vec(&config)?;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": { "mediaType": CONFIG_TYPE, "digest": sha256(&config), "size": config.len() },
            "layers": [{ "mediaType": LAYER_TYPE, "digest": layer_digest, "size": layer.len() }],
        }))?;
        let manifest_digest = sha256(&manifest);
        let tag = self
            .name
            .rsplit_once(':')
            .map(|(_, t)| t)
            .unwrap_or("latest");
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": MANIFEST_TYPE,
                "digest": manifest_digest,
                "size": manifest.len(),
                "platform": { "architecture": "amd64", "os": "linux" },
                "annotations": {
                    "io.containerd.image.name": self.name,
                    "org.opencontainers.image.ref.name": tag,
                },
            }],
        }))?;
        let mut files: BTreeMap<String, Entry> = BTreeMap::new();
        files.insert("blobs/".into(), Entry::Dir(0o755));
        files.insert("blobs/sha256/".into(), Entry::Dir(0o755));
        for blob in [layer, config, manifest] {
            let name = format!("blobs/sha256/{}", &sha256(&blob)["sha256:".len()..]);
            files.insert(
                name,
                Entry::File {
                    data: blob,
                    mode: 0o644,
                },
            );
        }
        let layout = br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec();
        files.insert(
            "oci-layout".into(),
            Entry::File {
                data: layout,
                mode: 0o644,
            },
        );
        files.insert(
            "index.json".into(),
            Entry::File {
                data: index,
                mode: 0o644,
            },
        );
        Ok((layer_tar(&files)?, manifest_digest))
    }

    /// The layer's entries: the ops applied in order (a later one replaces an earlier one
    /// at the same path), plus every missing parent directory.
    fn entries(&self) -> Result<BTreeMap<String, Entry>> {
        let mut out = BTreeMap::new();
        for op in &self.ops {
            match op {
                Op::File { host, dest, mode } => {
                    let data = std::fs::read(host)
                        .with_context(|| format!("reading {} for the image", host.display()))?;
                    let mode = *mode;
                    insert(&mut out, dest, Entry::File { data, mode })?;
                }
                Op::Symlink { dest, target } => {
                    insert(&mut out, dest, Entry::Symlink(target.clone()))?
                }
                Op::Dir { dest } => insert(&mut out, dest, Entry::Dir(0o755))?,
                Op::Tree { host, dest } => add_tree(&mut out, host, dest)?,
            }
        }
        Ok(out)
    }
}

/// `sha256:<hex>` of `data`.
fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

/// Image path `dest` (absolute) as a tar path: no leading `/`, directories end in `/`.
fn tar_path(dest: &str, is_dir: bool) -> Result<String> {
    let Some(rel) = dest.strip_prefix('/') else {
        bail!("image path {dest:?} is not absolute");
    };
    let rel = rel.trim_end_matches('/');
    if rel
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        bail!("image path {dest:?} is not a plain absolute path");
    }
    Ok(if is_dir {
        format!("{rel}/")
    } else {
        rel.to_string()
    })
}

fn insert(out: &mut BTreeMap<String, Entry>, dest: &str, entry: Entry) -> Result<()> {
    let path = tar_path(dest, matches!(entry, Entry::Dir(_)))?;
    // Parents first: `a/`, `a/b/`, ... (directories the layer would otherwise lack).
    let mut parent = String::new();
    for comp in path
        .trim_end_matches('/')
        .split('/')
        .collect::<Vec<_>>()
        .iter()
        .rev()
        .skip(1)
        .rev()
    {
        parent.push_str(comp);
        parent.push('/');
        out.entry(parent.clone()).or_insert(Entry::Dir(0o755));
    }
    // A file replaces a file, not a directory's `x/` entry; drop the other form.
    let other = match path.strip_suffix('/') {
        Some(p) => p.to_string(),
        None => format!("{path}/"),
    };
    out.remove(&other);
    out.insert(path, entry);
    Ok(())
}

fn add_tree(out: &mut BTreeMap<String, Entry>, host: &Path, dest: &str) -> Result<()> {
    let meta = std::fs::symlink_metadata(host)
        .with_context(|| format!("reading {} for the image", host.display()))?;
    let join = |name: &std::ffi::OsStr| {
        format!("{}/{}", dest.trim_end_matches('/'), name.to_string_lossy())
    };
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o7777;
    if meta.is_dir() {
        if dest != "/" {
            insert(out, dest, Entry::Dir(mode))?;
        }
        let mut children: Vec<_> = std::fs::read_dir(host)
            .with_context(|| format!("listing {}", host.display()))?
            .collect::<std::io::Result<_>>()?;
        children.sort_by_key(|e| e.file_name());
        for child in children {
            add_tree(out, &child.path(), &join(&child.file_name()))?;
        }
    } else if meta.file_type().is_symlink() {
        let target = std::fs::read_link(host)?;
        insert(
            out,
            dest,
            Entry::Symlink(target.to_string_lossy().into_owned()),
        )?;
    } else if meta.is_file() {
        let data = std::fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        insert(out, dest, Entry::File { data, mode })?;
    } else {
        bail!("{} is not a file, directory or symlink", host.display());
    }
    Ok(())
}

/// A tar of `entries` (already in path order) with fixed metadata.
fn layer_tar(entries: &BTreeMap<String, Entry>) -> Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, entry) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        match entry {
            Entry::File { data, mode } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                tar.append_data(&mut h, path, data.as_slice())?;
            }
            Entry::Dir(mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                tar.append_data(&mut h, path, std::io::empty())?;
            }
            Entry::Symlink(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                tar.append_link(&mut h, path, target)?;
            }
        }
    }
    Ok(tar.into_inner()?)
}

/// Compiles `c_source` into the static binary `dir/NAME` (`gcc -static -O2`, the
/// source kept beside it as `NAME.c`): a test workload whose image or bundle needs
/// nothing else.
pub fn static_binary(dir: &Path, name: &str, c_source: &str) -> Result<PathBuf> {
    let src = dir.join(format!("{name}.c"));
    let bin = dir.join(name);
    std::fs::write(&src, c_source).with_context(|| format!("writing {}", src.display()))?;
    let out = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .context("running gcc (scripts/install-deps.sh installs gcc and libc6-dev)")?;
    if !out.status.success() {
        bail!(
            "gcc -static {name}.c: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(bin)
}

/// Adds `binary` and every shared library `ldd` lists for it (and the dynamic loader), at the same paths.
pub fn add_with_libs(b: &mut ImageBuilder, binary: &Path, dest: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(binary)
        .with_context(|| format!("reading {}", binary.display()))?
        .permissions()
        .mode()
        & 0o7777;
    b.file(binary, dest, mode);
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable": a static binary needs nothing else.
        let err = String::from_utf8_lossy(&out.stderr);
        if text.contains("statically linked") || err.contains("not a dynamic executable") {
            return Ok(());
        }
        bail!("ldd {}: {}", binary.display(), err.trim());
    }
    for lib in ldd_paths(&text) {
        let mode = std::fs::metadata(&lib)
            .with_context(|| format!("reading {lib} (needed by {})", binary.display()))?
            .permissions()
            .mode()
            & 0o7777;
        b.file(Path::new(&lib), &lib, mode);
    }
    Ok(())
}

/// The absolute paths in `ldd` output: `libc.so.6 => /lib/.../libc.so.6 (0x..)` and the
/// loader's `/lib64/ld-linux-x86-64.so.2 (0x..)`; the vDSO has none.
fn ldd_paths(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = line.split_once("=>").map(|(_, r)| r.trim()).unwrap_or(line);
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| path.to_string())
        })
        .collect()
}

pub mod ferry;
mod images;
pub use images::{BUSYBOX_IMAGE, PAUSE_IMAGE, busybox_image, pause_binary, pause_image};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_parsed() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f)\n\t/lib64/ld-linux-x86-64.so.2 (0x7f)\n";
        assert_eq!(
            ldd_paths(text),
            [
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }

    #[test]
    fn archive_is_deterministic_and_sorted() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"hello").unwrap();
        let mut b = ImageBuilder::new("docker.io/library/t:ferry");
        b.file(&f, "/z/f", 0o644)
            .dir("/a")
            .symlink("/b/l", "../z/f")
            .entrypoint(&["/z/f"]);
        let (one, d1) = b.build().unwrap();
        let (two, d2) = b.build().unwrap();
        assert_eq!((one.clone(), d1.clone()), (two, d2));
        assert!(d1.starts_with("sha256:") && d1.len() == 71);
        let entries = b.entries().unwrap();
        let paths: Vec<_> = entries.keys().cloned().collect();
        assert_eq!(paths, ["a/", "b/", "b/l", "z/", "z/f"]);
        let mut archive = tar::Archive::new(one.as_slice());
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert!(names.contains(&"index.json".to_string()));
        assert!(names.contains(&format!("blobs/sha256/{}", &d1[7..])));
    }

    #[test]
    fn tree_keeps_modes_and_symlinks() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let exe = dir.path().join("sub/run");
        std::fs::write(&exe, b"#!/bin/sh").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o750)).unwrap();
        std::os::unix::fs::symlink("sub/run", dir.path().join("link")).unwrap();
        let mut b = ImageBuilder::new("t:x");
        b.tree(dir.path(), "/opt/app");
        let e = b.entries().unwrap();
        let keys: Vec<_> = e.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "opt/",
                "opt/app/",
                "opt/app/link",
                "opt/app/sub/",
                "opt/app/sub/run"
            ]
        );
        assert!(matches!(
            &e["opt/app/sub/run"],
            Entry::File { mode: 0o750, .. }
        ));
        assert!(matches!(&e["opt/app/link"], Entry::Symlink(t) if t == "sub/run"));
    }

    #[test]
    fn dynamic_binary_brings_its_libraries() {
        let mut b = ImageBuilder::new("t:x");
        add_with_libs(&mut b, Path::new("/bin/ls"), "/bin/ls").unwrap();
        let e = b.entries().unwrap();
        assert!(e.contains_key("bin/ls"));
        assert!(
            e.keys().any(|k| k.ends_with("/libc.so.6")),
            "{:?}",
            e.keys()
        );
        assert!(e.keys().any(|k| k.contains("ld-linux")), "{:?}", e.keys());
    }

    #[test]
    fn relative_paths_rejected() {
        let mut b = ImageBuilder::new("x:y");
        b.dir("tmp");
        assert!(b.entries().is_err());
    }
}
