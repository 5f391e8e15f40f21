//! The online loop of Accelerated Preference Optimization (methods.md section 3): sample
//! from the current policy, judge, pair best vs worst, train with any preference loss
//! against the current policy, extrapolate between the two last trained models, evaluate.
//!
//! Not here: the model (`prefopt-model`), data parsing (`prefopt-data`), the losses and the
//! trainer (`prefopt-train`), the exact tabular theory (`prefopt-sim`).

pub mod apo;
pub mod error;
pub mod evaluate;
pub mod extrapolate;
pub mod judge;
pub mod pairing;
pub mod sampling;
pub mod tasks;

pub use error::LoopError;
