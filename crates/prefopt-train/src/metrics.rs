//! Step metrics under TRL's names, averaged over each logging interval, and the
//! `metrics.jsonl` log (one JSON object per logged step).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use prefopt_fs::FsError;
use serde::{Deserialize, Serialize};

use crate::tensorboard::EventLog;
use crate::TrainError;

/// Sums of named values over the steps since the last log line, to report their means.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MetricAverager {
    sums: BTreeMap<String, f64>,
    counts: BTreeMap<String, f64>,
}

impl MetricAverager {
    pub fn add(&mut self, name: &str, value: f64, weight: f64) {
        *self.sums.entry(name.to_string()).or_default() += value * weight;
        *self.counts.entry(name.to_string()).or_default() += weight;
    }

    /// The means so far, then starts a new interval.
    pub fn take(&mut self) -> BTreeMap<String, f64> {
        let means = self.sums.iter().map(|(k, s)| (k.clone(), s / self.counts[k].max(f64::MIN_POSITIVE))).collect();
        self.sums.clear();
        self.counts.clear();
        means
    }

    pub fn is_empty(&self) -> bool {
        self.sums.is_empty()
    }
}

/// Appends log lines to `output_dir/metrics.jsonl`, flushing each one, and mirrors them into
/// a TensorBoard event file when asked (`report_to = "tensorboard"`).
pub struct MetricsLog {
    path: PathBuf,
    events: EventLog,
    tensorboard: bool,
}

impl MetricsLog {
    pub fn new(output_dir: &Path) -> Self {
        Self { path: output_dir.join("metrics.jsonl"), events: EventLog::new(output_dir), tensorboard: false }
    }

    /// Also write every line to `output_dir/runs/events.out.tfevents.prefopt`.
    pub fn with_tensorboard(mut self, on: bool) -> Self {
        self.tensorboard = on;
        self
    }

    /// A fresh run: no log and no event file of an earlier run in this folder.
    pub fn clear(&self) -> Result<(), TrainError> {
        prefopt_fs::remove_file_if_exists(&self.path)?;
        Ok(self.events.remove()?)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn append(&self, line: &serde_json::Value) -> Result<(), TrainError> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| FsError::io(&self.path, e))?;
        writeln!(f, "{line}").map_err(|e| FsError::io(&self.path, e))?;
        if self.tensorboard {
            self.events.append(line)?;
        }
        Ok(())
    }

    /// On resume: keeps only the lines of steps up to `step` (those the checkpoint saw), so
    /// the resumed run's log equals an uninterrupted run's. Rewritten atomically.
    pub fn truncate_after(&self, step: usize) -> Result<(), TrainError> {
        let Ok(text) = std::fs::read_to_string(&self.path) else { return Ok(()) };
        let kept: Vec<(&str, serde_json::Value)> = text
            .lines()
            .filter_map(|l| Some((l, serde_json::from_str::<serde_json::Value>(l).ok()?)))
            .filter(|(_, v)| v.get("step").and_then(|s| s.as_u64()).is_some_and(|s| s as usize <= step))
            .collect();
        let kept_text: String = kept.iter().map(|(l, _)| format!("{l}\n")).collect();
        prefopt_fs::write_atomic(&self.path, kept_text.as_bytes())?;
        if self.tensorboard {
            self.events.rewrite(&kept.into_iter().map(|(_, v)| v).collect::<Vec<_>>())?;
        }
        Ok(())
    }

    /// Every logged line, for plots and summaries.
    pub fn read_all(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .map(|t| t.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
            .unwrap_or_default()
    }
}
