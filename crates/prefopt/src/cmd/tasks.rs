//! `prefopt tasks`: JSONL datasets from a built-in task (prompts, or SFT data with an
//! optional share of off-format answers).

use std::path::PathBuf;

use anyhow::Result;
use prefopt_loop::task_data::{prompt_records, sft_records};
use prefopt_loop::tasks::task_by_name;

#[derive(clap::Args)]
pub struct TasksArgs {
    /// Built-in task: arithmetic, compare or reverse.
    #[arg(long)]
    task: String,
    /// `prompts` (`{"prompt"}` lines) or `sft` (`{"prompt", "completion"}` lines).
    #[arg(long, value_parser = ["prompts", "sft"])]
    kind: String,
    /// Lines to write (at least 1).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
    /// Seeds the prompts (and the off-format draws).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// `sft` only: share of completions giving the value without the `Answer: ` marker
    /// (graded malformed), so a model trained on them sometimes answers out of format.
    #[arg(long, default_value_t = 0.0)]
    off_format_rate: f64,
    /// `sft` only: share of completions with a wrong answer in the right form (the task's
    /// typical mistakes, e.g. the smaller number for `compare`).
    #[arg(long, default_value_t = 0.0)]
    wrong_rate: f64,
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: TasksArgs) -> Result<()> {
    anyhow::ensure!(
        args.off_format_rate >= 0.0 && args.wrong_rate >= 0.0 && args.off_format_rate + args.wrong_rate <= 1.0,
        "--off-format-rate and --wrong-rate must be at least 0 and sum to at most 1"
    );
    let task = task_by_name(&args.task)?;
    let rows = match args.kind.as_str() {
        "prompts" => prompt_records(task.as_ref(), args.count as usize, args.seed),
        _ => sft_records(task.as_ref(), args.count as usize, args.seed, args.off_format_rate, args.wrong_rate)?,
    };
    prefopt_fs::write_jsonl(&args.out, &rows)?;
    eprintln!("wrote {} {} lines of task `{}` -> {}", rows.len(), args.kind, args.task, args.out.display());
    Ok(())
}
