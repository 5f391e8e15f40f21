//! The training loop shared by every objective: a plain loop you can read top to bottom.
//!
//! per optimizer step: take the next `batch_size x gradient_accumulation_steps` examples of
//! the epoch's shuffle; the objective runs each micro-batch forward and backward and adds
//! its gradients weighted by the micro-batch's share of the step (so the update equals the
//! large-batch one); then clip, check for NaN/inf, apply the optimizer at the scheduled
//! rate, log, evaluate and checkpoint. Objectives: preference pairs (`preference.rs`), SFT
//! (`sft.rs`), KTO on unpaired rows (`kto.rs`) and reward models (`reward.rs`).
//!
//! On the CPU each micro-batch is split into one shard per compute thread, and the shards
//! run forward and backward at the same time, each weighted by its share of the step as
//! micro-batches are (data parallelism inside one process; see [`run_sharded`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use prefopt_model::{Checkpoints, Llama, Mode, Params};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::checkpoint::{self, TrainerState};
use crate::config::{NonFinitePolicy, TrainConfig};
use crate::metrics::{MetricAverager, MetricsLog};
use crate::optim::{Optimizer, OptimizerConfig};
use crate::schedule::Schedule;
use crate::weights::Weights;
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
    /// Training examples whose completion starts at the shared token prefix
    /// (`prompt_boundary = "common_prefix"`).
    pub boundary_moved: usize,
    pub reference_forward_passes: bool,
    /// This process's step loop, in TRL's `train_*` terms (also in `train_results.json`).
    pub runtime: TrainRuntime,
}

/// The step loop's wall time and throughput, as TRL (the Hugging Face `Trainer`) ends its
/// log with them: over the steps this process ran (after a resume, only those), from the
/// first step to the last (evaluations and checkpoints in between included; loading, the
/// reference pass before the loop and the final save not).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct TrainRuntime {
    pub train_runtime: f64,
    pub train_samples_per_second: f64,
    pub train_steps_per_second: f64,
    /// Mean training loss over those steps.
    pub train_loss: f64,
    pub epoch: f64,
}

/// The file the runtime figures go to in `output_dir` (the name of Hugging Face's
/// `save_metrics("train", ...)`): `metrics.jsonl` stays the same for the same seed.
pub const RUNTIME_FILE: &str = "train_results.json";

/// A training objective: how to turn a micro-batch of example indices into gradients.
pub trait Objective: Sync {
    /// Number of training examples.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Where examples `idx` came from (file:line), for error messages.
    fn describe(&self, idx: &[usize]) -> String;
    /// What example i costs to run, in tokens, for balancing shards ([`run_sharded`]).
    fn cost(&self, i: usize) -> usize;
    /// Forward and backward of `micro` (a slice of the step's examples `step`): its
    /// gradients and metrics weighted by its share of the step. Shards of one micro-batch
    /// run on several threads at once, hence `&self`. `dropout_seed` is the step's seed of
    /// the adapters' dropout masks.
    fn micro_step(
        &self,
        policy: &Llama,
        params: &Params,
        step: &[usize],
        micro: &[usize],
        dropout_seed: u64,
    ) -> Result<StepAccumulator, TrainError>;
    /// Before the step's first micro-batch, with the step's `micro_batches`: work that needs
    /// a whole micro-batch while [`Objective::micro_step`] sees a shard of one (KTO's KL
    /// estimate).
    fn prepare_step(&mut self, _policy: &Llama, _micro_batches: &[&[usize]]) -> Result<(), TrainError> {
        Ok(())
    }
    /// Whether each epoch visits the examples in a fresh shuffle (the default) or in file
    /// order (KTO, whose KL pairs are built per batch of consecutive rows, as TRL's).
    fn shuffles(&self) -> bool {
        true
    }
    /// After the last micro-batch, before clipping (e.g. SPO's dynamic weighting).
    fn finish_step(&mut self, _acc: &mut StepAccumulator) -> Result<(), TrainError> {
        Ok(())
    }
    /// Held-out metrics (`eval_`-prefixed) of `model` (a graph-free network over the current
    /// `params`, the trainable tensors), or `None` without evaluation data.
    fn evaluate(
        &mut self,
        model: &Llama,
        params: &Params,
    ) -> Result<Option<serde_json::Map<String, serde_json::Value>>, TrainError>;
    /// Examples dropped by truncation when loading.
    fn dropped(&self) -> usize;
    /// The weights a run of this objective trains, from `cfg.model` or the checkpoint
    /// `resume`: a language model's by default ([`Weights::load`]).
    fn load_weights(&self, cfg: &TrainConfig, resume: Option<&Path>, device: &Device) -> Result<Weights, TrainError> {
        Weights::load(cfg, resume, device)
    }
}

/// Checks the output folder, takes its lock (held until the returned guard drops: one
/// writer per folder) and finds the checkpoint to resume from, before any data is read.
pub fn prepare_output(
    cfg: &TrainConfig,
    obs: &mut dyn Observer,
) -> Result<(prefopt_fs::OutputLock, Option<PathBuf>), TrainError> {
    let out = &cfg.output_dir;
    let bad = |message: String| TrainError::OutputDir { dir: out.clone(), message };
    std::fs::create_dir_all(out).map_err(|e| bad(e.to_string()))?;
    let probe = out.join(".prefopt-write-test");
    std::fs::write(&probe, b"").map_err(|e| bad(format!("not writable: {e}")))?;
    let _ = std::fs::remove_file(&probe);
    let lock = prefopt_fs::OutputLock::acquire(out)?;
    if let Some(note) = lock.takeover_note() {
        obs.message(&note);
    }
    let resume_dir = resolve_resume(cfg)?;
    if resume_dir.is_none() && (checkpoint::latest(out).is_some() || out.join("final").exists()) {
        return Err(bad("already holds a run; resume it (--resume) or choose another output_dir".into()));
    }
    Ok((lock, resume_dir))
}

/// Runs the optimization of `objective` as configured, from `cfg.model` or `resume_dir`:
/// start or resume, then per step: forward and backward, update, log, evaluate if due,
/// checkpoint if due; then save `final/`.
pub fn run_loop(
    cfg: &TrainConfig,
    resume_dir: Option<PathBuf>,
    objective: &mut dyn Objective,
    obs: &mut dyn Observer,
) -> Result<TrainSummary, TrainError> {
    let mut run = Run::start_or_resume(cfg, resume_dir, &*objective, obs)?;
    let policy = run.weights.network(Mode::Train, cfg.precision())?;
    obs.start(run.state.step, run.plan.total_steps);
    let (loop_started, first_step, mut loss_sum) = (Instant::now(), run.state.step, 0f64);
    while run.state.step < run.plan.total_steps {
        let started = Instant::now();
        let indices = run.plan.indices(cfg.seed, run.state.step, objective.len());
        let dropout_seed = step_dropout_seed(cfg.seed, run.state.step);
        let mut acc =
            accumulate_step(objective, &policy, run.weights.trainable(), &indices, cfg.batch_size, dropout_seed)?;
        let update = run.update(&mut acc, || objective.describe(&indices), obs)?;
        loss_sum += update.loss;
        run.log_step(&acc, &update)?;
        if run.eval_due() {
            run.evaluate(objective)?;
        }
        if run.checkpoint_due() {
            run.checkpoint()?;
        }
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        let status = StepStatus {
            loss: update.loss,
            // A preference objective's name, or a reward model's (TRL's `accuracy`).
            reward_accuracy: Some(acc.metric("rewards/accuracies"))
                .filter(|a| !a.is_nan())
                .unwrap_or(acc.metric("accuracy")),
            tokens_per_s: acc.num_tokens as f64 / secs,
        };
        obs.step(run.state.step, &status);
    }
    let (secs, steps) = (loop_started.elapsed().as_secs_f64().max(1e-9), run.state.step - first_step);
    let runtime = TrainRuntime {
        train_runtime: secs,
        train_samples_per_second: (steps * run.plan.per_step) as f64 / secs,
        train_steps_per_second: steps as f64 / secs,
        train_loss: if steps > 0 { loss_sum / steps as f64 } else { f64::NAN },
        epoch: run.plan.epoch(run.state.step),
    };
    obs.finish();
    let final_dir = run.save_final()?;
    prefopt_fs::write_json(&cfg.output_dir.join(RUNTIME_FILE), &runtime)?;
    Ok(TrainSummary {
        final_dir,
        metrics_path: run.log.path().to_path_buf(),
        steps: run.state.step,
        skipped_batches: run.state.skipped_batches,
        dropped_train: objective.dropped(),
        boundary_moved: 0,
        reference_forward_passes: false,
        runtime,
    })
}

/// One optimizer step's forward and backward passes: the step's examples `indices` in
/// micro-batches of `batch_size`, each split into one shard per compute thread
/// ([`run_sharded`]), the results merged in order; then the objective's end-of-step work.
pub fn accumulate_step(
    objective: &mut dyn Objective,
    policy: &Llama,
    params: &Params,
    indices: &[usize],
    batch_size: usize,
    dropout_seed: u64,
) -> Result<StepAccumulator, TrainError> {
    let mut acc = StepAccumulator::default();
    let micro_batches: Vec<&[usize]> = indices.chunks(batch_size).collect();
    objective.prepare_step(policy, &micro_batches)?;
    let shared = &*objective;
    for micro in micro_batches {
        let cost = |i: usize| shared.cost(i);
        for shard in run_sharded(micro, cost, |shard| shared.micro_step(policy, params, indices, shard, dropout_seed))?
        {
            acc.merge(shard)?;
        }
    }
    objective.finish_step(&mut acc)?;
    Ok(acc)
}

/// How many optimizer steps a run takes and which examples each one sees.
struct Plan {
    /// Examples per optimizer step: `batch_size x gradient_accumulation_steps`.
    per_step: usize,
    steps_per_epoch: usize,
    total_steps: usize,
    /// A fresh shuffle per epoch, or file order.
    shuffle: bool,
}

impl Plan {
    fn new(cfg: &TrainConfig, examples: usize, shuffle: bool) -> Self {
        let per_step = cfg.batch_size * cfg.gradient_accumulation_steps;
        let steps_per_epoch = examples.div_ceil(per_step);
        let total_steps = if cfg.max_steps > 0 {
            cfg.max_steps as usize
        } else {
            ((cfg.num_train_epochs * steps_per_epoch as f64).ceil() as usize).max(1)
        };
        Self { per_step, steps_per_epoch, total_steps, shuffle }
    }

    /// The examples of optimizer step `step` (see [`step_indices`]).
    fn indices(&self, seed: u64, step: usize, examples: usize) -> Vec<usize> {
        if !self.shuffle {
            let pos = step % self.steps_per_epoch;
            return (pos * self.per_step..((pos + 1) * self.per_step).min(examples)).collect();
        }
        step_indices(seed, step, self.steps_per_epoch, self.per_step, examples)
    }

    fn epoch(&self, step: usize) -> f64 {
        step as f64 / self.steps_per_epoch as f64
    }
}

/// The outcome of one optimizer update.
struct Update {
    loss: f64,
    /// Before clipping, as TRL logs it.
    grad_norm: f64,
    lr: f64,
}

/// A run in progress: the weights being trained, their optimizer and schedule, the metrics
/// log and the trainer's state (step, data position, metric sums).
struct Run<'a> {
    cfg: &'a TrainConfig,
    plan: Plan,
    /// The weights being trained: `cfg.model`'s (or a LoRA adapter on it), or the resumed
    /// checkpoint's.
    weights: Weights,
    optimizer: Optimizer,
    schedule: Schedule,
    log: MetricsLog,
    state: TrainerState,
    last_checkpoint: Option<PathBuf>,
}

impl<'a> Run<'a> {
    /// Loads the weights (once: from the checkpoint when resuming, else from `cfg.model`),
    /// and the optimizer state and metrics of a resumed run, or fresh ones.
    fn start_or_resume(
        cfg: &'a TrainConfig,
        resume_dir: Option<PathBuf>,
        objective: &dyn Objective,
        obs: &mut dyn Observer,
    ) -> Result<Self, TrainError> {
        let device = cfg.device()?;
        let plan = Plan::new(cfg, objective.len(), objective.shuffles());
        let weights = objective.load_weights(cfg, resume_dir.as_deref(), &device)?;
        let opt_cfg = OptimizerConfig {
            kind: cfg.optimizer,
            weight_decay: cfg.weight_decay,
            adam_beta1: cfg.adam_beta1,
            adam_beta2: cfg.adam_beta2,
            adam_epsilon: cfg.adam_epsilon,
            ..OptimizerConfig::default()
        };
        let log = MetricsLog::new(&cfg.output_dir).with_tensorboard(cfg.reports_to_tensorboard());
        let (optimizer, state) = match &resume_dir {
            Some(dir) => {
                let state = checkpoint::read_state(dir)?;
                if state.steps_per_epoch != plan.steps_per_epoch || state.seed != cfg.seed {
                    return Err(TrainError::Checkpoint {
                        dir: dir.clone(),
                        message: format!(
                            "the checkpoint was made with other data or seed (steps per epoch {} vs {}, seed {} vs {})",
                            state.steps_per_epoch, plan.steps_per_epoch, state.seed, cfg.seed
                        ),
                    });
                }
                log.truncate_after(state.step)?;
                obs.message(&format!("resuming from {} (step {})", dir.display(), state.step));
                let state = TrainerState { total_steps: plan.total_steps, ..state };
                (Optimizer::load(opt_cfg, weights.trainable(), dir)?, state)
            }
            None => {
                log.clear()?;
                let state = TrainerState {
                    step: 0,
                    total_steps: plan.total_steps,
                    seed: cfg.seed,
                    steps_per_epoch: plan.steps_per_epoch,
                    num_tokens: 0,
                    skipped_batches: 0,
                    averager: MetricAverager::default(),
                };
                (Optimizer::new(opt_cfg, weights.trainable())?, state)
            }
        };
        let schedule = Schedule::new(
            cfg.lr_scheduler_type,
            cfg.learning_rate,
            cfg.warmup_steps,
            cfg.warmup_ratio,
            plan.total_steps,
        );
        Ok(Self { cfg, plan, weights, optimizer, schedule, log, state, last_checkpoint: resume_dir })
    }

    /// Clips the step's gradients and applies the optimizer at the scheduled rate, unless
    /// the loss or a gradient is not finite: then the run stops (naming the batch that
    /// `describe` gives) or skips the batch, as `on_nonfinite` says.
    fn update(
        &mut self,
        acc: &mut StepAccumulator,
        describe: impl FnOnce() -> String,
        obs: &mut dyn Observer,
    ) -> Result<Update, TrainError> {
        let step = self.state.step;
        let loss = acc.metric("loss");
        let finite = loss.is_finite() && grads::all_finite(&acc.grads)?;
        let grad_norm = grads::clip_grad_norm(&mut acc.grads, self.cfg.max_grad_norm)?;
        let lr = self.schedule.lr_at(step);
        if finite && grad_norm.is_finite() {
            self.optimizer.step(self.weights.trainable(), &acc.grads, lr)?;
            return Ok(Update { loss, grad_norm, lr });
        }
        let batch = describe();
        match self.cfg.on_nonfinite {
            NonFinitePolicy::Stop => Err(TrainError::NonFinite {
                step: step + 1,
                loss,
                grad_norm,
                batch,
                last_checkpoint: self.last_checkpoint.clone(),
            }),
            NonFinitePolicy::Skip => {
                obs.message(&format!("step {}: skipped batch {batch} with non-finite loss or gradient", step + 1));
                self.state.skipped_batches += 1;
                Ok(Update { loss, grad_norm, lr })
            }
        }
    }

    /// Counts the step, adds its metrics to the interval's means, and writes a log line
    /// every `logging_steps` steps and at the last one.
    fn log_step(&mut self, acc: &StepAccumulator, update: &Update) -> Result<(), TrainError> {
        self.state.step += 1;
        self.state.num_tokens += acc.num_tokens;
        for (name, value) in acc.metrics() {
            self.state.averager.add(&name, value, 1.0);
        }
        let step = self.state.step;
        if !step.is_multiple_of(self.cfg.logging_steps) && step != self.plan.total_steps {
            return Ok(());
        }
        let mut line = serde_json::Map::new();
        line.insert("step".into(), step.into());
        line.insert("epoch".into(), self.plan.epoch(step).into());
        for (name, value) in self.state.averager.take() {
            line.insert(name, value.into());
        }
        line.insert("grad_norm".into(), update.grad_norm.into());
        line.insert("learning_rate".into(), update.lr.into());
        line.insert("num_tokens".into(), self.state.num_tokens.into());
        self.log.append(&serde_json::Value::Object(line))
    }

    /// Every `eval_steps` steps (when > 0) and after the last one.
    fn eval_due(&self) -> bool {
        let step = self.state.step;
        (self.cfg.eval_steps > 0 && step.is_multiple_of(self.cfg.eval_steps)) || step == self.plan.total_steps
    }

    /// Held-out metrics of the current weights, as one `eval_` log line.
    fn evaluate(&mut self, objective: &mut dyn Objective) -> Result<(), TrainError> {
        // A graph-free network over the current weights (built now: a frozen network holds
        // copies of its weights, laid out for inference).
        let network = self.weights.network(Mode::Infer, self.cfg.precision())?;
        if let Some(mut line) = objective.evaluate(&network, self.weights.trainable())? {
            line.insert("step".into(), self.state.step.into());
            line.insert("epoch".into(), self.plan.epoch(self.state.step).into());
            self.log.append(&serde_json::Value::Object(line))?;
        }
        Ok(())
    }

    /// Every `save_steps` steps (when > 0), except after the last one (`final/` follows).
    fn checkpoint_due(&self) -> bool {
        let step = self.state.step;
        self.cfg.save_steps > 0 && step.is_multiple_of(self.cfg.save_steps) && step < self.plan.total_steps
    }

    /// `checkpoint-<step>/`: the model (or adapter) folder, the optimizer state and the
    /// trainer state, written to a temp folder and renamed into place.
    fn checkpoint(&mut self) -> Result<(), TrainError> {
        let dir = checkpoint::checkpoint_dir(&self.cfg.output_dir, self.state.step);
        prefopt_fs::write_dir_atomic(&dir, |tmp| -> Result<(), TrainError> {
            self.weights.fill_dir(tmp, &self.cfg.model, self.cfg.model_name.as_deref())?;
            self.optimizer.save(tmp)?;
            checkpoint::write_state(tmp, &self.state)
        })?;
        self.last_checkpoint = Some(dir);
        Ok(())
    }

    /// `final/`: the trained weights as a Hugging Face folder with the source model's
    /// tokenizer and generation files, or a PEFT adapter folder.
    fn save_final(&self) -> Result<PathBuf, TrainError> {
        let final_dir = self.cfg.output_dir.join("final");
        prefopt_fs::write_dir_atomic(&final_dir, |tmp| {
            self.weights.fill_dir(tmp, &self.cfg.model, self.cfg.model_name.as_deref())
        })?;
        Ok(final_dir)
    }
}

/// Runs `f` on shards of `items`, one per compute thread (rayon's current pool; never an
/// empty shard), all at once, and returns the results in shard order. The shards have about
/// equal total `cost` (an item's tokens, say): the costliest item goes first, each to the
/// shard with the least so far (the first such on a tie), and a shard keeps its items in
/// their order; equal costs give contiguous shards of equal counts.
///
/// Why: on a small CPU, two threads each running a whole forward and backward pass on half
/// the batch keep both cores busy; splitting every matmul and elementwise op of one pass
/// across them makes the threads wait on each other after each of several hundred ops. With
/// ragged data, halves by count can differ by half in tokens, and the step waits for the
/// longer. Every objective weights a shard by its share of the step, so the update equals
/// the unsharded one up to float rounding; with the same thread count, runs are
/// bit-identical.
pub fn run_sharded<T: Send>(
    items: &[usize],
    cost: impl Fn(usize) -> usize,
    f: impl Fn(&[usize]) -> Result<T, TrainError> + Sync,
) -> Result<Vec<T>, TrainError> {
    let shards = rayon::current_num_threads().clamp(1, items.len().max(1));
    if shards == 1 {
        return Ok(vec![f(items)?]);
    }
    let pieces = balanced_shards(items, shards, cost);
    use rayon::prelude::*;
    pieces.par_iter().map(|p| f(p)).collect()
}

/// `items` in `shards` non-empty groups of about equal total cost (see [`run_sharded`]).
fn balanced_shards(items: &[usize], shards: usize, cost: impl Fn(usize) -> usize) -> Vec<Vec<usize>> {
    let costs: Vec<usize> = items.iter().map(|&i| cost(i)).collect();
    if costs.windows(2).all(|w| w[0] == w[1]) {
        return items.chunks(items.len().div_ceil(shards)).map(<[usize]>::to_vec).collect();
    }
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&k| std::cmp::Reverse(costs[k])); // stable: ties keep their order
    let (mut load, mut members) = (vec![0usize; shards], vec![Vec::new(); shards]);
    for (n, &k) in order.iter().enumerate() {
        // The first `shards` items seed one shard each, so none stays empty.
        let s = if n < shards { n } else { (0..shards).min_by_key(|&s| (load[s], s)).unwrap_or(0) };
        load[s] += costs[k];
        members[s].push(k);
    }
    members
        .into_iter()
        .map(|mut m| {
            m.sort_unstable();
            m.into_iter().map(|k| items[k]).collect()
        })
        .collect()
}

/// The checkpoint to resume from: an explicit folder, or "latest" (none yet: start fresh).
fn resolve_resume(cfg: &TrainConfig) -> Result<Option<PathBuf>, TrainError> {
    match cfg.resume_from_checkpoint.as_deref() {
        None => Ok(None),
        Some("latest") => Ok(checkpoint::latest(&cfg.output_dir)),
        Some(path) => {
            let dir = PathBuf::from(path);
            if !dir.join(checkpoint::STATE_FILE).is_file() {
                return Err(TrainError::Config {
                    key: "resume_from_checkpoint",
                    message: format!("{path} is not a complete checkpoint (no {})", checkpoint::STATE_FILE),
                });
            }
            Ok(Some(dir))
        }
    }
}

/// The seed of optimizer step `step`'s dropout masks (a pure function of the run's seed and
/// the step, so a resumed run draws the same masks).
pub fn step_dropout_seed(seed: u64, step: usize) -> u64 {
    seed.wrapping_mul(0x2545_F491_4F6C_DD1D).wrapping_add(step as u64)
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

/// Gradients of `share * loss` in parameter order (a micro-batch's or shard's weight in the
/// step goes in before the backward pass, as PyTorch scales a loss for accumulation, so no
/// scaled copy of the gradients is made); with the `checkpoints` of a checkpointed forward
/// pass of `policy`, through its recomputed blocks.
pub(crate) fn backward(
    loss: &Tensor,
    share: f64,
    params: &Params,
    policy: &Llama,
    checkpoints: Option<&Checkpoints>,
) -> Result<Vec<Tensor>, TrainError> {
    let scaled = if share == 1.0 { loss.clone() } else { loss.affine(share, 0.0)? };
    let mut store = scaled.backward()?;
    if let Some(c) = checkpoints {
        store = policy.backward_checkpointed(c, store)?;
    }
    Ok(grads::collect(params, &store)?.0)
}

/// TRL's `logits/chosen` and `logits/rejected` inputs: sums of the mean logit over the
/// vocabulary at each completion position, and the positions counted.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogitSums {
    pub chosen: f64,
    pub chosen_tokens: f64,
    pub rejected: f64,
    pub rejected_tokens: f64,
}

impl LogitSums {
    fn add(&mut self, other: &LogitSums) {
        self.chosen += other.chosen;
        self.chosen_tokens += other.chosen_tokens;
        self.rejected += other.rejected;
        self.rejected_tokens += other.rejected_tokens;
    }
}

/// Gradients and share-weighted metrics of one optimizer step.
#[derive(Default)]
pub struct StepAccumulator {
    pub grads: Vec<Tensor>,
    /// A second gradient, for objectives that combine two levels (SPO's dynamic solver).
    pub grads_aux: Vec<Tensor>,
    metrics: Vec<(String, f64)>,
    /// Metrics that are a minimum or maximum over the step's examples, not a share-weighted mean.
    extremes: Vec<(String, Extreme, f64)>,
    logits: LogitSums,
    pub num_tokens: u64,
}

/// Which end an extreme metric keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extreme {
    Min,
    Max,
}

impl StepAccumulator {
    pub fn add_metric(&mut self, name: &str, value: f64, share: f64) {
        match self.metrics.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => *v += value * share,
            None => self.metrics.push((name.to_string(), value * share)),
        }
    }

    /// Keeps the smallest (or largest) value of metric `name` seen in the step.
    pub fn add_extreme(&mut self, name: &str, kind: Extreme, value: f64) {
        let keep = |old: f64| match kind {
            Extreme::Min => old.min(value),
            Extreme::Max => old.max(value),
        };
        match self.extremes.iter_mut().find(|(n, _, _)| n == name) {
            Some((_, _, v)) => *v = keep(*v),
            None => self.extremes.push((name.to_string(), kind, value)),
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
        for (name, kind, value) in other.extremes {
            self.add_extreme(&name, kind, value);
        }
        self.logits.add(&other.logits);
        self.num_tokens += other.num_tokens;
        Ok(())
    }

    pub fn metric(&self, name: &str) -> f64 {
        let extreme = || self.extremes.iter().find(|(n, _, _)| n == name).map(|(_, _, v)| *v);
        self.metrics.iter().find(|(n, _)| n == name).map(|(_, v)| *v).or_else(extreme).unwrap_or(f64::NAN)
    }

    pub fn add_logits(&mut self, sums: &LogitSums) {
        self.logits.add(sums);
    }

    /// All metrics of the step, TRL's `logits/*` included when any were added.
    pub fn metrics(&self) -> Vec<(String, f64)> {
        let mut all = self.metrics.clone();
        all.extend(self.extremes.iter().map(|(n, _, v)| (n.clone(), *v)));
        if self.logits.chosen_tokens > 0.0 {
            all.push(("logits/chosen".into(), self.logits.chosen / self.logits.chosen_tokens));
        }
        if self.logits.rejected_tokens > 0.0 {
            all.push(("logits/rejected".into(), self.logits.rejected / self.logits.rejected_tokens));
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::balanced_shards;

    #[test]
    fn shards_balance_cost_keep_order_and_are_never_empty() {
        let tokens = [986, 945, 513, 895];
        let shards = balanced_shards(&[10, 11, 12, 13], 2, |i| tokens[i - 10]);
        assert_eq!(shards, vec![vec![10, 12], vec![11, 13]]); // 1499 and 1840 (by count: 1931, 1408)
                                                              // Equal costs: contiguous halves, as before balancing.
        assert_eq!(balanced_shards(&[4, 5, 6, 7, 8], 2, |_| 1), vec![vec![4, 5, 6], vec![7, 8]]);
        // More shards than costly items: every shard gets one.
        let shards = balanced_shards(&[0, 1, 2], 3, |i| [100, 1, 1][i]);
        assert_eq!(shards, vec![vec![0], vec![1], vec![2]]);
    }
}
