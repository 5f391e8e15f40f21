//! The sweep over alpha, beta, N and seeds; per-iteration records; the summary.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{Config, Loss};
use crate::error::SimError;
use crate::exact::exact_step;
use crate::metrics::{metrics, Metrics};
use crate::policy::{extrapolate, LogPolicy};
use crate::problem::Problem;
use crate::restart::AlphaSchedule;
use crate::sampled::{sampled_step, FitStats, SampledSettings};

/// Gaps at or below this are left out of the decay-rate fit (ln of a gap that small
/// says more about the arithmetic than about the algorithm).
pub const RATE_FIT_FLOOR: f64 = 1e-12;

/// One line of results.jsonl: one run at one iteration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// `exact` or `sampled`.
    pub mode: String,
    /// `dpo`, `ipo` or `sppo`.
    pub loss: String,
    /// Extrapolation coefficient.
    pub alpha: f64,
    /// How alpha is applied.
    pub alpha_schedule: AlphaSchedule,
    /// The coefficient this iteration's extrapolation used (0 where an adaptive rule dropped it).
    pub alpha_used: f64,
    /// KL coefficient.
    pub beta: f64,
    /// Prompts per iteration; `null` in exact mode (infinite data).
    pub n: Option<usize>,
    /// Data seed; `null` in exact mode (deterministic).
    pub seed: Option<u64>,
    /// 0 is the initial policy; iterations count from 1.
    pub iteration: usize,
    /// Metrics of the trained policy `pi_hat_t` (the algorithm's output).
    pub reward_gap: Option<f64>,
    /// See [`Metrics::tv_to_optimal`].
    pub tv_to_optimal: f64,
    /// See [`Metrics::kl_to_init`].
    pub kl_to_init: f64,
    /// See [`Metrics::exploitability`].
    pub exploitability: f64,
    /// The same metrics of the extrapolated policy `pi_t` (next sampler and reference).
    pub extrapolated_reward_gap: Option<f64>,
    /// TV of `pi_t` to the reference solution.
    pub extrapolated_tv_to_optimal: f64,
    /// KL of `pi_t` to `pi_0`.
    pub extrapolated_kl_to_init: f64,
    /// Exploitability of `pi_t`.
    pub extrapolated_exploitability: f64,
    /// Sampled mode, iterations >= 1: training pairs (`sppo`: samples) in the fit.
    pub pairs: Option<usize>,
    /// Sampled mode: drawn prompts that gave no training pair.
    pub skipped_prompts: Option<usize>,
    /// Sampled mode: most Newton steps any prompt's fit took.
    pub fit_newton_steps: Option<usize>,
    /// Sampled mode: final gradient norm of the mean empirical objective.
    pub fit_grad_norm: Option<f64>,
    /// Sampled mode: prompts whose fit did not reach `tolerance`.
    pub fit_unconverged_prompts: Option<usize>,
    /// Sampled mode, `dpo`: prompts whose unregularized minimizer is at infinity.
    pub separable_prompts: Option<usize>,
}

impl Record {
    fn new(
        run: &RunKey,
        loss: Loss,
        (iteration, alpha_used): (usize, f64),
        hat: Metrics,
        ext: Metrics,
        fit: Option<FitStats>,
    ) -> Record {
        Record {
            mode: if run.n.is_some() { "sampled" } else { "exact" }.to_string(),
            loss: loss.as_str().to_string(),
            alpha: run.alpha,
            alpha_schedule: run.schedule,
            alpha_used,
            beta: run.beta,
            n: run.n,
            seed: run.seed,
            iteration,
            reward_gap: hat.reward_gap,
            tv_to_optimal: hat.tv_to_optimal,
            kl_to_init: hat.kl_to_init,
            exploitability: hat.exploitability,
            extrapolated_reward_gap: ext.reward_gap,
            extrapolated_tv_to_optimal: ext.tv_to_optimal,
            extrapolated_kl_to_init: ext.kl_to_init,
            extrapolated_exploitability: ext.exploitability,
            pairs: fit.map(|f| f.pairs),
            skipped_prompts: fit.map(|f| f.skipped_prompts),
            fit_newton_steps: fit.map(|f| f.newton_steps),
            fit_grad_norm: fit.map(|f| f.grad_norm),
            fit_unconverged_prompts: fit.map(|f| f.unconverged_prompts),
            separable_prompts: fit.and_then(|f| f.separable_prompts),
        }
    }

    /// The gap metric of the trained policy (`reward_gap`, else `exploitability`).
    pub fn gap(&self) -> f64 {
        self.reward_gap.unwrap_or(self.exploitability)
    }
}

/// Identifies one run of the sweep.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RunKey {
    /// `None` for exact mode.
    pub n: Option<usize>,
    /// KL coefficient.
    pub beta: f64,
    /// Extrapolation coefficient.
    pub alpha: f64,
    /// How it is applied.
    pub schedule: AlphaSchedule,
    /// `None` for exact mode.
    pub seed: Option<u64>,
}

/// One run: its key and one record per iteration (0 ..= iterations).
#[derive(Debug, Clone)]
pub struct Run {
    /// Which run.
    pub key: RunKey,
    /// Records, iteration 0 first.
    pub records: Vec<Record>,
}

/// Mean and spread of a quantity over seeds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    /// Arithmetic mean.
    pub mean: f64,
    /// Sample standard deviation (n - 1); 0 for a single value.
    pub std: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

impl Spread {
    /// Spread of a non-empty list.
    pub fn of(v: &[f64]) -> Spread {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = if v.len() > 1 { v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
        Spread {
            mean,
            std: var.sqrt(),
            min: v.iter().cloned().fold(f64::INFINITY, f64::min),
            max: v.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

/// Iterations needed to reach the target gap, over seeds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReachStats {
    /// Runs (seeds) that reached the target within the iterations.
    pub reached: usize,
    /// Runs in the group.
    pub runs: usize,
    /// Spread of the first iteration with `gap <= target_gap`, over the runs that
    /// reached it (`null` when none did).
    pub iterations: Option<Spread>,
}

impl ReachStats {
    /// From the iterations at which the runs that got there did, out of `runs`.
    fn of(hits: &[f64], runs: usize) -> Self {
        ReachStats { reached: hits.len(), runs, iterations: (!hits.is_empty()).then(|| Spread::of(hits)) }
    }
}

/// The summary of one (mode, N, beta, alpha, schedule) group of runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupSummary {
    /// `exact` or `sampled`.
    pub mode: String,
    /// `null` in exact mode.
    pub n: Option<usize>,
    /// KL coefficient.
    pub beta: f64,
    /// Extrapolation coefficient.
    pub alpha: f64,
    /// How alpha is applied.
    pub alpha_schedule: AlphaSchedule,
    /// Iterations to reach `target_gap`.
    pub iterations_to_target: ReachStats,
    /// Gap of the last trained policy, over seeds.
    pub final_gap: Spread,
    /// Exact mode: least-squares slope of `ln(gap)` against `t` over iterations
    /// `t >= 1` with `gap > 1e-12` (needs two such points).
    pub fitted_slope: Option<f64>,
    /// Iterations used by the fit.
    pub fit_points: Option<usize>,
    /// Theory's rate `margin / ((1 - alpha) * beta)` (the gap decays like
    /// `exp(-rate * t)` for large t); `null` without a pure reference solution.
    pub theory_rate: Option<f64>,
    /// `-fitted_slope / theory_rate`: constant in alpha when rate ∝ 1/(1 - alpha)
    /// (approaches 1 for large t; smaller when the fit window is mostly the transient
    /// in which the momentum builds up, about `1 / (1 - alpha)` iterations).
    pub rate_ratio: Option<f64>,
    /// The slope from a fit over the later half of the fit window only (at least two
    /// points), where the transient has died out.
    pub late_fitted_slope: Option<f64>,
    /// `-late_fitted_slope / theory_rate`.
    pub late_rate_ratio: Option<f64>,
    /// Sampled mode: total prompt fits (over seeds and iterations) that did not reach
    /// `tolerance`.
    pub unconverged_fits: Option<usize>,
}

/// For one (N, beta): where more momentum stops helping the final gap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tradeoff {
    /// Prompts per iteration.
    pub n: usize,
    /// KL coefficient.
    pub beta: f64,
    /// The alphas, ascending.
    pub alphas: Vec<f64>,
    /// Final gap over seeds for each alpha.
    pub final_gap: Vec<Spread>,
    /// Alpha with the smallest mean final gap.
    pub best_alpha: f64,
    /// `best_alpha` when some larger alpha has a larger mean final gap (the final gap
    /// gets worse beyond it); `null` when the largest alpha is best.
    pub worse_beyond_alpha: Option<f64>,
    /// Seeds whose final gap at the largest alpha exceeds their final gap at
    /// `best_alpha` (a paired comparison: same data seed).
    pub seeds_worse_at_largest_alpha: usize,
    /// Seeds in the comparison.
    pub seeds: usize,
    /// Whether "worse beyond `best_alpha`" holds across seeds: it holds on average and
    /// in a strict majority of the paired seeds. A claim that does not hold across
    /// seeds is reported as not holding.
    pub holds_across_seeds: bool,
}

/// For one (adaptive schedule, N, beta, alpha > 0): the rule against constant momentum,
/// seed by seed (the same data seeds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveComparison {
    /// `restart` or `monotone`.
    pub alpha_schedule: AlphaSchedule,
    pub n: usize,
    pub beta: f64,
    /// The alpha the rule applies when it does not restart.
    pub alpha: f64,
    /// Final gap with the rule, over seeds.
    pub final_gap: Spread,
    /// Final gap with the same alpha held constant.
    pub constant_final_gap: Spread,
    /// Final gap at the smallest alpha (0: iterative DPO), constant.
    pub alpha0_final_gap: Spread,
    /// The constant alpha with the smallest mean final gap (known only after the sweep).
    pub best_constant_alpha: f64,
    pub best_constant_final_gap: Spread,
    /// Iterations to `target_gap`: the rule, alpha 0, the best constant alpha.
    pub iterations_to_target: ReachStats,
    pub alpha0_iterations_to_target: ReachStats,
    pub best_constant_iterations_to_target: ReachStats,
    /// Seeds whose final gap with the rule is at most their final gap at alpha 0.
    pub seeds_at_least_as_good_as_alpha0: usize,
    /// Seeds whose final gap with the rule is at most their final gap at the best constant
    /// alpha.
    pub seeds_at_least_as_good_as_best_constant: usize,
    pub seeds: usize,
    /// Iterations (of `iterations`) at which the rule set alpha to 0, per run.
    pub restarts_per_run: Spread,
}

/// summary.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The loss of every run.
    pub loss: String,
    /// Which metric "gap" means: `reward_gap` (Bradley-Terry) or `exploitability`.
    pub gap_metric: String,
    /// Target of `iterations_to_target`.
    pub target_gap: f64,
    /// Iterations per run.
    pub iterations: usize,
    /// The margin in the theory rate (see [`Problem::rate_margin`]).
    pub rate_margin: Option<f64>,
    /// One entry per (mode, N, beta, alpha).
    pub groups: Vec<GroupSummary>,
    /// Sampled mode: one entry per (N, beta), constant alphas.
    pub tradeoff: Vec<Tradeoff>,
    /// Sampled mode with an adaptive schedule swept: one entry per (schedule, N, beta,
    /// alpha > 0).
    pub adaptive: Vec<AdaptiveComparison>,
}

/// Everything a sweep produces.
#[derive(Debug, Clone)]
pub struct SweepOutput {
    /// The problem that was simulated (drawn tables included).
    pub problem: Problem,
    /// Every run, in sweep order.
    pub runs: Vec<Run>,
    /// The summary.
    pub summary: Summary,
}

impl SweepOutput {
    /// Every record, run by run, iteration by iteration (the lines of results.jsonl).
    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.runs.iter().flat_map(|r| r.records.iter())
    }

    /// The runs of one group (all seeds), in seed order.
    pub fn group(&self, n: Option<usize>, beta: f64, alpha: f64, schedule: AlphaSchedule) -> Vec<&Run> {
        select(&self.runs, n, beta, alpha, schedule)
    }

    /// Mean and interquartile band over seeds of the gap at every iteration of a group:
    /// `(t, mean)` and `(t, 25th percentile, 75th percentile)`.
    pub fn gap_band(&self, n: Option<usize>, beta: f64, alpha: f64, schedule: AlphaSchedule) -> GapBand {
        let runs = self.group(n, beta, alpha, schedule);
        let iters = runs[0].records.len();
        let mut mean = Vec::with_capacity(iters);
        let mut band = Vec::with_capacity(iters);
        for t in 0..iters {
            let mut v: Vec<f64> = runs.iter().map(|r| r.records[t].gap()).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            let m = v.iter().sum::<f64>() / v.len() as f64;
            mean.push((t as f64, m));
            band.push((t as f64, quantile(&v, 0.25), quantile(&v, 0.75)));
        }
        (mean, band)
    }

    /// The final gap of a group over seeds: (mean, 25th percentile, 75th percentile).
    pub fn final_gap_band(&self, n: Option<usize>, beta: f64, alpha: f64, schedule: AlphaSchedule) -> (f64, f64, f64) {
        let mut v: Vec<f64> =
            self.group(n, beta, alpha, schedule).iter().filter_map(|r| r.records.last()).map(|r| r.gap()).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        (v.iter().sum::<f64>() / v.len() as f64, quantile(&v, 0.25), quantile(&v, 0.75))
    }
}

/// The runs of one (N, beta, alpha, schedule) group, in seed order.
fn select(runs: &[Run], n: Option<usize>, beta: f64, alpha: f64, schedule: AlphaSchedule) -> Vec<&Run> {
    runs.iter()
        .filter(|r| r.key.n == n && r.key.beta == beta && r.key.alpha == alpha && r.key.schedule == schedule)
        .collect()
}

/// A line (`(t, mean)`) and its band (`(t, 25th percentile, 75th percentile)`).
pub type GapBand = (Vec<(f64, f64)>, Vec<(f64, f64, f64)>);

/// The `q`-quantile of sorted values, interpolated linearly between neighbours (numpy's
/// default).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (i, f) = (pos.floor() as usize, pos.fract());
    if i + 1 < sorted.len() {
        sorted[i] * (1.0 - f) + sorted[i + 1] * f
    } else {
        sorted[i]
    }
}

/// Runs one configuration of the algorithm: `n = None` is exact mode.
pub fn run_one(problem: &Problem, config: &Config, key: RunKey) -> Run {
    let loss = config.loss;
    let mut rng = ChaCha8Rng::seed_from_u64(key.seed.unwrap_or(0));
    rng.set_stream(1); // stream 0 draws the problem
                       // The monotone rule's judging draws: their own stream, so a run's training data does not
                       // depend on the rule.
    let mut judge_rng = ChaCha8Rng::seed_from_u64(key.seed.unwrap_or(0));
    judge_rng.set_stream(2);
    let settings = key.n.map(|n| SampledSettings {
        loss,
        beta: key.beta,
        n,
        k: config.k,
        pairing: config.pairing,
        tolerance: config.tolerance,
        l2: config.l2,
        max_fit_iters: config.max_fit_iters,
    });
    let m0 = metrics(problem, &problem.init);
    let mut records = vec![Record::new(&key, loss, (0, 0.0), m0, m0, None)];
    let mut cur: LogPolicy = problem.init.clone(); // pi_t: sampler and reference
    let mut hat_prev: LogPolicy = problem.init.clone(); // pi_hat_t
    for t in 1..=config.iterations {
        let (hat, fit) = match &settings {
            None => (exact_step(problem, loss, key.beta, &cur), None),
            Some(s) => {
                let (hat, fit) = sampled_step(problem, &cur, s, &mut rng);
                (hat, Some(fit))
            }
        };
        let judge = settings.as_ref().map(|s| (s.n, s.k, &mut judge_rng));
        let alpha = key.schedule.alpha(key.alpha, problem, (&cur, &hat, &hat_prev), judge);
        let ext = extrapolate(&hat, &hat_prev, alpha);
        records.push(Record::new(&key, loss, (t, alpha), metrics(problem, &hat), metrics(problem, &ext), fit));
        hat_prev = hat;
        cur = ext;
    }
    Run { key, records }
}

/// The (schedule, alpha) pairs of a sweep: every alpha constant, and the alphas above 0
/// with each adaptive schedule that is swept (at 0 they are the constant run).
fn schedules(config: &Config) -> Vec<(AlphaSchedule, f64)> {
    let mut out = Vec::new();
    for &schedule in &config.alpha_schedules {
        for &alpha in &config.alphas {
            if schedule == AlphaSchedule::Constant || alpha > 0.0 {
                out.push((schedule, alpha));
            }
        }
    }
    out
}

/// Runs the whole sweep a config describes and summarizes it.
pub fn run_sweep(config: &Config) -> Result<SweepOutput, SimError> {
    let problem = Problem::from_config(config)?;
    let mut runs = Vec::new();
    if config.mode.runs_exact() {
        for &beta in &config.betas {
            for (schedule, alpha) in schedules(config) {
                runs.push(run_one(&problem, config, RunKey { n: None, beta, alpha, schedule, seed: None }));
            }
        }
    }
    if config.mode.runs_sampled() {
        for &n in &config.ns {
            for &beta in &config.betas {
                for (schedule, alpha) in schedules(config) {
                    for &seed in &config.seeds {
                        let key = RunKey { n: Some(n), beta, alpha, schedule, seed: Some(seed) };
                        runs.push(run_one(&problem, config, key));
                    }
                }
            }
        }
    }
    let summary = summarize(&problem, config, &runs);
    Ok(SweepOutput { problem, runs, summary })
}

/// Least-squares slope of `ln(gap)` against `t` over `t >= 1`, `gap > floor`.
pub fn fit_log_slope(gaps: &[f64], floor: f64) -> Option<(f64, usize)> {
    let pts: Vec<(f64, f64)> =
        gaps.iter().enumerate().skip(1).filter(|(_, &g)| g > floor).map(|(t, &g)| (t as f64, g.ln())).collect();
    if pts.len() < 2 {
        return None;
    }
    let n = pts.len() as f64;
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    Some((sxy / sxx, pts.len()))
}

/// The decay-rate fit of one exact run.
#[derive(Default)]
struct RateFit {
    slope: Option<f64>,
    points: Option<usize>,
    late_slope: Option<f64>,
    theory: Option<f64>,
}

impl RateFit {
    fn ratio(&self, slope: Option<f64>) -> Option<f64> {
        Some(-slope? / self.theory?)
    }
}

/// Fits `ln(gap)` against `t` over all `t >= 1` with gap above the floor, and over the
/// later half of those iterations.
fn exact_rate_fit(records: &[Record], theory: Option<f64>) -> RateFit {
    let gaps: Vec<f64> = records.iter().map(Record::gap).collect();
    let Some((slope, points)) = fit_log_slope(&gaps, RATE_FIT_FLOOR) else {
        return RateFit { theory, ..RateFit::default() };
    };
    let above: Vec<usize> = (1..gaps.len()).filter(|&t| gaps[t] > RATE_FIT_FLOOR).collect();
    let mut later = gaps.clone();
    later.iter_mut().take(above[points / 2]).for_each(|g| *g = 0.0);
    RateFit {
        slope: Some(slope),
        points: Some(points),
        late_slope: fit_log_slope(&later, RATE_FIT_FLOOR).map(|f| f.0),
        theory,
    }
}

fn sorted_unique(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v.dedup();
    v
}

fn summarize(problem: &Problem, config: &Config, runs: &[Run]) -> Summary {
    let margin = problem.rate_margin(config.loss);
    let alphas = sorted_unique(config.alphas.clone());
    let betas = sorted_unique(config.betas.clone());
    let mut ns: Vec<Option<usize>> = Vec::new();
    if config.mode.runs_exact() {
        ns.push(None);
    }
    if config.mode.runs_sampled() {
        let mut v = config.ns.clone();
        v.sort();
        v.dedup();
        ns.extend(v.into_iter().map(Some));
    }
    let constant = |n: Option<usize>, beta: f64, alpha: f64| select(runs, n, beta, alpha, AlphaSchedule::Constant);
    let final_gaps = |group: &[&Run]| -> Vec<f64> { group.iter().map(|r| r.records.last().unwrap().gap()).collect() };

    let mut groups = Vec::new();
    for &n in &ns {
        for &beta in &betas {
            for (schedule, alpha) in schedules(config) {
                let group = select(runs, n, beta, alpha, schedule);
                let hits = iterations_to(&group, config.target_gap);
                let fit = match n {
                    None => exact_rate_fit(&group[0].records, margin.map(|m| m / ((1.0 - alpha) * beta))),
                    Some(_) => RateFit::default(),
                };
                groups.push(GroupSummary {
                    mode: if n.is_some() { "sampled" } else { "exact" }.to_string(),
                    n,
                    beta,
                    alpha,
                    alpha_schedule: schedule,
                    iterations_to_target: ReachStats::of(&hits, group.len()),
                    final_gap: Spread::of(&final_gaps(&group)),
                    fitted_slope: fit.slope,
                    fit_points: fit.points,
                    theory_rate: fit.theory,
                    rate_ratio: fit.ratio(fit.slope),
                    late_fitted_slope: fit.late_slope,
                    late_rate_ratio: fit.ratio(fit.late_slope),
                    unconverged_fits: n.map(|_| {
                        group.iter().flat_map(|r| &r.records).filter_map(|rec| rec.fit_unconverged_prompts).sum()
                    }),
                });
            }
        }
    }

    let (mut tradeoff, mut adaptive) = (Vec::new(), Vec::new());
    for &n in ns.iter().flatten() {
        for &beta in &betas {
            let per_alpha: Vec<Vec<f64>> = alphas.iter().map(|&a| final_gaps(&constant(Some(n), beta, a))).collect();
            let spreads: Vec<Spread> = per_alpha.iter().map(|v| Spread::of(v)).collect();
            let best = (0..alphas.len()).fold(0, |b, i| if spreads[i].mean < spreads[b].mean { i } else { b });
            let last = alphas.len() - 1;
            let worse = spreads[best + 1..].iter().any(|s| s.mean > spreads[best].mean);
            let seeds_worse = per_alpha[last].iter().zip(&per_alpha[best]).filter(|(l, b)| l > b).count();
            tradeoff.push(Tradeoff {
                n,
                beta,
                alphas: alphas.clone(),
                final_gap: spreads.clone(),
                best_alpha: alphas[best],
                worse_beyond_alpha: (worse && best < last).then_some(alphas[best]),
                seeds_worse_at_largest_alpha: seeds_worse,
                seeds: per_alpha[last].len(),
                holds_across_seeds: worse && best < last && 2 * seeds_worse > per_alpha[last].len(),
            });
            for &schedule in config.alpha_schedules.iter().filter(|s| **s != AlphaSchedule::Constant) {
                for (i, &alpha) in alphas.iter().enumerate().filter(|(_, &a)| a > 0.0) {
                    let group = select(runs, Some(n), beta, alpha, schedule);
                    let mine = final_gaps(&group);
                    let paired = |other: &[f64]| mine.iter().zip(other).filter(|(m, o)| m <= o).count();
                    let restarts: Vec<f64> = group
                        .iter()
                        .map(|r| r.records[1..].iter().filter(|rec| rec.alpha_used == 0.0).count() as f64)
                        .collect();
                    let reach = |g: &[&Run]| ReachStats::of(&iterations_to(g, config.target_gap), g.len());
                    adaptive.push(AdaptiveComparison {
                        alpha_schedule: schedule,
                        n,
                        beta,
                        alpha,
                        final_gap: Spread::of(&mine),
                        constant_final_gap: spreads[i],
                        alpha0_final_gap: Spread::of(&per_alpha[0]),
                        best_constant_alpha: alphas[best],
                        best_constant_final_gap: spreads[best],
                        iterations_to_target: reach(&group),
                        alpha0_iterations_to_target: reach(&constant(Some(n), beta, alphas[0])),
                        best_constant_iterations_to_target: reach(&constant(Some(n), beta, alphas[best])),
                        seeds_at_least_as_good_as_alpha0: paired(&per_alpha[0]),
                        seeds_at_least_as_good_as_best_constant: paired(&per_alpha[best]),
                        seeds: mine.len(),
                        restarts_per_run: Spread::of(&restarts),
                    });
                }
            }
        }
    }

    Summary {
        loss: config.loss.as_str().to_string(),
        gap_metric: if problem.rewards.is_some() { "reward_gap" } else { "exploitability" }.to_string(),
        target_gap: config.target_gap,
        iterations: config.iterations,
        rate_margin: margin,
        groups,
        tradeoff,
        adaptive,
    }
}

/// The first iteration at which each run's gap is at most `target` (runs that never get
/// there are left out).
fn iterations_to(group: &[&Run], target: f64) -> Vec<f64> {
    group
        .iter()
        .filter_map(|r| r.records.iter().find(|rec| rec.gap() <= target).map(|rec| rec.iteration as f64))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_config(seeds: &str) -> Config {
        let text = format!(
            "rewards = [[0.0, 0.5, 1.0], [0.2, 1.0, 0.0]]\nalphas = [0.0, 0.5]\nns = [20]\nseeds = {seeds}\niterations = 6\n"
        );
        Config::from_toml_str(&text).unwrap()
    }

    #[test]
    fn sweep_has_one_record_per_run_and_iteration() {
        let out = run_sweep(&tiny_config("[0, 1]")).unwrap();
        // exact: 2 alphas; sampled: 2 alphas x 2 seeds; 7 records each.
        assert_eq!(out.runs.len(), 2 + 4);
        assert_eq!(out.records().count(), 6 * 7);
        let first = out.records().next().unwrap();
        assert_eq!((first.iteration, first.n, first.seed), (0, None, None));
        assert_eq!(out.summary.groups.len(), 4);
        assert_eq!(out.summary.tradeoff.len(), 1);
    }

    #[test]
    fn same_seed_same_records() {
        let a = run_sweep(&tiny_config("[0, 1]")).unwrap();
        let b = run_sweep(&tiny_config("[0, 1]")).unwrap();
        assert!(a.records().eq(b.records()));
        let c = run_sweep(&tiny_config("[5, 6]")).unwrap();
        assert!(!a.records().eq(c.records()));
    }

    #[test]
    fn exact_rate_grows_like_one_over_one_minus_alpha() {
        let config = Config::from_toml_str(
            "mode = \"exact\"\nrewards = [[0.0, 0.1, 0.3], [0.0, 0.2, 0.1]]\nalphas = [0.0, 0.5]\niterations = 400\nbetas = [1.0]",
        )
        .unwrap();
        let out = run_sweep(&config).unwrap();
        assert_eq!(out.summary.rate_margin, Some(0.1));
        for g in &out.summary.groups {
            let ratio = g.rate_ratio.unwrap();
            assert!((ratio - 1.0).abs() < 0.1, "alpha {}: ratio {ratio}", g.alpha);
        }
    }

    #[test]
    fn log_slope_of_an_exponential() {
        let gaps: Vec<f64> = (0..10).map(|t| 3.0 * (-0.7 * t as f64).exp()).collect();
        let (s, k) = fit_log_slope(&gaps, 1e-12).unwrap();
        assert!((s + 0.7).abs() < 1e-12);
        assert_eq!(k, 9);
    }
}
