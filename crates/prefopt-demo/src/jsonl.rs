//! JSON and JSON Lines files of the demo's outputs, written atomically.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::DemoError;

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), DemoError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| DemoError::io(path, e))?;
    prefopt_model::fsio::write_atomic(path, text.as_bytes())?;
    Ok(())
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, DemoError> {
    let text = std::fs::read_to_string(path).map_err(|e| DemoError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| DemoError::io(path, e))
}

pub fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<(), DemoError> {
    let mut text = String::new();
    for row in rows {
        text.push_str(&serde_json::to_string(row).map_err(|e| DemoError::io(path, e))?);
        text.push('\n');
    }
    prefopt_model::fsio::write_atomic(path, text.as_bytes())?;
    Ok(())
}

pub fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>, DemoError> {
    let text = std::fs::read_to_string(path).map_err(|e| DemoError::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| DemoError::io(path, format!("line {}: {e}", i + 1))))
        .collect()
}
