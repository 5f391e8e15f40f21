//! Objectives and training: completion log-probs, the pairwise loss family (methods.md
//! section 2), SPO (section 4), SFT, reward models, optimizers, schedules, and the trainer
//! with checkpoints and exact resume.
//!
//! Not here: model code and checkpoint I/O (`prefopt-model`), data parsing and
//! tokenization (`prefopt-data`), the online loop.

pub mod checkpoint;
pub mod config;
pub mod dataset;
pub mod grads;
pub mod kto;
pub mod logps;
pub mod losses;
pub mod metrics;
pub mod optim;
pub mod preference;
pub mod reference;
pub mod reward;
pub mod schedule;
pub mod sft;
pub mod spo;
pub mod tensorboard;
pub mod trainer;
pub mod weights;

use std::path::PathBuf;

pub use config::TrainConfig;
pub use logps::{completion_logps, score_pairs, BatchLayout, CompletionLogps, SequenceBatch};
pub use preference::{train, PreferenceObjective};
pub use reward::train_reward;
pub use sft::train_sft;
pub use trainer::{Observer, Quiet, StepStatus, TrainSummary};

/// Why a training run stopped. Every message names the key, file (and line and field),
/// folder, step or batch involved.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A setting that cannot work.
    #[error("{key}: {message}")]
    Config { key: &'static str, message: String },
    /// `output_dir` cannot be used (not creatable, not writable, holds another run).
    #[error("output_dir {}: {message}", dir.display())]
    OutputDir { dir: PathBuf, message: String },
    /// A checkpoint cannot be resumed.
    #[error("{}: {message}", dir.display())]
    Checkpoint { dir: PathBuf, message: String },
    /// A data file without a single record.
    #[error("{}: the dataset is empty", path.display())]
    EmptyData { path: PathBuf },
    /// Every example of a data file was dropped by the length budget.
    #[error(
        "{}: all {dropped} examples were dropped by truncation (e.g. {example}); raise max_length",
        path.display()
    )]
    AllDropped { path: PathBuf, dropped: usize, example: String },
    /// An optional per-pair column (reference log-probs, win probabilities) is missing or wrong.
    #[error("{at}: field `{field}`: {message}")]
    Column { at: prefopt_data::RecordSource, field: &'static str, message: String },
    /// A NaN or infinite loss or gradient, with `on_nonfinite = "stop"`.
    #[error(
        "non-finite loss or gradient (loss {loss}, grad_norm {grad_norm}) at step {step}, batch {batch}; last good checkpoint: {}",
        last_checkpoint.as_ref().map_or("none".to_string(), |p| p.display().to_string())
    )]
    NonFinite { step: usize, loss: f64, grad_norm: f64, batch: String, last_checkpoint: Option<PathBuf> },
    #[error(transparent)]
    Fs(#[from] prefopt_fs::FsError),

    // Boxed: these are large, and every fallible function returns a TrainError.
    #[error(transparent)]
    Model(Box<prefopt_model::ModelError>),
    #[error(transparent)]
    Input(Box<prefopt_data::DataError>),
    #[error(transparent)]
    Loss(#[from] losses::LossError),
    #[error(transparent)]
    Optim(Box<optim::OptimError>),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

impl From<prefopt_model::ModelError> for TrainError {
    fn from(e: prefopt_model::ModelError) -> Self {
        TrainError::Model(Box::new(e))
    }
}

impl From<prefopt_data::DataError> for TrainError {
    fn from(e: prefopt_data::DataError) -> Self {
        TrainError::Input(Box::new(e))
    }
}

impl From<optim::OptimError> for TrainError {
    fn from(e: optim::OptimError) -> Self {
        TrainError::Optim(Box::new(e))
    }
}
