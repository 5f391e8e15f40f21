//! `prefopt score`: summed completion log-probs of each chosen/rejected pair under a model.

use std::path::PathBuf;

use anyhow::{Context, Result};
use prefopt_data::{
    parse_preference, read_records, tokenize_pair, tokenize_records, HfTokenizer, PairOutcome, PromptBoundary,
    TokenizeOptions,
};
use prefopt_train::score_pairs;

use super::{AdapterArg, DeviceArg, LayoutArg};

#[derive(clap::Args)]
pub struct ScoreArgs {
    /// Hugging Face model folder (config.json, safetensors, tokenizer files) or
    /// `org/name[@revision]` in the local Hugging Face cache, or an adapter
    /// stack folder (adapter_stack.json, as the APO loop writes with LoRA).
    #[arg(long, value_parser = super::model_dir)]
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
    /// Pairs per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// A conversation whose tokens do not start with its prompt's (a byte-level BPE merge
    /// across the prompt's end): `error` lists every such row; `common-prefix` starts the
    /// completion at the shared token prefix (TRL's rule) and counts them.
    #[arg(long, value_enum, default_value = "error")]
    prompt_boundary: Boundary,
    #[command(flatten)]
    layout: LayoutArg,
    #[command(flatten)]
    adapter: AdapterArg,
    #[command(flatten)]
    device: DeviceArg,
}

/// `--prompt-boundary`'s values.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Boundary {
    Error,
    CommonPrefix,
}

pub fn run(args: ScoreArgs) -> Result<()> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    anyhow::ensure!(args.max_length >= 2, "--max-length must be at least 2 (a prompt token and a completion token)");
    let device = args.device.device()?;
    let tokenizer = HfTokenizer::from_dir(&args.model)?;
    let model = args.adapter.network(&args.model, &device)?;
    let records = read_records(&args.data)?;
    anyhow::ensure!(!records.is_empty(), "{}: no examples to score", args.data.display());
    let opts = TokenizeOptions {
        max_length: Some(args.max_length),
        max_prompt_length: None,
        prompt_boundary: match args.prompt_boundary {
            Boundary::Error => PromptBoundary::Error,
            Boundary::CommonPrefix => PromptBoundary::CommonPrefix,
        },
    };

    // Tokenize everything first, so a bad example fails the run before any compute.
    let outcomes = tokenize_records(&args.data, &records, |r| tokenize_pair(&tokenizer, &parse_preference(r)?, &opts))?;
    let kept: Vec<&prefopt_data::TokenizedPair> = outcomes
        .iter()
        .filter_map(|o| match o {
            PairOutcome::Kept(pair) => Some(pair),
            PairOutcome::Dropped(_) => None,
        })
        .collect();

    if kept.is_empty() {
        let first = outcomes.iter().find_map(|o| match o {
            PairOutcome::Dropped(reason) => Some(reason.clone()),
            PairOutcome::Kept(_) => None,
        });
        anyhow::bail!(
            "{}: all {} examples dropped by max_length {}, nothing to score (the first: {}); raise --max-length",
            args.data.display(),
            records.len(),
            args.max_length,
            first.unwrap_or_default()
        );
    }
    let progress = crate::progress::bar(kept.len() as u64, "pairs");
    let logps = score_pairs(&model, &kept, args.batch_size, args.layout.layout(tokenizer.padding_id()), |done| {
        progress.set_position(done as u64)
    })?;
    progress.finish_and_clear();

    let mut scores = logps.iter();
    let mut lines = Vec::with_capacity(records.len());
    for (i, outcome) in outcomes.iter().enumerate() {
        lines.push(match outcome {
            PairOutcome::Dropped(reason) => serde_json::json!({"index": i, "dropped": reason}),
            PairOutcome::Kept(pair) => {
                let (chosen, rejected) = scores.next().context("internal error: fewer scores than pairs")?;
                serde_json::json!({
                    "index": i,
                    "logp_chosen": *chosen as f64,
                    "logp_rejected": *rejected as f64,
                    "n_tokens_chosen": pair.chosen.completion_len(),
                    "n_tokens_rejected": pair.rejected.completion_len(),
                })
            }
        });
    }
    prefopt_fs::write_jsonl(&args.out, &lines).with_context(|| format!("writing scores to {}", args.out.display()))?;
    let dropped = records.len() - kept.len();
    let moved = kept.iter().filter(|p| p.chosen.boundary_moved || p.rejected.boundary_moved).count();
    let moved =
        if moved > 0 { format!(", {moved} with the completion at the shared token prefix") } else { String::new() };
    eprintln!(
        "scored {} of {} examples ({dropped} dropped by max_length {}{moved}) -> {}",
        kept.len(),
        records.len(),
        args.max_length,
        args.out.display()
    );
    Ok(())
}
