//! Objectives and training: completion log-probs, the pairwise loss family (methods.md
//! section 2), SPO (section 4), optimizers, schedules, and the preference trainer with
//! checkpoints and exact resume.
//!
//! Not here: model code and checkpoint I/O (`prefopt-model`), data parsing and
//! tokenization (`prefopt-data`), the online loop.

pub mod checkpoint;
pub mod config;
pub mod dataset;
pub mod grads;
pub mod logps;
pub mod losses;
pub mod metrics;
pub mod optim;
pub mod preference;
pub mod reference;
pub mod schedule;
pub mod sft;
pub mod spo;
pub mod trainer;

pub use config::TrainConfig;
pub use logps::{completion_logps, CompletionLogps, SequenceBatch};
pub use preference::train;
pub use sft::train_sft;
pub use trainer::{Observer, Quiet, StepStatus, TrainSummary};

/// Why a training run stopped. Messages name the file, key, step or batch involved.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    NonFinite(String),
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
