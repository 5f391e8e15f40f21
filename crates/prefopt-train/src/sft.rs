//! Supervised fine-tuning: the mean negative log-likelihood of completion tokens (prompt
//! tokens masked), TRL's `SFTTrainer` loss, on `prompt`/`completion` or `messages` data.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use prefopt_data::{
    parse_sft, read_records, tokenize_sft, HfTokenizer, SeqOutcome, TokenizeOptions, TokenizedSequence,
};
use prefopt_model::{Llama, Params};

use crate::config::TrainConfig;
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
}

impl SeqDataset {
    /// Reads and tokenizes `path`; empty or fully-dropped data is an error.
    pub fn load(path: &Path, tok: &HfTokenizer, opts: &TokenizeOptions) -> Result<Self, TrainError> {
        let records = read_records(path)?;
        if records.is_empty() {
            return Err(TrainError::EmptyData { path: path.to_path_buf() });
        }
        let (mut seqs, mut sources, mut dropped, mut first_reason) = (Vec::new(), Vec::new(), 0, None);
        for record in &records {
            match tokenize_sft(tok, &parse_sft(record)?, opts)? {
                SeqOutcome::Kept(seq) => {
                    seqs.push(seq);
                    sources.push(record.source.to_string());
                }
                SeqOutcome::Dropped(reason) => {
                    dropped += 1;
                    first_reason.get_or_insert(format!("{}: {reason}", record.source));
                }
            }
        }
        if seqs.is_empty() {
            return Err(TrainError::AllDropped {
                path: path.to_path_buf(),
                dropped,
                example: first_reason.unwrap_or_default(),
            });
        }
        Ok(Self { path: path.to_path_buf(), seqs, sources, dropped })
    }
}

/// Runs an SFT job as configured (the preference-only keys are rejected by
/// [`TrainConfig::load_sft`]).
pub fn train_sft(cfg: &TrainConfig, obs: &mut dyn Observer) -> Result<TrainSummary, TrainError> {
    let resume_dir = prepare_output(cfg)?;
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
    let mut objective = SftObjective { train, eval, batch_size: cfg.batch_size, pad_id: tok.padding_id() };
    run_loop(cfg, resume_dir, &mut objective, obs)
}

struct SftObjective {
    train: SeqDataset,
    eval: Option<SeqDataset>,
    batch_size: usize,
    pad_id: u32,
}

impl SftObjective {
    /// Summed completion log-probs of `idx` and their token count.
    fn forward(&self, model: &Llama, data: &SeqDataset, idx: &[usize]) -> Result<(Tensor, f64, usize), TrainError> {
        let seqs: Vec<&TokenizedSequence> = idx.iter().map(|&i| &data.seqs[i]).collect();
        let batch = logps::SequenceBatch::new(&seqs, self.pad_id, model.device())?;
        let lp = logps::completion_logps(model, &batch)?.logps.sum_all()?;
        let tokens = batch.completion_lens.iter().sum::<usize>() as f64;
        Ok((lp, tokens, batch.num_tokens))
    }
}

impl Objective for SftObjective {
    fn len(&self) -> usize {
        self.train.seqs.len()
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
    ) -> Result<StepAccumulator, TrainError> {
        let mut acc = StepAccumulator::default();
        // Token-mean over the whole step: each micro-batch weighs by its share of the tokens.
        let step_tokens: usize = step.iter().map(|&i| self.train.seqs[i].completion_len()).sum();
        let (lp, tokens, num_tokens) = self.forward(policy, &self.train, micro)?;
        let loss = (lp.neg()? / tokens.max(1.0))?;
        let share = tokens / step_tokens.max(1) as f64;
        grads::accumulate(&mut acc.grads, &backward(&loss, params)?, share)?;
        acc.add_metric("loss", scalar(&loss)?, share);
        acc.num_tokens += num_tokens as u64;
        Ok(acc)
    }

    fn evaluate(&mut self, model: &Llama) -> Result<Option<serde_json::Map<String, serde_json::Value>>, TrainError> {
        let Some(data) = &self.eval else { return Ok(None) };
        let (mut nll, mut tokens) = (0.0, 0.0);
        let all: Vec<usize> = (0..data.seqs.len()).collect();
        for micro in all.chunks(self.batch_size) {
            let (lp, t, _) = self.forward(model, data, micro)?;
            nll -= scalar(&lp)?;
            tokens += t;
        }
        let mut line = serde_json::Map::new();
        line.insert("eval_loss".into(), (nll / tokens.max(1.0)).into());
        Ok(Some(line))
    }
}
