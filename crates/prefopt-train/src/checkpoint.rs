//! Checkpoints: `output_dir/checkpoint-<step>/` holds a loadable HF model folder, the
//! optimizer state, and `trainer_state.json` (step, data position, metric accumulators).
//! Each is written to a temp folder and renamed into place, so a half-written checkpoint
//! never carries the `checkpoint-<step>` name and is never picked up on resume.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::metrics::MetricAverager;
use crate::TrainError;

/// Everything besides weights and optimizer state needed to continue exactly.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    pub total_steps: usize,
    /// The data order is a pure function of (seed, epoch), so (seed, step) fixes the
    /// position in the data and the shuffle RNG's state.
    pub seed: u64,
    pub steps_per_epoch: usize,
    pub num_tokens: u64,
    pub skipped_batches: usize,
    pub averager: MetricAverager,
}

pub const STATE_FILE: &str = "trainer_state.json";

pub fn checkpoint_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(format!("checkpoint-{step}"))
}

/// The complete checkpoint with the highest step in `output_dir`, if any.
pub fn latest(output_dir: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(output_dir).ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step: usize = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().join(STATE_FILE).is_file().then_some((step, e.path()))
        })
        .max_by_key(|(step, _)| *step)
        .map(|(_, p)| p)
}

pub fn read_state(dir: &Path) -> Result<TrainerState, TrainError> {
    Ok(prefopt_fs::read_json(&dir.join(STATE_FILE))?)
}

pub fn write_state(dir: &Path, state: &TrainerState) -> Result<(), TrainError> {
    Ok(prefopt_fs::write_json(&dir.join(STATE_FILE), state)?)
}
