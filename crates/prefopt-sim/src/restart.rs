//! Adaptive momentum for APO's extrapolation: a gradient restart rule in the spirit of
//! O'Donoghue and Candès' adaptive restart for accelerated methods. **Our design**, not the
//! APO paper's (docs/simulate.md, "Adaptive momentum").
//!
//! Iteration t trains `pi_hat_t` from the reference and sampler `pi_t-1` (the last
//! extrapolated policy), then extrapolates along the momentum `m = log pi_hat_t -
//! log pi_hat_t-1`. The step just taken, `u = log pi_hat_t - log pi_t-1`, is what the new data
//! asked for (`u = r_t / beta`, the fitted reward). Accelerated gradient methods restart
//! when the step opposes the momentum, `<x_k - y_k-1, x_k - x_k-1> < 0`: the extrapolated
//! point overshot, and the data pulled back. Here the inner product is the covariance of u
//! and m under `pi_t-1` (both are log-ratios, defined up to a constant per prompt), summed
//! over prompts:
//!
//!   agreement = sum_x Cov_{y ~ pi_t-1(.|x)}[u(x, y), m(x, y)]
//!
//! and `restart` sets this iteration's extrapolation coefficient to 0 when agreement < 0
//! (`pi_t = pi_hat_t`), and to alpha otherwise. The loop can compute the same sum from its
//! samples (they are draws from `pi_t-1`): u from the trained and reference log-probs of
//! each sample, m from the two trained models'. The simulator uses the exact expectation
//! in both modes (the fitted u in sampled mode), so both modes share the rule.

use serde::{Deserialize, Serialize};

use crate::policy::{probs, LogPolicy};

/// How the extrapolation coefficient is chosen each iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlphaSchedule {
    /// `alpha` at every iteration (the APO paper).
    Constant,
    /// `alpha`, or 0 at an iteration whose step opposes the momentum (see the module docs).
    Restart,
}

impl AlphaSchedule {
    pub fn as_str(&self) -> &'static str {
        match self {
            AlphaSchedule::Constant => "constant",
            AlphaSchedule::Restart => "restart",
        }
    }

    /// The coefficient of this iteration's extrapolation from `hat` (just trained from
    /// `reference`) and `hat_prev`.
    pub fn alpha(&self, alpha: f64, reference: &LogPolicy, hat: &LogPolicy, hat_prev: &LogPolicy) -> f64 {
        match self {
            AlphaSchedule::Constant => alpha,
            AlphaSchedule::Restart => restart_alpha(alpha, momentum_agreement(reference, hat, hat_prev)),
        }
    }
}

/// The rule itself, for any estimate of the agreement (this module's exact one, or the
/// loop's from its pairs): 0 when the step opposed the momentum, else `alpha`.
pub fn restart_alpha(alpha: f64, agreement: f64) -> f64 {
    if agreement < 0.0 {
        0.0
    } else {
        alpha
    }
}

/// `sum_x Cov_{pi_ref}[log hat - log reference, log hat - log hat_prev]` (module docs).
pub fn momentum_agreement(reference: &LogPolicy, hat: &LogPolicy, hat_prev: &LogPolicy) -> f64 {
    let mut total = 0.0;
    for ((r, h), p) in reference.iter().zip(hat).zip(hat_prev) {
        let w = probs(r);
        let u: Vec<f64> = h.iter().zip(r).map(|(h, r)| h - r).collect();
        let m: Vec<f64> = h.iter().zip(p).map(|(h, p)| h - p).collect();
        let mean = |v: &[f64]| w.iter().zip(v).map(|(w, v)| w * v).sum::<f64>();
        let (mu, mm) = (mean(&u), mean(&m));
        total += w.iter().zip(u.iter().zip(&m)).map(|(w, (u, m))| w * (u - mu) * (m - mm)).sum::<f64>();
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::normalized;

    #[test]
    fn a_step_along_the_momentum_keeps_alpha_and_one_against_it_restarts() {
        let prev = normalized(vec![vec![0.0, 0.0, 0.0]]);
        let hat = normalized(vec![vec![1.0, 0.0, -1.0]]); // momentum towards response 0
        let along = normalized(vec![vec![0.5, 0.0, -0.5]]); // reference behind hat: step continues
        let past = normalized(vec![vec![2.0, 0.0, -2.0]]); // reference overshot: step comes back
        assert!(momentum_agreement(&along, &hat, &prev) > 0.0);
        assert!(momentum_agreement(&past, &hat, &prev) < 0.0);
        assert_eq!(AlphaSchedule::Restart.alpha(0.6, &along, &hat, &prev), 0.6);
        assert_eq!(AlphaSchedule::Restart.alpha(0.6, &past, &hat, &prev), 0.0);
        assert_eq!(AlphaSchedule::Constant.alpha(0.6, &past, &hat, &prev), 0.6);
        // A per-prompt constant in a log-ratio (here the momentum's) changes nothing.
        let shifted = vec![prev[0].iter().map(|v| v + 3.0).collect()];
        assert!((momentum_agreement(&past, &hat, &shifted) - momentum_agreement(&past, &hat, &prev)).abs() < 1e-12);
    }
}
