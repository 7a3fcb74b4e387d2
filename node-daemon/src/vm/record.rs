//! What a VM source keeps on disk, `<state>/vm-out/<migration>.json`, from the start of
//! an outgoing migration until finalize or abort. QEMU and its launcher outlive a
//! daemon restart (they belong to the VM's Pod); only the daemon's memory of the
//! migration dies with it. From the record a restarted daemon still finds the guest, so
//! Abort resumes it (a Cold source is paused and would otherwise stay so: zero running
//! copies) and Finalize leaves it for its Pod's deletion. The directory is the daemon's
//! own (root only), never the VM's.
use crate::validate;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceRecord {
    /// The guest's registry directory (`<vm root>/<pod uid>`).
    pub dir: PathBuf,
    /// False once post-copy started: the source can no longer resume.
    pub resumable: bool,
}

pub struct Records {
    dir: PathBuf,
}

impl Records {
    pub fn new(dir: PathBuf) -> Records {
        Records { dir }
    }

    fn name(migration_id: &str) -> String {
        format!("{migration_id}.json")
    }

    /// Replaces the record atomically (a crash leaves the old or the new one).
    pub fn write(&self, migration_id: &str, r: &SourceRecord) -> io::Result<()> {
        let body = serde_json::to_vec(r).expect("record serializes");
        crate::atomic::write_file(&self.dir, &Self::name(migration_id), &body)
    }

    pub fn remove(&self, migration_id: &str) {
        let _ = std::fs::remove_file(self.dir.join(Self::name(migration_id)));
    }

    /// Every record a previous run left, by migration id; unreadable ones are logged
    /// and skipped (nothing can be done for them but a person's look).
    pub fn load(&self) -> Vec<(String, SourceRecord)> {
        let mut found = Vec::new();
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let path = e.path();
            let Some(id) = recorded_id(&path) else {
                continue;
            };
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_slice(&t).map_err(|e| e.to_string()))
            {
                Ok(r) => found.push((id, r)),
                Err(err) => {
                    tracing::error!(path = %path.display(), error = %err, "unreadable VM source record")
                }
            }
        }
        found
    }
}

/// `<id>.json` with a valid migration id, else nothing (temp files, strays).
fn recorded_id(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let id = name.strip_suffix(".json")?;
    validate::migration_id("migration_id", id).ok()?;
    Some(id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_as_written_and_strays_are_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let rs = Records::new(tmp.path().join("vm-out"));
        assert!(rs.load().is_empty(), "no directory yet: nothing recovered");
        let r = SourceRecord {
            dir: "/vms/uid-1".into(),
            resumable: true,
        };
        rs.write("m-1", &r).unwrap();
        rs.write(
            "m-2",
            &SourceRecord {
                resumable: false,
                ..r.clone()
            },
        )
        .unwrap();
        std::fs::write(tmp.path().join("vm-out/.m-3.json.tmp"), b"{").unwrap();
        std::fs::write(tmp.path().join("vm-out/bad.json"), b"{").unwrap();
        std::fs::write(tmp.path().join("vm-out/..json"), b"{}").unwrap();
        let mut got = rs.load();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            got,
            vec![
                ("m-1".to_string(), r.clone()),
                (
                    "m-2".to_string(),
                    SourceRecord {
                        resumable: false,
                        ..r
                    }
                )
            ]
        );
        rs.remove("m-1");
        assert_eq!(rs.load().len(), 1);
    }
}
