//! Unpacks a received bundle into its stage dir, trusting nothing in it. A bundle is what
//! the source's `tar -c` of `images/`, `rootfs-diff.tar`, `deleted.files` and
//! `volumes/` made, so anything else is refused: only regular files and directories,
//! only those names (CRIU images one level below `images/`, `<emptyDir>.tar` one level
//! below `volumes/`), no absolute paths, no `..`, no links, no devices; every file lands
//! root-only (0600, directories 0700), never setuid, whatever the archive says; a path
//! that already exists as a link is not followed. The writable-layer diff inside
//! (`rootfs-diff.tar`) is the container's own and is applied later, inside the
//! container's rootfs only (`rootfs.rs`); an emptyDir tar only inside the target Pod's
//! emptyDir (`volumes.rs`).
//!
//! The stream's digest is checked when the transfer reaches its end (`wire.rs`): the
//! reader is drained after the archive's end marker so that a corrupt or truncated
//! stream fails here, before the stage is ever marked ready.
use super::{staging, volumes};
use std::fs::{DirBuilder, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

/// Unpacks `reader` below `dest`; returns the bytes of file content written.
pub fn unpack(dest: &Path, reader: impl Read) -> Result<u64, String> {
    let mut archive = tar::Archive::new(reader);
    let mut written = 0;
    for entry in archive
        .entries()
        .map_err(|e| format!("reading the bundle: {e}"))?
    {
        let mut entry = entry.map_err(|e| format!("reading the bundle: {e}"))?;
        let path = entry
            .path()
            .map_err(|e| format!("a bundle entry has an unreadable path: {e}"))?
            .into_owned();
        let kind = entry.header().entry_type();
        let target = allowed(&path, kind.is_dir())?;
        let out = dest.join(&target);
        if kind.is_dir() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&out)
                .map_err(|e| format!("creating {}: {e}", out.display()))?;
        } else if kind.is_file() {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
                .open(&out)
                .map_err(|e| format!("writing {}: {e}", out.display()))?;
            written += io::copy(&mut entry, &mut f)
                .map_err(|e| format!("writing {}: {e}", out.display()))?;
        } else {
            return Err(format!(
                "bundle entry {} is a {kind:?}: only regular files and directories may arrive",
                path.display()
            ));
        }
    }
    // Past the end marker: read to the end so the transfer checks the stream's digest.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink())
        .map_err(|e| format!("the bundle stream failed its check: {e}"))?;
    Ok(written)
}

/// The path below the stage dir an entry may take, or why it may not.
fn allowed(path: &Path, dir: bool) -> Result<PathBuf, String> {
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::CurDir => {}
            _ => {
                return Err(format!(
                    "bundle entry {} leaves its directory: only relative paths without `..`",
                    path.display()
                ));
            }
        }
    }
    let ok = match parts.as_slice() {
        [top] if top == staging::IMAGES => dir,
        [top] if top == staging::ROOTFS_DIFF || top == staging::DELETED => !dir,
        [top, _image] if top == staging::IMAGES => !dir,
        [top] if top == volumes::VOLUMES => dir,
        [top, tar] if top == volumes::VOLUMES => {
            !dir && tar
                .strip_suffix(".tar")
                .is_some_and(staging::safe_component)
        }
        _ => false,
    };
    if !ok {
        return Err(format!(
            "unexpected bundle entry {}{}: a bundle holds {}/ (CRIU's image files), {}, {} \
             and {}/<emptyDir>.tar",
            path.display(),
            if dir { "/" } else { "" },
            staging::IMAGES,
            staging::ROOTFS_DIFF,
            staging::DELETED,
            volumes::VOLUMES,
        ));
    }
    Ok(parts.iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn entry(
        b: &mut tar::Builder<Vec<u8>>,
        path: &str,
        kind: tar::EntryType,
        mode: u32,
        data: &[u8],
    ) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        // Raw bytes: `set_path` itself refuses `..`, a hostile sender does not.
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn bundle(extra: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        entry(&mut b, "images/", tar::EntryType::Directory, 0o755, b"");
        entry(
            &mut b,
            "images/pstree.img",
            tar::EntryType::Regular,
            0o4755,
            b"tree",
        );
        entry(
            &mut b,
            "rootfs-diff.tar",
            tar::EntryType::Regular,
            0o644,
            b"diff",
        );
        entry(&mut b, "deleted.files", tar::EntryType::Regular, 0o644, b"");
        extra(&mut b);
        b.into_inner().unwrap()
    }

    #[test]
    fn a_bundle_unpacks_root_only_and_never_setuid() {
        let d = tempfile::tempdir().unwrap();
        let n = unpack(d.path(), &bundle(|_| {})[..]).unwrap();
        assert_eq!(n, 8);
        let img = d.path().join("images/pstree.img");
        assert_eq!(std::fs::read(&img).unwrap(), b"tree");
        let mode = std::fs::metadata(&img).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600, "setuid or group bits survived: {mode:o}");
    }

    #[test]
    fn emptydir_tars_arrive_below_volumes() {
        let d = tempfile::tempdir().unwrap();
        let data = bundle(|b| {
            entry(b, "volumes/", tar::EntryType::Directory, 0o755, b"");
            entry(
                b,
                "volumes/scratch.tar",
                tar::EntryType::Regular,
                0o644,
                b"t",
            );
        });
        unpack(d.path(), &data[..]).unwrap();
        assert_eq!(
            std::fs::read(d.path().join("volumes/scratch.tar")).unwrap(),
            b"t"
        );
    }

    #[test]
    fn hostile_entries_are_refused_and_nothing_lands_outside() {
        let cases: [(&str, tar::EntryType, &str); 9] = [
            (
                "volumes/notatar",
                tar::EntryType::Regular,
                "unexpected bundle entry",
            ),
            (
                "volumes/sub/x.tar",
                tar::EntryType::Regular,
                "unexpected bundle entry",
            ),
            ("../escape", tar::EntryType::Regular, "leaves its directory"),
            (
                "/etc/passwd",
                tar::EntryType::Regular,
                "leaves its directory",
            ),
            (
                "images/../../escape",
                tar::EntryType::Regular,
                "leaves its directory",
            ),
            ("images/link", tar::EntryType::Symlink, "only regular files"),
            ("images/dev", tar::EntryType::Char, "only regular files"),
            (
                "images/sub/deep.img",
                tar::EntryType::Regular,
                "unexpected bundle entry",
            ),
            (
                "config.json",
                tar::EntryType::Regular,
                "unexpected bundle entry",
            ),
        ];
        for (path, kind, want) in cases {
            let root = tempfile::tempdir().unwrap();
            let stage = root.path().join("stage");
            std::fs::create_dir(&stage).unwrap();
            let data = bundle(|b| entry(b, path, kind, 0o644, b"evil"));
            let err = unpack(&stage, &data[..]).expect_err(path);
            assert!(err.contains(want), "{path}: {err}");
            assert!(!root.path().join("escape").exists(), "{path}");
            let outside: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
            assert_eq!(
                outside.len(),
                1,
                "{path}: something landed beside the stage"
            );
        }
    }

    #[test]
    fn an_existing_link_in_the_stage_is_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let stage = root.path().join("stage");
        std::fs::create_dir_all(stage.join("images")).unwrap();
        let victim = root.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, stage.join("images/pstree.img")).unwrap();
        assert!(unpack(&stage, &bundle(|_| {})[..]).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }
}
