//! Why the online loop stopped. Every message names the file, key, iteration or prompt.

/// An error of the APO loop.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Judge(String),
    #[error(transparent)]
    JudgeFailed(#[from] crate::judge::JudgeError),
    #[error(transparent)]
    Train(#[from] prefopt_train::TrainError),
    #[error(transparent)]
    Model(#[from] prefopt_model::ModelError),
    #[error(transparent)]
    Data(#[from] prefopt_data::DataError),
    #[error(transparent)]
    Extrapolate(#[from] crate::extrapolate::ExtrapolateError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}
