//! Objectives and training: completion log-probs, the pairwise loss family (methods.md
//! section 2), SPO (section 4), SFT, optimizers and the trainer.
//!
//! Not here: model code and checkpoint I/O (`prefopt-model`), data parsing and
//! tokenization (`prefopt-data`), the online loop (`prefopt-loop`).

pub mod logps;

pub use logps::{completion_logps, logps_from_logits, CompletionLogps, SequenceBatch};
