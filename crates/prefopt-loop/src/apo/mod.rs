//! `prefopt apo`: Accelerated Preference Optimization, methods.md section 3, as one
//! resumable command.
//!
//! ```text
//! pi_0 = pi_hat_0 = base
//! for t = 1..=T:                                     (directories iter-<t>, from 1)
//!     samples  K completions per prompt from pi_{t-1}          iter-t/samples.jsonl
//!     pairs    judge; best vs worst; ties skipped              iter-t/pairs.jsonl
//!     reference  (`extrapolation = "logprob"`, t >= 2) the pairs with the exact
//!              extrapolated reference's log-probs          iter-t/pairs-ref.jsonl
//!     trained  pi_hat_t: train on the pairs, reference pi_{t-1},
//!              starting from pi_{t-1}'s weights               iter-t/trained/
//!     extrapolated  pi_t = pi_hat_t + alpha (pi_hat_t - pi_hat_{t-1})   iter-t/extrapolated/
//!     metrics  held-out evaluation of pi_hat_t and pi_t        iter-t/metrics.jsonl
//! ```
//! Every stage writes its output atomically and is skipped when that output exists, so a
//! killed run, rerun with the same command, continues from the last finished stage.
//! `config` holds the keys, `run` the stages.

mod config;
mod run;

pub use config::{AlphaSchedule, ApoConfig, BetaSchedule, Extrapolation, Sampler, SamplerSync};
pub use run::{load_prompts, run_apo, IterationRecord, LoopObserver, Manifest};
