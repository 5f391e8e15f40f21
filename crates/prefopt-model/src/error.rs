//! One error type for the model crate. Every message names the file, tensor or setting it is
//! about.

use std::path::PathBuf;

/// What went wrong while loading, running or saving a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: not valid JSON: {message}")]
    Json { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {found:?}, the config expects {expected:?}")]
    TensorShape { path: PathBuf, name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },
    /// An input longer than the model's context.
    #[error("a sequence of {positions} positions exceeds the model's max_position_embeddings ({max})")]
    SequenceTooLong { positions: usize, max: usize },
    /// A `--device` / `device` value that cannot be used.
    #[error("device `{spec}`: {message}")]
    Device { spec: String, message: String },
    #[error(transparent)]
    Fs(#[from] prefopt_fs::FsError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;

pub(crate) fn io_error(path: impl Into<PathBuf>, err: impl std::fmt::Display) -> ModelError {
    ModelError::Io { path: path.into(), message: err.to_string() }
}
