//! The online loop of Accelerated Preference Optimization (methods.md section 3): sample
//! from the current policy, judge, pair best vs worst, train with any preference loss
//! against the current policy, extrapolate between the two last trained models, evaluate.
//!
//! Not here: the model (`prefopt-model`), data parsing (`prefopt-data`), the losses and the
//! trainer (`prefopt-train`), the exact tabular theory (`prefopt-sim`).
//!
//! Judges (`judge`): built-in task oracles (`tasks`: arithmetic, compare, reverse, with
//! graded rewards and malformed-answer detection), Hugging Face reward models
//! (`reward_model`, `rm:<folder>`) and external commands speaking JSON Lines (`command`,
//! `cmd:<shell command>`) and chat models behind an OpenAI-compatible server (`llm_judge`,
//! `llm:<base url>`), all behind the `Judge` trait. Inference servers (`remote`) can also
//! do the sampling.

pub mod apo;
pub mod command;
pub mod error;
pub mod evaluate;
pub mod extrapolate;
pub mod judge;
pub mod llm_judge;
pub mod pairing;
pub mod remote;
pub mod reward_model;
pub mod sampling;
pub mod seeds;
pub mod task_data;
pub mod tasks;

pub use error::LoopError;
