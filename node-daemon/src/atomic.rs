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
