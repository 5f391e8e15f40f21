//! `prefopt apo`: the online loop with Nesterov extrapolation (docs/apo.md).

use std::path::{Path, PathBuf};

use anyhow::Result;
use indicatif::ProgressBar;
use prefopt_loop::apo::{run_apo, ApoConfig, LoopObserver, Manifest};
use prefopt_train::{Observer, StepStatus};

use crate::plot::{line_chart, ChartSpec, Series};
use prefopt_loop::evaluate::EvalMetrics;

/// Reads one number off an evaluation (None where it does not apply).
type Metric = fn(&EvalMetrics) -> Option<f64>;

#[derive(clap::Args)]
pub struct ApoArgs {
    /// TOML config (keys: docs/apo.md). Rerunning the same command resumes an interrupted run.
    ///
    /// `extrapolation = "parameter"` (default) makes the extrapolated weights the next
    /// sampler, training start and reference; `"logprob"` keeps that sampler and start but
    /// uses the exact reference `(1+alpha) lp(pi_hat_t) - alpha lp(pi_hat_t-1)`, from the two
    /// last trained models, exact only for `sigmoid`/cDPO, `robust`, `hinge` (other losses
    /// are refused with alpha > 0: the dropped normalizer would bias them; docs/apo.md).
    /// `judge_timeout_s` (default 300) bounds one run of a `cmd:` judge, or one reply of an
    /// `llm:<base url>` judge (a chat model on an OpenAI-compatible server, pairwise, both
    /// orders; `judge_model` names it). `sampler = "openai"` samples from such a server.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a key: `--set alpha=0.6 --set train.learning_rate=1e-6` (TOML values).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    #[command(flatten)]
    device: super::DeviceOverride,
}

pub fn run(args: ApoArgs) -> Result<()> {
    let cfg = ApoConfig::load(args.config.as_deref(), &args.device.with_overrides(&args.overrides))?;
    let mut progress = Progress::default();
    let manifest = run_apo(&cfg, &mut progress)?;
    progress.clear();
    let plot = plot_iterations(&manifest, &cfg.output_dir)?;
    print_table(&manifest);
    eprintln!("manifest: {}, plot: {}", cfg.output_dir.join("manifest.json").display(), plot.display());
    Ok(())
}

/// One bar at a time: sampling, judge requests, then training steps; stage names as messages.
#[derive(Default)]
struct Progress {
    bar: Option<ProgressBar>,
    /// What the bar counts (`prompts sampled`, `judge requests`, `steps`).
    unit: &'static str,
    iteration: usize,
}

impl Progress {
    fn clear(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    /// The bar counting `unit`, a new one when the last counted something else.
    fn counting(&mut self, unit: &'static str, done: usize, total: usize) {
        if self.unit != unit {
            self.clear();
            self.unit = unit;
        }
        let bar = self.bar.get_or_insert_with(|| crate::progress::bar(total as u64, unit));
        bar.set_position(done as u64);
    }
}

impl Observer for Progress {
    fn message(&mut self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn start(&mut self, start_step: usize, total_steps: usize) {
        self.clear();
        let bar = crate::progress::bar(total_steps as u64, "steps");
        self.unit = "steps";
        bar.set_position(start_step as u64);
        bar.set_prefix(format!("iter {} train", self.iteration));
        self.bar = Some(bar);
    }

    fn step(&mut self, step: usize, s: &StepStatus) {
        if let Some(bar) = &self.bar {
            bar.set_position(step as u64);
            bar.set_message(format!("iter {} loss {:.4} acc {:.2}", self.iteration, s.loss, s.reward_accuracy));
        }
    }

    fn finish(&mut self) {
        self.clear();
    }
}

impl LoopObserver for Progress {
    fn stage(&mut self, iteration: usize, stage: &str) {
        self.clear();
        self.iteration = iteration;
        eprintln!("iteration {iteration}: {stage}");
    }

    fn samples(&mut self, done: usize, total: usize) {
        self.counting("prompts sampled", done, total);
    }

    fn judged(&mut self, done: usize, total: usize) {
        self.counting("judge requests", done, total);
    }
}

/// Held-out reward, accuracy, malformed rate, win rate and KL per iteration, trained and
/// extrapolated, in one PNG per metric family.
fn plot_iterations(manifest: &Manifest, out: &Path) -> Result<PathBuf> {
    let base = manifest.base_eval.clone().unwrap_or_default();
    let series = |name: &str, get: Metric, extrapolated: bool| {
        let mut points: Vec<(f64, f64)> = get(&base).map(|v| vec![(0.0, v)]).unwrap_or_default();
        for r in &manifest.iterations {
            let m = if extrapolated { &r.eval_extrapolated } else { &r.eval_trained };
            if let Some(v) = m.as_ref().and_then(get) {
                points.push((r.iteration as f64, v));
            }
        }
        let s = Series::new(name, points).with_markers();
        if extrapolated {
            s.dashed()
        } else {
            s
        }
    };
    let mut spec = ChartSpec::new("APO: held-out evaluation per iteration (0 = base)", "iteration", "value");
    let metrics: [(&str, Metric); 5] = [
        ("reward", |m| Some(m.eval_reward)),
        ("accuracy", |m| m.eval_accuracy),
        ("malformed", |m| Some(m.malformed_rate)),
        ("win vs base", |m| Some(m.win_rate_vs_base)),
        ("KL to base", |m| Some(m.kl_to_base)),
    ];
    for (name, get) in metrics {
        spec = spec.series(series(&format!("{name} (trained)"), get, false));
        spec = spec.series(series(&format!("{name} (extrapolated)"), get, true));
    }
    spec.series.retain(|s| !s.points.is_empty());
    let path = out.join("apo.png");
    line_chart(&path, &spec)?;
    Ok(path)
}

fn print_table(manifest: &Manifest) {
    eprintln!("iteration  model         reward  accuracy  malformed  win_vs_base  kl_to_base  pairs");
    if let Some(b) = &manifest.base_eval {
        eprintln!(
            "0          base          {:>6.3}  {:>8}  {:>9.3}  {:>11.3}  {:>10.3}",
            b.eval_reward,
            fmt_opt(b.eval_accuracy),
            b.malformed_rate,
            b.win_rate_vs_base,
            b.kl_to_base
        );
    }
    for r in &manifest.iterations {
        for (which, m) in [("trained", &r.eval_trained), ("extrapolated", &r.eval_extrapolated)] {
            if let Some(m) = m {
                eprintln!(
                    "{:<10} {:<13} {:>6.3}  {:>8}  {:>9.3}  {:>11.3}  {:>10.3}  {}",
                    r.iteration,
                    which,
                    m.eval_reward,
                    fmt_opt(m.eval_accuracy),
                    m.malformed_rate,
                    m.win_rate_vs_base,
                    m.kl_to_base,
                    r.pair_count
                );
            }
        }
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.3}"))
}
