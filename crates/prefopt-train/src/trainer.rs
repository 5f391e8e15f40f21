//! The training loop shared by every objective: a plain loop you can read top to bottom.
//!
//! per optimizer step: take the next `batch_size x gradient_accumulation_steps` examples of
//! the epoch's shuffle; the objective runs each micro-batch forward and backward and adds
//! its gradients weighted by the micro-batch's share of the step (so the update equals the
//! large-batch one); then clip, check for NaN/inf, apply the optimizer at the scheduled
//! rate, log, evaluate and checkpoint. Objectives: preference pairs (`preference.rs`) and
//! SFT (`sft.rs`).
//!
//! On the CPU each micro-batch is split into one shard per compute thread, and the shards
//! run forward and backward at the same time, each weighted by its share of the step as
//! micro-batches are (data parallelism inside one process; see [`run_sharded`]).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use prefopt_model::{fill_model_dir, save_model_dir, HfModel, Llama, Params};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::checkpoint::{self, TrainerState};
use crate::config::{NonFinitePolicy, TrainConfig};
use crate::metrics::{MetricAverager, MetricsLog};
use crate::optim::{Optimizer, OptimizerConfig};
use crate::schedule::Schedule;
use crate::{grads, TrainError};

/// What a front end (the CLI's progress bar) hears from a run.
pub trait Observer {
    fn message(&mut self, _text: &str) {}
    fn reference_progress(&mut self, _done: usize, _total: usize) {}
    fn start(&mut self, _start_step: usize, _total_steps: usize) {}
    fn step(&mut self, _step: usize, _status: &StepStatus) {}
    fn finish(&mut self) {}
}

/// A silent observer.
pub struct Quiet;
impl Observer for Quiet {}

/// The latest step, for a progress display.
pub struct StepStatus {
    pub loss: f64,
    /// Reward accuracy for preference objectives; NaN where it does not apply.
    pub reward_accuracy: f64,
    pub tokens_per_s: f64,
}

/// Where a finished run put things.
pub struct TrainSummary {
    pub final_dir: PathBuf,
    pub metrics_path: PathBuf,
    pub steps: usize,
    pub skipped_batches: usize,
    pub dropped_train: usize,
    pub reference_forward_passes: bool,
}

/// A training objective: how to turn a micro-batch of example indices into gradients.
pub trait Objective: Sync {
    /// Number of training examples.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Where examples `idx` came from (file:line), for error messages.
    fn describe(&self, idx: &[usize]) -> String;
    /// Forward and backward of `micro` (a slice of the step's examples `step`): its
    /// gradients and metrics weighted by its share of the step. Shards of one micro-batch
    /// run on several threads at once, hence `&self`.
    fn micro_step(
        &self,
        policy: &Llama,
        params: &Params,
        step: &[usize],
        micro: &[usize],
    ) -> Result<StepAccumulator, TrainError>;
    /// After the last micro-batch, before clipping (e.g. SPO's dynamic weighting).
    fn finish_step(&mut self, _acc: &mut StepAccumulator) -> Result<(), TrainError> {
        Ok(())
    }
    /// Held-out metrics (`eval_`-prefixed), or `None` without evaluation data.
    fn evaluate(&mut self, model: &Llama) -> Result<Option<serde_json::Map<String, serde_json::Value>>, TrainError>;
    /// Examples dropped by truncation when loading.
    fn dropped(&self) -> usize;
}

/// Checks the output folder and finds the checkpoint to resume from, before any data is read.
pub fn prepare_output(cfg: &TrainConfig) -> Result<Option<PathBuf>, TrainError> {
    let out = &cfg.output_dir;
    std::fs::create_dir_all(out).map_err(|e| TrainError::Io(format!("output_dir {}: {e}", out.display())))?;
    let probe = out.join(".prefopt-write-test");
    std::fs::write(&probe, b"")
        .map_err(|e| TrainError::Io(format!("output_dir {} is not writable: {e}", out.display())))?;
    let _ = std::fs::remove_file(&probe);
    let resume_dir = resolve_resume(cfg)?;
    if resume_dir.is_none() && (checkpoint::latest(out).is_some() || out.join("final").exists()) {
        return Err(TrainError::Config(format!(
            "output_dir {} already holds a run; resume it (--resume) or choose another output_dir",
            out.display()
        )));
    }
    Ok(resume_dir)
}

/// Runs the optimization of `objective` as configured, from `cfg.model` or `resume_dir`.
pub fn run_loop(
    cfg: &TrainConfig,
    resume_dir: Option<PathBuf>,
    objective: &mut dyn Objective,
    obs: &mut dyn Observer,
) -> Result<TrainSummary, TrainError> {
    let device = Device::Cpu;
    let out = &cfg.output_dir;
    let source = HfModel::load(&cfg.model, &device)?;
    let hf = match &resume_dir {
        Some(dir) => HfModel::load(dir, &device)?,
        None => HfModel::load(&cfg.model, &device)?,
    };
    let opt_cfg = OptimizerConfig {
        kind: cfg.optimizer,
        weight_decay: cfg.weight_decay,
        adam_beta1: cfg.adam_beta1,
        adam_beta2: cfg.adam_beta2,
        adam_epsilon: cfg.adam_epsilon,
        ..OptimizerConfig::default()
    };
    let per_step = cfg.batch_size * cfg.gradient_accumulation_steps;
    let steps_per_epoch = objective.len().div_ceil(per_step);
    let total_steps = if cfg.max_steps > 0 {
        cfg.max_steps as usize
    } else {
        ((cfg.num_train_epochs * steps_per_epoch as f64).ceil() as usize).max(1)
    };
    let log = MetricsLog::new(out);
    let (mut optimizer, mut state) = match &resume_dir {
        Some(dir) => {
            let state = checkpoint::read_state(dir)?;
            if state.steps_per_epoch != steps_per_epoch || state.seed != cfg.seed {
                return Err(TrainError::Config(format!(
                    "{}: the checkpoint was made with other data or seed (steps per epoch {} vs {steps_per_epoch}, seed {} vs {})",
                    dir.display(),
                    state.steps_per_epoch,
                    state.seed,
                    cfg.seed
                )));
            }
            log.truncate_after(state.step)?;
            obs.message(&format!("resuming from {} (step {})", dir.display(), state.step));
            (Optimizer::load(opt_cfg, &hf.params, dir)?, TrainerState { total_steps, ..state })
        }
        None => {
            let _ = std::fs::remove_file(log.path());
            let state = TrainerState {
                step: 0,
                total_steps,
                seed: cfg.seed,
                steps_per_epoch,
                num_tokens: 0,
                skipped_batches: 0,
                averager: MetricAverager::default(),
            };
            (Optimizer::new(opt_cfg, &hf.params)?, state)
        }
    };
    let schedule =
        Schedule::new(cfg.lr_scheduler_type, cfg.learning_rate, cfg.warmup_steps, cfg.warmup_ratio, total_steps);
    let policy = hf.build_with(true, cfg.bf16)?;
    let mut last_checkpoint: Option<PathBuf> = resume_dir.clone();

    obs.start(state.step, total_steps);
    while state.step < total_steps {
        let step = state.step;
        let started = Instant::now();
        let indices = step_indices(cfg.seed, step, steps_per_epoch, per_step, objective.len());
        let mut acc = StepAccumulator::default();
        let shared = &*objective;
        for micro in indices.chunks(cfg.batch_size) {
            for shard in run_sharded(micro, |shard| shared.micro_step(&policy, &hf.params, &indices, shard))? {
                acc.merge(shard)?;
            }
        }
        objective.finish_step(&mut acc)?;

        let loss = acc.metric("loss");
        let finite = loss.is_finite() && grads::all_finite(&acc.grads)?;
        let grad_norm = grads::clip_grad_norm(&mut acc.grads, cfg.max_grad_norm)?;
        let lr = schedule.lr_at(step);
        if !finite || !grad_norm.is_finite() {
            let batch = objective.describe(&indices);
            match cfg.on_nonfinite {
                NonFinitePolicy::Stop => {
                    return Err(TrainError::NonFinite(format!(
                        "non-finite loss or gradient (loss {loss}, grad_norm {grad_norm}) at step {}, batch {batch}; last good checkpoint: {}",
                        step + 1,
                        last_checkpoint.as_ref().map_or("none".to_string(), |p| p.display().to_string())
                    )))
                }
                NonFinitePolicy::Skip => {
                    obs.message(&format!("step {}: skipped batch {batch} with non-finite loss or gradient", step + 1));
                    state.skipped_batches += 1;
                }
            }
        } else {
            optimizer.step(&hf.params, &acc.grads, lr)?;
        }

        state.step += 1;
        state.num_tokens += acc.num_tokens;
        for (name, value) in acc.metrics() {
            state.averager.add(&name, value, 1.0);
        }
        let epoch = state.step as f64 / steps_per_epoch as f64;
        if state.step % cfg.logging_steps == 0 || state.step == total_steps {
            let mut line = serde_json::Map::new();
            line.insert("step".into(), state.step.into());
            line.insert("epoch".into(), epoch.into());
            for (name, value) in state.averager.take() {
                line.insert(name, value.into());
            }
            line.insert("grad_norm".into(), grad_norm.into());
            line.insert("learning_rate".into(), lr.into());
            line.insert("num_tokens".into(), state.num_tokens.into());
            log.append(&serde_json::Value::Object(line))?;
        }
        let eval_due = (cfg.eval_steps > 0 && state.step % cfg.eval_steps == 0) || state.step == total_steps;
        if eval_due {
            // A graph-free network over the current weights (built now: a frozen model holds
            // copies of its weights, laid out for inference).
            if let Some(mut line) = objective.evaluate(&hf.build_with(false, cfg.bf16)?)? {
                line.insert("step".into(), state.step.into());
                line.insert("epoch".into(), epoch.into());
                log.append(&serde_json::Value::Object(line))?;
            }
        }
        if cfg.save_steps > 0 && state.step % cfg.save_steps == 0 && state.step < total_steps {
            let dir = checkpoint::checkpoint_dir(out, state.step);
            let as_model_error =
                |e: TrainError| prefopt_model::ModelError::Io { path: dir.clone(), message: e.to_string() };
            prefopt_model::fsio::write_dir_atomic(&dir, |tmp| {
                fill_model_dir(tmp, &hf.raw_config, &hf.params, Some(&source.dir))?;
                optimizer.save(tmp).map_err(|e| as_model_error(e.into()))?;
                checkpoint::write_state(tmp, &state).map_err(as_model_error)
            })?;
            last_checkpoint = Some(dir);
        }
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        obs.step(
            state.step,
            &StepStatus {
                loss,
                reward_accuracy: acc.metric("rewards/accuracies"),
                tokens_per_s: acc.num_tokens as f64 / secs,
            },
        );
    }
    obs.finish();

    let final_dir = out.join("final");
    save_model_dir(&final_dir, &source.raw_config, &hf.params, Some(&source.dir))?;
    Ok(TrainSummary {
        final_dir,
        metrics_path: log.path().to_path_buf(),
        steps: state.step,
        skipped_batches: state.skipped_batches,
        dropped_train: objective.dropped(),
        reference_forward_passes: false,
    })
}

/// Runs `f` on contiguous shards of `items`, one per compute thread (rayon's current pool;
/// never an empty shard), all at once, and returns the results in shard order.
///
/// Why: on a small CPU, two threads each running a whole forward and backward pass on half
/// the batch keep both cores busy; splitting every matmul and elementwise op of one pass
/// across them makes the threads wait on each other after each of several hundred ops.
/// Every objective weights a shard by its share of the step, so the update equals the
/// unsharded one up to float rounding; with the same thread count, runs are bit-identical.
pub fn run_sharded<T: Send>(
    items: &[usize],
    f: impl Fn(&[usize]) -> Result<T, TrainError> + Sync,
) -> Result<Vec<T>, TrainError> {
    let shards = rayon::current_num_threads().clamp(1, items.len().max(1));
    if shards == 1 {
        return Ok(vec![f(items)?]);
    }
    use rayon::prelude::*;
    let pieces: Vec<&[usize]> = items.chunks(items.len().div_ceil(shards)).collect();
    pieces.into_par_iter().map(&f).collect()
}

/// The checkpoint to resume from: an explicit folder, or "latest" (none yet: start fresh).
fn resolve_resume(cfg: &TrainConfig) -> Result<Option<PathBuf>, TrainError> {
    match cfg.resume_from_checkpoint.as_deref() {
        None => Ok(None),
        Some("latest") => Ok(checkpoint::latest(&cfg.output_dir)),
        Some(path) => {
            let dir = PathBuf::from(path);
            if !dir.join(checkpoint::STATE_FILE).is_file() {
                return Err(TrainError::Config(format!(
                    "resume_from_checkpoint: {path} is not a complete checkpoint (no {})",
                    checkpoint::STATE_FILE
                )));
            }
            Ok(Some(dir))
        }
    }
}

/// Example indices of optimizer step `step`: the epoch's shuffle (a pure function of the
/// seed and the epoch, so a resumed run sees the same order), sliced at the step's position.
pub fn step_indices(seed: u64, step: usize, steps_per_epoch: usize, per_step: usize, n: usize) -> Vec<usize> {
    let epoch = step / steps_per_epoch;
    let pos = step % steps_per_epoch;
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed.wrapping_add(epoch as u64));
    order.shuffle(&mut rng);
    order[pos * per_step..((pos + 1) * per_step).min(n)].to_vec()
}

/// `file:line` of the first few examples of a batch.
pub fn describe_sources(sources: &[String], indices: &[usize]) -> String {
    let names: Vec<&str> = indices.iter().take(4).map(|&i| sources[i].as_str()).collect();
    let more = if indices.len() > 4 { format!(" and {} more", indices.len() - 4) } else { String::new() };
    format!("[{}{more}]", names.join(", "))
}

pub(crate) fn scalar(t: &Tensor) -> Result<f64, TrainError> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

/// Backward of `loss`, gradients in parameter order.
pub(crate) fn backward(loss: &Tensor, params: &Params) -> Result<Vec<Tensor>, TrainError> {
    Ok(grads::collect(params, &loss.backward()?)?.0)
}

/// Gradients and share-weighted metrics of one optimizer step.
#[derive(Default)]
pub struct StepAccumulator {
    pub grads: Vec<Tensor>,
    /// A second gradient, for objectives that combine two levels (SPO's dynamic solver).
    pub grads_aux: Vec<Tensor>,
    metrics: Vec<(String, f64)>,
    /// Sums and token counts for TRL's `logits/chosen` and `logits/rejected`.
    logits: [f64; 4],
    pub num_tokens: u64,
}

impl StepAccumulator {
    pub fn add_metric(&mut self, name: &str, value: f64, share: f64) {
        match self.metrics.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => *v += value * share,
            None => self.metrics.push((name.to_string(), value * share)),
        }
    }

    /// Adds another accumulator's gradients, metrics and counts (both already weighted by
    /// their shares of the step).
    pub fn merge(&mut self, other: StepAccumulator) -> Result<(), TrainError> {
        if !other.grads.is_empty() {
            grads::accumulate(&mut self.grads, &other.grads, 1.0)?;
        }
        if !other.grads_aux.is_empty() {
            grads::accumulate(&mut self.grads_aux, &other.grads_aux, 1.0)?;
        }
        for (name, value) in other.metrics {
            self.add_metric(&name, value, 1.0);
        }
        for (mine, theirs) in self.logits.iter_mut().zip(other.logits) {
            *mine += theirs;
        }
        self.num_tokens += other.num_tokens;
        Ok(())
    }

    pub fn metric(&self, name: &str) -> f64 {
        self.metrics.iter().find(|(n, _)| n == name).map_or(f64::NAN, |(_, v)| *v)
    }

    pub fn add_logits(&mut self, chosen_sum: f64, chosen_tokens: f64, rejected_sum: f64, rejected_tokens: f64) {
        self.logits[0] += chosen_sum;
        self.logits[1] += chosen_tokens;
        self.logits[2] += rejected_sum;
        self.logits[3] += rejected_tokens;
    }

    /// All metrics of the step, TRL's `logits/*` included when any were added.
    pub fn metrics(&self) -> Vec<(String, f64)> {
        let mut all = self.metrics.clone();
        if self.logits[1] > 0.0 {
            all.push(("logits/chosen".into(), self.logits[0] / self.logits[1]));
        }
        if self.logits[3] > 0.0 {
            all.push(("logits/rejected".into(), self.logits[2] / self.logits[3]));
        }
        all
    }
}
