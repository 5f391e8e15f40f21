//! The preference objective: any mix of methods.md section 2's losses on chosen/rejected
//! pairs, with SPO (section 4) as an optional stabilizer, and `train`, the entry point of
//! `prefopt train` (which hands `loss_type = "kto"` to `kto.rs`).

use candle_core::{Device, Tensor};
use prefopt_data::HfTokenizer;
use prefopt_model::{Checkpoints, Dropout, Llama, Params};

use crate::config::TrainConfig;
use crate::dataset::PairDataset;
use crate::logps::{BatchLayout, Checkpointing};
use crate::losses::{combined_loss, reward_metrics, LossParams, LossType, PairLogps};
use crate::reference::{self, RefLogps};
use crate::spo::{self, SpoSolver};
use crate::trainer::{
    backward, describe_sources, prepare_output, run_loop, scalar, LogitSums, Objective, Observer, StepAccumulator,
    TrainSummary,
};
use crate::{grads, logps, TrainError};

/// Runs a preference training job as configured.
pub fn train(cfg: &TrainConfig, obs: &mut dyn Observer) -> Result<TrainSummary, TrainError> {
    if crate::kto::is_kto(cfg) {
        return crate::kto::train_kto(cfg, obs);
    }
    let device = cfg.device()?;
    let (_lock, resume_dir) = prepare_output(cfg, obs)?;
    let tok = HfTokenizer::from_dir(&cfg.model)?;
    let opts = cfg.tokenize_options();
    let train_data = PairDataset::load(&cfg.train_data, &tok, &opts)?;
    let eval_data = cfg.eval_data.as_deref().map(|p| PairDataset::load(p, &tok, &opts)).transpose()?;
    if train_data.dropped > 0 {
        obs.message(&format!(
            "{}: {} examples dropped by max_length {}",
            train_data.path.display(),
            train_data.dropped,
            cfg.max_length
        ));
    }
    report_boundary_moved(&train_data.path, train_data.boundary_moved, obs);
    let boundary_moved = train_data.boundary_moved;
    let pad_id = tok.padding_id();

    // Losses: check every parameter before any compute.
    let terms = cfg.loss_terms();
    let params = loss_params(cfg);
    for (kind, _) in &terms {
        params.check(*kind)?;
        if kind.needs_win_probs() {
            if let Some(data) = std::iter::once(&train_data).chain(&eval_data).find(|d| d.win_probs.is_none()) {
                return Err(TrainError::Config {
                    key: "loss_type",
                    message: format!(
                        "loss `{}` needs win probabilities: columns `win_prob_chosen` and `win_prob_rejected` in {} \
                         (`prefopt apo` writes them); use `sppo_hard` without them",
                        kind.name(),
                        data.path.display()
                    ),
                });
            }
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

    let mut objective = PreferenceObjective::new(cfg, train_data, ref_train, pad_id);
    objective.eval = eval_data;
    objective.ref_eval = ref_eval;
    let mut summary = run_loop(cfg, resume_dir, &mut objective, obs)?;
    summary.reference_forward_passes = reference_forward_passes;
    summary.boundary_moved = boundary_moved;
    Ok(summary)
}

/// Says how many examples of `path` start their completion at the shared token prefix.
pub(crate) fn report_boundary_moved(path: &std::path::Path, moved: usize, obs: &mut dyn Observer) {
    if moved > 0 {
        obs.message(&format!(
            "{}: {moved} examples tokenize across the prompt's end; their completions start at the \
             shared token prefix (prompt_boundary = \"common_prefix\")",
            path.display()
        ));
    }
}

/// The loss knobs of a config.
fn loss_params(cfg: &TrainConfig) -> LossParams {
    LossParams {
        beta: cfg.beta,
        label_smoothing: cfg.label_smoothing,
        simpo_gamma: cfg.simpo_gamma,
        dpop_lambda: cfg.dpop_lambda,
        cpo_alpha: cfg.cpo_alpha,
        rdpo_alpha: cfg.rdpo_alpha,
        ..LossParams::default()
    }
}

/// Preference pairs and how to turn them into a loss: the configured mix of losses, SPO on
/// top when enabled, the reference log-probs as data.
pub struct PreferenceObjective {
    train: PairDataset,
    eval: Option<PairDataset>,
    ref_train: Option<RefLogps>,
    ref_eval: Option<RefLogps>,
    terms: Vec<(LossType, f64)>,
    params: LossParams,
    /// (solver, lambda, eta) when SPO is on.
    spo: Option<(SpoSolver, f64, f64)>,
    batch_size: usize,
    layout: BatchLayout,
    checkpointing: Checkpointing,
}

impl PreferenceObjective {
    /// The objective of `cfg`'s losses on `train`, with reference log-probs `reference` (one
    /// pair per training pair; `None` for reference-free losses) and no evaluation data.
    pub fn new(cfg: &TrainConfig, train: PairDataset, reference: Option<RefLogps>, pad_id: u32) -> Self {
        Self {
            train,
            eval: None,
            ref_train: reference,
            ref_eval: None,
            terms: cfg.loss_terms(),
            params: loss_params(cfg),
            spo: (cfg.spo_lambda > 0.0).then_some((cfg.spo_solver, cfg.spo_lambda, cfg.spo_eta)),
            batch_size: cfg.batch_size,
            layout: cfg.batch_layout(pad_id),
            checkpointing: cfg.checkpointing(),
        }
    }

    /// Replaces the training pairs' reference log-probs (a caller that recomputes them, as a
    /// benchmark of PyTorch's per-step reference forward does).
    pub fn set_reference(&mut self, reference: RefLogps) {
        self.ref_train = Some(reference);
    }
}

impl Objective for PreferenceObjective {
    fn len(&self) -> usize {
        self.train.len()
    }

    fn cost(&self, i: usize) -> usize {
        self.train.pairs[i].num_tokens()
    }

    fn describe(&self, idx: &[usize]) -> String {
        describe_sources(&self.train.sources, idx)
    }

    fn dropped(&self) -> usize {
        self.train.dropped
    }

    fn micro_step(
        &self,
        policy: &Llama,
        params: &Params,
        step: &[usize],
        micro: &[usize],
        dropout_seed: u64,
    ) -> Result<StepAccumulator, TrainError> {
        let mut acc = StepAccumulator::default();
        let share = micro.len() as f64 / step.len() as f64;
        let training = Some((self.checkpointing, dropout_seed));
        let fwd = forward_pairs(policy, &self.train, self.ref_train.as_ref(), micro, self.layout, training)?;
        let x = fwd.pair_logps();
        let po = combined_loss(&self.terms, &self.params, &x)?;
        let ckpt = fwd.checkpoints.as_ref();
        let (objective, g) = match self.spo {
            None => (scalar(&po)?, backward(&po, share, params, policy, ckpt)?),
            Some((solver, lambda, _)) => {
                let ref_chosen = x.ref_chosen.ok_or_else(|| TrainError::Config {
                    key: "spo_lambda",
                    message: "SPO needs reference log-probs".into(),
                })?;
                let q = spo::safe_region_violation(x.chosen, ref_chosen, x.chosen_lens)?;
                acc.add_metric("spo/violation", scalar(&q)?, share);
                match solver {
                    SpoSolver::Penalty => {
                        let total = spo::penalty_loss(&po, &q, lambda)?;
                        (scalar(&total)?, backward(&total, share, params, policy, ckpt)?)
                    }
                    SpoSolver::Dynamic => {
                        // The two levels' gradients apart; combined once the step is whole.
                        grads::accumulate(&mut acc.grads_aux, &backward(&q, share, params, policy, ckpt)?, 1.0)?;
                        (scalar(&po)?, backward(&po, share, params, policy, ckpt)?)
                    }
                }
            }
        };
        grads::accumulate(&mut acc.grads, &g, 1.0)?;
        acc.add_metric("loss", objective, share);
        add_batch_metrics(&mut acc, self.params.beta, &fwd, share)?;
        acc.num_tokens += fwd.num_tokens as u64;
        Ok(acc)
    }

    fn finish_step(&mut self, acc: &mut StepAccumulator) -> Result<(), TrainError> {
        if let Some((SpoSolver::Dynamic, _, eta)) = self.spo {
            let lambda_t = spo::dynamic_weight(&acc.grads, &acc.grads_aux, eta)?;
            acc.grads = spo::combine_grads(&acc.grads, &acc.grads_aux, lambda_t)?;
            acc.add_metric("spo/lambda", lambda_t, 1.0);
        }
        Ok(())
    }

    fn evaluate(
        &mut self,
        model: &Llama,
        _params: &Params,
    ) -> Result<Option<serde_json::Map<String, serde_json::Value>>, TrainError> {
        let Some(data) = &self.eval else { return Ok(None) };
        let mut acc = StepAccumulator::default();
        let all: Vec<usize> = (0..data.len()).collect();
        for micro in all.chunks(self.batch_size) {
            let share = micro.len() as f64 / data.len() as f64;
            let fwd = forward_pairs(model, data, self.ref_eval.as_ref(), micro, self.layout, None)?;
            let x = fwd.pair_logps();
            acc.add_metric("loss", scalar(&combined_loss(&self.terms, &self.params, &x)?)?, share);
            if let (Some(_), Some(ref_chosen)) = (self.spo, x.ref_chosen) {
                acc.add_metric(
                    "spo/violation",
                    scalar(&spo::safe_region_violation(x.chosen, ref_chosen, x.chosen_lens)?)?,
                    share,
                );
            }
            add_batch_metrics(&mut acc, self.params.beta, &fwd, share)?;
        }
        Ok(Some(acc.metrics().into_iter().map(|(k, v)| (format!("eval_{k}"), v.into())).collect()))
    }
}

fn add_batch_metrics(acc: &mut StepAccumulator, beta: f64, fwd: &PairForward, share: f64) -> Result<(), TrainError> {
    for (name, value) in reward_metrics(beta, &fwd.pair_logps())?.named() {
        acc.add_metric(name, value, share);
    }
    acc.add_logits(&fwd.logits);
    Ok(())
}

/// Reference log-probs of one dataset, from the on-disk cache when enabled and present.
/// Returns whether any reference forward pass ran.
fn reference_logps(
    cfg: &TrainConfig,
    data: &PairDataset,
    pad_id: u32,
    device: &Device,
    obs: &mut dyn Observer,
) -> Result<(RefLogps, bool), TrainError> {
    if let Some(values) = &data.ref_logps {
        obs.message(&format!(
            "reference log-probs for {} read from its `ref_chosen_logps`/`ref_rejected_logps` columns",
            data.path.display()
        ));
        return Ok((values.clone(), false));
    }
    let ref_dir = cfg.ref_model_path();
    let cache = if cfg.precompute_ref_log_probs {
        let precision = if cfg.bf16 { " bf16" } else { "" };
        let settings =
            format!("max_length={} max_prompt_length={:?}{precision} v1", cfg.max_length, cfg.max_prompt_length);
        // The reference's every file: a stack's base and adapters, and the starting adapter.
        let mut model_dirs = prefopt_model::stack::source_dirs(ref_dir)?;
        model_dirs.extend(cfg.adapter.clone());
        let model_dirs: Vec<&std::path::Path> = model_dirs.iter().map(|d| d.as_path()).collect();
        let key = reference::cache_key(&model_dirs, &data.path, &settings)?;
        let dir = reference::cache_dir(cfg.cache_dir.as_deref());
        if let Some(values) = reference::load_cached(&dir, &key, data.len()) {
            obs.message(&format!(
                "reference log-probs for {} loaded from cache (key {}): no reference forward passes",
                data.path.display(),
                &key[..12]
            ));
            return Ok((values, false));
        }
        Some((dir, key))
    } else {
        None
    };
    let reference = crate::weights::reference_network(cfg, device)?;
    let total = data.len();
    let values = reference::compute(&reference, data, cfg.batch_size, cfg.batch_layout(pad_id), |done| {
        obs.reference_progress(done, total)
    })?;
    if let Some((dir, key)) = cache {
        let path = reference::store_cached(&dir, &key, &values)?;
        obs.message(&format!("reference log-probs cached at {}", path.display()));
    }
    Ok((values, true))
}

/// One micro-batch's forward results, chosen and rejected side by side.
struct PairForward {
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Option<Tensor>,
    ref_rejected: Option<Tensor>,
    /// SPPO's win probabilities, when the data has them.
    win_probs: Option<(Tensor, Tensor)>,
    chosen_lens: Tensor,
    rejected_lens: Tensor,
    logits: LogitSums,
    num_tokens: usize,
    checkpoints: Option<Checkpoints>,
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
            win_prob_chosen: self.win_probs.as_ref().map(|w| &w.0),
            win_prob_rejected: self.win_probs.as_ref().map(|w| &w.1),
        }
    }
}

/// Runs `model` on the chosen and rejected sequences of pairs `idx` in one batch.
fn forward_pairs(
    model: &Llama,
    data: &PairDataset,
    refs: Option<&RefLogps>,
    idx: &[usize],
    layout: BatchLayout,
    training: Option<(Checkpointing, u64)>,
) -> Result<PairForward, TrainError> {
    let device = model.device();
    let m = idx.len();
    let chosen: Vec<_> = idx.iter().map(|&i| &data.pairs[i].chosen).collect();
    let rejected: Vec<_> = idx.iter().map(|&i| &data.pairs[i].rejected).collect();
    let layout = layout.for_pass(model, training.is_some());
    let batch = logps::SequenceBatch::pairs(&chosen, &rejected, layout, device)?;
    let out = match training {
        None => logps::completion_logps(model, &batch)?,
        Some((checkpointing, seed)) => {
            // Pair i's chosen sequence is 2i, its rejected one 2i + 1, whatever the batching.
            let sequences = idx.iter().map(|&i| 2 * i as u64).chain(idx.iter().map(|&i| 2 * i as u64 + 1)).collect();
            logps::completion_logps_for_training(model, &batch, checkpointing, Some(Dropout { seed, sequences }))?
        }
    };
    let lens: Vec<f32> = batch.completion_lens.iter().map(|&l| l as f32).collect();
    let logit_sums: Vec<f32> = out.logit_sums.to_vec1()?;
    let columns = |r: &Vec<(f32, f32)>| -> Result<(Tensor, Tensor), TrainError> {
        let w: Vec<f32> = idx.iter().map(|&i| r[i].0).collect();
        let l: Vec<f32> = idx.iter().map(|&i| r[i].1).collect();
        Ok((Tensor::from_vec(w, m, device)?, Tensor::from_vec(l, m, device)?))
    };
    let win_probs = data.win_probs.as_ref().map(columns).transpose()?;
    let (ref_chosen, ref_rejected) = match refs.map(columns).transpose()? {
        Some((w, l)) => (Some(w), Some(l)),
        None => (None, None),
    };
    Ok(PairForward {
        chosen: out.logps.narrow(0, 0, m)?,
        rejected: out.logps.narrow(0, m, m)?,
        ref_chosen,
        ref_rejected,
        win_probs,
        chosen_lens: Tensor::from_vec(lens[..m].to_vec(), m, device)?,
        rejected_lens: Tensor::from_vec(lens[m..].to_vec(), m, device)?,
        logits: LogitSums {
            chosen: logit_sums[..m].iter().map(|&v| v as f64).sum(),
            chosen_tokens: lens[..m].iter().map(|&v| v as f64).sum(),
            rejected: logit_sums[m..].iter().map(|&v| v as f64).sum(),
            rejected_tokens: lens[m..].iter().map(|&v| v as f64).sum(),
        },
        num_tokens: batch.num_tokens,
        checkpoints: out.checkpoints,
    })
}
