//! `summary.json`: every run's numbers, their mean and spread across seeds, and the claims
//! checked seed by seed. `report.md` is written from this and nothing else.

use serde::{Deserialize, Serialize};

use prefopt_loop::apo::AlphaSchedule;

use crate::offline::LogpTrajectory;
use crate::recipe::Recipe;

/// One evaluated model: an offline method's final model, or an online method's trained model
/// `pi_hat_t` after iteration `t` (0 = the base model), for one seed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRow {
    /// `online` or `offline`.
    pub experiment: String,
    /// `dpo`, `dpo+spo`, `simpo`, `simpo+spo`, `base` (offline); `iterative-dpo`, `apo-<alpha>`,
    /// `apo-<alpha>-restart` (online).
    pub method: String,
    /// Online: the method's momentum.
    pub alpha: Option<f64>,
    /// Online, iterations 1..=T: the coefficient of the extrapolation that followed this
    /// iteration's training (the method's alpha, or 0 where the restart rule fired).
    #[serde(default)]
    pub alpha_used: Option<f64>,
    pub seed: u64,
    pub iteration: Option<usize>,
    pub eval_reward: f64,
    pub eval_accuracy: Option<f64>,
    pub malformed_rate: f64,
    pub win_rate_vs_base: f64,
    pub kl_to_base: f64,
    /// Online: the same evaluation of the extrapolated model `pi_t` (equal to the trained one at alpha 0).
    pub extrapolated_eval_reward: Option<f64>,
    pub extrapolated_eval_accuracy: Option<f64>,
    /// Offline: change of the mean summed log-prob of the chosen (rejected) responses of the
    /// preference set from the base model to the final model.
    pub logp_chosen_delta: Option<f64>,
    pub logp_rejected_delta: Option<f64>,
}

/// The base model's held-out numbers, averaged over the seeds' held-out sets.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BaseSummary {
    pub eval_reward: f64,
    pub eval_accuracy: f64,
    pub malformed_rate: f64,
}

/// Mean, sample standard deviation, minimum and maximum over seeds.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct Spread {
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    pub fn of(values: &[f64]) -> Spread {
        let n = values.len();
        let mean = values.iter().sum::<f64>() / n.max(1) as f64;
        let var = if n > 1 { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64 } else { 0.0 };
        Spread {
            mean,
            std: var.sqrt(),
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            n,
        }
    }
}

/// A comparison checked on every seed: it holds across seeds only if it holds on each.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claim {
    pub statement: String,
    /// Seeds on which it held, of `seeds`.
    pub held: usize,
    pub seeds: usize,
    pub holds_across_seeds: bool,
    /// The paired differences' mean and spread (the compared quantity, per seed).
    pub difference: Spread,
}

impl Claim {
    /// `a - b > 0` per seed (pairs of values on the same seed).
    pub fn greater(statement: impl Into<String>, pairs: &[(f64, f64)]) -> Claim {
        Self::holding(statement, pairs, |d| d > 0.0)
    }

    /// `a - b >= 0` per seed: "never worse", ties included.
    pub fn at_least(statement: impl Into<String>, pairs: &[(f64, f64)]) -> Claim {
        Self::holding(statement, pairs, |d| d >= 0.0)
    }

    fn holding(statement: impl Into<String>, pairs: &[(f64, f64)], holds: impl Fn(f64) -> bool) -> Claim {
        let diffs: Vec<f64> = pairs.iter().map(|(a, b)| a - b).collect();
        let held = diffs.iter().filter(|d| holds(**d)).count();
        Claim {
            statement: statement.into(),
            held,
            seeds: diffs.len(),
            holds_across_seeds: held == diffs.len() && !diffs.is_empty(),
            difference: Spread::of(&diffs),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub recipe: Recipe,
    pub base: BaseSummary,
    pub runs: Vec<RunRow>,
    pub offline_trajectories: Vec<LogpTrajectory>,
    pub claims: Vec<Claim>,
    /// Wall-clock seconds of this invocation (a resumed demo counts only its own time).
    pub wall_s: f64,
}

/// Rows of one method, one per seed, at one online iteration (None: offline rows).
pub fn rows_of<'a>(runs: &'a [RunRow], experiment: &str, method: &str, iteration: Option<usize>) -> Vec<&'a RunRow> {
    runs.iter().filter(|r| r.experiment == experiment && r.method == method && r.iteration == iteration).collect()
}

/// Methods of an experiment, in first-seen order.
pub fn methods(runs: &[RunRow], experiment: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in runs.iter().filter(|r| r.experiment == experiment) {
        if !out.contains(&r.method) {
            out.push(r.method.clone());
        }
    }
    out
}

/// Pairs `(f(a), f(b))` on the seeds both have.
fn paired(a: &[&RunRow], b: &[&RunRow], f: impl Fn(&RunRow) -> f64) -> Vec<(f64, f64)> {
    a.iter().filter_map(|x| b.iter().find(|y| y.seed == x.seed).map(|y| (f(x), f(y)))).collect()
}

fn accuracy(r: &RunRow) -> f64 {
    r.eval_accuracy.unwrap_or(0.0)
}

/// The claims the demo exists to check, each seed by seed.
pub fn claims(recipe: &Recipe, runs: &[RunRow]) -> Vec<Claim> {
    let mut out = Vec::new();
    let last = Some(recipe.iterations);
    let online = methods(runs, "online");
    for m in &online {
        let (first, end) = (rows_of(runs, "online", m, Some(0)), rows_of(runs, "online", m, last));
        out.push(Claim::greater(
            format!("{m}: held-out accuracy after iteration {} is above the base model's", recipe.iterations),
            &paired(&end, &first, accuracy),
        ));
    }
    if let Some(dpo) = online.iter().find(|m| *m == "iterative-dpo") {
        let dpo_end = rows_of(runs, "online", dpo, last);
        for m in online.iter().filter(|m| *m != dpo) {
            let end = rows_of(runs, "online", m, last);
            out.push(Claim::greater(
                format!("{m} beats iterative DPO in held-out accuracy after iteration {}", recipe.iterations),
                &paired(&end, &dpo_end, accuracy),
            ));
            out.push(Claim::greater(
                format!("{m} beats iterative DPO in held-out reward after iteration {}", recipe.iterations),
                &paired(&end, &dpo_end, |r| r.eval_reward),
            ));
            // The adaptive rules' promise: never behind iterative DPO (ties count).
            if !recipe.online_methods.iter().any(|o| &o.name == m && o.alpha_schedule == AlphaSchedule::Constant) {
                out.push(Claim::at_least(
                    format!(
                        "{m} is at least as good as iterative DPO in held-out reward after iteration {}",
                        recipe.iterations
                    ),
                    &paired(&end, &dpo_end, |r| r.eval_reward),
                ));
            }
            // Acceleration: APO should be ahead early too (the paper's claim is about speed).
            let mid = recipe.iterations.div_ceil(2);
            out.push(Claim::greater(
                format!("{m} beats iterative DPO in held-out reward after iteration {mid}"),
                &paired(&rows_of(runs, "online", m, Some(mid)), &rows_of(runs, "online", dpo, Some(mid)), |r| {
                    r.eval_reward
                }),
            ));
        }
    }
    let delta = |r: &RunRow| r.logp_chosen_delta.unwrap_or(0.0);
    for m in methods(runs, "offline").iter().filter(|m| *m != "base" && !m.ends_with("+spo")) {
        let plain = rows_of(runs, "offline", m, None);
        out.push(Claim::greater(
            format!("{m}: the chosen responses' log-prob falls during training (likelihood displacement)"),
            &plain.iter().map(|r| (0.0, delta(r))).collect::<Vec<_>>(),
        ));
        let spo = rows_of(runs, "offline", &format!("{m}+spo"), None);
        if spo.is_empty() {
            continue;
        }
        out.push(Claim::greater(
            format!("{m}+spo keeps the chosen responses' log-prob higher than {m}"),
            &paired(&spo, &plain, delta),
        ));
        out.push(Claim::greater(
            format!("{m}+spo has a lower held-out malformed rate than {m}"),
            &paired(&plain, &spo, |r| r.malformed_rate),
        ));
        out.push(Claim::greater(
            format!("{m}+spo has a higher held-out accuracy than {m}"),
            &paired(&spo, &plain, accuracy),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_and_claims_count_seeds() {
        let s = Spread::of(&[1.0, 2.0, 3.0]);
        assert_eq!((s.mean, s.std, s.min, s.max, s.n), (2.0, 1.0, 1.0, 3.0, 3));
        let c = Claim::greater("x", &[(2.0, 1.0), (1.0, 1.5), (3.0, 0.0)]);
        assert_eq!((c.held, c.seeds, c.holds_across_seeds), (2, 3, false));
        assert!(Claim::greater("y", &[(2.0, 1.0), (1.0, 0.5)]).holds_across_seeds);
        assert!(!Claim::greater("tie is not a win", &[(1.0, 1.0)]).holds_across_seeds);
        assert!(Claim::at_least("a tie is not worse", &[(1.0, 1.0), (2.0, 1.0)]).holds_across_seeds);
        assert!(!Claim::at_least("a loss is worse", &[(1.0, 1.5)]).holds_across_seeds);
    }
}
