//! Helpers shared by the test modules: the binary, the fixtures, outputs and files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
