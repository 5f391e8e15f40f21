//! `prefopt score`: summed completion log-probs of each chosen/rejected pair under a model.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use prefopt_data::{parse_preference, read_records, tokenize_pair, HfTokenizer, PairOutcome, TokenizeOptions};
use prefopt_model::HfModel;
use prefopt_train::{completion_logps, SequenceBatch};

#[derive(clap::Args)]
pub struct ScoreArgs {
    /// Hugging Face model folder (config.json, safetensors, tokenizer files).
    #[arg(long)]
    model: PathBuf,
    /// Preference data: JSONL or Parquet in TRL's standard or conversational format.
    #[arg(long)]
    data: PathBuf,
    /// Output JSONL: one line per input example, in input order.
    #[arg(long)]
    out: PathBuf,
    /// Total token budget per sequence (prompt + completion; the completion is cut first).
    /// Examples whose prompt alone fills it are reported as dropped.
    #[arg(long, default_value_t = 1024)]
    max_length: usize,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
}

pub fn run(args: ScoreArgs) -> Result<()> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    let device = Device::Cpu;
    let tokenizer = HfTokenizer::from_dir(&args.model)?;
    let hf = HfModel::load(&args.model, &device)?;
    let model = hf.build(false)?;
    let records = read_records(&args.data)?;
    let opts = TokenizeOptions { max_length: Some(args.max_length), max_prompt_length: None };

    // Tokenize everything first, so a bad example fails the run before any compute.
    let mut outcomes = Vec::with_capacity(records.len());
    for record in &records {
        outcomes.push(tokenize_pair(&tokenizer, &parse_preference(record)?, &opts)?);
    }
    let kept: Vec<(usize, &prefopt_data::TokenizedPair)> = outcomes
        .iter()
        .enumerate()
        .filter_map(|(i, o)| match o {
            PairOutcome::Kept(pair) => Some((i, pair)),
            PairOutcome::Dropped(_) => None,
        })
        .collect();

    let pad_id = tokenizer.pad_token_id().or(tokenizer.eos_token_ids().first().copied()).unwrap_or(0);
    let progress = crate::progress::bar(kept.len() as u64, "pairs");
    let mut scores = vec![None; records.len()];
    for chunk in kept.chunks(args.batch_size) {
        let seqs: Vec<&prefopt_data::TokenizedSequence> =
            chunk.iter().flat_map(|(_, p)| [&p.chosen, &p.rejected]).collect();
        let batch = SequenceBatch::new(&seqs, pad_id, &device)?;
        let logps: Vec<f32> = completion_logps(&model, &batch)?.logps.to_vec1()?;
        for (k, (i, pair)) in chunk.iter().enumerate() {
            scores[*i] = Some(serde_json::json!({
                "index": i,
                "logp_chosen": logps[2 * k] as f64,
                "logp_rejected": logps[2 * k + 1] as f64,
                "n_tokens_chosen": pair.chosen.completion_len(),
                "n_tokens_rejected": pair.rejected.completion_len(),
            }));
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();

    let mut text = String::new();
    let mut dropped = 0;
    for (i, (outcome, score)) in outcomes.iter().zip(scores).enumerate() {
        let line = match (outcome, score) {
            (PairOutcome::Dropped(reason), _) => {
                dropped += 1;
                serde_json::json!({"index": i, "dropped": reason})
            }
            (PairOutcome::Kept(_), score) => {
                score.with_context(|| format!("internal error: pair {i} was not scored"))?
            }
        };
        text.push_str(&line.to_string());
        text.push('\n');
    }
    prefopt_model::fsio::write_atomic(&args.out, text.as_bytes())
        .with_context(|| format!("writing scores to {}", args.out.display()))?;
    let mut stderr = std::io::stderr();
    let _ = writeln!(
        stderr,
        "scored {} of {} examples ({dropped} dropped by max_length {}) -> {}",
        records.len() - dropped,
        records.len(),
        args.max_length,
        args.out.display()
    );
    Ok(())
}
