//! Online experiment: iterative DPO (alpha 0) against APO (alpha > 0, constant or with
//! prefopt's restart rule), one `prefopt apo` run per (method, seed) with the same prompts,
//! oracle, sampling and training budget.

use std::path::Path;

use prefopt_loop::apo::{run_apo, ApoConfig, BetaSchedule, Extrapolation};
use prefopt_loop::evaluate::EvalMetrics;

use crate::recipe::{OnlineMethod, Recipe};
use crate::summary::RunRow;
use crate::{DemoError, DemoObserver};

/// The run folder of one (method, seed).
pub fn run_dir(out: &Path, method: &OnlineMethod, seed: u64) -> std::path::PathBuf {
    out.join("online").join(&method.name).join(format!("seed-{seed}"))
}

/// The loop's config for one (method, seed): training prompts and held-out prompts drawn by
/// the task from the seed, so every method of a seed sees the same prompts.
pub fn apo_config(
    recipe: &Recipe,
    base: &Path,
    out: &Path,
    device: &str,
    method: &OnlineMethod,
    seed: u64,
) -> ApoConfig {
    let mut train = recipe.train.clone();
    train.insert("loss_type".into(), toml::Value::String("sigmoid".into()));
    train.insert("seed".into(), toml::Value::Integer(seed as i64));
    ApoConfig {
        model: base.to_path_buf(),
        prompts: format!("task:{}", recipe.task),
        num_prompts: recipe.prompts_per_iteration * recipe.iterations,
        judge: recipe.task.clone(),
        iterations: recipe.iterations,
        prompts_per_iteration: recipe.prompts_per_iteration,
        num_samples: recipe.num_samples,
        alpha: method.alpha,
        alpha_schedule: method.alpha_schedule,
        beta: BetaSchedule::One(recipe.beta),
        extrapolation: Extrapolation::Parameter,
        eval_prompts: None,
        num_eval_prompts: recipe.num_eval_prompts,
        seed,
        temperature: recipe.temperature,
        top_p: recipe.top_p,
        top_k: 0,
        max_new_tokens: recipe.max_new_tokens,
        output_dir: run_dir(out, method, seed),
        device: device.to_string(),
        train,
        ..ApoConfig::default()
    }
}

/// Runs (or resumes) every (method, seed) and returns one row per iteration, iteration 0 being
/// the base model on that seed's held-out prompts.
pub fn run_online<O: DemoObserver>(
    recipe: &Recipe,
    base: &Path,
    out: &Path,
    device: &str,
    obs: &mut O,
) -> Result<Vec<RunRow>, DemoError> {
    let mut rows = Vec::new();
    let total = recipe.online_methods.len() * recipe.seeds.len();
    let mut done = 0;
    for &seed in &recipe.seeds {
        for method in &recipe.online_methods {
            obs.run_started(done, total, &format!("online {} seed {seed}", method.name));
            let cfg = apo_config(recipe, base, out, device, method, seed);
            let manifest = run_apo(&cfg, obs)?;
            let base_eval = manifest.base_eval.clone().unwrap_or_default();
            rows.push(online_row(method, seed, 0, None, &base_eval, &base_eval));
            for it in &manifest.iterations {
                let (Some(trained), Some(extrapolated)) = (&it.eval_trained, &it.eval_extrapolated) else {
                    return Err(DemoError::Incomplete {
                        path: cfg.output_dir.clone(),
                        message: format!("iteration {} has no evaluation", it.iteration),
                    });
                };
                rows.push(online_row(method, seed, it.iteration, Some(it.alpha), trained, extrapolated));
            }
            done += 1;
        }
    }
    obs.run_started(done, total, "online done");
    Ok(rows)
}

fn online_row(
    method: &OnlineMethod,
    seed: u64,
    iteration: usize,
    alpha_used: Option<f64>,
    trained: &EvalMetrics,
    extrapolated: &EvalMetrics,
) -> RunRow {
    RunRow {
        experiment: "online".into(),
        method: method.name.clone(),
        alpha: Some(method.alpha),
        alpha_used,
        seed,
        iteration: Some(iteration),
        eval_reward: trained.eval_reward,
        eval_accuracy: trained.eval_accuracy,
        malformed_rate: trained.malformed_rate,
        win_rate_vs_base: trained.win_rate_vs_base,
        kl_to_base: trained.kl_to_base,
        extrapolated_eval_reward: Some(extrapolated.eval_reward),
        extrapolated_eval_accuracy: extrapolated.eval_accuracy,
        logp_chosen_delta: None,
        logp_rejected_delta: None,
    }
}
