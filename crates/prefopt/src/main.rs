//! `prefopt`: the command-line tool. A thin layer over the library crates:
//! it parses arguments and configs, shows progress, and writes reports and plots.

mod cmd;
mod plot;
mod progress;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "prefopt", version, about = "Preference optimization for language models: DPO family, SPO, APO")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The built-in demo: shipped base model, SPO vs DPO, APO vs iterative DPO, report and plots.
    Demo(cmd::demo::DemoArgs),
    /// Summed completion log-probs of chosen/rejected pairs under a model (JSONL out).
    Score(cmd::score::ScoreArgs),
    /// Offline preference training: DPO loss family, SPO, from a TOML config.
    Train(cmd::train::TrainArgs),
    /// Supervised fine-tuning on prompt/completion or messages data, from a TOML config.
    Sft(cmd::train::TrainArgs),
    /// Reward-model training (Bradley-Terry, TRL's RewardTrainer) on preference pairs, from a
    /// TOML config: a *ForSequenceClassification folder for the `rm:` judge.
    Reward(cmd::train::TrainArgs),
    /// Sample completions of a prompt file with a KV cache, with their log-probs (JSONL out).
    Generate(cmd::generate::GenerateArgs),
    /// Throughput of the forward and forward+backward passes (one JSON line).
    Bench(cmd::bench::BenchArgs),
    /// The online loop: sample, judge, train, extrapolate (Accelerated Preference Optimization).
    Apo(cmd::apo::ApoArgs),
    /// A freshly initialized model folder from an architecture config.json and a tokenizer.
    Init(cmd::init::InitArgs),
    /// A PEFT LoRA adapter folded into its base model: a plain Hugging Face folder.
    Merge(cmd::merge::MergeArgs),
    /// JSONL datasets (prompts, SFT data) from a built-in task.
    Tasks(cmd::tasks::TasksArgs),
    /// A synthetic preference set with ragged, UltraFeedback-like lengths (benchmark workload).
    Workload(cmd::workload::WorkloadArgs),
    /// Exact tabular simulator of iterative preference optimization with Nesterov extrapolation.
    Simulate(cmd::simulate::SimulateArgs),
}

fn main() -> std::process::ExitCode {
    // First: it may re-execute the binary (see its docs).
    prefopt_model::process::keep_freed_memory();
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Bench(args) => args.threads,
        _ => None,
    };
    prefopt_model::process::report_file_size_limit_as_error();
    let result = prefopt_model::process::with_compute_threads(threads, || run(cli.command));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Demo(args) => cmd::demo::run(args),
        Command::Score(args) => cmd::score::run(args),
        Command::Simulate(args) => cmd::simulate::run(args),
        Command::Apo(args) => cmd::apo::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Train(args) => cmd::train::run(args, cmd::train::Kind::Preference),
        Command::Sft(args) => cmd::train::run(args, cmd::train::Kind::Sft),
        Command::Reward(args) => cmd::train::run(args, cmd::train::Kind::Reward),
        Command::Init(args) => cmd::init::run(args),
        Command::Merge(args) => cmd::merge::run(args),
        Command::Tasks(args) => cmd::tasks::run(args),
        Command::Workload(args) => cmd::workload::run(args),
    }
}
