//! The simulated problem: prompts, responses, the true preference model, the reference
//! ("optimal") policy the metrics compare against, and the initial policy.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{Config, Init, Loss};
use crate::error::SimError;
use crate::policy::{normalized, uniform, LogPolicy};

/// A fully specified tabular problem.
#[derive(Debug, Clone)]
pub struct Problem {
    /// Bradley-Terry rewards `r[x][y]`, when the model is Bradley-Terry.
    pub rewards: Option<Vec<Vec<f64>>>,
    /// `prefs[x][i][j] = P(i > j | x)`, always materialized (for Bradley-Terry,
    /// `sigmoid(r_i - r_j)`).
    pub prefs: Vec<Vec<Vec<f64>>>,
    /// The reference solution per prompt, as probabilities: for Bradley-Terry the
    /// greedy best response (uniform over the argmax on ties); otherwise the von
    /// Neumann winner of `P - 1/2` found by an exact LP.
    pub optimal: Vec<Vec<f64>>,
    /// The initial policy `pi_0` (normalized log-probs).
    pub init: LogPolicy,
}

/// `1 / (1 + exp(-z))`.
pub fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

impl Problem {
    /// Builds the problem a config describes; drawn tables come from
    /// `ChaCha8Rng::seed_from_u64(problem_seed)` (stream 0).
    pub fn from_config(config: &Config) -> Result<Problem, SimError> {
        config.validate()?;
        let shape = config.shape();
        let mut rng = ChaCha8Rng::seed_from_u64(config.problem_seed);
        rng.set_stream(0);
        let init = match &config.init {
            Init::Uniform => uniform(&shape),
            Init::LogProbs(rows) => normalized(rows.clone()),
        };
        if config.is_bradley_terry() {
            let rewards = match &config.rewards {
                Some(r) => r.clone(),
                None => shape.iter().map(|&r| (0..r).map(|_| rng.gen::<f64>()).collect()).collect(),
            };
            Ok(Problem::bradley_terry(rewards, init))
        } else {
            let prefs = match &config.preferences {
                Some(p) => p.clone(),
                None => shape
                    .iter()
                    .map(|&r| {
                        let mut m = vec![vec![0.5; r]; r];
                        for i in 0..r {
                            for j in i + 1..r {
                                let p: f64 = rng.gen();
                                m[i][j] = p;
                                m[j][i] = 1.0 - p;
                            }
                        }
                        m
                    })
                    .collect(),
            };
            Problem::general(prefs, init)
        }
    }

    /// A Bradley-Terry problem from a reward table.
    pub fn bradley_terry(rewards: Vec<Vec<f64>>, init: LogPolicy) -> Problem {
        let prefs = rewards
            .iter()
            .map(|row| row.iter().map(|&a| row.iter().map(|&b| sigmoid(a - b)).collect()).collect())
            .collect();
        let optimal = rewards
            .iter()
            .map(|row| {
                let best = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let ties = row.iter().filter(|&&r| r == best).count() as f64;
                row.iter().map(|&r| if r == best { 1.0 / ties } else { 0.0 }).collect()
            })
            .collect();
        Problem { rewards: Some(rewards), prefs, optimal, init }
    }

    /// A general-preference problem; the reference solution is the von Neumann winner.
    pub fn general(prefs: Vec<Vec<Vec<f64>>>, init: LogPolicy) -> Result<Problem, SimError> {
        let mut optimal = Vec::with_capacity(prefs.len());
        for (x, m) in prefs.iter().enumerate() {
            let q = von_neumann_winner(m);
            let e = exploitability_of(m, &q);
            if e > 1e-9 {
                return Err(SimError::VonNeumann { prompt: x, exploitability: e });
            }
            optimal.push(q);
        }
        Ok(Problem { rewards: None, prefs, optimal, init })
    }

    /// Number of prompts.
    pub fn num_prompts(&self) -> usize {
        self.prefs.len()
    }

    /// Responses per prompt.
    pub fn shape(&self) -> Vec<usize> {
        self.prefs.iter().map(Vec::len).collect()
    }

    /// `P(y > pi | x)` for every response `y`, with `pi` given as probabilities.
    pub fn win_rates(&self, x: usize, pi: &[f64]) -> Vec<f64> {
        self.prefs[x].iter().map(|row| row.iter().zip(pi).map(|(p, q)| p * q).sum()).collect()
    }

    /// The margin that sets the exact-mode decay rate, when the reference solution is a
    /// (set of tied) pure response(s) in every prompt: for `dpo` the reward margin
    /// `min_x (r*(x) - max_{y not best} r(x, y))`; for `ipo`/`sppo` the preference
    /// margin `min_x min_{y not best} (1/2 - P(y > pi*))`. Theory: the gap decays like
    /// `exp(-t * margin / ((1 - alpha) * beta))`. `None` for a mixed von Neumann winner
    /// or when every response of every prompt is optimal.
    pub fn rate_margin(&self, loss: Loss) -> Option<f64> {
        let mut margin = f64::INFINITY;
        for x in 0..self.num_prompts() {
            let opt = &self.optimal[x];
            let support: Vec<usize> = (0..opt.len()).filter(|&y| opt[y] > 0.0).collect();
            if self.rewards.is_none() && support.len() > 1 {
                return None;
            }
            let outside: Vec<usize> = (0..opt.len()).filter(|&y| opt[y] == 0.0).collect();
            for &y in &outside {
                let m = match (&self.rewards, loss) {
                    (Some(r), Loss::Dpo) => r[x][support[0]] - r[x][y],
                    _ => 0.5 - self.prefs[x][y].iter().zip(opt).map(|(p, q)| p * q).sum::<f64>(),
                };
                margin = margin.min(m);
            }
        }
        margin.is_finite().then_some(margin)
    }
}

/// `max_y P(y > q) - 1/2` for one prompt's matrix: how much a best response beats `q`.
/// Zero exactly at a von Neumann winner. Computed as `sum_y' q(y') (P(y > y') - 1/2)`,
/// which keeps its relative precision when `q` is nearly pure.
pub fn exploitability_of(m: &[Vec<f64>], q: &[f64]) -> f64 {
    m.iter().map(|row| row.iter().zip(q).map(|(p, w)| (p - 0.5) * w).sum::<f64>()).fold(f64::NEG_INFINITY, f64::max)
}

/// The von Neumann winner of a preference matrix: a `q` with `P(y > q) <= 1/2` for all
/// `y`, i.e. the minimax strategy of the symmetric zero-sum game `P - 1/2`.
///
/// Solved exactly as the LP `max 1'z  s.t. (P + 1) z <= 1, z >= 0`, `q = z / 1'z`
/// (the column player's problem of the positive game `P + 1`), with a dense tableau
/// simplex under Bland's rule (no cycling). When several winners exist it returns one
/// vertex of the solution set.
pub fn von_neumann_winner(m: &[Vec<f64>]) -> Vec<f64> {
    let n = m.len();
    let cols = 2 * n + 1; // z (n), slacks (n), rhs
    let mut tab: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            let mut row = vec![0.0; cols];
            for j in 0..n {
                row[j] = m[i][j] + 1.0;
            }
            row[n + i] = 1.0;
            row[2 * n] = 1.0;
            row
        })
        .collect();
    // Reduced costs of the minimization of -1'z.
    let mut cost = vec![0.0; cols];
    for c in cost.iter_mut().take(n) {
        *c = -1.0;
    }
    let mut basis: Vec<usize> = (n..2 * n).collect();
    const EPS: f64 = 1e-12;
    for _ in 0..10_000 {
        let Some(e) = (0..2 * n).find(|&j| cost[j] < -EPS) else {
            break;
        };
        let mut leave: Option<usize> = None;
        for i in 0..n {
            if tab[i][e] > EPS {
                let ratio = tab[i][2 * n] / tab[i][e];
                leave = match leave {
                    None => Some(i),
                    Some(l) => {
                        let best = tab[l][2 * n] / tab[l][e];
                        if ratio < best - EPS || (ratio <= best + EPS && basis[i] < basis[l]) {
                            Some(i)
                        } else {
                            Some(l)
                        }
                    }
                };
            }
        }
        let Some(l) = leave else { break }; // unbounded cannot happen: P + 1 > 0
        let piv = tab[l][e];
        for v in tab[l].iter_mut() {
            *v /= piv;
        }
        let prow = tab[l].clone();
        for (i, row) in tab.iter_mut().enumerate() {
            if i != l && row[e] != 0.0 {
                let f = row[e];
                for (v, p) in row.iter_mut().zip(&prow) {
                    *v -= f * p;
                }
            }
        }
        let f = cost[e];
        for (v, p) in cost.iter_mut().zip(&prow) {
            *v -= f * p;
        }
        basis[l] = e;
    }
    let mut z = vec![0.0; n];
    for (i, &b) in basis.iter().enumerate() {
        if b < n {
            z[b] = tab[i][2 * n].max(0.0);
        }
    }
    let s: f64 = z.iter().sum();
    z.iter().map(|v| v / s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rock_paper_scissors_winner_is_uniform() {
        let m = vec![vec![0.5, 1.0, 0.0], vec![0.0, 0.5, 1.0], vec![1.0, 0.0, 0.5]];
        let q = von_neumann_winner(&m);
        for v in &q {
            assert!((v - 1.0 / 3.0).abs() < 1e-12, "{q:?}");
        }
        assert!(exploitability_of(&m, &q).abs() < 1e-12);
    }

    #[test]
    fn condorcet_winner_is_pure() {
        // Response 2 beats both others; 0 and 1 form no cycle with it.
        let m = vec![vec![0.5, 0.9, 0.3], vec![0.1, 0.5, 0.2], vec![0.7, 0.8, 0.5]];
        let q = von_neumann_winner(&m);
        assert!((q[2] - 1.0).abs() < 1e-12, "{q:?}");
    }

    #[test]
    fn random_matrices_have_zero_exploitability_winners() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for r in 2..12 {
            let mut m = vec![vec![0.5; r]; r];
            for i in 0..r {
                for j in i + 1..r {
                    let p: f64 = rng.gen();
                    m[i][j] = p;
                    m[j][i] = 1.0 - p;
                }
            }
            let q = von_neumann_winner(&m);
            assert!(q.iter().all(|&v| v >= 0.0));
            assert!((q.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            assert!(exploitability_of(&m, &q) < 1e-10, "r = {r}: {}", exploitability_of(&m, &q));
        }
    }

    #[test]
    fn bradley_terry_optimal_is_uniform_over_ties() {
        let p = Problem::bradley_terry(vec![vec![1.0, 0.0, 1.0]], uniform(&[3]));
        assert_eq!(p.optimal[0], vec![0.5, 0.0, 0.5]);
        assert_eq!(p.rate_margin(Loss::Dpo), Some(1.0));
        let m = p.rate_margin(Loss::Sppo).unwrap();
        assert!((m - (0.5 - sigmoid(-1.0))).abs() < 1e-15);
    }
}
