//! Offline experiment: one preference set per seed, sampled from the base model and ranked by
//! the oracle; every method (DPO, SPO on DPO, SimPO, SPO on SimPO) trains on it from the base
//! with the same budget. Tracked: the chosen and rejected log-probs over training (SPO's
//! claim: the preferred response's likelihood does not collapse), and held-out accuracy and
//! malformed rate (the claim: no drift to out-of-distribution answers).

use std::path::Path;

use candle_core::Device;
use prefopt_data::{parse_preference, read_records, tokenize_pair, HfTokenizer, PairOutcome, TokenizeOptions};
use prefopt_loop::apo::load_prompts;
use prefopt_loop::evaluate::{evaluate_model, BaseSamples, EvalMetrics};
use prefopt_loop::judge::{judge_from_spec, PromptItem};
use prefopt_loop::pairing::judge_and_pair;
use prefopt_loop::sampling::{sample_prompts, Sampling};
use prefopt_model::HfModel;
use prefopt_train::{completion_logps, train, SequenceBatch, TrainConfig};
use serde::{Deserialize, Serialize};

use prefopt_loop::apo::{read_jsonl, write_jsonl};

use crate::json_files::{read_json, write_json};
use crate::recipe::{OfflineMethod, Recipe};
use crate::summary::RunRow;
use crate::{DemoError, DemoObserver};

/// Mean summed log-probs of the chosen and rejected responses of a preference set over
/// training; step 0 is the base model.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogpTrajectory {
    pub method: String,
    pub seed: u64,
    pub steps: Vec<usize>,
    pub logps_chosen: Vec<f64>,
    pub logps_rejected: Vec<f64>,
}

/// Held-out prompts of a seed: the same ones the online runs of that seed use.
pub fn eval_prompts(recipe: &Recipe, seed: u64) -> Result<Vec<PromptItem>, DemoError> {
    Ok(load_prompts(&format!("task:{}", recipe.task), recipe.num_eval_prompts, seed.wrapping_add(1_000_003))?)
}

pub fn sampling(recipe: &Recipe) -> Sampling {
    Sampling { temperature: recipe.temperature, top_p: recipe.top_p, top_k: 0, max_new_tokens: recipe.max_new_tokens }
}

/// Runs (or resumes: every finished file is kept and reused) the offline experiment.
pub fn run_offline<O: DemoObserver>(
    recipe: &Recipe,
    base: &Path,
    out: &Path,
    obs: &mut O,
) -> Result<(Vec<RunRow>, Vec<LogpTrajectory>), DemoError> {
    let device = Device::Cpu;
    let tok = HfTokenizer::from_dir(base)?;
    let mut judge = judge_from_spec(&recipe.task, &device)?;
    let sampling = sampling(recipe);
    let total = recipe.seeds.len() * (1 + recipe.offline_methods.len());
    let mut done = 0;
    let (mut rows, mut trajectories) = (Vec::new(), Vec::new());
    for &seed in &recipe.seeds {
        let dir = out.join("offline").join(format!("seed-{seed}"));
        std::fs::create_dir_all(&dir).map_err(|e| DemoError::io(&dir, e))?;

        // One preference set per seed, from the base model's own samples.
        obs.run_started(done, total, &format!("offline seed {seed}: sampling the preference set"));
        let pairs_path = dir.join("pairs.jsonl");
        if !pairs_path.exists() {
            let prompts = load_prompts(&format!("task:{}", recipe.task), recipe.offline_prompts, seed)?;
            let refs: Vec<&PromptItem> = prompts.iter().collect();
            let model = HfModel::load(base, &device)?;
            let samples =
                sample_prompts(&model, &tok, &refs, recipe.num_samples, &sampling, seed, &device, &mut |d, t| {
                    obs.samples(d, t)
                })?;
            let (pairs, _) = judge_and_pair(judge.as_mut(), &samples, recipe.num_samples)?;
            write_jsonl(&dir.join("samples.jsonl"), &samples)?;
            write_jsonl(&pairs_path, &pairs)?;
        }
        let base_eval = BaseSamples::load_or_make(
            &dir.join("eval-base.jsonl"),
            base,
            &tok,
            &eval_prompts(recipe, seed)?,
            &sampling,
            seed,
            judge.as_mut(),
            &device,
        )?;
        let opts = TokenizeOptions { max_length: Some(max_length(recipe)), max_prompt_length: Some(512) };
        let base_logps =
            cached(&dir.join("base-logps.json"), || mean_pair_logps(base, &pairs_path, &tok, &opts, &device))?;
        done += 1;

        for method in &recipe.offline_methods {
            obs.run_started(done, total, &format!("offline seed {seed}: {}", method.name));
            let run = dir.join(&method.name);
            let cfg = train_config(recipe, method, base, &pairs_path, &run, seed)?;
            if !run.join("final").exists() {
                train(&cfg, obs)?;
            }
            let eval = cached(&run.join("eval.json"), || {
                let prompts = eval_prompts(recipe, seed)?;
                Ok(evaluate_model(
                    &run.join("final"),
                    &tok,
                    &prompts,
                    &sampling,
                    seed,
                    judge.as_mut(),
                    &base_eval,
                    &device,
                )?)
            })?;
            let trajectory = read_trajectory(&run.join("metrics.jsonl"), &method.name, seed, base_logps)?;
            rows.push(offline_row(&method.name, seed, &eval, &trajectory));
            trajectories.push(trajectory);
            done += 1;
        }
        rows.push(offline_row(
            "base",
            seed,
            &base_eval.metrics,
            &LogpTrajectory {
                method: "base".into(),
                seed,
                steps: vec![0],
                logps_chosen: vec![base_logps.0],
                logps_rejected: vec![base_logps.1],
            },
        ));
    }
    obs.run_started(done, total, "offline done");
    Ok((rows, trajectories))
}

/// The method's training config: the shared keys, the method's own, and the run's paths.
fn train_config(
    recipe: &Recipe,
    method: &OfflineMethod,
    base: &Path,
    pairs: &Path,
    out: &Path,
    seed: u64,
) -> Result<TrainConfig, DemoError> {
    let mut table = recipe.train.clone();
    table.extend(recipe.offline_train.clone());
    table.extend(method.train.clone());
    let path = |p: &Path| toml::Value::String(p.display().to_string());
    table.insert("model".into(), path(base));
    table.insert("ref_model".into(), path(base));
    table.insert("train_data".into(), path(pairs));
    table.insert("eval_data".into(), path(pairs));
    table.insert("eval_steps".into(), toml::Value::Integer(recipe.offline_eval_steps as i64));
    table.insert("output_dir".into(), path(out));
    table.insert("seed".into(), toml::Value::Integer(seed as i64));
    table.insert("resume_from_checkpoint".into(), toml::Value::String("latest".into()));
    TrainConfig::from_table(&table).map_err(|e| DemoError::Config(format!("{}: {e}", method.name)))
}

/// Reads a value cached as JSON at `path`, or computes and caches it.
fn cached<T: Serialize + for<'de> Deserialize<'de>>(
    path: &Path,
    make: impl FnOnce() -> Result<T, DemoError>,
) -> Result<T, DemoError> {
    if path.exists() {
        return read_json(path);
    }
    let value = make()?;
    write_json(path, &value)?;
    Ok(value)
}

/// The training runs' `max_length` (the recipe's, else the trainer's default), so the base
/// model's log-probs are taken over the same tokens as the runs' `eval_logps/*` (the prompt
/// budget is the trainer's default, 512, which the recipe does not change).
fn max_length(recipe: &Recipe) -> usize {
    recipe.train.get("max_length").and_then(|v| v.as_integer()).map_or(1024, |v| v as usize)
}

/// Mean summed completion log-probs (chosen, rejected) of a preference file under a model,
/// with the trainer's tokenization (the same numbers as its `eval_logps/*`).
fn mean_pair_logps(
    model_dir: &Path,
    pairs: &Path,
    tok: &HfTokenizer,
    opts: &TokenizeOptions,
    device: &Device,
) -> Result<(f64, f64), DemoError> {
    let net = HfModel::load(model_dir, device)?.build(false)?;
    let mut kept = Vec::new();
    for record in read_records(pairs)? {
        if let PairOutcome::Kept(pair) = tokenize_pair(tok, &parse_preference(&record)?, opts)? {
            kept.push(pair);
        }
    }
    let pad = tok.pad_token_id().unwrap_or(0);
    let (mut chosen, mut rejected) = (0.0, 0.0);
    for chunk in kept.chunks(16) {
        for (side, sum) in [(0, &mut chosen), (1, &mut rejected)] {
            let seqs: Vec<_> = chunk.iter().map(|p| if side == 0 { &p.chosen } else { &p.rejected }).collect();
            let batch = SequenceBatch::new(&seqs, pad, device).map_err(prefopt_model::ModelError::from)?;
            let lp: Vec<f32> =
                completion_logps(&net, &batch)?.logps.to_vec1().map_err(prefopt_model::ModelError::from)?;
            *sum += lp.iter().map(|&x| f64::from(x)).sum::<f64>();
        }
    }
    let n = kept.len().max(1) as f64;
    Ok((chosen / n, rejected / n))
}

/// `eval_logps/chosen` and `eval_logps/rejected` of a run's metrics, after the base's values.
fn read_trajectory(metrics: &Path, method: &str, seed: u64, base: (f64, f64)) -> Result<LogpTrajectory, DemoError> {
    let mut t = LogpTrajectory {
        method: method.into(),
        seed,
        steps: vec![0],
        logps_chosen: vec![base.0],
        logps_rejected: vec![base.1],
    };
    for line in read_jsonl::<serde_json::Value>(metrics)? {
        if let (Some(step), Some(c), Some(r)) = (
            line.get("step").and_then(|v| v.as_u64()),
            line.get("eval_logps/chosen").and_then(|v| v.as_f64()),
            line.get("eval_logps/rejected").and_then(|v| v.as_f64()),
        ) {
            t.steps.push(step as usize);
            t.logps_chosen.push(c);
            t.logps_rejected.push(r);
        }
    }
    if t.steps.len() < 2 {
        return Err(DemoError::Incomplete(format!("{}: no eval_logps/chosen lines", metrics.display())));
    }
    Ok(t)
}

fn offline_row(method: &str, seed: u64, eval: &EvalMetrics, t: &LogpTrajectory) -> RunRow {
    let last = t.steps.len() - 1;
    RunRow {
        experiment: "offline".into(),
        method: method.into(),
        alpha: None,
        seed,
        iteration: None,
        eval_reward: eval.eval_reward,
        eval_accuracy: eval.eval_accuracy,
        malformed_rate: eval.malformed_rate,
        win_rate_vs_base: eval.win_rate_vs_base,
        kl_to_base: eval.kl_to_base,
        extrapolated_eval_reward: None,
        extrapolated_eval_accuracy: None,
        logp_chosen_delta: Some(t.logps_chosen[last] - t.logps_chosen[0]),
        logp_rejected_delta: Some(t.logps_rejected[last] - t.logps_rejected[0]),
    }
}
