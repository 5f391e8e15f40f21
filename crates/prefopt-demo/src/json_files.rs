//! JSON files of the demo's outputs (caches, recipe, summary), written atomically. JSON
//! Lines go through the loop's `write_jsonl` / `read_jsonl`.

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
