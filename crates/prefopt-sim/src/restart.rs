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
//!
//! The gradient test sees the direction of the step, not its length: an extrapolation that
//! goes too far along a direction the data still agrees with passes it (the demo shows
//! exactly that: the extrapolated models are worse than the trained ones while the agreement
//! stays positive). `monotone` is the function-value test instead (O'Donoghue and Candès'
//! other scheme; monotone FISTA, Beck and Teboulle, keeps the better of the two points the
//! same way): the candidate `pi_t` is kept only if it is judged at least as good as `pi_hat_t`,
//!
//!   advantage = mean_x ( E_{y ~ pi_t}[r(x, y)] - E_{y ~ pi_hat_t}[r(x, y)] )      (rewards)
//!   advantage = mean_x ( P(pi_t > pi_hat_t | x) - 1/2 )                         (preferences)
//!
//! and `pi_t = pi_hat_t` (alpha 0) when advantage < 0. Exact mode uses the expectations;
//! sampled mode estimates them from `n` prompts and `k` samples of each policy (one more
//! sampling and judging round per iteration, the loop's cost too), drawn from their own
//! random stream so the training data of a run does not depend on the rule.

use serde::{Deserialize, Serialize};

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::policy::{probs, LogPolicy};
use crate::problem::Problem;
use crate::sampled::{cdfs, sample_index};

/// How the extrapolation coefficient is chosen each iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlphaSchedule {
    /// `alpha` at every iteration (the APO paper).
    Constant,
    /// `alpha`, or 0 at an iteration whose step opposes the momentum (see the module docs).
    Restart,
    /// `alpha`, or 0 when the extrapolated policy is judged worse than the trained one
    /// (see the module docs).
    Monotone,
}

impl AlphaSchedule {
    pub fn as_str(&self) -> &'static str {
        match self {
            AlphaSchedule::Constant => "constant",
            AlphaSchedule::Restart => "restart",
            AlphaSchedule::Monotone => "monotone",
        }
    }

    /// The coefficient of this iteration's extrapolation from `hat` (just trained from
    /// `reference`) and `hat_prev`. `monotone` judges the candidate with `judge`
    /// ([`judged_advantage`]'s draws in sampled mode, `None` for the exact value).
    pub fn alpha(
        &self,
        alpha: f64,
        problem: &Problem,
        (reference, hat, hat_prev): (&LogPolicy, &LogPolicy, &LogPolicy),
        judge: Option<(usize, usize, &mut ChaCha8Rng)>,
    ) -> f64 {
        match self {
            AlphaSchedule::Constant => alpha,
            AlphaSchedule::Restart => gated_alpha(alpha, momentum_agreement(reference, hat, hat_prev)),
            AlphaSchedule::Monotone => {
                let candidate = crate::policy::extrapolate(hat, hat_prev, alpha);
                gated_alpha(alpha, judged_advantage(problem, &candidate, hat, judge))
            }
        }
    }
}

/// How much better `candidate` is judged than `hat` (module docs): exactly, or from `n`
/// uniformly drawn prompts with `k` samples of each policy and the true reward (or one
/// Bernoulli verdict per sample pair under general preferences).
pub fn judged_advantage(
    problem: &Problem,
    candidate: &LogPolicy,
    hat: &LogPolicy,
    draws: Option<(usize, usize, &mut ChaCha8Rng)>,
) -> f64 {
    let prompts = problem.num_prompts();
    let Some((n, k, rng)) = draws else {
        let mut total = 0.0;
        for x in 0..prompts {
            let (c, h) = (probs(&candidate[x]), probs(&hat[x]));
            total += match &problem.rewards {
                Some(r) => c.iter().zip(&h).zip(&r[x]).map(|((c, h), r)| (c - h) * r).sum::<f64>(),
                None => {
                    let p = &problem.prefs[x];
                    let win: f64 = (0..c.len()).map(|i| (0..h.len()).map(|j| c[i] * h[j] * p[i][j]).sum::<f64>()).sum();
                    win - 0.5
                }
            };
        }
        return total / prompts as f64;
    };
    let (candidate_cdfs, hat_cdfs) = (cdfs(candidate), cdfs(hat));
    let mut total = 0.0;
    for _ in 0..n {
        let x = rng.gen_range(0..prompts);
        for _ in 0..k {
            let (yc, yh) = (sample_index(&candidate_cdfs[x], rng), sample_index(&hat_cdfs[x], rng));
            total += match &problem.rewards {
                Some(r) => r[x][yc] - r[x][yh],
                None => f64::from(u8::from(rng.gen::<f64>() < problem.prefs[x][yc][yh])) - 0.5,
            };
        }
    }
    total / (n * k) as f64
}

/// Both rules' decision, for any estimate of their signal (this module's exact one, or the
/// loop's from its pairs or judged samples): the momentum agreement for `restart`, the
/// candidate's advantage for `monotone`. 0 when the signal is negative (the step opposed
/// the momentum; the candidate was judged worse), else `alpha`.
pub fn gated_alpha(alpha: f64, signal: f64) -> f64 {
    if signal < 0.0 {
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
        let problem = Problem::bradley_terry(vec![vec![1.0, 0.0, -1.0]], prev.clone());
        let alpha = |s: AlphaSchedule, reference: &LogPolicy| s.alpha(0.6, &problem, (reference, &hat, &prev), None);
        assert_eq!(alpha(AlphaSchedule::Restart, &along), 0.6);
        assert_eq!(alpha(AlphaSchedule::Restart, &past), 0.0);
        assert_eq!(alpha(AlphaSchedule::Constant, &past), 0.6);
        // A per-prompt constant in a log-ratio (here the momentum's) changes nothing.
        let shifted = vec![prev[0].iter().map(|v| v + 3.0).collect()];
        assert!((momentum_agreement(&past, &hat, &shifted) - momentum_agreement(&past, &hat, &prev)).abs() < 1e-12);
    }

    #[test]
    fn monotone_keeps_an_extrapolation_that_gains_reward_and_drops_one_that_loses_it() {
        use rand::SeedableRng;
        let prev = normalized(vec![vec![0.0, 0.0, 0.0]]);
        let hat = normalized(vec![vec![1.0, 0.0, -1.0]]); // momentum towards response 0
        let ahead = Problem::bradley_terry(vec![vec![1.0, 0.0, -1.0]], prev.clone()); // 0 is best
        let behind = Problem::bradley_terry(vec![vec![-1.0, 1.0, 0.0]], prev.clone()); // 0 is worst
        let m = |p: &Problem| AlphaSchedule::Monotone.alpha(0.6, p, (&prev, &hat, &prev), None);
        assert_eq!((m(&ahead), m(&behind)), (0.6, 0.0));
        // The sampled estimate tends to the exact advantage, under rewards and preferences.
        let candidate = crate::policy::extrapolate(&hat, &prev, 0.6);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for problem in [
            &ahead,
            &Problem::general(vec![vec![vec![0.5, 0.8, 0.9], vec![0.2, 0.5, 0.6], vec![0.1, 0.4, 0.5]]], prev.clone())
                .unwrap(),
        ] {
            let exact = judged_advantage(problem, &candidate, &hat, None);
            let sampled = judged_advantage(problem, &candidate, &hat, Some((4000, 4, &mut rng)));
            assert!(exact > 0.0 && (sampled - exact).abs() < 0.02, "exact {exact}, sampled {sampled}");
        }
    }
}
