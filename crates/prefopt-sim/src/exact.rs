//! Exact mode (infinite data): every proximal step in closed form.
//!
//! - `dpo` under Bradley-Terry: the population DPO minimizer with reference `pi_t` is
//!   `pi_hat_t+1 ∝ pi_t * exp(r / beta)` (the pointwise minimizer of the logistic loss,
//!   `beta * h = r(y) - r(y')`, is a difference, so it is attained).
//! - `ipo`: with pairs drawn from `pi_t x pi_t` and labels from `P`, the population IPO
//!   loss is a least-squares fit of `h(y, y') = (P(y > y') - 1/2) / beta` by differences
//!   of a function of `y`; its normal equations give `rho(y) - E_pi_t[rho] =
//!   (P(y > pi_t) - 1/2) / beta`, i.e. `pi_hat_t+1 ∝ pi_t * exp(P(y > pi_t) / beta)`
//!   (Azar et al.'s IPO solution with the sampling policy `pi_t`). Exact for any `P`.
//! - `sppo`: the multiplicative-weights step `pi_hat_t+1 ∝ pi_t * exp(eta * P(y > pi_t))`
//!   with `eta = 1 / beta`. So in exact mode `ipo` and `sppo` coincide.
//!
//! Then APO's extrapolation (see [`crate::policy::extrapolate`]).

use crate::config::Loss;
use crate::policy::{normalized, probs, LogPolicy};
use crate::problem::Problem;

/// The per-iteration "reward" `r_t` that the proximal step exponentiates (divided by
/// beta): the Bradley-Terry reward for `dpo`, the win rate `P(y > pi_t)` for
/// `ipo`/`sppo`.
pub fn step_reward(problem: &Problem, loss: Loss, policy: &LogPolicy) -> Vec<Vec<f64>> {
    match (loss, &problem.rewards) {
        (Loss::Dpo, Some(r)) => r.clone(),
        (Loss::Dpo, None) => {
            panic!("exact dpo needs Bradley-Terry rewards (rejected by Config::validate)")
        }
        (Loss::Ipo | Loss::Sppo, _) => {
            (0..problem.num_prompts()).map(|x| problem.win_rates(x, &probs(&policy[x]))).collect()
        }
    }
}

/// The exact proximal step `pi_hat_t+1 ∝ pi_t * exp(r_t / beta)`.
pub fn exact_step(problem: &Problem, loss: Loss, beta: f64, policy: &LogPolicy) -> LogPolicy {
    let r = step_reward(problem, loss, policy);
    let table =
        policy.iter().zip(&r).map(|(row, rr)| row.iter().zip(rr).map(|(l, v)| l + v / beta).collect()).collect();
    normalized(table)
}

/// Theorem 4.1 of the APO paper, in closed form: given the rewards `r_0 .. r_t` of the
/// iterations so far, the trained policy is
/// `pi_hat_t+1 ∝ pi_0 * exp( sum_{i=0..t} (1 - alpha^(t+1-i)) / (1 - alpha) * r_i / beta )`.
pub fn theorem_4_1(init: &LogPolicy, rewards: &[Vec<Vec<f64>>], alpha: f64, beta: f64) -> LogPolicy {
    let t1 = rewards.len() as i32; // t + 1
    let mut table = init.clone();
    for (i, r) in rewards.iter().enumerate() {
        let w = (1.0 - alpha.powi(t1 - i as i32)) / (1.0 - alpha);
        for (row, rr) in table.iter_mut().zip(r) {
            for (l, v) in row.iter_mut().zip(rr) {
                *l += w * v / beta;
            }
        }
    }
    normalized(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{extrapolate, uniform};

    fn max_prob_diff(a: &LogPolicy, b: &LogPolicy) -> f64 {
        a.iter()
            .zip(b)
            .flat_map(|(ra, rb)| ra.iter().zip(rb).map(|(x, y)| (x.exp() - y.exp()).abs()))
            .fold(0.0, f64::max)
    }

    /// Runs the exact iteration and checks every trained policy against Theorem 4.1.
    fn check_against_theorem(problem: &Problem, loss: Loss, alpha: f64, beta: f64, iters: usize) {
        let mut cur = problem.init.clone();
        let mut hat_prev = problem.init.clone();
        let mut history = Vec::new();
        for _ in 0..iters {
            history.push(step_reward(problem, loss, &cur));
            let hat = exact_step(problem, loss, beta, &cur);
            let closed = theorem_4_1(&problem.init, &history, alpha, beta);
            let d = max_prob_diff(&hat, &closed);
            assert!(d < 1e-9, "{loss:?} alpha {alpha} iteration {}: {d:e}", history.len());
            cur = extrapolate(&hat, &hat_prev, alpha);
            hat_prev = hat;
        }
    }

    fn small_bt() -> Problem {
        let init = normalized(vec![vec![0.2, -0.3, 0.0], vec![0.0, 0.5, -1.0, 0.1]]);
        Problem::bradley_terry(vec![vec![0.3, 1.0, -0.5], vec![0.0, 0.2, 0.9, 0.4]], init)
    }

    #[test]
    fn exact_dpo_matches_theorem_4_1() {
        for alpha in [0.0, 0.3, 0.6, 0.9] {
            check_against_theorem(&small_bt(), Loss::Dpo, alpha, 0.7, 25);
        }
    }

    #[test]
    fn exact_sppo_matches_theorem_4_1_with_its_changing_rewards() {
        let rps = vec![vec![0.5, 0.8, 0.1], vec![0.2, 0.5, 0.7], vec![0.9, 0.3, 0.5]];
        let general = Problem::general(vec![rps], normalized(vec![vec![0.0, -1.0, 0.5]])).unwrap();
        for alpha in [0.0, 0.5, 0.8] {
            check_against_theorem(&general, Loss::Sppo, alpha, 0.5, 25);
            check_against_theorem(&small_bt(), Loss::Ipo, alpha, 0.5, 25);
        }
    }

    #[test]
    fn alpha_zero_is_pi0_times_exp_t_r_over_beta() {
        let problem = small_bt();
        let beta = 0.4;
        let mut cur = problem.init.clone();
        let mut hat_prev = problem.init.clone();
        let r = problem.rewards.clone().unwrap();
        for t in 1..=30 {
            let hat = exact_step(&problem, Loss::Dpo, beta, &cur);
            let expect = normalized(
                problem
                    .init
                    .iter()
                    .zip(&r)
                    .map(|(row, rr)| row.iter().zip(rr).map(|(l, v)| l + t as f64 * v / beta).collect())
                    .collect(),
            );
            assert!(max_prob_diff(&hat, &expect) < 1e-9, "t = {t}");
            cur = extrapolate(&hat, &hat_prev, 0.0);
            hat_prev = hat;
        }
    }

    #[test]
    fn uniform_start_exact_ipo_equals_sppo() {
        let p = Problem::bradley_terry(vec![vec![0.0, 1.0, 2.0]], uniform(&[3]));
        let a = exact_step(&p, Loss::Ipo, 0.3, &p.init);
        let b = exact_step(&p, Loss::Sppo, 0.3, &p.init);
        assert_eq!(a, b);
    }
}
