//! Per-iteration metrics of a policy, averaged uniformly over prompts.

use serde::{Deserialize, Serialize};

use crate::policy::{probs, LogPolicy};
use crate::problem::{exploitability_of, Problem};

/// How far a policy is from the problem's reference solution.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// `mean_x (max_y r(x, y) - E_pi[r])`; `None` without Bradley-Terry rewards.
    pub reward_gap: Option<f64>,
    /// `mean_x TV(pi(.|x), pi*(.|x))` to the reference solution (best response, or the
    /// von Neumann winner for general preferences).
    pub tv_to_optimal: f64,
    /// `mean_x KL(pi(.|x) || pi_0(.|x))`.
    pub kl_to_init: f64,
    /// `mean_x (max_y P(y > pi) - 1/2)`: the duality gap of the symmetric preference
    /// game; zero exactly at a von Neumann winner.
    pub exploitability: f64,
}

impl Metrics {
    /// The metric that "gap" means in summaries and plots: `reward_gap` under
    /// Bradley-Terry, `exploitability` otherwise.
    pub fn gap(&self) -> f64 {
        self.reward_gap.unwrap_or(self.exploitability)
    }
}

/// Computes every metric of `policy`. Each term is summed in a form that keeps its
/// relative precision when the policy is nearly deterministic (so log-scale plots of
/// exponentially small gaps are exact, not rounding noise).
pub fn metrics(problem: &Problem, policy: &LogPolicy) -> Metrics {
    let p = problem.num_prompts() as f64;
    let (mut gap, mut tv, mut kl, mut expl) = (0.0, 0.0, 0.0, 0.0);
    for (x, row) in policy.iter().enumerate() {
        let pi = probs(row);
        if let Some(rewards) = &problem.rewards {
            let r = &rewards[x];
            let best = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            gap += pi.iter().zip(r).map(|(q, r)| q * (best - r)).sum::<f64>();
        }
        tv += pi.iter().zip(&problem.optimal[x]).map(|(q, o)| (q - o).max(0.0)).sum::<f64>();
        kl += pi.iter().zip(row).zip(&problem.init[x]).map(|((q, l), l0)| q * (l - l0)).sum::<f64>();
        expl += exploitability_of(&problem.prefs[x], &pi);
    }
    Metrics {
        reward_gap: problem.rewards.as_ref().map(|_| gap / p),
        tv_to_optimal: tv / p,
        kl_to_init: kl / p,
        exploitability: expl / p,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{normalized, uniform};

    #[test]
    fn uniform_policy_metrics_by_hand() {
        let problem = Problem::bradley_terry(vec![vec![0.0, 1.0], vec![2.0, 0.0]], uniform(&[2, 2]));
        let m = metrics(&problem, &uniform(&[2, 2]));
        assert!((m.reward_gap.unwrap() - 0.75).abs() < 1e-15);
        assert!((m.tv_to_optimal - 0.5).abs() < 1e-15);
        assert!(m.kl_to_init.abs() < 1e-15);
        // max_y P(y > uniform) - 1/2 = (sigmoid(d) + 1/2)/2 - 1/2 = (sigmoid(d) - 1/2)/2.
        let s = |d: f64| (crate::problem::sigmoid(d) - 0.5) / 2.0;
        assert!((m.exploitability - (s(1.0) + s(2.0)) / 2.0).abs() < 1e-15);
    }

    #[test]
    fn tiny_gaps_keep_relative_precision() {
        let problem = Problem::bradley_terry(vec![vec![0.0, 1.0]], uniform(&[2]));
        let policy = normalized(vec![vec![-100.0, 0.0]]);
        let m = metrics(&problem, &policy);
        let expect = (-100.0f64).exp(); // pi(0) * (1 - 0), to first order
        assert!((m.reward_gap.unwrap() / expect - 1.0).abs() < 1e-12);
        assert!((m.tv_to_optimal / expect - 1.0).abs() < 1e-12);
    }
}
