//! Errors of the simulator.

/// A config that cannot be used; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// TOML syntax, an unknown key or a value of the wrong type (serde's message,
    /// which names the key and the line).
    #[error("{0}")]
    Parse(String),
    /// A well-typed value outside its allowed range, or tables that disagree.
    #[error("invalid value for `{key}`: {message}")]
    Invalid {
        /// The config key at fault.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

/// Anything that stops a sweep.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The config is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The von Neumann winner of a preference matrix could not be computed to 1e-9.
    #[error(
        "prompt {prompt}: could not compute the von Neumann winner (exploitability {exploitability:e} after the LP)"
    )]
    VonNeumann {
        /// The prompt whose matrix failed.
        prompt: usize,
        /// Exploitability of the best solution found.
        exploitability: f64,
    },
}
