//! Files written safely: every output of prefopt (a model folder, a checkpoint, a JSON Lines
//! stage of the online loop, a report) is written to a temporary sibling, synced, and renamed
//! into place, so a reader never sees a half-written file or folder and a failed write never
//! clobbers the previous result. Also the JSON and JSON Lines files the pipeline exchanges,
//! read back with errors that name the file and line.
//!
//! Not here: what goes into the files (model weights, metrics, records): the crates above
//! serialize those and hand the bytes or values down.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod lock;
pub use lock::OutputLock;

/// A file-system operation that failed, with the path it was about.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// Reading, writing, syncing or renaming `path` failed.
    #[error("{}: {message}", path.display())]
    Io { path: PathBuf, message: String },
    /// `path` is not valid JSON (or not the expected shape); `line` is 1-based for JSON Lines.
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Json { path: PathBuf, line: Option<usize>, message: String },
    /// Another run writes into `dir` ([`lock::OutputLock`]).
    #[error(
        "{}: another run is writing into this folder ({holder}); wait for it to finish, stop it, or use another output folder",
        dir.display()
    )]
    Locked { dir: PathBuf, holder: String },
}

impl FsError {
    /// An I/O error about `path`.
    pub fn io(path: &Path, err: impl std::fmt::Display) -> Self {
        FsError::Io { path: path.to_path_buf(), message: err.to_string() }
    }

    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            FsError::Io { path, .. } | FsError::Json { path, .. } => path,
            FsError::Locked { dir, .. } => dir,
        }
    }
}

pub type Result<T> = std::result::Result<T, FsError>;

/// Writes `bytes` to a temp file beside `path` (creating its folder), syncs it, then renames
/// it over `path`. On failure the temp file is removed and `path` is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| FsError::io(parent, format!("cannot create the folder: {e}")))?;
    }
    let tmp = sibling(path, "tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        FsError::io(path, e)
    })
}

/// Fills a fresh temp folder beside `dir` with `fill`, then moves it into place, replacing
/// any older `dir` only once the new one is complete. `fill`'s own error type passes through;
/// the file-system errors of this function convert into it.
pub fn write_dir_atomic<E: From<FsError>>(
    dir: &Path,
    fill: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let tmp = sibling(dir, "tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| FsError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| FsError::io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        let old = sibling(dir, "old");
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dir, &old).map_err(|e| FsError::io(dir, e))?;
        std::fs::rename(&tmp, dir).map_err(|e| FsError::io(dir, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, dir).map_err(|e| FsError::io(dir, e))?;
    }
    Ok(())
}

/// `.NAME.KIND-PID` in the same folder, so the final rename never crosses file systems.
/// Made fresh: the siblings a killed writer of `path` left behind are removed first.
fn sibling(path: &Path, kind: &str) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    remove_stale_siblings(path, &name);
    path.with_file_name(format!(".{name}.{kind}-{}", std::process::id()))
}

/// A writer killed mid-write (SIGKILL, power loss) leaves its `.NAME.tmp-PID` (or, between
/// the two renames of a folder, `.NAME.old-PID`) beside `path`; nothing reads them, but a
/// model folder's is as large as the model. Removed when their process no longer runs.
fn remove_stale_siblings(path: &Path, name: &str) {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        Some(_) => Path::new("."),
        None => return,
    };
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let of_path = [".tmp-", ".old-"].iter().any(|kind| file.starts_with(&format!(".{name}{kind}")));
        if of_path && is_stale_temp(&file) {
            remove_entry(&entry.path());
        }
    }
}

/// Every stale temporary (see [`remove_stale_siblings`]) anywhere under `dir`: what killed
/// runs left in a folder that a new run now holds ([`OutputLock::acquire`]), including the
/// temporaries of outputs that will not be written again.
pub fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if is_stale_temp(&entry.file_name().to_string_lossy()) {
            remove_entry(&path);
        } else if path.is_dir() && !path.is_symlink() {
            remove_stale_temps(&path);
        }
    }
}

/// `.NAME.tmp-PID` or `.NAME.old-PID` whose process no longer runs (on Linux, where `/proc`
/// says; elsewhere nothing counts as stale).
fn is_stale_temp(file: &str) -> bool {
    if !file.starts_with('.') || !Path::new("/proc/self").exists() {
        return false;
    }
    let Some((_, pid)) = file.rsplit_once(".tmp-").or_else(|| file.rsplit_once(".old-")) else { return false };
    !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
        && pid != std::process::id().to_string()
        && !Path::new("/proc").join(pid).exists()
}

fn remove_entry(path: &Path) {
    let _ = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
}

/// Removes `path`; a file that is not there is not an error.
pub fn remove_file_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FsError::io(path, e)),
    }
}

/// Writes `value` as pretty-printed JSON, atomically.
pub fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| FsError::io(path, e))?;
    write_atomic(path, text.as_bytes())
}

/// Reads a JSON file into `T`; errors name the file.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| FsError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| FsError::Json {
        path: path.to_path_buf(),
        line: None,
        message: e.to_string(),
    })
}

/// Writes one JSON object per line, atomically.
pub fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut text = String::new();
    for row in rows {
        text.push_str(&serde_json::to_string(row).map_err(|e| FsError::io(path, e))?);
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())
}

/// Reads one JSON value per non-blank line; errors name the file and the line.
pub fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).map_err(|e| FsError::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| FsError::Json {
                path: path.to_path_buf(),
                line: Some(i + 1),
                message: e.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_killed_writer_left_is_removed_by_the_next_write_and_a_live_ones_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let (path, dir) = (tmp.path().join("a.json"), tmp.path().join("final"));
        // A pid no process has (above Linux's pid_max), and pid 1, which always runs.
        for stale in [".a.json.tmp-999999999", ".final.old-999999999", ".a.json.tmp-1"] {
            std::fs::write(tmp.path().join(stale), b"half").unwrap();
        }
        std::fs::create_dir(tmp.path().join(".final.tmp-999999999")).unwrap();
        write_json(&path, &serde_json::json!({"a": 1})).unwrap();
        write_dir_atomic::<FsError>(&dir, |d| write_atomic(&d.join("x"), b"x")).unwrap();
        let mut names: Vec<String> =
            std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        names.sort();
        let expected = if Path::new("/proc/self").exists() {
            vec![".a.json.tmp-1", "a.json", "final"]
        } else {
            vec![
                ".a.json.tmp-1",
                ".a.json.tmp-999999999",
                ".final.old-999999999",
                ".final.tmp-999999999",
                "a.json",
                "final",
            ]
        };
        assert_eq!(names, expected);
    }

    #[test]
    fn a_failed_folder_fill_keeps_the_old_folder_and_leaves_no_temp() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("final");
        write_dir_atomic::<FsError>(&dir, |d| write_atomic(&d.join("a.txt"), b"one")).unwrap();
        let failed = write_dir_atomic::<FsError>(&dir, |d| {
            write_atomic(&d.join("a.txt"), b"two")?;
            Err(FsError::io(d, "disk full"))
        });
        assert!(failed.unwrap_err().to_string().ends_with("disk full"));
        assert_eq!(std::fs::read(dir.join("a.txt")).unwrap(), b"one");
        let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("final")]);
    }

    #[test]
    fn a_failed_write_names_the_file_and_keeps_the_old_one() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("out.json");
        write_json(&path, &serde_json::json!({"a": 1})).unwrap();
        // A folder in the way of the temp file's rename target cannot be replaced by a file.
        let blocked = tmp.path().join("blocked");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("x"), b"").unwrap();
        let err = write_atomic(&blocked, b"data").unwrap_err();
        assert_eq!(err.path(), blocked.as_path());
        assert_eq!(read_json::<serde_json::Value>(&path).unwrap(), serde_json::json!({"a": 1}));
    }

    #[test]
    fn jsonl_round_trips_and_a_bad_line_names_file_and_line() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("rows.jsonl");
        write_jsonl(&path, &[serde_json::json!({"a": 1}), serde_json::json!({"a": 2})]).unwrap();
        let rows: Vec<serde_json::Value> = read_jsonl(&path).unwrap();
        assert_eq!(rows.len(), 2);
        std::fs::write(&path, "{\"a\": 1}\n\n{\"a\": \n").unwrap();
        let err = read_jsonl::<serde_json::Value>(&path).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}:3: ", path.display())), "{err}");
    }
}
