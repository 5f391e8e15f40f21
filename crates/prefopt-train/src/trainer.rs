//! The preference trainer: a plain loop you can read top to bottom.
//!
//! per optimizer step: take the next `batch_size x gradient_accumulation_steps` pairs of the
//! epoch's shuffle; for each micro-batch run the policy on chosen and rejected, compute the
//! loss (any mix of methods.md section 2, plus SPO), backpropagate and accumulate gradients
//! weighted by the micro-batch's share of the step (so the update equals the large-batch
//! one); then clip, check for NaN/inf, and apply the optimizer at the scheduled rate.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use prefopt_data::{HfTokenizer, TokenizeOptions};
use prefopt_model::{fill_model_dir, save_model_dir, HfModel, Llama};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::checkpoint::{self, TrainerState};
use crate::config::{NonFinitePolicy, TrainConfig};
use crate::dataset::PairDataset;
use crate::losses::{combined_loss, reward_metrics, LossParams, PairLogps};
use crate::metrics::{MetricAverager, MetricsLog};
use crate::optim::{Optimizer, OptimizerConfig};
use crate::reference::{self, RefLogps};
use crate::schedule::Schedule;
use crate::spo::{self, SpoSolver};
use crate::{grads, logps, TrainError};

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

/// Runs a whole training job as configured.
pub fn train(cfg: &TrainConfig, obs: &mut dyn Observer) -> Result<TrainSummary, TrainError> {
    let device = Device::Cpu;
    let out = &cfg.output_dir;
    std::fs::create_dir_all(out).map_err(|e| TrainError::Io(format!("output_dir {}: {e}", out.display())))?;
    let probe = out.join(".prefopt-write-test");
    std::fs::write(&probe, b"").map_err(|e| TrainError::Io(format!("output_dir {} is not writable: {e}", out.display())))?;
    let _ = std::fs::remove_file(&probe);

    let resume_dir = resolve_resume(cfg)?;
    if resume_dir.is_none() && (checkpoint::latest(out).is_some() || out.join("final").exists()) {
        return Err(TrainError::Config(format!(
            "output_dir {} already holds a run; resume it (--resume) or choose another output_dir",
            out.display()
        )));
    }

    // Data.
    let tok = HfTokenizer::from_dir(&cfg.model)?;
    let opts = TokenizeOptions { max_length: Some(cfg.max_length), max_prompt_length: cfg.max_prompt_length };
    let train_data = PairDataset::load(&cfg.train_data, &tok, &opts)?;
    let eval_data = cfg.eval_data.as_deref().map(|p| PairDataset::load(p, &tok, &opts)).transpose()?;
    if train_data.dropped > 0 {
        obs.message(&format!("{}: {} examples dropped by max_length {}", train_data.path.display(), train_data.dropped, cfg.max_length));
    }
    let pad_id = tok.pad_token_id().or(tok.eos_token_ids().first().copied()).unwrap_or(0);

    // Losses: check every parameter before any compute.
    let params = LossParams {
        beta: cfg.beta,
        label_smoothing: cfg.label_smoothing,
        simpo_gamma: cfg.simpo_gamma,
        dpop_lambda: cfg.dpop_lambda,
        ..LossParams::default()
    };
    let terms = cfg.loss_terms();
    for (kind, _) in &terms {
        params.check(*kind).map_err(|e| TrainError::Config(e.to_string()))?;
        if kind.needs_win_probs() {
            return Err(TrainError::Config(format!(
                "loss `{}` needs win probabilities, which only the online loop estimates; use `sppo_hard` offline",
                kind.name()
            )));
        }
    }

    // Reference log-probs, before the policy is loaded (one model in memory at a time).
    let mut reference_forward_passes = false;
    let (ref_train, ref_eval) = if cfg.needs_reference() {
        let mut get = |data: &PairDataset| -> Result<RefLogps, TrainError> {
            let (values, computed) = reference_logps(cfg, data, pad_id, &device, obs)?;
            reference_forward_passes |= computed;
            Ok(values)
        };
        let train_ref = get(&train_data)?;
        let eval_ref = eval_data.as_ref().map(&mut get).transpose()?;
        (Some(train_ref), eval_ref)
    } else {
        (None, None)
    };

    // Policy, optimizer and position: fresh or from the checkpoint.
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
    let pairs_per_step = cfg.batch_size * cfg.gradient_accumulation_steps;
    let steps_per_epoch = train_data.len().div_ceil(pairs_per_step);
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
    let schedule = Schedule::new(cfg.lr_scheduler_type, cfg.learning_rate, cfg.warmup_steps, cfg.warmup_ratio, total_steps);
    let policy = hf.build(true)?;
    let frozen_view = hf.build(false)?; // same storage, no graph: for evaluation
    let mut last_checkpoint: Option<PathBuf> = resume_dir.clone();

    obs.start(state.step, total_steps);
    while state.step < total_steps {
        let step = state.step;
        let started = Instant::now();
        let indices = step_indices(cfg.seed, step, steps_per_epoch, pairs_per_step, train_data.len());
        let mut acc = StepAccumulator::default();
        for micro in indices.chunks(cfg.batch_size) {
            let share = micro.len() as f64 / indices.len() as f64;
            let fwd = forward_pairs(&policy, &train_data, ref_train.as_ref(), micro, pad_id, &device)?;
            let x = fwd.pair_logps();
            let po = combined_loss(&terms, &params, &x)?;
            let (objective, g) = if cfg.spo_lambda > 0.0 {
                let ref_chosen = x.ref_chosen.ok_or_else(|| TrainError::Config("SPO needs reference log-probs".into()))?;
                let q = spo::safe_region_violation(x.chosen, ref_chosen, x.chosen_lens)?;
                acc.add_metric("spo/violation", scalar(&q)?, share);
                match cfg.spo_solver {
                    SpoSolver::Penalty => {
                        let total = spo::penalty_loss(&po, &q, cfg.spo_lambda)?;
                        let g = grads::collect(&hf.params, &total.backward()?)?.0;
                        (scalar(&total)?, g)
                    }
                    SpoSolver::Dynamic => {
                        // Gradients of the two levels apart; combined once the step is whole.
                        let gq = grads::collect(&hf.params, &q.backward()?)?.0;
                        grads::accumulate(&mut acc.grads_q, &gq, share)?;
                        (scalar(&po)?, grads::collect(&hf.params, &po.backward()?)?.0)
                    }
                }
            } else {
                (scalar(&po)?, grads::collect(&hf.params, &po.backward()?)?.0)
            };
            grads::accumulate(&mut acc.grads, &g, share)?;
            acc.add_metric("loss", objective, share);
            acc.add_batch_metrics(cfg.beta, &fwd, share)?;
            acc.num_tokens += fwd.num_tokens as u64;
        }
        if cfg.spo_lambda > 0.0 && cfg.spo_solver == SpoSolver::Dynamic {
            let lambda_t = spo::dynamic_weight(&acc.grads, &acc.grads_q, cfg.spo_eta)?;
            acc.grads = spo::combine_grads(&acc.grads, &acc.grads_q, lambda_t)?;
            acc.add_metric("spo/lambda", lambda_t, 1.0);
        }

        let loss = acc.metric("loss");
        let finite = loss.is_finite() && grads::all_finite(&acc.grads)?;
        let grad_norm = grads::clip_grad_norm(&mut acc.grads, cfg.max_grad_norm)?;
        let lr = schedule.lr_at(step);
        if !finite || !grad_norm.is_finite() {
            let batch = describe_batch(&train_data, &indices);
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
        if let Some(eval) = &eval_data {
            let due = (cfg.eval_steps > 0 && state.step % cfg.eval_steps == 0) || state.step == total_steps;
            if due {
                let mut line = evaluate(&frozen_view, eval, ref_eval.as_ref(), &terms, &params, cfg, pad_id, &device)?;
                line.insert("step".into(), state.step.into());
                line.insert("epoch".into(), epoch.into());
                log.append(&serde_json::Value::Object(line))?;
            }
        }
        if cfg.save_steps > 0 && state.step % cfg.save_steps == 0 && state.step < total_steps {
            let dir = checkpoint::checkpoint_dir(out, state.step);
            prefopt_model::fsio::write_dir_atomic(&dir, |tmp| {
                fill_model_dir(tmp, &hf.raw_config, &hf.params, Some(&source.dir))?;
                optimizer.save(tmp).map_err(|e| prefopt_model::ModelError::Io { path: tmp.to_path_buf(), message: e.to_string() })?;
                checkpoint::write_state(tmp, &state).map_err(|e| prefopt_model::ModelError::Io { path: tmp.to_path_buf(), message: e.to_string() })
            })?;
            last_checkpoint = Some(dir);
        }
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        obs.step(
            state.step,
            &StepStatus { loss, reward_accuracy: acc.metric("rewards/accuracies"), tokens_per_s: acc.num_tokens as f64 / secs },
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
        dropped_train: train_data.dropped,
        reference_forward_passes,
    })
}

/// The checkpoint to resume from: an explicit folder, or "latest" (none yet: start fresh).
fn resolve_resume(cfg: &TrainConfig) -> Result<Option<PathBuf>, TrainError> {
    match cfg.resume_from_checkpoint.as_deref() {
        None => Ok(None),
        Some("latest") => Ok(checkpoint::latest(&cfg.output_dir)),
        Some(path) => {
            let dir = PathBuf::from(path);
            if !dir.join(checkpoint::STATE_FILE).is_file() {
                return Err(TrainError::Config(format!("resume_from_checkpoint: {path} is not a complete checkpoint (no {})", checkpoint::STATE_FILE)));
            }
            Ok(Some(dir))
        }
    }
}

/// Reference log-probs of one dataset, from the on-disk cache when enabled and present.
/// Returns whether any reference forward pass ran.
fn reference_logps(cfg: &TrainConfig, data: &PairDataset, pad_id: u32, device: &Device, obs: &mut dyn Observer) -> Result<(RefLogps, bool), TrainError> {
    let ref_dir = cfg.ref_model_path();
    let cache = if cfg.precompute_ref_log_probs {
        let settings = format!("max_length={} max_prompt_length={:?} v1", cfg.max_length, cfg.max_prompt_length);
        let key = reference::cache_key(ref_dir, &data.path, &settings)?;
        let dir = reference::cache_dir(cfg.cache_dir.as_deref());
        if let Some(values) = reference::load_cached(&dir, &key, data.len()) {
            obs.message(&format!("reference log-probs for {} loaded from cache (key {}): no reference forward passes", data.path.display(), &key[..12]));
            return Ok((values, false));
        }
        Some((dir, key))
    } else {
        None
    };
    let model = HfModel::load(ref_dir, device)?;
    let total = data.len();
    let mut done = 0;
    let values = reference::compute(&model, data, cfg.batch_size, pad_id, device, |n| {
        done += n;
        obs.reference_progress(done, total);
    })?;
    if let Some((dir, key)) = cache {
        let path = reference::store_cached(&dir, &key, &values)?;
        obs.message(&format!("reference log-probs cached at {}", path.display()));
    }
    Ok((values, true))
}

/// Pair indices of optimizer step `step`: the epoch's shuffle (a pure function of the seed
/// and the epoch, so a resumed run sees the same order), sliced at the step's position.
pub fn step_indices(seed: u64, step: usize, steps_per_epoch: usize, pairs_per_step: usize, n: usize) -> Vec<usize> {
    let epoch = step / steps_per_epoch;
    let pos = step % steps_per_epoch;
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed.wrapping_add(epoch as u64));
    order.shuffle(&mut rng);
    order[pos * pairs_per_step..((pos + 1) * pairs_per_step).min(n)].to_vec()
}

fn describe_batch(data: &PairDataset, indices: &[usize]) -> String {
    let names: Vec<&str> = indices.iter().take(4).map(|&i| data.sources[i].as_str()).collect();
    let more = if indices.len() > 4 { format!(" and {} more", indices.len() - 4) } else { String::new() };
    format!("[{}{more}]", names.join(", "))
}

fn scalar(t: &Tensor) -> Result<f64, TrainError> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

/// One micro-batch's forward results, chosen and rejected side by side.
struct PairForward {
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Option<Tensor>,
    ref_rejected: Option<Tensor>,
    chosen_lens: Tensor,
    rejected_lens: Tensor,
    logit_sum_chosen: f64,
    logit_sum_rejected: f64,
    tokens_chosen: f64,
    tokens_rejected: f64,
    num_tokens: usize,
}

impl PairForward {
    fn pair_logps(&self) -> PairLogps<'_> {
        PairLogps {
            chosen: &self.chosen,
            rejected: &self.rejected,
            ref_chosen: self.ref_chosen.as_ref(),
            ref_rejected: self.ref_rejected.as_ref(),
            chosen_lens: &self.chosen_lens,
            rejected_lens: &self.rejected_lens,
            win_prob_chosen: None,
            win_prob_rejected: None,
        }
    }
}

/// Runs `model` on the chosen and rejected sequences of pairs `idx` in one batch.
fn forward_pairs(model: &Llama, data: &PairDataset, refs: Option<&RefLogps>, idx: &[usize], pad_id: u32, device: &Device) -> Result<PairForward, TrainError> {
    let m = idx.len();
    let seqs: Vec<_> = idx.iter().map(|&i| &data.pairs[i].chosen).chain(idx.iter().map(|&i| &data.pairs[i].rejected)).collect();
    let batch = logps::SequenceBatch::new(&seqs, pad_id, device)?;
    let out = logps::completion_logps(model, &batch)?;
    let lens: Vec<f32> = batch.completion_lens.iter().map(|&l| l as f32).collect();
    let logit_sums: Vec<f32> = out.logit_sums.to_vec1()?;
    let refs = refs.map(|r| -> Result<(Tensor, Tensor), TrainError> {
        let w: Vec<f32> = idx.iter().map(|&i| r[i].0).collect();
        let l: Vec<f32> = idx.iter().map(|&i| r[i].1).collect();
        Ok((Tensor::from_vec(w, m, device)?, Tensor::from_vec(l, m, device)?))
    });
    let (ref_chosen, ref_rejected) = match refs.transpose()? {
        Some((w, l)) => (Some(w), Some(l)),
        None => (None, None),
    };
    Ok(PairForward {
        chosen: out.logps.narrow(0, 0, m)?,
        rejected: out.logps.narrow(0, m, m)?,
        ref_chosen,
        ref_rejected,
        chosen_lens: Tensor::from_vec(lens[..m].to_vec(), m, device)?,
        rejected_lens: Tensor::from_vec(lens[m..].to_vec(), m, device)?,
        logit_sum_chosen: logit_sums[..m].iter().map(|&v| v as f64).sum(),
        logit_sum_rejected: logit_sums[m..].iter().map(|&v| v as f64).sum(),
        tokens_chosen: lens[..m].iter().map(|&v| v as f64).sum(),
        tokens_rejected: lens[m..].iter().map(|&v| v as f64).sum(),
        num_tokens: batch.num_tokens,
    })
}

/// Gradients and share-weighted metrics of one optimizer step.
#[derive(Default)]
struct StepAccumulator {
    grads: Vec<Tensor>,
    grads_q: Vec<Tensor>,
    metrics: Vec<(String, f64)>,
    logits: [f64; 4], // chosen sum, chosen tokens, rejected sum, rejected tokens
    num_tokens: u64,
}

impl StepAccumulator {
    fn add_metric(&mut self, name: &str, value: f64, share: f64) {
        match self.metrics.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => *v += value * share,
            None => self.metrics.push((name.to_string(), value * share)),
        }
    }

    fn metric(&self, name: &str) -> f64 {
        self.metrics.iter().find(|(n, _)| n == name).map_or(f64::NAN, |(_, v)| *v)
    }

    fn add_batch_metrics(&mut self, beta: f64, fwd: &PairForward, share: f64) -> Result<(), TrainError> {
        for (name, value) in reward_metrics(beta, &fwd.pair_logps())?.named() {
            self.add_metric(name, value, share);
        }
        self.logits[0] += fwd.logit_sum_chosen;
        self.logits[1] += fwd.tokens_chosen;
        self.logits[2] += fwd.logit_sum_rejected;
        self.logits[3] += fwd.tokens_rejected;
        Ok(())
    }

    /// All metrics of the step, TRL's `logits/*` included.
    fn metrics(&self) -> Vec<(String, f64)> {
        let mut all = self.metrics.clone();
        all.push(("logits/chosen".into(), self.logits[0] / self.logits[1].max(1.0)));
        all.push(("logits/rejected".into(), self.logits[2] / self.logits[3].max(1.0)));
        all
    }
}

/// Loss and TRL metrics on held-out pairs, `eval_`-prefixed; no gradients.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    model: &Llama,
    data: &PairDataset,
    refs: Option<&RefLogps>,
    terms: &[(crate::losses::LossType, f64)],
    params: &LossParams,
    cfg: &TrainConfig,
    pad_id: u32,
    device: &Device,
) -> Result<serde_json::Map<String, serde_json::Value>, TrainError> {
    let mut acc = StepAccumulator::default();
    let all: Vec<usize> = (0..data.len()).collect();
    for micro in all.chunks(cfg.batch_size) {
        let share = micro.len() as f64 / data.len() as f64;
        let fwd = forward_pairs(model, data, refs, micro, pad_id, device)?;
        let x = fwd.pair_logps();
        acc.add_metric("loss", scalar(&combined_loss(terms, params, &x)?)?, share);
        if cfg.spo_lambda > 0.0 {
            if let Some(ref_chosen) = x.ref_chosen {
                acc.add_metric("spo/violation", scalar(&spo::safe_region_violation(x.chosen, ref_chosen, x.chosen_lens)?)?, share);
            }
        }
        acc.add_batch_metrics(cfg.beta, &fwd, share)?;
    }
    Ok(acc.metrics().into_iter().map(|(k, v)| (format!("eval_{k}"), v.into())).collect())
}
