//! TensorBoard event files beside `metrics.jsonl` (`report_to = "tensorboard"`): the same
//! scalars at the same steps, under the tags transformers' `TensorBoardCallback` gives them
//! (`rewrite_logs`: `eval_loss` -> `eval/loss`, every other key `k` -> `train/k`; the `step`
//! key is the event's step, not a scalar), so a prefopt run and a TRL run sit side by side.
//!
//! The format is TensorFlow's: a file of records `u64 length (LE) | masked crc32c(length) |
//! data | masked crc32c(data)`, each data an `Event` protobuf; the first event carries the
//! file version, each later one a `Summary` of `simple_value` scalars. The file mirrors
//! `metrics.jsonl` line for line: appended as lines are, and rewritten from the kept lines
//! when a resumed run truncates the log, so it never holds steps the log does not.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use prefopt_fs::FsError;
use prost::Message;

/// `output_dir/runs/`, where transformers writes its event files (one folder per run there;
/// here one fixed file per output folder, so a resumed run continues it).
pub const EVENTS_DIR: &str = "runs";
/// TensorBoard reads any file whose name contains `tfevents`.
pub const EVENTS_FILE: &str = "events.out.tfevents.prefopt";

#[derive(Clone, PartialEq, Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

#[derive(Clone, PartialEq, Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    /// A member of a oneof in the schema: always written, 0.0 included.
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

/// The event log of one output folder.
pub struct EventLog {
    path: PathBuf,
}

/// The tag transformers' TensorBoard callback gives a logged key.
pub fn tag(key: &str) -> String {
    match key.strip_prefix("eval_") {
        Some(rest) => format!("eval/{rest}"),
        None => format!("train/{key}"),
    }
}

/// TensorFlow's masked CRC-32C of a record's length and data.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn record(event: &Event) -> Vec<u8> {
    let data = event.encode_to_vec();
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(&data);
    out.extend_from_slice(&masked_crc(&data).to_le_bytes());
    out
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// One metrics line as an event: its numbers (booleans and strings are not scalars) at its
/// `step`; `None` for a line without a step or without a number.
fn line_event(line: &serde_json::Value, wall_time: f64) -> Option<Event> {
    let obj = line.as_object()?;
    let step = obj.get("step")?.as_i64()?;
    let value: Vec<SummaryValue> = obj
        .iter()
        .filter(|(k, _)| k.as_str() != "step")
        .filter_map(|(k, v)| Some(SummaryValue { tag: tag(k), simple_value: Some(v.as_f64()? as f32) }))
        .collect();
    (!value.is_empty()).then_some(Event { wall_time, step, what: Some(What::Summary(Summary { value })) })
}

fn header(wall_time: f64) -> Event {
    Event { wall_time, step: 0, what: Some(What::FileVersion("brain.Event:2".into())) }
}

impl EventLog {
    pub fn new(output_dir: &Path) -> Self {
        Self { path: output_dir.join(EVENTS_DIR).join(EVENTS_FILE) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one metrics line's scalars, starting the file (with its version record) if
    /// there is none.
    pub fn append(&self, line: &serde_json::Value) -> Result<(), FsError> {
        let Some(event) = line_event(line, now()) else { return Ok(()) };
        let mut bytes = Vec::new();
        if !self.path.exists() {
            let dir = self.path.parent().expect("the events file is inside runs/");
            std::fs::create_dir_all(dir).map_err(|e| FsError::io(dir, e))?;
            bytes.extend(record(&header(event.wall_time)));
        }
        bytes.extend(record(&event));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| FsError::io(&self.path, e))?;
        f.write_all(&bytes).map_err(|e| FsError::io(&self.path, e))
    }

    /// The file written anew from `lines` (atomically): after a resumed run truncated
    /// `metrics.jsonl`, the events are those of the kept lines. No lines: no file.
    pub fn rewrite(&self, lines: &[serde_json::Value]) -> Result<(), FsError> {
        let t = now();
        let events: Vec<Event> = lines.iter().filter_map(|l| line_event(l, t)).collect();
        if events.is_empty() {
            return self.remove();
        }
        let dir = self.path.parent().expect("the events file is inside runs/");
        std::fs::create_dir_all(dir).map_err(|e| FsError::io(dir, e))?;
        let mut bytes = record(&header(t));
        for e in &events {
            bytes.extend(record(e));
        }
        prefopt_fs::write_atomic(&self.path, &bytes)
    }

    /// A fresh run starts without the previous run's events.
    pub fn remove(&self) -> Result<(), FsError> {
        prefopt_fs::remove_file_if_exists(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_follow_transformers_rewrite_logs() {
        assert_eq!(tag("loss"), "train/loss");
        assert_eq!(tag("rewards/chosen"), "train/rewards/chosen");
        assert_eq!(tag("eval_loss"), "eval/loss");
        assert_eq!(tag("eval_rewards/accuracies"), "eval/rewards/accuracies");
    }

    /// CRC-32C's check value (crc32c("123456789") = 0xe3069283), and TensorFlow's mask of
    /// it: rotate right by 15 bits, add 0xa282ead8.
    #[test]
    fn masked_crc_is_tensorflows() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc(b"123456789"), 0x2507_c60d_u32.wrapping_add(0xa282_ead8));
    }
}
