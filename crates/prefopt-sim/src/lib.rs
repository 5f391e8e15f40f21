//! `prefopt-sim`: an exact tabular simulator of iterative preference optimization with
//! APO's Nesterov extrapolation (methods.md section 3), the engine of `prefopt simulate`.
//!
//! It is for seeing the theory's trade-off with exact numbers in seconds: momentum
//! (alpha) shrinks the optimization error by `(1 - alpha)` (exact mode: the gap decays
//! like `exp(-t * margin / ((1 - alpha) * beta))`) but amplifies the statistical error of
//! each iteration's finite data set by up to `1 / (1 - alpha)` (sampled mode).
//! It is not a neural trainer: no tokens, no candle; policies are tables.
//!
//! # Model
//! - Prompts `x`, each with a finite set of responses `y`; a policy is a table of
//!   log-probabilities ([`policy::LogPolicy`]), softmax-normalized per prompt.
//! - The true preference model ([`problem::Problem`]) is Bradley-Terry from a reward
//!   table (`P(y > y') = sigmoid(r(y) - r(y'))`, rewards in logit units) or a general
//!   matrix `P(i > j)` per prompt (possibly non-transitive).
//! - Iteration `t` (methods.md section 3): a proximal step from `pi_t` gives the trained
//!   `pi_hat_t+1`; the extrapolation `pi_t+1 ∝ pi_hat_t+1 (pi_hat_t+1 / pi_hat_t)^alpha`
//!   gives the next sampler and reference. `alpha = 0` is plain iterative DPO/IPO/SPPO
//!   through the same code.
//! - [`exact`]: the proximal step in closed form (infinite data); it satisfies the APO
//!   paper's Theorem 4.1 ([`exact::theorem_4_1`], tested to 1e-9).
//! - [`sampled`]: the step fitted on N drawn prompts x K samples with sampled labels,
//!   by damped Newton to a gradient tolerance (not a fixed number of steps), so the
//!   theory's statistical error shows up. DPO's empirical minimizer is at infinity when a
//!   pair is always won; an L2 term on the fitted log-ratio (`l2`, added to the summed
//!   loss so it fades as N grows) keeps it finite, and such prompts are counted
//!   (`separable_prompts`). The module docs list every sampling and fitting choice.
//!
//! User documentation, with the config keys and the measured default run:
//! docs/simulate.md.
//!
//! # Reference solutions and metrics (our choices)
//! - Bradley-Terry: the "optimal policy" is the greedy best response per prompt
//!   (uniform over the argmax when rewards tie); `reward_gap = mean_x (max_y r -
//!   E_pi[r])`.
//! - General preferences: the von Neumann winner (the minimax strategy of the symmetric
//!   game `P - 1/2`), computed exactly by a small LP ([`problem::von_neumann_winner`],
//!   checked to exploitability <= 1e-9); when several exist, the LP's vertex is the
//!   reference for `tv_to_optimal`. `exploitability = mean_x (max_y P(y > pi) - 1/2)`
//!   is reported for every model; it is the "gap" of general-preference runs.
//! - Metrics are averaged uniformly over prompts and describe the trained `pi_hat_t`;
//!   the extrapolated `pi_t`'s carry the prefix `extrapolated_`.
//!
//! # Exact mode per loss
//! `dpo` (Bradley-Terry only): `pi_hat ∝ pi_t exp(r / beta)`. `ipo`: the population
//! minimizer with pairs from `pi_t x pi_t` is `pi_hat ∝ pi_t exp(P(y > pi_t) / beta)`.
//! `sppo`: `pi_hat ∝ pi_t exp(eta P(y > pi_t))`, `eta = 1 / beta`; so exact `ipo` and
//! `sppo` coincide. `dpo` with a general matrix has no closed form and is rejected.
//!
//! Randomness: every draw comes from `rand_chacha::ChaCha8Rng`; the problem from
//! `problem_seed` (stream 0), each sampled run's data from its seed (stream 1). Same
//! config, same numbers.

// Small dense matrix code (preference matrices, Hessians, the simplex tableau) reads
// better with explicit indices.
#![allow(clippy::needless_range_loop)]

pub mod config;
pub mod error;
pub mod exact;
pub mod metrics;
pub mod policy;
pub mod problem;
pub mod restart;
pub mod sampled;
pub mod sweep;

pub use config::{Config, Init, Loss, Mode, Pairing, PreferenceModel, DEFAULT_CONFIG_TOML};
pub use error::{ConfigError, SimError};
pub use metrics::Metrics;
pub use problem::Problem;
pub use restart::AlphaSchedule;
pub use sweep::{run_sweep, AdaptiveComparison, Record, Run, RunKey, Summary, SweepOutput};
