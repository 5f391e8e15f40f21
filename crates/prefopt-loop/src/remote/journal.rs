//! Requests to a server, many at once, with every answer kept on disk as it arrives: a
//! stage killed midway (or stopped by a server that died) is rerun with the same command
//! and asks only for what is not answered yet.
//!
//! The journal is a JSON Lines file, one answer per line, appended and flushed under a lock.
//! A line cut by a kill, or one that no longer fits the stage (`keep` refuses it), is
//! ignored, and the rerun's first append starts on a line of its own.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Runs `job(i)` for each `i` in `0..n` whose answer is not in the journal at `path` (none:
/// keep nothing), `concurrency` at a time, appending each answer to the journal as it arrives. `keep(a)`
/// says which job a journalled answer belongs to (`None`: not usable). Returns the `n`
/// answers in order, or the first error (the answers so far stay in the journal).
/// `progress` hears (jobs done, n), resumed ones included.
pub fn run_journaled<A, E>(
    path: Option<&Path>,
    n: usize,
    concurrency: usize,
    keep: impl Fn(&A) -> Option<usize>,
    job: impl Fn(usize) -> Result<A, E> + Sync,
    progress: &mut (dyn FnMut(usize, usize) + Send),
) -> Result<Vec<A>, E>
where
    A: Serialize + DeserializeOwned + Send,
    E: From<prefopt_fs::FsError> + Send,
{
    let mut answers: Vec<Option<A>> = (0..n).map(|_| None).collect();
    for a in path.map(read_journal::<A>).unwrap_or_default() {
        if let Some(i) = keep(&a).filter(|&i| i < n) {
            answers[i] = Some(a);
        }
    }
    let todo: Vec<usize> = (0..n).filter(|&i| answers[i].is_none()).collect();
    let done = AtomicUsize::new(n - todo.len());
    let next = AtomicUsize::new(0);
    let shown = path.unwrap_or(Path::new("(no journal)"));
    let io = |e: std::io::Error| E::from(prefopt_fs::FsError::io(shown, e));
    let mut file = match path {
        Some(path) => Some(std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(io)?),
        None => None,
    };
    // A line cut by a kill ends the file without a newline: start the next one on its own.
    if let (Some(file), Some(path)) = (&mut file, path) {
        if std::fs::read(path).is_ok_and(|b| b.last().is_some_and(|&c| c != b'\n')) {
            writeln!(file).map_err(io)?;
        }
    }
    let shared = Mutex::new((file, answers, progress));
    let first_error: Mutex<Option<E>> = Mutex::new(None);
    let poisoned = || E::from(prefopt_fs::FsError::io(shown, "a worker panicked while holding the journal"));
    std::thread::scope(|s| {
        for _ in 0..concurrency.clamp(1, todo.len().max(1)) {
            s.spawn(|| loop {
                if first_error.lock().map(|e| e.is_some()).unwrap_or(true) {
                    return;
                }
                let k = next.fetch_add(1, Ordering::SeqCst);
                let Some(&i) = todo.get(k) else { return };
                let result = job(i).and_then(|answer| {
                    let mut guard = shared.lock().map_err(|_| poisoned())?;
                    let (file, answers, progress) = &mut *guard;
                    if let Some(file) = file {
                        let line = serde_json::to_string(&answer).map_err(|e| io(e.into()))?;
                        writeln!(file, "{line}").and_then(|()| file.flush()).map_err(io)?;
                    }
                    answers[i] = Some(answer);
                    progress(done.fetch_add(1, Ordering::SeqCst) + 1, n);
                    Ok(())
                });
                if let Err(e) = result {
                    if let Ok(mut slot) = first_error.lock() {
                        slot.get_or_insert(e);
                    }
                    return;
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().ok().flatten() {
        return Err(e);
    }
    let (_, answers, _) = shared.into_inner().map_err(|_| poisoned())?;
    Ok(answers.into_iter().flatten().collect())
}

/// The answers an interrupted stage kept; a torn or unreadable line is skipped.
fn read_journal<A: DeserializeOwned>(path: &Path) -> Vec<A> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}
