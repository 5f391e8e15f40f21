//! KTO (Ethayarajh et al. 2024), `loss_type = "kto"`, as TRL's `KTOTrainer` (TRL 1.16)
//! computes it, on unpaired data: rows of `prompt`, `completion` and a boolean `label`.
//!
//! Per row, `r = lp(y|x) - lp_ref(y|x)` (summed completion log-probs) and
//!
//! ```text
//! desirable:    w_d * (1 - sigmoid(beta * (r - z0)))
//! undesirable:  w_u * (1 - sigmoid(beta * (z0 - r)))
//! ```
//!
//! averaged over the rows (divided by their count, not by the weights). `z0` is TRL's batch
//! KL estimate: the mean over the micro-batch of `lp(y'|x) - lp_ref(y'|x)` on mismatched
//! pairs, clamped at 0 and without gradient. The mismatched pairs are built once, as TRL
//! builds them: the kept rows in file order are cut into chunks of `batch_size`, and row i of
//! a chunk gets the completion of row i-1 (the first row the last row's). Like TRL, the rows
//! are visited in file order (no shuffle), so a micro-batch is such a chunk.
//!
//! Tokens follow the SFT rules (prompt + completion, EOS text appended to plain completions);
//! a row whose prompt fills `max_length` is dropped and the others are cut at `max_length`,
//! keeping the start. The reference log-probs of every row and mismatched pair are computed
//! once before training.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use prefopt_data::{
    parse_unpaired, tokenize_records, tokenize_sft, HfTokenizer, SeqOutcome, TokenizeOptions, TokenizedSequence,
};
use prefopt_model::{Checkpoints, Dropout, Llama, Params};

use crate::config::TrainConfig;
use crate::dataset::{keep, read_nonempty};
use crate::logps::{BatchLayout, Checkpointing, SequenceBatch};
use crate::losses::log_sigmoid;
use crate::trainer::{
    backward, describe_sources, prepare_output, run_loop, run_sharded, scalar, LogitSums, Objective, Observer,
    StepAccumulator, TrainSummary,
};
use crate::{grads, logps, TrainError};

/// An unpaired file, tokenized, with its mismatched (KL) sequences.
pub struct UnpairedDataset {
    pub path: PathBuf,
    /// Prompt + completion of each kept row.
    pub seqs: Vec<TokenizedSequence>,
    /// Row i's prompt with the completion of the row before it in its chunk.
    pub kl_seqs: Vec<TokenizedSequence>,
    pub desirable: Vec<bool>,
    pub sources: Vec<String>,
    /// Rows dropped because their prompt alone filled `max_length`.
    pub dropped: usize,
    pub boundary_moved: usize,
}

impl UnpairedDataset {
    /// Reads and tokenizes `path` and builds the mismatched pairs in chunks of `kl_chunk` rows.
    pub fn load(path: &Path, tok: &HfTokenizer, opts: &TokenizeOptions, kl_chunk: usize) -> Result<Self, TrainError> {
        let records = read_nonempty(path)?;
        // Whole sequences first: a mismatched pair takes another row's uncut completion.
        let whole = TokenizeOptions { max_length: None, ..*opts };
        let outcomes = tokenize_records(path, &records, |r| {
            let row = parse_unpaired(r)?;
            Ok((tokenize_sft(tok, &row.example, &whole)?, row.desirable))
        })?;
        // TRL's filter: the prompt must leave room for a completion token.
        let outcomes = outcomes.into_iter().map(|(outcome, label)| match outcome {
            SeqOutcome::Kept(seq) => match opts.max_length {
                Some(max) if seq.completion_start >= max => {
                    Err(format!("the prompt has {} tokens, max_length is {max}", seq.completion_start))
                }
                _ => Ok((seq, label)),
            },
            SeqOutcome::Dropped(reason) => Err(reason),
        });
        let (kept, dropped) = keep(path, &records, outcomes)?;
        let sources = kept.iter().map(|k| k.record.source.to_string()).collect();
        let (full, desirable): (Vec<TokenizedSequence>, Vec<bool>) = kept.into_iter().map(|k| k.example).unzip();
        let cut = |mut ids: Vec<u32>, start: usize| {
            if let Some(max) = opts.max_length {
                ids.truncate(max);
            }
            TokenizedSequence::new(ids, start)
        };
        let mut kl_seqs = Vec::with_capacity(full.len());
        for chunk_start in (0..full.len()).step_by(kl_chunk) {
            let chunk = &full[chunk_start..(chunk_start + kl_chunk).min(full.len())];
            for (i, seq) in chunk.iter().enumerate() {
                let other = &chunk[(i + chunk.len() - 1) % chunk.len()];
                let ids = seq.prompt_ids().iter().chain(other.completion_ids()).copied().collect();
                kl_seqs.push(cut(ids, seq.completion_start));
            }
        }
        let boundary_moved = full.iter().filter(|s| s.boundary_moved).count();
        let seqs = full
            .into_iter()
            .map(|s| TokenizedSequence { boundary_moved: s.boundary_moved, ..cut(s.input_ids, s.completion_start) })
            .collect();
        Ok(Self { path: path.to_path_buf(), seqs, kl_seqs, desirable, sources, dropped, boundary_moved })
    }

    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

/// The KTO loss of each row (module doc): `logratios` (B,) = `lp - lp_ref`, the batch KL
/// estimate `z0`, the rows' labels and weights.
pub fn kto_losses(
    logratios: &Tensor,
    z0: f64,
    desirable: &[bool],
    beta: f64,
    desirable_weight: f64,
    undesirable_weight: f64,
) -> Result<Tensor, TrainError> {
    // 1 - sigmoid(beta * s (r - z0)) = exp(log sigmoid(-beta * s (r - z0))), s = +1 or -1.
    let device = logratios.device();
    let sign: Vec<f64> = desirable.iter().map(|&d| if d { 1.0 } else { -1.0 }).collect();
    let weight: Vec<f64> = desirable.iter().map(|&d| if d { desirable_weight } else { undesirable_weight }).collect();
    let sign = Tensor::from_vec(sign, desirable.len(), device)?.to_dtype(logratios.dtype())?;
    let weight = Tensor::from_vec(weight, desirable.len(), device)?.to_dtype(logratios.dtype())?;
    let z = (logratios.affine(1.0, -z0)? * sign)?.affine(-beta, 0.0)?;
    Ok((log_sigmoid(&z)?.exp()? * weight)?)
}

/// TRL's batch KL estimate: the mean of `lp - lp_ref` over mismatched pairs, clamped at 0.
pub fn kl_estimate(policy: &[f64], reference: &[f64]) -> f64 {
    let n = policy.len().max(1) as f64;
    (policy.iter().zip(reference).map(|(p, r)| p - r).sum::<f64>() / n).max(0.0)
}

/// Runs a KTO job (`loss_type = "kto"`).
pub fn train_kto(cfg: &TrainConfig, obs: &mut dyn Observer) -> Result<TrainSummary, TrainError> {
    if cfg.batch_size < 2 {
        return Err(TrainError::Config {
            key: "batch_size",
            message: format!(
                "KTO's KL estimate needs mismatched pairs within a batch: batch_size must be at least 2, got {}",
                cfg.batch_size
            ),
        });
    }
    let device = cfg.device()?;
    let (_lock, resume_dir) = prepare_output(cfg, obs)?;
    let tok = HfTokenizer::from_dir(&cfg.model)?;
    let opts = cfg.tokenize_options();
    let train = UnpairedDataset::load(&cfg.train_data, &tok, &opts, cfg.batch_size)?;
    // TRL chunks the evaluation rows with the training batch size too.
    let eval = cfg.eval_data.as_deref().map(|p| UnpairedDataset::load(p, &tok, &opts, cfg.batch_size)).transpose()?;
    if train.dropped > 0 {
        obs.message(&format!(
            "{}: {} rows dropped by max_length {}",
            train.path.display(),
            train.dropped,
            cfg.max_length
        ));
    }
    crate::preference::report_boundary_moved(&train.path, train.boundary_moved, obs);
    let layout = cfg.batch_layout(tok.padding_id());
    let reference = crate::weights::reference_network(cfg, &device)?;
    let total: usize = std::iter::once(&train).chain(&eval).map(|d| 2 * d.len()).sum();
    let mut done = 0;
    let mut reference_of = |data: &UnpairedDataset| -> Result<ReferenceLogps, TrainError> {
        let mut pass = |seqs: &[TokenizedSequence]| -> Result<Vec<f64>, TrainError> {
            let mut out = Vec::with_capacity(seqs.len());
            for chunk in seqs.chunks(cfg.batch_size) {
                out.extend(sequence_logps(&reference, chunk, layout)?);
                done += chunk.len();
                obs.reference_progress(done, total);
            }
            Ok(out)
        };
        Ok(ReferenceLogps { target: pass(&data.seqs)?, kl: pass(&data.kl_seqs)? })
    };
    let ref_train = reference_of(&train)?;
    let ref_eval = eval.as_ref().map(&mut reference_of).transpose()?;
    drop(reference);
    let boundary_moved = train.boundary_moved;
    let mut objective = KtoObjective {
        train,
        eval,
        ref_train,
        ref_eval,
        beta: cfg.beta,
        weights: (cfg.desirable_weight, cfg.undesirable_weight),
        batch_size: cfg.batch_size,
        layout,
        checkpointing: cfg.checkpointing(),
        step_kl: Vec::new(),
    };
    let mut summary = run_loop(cfg, resume_dir, &mut objective, obs)?;
    summary.boundary_moved = boundary_moved;
    summary.reference_forward_passes = true;
    Ok(summary)
}

/// Summed completion log-probs of `seqs` in one graph-free pass.
fn sequence_logps(model: &Llama, seqs: &[TokenizedSequence], layout: BatchLayout) -> Result<Vec<f64>, TrainError> {
    let refs: Vec<&TokenizedSequence> = seqs.iter().collect();
    let batch = SequenceBatch::sequences(&refs, layout.for_pass(model, false), model.device())?;
    let out = logps::completion_logps(model, &batch)?;
    Ok(out.logps.detach().to_vec1::<f32>()?.into_iter().map(f64::from).collect())
}

/// The reference's log-probs of a dataset's rows and of its mismatched pairs.
struct ReferenceLogps {
    target: Vec<f64>,
    kl: Vec<f64>,
}

struct KtoObjective {
    train: UnpairedDataset,
    eval: Option<UnpairedDataset>,
    ref_train: ReferenceLogps,
    ref_eval: Option<ReferenceLogps>,
    beta: f64,
    /// (desirable, undesirable)
    weights: (f64, f64),
    batch_size: usize,
    layout: BatchLayout,
    checkpointing: Checkpointing,
    /// The current step's micro-batches and their KL estimates.
    step_kl: Vec<(Vec<usize>, f64)>,
}

/// A micro-batch's (or shard's) forward pass over its rows.
struct RowsForward {
    logps: Tensor,
    logratios: Tensor,
    logits: LogitSums,
    num_tokens: usize,
    checkpoints: Option<Checkpoints>,
}

impl KtoObjective {
    /// The KL estimate of micro-batch `micro` under `model` (graph-free), the policy's
    /// mismatched pairs run one shard per compute thread.
    fn micro_kl(
        &self,
        model: &Llama,
        data: &UnpairedDataset,
        refs: &ReferenceLogps,
        micro: &[usize],
    ) -> Result<f64, TrainError> {
        let cost = |i: usize| data.kl_seqs[i].input_ids.len();
        let shards = run_sharded(micro, cost, |shard| {
            let seqs: Vec<TokenizedSequence> = shard.iter().map(|&i| data.kl_seqs[i].clone()).collect();
            Ok(shard.iter().copied().zip(sequence_logps(model, &seqs, self.layout)?).collect::<Vec<_>>())
        })?;
        let (policy, reference): (Vec<f64>, Vec<f64>) =
            shards.into_iter().flatten().map(|(i, lp)| (lp, refs.kl[i])).unzip();
        Ok(kl_estimate(&policy, &reference))
    }

    fn forward(
        &self,
        model: &Llama,
        data: &UnpairedDataset,
        refs: &ReferenceLogps,
        idx: &[usize],
        training: Option<(Checkpointing, u64)>,
    ) -> Result<RowsForward, TrainError> {
        let device = model.device();
        let seqs: Vec<&TokenizedSequence> = idx.iter().map(|&i| &data.seqs[i]).collect();
        let layout = self.layout.for_pass(model, training.is_some());
        let batch = SequenceBatch::sequences(&seqs, layout, device)?;
        let out = match training {
            None => logps::completion_logps(model, &batch)?,
            Some((checkpointing, seed)) => {
                let dropout = Dropout { seed, sequences: idx.iter().map(|&i| i as u64).collect() };
                logps::completion_logps_for_training(model, &batch, checkpointing, Some(dropout))?
            }
        };
        let reference: Vec<f32> = idx.iter().map(|&i| refs.target[i] as f32).collect();
        let logratios = (&out.logps - Tensor::from_vec(reference, idx.len(), device)?)?;
        let (sums, lens): (Vec<f32>, Vec<usize>) = (out.logit_sums.to_vec1()?, batch.completion_lens.clone());
        let mut logits = LogitSums::default();
        for (k, &i) in idx.iter().enumerate() {
            let (sum, tokens) = (sums[k] as f64, lens[k] as f64);
            if data.desirable[i] {
                (logits.chosen, logits.chosen_tokens) = (logits.chosen + sum, logits.chosen_tokens + tokens);
            } else {
                (logits.rejected, logits.rejected_tokens) = (logits.rejected + sum, logits.rejected_tokens + tokens);
            }
        }
        Ok(RowsForward {
            logps: out.logps,
            logratios,
            logits,
            num_tokens: batch.num_tokens,
            checkpoints: out.checkpoints,
        })
    }

    /// The rows' loss (their mean) and TRL's metrics, weighted by the rows' share of `among`
    /// (the step's, or the evaluation set's, rows): `kl`, and per label the mean reward
    /// `beta * r` and log-prob, each over the rows of that label in `among`.
    fn loss_and_metrics(
        &self,
        data: &UnpairedDataset,
        fwd: &RowsForward,
        idx: &[usize],
        among: &[usize],
        z0: f64,
        acc: &mut StepAccumulator,
    ) -> Result<Tensor, TrainError> {
        let labels: Vec<bool> = idx.iter().map(|&i| data.desirable[i]).collect();
        let (w_d, w_u) = self.weights;
        let loss = kto_losses(&fwd.logratios, z0, &labels, self.beta, w_d, w_u)?.mean_all()?;
        let share = idx.len() as f64 / among.len() as f64;
        acc.add_metric("loss", scalar(&loss)?, share);
        acc.add_metric("kl", z0, share);
        let ratios: Vec<f32> = fwd.logratios.detach().to_vec1()?;
        let lps: Vec<f32> = fwd.logps.detach().to_vec1()?;
        for (label, side) in [(true, "chosen"), (false, "rejected")] {
            let in_step = among.iter().filter(|&&i| data.desirable[i] == label).count();
            let mine: Vec<usize> = (0..idx.len()).filter(|&k| labels[k] == label).collect();
            if in_step == 0 || mine.is_empty() {
                continue;
            }
            let mean = |v: &[f32]| mine.iter().map(|&k| v[k] as f64).sum::<f64>() / mine.len() as f64;
            let weight = mine.len() as f64 / in_step as f64;
            acc.add_metric(&format!("rewards/{side}"), self.beta * mean(&ratios), weight);
            acc.add_metric(&format!("logps/{side}"), mean(&lps), weight);
        }
        acc.add_logits(&fwd.logits);
        Ok(loss)
    }

    /// The step's micro-batch that holds `shard`, and its KL estimate.
    fn kl_of(&self, shard: &[usize]) -> f64 {
        self.step_kl.iter().find(|(m, _)| m.contains(&shard[0])).map_or(0.0, |(_, z0)| *z0)
    }
}

/// TRL's `rewards/margins`, when the step has rows of both labels.
fn add_margin(acc: &mut StepAccumulator) {
    let margin = acc.metric("rewards/chosen") - acc.metric("rewards/rejected");
    if margin.is_finite() {
        acc.add_metric("rewards/margins", margin, 1.0);
    }
}

impl Objective for KtoObjective {
    fn len(&self) -> usize {
        self.train.len()
    }

    fn cost(&self, i: usize) -> usize {
        self.train.seqs[i].input_ids.len()
    }

    fn describe(&self, idx: &[usize]) -> String {
        describe_sources(&self.train.sources, idx)
    }

    fn dropped(&self) -> usize {
        self.train.dropped
    }

    fn shuffles(&self) -> bool {
        false
    }

    fn prepare_step(&mut self, policy: &Llama, micro_batches: &[&[usize]]) -> Result<(), TrainError> {
        let mut step_kl = Vec::with_capacity(micro_batches.len());
        for micro in micro_batches {
            step_kl.push((micro.to_vec(), self.micro_kl(policy, &self.train, &self.ref_train, micro)?));
        }
        self.step_kl = step_kl;
        Ok(())
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
        let fwd =
            self.forward(policy, &self.train, &self.ref_train, micro, Some((self.checkpointing, dropout_seed)))?;
        let loss = self.loss_and_metrics(&self.train, &fwd, micro, step, self.kl_of(micro), &mut acc)?;
        let share = micro.len() as f64 / step.len() as f64;
        grads::accumulate(&mut acc.grads, &backward(&loss, share, params, policy, fwd.checkpoints.as_ref())?, 1.0)?;
        acc.num_tokens += fwd.num_tokens as u64;
        Ok(acc)
    }

    fn finish_step(&mut self, acc: &mut StepAccumulator) -> Result<(), TrainError> {
        add_margin(acc);
        Ok(())
    }

    fn evaluate(
        &mut self,
        model: &Llama,
        _params: &Params,
    ) -> Result<Option<serde_json::Map<String, serde_json::Value>>, TrainError> {
        let (Some(data), Some(refs)) = (&self.eval, &self.ref_eval) else { return Ok(None) };
        let mut acc = StepAccumulator::default();
        let all: Vec<usize> = (0..data.len()).collect();
        for micro in all.chunks(self.batch_size) {
            let z0 = self.micro_kl(model, data, refs, micro)?;
            let fwd = self.forward(model, data, refs, micro, None)?;
            self.loss_and_metrics(data, &fwd, micro, &all, z0, &mut acc)?;
        }
        add_margin(&mut acc);
        Ok(Some(acc.metrics().into_iter().map(|(k, v)| (format!("eval_{k}"), v.into())).collect()))
    }
}

/// Whether a config trains KTO.
pub fn is_kto(cfg: &TrainConfig) -> bool {
    cfg.loss_type.to_vec() == [crate::losses::LossType::Kto]
}
