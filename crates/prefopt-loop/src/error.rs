//! Why the online loop stopped. Every message names the file, key, iteration or prompt.

use std::path::PathBuf;

/// An error of the APO loop.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// A config value that cannot work; `source_name` is the config file (or `--set`,
    /// or `[train]` for the inner training keys) and the message names the key.
    #[error("{source_name}: {message}")]
    Config { source_name: String, message: String },
    /// `output_dir` cannot hold this run.
    #[error("output_dir {}: {message}", dir.display())]
    OutputDir { dir: PathBuf, message: String },
    /// A prompt source (a file or `task:<name>`) without usable prompts.
    #[error("prompts `{spec}`: {message}")]
    Prompts { spec: String, message: String },
    /// The judge answered, but its verdicts cannot be used (wrong count, not finite, all tied).
    #[error("judge `{judge}` {message}")]
    Verdicts { judge: String, message: String },
    /// An inference server (`sampler = "openai"`) failed: the URL and what went wrong.
    #[error("sampler server {0}")]
    Remote(crate::remote::RemoteError),
    #[error(transparent)]
    Fs(#[from] prefopt_fs::FsError),
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

// Not `#[from]`: that would make the server's error this one's source too, and an error
// chain would print it twice.
impl From<crate::remote::RemoteError> for LoopError {
    fn from(e: crate::remote::RemoteError) -> Self {
        LoopError::Remote(e)
    }
}
