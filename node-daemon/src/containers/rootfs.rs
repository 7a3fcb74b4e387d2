//! A container's writable layer, moved between nodes: CRIU images hold memory and
//! kernel state, not the files a container wrote. On the source the layer is the
//! overlay upper dir of the rootfs containerd mounted; on the target the wrapper applies
//! it to the fresh rootfs containerd mounted from the same image, before `runc restore`.
//!
//! The diff is a tar of the upper dir's files (paths relative to the rootfs) plus a
//! list of the paths the source deleted (overlay whiteouts), as in the kubelet's
//! checkpoint archives (`rootfs-diff.tar`, `deleted.files`). Opaque directories (a
//! directory removed and created again) are copied as plain directories: the lower
//! layers' files under them reappear at the target.
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};

/// The overlay upper dir of the filesystem mounted at `mount_point`, from a
/// mountinfo text (`/proc/self/mountinfo`).
pub fn overlay_upper_dir(mountinfo: &str, mount_point: &Path) -> Option<PathBuf> {
    let want = mount_point.to_string_lossy();
    mountinfo
        .lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let point = pre.split_whitespace().nth(4)?;
            let mut post = post.split_whitespace();
            let fstype = post.next()?;
            let _source = post.next()?;
            let opts = post.next()?;
            (unescape(point) == want && fstype == "overlay").then_some(opts)
        })
        .next_back()?
        .split(',')
        .find_map(|o| o.strip_prefix("upperdir="))
        .map(|p| PathBuf::from(unescape(p)))
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// What [`write_diff`] produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DiffStats {
    pub entries: u64,
    pub deleted: u64,
}

/// Bytes of the regular files under `dir` (symlinks not followed): what its diff carries.
pub fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) if m.is_file() => total += m.len(),
                _ => {}
            }
        }
    }
    total
}

/// Writes the upper dir as `diff_tar` and its whiteouts as `deleted_list`.
pub fn write_diff(upper: &Path, diff_tar: &Path, deleted_list: &Path) -> io::Result<DiffStats> {
    let mut b = tar::Builder::new(std::fs::File::create(diff_tar)?);
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    let mut deleted = String::new();
    let mut stats = DiffStats::default();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(upper.join(&rel))?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let rel = rel.join(e.file_name());
            let meta = std::fs::symlink_metadata(e.path())?;
            let ft = meta.file_type();
            if ft.is_char_device() && std::os::unix::fs::MetadataExt::rdev(&meta) == 0 {
                deleted.push_str(&rel.to_string_lossy());
                deleted.push('\n');
                stats.deleted += 1;
                continue;
            }
            if ft.is_dir() {
                b.append_dir(&rel, e.path())?;
                stack.push(rel);
            } else if ft.is_file() || ft.is_symlink() {
                b.append_path_with_name(e.path(), &rel)?;
            } else {
                continue; // sockets, fifos, devices: recreated by the workload, not copied
            }
            stats.entries += 1;
        }
    }
    b.into_inner()?.sync_all()?;
    std::fs::write(deleted_list, deleted)?;
    Ok(stats)
}

/// A relative path of plain components, or None (absolute, `..`, empty).
fn relative(p: &str) -> Option<PathBuf> {
    let p = Path::new(p.trim_start_matches("./"));
    let ok = !p.as_os_str().is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    ok.then(|| p.to_path_buf())
}

/// True when no directory between `root` and `root/rel` is a symlink, so removing
/// `root/rel` cannot reach outside `root`.
fn no_symlink_parents(root: &Path, rel: &Path) -> bool {
    let mut p = root.to_path_buf();
    let comps: Vec<_> = rel.components().collect();
    for c in &comps[..comps.len().saturating_sub(1)] {
        p.push(c);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => return false,
            Ok(_) => {}
            Err(_) => return true, // nothing there: nothing to remove either
        }
    }
    true
}

/// Applies a diff written by [`write_diff`] to `rootfs`: deletes what the source
/// deleted, then unpacks the files; nothing lands outside `rootfs` (paths with `..`,
/// absolute paths and links out are refused), device nodes are skipped. Missing diff
/// files mean an empty diff.
pub fn apply_diff(rootfs: &Path, diff_tar: &Path, deleted_list: &Path) -> io::Result<()> {
    if let Ok(list) = std::fs::read_to_string(deleted_list) {
        for line in list.lines().filter(|l| !l.is_empty()) {
            let Some(rel) = relative(line) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("deleted path {line:?} is not a plain relative path"),
                ));
            };
            if !no_symlink_parents(rootfs, &rel) {
                continue;
            }
            let p = rootfs.join(&rel);
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p)?,
                Ok(_) => std::fs::remove_file(&p)?,
                Err(_) => {}
            }
        }
    }
    let file = match std::fs::File::open(diff_tar) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut archive = tar::Archive::new(file);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    for entry in archive.entries()? {
        let mut entry = entry?;
        use tar::EntryType as T;
        if !matches!(
            entry.header().entry_type(),
            T::Regular | T::Directory | T::Symlink | T::Link | T::Continuous
        ) {
            continue;
        }
        let path = entry.path()?.into_owned();
        if relative(&path.to_string_lossy()).is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("diff entry {} is not a plain relative path", path.display()),
            ));
        }
        // unpack_in refuses entries whose parent resolves outside `rootfs`.
        if !entry.unpack_in(rootfs)? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "diff entry {} would land outside the rootfs",
                    path.display()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_upper_dir_of_a_rootfs_mount() {
        let mi = "25 1 0:22 / / rw - ext4 /dev/vda rw\n\
            910 25 0:80 / /run/c/k8s.io/abc/rootfs rw,relatime - overlay overlay rw,lowerdir=/l1:/l2,upperdir=/s/snapshots/12/fs,workdir=/s/snapshots/12/work\n";
        assert_eq!(
            overlay_upper_dir(mi, Path::new("/run/c/k8s.io/abc/rootfs")),
            Some(PathBuf::from("/s/snapshots/12/fs"))
        );
        assert_eq!(overlay_upper_dir(mi, Path::new("/other")), None);
    }

    #[test]
    fn diff_round_trip_keeps_files_and_deletions() {
        let d = tempfile::tempdir().unwrap();
        let upper = d.path().join("upper");
        std::fs::create_dir_all(upper.join("data/sub")).unwrap();
        std::fs::write(upper.join("data/count.log"), "1\n2\n").unwrap();
        std::os::unix::fs::symlink("count.log", upper.join("data/link")).unwrap();
        std::fs::write(d.path().join("deleted.in"), "etc/motd\n").unwrap();
        let (tar, del) = (d.path().join("diff.tar"), d.path().join("deleted"));
        let stats = write_diff(&upper, &tar, &del).unwrap();
        assert_eq!(stats.entries, 4); // data, data/sub, data/count.log, data/link
        // The target rootfs: an image file the source deleted, plus a stale file.
        let root = d.path().join("rootfs");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/motd"), "hi").unwrap();
        std::fs::copy(d.path().join("deleted.in"), &del).unwrap();
        apply_diff(&root, &tar, &del).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("data/count.log")).unwrap(),
            "1\n2\n"
        );
        assert_eq!(
            std::fs::read_link(root.join("data/link")).unwrap(),
            Path::new("count.log")
        );
        assert!(!root.join("etc/motd").exists());
    }

    #[test]
    fn refuses_paths_that_leave_the_rootfs() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("rootfs");
        std::fs::create_dir_all(&root).unwrap();
        let del = d.path().join("deleted");
        std::fs::write(&del, "../outside\n").unwrap();
        assert!(apply_diff(&root, &d.path().join("none.tar"), &del).is_err());
        // A symlinked parent is never followed for deletion.
        std::fs::create_dir_all(d.path().join("victim")).unwrap();
        std::fs::write(d.path().join("victim/f"), "x").unwrap();
        std::os::unix::fs::symlink(d.path().join("victim"), root.join("ln")).unwrap();
        std::fs::write(&del, "ln/f\n").unwrap();
        apply_diff(&root, &d.path().join("none.tar"), &del).unwrap();
        assert!(d.path().join("victim/f").exists());
    }
}
