//! `prefopt demo`: the built-in demonstration (crates/prefopt-demo): the shipped base model,
//! SPO against DPO offline, APO against iterative DPO online, a report with plots.

use std::path::{Path, PathBuf};

use anyhow::Result;
use indicatif::{MultiProgress, ProgressBar};
use prefopt_demo::summary::{methods, rows_of, RunRow, Spread, Summary};
use prefopt_demo::{base_model, report, run_demo, DemoObserver, Recipe};
use prefopt_loop::apo::LoopObserver;
use prefopt_train::{Observer, StepStatus};

use crate::plot::{line_chart, ChartSpec, Legend, Series};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Output folder: report.md, summary.json, plots, and every run's files. Rerunning the same
    /// command continues an interrupted demo.
    #[arg(long, default_value = "out/demo")]
    out: PathBuf,
    /// Seeds per experiment (default 5; 1 with --quick).
    #[arg(long)]
    seeds: Option<usize>,
    /// A smaller run for CI and a first look (under 2 minutes on 2 cores).
    #[arg(long)]
    quick: bool,
    /// Base model folder instead of the shipped one (a Llama-family folder whose tokenizer
    /// covers the task's text).
    #[arg(long, value_parser = super::model_dir)]
    base_model: Option<PathBuf>,
    #[command(flatten)]
    device: super::DeviceArg,
}

pub fn run(args: DemoArgs) -> Result<()> {
    args.device.device()?; // refuse an unusable device before any work
    anyhow::ensure!(!args.out.is_file(), "--out {} is a file; the demo writes a folder there", args.out.display());
    let seeds = args.seeds.unwrap_or(if args.quick { 1 } else { 5 });
    anyhow::ensure!(seeds >= 1, "--seeds must be at least 1");
    let recipe = if args.quick { Recipe::quick(seeds) } else { Recipe::full(seeds) };
    let base = match args.base_model {
        Some(dir) => dir,
        None => {
            let dir = args.out.join("base-model");
            base_model::write_base_model(&dir)?;
            dir
        }
    };
    let mut progress = DemoProgress::new();
    let summary = run_demo(&recipe, &base, &args.out, &args.device.device, &mut progress)?;
    progress.clear();
    plot_online(&summary, &args.out)?;
    plot_offline(&summary, &args.out)?;
    let held = summary.claims.iter().filter(|c| c.holds_across_seeds).count();
    eprintln!(
        "demo finished in {:.0} s: {held} of {} claims hold across seeds -> {} (summary.json, plots beside it)",
        summary.wall_s,
        summary.claims.len(),
        args.out.join("report.md").display()
    );
    Ok(())
}

/// Two bars: runs of the demo (with ETA), and the current run's sampling or training steps.
struct DemoProgress {
    multi: MultiProgress,
    runs: Option<ProgressBar>,
    inner: Option<ProgressBar>,
    label: String,
}

impl DemoProgress {
    fn new() -> Self {
        Self { multi: MultiProgress::new(), runs: None, inner: None, label: String::new() }
    }

    fn clear_inner(&mut self) {
        if let Some(bar) = self.inner.take() {
            bar.finish_and_clear();
            self.multi.remove(&bar);
        }
    }

    fn clear(&mut self) {
        self.clear_inner();
        if let Some(bar) = self.runs.take() {
            bar.finish_and_clear();
        }
    }

    fn inner_bar(&mut self, total: usize, unit: &str) -> &ProgressBar {
        if self.inner.as_ref().is_none_or(|b| b.length() != Some(total as u64)) {
            self.clear_inner();
            self.inner = Some(self.multi.add(crate::progress::bar(total as u64, unit)));
        }
        self.inner.as_ref().expect("just set")
    }
}

impl Observer for DemoProgress {
    fn message(&mut self, text: &str) {
        let _ = self.multi.println(text);
    }

    fn start(&mut self, start_step: usize, total_steps: usize) {
        self.clear_inner();
        self.inner_bar(total_steps, "steps").set_position(start_step as u64);
    }

    fn step(&mut self, step: usize, s: &StepStatus) {
        if let Some(bar) = &self.inner {
            bar.set_position(step as u64);
            bar.set_message(format!("loss {:.4}", s.loss));
        }
    }

    fn finish(&mut self) {
        self.clear_inner();
    }
}

impl LoopObserver for DemoProgress {
    fn stage(&mut self, iteration: usize, stage: &str) {
        self.clear_inner();
        if let Some(bar) = &self.runs {
            bar.set_message(format!("{}: iteration {iteration} {stage}", self.label));
        }
    }

    fn samples(&mut self, done: usize, total: usize) {
        self.inner_bar(total, "prompts sampled").set_position(done as u64);
    }
}

impl DemoObserver for DemoProgress {
    fn run_started(&mut self, done: usize, total: usize, label: &str) {
        let multi = &self.multi;
        let bar = self.runs.get_or_insert_with(|| multi.add(crate::progress::bar(total as u64, "runs")));
        bar.set_position(done as u64);
        bar.set_message(label.to_string());
        if bar.is_hidden() {
            // Not a terminal (CI, a log file): a plain line per run instead of a bar.
            eprintln!("[{done}/{total}] {label}");
        }
        self.label = label.to_string();
    }
}

/// Mean over seeds per x, with a min..max band.
fn mean_series(name: &str, by_x: &[(f64, Vec<f64>)]) -> Series {
    let points = by_x.iter().map(|(x, v)| (*x, Spread::of(v).mean)).collect();
    let band = by_x.iter().map(|(x, v)| (*x, Spread::of(v).min, Spread::of(v).max)).collect();
    Series::new(name, points).with_band(band).with_markers()
}

/// Reads one number off a run row.
type RowMetric = fn(&RunRow) -> f64;

/// Held-out accuracy and reward per iteration per method, seed bands.
fn plot_online(s: &Summary, out: &Path) -> Result<()> {
    let metrics: [(&str, &str, RowMetric); 2] = [
        (report::PLOT_ONLINE_ACCURACY, "held-out accuracy", |r| r.eval_accuracy.unwrap_or(0.0)),
        (report::PLOT_ONLINE_REWARD, "held-out reward", |r| r.eval_reward),
    ];
    for (file, label, get) in metrics {
        let title = format!("Online: {label} per iteration (mean over {} seeds, band min..max)", s.recipe.seeds.len());
        let mut spec = ChartSpec::new(title, "iteration (0 = base)", label).legend(Legend::LowerRight);
        for m in methods(&s.runs, "online") {
            let by_x: Vec<(f64, Vec<f64>)> = (0..=s.recipe.iterations)
                .map(|t| (t as f64, rows_of(&s.runs, "online", &m, Some(t)).iter().map(|r| get(r)).collect()))
                .collect();
            spec = spec.series(mean_series(&m, &by_x));
        }
        line_chart(&out.join(file), &spec)?;
    }
    Ok(())
}

/// Mean summed log-prob of the preference set's chosen (solid) and rejected (dashed) responses
/// over training, per method.
fn plot_offline(s: &Summary, out: &Path) -> Result<()> {
    let title = format!("Offline: log-probs of the preference set (mean over {} seeds)", s.recipe.seeds.len());
    let mut spec = ChartSpec::new(title, "training step", "mean summed log-prob (nats)").legend(Legend::LowerLeft);
    for (i, m) in s.recipe.offline_methods.iter().enumerate() {
        let runs: Vec<_> = s.offline_trajectories.iter().filter(|t| t.method == m.name).collect();
        let Some(first) = runs.first() else { continue };
        let color = crate::plot::palette(i);
        for (side, dashed) in [("chosen", false), ("rejected", true)] {
            let by_x: Vec<(f64, Vec<f64>)> = first
                .steps
                .iter()
                .enumerate()
                .map(|(k, step)| {
                    let values = runs
                        .iter()
                        .filter_map(|t| if side == "chosen" { t.logps_chosen.get(k) } else { t.logps_rejected.get(k) })
                        .copied()
                        .collect();
                    (*step as f64, values)
                })
                .collect();
            let series = mean_series(&format!("{} {side}", m.name), &by_x).with_color(color);
            spec = spec.series(if dashed { series.dashed() } else { series });
        }
    }
    line_chart(&out.join(report::PLOT_OFFLINE_LOGPS), &spec)?;
    Ok(())
}
