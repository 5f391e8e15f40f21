//! `prefopt apo`: Accelerated Preference Optimization, methods.md section 3, as one
//! resumable command.
//!
//! ```text
//! pi_0 = pi_hat_0 = base
//! for t = 1..=T:                                     (directories iter-<t>, from 1)
//!     samples  K completions per prompt from pi_{t-1}          iter-t/samples.jsonl
//!     pairs    judge; best vs worst; ties skipped              iter-t/pairs.jsonl
//!     reference  (`extrapolation = "logprob"`, t >= 2) the pairs with the exact
//!              extrapolated reference's log-probs          iter-t/pairs-ref.jsonl
//!     trained  pi_hat_t: train on the pairs, reference pi_{t-1},
//!              starting from pi_{t-1}'s weights               iter-t/trained/
//!     extrapolated  pi_t = pi_hat_t + alpha (pi_hat_t - pi_hat_{t-1})   iter-t/extrapolated/
//!     metrics  held-out evaluation of pi_hat_t and pi_t        iter-t/metrics.jsonl
//! ```
//! Every stage writes its output atomically and is skipped when that output exists, so a
//! killed run, rerun with the same command, continues from the last finished stage.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::Device;
use prefopt_data::{parse_prompt, read_records, HfTokenizer, TokenizeOptions};
use prefopt_model::{save_model_dir, HfModel};
use prefopt_train::TrainConfig;
use serde::{Deserialize, Serialize};

use crate::evaluate::{evaluate_model, BaseSamples, EvalMetrics};
use crate::extrapolate::{extrapolate, extrapolate_logps};
use crate::judge::{judge_from_spec_with, JudgeOptions, PromptItem};
use crate::sampling::{sample_prompts, SampleRecord, Sampling};
use crate::LoopError;

/// `beta`: one value for every iteration, or one per iteration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BetaSchedule {
    One(f64),
    PerIteration(Vec<f64>),
}

/// How the extrapolated policy `pi_t ∝ pi_hat_t (pi_hat_t / pi_hat_{t-1})^alpha` enters the
/// next iteration. Both modes write the parameter-extrapolated weights to
/// `iter-<t>/extrapolated/` and sample from them; they differ in the reference of the loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Extrapolation {
    /// Weights `theta_t = theta_hat_t + alpha (theta_hat_t - theta_hat_{t-1})`: the sampler,
    /// the training start and the reference of the next iteration (the paper's experiments).
    /// Exact only for log-linear policies.
    Parameter,
    /// The sampler and training start as with `parameter`, but the reference is the exact
    /// policy-space step: `lp_ref(y) = (1+alpha) lp_{pi_hat_t}(y) - alpha lp_{pi_hat_{t-1}}(y)`
    /// (the prompt-only normalizer cancels in every pairwise loss), computed from the two last
    /// trained models and written into `iter-<t+1>/pairs-ref.jsonl` as TRL's
    /// `ref_chosen_logps`/`ref_rejected_logps` columns. Iteration 1's reference is the base,
    /// as in both modes.
    Logprob,
}

/// Every key of an APO run.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApoConfig {
    /// Base model folder (pi_0). Required.
    pub model: PathBuf,
    /// Training prompts: a JSONL/Parquet file (`prompt` or `messages`) or `task:<name>`.
    pub prompts: String,
    /// Prompts generated for `task:<name>` (default 256).
    pub num_prompts: usize,
    /// Oracle: a built-in task name, `rm:<folder>` or `cmd:<shell command>`. Required.
    pub judge: String,
    /// Longest one call of a `cmd:` judge may run (all prompts of a stage), in seconds;
    /// then its whole process group is killed and the run stops (default 300).
    pub judge_timeout_s: f64,
    /// Iterations T (default 3, as the paper).
    pub iterations: usize,
    /// Prompts per iteration (default 64); iteration t takes the next fold of the shuffled
    /// prompts, wrapping around when they run out.
    pub prompts_per_iteration: usize,
    /// Completions sampled per prompt, K (default 5, as the paper).
    pub num_samples: usize,
    /// Nesterov momentum alpha (default 0.3, the paper's); 0 is iterative DPO.
    pub alpha: f64,
    /// KL strength: a number or one per iteration (default 0.1).
    pub beta: BetaSchedule,
    /// `"parameter"` (default, the paper's) or `"logprob"` (exact reference, same sampler);
    /// see [`Extrapolation`].
    pub extrapolation: Extrapolation,
    /// Held-out prompts: a file or `task:<name>` (default: the training task, other seed).
    pub eval_prompts: Option<String>,
    /// Held-out prompts generated for a task (default 64).
    pub num_eval_prompts: usize,
    /// Seeds prompt order, sampling and evaluation (default 0).
    pub seed: u64,
    /// Sampling (defaults 0.7 / 0.9, the paper's; top_k 0 = off; 64 new tokens).
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub max_new_tokens: usize,
    /// Where iterations go. Required.
    pub output_dir: PathBuf,
    /// Training keys of `prefopt train` for the inner step (not `model`, `ref_model`,
    /// `train_data`, `output_dir`, `beta`: the loop sets those).
    pub train: toml::Table,
}

impl Default for ApoConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            prompts: String::new(),
            num_prompts: 256,
            judge: String::new(),
            judge_timeout_s: 300.0,
            iterations: 3,
            prompts_per_iteration: 64,
            num_samples: 5,
            alpha: 0.3,
            beta: BetaSchedule::One(0.1),
            extrapolation: Extrapolation::Parameter,
            eval_prompts: None,
            num_eval_prompts: 64,
            seed: 0,
            temperature: 0.7,
            top_p: 0.9,
            top_k: 0,
            max_new_tokens: 64,
            output_dir: PathBuf::new(),
            train: toml::Table::new(),
        }
    }
}

const LOOP_SET_KEYS: [&str; 6] = ["model", "ref_model", "train_data", "output_dir", "beta", "resume_from_checkpoint"];

impl ApoConfig {
    /// Reads a TOML file with `key=value` overrides (`train.learning_rate=1e-6` reaches the
    /// `[train]` table) and validates it; errors name the file and key.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self, LoopError> {
        let name = path.map_or("--set".to_string(), |p| p.display().to_string());
        let err = |m: String| LoopError::Config(format!("{name}: {m}"));
        let mut text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|e| err(e.to_string()))?,
            None => String::new(),
        };
        if !overrides.is_empty() {
            let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| err(e.to_string()))?;
            for o in overrides {
                let (key, value) = prefopt_train::config::parse_override(o).map_err(&err)?;
                let mut slot = &mut table;
                let parts: Vec<&str> = key.split('.').collect();
                for part in &parts[..parts.len() - 1] {
                    slot = slot
                        .entry(part.to_string())
                        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                        .as_table_mut()
                        .ok_or_else(|| err(format!("--set `{key}`: `{part}` is not a table")))?;
                }
                slot.insert(parts[parts.len() - 1].to_string(), value);
            }
            text = toml::to_string(&table).map_err(|e| err(e.to_string()))?;
        }
        let cfg: ApoConfig = toml::from_str(&text).map_err(|e: toml::de::Error| err(e.to_string()))?;
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        for (key, empty) in [
            ("model", self.model.as_os_str().is_empty()),
            ("prompts", self.prompts.is_empty()),
            ("judge", self.judge.is_empty()),
            ("output_dir", self.output_dir.as_os_str().is_empty()),
        ] {
            if empty {
                return Err(format!("missing required key `{key}`"));
            }
        }
        if self.iterations == 0 || self.prompts_per_iteration == 0 || self.num_samples < 2 {
            return Err("`iterations` and `prompts_per_iteration` must be at least 1, `num_samples` at least 2".into());
        }
        if !(self.judge_timeout_s > 0.0 && self.judge_timeout_s.is_finite()) {
            return Err(format!(
                "`judge_timeout_s` must be a positive number of seconds, got {}",
                self.judge_timeout_s
            ));
        }
        if !(0.0..1.0).contains(&self.alpha) {
            return Err(format!("`alpha` must be in [0, 1), got {}", self.alpha));
        }
        if let BetaSchedule::PerIteration(b) = &self.beta {
            if b.len() != self.iterations {
                return Err(format!("`beta` lists {} values for {} iterations", b.len(), self.iterations));
            }
        }
        if let Some(key) = self.train.keys().find(|k| LOOP_SET_KEYS.contains(&k.as_str())) {
            return Err(format!("`train.{key}` is set by the loop itself; remove it"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) || self.temperature < 0.0 {
            return Err("`top_p` must be in (0, 1] and `temperature` >= 0".into());
        }
        Ok(())
    }

    /// beta of iteration t (1-based).
    pub fn beta_at(&self, t: usize) -> f64 {
        match &self.beta {
            BetaSchedule::One(b) => *b,
            BetaSchedule::PerIteration(b) => b[t - 1],
        }
    }

    /// The inner training config of iteration t: `[train]` keys, plus the loop's own.
    fn train_config(&self, t: usize, start: &Path, pairs: &Path, out: &Path) -> Result<TrainConfig, LoopError> {
        let mut table = self.train.clone();
        let path = |p: &Path| toml::Value::String(p.display().to_string());
        table.insert("model".into(), path(start));
        table.insert("ref_model".into(), path(start));
        table.insert("train_data".into(), path(pairs));
        table.insert("output_dir".into(), path(out));
        table.insert("beta".into(), toml::Value::Float(self.beta_at(t)));
        table.insert("resume_from_checkpoint".into(), toml::Value::String("latest".into()));
        TrainConfig::from_table(&table).map_err(|e| LoopError::Config(format!("[train]: {e}")))
    }
}

/// What the loop reports as it goes (the CLI draws progress from it).
pub trait LoopObserver: prefopt_train::Observer {
    fn stage(&mut self, _iteration: usize, _stage: &str) {}
    fn samples(&mut self, _done: usize, _total: usize) {}
}

/// One iteration's record in `manifest.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IterationRecord {
    pub iteration: usize,
    pub alpha: f64,
    pub beta: f64,
    pub samples: PathBuf,
    pub pairs: PathBuf,
    pub trained: PathBuf,
    pub extrapolated: PathBuf,
    pub pair_count: usize,
    pub skipped_prompts: usize,
    /// `extrapolation = "logprob"`, from iteration 2: the pairs with the extrapolated
    /// reference's log-probs, which training reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_pairs: Option<PathBuf>,
    pub eval_trained: Option<EvalMetrics>,
    pub eval_extrapolated: Option<EvalMetrics>,
    /// Seconds per stage (sampling, judging, training, extrapolation, evaluation) in this
    /// process; a resumed stage counts only the time of the run that finished it.
    pub wall_s: std::collections::BTreeMap<String, f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub config: serde_json::Value,
    pub base_eval: Option<EvalMetrics>,
    pub iterations: Vec<IterationRecord>,
}

/// Runs (or resumes) the whole loop; returns the manifest.
pub fn run_apo(cfg: &ApoConfig, obs: &mut dyn LoopObserver) -> Result<Manifest, LoopError> {
    let device = Device::Cpu;
    let out = &cfg.output_dir;
    std::fs::create_dir_all(out).map_err(|e| LoopError::Io(format!("output_dir {}: {e}", out.display())))?;
    let manifest_path = out.join("manifest.json");
    let config_json = serde_json::to_value(cfg).map_err(|e| LoopError::Io(e.to_string()))?;
    let mut manifest = match std::fs::read_to_string(&manifest_path) {
        Ok(text) => {
            let m: Manifest =
                serde_json::from_str(&text).map_err(|e| LoopError::Io(format!("{}: {e}", manifest_path.display())))?;
            if without_operational_keys(&m.config) != without_operational_keys(&config_json) {
                return Err(LoopError::Config(format!(
                    "{} holds a run with another config; use another output_dir (or the same config to resume)",
                    out.display()
                )));
            }
            obs.message(&format!("resuming the run in {}", out.display()));
            Manifest { config: config_json, ..m }
        }
        Err(_) => Manifest { config: config_json, ..Manifest::default() },
    };
    let save_manifest = |m: &Manifest| -> Result<(), LoopError> {
        let text = serde_json::to_string_pretty(m).map_err(|e| LoopError::Io(e.to_string()))?;
        prefopt_model::fsio::write_atomic(&manifest_path, text.as_bytes())?;
        Ok(())
    };

    let tok = HfTokenizer::from_dir(&cfg.model)?;
    let judge_options = JudgeOptions { command_timeout: Duration::from_secs_f64(cfg.judge_timeout_s) };
    let mut judge = judge_from_spec_with(&cfg.judge, &device, &judge_options)?;
    let train_prompts = load_prompts(&cfg.prompts, cfg.num_prompts, cfg.seed)?;
    let eval_spec = cfg.eval_prompts.clone().unwrap_or_else(|| cfg.prompts.clone());
    let eval_prompts = load_prompts(&eval_spec, cfg.num_eval_prompts, cfg.seed.wrapping_add(1_000_003))?;
    if train_prompts.is_empty() {
        return Err(LoopError::Config(format!("prompts `{}`: no prompts", cfg.prompts)));
    }
    let sampling = Sampling {
        temperature: cfg.temperature,
        top_p: cfg.top_p,
        top_k: cfg.top_k,
        max_new_tokens: cfg.max_new_tokens,
    };
    // The base model's held-out samples: the baseline of every win rate and KL estimate.
    let base = BaseSamples::load_or_make(
        &out.join("eval-base.jsonl"),
        &cfg.model,
        &tok,
        &eval_prompts,
        &sampling,
        cfg.seed,
        judge.as_mut(),
        &device,
    )?;
    if manifest.base_eval.is_none() {
        manifest.base_eval = Some(base.metrics.clone());
        save_manifest(&manifest)?;
    }

    let order = fold_order(train_prompts.len(), cfg.seed);
    for t in 1..=cfg.iterations {
        let dir = out.join(format!("iter-{t}"));
        std::fs::create_dir_all(&dir).map_err(|e| LoopError::Io(format!("{}: {e}", dir.display())))?;
        let sampler = if t == 1 { cfg.model.clone() } else { out.join(format!("iter-{}/extrapolated", t - 1)) };
        let previous_trained = if t == 1 { cfg.model.clone() } else { out.join(format!("iter-{}/trained", t - 1)) };
        let mut record =
            manifest.iterations.iter().find(|r| r.iteration == t).cloned().unwrap_or_else(|| IterationRecord {
                iteration: t,
                alpha: cfg.alpha,
                beta: cfg.beta_at(t),
                samples: dir.join("samples.jsonl"),
                pairs: dir.join("pairs.jsonl"),
                trained: dir.join("trained"),
                extrapolated: dir.join("extrapolated"),
                ..IterationRecord::default()
            });

        // 1. Sample K completions per prompt of this iteration's fold from pi_{t-1}.
        if !record.samples.exists() {
            obs.stage(t, "sampling");
            let started = Instant::now();
            let fold: Vec<&PromptItem> = (0..cfg.prompts_per_iteration)
                .map(|i| &train_prompts[order[((t - 1) * cfg.prompts_per_iteration + i) % order.len()]])
                .collect();
            let model = HfModel::load(&sampler, &device)?;
            let seed = cfg.seed.wrapping_mul(1_000_003).wrapping_add(t as u64);
            let records =
                sample_prompts(&model, &tok, &fold, cfg.num_samples, &sampling, seed, &device, &mut |d, n| {
                    obs.samples(d, n)
                })?;
            write_jsonl(&record.samples, &records)?;
            record.wall_s.insert("sampling".into(), started.elapsed().as_secs_f64());
            upsert(&mut manifest, record.clone());
            save_manifest(&manifest)?;
        }

        // 2. Judge and pair best vs worst (ties skipped).
        if !record.pairs.exists() {
            obs.stage(t, "judging");
            let started = Instant::now();
            let samples: Vec<SampleRecord> = read_jsonl(&record.samples)?;
            let (pairs, skipped) = crate::pairing::judge_and_pair(judge.as_mut(), &samples, cfg.num_samples)?;
            if pairs.is_empty() {
                return Err(LoopError::Judge(format!(
                    "iteration {t}: every prompt's samples tied under judge `{}`; nothing to train on",
                    cfg.judge
                )));
            }
            write_jsonl(&record.pairs, &pairs)?;
            record.pair_count = pairs.len();
            record.skipped_prompts = skipped;
            record.wall_s.insert("judging".into(), started.elapsed().as_secs_f64());
        } else if record.pair_count == 0 {
            record.pair_count = read_jsonl::<serde_json::Value>(&record.pairs)?.len();
        }
        upsert(&mut manifest, record.clone());
        save_manifest(&manifest)?;

        // 3. logprob: the exact reference pi_{t-1} ∝ pi_hat_{t-1} (pi_hat_{t-1} / pi_hat_{t-2})^alpha
        // as reference log-probs of the pairs.
        // (Reference-free losses need none.)
        let mut train_cfg = cfg.train_config(t, &sampler, &record.pairs, &dir.join("train"))?;
        let exact_reference = cfg.extrapolation == Extrapolation::Logprob && t >= 2 && train_cfg.needs_reference();
        let train_data = if exact_reference { dir.join("pairs-ref.jsonl") } else { record.pairs.clone() };
        train_cfg.train_data = train_data.clone();
        if exact_reference && !record.trained.exists() && !train_data.exists() {
            obs.stage(t, "reference");
            let started = Instant::now();
            let older = if t == 2 { cfg.model.clone() } else { out.join(format!("iter-{}/trained", t - 2)) };
            write_extrapolated_reference(&train_cfg, &record.pairs, &previous_trained, &older, cfg.alpha, &train_data)?;
            record.wall_s.insert("reference".into(), started.elapsed().as_secs_f64());
        }
        record.reference_pairs = exact_reference.then(|| train_data.clone());

        // 4. Train pi_hat_t from pi_{t-1}'s weights with reference pi_{t-1}.
        if !record.trained.exists() {
            obs.stage(t, "training");
            let started = Instant::now();
            let summary = prefopt_train::train(&train_cfg, obs)?;
            std::fs::rename(&summary.final_dir, &record.trained)
                .map_err(|e| LoopError::Io(format!("{}: {e}", record.trained.display())))?;
            record.wall_s.insert("training".into(), started.elapsed().as_secs_f64());
        }

        // 5. Extrapolate: pi_t = pi_hat_t + alpha (pi_hat_t - pi_hat_{t-1}).
        if !record.extrapolated.exists() {
            obs.stage(t, "extrapolation");
            let started = Instant::now();
            let trained = HfModel::load(&record.trained, &device)?;
            let older = HfModel::load(&previous_trained, &device)?;
            let params = extrapolate(&trained.params, &older.params, cfg.alpha)?;
            save_model_dir(&record.extrapolated, &trained.raw_config, &params, Some(&record.trained))?;
            record.wall_s.insert("extrapolation".into(), started.elapsed().as_secs_f64());
        }

        // 6. Evaluate both on the held-out prompts.
        if record.eval_trained.is_none() || record.eval_extrapolated.is_none() {
            obs.stage(t, "evaluation");
            let started = Instant::now();
            let eval_seed = cfg.seed.wrapping_add(7);
            let mut evaluate = |dir: &Path| {
                evaluate_model(dir, &tok, &eval_prompts, &sampling, eval_seed, judge.as_mut(), &base, &device)
            };
            let trained = evaluate(&record.trained)?;
            // At alpha 0 the extrapolated weights are the trained ones, byte for byte (tested),
            // and the evaluation is seeded, so its numbers are the same: skip the second pass.
            let extrapolated = if cfg.alpha == 0.0 { trained.clone() } else { evaluate(&record.extrapolated)? };
            let lines = [("trained", &trained), ("extrapolated", &extrapolated)]
                .iter()
                .map(|(which, m)| {
                    let mut v = serde_json::to_value(m).unwrap_or_default();
                    v["iteration"] = t.into();
                    v["model"] = (*which).into();
                    v
                })
                .collect::<Vec<_>>();
            write_jsonl(&dir.join("metrics.jsonl"), &lines)?;
            record.eval_trained = Some(trained);
            record.eval_extrapolated = Some(extrapolated);
            record.wall_s.insert("evaluation".into(), started.elapsed().as_secs_f64());
        }
        upsert(&mut manifest, record);
        save_manifest(&manifest)?;
    }
    Ok(manifest)
}

/// `extrapolation = "logprob"`: writes `pairs` to `out` with the columns `ref_chosen_logps`
/// and `ref_rejected_logps` = `(1 + alpha) lp_newer - alpha lp_older`, tokenized as `train`
/// will tokenize them (rows it drops by truncation get no columns; it drops them again).
fn write_extrapolated_reference(
    train: &TrainConfig,
    pairs: &Path,
    newer: &Path,
    older: &Path,
    alpha: f64,
    out: &Path,
) -> Result<(), LoopError> {
    let device = Device::Cpu;
    let tok = HfTokenizer::from_dir(&train.model)?;
    let opts = TokenizeOptions { max_length: Some(train.max_length), max_prompt_length: train.max_prompt_length };
    // The judge's pairs carry no reference columns; these are computed from scratch.
    let data = prefopt_train::dataset::PairDataset::load(pairs, &tok, &opts)?;
    let pad_id = tok.pad_token_id().or(tok.eos_token_ids().first().copied()).unwrap_or(0);
    let logps = |dir: &Path| -> Result<Vec<(f32, f32)>, LoopError> {
        let model = HfModel::load(dir, &device)?;
        Ok(prefopt_train::reference::compute(&model, train.bf16, &data, train.batch_size, pad_id, &device, |_| {})?)
    };
    let combined = extrapolate_logps(&logps(newer)?, &logps(older)?, alpha);
    let mut rows: Vec<serde_json::Value> = read_jsonl(pairs)?;
    for (&row, (w, l)) in data.rows.iter().zip(combined) {
        rows[row]["ref_chosen_logps"] = w.into();
        rows[row]["ref_rejected_logps"] = l.into();
    }
    write_jsonl(out, &rows)
}

/// Keys that change how a run is carried out but not its results: a resumed run may change
/// them (e.g. raise `judge_timeout_s` after a judge timed out).
const OPERATIONAL_KEYS: [&str; 1] = ["judge_timeout_s"];

fn without_operational_keys(config: &serde_json::Value) -> serde_json::Value {
    let mut config = config.clone();
    if let Some(map) = config.as_object_mut() {
        for key in OPERATIONAL_KEYS {
            map.remove(key);
        }
    }
    config
}

fn upsert(manifest: &mut Manifest, record: IterationRecord) {
    match manifest.iterations.iter_mut().find(|r| r.iteration == record.iteration) {
        Some(r) => *r = record,
        None => manifest.iterations.push(record),
    }
}

/// Prompts from `task:<name>` (generated from `seed`) or a JSONL/Parquet file.
pub fn load_prompts(spec: &str, count: usize, seed: u64) -> Result<Vec<PromptItem>, LoopError> {
    if let Some(name) = spec.strip_prefix("task:") {
        let task = crate::tasks::task_by_name(name).map_err(|e| LoopError::Config(format!("prompts `{spec}`: {e}")))?;
        return Ok(task.prompts(count, seed));
    }
    let path = Path::new(spec);
    let records = read_records(path)?;
    if records.is_empty() {
        return Err(LoopError::Config(format!("{}: no prompts", path.display())));
    }
    records.iter().map(|r| Ok(PromptItem { text: parse_prompt(r)?, meta: serde_json::Value::Null })).collect()
}

/// A seeded shuffle of prompt indices; iteration t takes the t-th fold of it.
fn fold_order(n: usize, seed: u64) -> Vec<usize> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    order
}

/// Writes one JSON object per line, atomically.
pub fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<(), LoopError> {
    let mut text = String::new();
    for row in rows {
        text.push_str(&serde_json::to_string(row).map_err(|e| LoopError::Io(e.to_string()))?);
        text.push('\n');
    }
    prefopt_model::fsio::write_atomic(path, text.as_bytes())?;
    Ok(())
}

/// Reads one JSON object per non-blank line; errors name the file and line.
pub fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>, LoopError> {
    let text = std::fs::read_to_string(path).map_err(|e| LoopError::Io(format!("{}: {e}", path.display())))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| LoopError::Io(format!("{}:{}: {e}", path.display(), i + 1))))
        .collect()
}
