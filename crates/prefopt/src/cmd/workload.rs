//! `prefopt workload`: a synthetic preference set with UltraFeedback-like ragged lengths for a
//! given tokenizer (JSONL out), the workload of `prefopt bench dpo --data`.

use std::path::PathBuf;

use anyhow::Result;
use prefopt_data::workload::{ragged_preferences, Workload};
use prefopt_data::HfTokenizer;

#[derive(clap::Args)]
pub struct WorkloadArgs {
    /// The model (or tokenizer) folder whose tokenizer measures the lengths, or
    /// `org/name[@revision]` in the local Hugging Face cache.
    #[arg(long, value_parser = super::model_dir)]
    model: PathBuf,
    /// Preference rows to write (at least 1).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Median prompt tokens (log-normal, sigma 0.7).
    #[arg(long, default_value_t = 120)]
    prompt_median: usize,
    /// Longest prompt, in tokens.
    #[arg(long, default_value_t = 600)]
    prompt_max: usize,
    /// Median completion tokens, chosen and rejected drawn independently (log-normal, sigma 0.6).
    #[arg(long, default_value_t = 250)]
    completion_median: usize,
    /// Longest completion, in tokens.
    #[arg(long, default_value_t = 800)]
    completion_max: usize,
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: WorkloadArgs) -> Result<()> {
    let mut workload = Workload::default();
    workload.prompt.median = args.prompt_median as f64;
    workload.prompt.max = args.prompt_max;
    workload.completion.median = args.completion_median as f64;
    workload.completion.max = args.completion_max;
    for (name, d) in [("prompt", workload.prompt), ("completion", workload.completion)] {
        anyhow::ensure!(
            d.median >= 1.0 && d.max >= d.min,
            "--{name}-median must be at least 1 and --{name}-max at least {}",
            d.min
        );
    }
    let tok = HfTokenizer::from_dir(&args.model)?;
    let rows = ragged_preferences(&tok, &workload, args.count as usize, args.seed)?;
    prefopt_fs::write_jsonl(&args.out, &rows)?;
    eprintln!("wrote {} preference rows -> {}", rows.len(), args.out.display());
    Ok(())
}
