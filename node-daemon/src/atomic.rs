//! Files one process writes while another (or the writer's next run) may read them:
//! the daemon's source records, ferry-runtime's stage markers, a launcher's VM record.

use std::io;
use std::path::Path;

/// Writes `<dir>/<name>` through a temporary file and a rename, creating `dir`: a reader
/// sees the old file or the whole new one, never half of it.
pub fn write_file(dir: &Path, name: &str, body: &[u8]) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, body)?;
    std::fs::rename(tmp, dir.join(name))
}

/// Creates `<dir>/<name>` holding `body` unless it exists: `Ok(true)` when this call
/// created it, `Ok(false)` when another writer did first. Between processes this is a
/// decision only one side wins (a hard link fails on an existing name), and a reader
/// sees the whole body or no file.
pub fn create_once(dir: &Path, name: &str, body: &[u8]) -> io::Result<bool> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, body)?;
    let r = std::fs::hard_link(&tmp, dir.join(name));
    let _ = std::fs::remove_file(&tmp);
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_create_once_wins_and_its_body_stays() {
        let d = tempfile::tempdir().unwrap();
        assert!(create_once(d.path(), "decision", b"restore").unwrap());
        assert!(!create_once(d.path(), "decision", b"abort").unwrap());
        assert_eq!(
            std::fs::read(d.path().join("decision")).unwrap(),
            b"restore"
        );
        // No temporary file is left behind by either call.
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["decision"]);
    }
}
