//! `prefopt train` (offline preference training: DPO family, SPO), `prefopt sft`
//! (supervised fine-tuning) and `prefopt reward` (reward-model training), from a TOML config.

use std::path::{Path, PathBuf};

use anyhow::Result;
use indicatif::ProgressBar;
use prefopt_train::{metrics::MetricsLog, train, train_reward, train_sft, Observer, StepStatus, TrainConfig};

use crate::plot::{line_chart, ChartSpec, Series};

#[derive(clap::Args)]
pub struct TrainArgs {
    /// TOML config; every key and its default: docs/train.md.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a key: `--set beta=0.05 --set loss_type='["sigmoid","sft"]'` (TOML values).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Continue from the newest complete checkpoint in output_dir (fresh start if none).
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    device: super::DeviceOverride,
}

/// Which objective a run optimizes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Preference,
    Sft,
    Reward,
}

pub fn run(args: TrainArgs, kind: Kind) -> Result<()> {
    let overrides = args.device.with_overrides(&args.overrides);
    let mut cfg = match kind {
        Kind::Preference => TrainConfig::load(args.config.as_deref(), &overrides)?,
        Kind::Sft => TrainConfig::load_sft(args.config.as_deref(), &overrides)?,
        Kind::Reward => TrainConfig::load_reward(args.config.as_deref(), &overrides)?,
    };
    if args.resume && cfg.resume_from_checkpoint.is_none() {
        cfg.resume_from_checkpoint = Some("latest".into());
    }
    if cfg.resume_from_checkpoint.as_deref() == Some("latest")
        && prefopt_train::checkpoint::latest(&cfg.output_dir).is_none()
    {
        // Not an error (TRL's is): a run killed before its first checkpoint must be able to
        // restart with the same command; but say that nothing was resumed.
        eprintln!(
            "note: --resume (resume_from_checkpoint = \"latest\"): no checkpoint-<step> folder in {} yet; starting \
             from step 0",
            cfg.output_dir.display()
        );
    }
    let mut progress = BarObserver::default();
    let summary = match kind {
        Kind::Preference => train(&cfg, &mut progress)?,
        Kind::Sft => train_sft(&cfg, &mut progress)?,
        Kind::Reward => train_reward(&cfg, &mut progress)?,
    };
    let plots = plot_training_curves(&summary.metrics_path, &cfg.output_dir)?;
    let mut notes = Vec::new();
    if summary.skipped_batches > 0 {
        notes.push(format!("{} batches skipped as non-finite", summary.skipped_batches));
    }
    if summary.dropped_train > 0 {
        notes.push(format!("{} examples dropped by max_length", summary.dropped_train));
    }
    if summary.boundary_moved > 0 {
        notes.push(format!("{} completions started at the shared token prefix", summary.boundary_moved));
    }
    eprintln!(
        "trained {} steps{} -> {} (metrics: {}, plots: {})",
        summary.steps,
        if notes.is_empty() { String::new() } else { format!(" ({})", notes.join("; ")) },
        summary.final_dir.display(),
        summary.metrics_path.display(),
        plots.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    // TRL's closing line, with its names.
    let r = summary.runtime;
    eprintln!(
        "train_runtime {:.1} s, train_samples_per_second {:.3}, train_steps_per_second {:.3}, train_loss {:.4} ({})",
        r.train_runtime,
        r.train_samples_per_second,
        r.train_steps_per_second,
        r.train_loss,
        cfg.output_dir.join(prefopt_train::trainer::RUNTIME_FILE).display()
    );
    Ok(())
}

/// Progress on stderr: reference pass, then steps with loss, reward accuracy, tokens/s, ETA.
#[derive(Default)]
struct BarObserver {
    bar: Option<ProgressBar>,
}

impl Observer for BarObserver {
    fn message(&mut self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn reference_progress(&mut self, done: usize, total: usize) {
        let bar = self.bar.get_or_insert_with(|| crate::progress::bar(total as u64, "reference pairs"));
        bar.set_position(done as u64);
        if done >= total {
            bar.finish_and_clear();
            self.bar = None;
        }
    }

    fn start(&mut self, start_step: usize, total_steps: usize) {
        let bar = crate::progress::bar(total_steps as u64, "steps");
        bar.set_position(start_step as u64);
        bar.reset_eta();
        self.bar = Some(bar);
    }

    fn step(&mut self, step: usize, s: &StepStatus) {
        if let Some(bar) = &self.bar {
            bar.set_position(step as u64);
            let acc = if s.reward_accuracy.is_nan() { String::new() } else { format!(" acc {:.2}", s.reward_accuracy) };
            bar.set_message(format!("loss {:.4}{acc} {:.0} tok/s", s.loss, s.tokens_per_s));
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// PNGs of the logged curves: loss, rewards, log-probs. Returns the files written.
fn plot_training_curves(metrics: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    let lines = MetricsLog::read_all(metrics);
    let curve = |key: &str| -> Vec<(f64, f64)> {
        lines.iter().filter_map(|l| Some((l.get("step")?.as_f64()?, l.get(key)?.as_f64()?))).collect()
    };
    let charts = [
        ("loss.png", "Training loss", "loss", vec!["loss", "eval_loss"]),
        (
            "rewards.png",
            "Implicit rewards (beta * log-ratio)",
            "reward",
            vec!["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"],
        ),
        (
            "logps.png",
            "Completion log-probs (nats)",
            "log-prob",
            vec!["logps/chosen", "logps/rejected", "eval_logps/chosen", "eval_logps/rejected"],
        ),
        (
            "reward_model.png",
            "Reward model: pairs ranked right, reward margin",
            "value",
            vec!["accuracy", "eval_accuracy", "margin", "eval_margin"],
        ),
    ];
    let mut written = Vec::new();
    for (file, title, y, keys) in charts {
        let mut spec = ChartSpec::new(title, "step", y);
        for key in keys {
            let points = curve(key);
            if !points.is_empty() {
                spec = spec.series(Series::new(key, points).with_markers());
            }
        }
        if !spec.series.is_empty() {
            let path = out.join(file);
            line_chart(&path, &spec)?;
            written.push(path);
        }
    }
    Ok(written)
}
