//! Reward-model training (`prefopt reward`): a Bradley-Terry model on preference pairs, as
//! TRL's `RewardTrainer` trains one.
//!
//! A pair's chosen and rejected sequences (prompt in front, [`prefopt_data::reward`]) get a
//! reward each from the score head ([`prefopt_model::reward`]), and the loss is
//! `mean(-log sigmoid(r_chosen - r_rejected - margin)) + c * mean((r_chosen + r_rejected)^2)`
//! over the pairs, `margin` from the optional column of that name, `c` the
//! `center_rewards_coefficient`. The model starts from a reward model folder, or from a
//! causal LM with a new head; `final/` is a `*ForSequenceClassification` folder that
//! transformers' `AutoModelForSequenceClassification` and the `rm:` judge load.
//!
//! Metrics, by TRL's names: `loss`, `accuracy` (share of pairs with r_chosen > r_rejected;
//! ties count 0), `margin` (mean r_chosen - r_rejected, the column not subtracted),
//! `mean_reward`, and `min_reward` / `max_reward` over the step's 2 x pairs rewards (TRL
//! averages each micro-batch's extreme over the logging window; the same without gradient
//! accumulation and with `logging_steps = 1`).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use prefopt_data::{parse_preference, tokenize_records, HfTokenizer, Record, ScoredPair, ScoredPairOutcome};
use prefopt_model::config::config_path;
use prefopt_model::ops::PackedSpan;
use prefopt_model::{pooled_rewards, reward_position, Checkpoints, Llama, LlamaConfig, Params, RewardWeights};

use crate::config::TrainConfig;
use crate::dataset::{keep, read_columns, read_nonempty};
use crate::logps::Checkpointing;
use crate::losses::log_sigmoid;
use crate::trainer::{
    backward, describe_sources, prepare_output, run_loop, scalar, Extreme, Objective, Observer, StepAccumulator,
    TrainSummary,
};
use crate::weights::Weights;
use crate::{grads, TrainError};

/// The optional per-pair margin column (TRL's name).
pub const MARGIN_COLUMN: &str = "margin";

/// A preference file tokenized for a reward model.
pub struct RewardDataset {
    pub path: PathBuf,
    pub pairs: Vec<ScoredPair>,
    /// Per kept pair, the `margin` column, when the file has it.
    pub margins: Option<Vec<f32>>,
    pub sources: Vec<String>,
    /// Pairs dropped for a sequence longer than `max_length`.
    pub dropped: usize,
}

impl RewardDataset {
    /// Reads and tokenizes `path`; an empty file or one whose every pair is too long is an
    /// error.
    pub fn load(path: &Path, tok: &HfTokenizer, max_length: usize) -> Result<Self, TrainError> {
        let records = read_nonempty(path)?;
        let outcomes = tokenize_records(path, &records, |r| {
            prefopt_data::tokenize_reward_pair(tok, &parse_preference(r)?, Some(max_length))
        })?;
        let outcomes = outcomes.into_iter().map(|o| match o {
            ScoredPairOutcome::Kept(pair) => Ok(pair),
            ScoredPairOutcome::Dropped(reason) => Err(reason),
        });
        let (kept_rows, dropped) = keep(path, &records, outcomes)?;
        let kept: Vec<&Record> = kept_rows.iter().map(|k| k.record).collect();
        let pairs = kept_rows.into_iter().map(|k| k.example).collect();
        let margins = read_columns(&kept, [MARGIN_COLUMN], None)?.map(|m| m.into_iter().map(|[v]| v).collect());
        let sources = kept.iter().map(|r| r.source.to_string()).collect();
        Ok(Self { path: path.to_path_buf(), pairs, margins, sources, dropped })
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

/// Runs a reward-model training job as configured ([`TrainConfig::load_reward`]'s keys).
pub fn train_reward(cfg: &TrainConfig, obs: &mut dyn Observer) -> Result<TrainSummary, TrainError> {
    let (_lock, resume_dir) = prepare_output(cfg, obs)?;
    let tok = HfTokenizer::from_dir(&cfg.model)?;
    let train = RewardDataset::load(&cfg.train_data, &tok, cfg.max_length)?;
    let eval = cfg.eval_data.as_deref().map(|p| RewardDataset::load(p, &tok, cfg.max_length)).transpose()?;
    if train.dropped > 0 {
        obs.message(&format!(
            "{}: {} pairs dropped: a sequence longer than max_length {}",
            train.path.display(),
            train.dropped,
            cfg.max_length
        ));
    }
    // TRL's pad token: the tokenizer's, else its EOS; the reward is read before trailing pads.
    let pad_id = tok.padding_id();
    let mut objective = RewardObjective {
        train,
        eval,
        pad_id,
        center: cfg.center_rewards_coefficient,
        batch_size: cfg.batch_size,
        checkpointing: cfg.checkpointing(),
        padding_free: cfg.padding_free,
    };
    run_loop(cfg, resume_dir, &mut objective, obs)
}

struct RewardObjective {
    train: RewardDataset,
    eval: Option<RewardDataset>,
    pad_id: u32,
    center: Option<f64>,
    batch_size: usize,
    checkpointing: Checkpointing,
    /// Pack each batch's sequences into one row (`padding_free`) instead of padding them.
    padding_free: bool,
}

/// One micro-batch's rewards, chosen and rejected, and the checkpoints of a checkpointed pass.
struct RewardForward {
    chosen: Tensor,
    rejected: Tensor,
    margins: Option<Tensor>,
    num_tokens: usize,
    checkpoints: Option<Checkpoints>,
}

impl RewardObjective {
    /// Runs `model` and the head `score` on the chosen then the rejected sequences of pairs
    /// `idx` in one batch: packed side by side without padding (`padding_free`), or
    /// right-padded with the pad id (causal attention: the padding after a sequence cannot
    /// change its states). Either way a sequence's states are those of it run alone.
    fn forward(
        &self,
        model: &Llama,
        score: &Tensor,
        data: &RewardDataset,
        idx: &[usize],
        training: Option<Checkpointing>,
    ) -> Result<RewardForward, TrainError> {
        let device = model.device();
        let m = idx.len();
        let seqs: Vec<&[u32]> = idx
            .iter()
            .map(|&i| data.pairs[i].chosen.as_slice())
            .chain(idx.iter().map(|&i| data.pairs[i].rejected.as_slice()))
            .collect();
        let (mut flat, mut spans, mut rows) = (Vec::new(), Vec::new(), Vec::with_capacity(seqs.len()));
        let width = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        for s in &seqs {
            let start = flat.len();
            rows.push(start + reward_position(s, Some(self.pad_id)));
            flat.extend_from_slice(s);
            if self.padding_free {
                spans.push(PackedSpan::single(start, s.len()));
            } else {
                flat.resize(start + width, self.pad_id);
            }
        }
        let shape = if self.padding_free { (1, flat.len()) } else { (seqs.len(), width) };
        let input = Tensor::from_vec(flat, shape, device)?;
        let (h, checkpoints) = match (training, self.padding_free) {
            (None, false) => (model.hidden_states(&input, &[], None)?, None),
            (None, true) => (model.hidden_states_packed(&input, &spans)?, None),
            (Some(c), _) => model.hidden_states_for_training(&input, &spans, c == Checkpointing::On, None)?,
        };
        let rewards = pooled_rewards(&h, &rows, score)?;
        let margins = data
            .margins
            .as_ref()
            .map(|all| Tensor::from_vec(idx.iter().map(|&i| all[i]).collect::<Vec<f32>>(), m, device))
            .transpose()?;
        Ok(RewardForward {
            chosen: rewards.narrow(0, 0, m)?,
            rejected: rewards.narrow(0, m, m)?,
            margins,
            num_tokens: seqs.iter().map(|s| s.len()).sum(),
            checkpoints,
        })
    }

    /// TRL's loss: the Bradley-Terry term, plus the centering term when set.
    fn loss(&self, fwd: &RewardForward) -> Result<Tensor, TrainError> {
        let mut diff = (&fwd.chosen - &fwd.rejected)?;
        if let Some(m) = &fwd.margins {
            diff = (diff - m)?;
        }
        let mut loss = log_sigmoid(&diff)?.mean_all()?.neg()?;
        if let Some(c) = self.center {
            let centered = (&fwd.chosen + &fwd.rejected)?.sqr()?.mean_all()?;
            loss = (loss + centered.affine(c, 0.0)?)?;
        }
        Ok(loss)
    }
}

/// Adds a micro-batch's (or shard's) reward metrics, weighted by `share`.
fn add_reward_metrics(acc: &mut StepAccumulator, fwd: &RewardForward, share: f64) -> Result<(), TrainError> {
    let chosen: Vec<f32> = fwd.chosen.to_vec1()?;
    let rejected: Vec<f32> = fwd.rejected.to_vec1()?;
    let n = chosen.len() as f64;
    let wins = chosen.iter().zip(&rejected).filter(|(c, r)| c > r).count() as f64;
    let margin: f64 = chosen.iter().zip(&rejected).map(|(c, r)| (c - r) as f64).sum::<f64>() / n;
    let all = || chosen.iter().chain(&rejected).map(|&r| r as f64);
    acc.add_metric("accuracy", wins / n, share);
    acc.add_metric("margin", margin, share);
    acc.add_metric("mean_reward", all().sum::<f64>() / (2.0 * n), share);
    acc.add_extreme("min_reward", Extreme::Min, all().fold(f64::INFINITY, f64::min));
    acc.add_extreme("max_reward", Extreme::Max, all().fold(f64::NEG_INFINITY, f64::max));
    Ok(())
}

/// The head of the trainable parameters.
fn head(params: &Params) -> Result<&candle_core::Var, TrainError> {
    params
        .get(prefopt_model::reward::SCORE_WEIGHT)
        .ok_or_else(|| TrainError::Config { key: "model", message: "the reward model has no score head".into() })
}

impl Objective for RewardObjective {
    fn len(&self) -> usize {
        self.train.len()
    }

    fn cost(&self, i: usize) -> usize {
        let p = &self.train.pairs[i];
        p.chosen.len() + p.rejected.len()
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
        _dropout_seed: u64,
    ) -> Result<StepAccumulator, TrainError> {
        let mut acc = StepAccumulator::default();
        let share = micro.len() as f64 / step.len() as f64;
        let score = head(params)?.as_tensor().clone();
        let fwd = self.forward(policy, &score, &self.train, micro, Some(self.checkpointing))?;
        let loss = self.loss(&fwd)?;
        let g = backward(&loss, share, params, policy, fwd.checkpoints.as_ref())?;
        grads::accumulate(&mut acc.grads, &g, 1.0)?;
        acc.add_metric("loss", scalar(&loss)?, share);
        add_reward_metrics(&mut acc, &fwd, share)?;
        acc.num_tokens += fwd.num_tokens as u64;
        Ok(acc)
    }

    fn evaluate(
        &mut self,
        model: &Llama,
        params: &Params,
    ) -> Result<Option<serde_json::Map<String, serde_json::Value>>, TrainError> {
        let Some(data) = &self.eval else { return Ok(None) };
        let score = head(params)?.as_detached_tensor();
        let mut acc = StepAccumulator::default();
        let all: Vec<usize> = (0..data.len()).collect();
        for micro in all.chunks(self.batch_size) {
            let share = micro.len() as f64 / data.len() as f64;
            let fwd = self.forward(model, &score, data, micro, None)?;
            acc.add_metric("loss", scalar(&self.loss(&fwd)?)?, share);
            add_reward_metrics(&mut acc, &fwd, share)?;
        }
        Ok(Some(acc.metrics().into_iter().map(|(k, v)| (format!("eval_{k}"), v.into())).collect()))
    }

    /// A reward model's weights: `cfg.model` as a reward model, or a causal LM with a new
    /// head drawn from the seed; or the checkpoint. The config records the pad id the reward
    /// is read with; the network keeps `cfg.model`'s own pad id (the embedding row that
    /// gets no gradient, as transformers builds it), also when resuming, so a resumed run
    /// computes what an uninterrupted one does.
    fn load_weights(&self, cfg: &TrainConfig, resume: Option<&Path>, device: &Device) -> Result<Weights, TrainError> {
        let mut weights = RewardWeights::load_or_init(resume.unwrap_or(&cfg.model), cfg.seed, device)?;
        if weights.num_labels != 1 {
            return Err(TrainError::Config {
                key: "model",
                message: format!(
                    "{} has a score head of {} labels; a reward model has one (TRL's num_labels = 1)",
                    cfg.model.display(),
                    weights.num_labels
                ),
            });
        }
        weights.set_pad_token_id(self.pad_id);
        if resume.is_some() {
            // A checkpoint's config carries the pad id set above; the network keeps cfg.model's.
            weights.model.config.pad_token_id = LlamaConfig::from_file(&config_path(&cfg.model))?.0.pad_token_id;
        }
        Ok(Weights::Full(weights.model))
    }
}
