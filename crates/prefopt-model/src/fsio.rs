//! Atomic writes: a reader never sees a half-written file or folder.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{io_error, Result};

/// Writes `bytes` to a temp file beside `path`, syncs it, then renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = sibling(path, "tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_error(path, e)
    })
}

/// Fills a fresh temp folder beside `dir` with `fill`, then moves it into place, replacing
/// any older `dir` only once the new one is complete.
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = sibling(dir, "tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io_error(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io_error(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        let old = sibling(dir, "old");
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dir, &old).map_err(|e| io_error(dir, e))?;
        std::fs::rename(&tmp, dir).map_err(|e| io_error(dir, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, dir).map_err(|e| io_error(dir, e))?;
    }
    Ok(())
}

/// `.NAME.KIND-PID` in the same folder, so the final rename never crosses file systems.
fn sibling(path: &Path, kind: &str) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{kind}-{}", std::process::id()))
}
