//! One writer per output folder: a run holds an exclusive lock on `<dir>/.prefopt.lock` for
//! as long as it writes there, so a second run into the same folder fails at once and names
//! the first one's pid and command line.
//!
//! The lock is the operating system's (`File::try_lock`, an advisory `flock` on Unix), not
//! the file's existence: the kernel releases it when the holder exits, however it exits, so
//! a run killed with SIGKILL leaves no lock that blocks the next one. The file stays; it
//! holds the holder's pid and command while it runs and is emptied when the holder finishes,
//! so a non-empty file that nobody holds is what a killed run left: the next run takes it
//! over and says so, and removes the temporaries killed writers left anywhere in the folder.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::{FsError, Result};

/// The lock file's name inside the output folder.
pub const LOCK_FILE: &str = ".prefopt.lock";

/// A held lock; dropping it (at the end of the run) releases it.
#[derive(Debug)]
pub struct OutputLock {
    file: File,
    dir: PathBuf,
    /// What a killed run left in the file, when this lock took it over.
    taken_over: Option<String>,
}

impl OutputLock {
    /// Takes the lock of `dir` (creating the folder), or fails with [`FsError::Locked`]
    /// naming the run that holds it.
    pub fn acquire(dir: &Path) -> Result<OutputLock> {
        std::fs::create_dir_all(dir).map_err(|e| FsError::io(dir, e))?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| FsError::io(&path, e))?;
        let mut previous = String::new();
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let _ = file.read_to_string(&mut previous);
                let holder = previous.trim();
                return Err(FsError::Locked {
                    dir: dir.to_path_buf(),
                    holder: if holder.is_empty() { "another prefopt run".into() } else { holder.to_string() },
                });
            }
            Err(TryLockError::Error(e)) => return Err(FsError::io(&path, format!("cannot lock: {e}"))),
        }
        file.read_to_string(&mut previous).map_err(|e| FsError::io(&path, e))?;
        let me = format!(
            "pid {} ({})",
            std::process::id(),
            std::env::args().collect::<Vec<_>>().join(" ").chars().take(300).collect::<String>()
        );
        let write = |file: &mut File| -> std::io::Result<()> {
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(me.as_bytes())?;
            file.sync_all()
        };
        write(&mut file).map_err(|e| FsError::io(&path, e))?;
        // The folder is ours now: what killed writers left in it goes.
        crate::remove_stale_temps(dir);
        let previous = previous.trim();
        let taken_over = (!previous.is_empty()).then(|| previous.to_string());
        Ok(OutputLock { file, dir: dir.to_path_buf(), taken_over })
    }

    /// The holder a killed run left in the lock file, if this lock took one over.
    pub fn taken_over(&self) -> Option<&str> {
        self.taken_over.as_deref()
    }

    /// The line a run prints when it took over a killed run's lock (`None` when it did not).
    pub fn takeover_note(&self) -> Option<String> {
        let killed = self.taken_over()?;
        Some(format!("{}: took over the lock left by a run that did not finish ({killed})", self.dir.display()))
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Emptied while still held: an empty file is a run that finished.
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_fails_naming_the_holder_and_a_released_lock_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let first = OutputLock::acquire(dir.path()).unwrap();
        assert_eq!(first.taken_over(), None);
        let err = OutputLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        drop(first);
        assert_eq!(std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap(), "", "emptied on release");
        let again = OutputLock::acquire(dir.path()).unwrap();
        assert_eq!(again.taken_over(), None, "a finished run leaves nothing to take over");
    }

    #[test]
    fn a_killed_runs_lock_file_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        // What SIGKILL leaves: the file with its holder, and no lock (the kernel dropped it).
        std::fs::write(dir.path().join(LOCK_FILE), "pid 999999 (prefopt train)").unwrap();
        let lock = OutputLock::acquire(dir.path()).unwrap();
        assert_eq!(lock.taken_over(), Some("pid 999999 (prefopt train)"));
        let note = lock.takeover_note().unwrap();
        assert!(note.contains("took over the lock") && note.contains("pid 999999"), "{note}");
    }

    /// A temporary a killed writer left deep in the folder, of an output no stage writes
    /// again, goes when the next run takes the folder; a live writer's and real files stay.
    #[test]
    fn taking_the_folder_removes_what_killed_writers_left_anywhere_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("iter-1/train");
        std::fs::create_dir_all(deep.join(".final.tmp-999999999")).unwrap();
        for f in [".train_results.json.tmp-999999999", ".metrics.jsonl.tmp-1", "metrics.jsonl"] {
            std::fs::write(deep.join(f), b"x").unwrap();
        }
        let _lock = OutputLock::acquire(dir.path()).unwrap();
        let mut left: Vec<String> =
            std::fs::read_dir(&deep).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        left.sort();
        if Path::new("/proc/self").exists() {
            assert_eq!(left, [".metrics.jsonl.tmp-1", "metrics.jsonl"]);
        } else {
            assert_eq!(left.len(), 4, "{left:?}");
        }
    }
}
