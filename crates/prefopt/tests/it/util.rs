//! Helpers shared by the test modules: the binary, the fixtures, outputs and files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// The repository's `fixtures/` folder.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// The `prefopt` binary under test, as a command to add arguments to.
pub fn prefopt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_prefopt"))
}

/// Runs `prefopt` with `args` to completion.
pub fn run_prefopt(args: &[&str]) -> Output {
    prefopt().args(args).output().expect("running prefopt")
}

/// Asserts that a run succeeded (showing its stderr otherwise) and returns it.
pub fn ok(output: Output) -> Output {
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    output
}

/// Asserts that a run failed with an error, not a panic, and returns its stderr.
pub fn failure(output: Output) -> String {
    assert!(!output.status.success(), "expected failure; stderr: {}", String::from_utf8_lossy(&output.stderr));
    let err = stderr(&output);
    assert!(output.status.code().is_some(), "died by a signal ({:?}): {err}", output.status);
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// A run's stderr as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A file's text; the panic names the file.
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The JSON values of a JSON Lines file.
pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    read(path).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Every file under `dir`, relative, with its bytes (`dir`'s own path, which configs and
/// manifests record, written as `<out>`); `manifest.json` without the stage timings and the
/// run's timing files and lock left out (wall-clock, pid).
pub fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name == "train_results.json" || name == ".prefopt.lock" {
                continue;
            }
            let mut bytes = std::fs::read(&path).unwrap();
            if name.ends_with(".json") || name.ends_with(".jsonl") {
                let text = String::from_utf8(bytes).unwrap();
                bytes = text.replace(&dir.display().to_string(), "<out>").into_bytes();
            }
            if name == "manifest.json" || name == "summary.json" {
                let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                strip_timings(&mut v);
                bytes = v.to_string().into_bytes();
            }
            out.push((rel, bytes));
        }
    }
    out.sort();
    out
}

fn strip_timings(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            map.remove("wall_s");
            map.values_mut().for_each(strip_timings);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_timings),
        _ => {}
    }
}

/// Seeded delays in [0, 30) ms (a 64-bit LCG).
fn delays(seed: u64) -> impl Iterator<Item = Duration> {
    let mut x = seed;
    std::iter::repeat_with(move || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        Duration::from_micros((x >> 33) % 30_000)
    })
}

/// Files (and folders) under `dir`.
fn count_entries(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.flatten().map(|e| 1 + if e.path().is_dir() { count_entries(&e.path()) } else { 0 }).sum()
}

/// Runs `args` again and again, each run killed (SIGKILL) a seeded 0-30 ms after it has
/// added `every` files or folders to `out` (so every killed run has made progress, and the
/// kills land all along the run, whatever the machine's speed), until a run finishes by
/// itself; returns how many runs were killed.
pub fn run_with_kills(args: &[&str], out: &Path, seed: u64, every: usize) -> usize {
    let mut killed = 0;
    for delay in delays(seed).take(200) {
        let before = count_entries(out) + every - 1;
        let log = out.with_extension("stderr.log");
        let stderr_file = std::fs::File::create(&log).unwrap();
        let mut child = prefopt().args(args).stdout(Stdio::null()).stderr(stderr_file).spawn().unwrap();
        while count_entries(out) <= before && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_micros(200));
        }
        std::thread::sleep(delay);
        if let Some(status) = child.try_wait().unwrap() {
            // A run that ends by itself after the kills before it must have succeeded.
            assert!(
                status.success(),
                "{args:?} failed after {killed} kills: {status}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        killed += 1;
    }
    ok(prefopt().args(args).output().unwrap());
    killed
}
