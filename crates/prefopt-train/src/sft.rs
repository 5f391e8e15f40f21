//! Supervised fine-tuning: the mean negative log-likelihood of completion tokens (prompt
//! tokens masked), TRL's `SFTTrainer` loss, on `prompt`/`completion` or `messages` data.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use prefopt_data::{
    parse_sft, tokenize_records, tokenize_sft, HfTokenizer, SeqOutcome, TokenizeOptions, TokenizedSequence,
};
use prefopt_model::{Checkpoints, Dropout, Llama, Params};

use crate::config::TrainConfig;
use crate::dataset::{keep, read_nonempty};
use crate::logps::{BatchLayout, Checkpointing};
use crate::trainer::{
    backward, describe_sources, prepare_output, run_loop, scalar, Objective, Observer, StepAccumulator, TrainSummary,
};
use crate::{grads, logps, TrainError};

/// Tokenized SFT examples of one file.
pub struct SeqDataset {
    pub path: PathBuf,
    pub seqs: Vec<TokenizedSequence>,
    pub sources: Vec<String>,
    pub dropped: usize,
    /// Kept examples whose completion starts at the shared token prefix
    /// (`prompt_boundary = "common_prefix"`).
    pub boundary_moved: usize,
}

impl SeqDataset {
    /// Reads and tokenizes `path`; empty or fully-dropped data is an error.
    pub fn load(path: &Path, tok: &HfTokenizer, opts: &TokenizeOptions) -> Result<Self, TrainError> {
        let records = read_nonempty(path)?;
        let outcomes = tokenize_records(path, &records, |r| tokenize_sft(tok, &parse_sft(r)?, opts))?;
        let outcomes = outcomes.into_iter().map(|o| match o {
            SeqOutcome::Kept(seq) => Ok(seq),
            SeqOutcome::Dropped(reason) => Err(reason),
        });
        let (kept, dropped) = keep(path, &records, outcomes)?;
        let sources = kept.iter().map(|k| k.record.source.to_string()).collect();
        let seqs: Vec<TokenizedSequence> = kept.into_iter().map(|k| k.example).collect();
        let boundary_moved = seqs.iter().filter(|s: &&TokenizedSequence| s.boundary_moved).count();
        Ok(Self { path: path.to_path_buf(), seqs, sources, dropped, boundary_moved })
    }
}

/// Runs an SFT job as configured (the preference-only keys are rejected by
/// [`TrainConfig::load_sft`]).
pub fn train_sft(cfg: &TrainConfig, obs: &mut dyn Observer) -> Result<TrainSummary, TrainError> {
    let (_lock, resume_dir) = prepare_output(cfg, obs)?;
    let tok = HfTokenizer::from_dir(&cfg.model)?;
    let opts = cfg.tokenize_options();
    let train = SeqDataset::load(&cfg.train_data, &tok, &opts)?;
    let eval = cfg.eval_data.as_deref().map(|p| SeqDataset::load(p, &tok, &opts)).transpose()?;
    if train.dropped > 0 {
        obs.message(&format!(
            "{}: {} examples dropped by max_length {}",
            train.path.display(),
            train.dropped,
            cfg.max_length
        ));
    }
    crate::preference::report_boundary_moved(&train.path, train.boundary_moved, obs);
    let boundary_moved = train.boundary_moved;
    let mut objective = SftObjective {
        train,
        eval,
        batch_size: cfg.batch_size,
        layout: cfg.batch_layout(tok.padding_id()),
        checkpointing: cfg.checkpointing(),
    };
    let mut summary = run_loop(cfg, resume_dir, &mut objective, obs)?;
    summary.boundary_moved = boundary_moved;
    Ok(summary)
}

struct SftObjective {
    train: SeqDataset,
    eval: Option<SeqDataset>,
    batch_size: usize,
    /// Only `padding_free` applies (there are no pairs).
    layout: BatchLayout,
    checkpointing: Checkpointing,
}

/// One micro-batch's summed completion log-probs, their token counts, and the checkpoints of
/// a checkpointed forward pass.
struct SeqForward {
    logp: Tensor,
    completion_tokens: f64,
    num_tokens: usize,
    checkpoints: Option<Checkpoints>,
}

impl SftObjective {
    fn forward(
        &self,
        model: &Llama,
        data: &SeqDataset,
        idx: &[usize],
        training: Option<(Checkpointing, u64)>,
    ) -> Result<SeqForward, TrainError> {
        let seqs: Vec<&TokenizedSequence> = idx.iter().map(|&i| &data.seqs[i]).collect();
        let layout = self.layout.for_pass(model, training.is_some());
        let batch = logps::SequenceBatch::sequences(&seqs, layout, model.device())?;
        let out = match training {
            None => logps::completion_logps(model, &batch)?,
            Some((checkpointing, seed)) => {
                let dropout = Dropout { seed, sequences: idx.iter().map(|&i| i as u64).collect() };
                logps::completion_logps_for_training(model, &batch, checkpointing, Some(dropout))?
            }
        };
        Ok(SeqForward {
            logp: out.logps.sum_all()?,
            completion_tokens: batch.completion_lens.iter().sum::<usize>() as f64,
            num_tokens: batch.num_tokens,
            checkpoints: out.checkpoints,
        })
    }
}

impl Objective for SftObjective {
    fn len(&self) -> usize {
        self.train.seqs.len()
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

    fn micro_step(
        &self,
        policy: &Llama,
        params: &Params,
        step: &[usize],
        micro: &[usize],
        dropout_seed: u64,
    ) -> Result<StepAccumulator, TrainError> {
        let mut acc = StepAccumulator::default();
        // Token-mean over the whole step: each micro-batch weighs by its share of the tokens.
        let step_tokens: usize = step.iter().map(|&i| self.train.seqs[i].completion_len()).sum();
        let fwd = self.forward(policy, &self.train, micro, Some((self.checkpointing, dropout_seed)))?;
        let tokens = fwd.completion_tokens;
        let loss = (fwd.logp.neg()? / tokens.max(1.0))?;
        let share = tokens / step_tokens.max(1) as f64;
        grads::accumulate(&mut acc.grads, &backward(&loss, share, params, policy, fwd.checkpoints.as_ref())?, 1.0)?;
        acc.add_metric("loss", scalar(&loss)?, share);
        acc.num_tokens += fwd.num_tokens as u64;
        Ok(acc)
    }

    fn evaluate(
        &mut self,
        model: &Llama,
        _params: &Params,
    ) -> Result<Option<serde_json::Map<String, serde_json::Value>>, TrainError> {
        let Some(data) = &self.eval else { return Ok(None) };
        let (mut nll, mut tokens) = (0.0, 0.0);
        let all: Vec<usize> = (0..data.seqs.len()).collect();
        for micro in all.chunks(self.batch_size) {
            let fwd = self.forward(model, data, micro, None)?;
            nll -= scalar(&fwd.logp)?;
            tokens += fwd.completion_tokens;
        }
        let mut line = serde_json::Map::new();
        line.insert("eval_loss".into(), (nll / tokens.max(1.0)).into());
        Ok(Some(line))
    }
}
