//! Offline experiment: one preference set per seed, sampled from the base model and ranked by
//! the oracle; every method (DPO, SPO on DPO, SimPO, SPO on SimPO) trains on it from the base
//! with the same budget. Tracked: the chosen and rejected log-probs over training (SPO's
//! claim: the preferred response's likelihood does not collapse), and held-out accuracy and
//! malformed rate (the claim: no drift to out-of-distribution answers).

use std::path::Path;

use prefopt_data::{HfTokenizer, TokenizeOptions};
use prefopt_fs::{read_json, read_jsonl, write_json, write_jsonl};
use prefopt_loop::apo::load_prompts;
use prefopt_loop::evaluate::{evaluate_model, BaseSamples, EvalMetrics};
use prefopt_loop::judge::{judge_from_spec, PromptItem};
use prefopt_loop::pairing::judge_and_pair;
use prefopt_loop::sampling::{sample_records, sampling_params};
use prefopt_loop::seeds;
use prefopt_model::{HfModel, Mode, Precision, SamplingParams};
use prefopt_train::dataset::PairDataset;
use prefopt_train::{score_pairs, train, TrainConfig};
use serde::{Deserialize, Serialize};

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
    Ok(load_prompts(&format!("task:{}", recipe.task), recipe.num_eval_prompts, seeds::eval_prompts(seed))?)
}

/// The recipe's sampler for the base model's tokenizer.
pub fn sampling(recipe: &Recipe, tok: &HfTokenizer) -> SamplingParams {
    sampling_params(tok, recipe.temperature, recipe.top_p, 0, recipe.max_new_tokens)
}

/// Runs (or resumes: every finished file is kept and reused) the offline experiment.
pub fn run_offline<O: DemoObserver>(
    recipe: &Recipe,
    base: &Path,
    out: &Path,
    device_spec: &str,
    obs: &mut O,
) -> Result<(Vec<RunRow>, Vec<LogpTrajectory>), DemoError> {
    let device = prefopt_model::parse_device(device_spec)?;
    let tok = HfTokenizer::from_dir(base)?;
    let mut judge = judge_from_spec(&recipe.task, &device)?;
    let sampling = sampling(recipe, &tok);
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
            let net = HfModel::load(base, &device)?.build(Mode::Infer, Precision::F32)?;
            let samples =
                sample_records(&net, &tok, &refs, recipe.num_samples, &sampling, seed, &mut |d, t| obs.samples(d, t))?;
            let samples_path = dir.join("samples.jsonl");
            let (pairs, _) =
                judge_and_pair(judge.as_mut(), &samples, &samples_path, recipe.num_samples, &mut |_, _| {})?;
            write_jsonl(&samples_path, &samples)?;
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
        // The runs' tokenization (the length keys are shared by every method), so the base
        // model's log-probs are taken over the same tokens as the runs' `eval_logps/*`.
        let first = recipe.offline_methods.first().ok_or_else(|| DemoError::Method {
            method: "offline".into(),
            message: "the recipe has no offline methods".into(),
        })?;
        let opts = train_config(recipe, first, base, &pairs_path, &dir, device_spec, seed)?.tokenize_options();
        let base_logps =
            cached(&dir.join("base-logps.json"), || mean_pair_logps(base, &pairs_path, &tok, &opts, &device))?;
        done += 1;

        for method in &recipe.offline_methods {
            obs.run_started(done, total, &format!("offline seed {seed}: {}", method.name));
            let run = dir.join(&method.name);
            let cfg = train_config(recipe, method, base, &pairs_path, &run, device_spec, seed)?;
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
    device: &str,
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
    table.insert("device".into(), toml::Value::String(device.into()));
    TrainConfig::from_table(&table).map_err(|message| DemoError::Method { method: method.name.clone(), message })
}

/// Reads a value cached as JSON at `path`, or computes and caches it.
fn cached<T: Serialize + for<'de> Deserialize<'de>>(
    path: &Path,
    make: impl FnOnce() -> Result<T, DemoError>,
) -> Result<T, DemoError> {
    if path.exists() {
        return Ok(read_json(path)?);
    }
    let value = make()?;
    write_json(path, &value)?;
    Ok(value)
}

/// Mean summed completion log-probs (chosen, rejected) of a preference file under a model,
/// with the trainer's tokenization (the same numbers as its `eval_logps/*`).
fn mean_pair_logps(
    model_dir: &Path,
    pairs: &Path,
    tok: &HfTokenizer,
    opts: &TokenizeOptions,
    device: &candle_core::Device,
) -> Result<(f64, f64), DemoError> {
    let net = HfModel::load(model_dir, device)?.build(Mode::Infer, Precision::F32)?;
    let data = PairDataset::load(pairs, tok, opts)?;
    let pairs: Vec<_> = data.pairs.iter().collect();
    let lp = score_pairs(&net, &pairs, 16, TrainConfig::default().batch_layout(tok.padding_id()), |_| {})?;
    let chosen: f64 = lp.iter().map(|&(w, _)| f64::from(w)).sum();
    let rejected: f64 = lp.iter().map(|&(_, l)| f64::from(l)).sum();
    let n = lp.len().max(1) as f64;
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
        return Err(DemoError::Incomplete {
            path: metrics.to_path_buf(),
            message: "no eval_logps/chosen lines".into(),
        });
    }
    Ok(t)
}

fn offline_row(method: &str, seed: u64, eval: &EvalMetrics, t: &LogpTrajectory) -> RunRow {
    let last = t.steps.len() - 1;
    RunRow {
        experiment: "offline".into(),
        method: method.into(),
        alpha: None,
        alpha_used: None,
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
